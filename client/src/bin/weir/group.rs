//! `weir group list|describe|reset`.

use clap::Subcommand;
use weir_client::{Client, GroupInfo, GroupType, StartFrom};

use crate::Output;

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// List groups (of one topic with --topic).
    List {
        /// Only groups of this topic.
        #[arg(long)]
        topic: Option<String>,
    },
    /// Members, committed offsets, lag and pending acks of a group.
    Describe {
        /// Group name.
        name: String,
    },
    /// Move a group to the earliest or latest offset, or to a time.
    Reset {
        /// Group name.
        name: String,
        /// `earliest`, `latest`, or an RFC 3339 time such as `2026-11-23T10:00:00Z`.
        #[arg(long)]
        to: String,
    },
    /// Delete a group and its offsets.
    Delete {
        /// Group name.
        name: String,
    },
}

fn position(to: &str) -> anyhow::Result<StartFrom> {
    Ok(match to {
        "earliest" => StartFrom::Earliest,
        "latest" => StartFrom::Latest,
        other => StartFrom::Time(humantime::parse_rfc3339_weak(other).map_err(|e| {
            anyhow::anyhow!("--to {other:?}: {e}; use earliest, latest or an RFC 3339 time")
        })?),
    })
}

pub async fn run(client: &Client, cmd: GroupCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        GroupCommand::List { topic } => {
            print(&client.list_groups(topic.as_deref()).await?, output, false);
        }
        GroupCommand::Describe { name } => {
            print(&[client.describe_group(&name).await?], output, true);
        }
        GroupCommand::Reset { name, to } => {
            print(
                &[client.reset_group(&name, position(&to)?).await?],
                output,
                true,
            );
        }
        GroupCommand::Delete { name } => {
            client.delete_group(&name).await?;
            match output {
                Output::Human => println!("deleted group {name}"),
                Output::Json => println!("{}", serde_json::json!({ "deleted": name })),
            }
        }
    }
    Ok(())
}

fn type_name(t: GroupType) -> &'static str {
    match t {
        GroupType::Ordered => "ordered",
        GroupType::Shared => "shared",
    }
}

fn print(groups: &[GroupInfo], output: Output, detail: bool) {
    match output {
        Output::Json => {
            for g in groups {
                let c = &g.config;
                println!(
                    "{}",
                    serde_json::json!({
                        "name": g.name, "topic": c.topic, "type": type_name(c.group_type),
                        "members": g.members.iter().map(|m| serde_json::json!({
                            "memberId": m.id, "partitions": m.partitions, "pending": m.pending,
                        })).collect::<Vec<_>>(),
                        "lag": g.lag, "pending": g.pending, "deadLettered": g.dead_lettered,
                        "generation": g.generation,
                        "partitions": g.partitions.iter().map(|p| serde_json::json!({
                            "partition": p.partition, "committedOffset": p.committed_offset,
                            "nextOffset": p.next_offset, "lag": p.lag, "pending": p.pending, "owner": p.owner.clone().unwrap_or_default(),
                        })).collect::<Vec<_>>(),
                    })
                );
            }
        }
        Output::Human => {
            println!(
                "{:<24} {:<24} {:<8} {:>7} {:>10} {:>9} {:>13}",
                "GROUP", "TOPIC", "TYPE", "MEMBERS", "LAG", "PENDING", "DEAD-LETTERED"
            );
            for g in groups {
                let c = &g.config;
                println!(
                    "{:<24} {:<24} {:<8} {:>7} {:>10} {:>9} {:>13}",
                    g.name,
                    c.topic,
                    type_name(c.group_type),
                    g.members.len(),
                    g.lag,
                    g.pending,
                    g.dead_lettered
                );
            }
            if detail {
                for g in groups {
                    println!();
                    println!(
                        "{:>9} {:>16} {:>12} {:>10} {:>9}  OWNER",
                        "PARTITION", "COMMITTED OFFSET", "NEXT OFFSET", "LAG", "PENDING"
                    );
                    for p in &g.partitions {
                        println!(
                            "{:>9} {:>16} {:>12} {:>10} {:>9}  {}",
                            p.partition,
                            p.committed_offset,
                            p.next_offset,
                            p.lag,
                            p.pending,
                            p.owner.as_deref().unwrap_or("")
                        );
                    }
                    if !g.members.is_empty() {
                        println!();
                        println!("{:<40} {:>9}  PARTITIONS", "MEMBER", "PENDING");
                        for m in &g.members {
                            println!("{:<40} {:>9}  {:?}", m.id, m.pending, m.partitions);
                        }
                    }
                }
            }
        }
    }
}
