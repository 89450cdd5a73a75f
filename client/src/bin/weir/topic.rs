//! `weir topic create|list|describe|delete`.

use clap::Subcommand;
use weir_client::{Client, pb};

use crate::Output;

/// Retention policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RetentionArg {
    /// Keep until a limit deletes.
    Limits,
    /// Delete once every group acked.
    WorkQueue,
}

#[derive(Debug, Subcommand)]
pub enum TopicCommand {
    /// Create a topic (succeeds unchanged when it exists with the same settings).
    Create {
        /// Topic name: 1 to 249 characters of a-z, A-Z, 0-9, '.', '_', '-'.
        name: String,
        /// Number of partitions (1..=1024).
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Largest record accepted, e.g. `1MiB` (default 1 MiB, at most 16 MiB).
        #[arg(long)]
        max_message_bytes: Option<bytesize::ByteSize>,
        /// `limits` keeps records until a limit deletes them; `work-queue` deletes each once
        /// every group has acked it.
        #[arg(long, value_enum, default_value_t = RetentionArg::Limits)]
        retention: RetentionArg,
    },
    /// List topics.
    List,
    /// Show a topic's settings and per-partition offsets, messages and bytes.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Delete a topic and all its messages.
    Delete {
        /// Topic name.
        name: String,
    },
}

pub async fn run(client: &Client, cmd: TopicCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        TopicCommand::Create {
            name,
            partitions,
            max_message_bytes,
            retention,
        } => {
            let max = match max_message_bytes {
                Some(b) => u32::try_from(b.as_u64()).map_err(|_| {
                    anyhow::anyhow!("--max-message-bytes {b} is too large; the limit is 16MiB")
                })?,
                None => 0,
            };
            let t = client
                .create_topic_with(
                    &name,
                    pb::TopicConfig {
                        partitions,
                        max_message_bytes: max,
                        retention: match retention {
                            RetentionArg::Limits => pb::RetentionPolicy::Limits,
                            RetentionArg::WorkQueue => pb::RetentionPolicy::WorkQueue,
                        } as i32,
                    },
                )
                .await?;
            print_topics(&[t], output, true);
        }
        TopicCommand::List => print_topics(&client.list_topics().await?, output, false),
        TopicCommand::Describe { name } => {
            print_topics(&[client.describe_topic(&name).await?], output, true);
        }
        TopicCommand::Delete { name } => {
            client.delete_topic(&name).await?;
            match output {
                Output::Human => println!("deleted topic {name}"),
                Output::Json => println!("{}", serde_json::json!({ "deleted": name })),
            }
        }
    }
    Ok(())
}

fn topic_json(t: &pb::TopicDescription) -> serde_json::Value {
    let c = t.config.unwrap_or_default();
    serde_json::json!({
        "name": t.name,
        "partitions": c.partitions,
        "maxMessageBytes": c.max_message_bytes,
        "retention": if c.retention == pb::RetentionPolicy::WorkQueue as i32 { "work-queue" } else { "limits" },
        "messages": t.messages,
        "bytes": t.bytes,
        "createdAtMs": t.created_at_ms,
        "partitionStats": t.partitions.iter().map(|p| serde_json::json!({
            "partition": p.partition,
            "earliestOffset": p.earliest_offset,
            "nextOffset": p.next_offset,
            "messages": p.messages,
            "bytes": p.bytes,
        })).collect::<Vec<_>>(),
    })
}

fn print_topics(topics: &[pb::TopicDescription], output: Output, detail: bool) {
    match output {
        Output::Json => {
            for t in topics {
                println!("{}", topic_json(t));
            }
        }
        Output::Human => {
            println!(
                "{:<32} {:>10} {:>12} {:>12} {:>12}",
                "TOPIC", "PARTITIONS", "MESSAGES", "BYTES", "MAX MSG"
            );
            for t in topics {
                let c = t.config.unwrap_or_default();
                println!(
                    "{:<32} {:>10} {:>12} {:>12} {:>12}",
                    t.name,
                    c.partitions,
                    t.messages,
                    bytesize::ByteSize(t.bytes).display().iec().to_string(),
                    bytesize::ByteSize(u64::from(c.max_message_bytes))
                        .display()
                        .iec()
                        .to_string()
                );
            }
            if detail {
                for t in topics {
                    println!();
                    println!(
                        "{:>9} {:>16} {:>16} {:>12} {:>12}",
                        "PARTITION", "EARLIEST OFFSET", "NEXT OFFSET", "MESSAGES", "BYTES"
                    );
                    for p in &t.partitions {
                        println!(
                            "{:>9} {:>16} {:>16} {:>12} {:>12}",
                            p.partition,
                            p.earliest_offset,
                            p.next_offset,
                            p.messages,
                            bytesize::ByteSize(p.bytes).display().iec().to_string()
                        );
                    }
                }
            }
        }
    }
}
