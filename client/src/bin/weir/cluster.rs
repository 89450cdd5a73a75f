//! `weir cluster describe`: brokers, the metadata leader, each partition's leader and
//! replicas, each group's coordinator.

use clap::Subcommand;
use weir_client::Client;

use crate::Output;

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Show the brokers, the metadata leader (controller), each partition's leader,
    /// replicas and in-sync replicas, and each consumer group's coordinator.
    Describe,
    /// Remove a broker from the cluster (scale-down): refused while it holds a partition.
    RemoveBroker {
        /// The broker's `--node-id`.
        id: u64,
    },
}

pub async fn run(client: &Client, cmd: ClusterCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        ClusterCommand::RemoveBroker { id } => {
            client.remove_broker(id).await?;
            match output {
                Output::Json => println!("{}", serde_json::json!({ "removed": id })),
                Output::Human => eprintln!("broker {id} removed from the cluster"),
            }
        }
        ClusterCommand::Describe => {
            let m = client.metadata().await?;
            match output {
                Output::Json => println!("{}", serde_json::to_string(&m)?),
                Output::Human => {
                    let leader = m
                        .metadata_leader
                        .map_or_else(|| "none".to_owned(), |l| l.to_string());
                    println!("metadata leader: {leader}");
                    println!();
                    println!("{:>6}  {:<40}  STATE", "BROKER", "ADDRESS");
                    for b in &m.brokers {
                        println!("{:>6}  {:<40}  {}", b.id, b.address, b.state);
                    }
                    println!();
                    println!(
                        "{:<32}  {:>9}  {:>6}  {:<12}  IN-SYNC",
                        "TOPIC", "PARTITION", "LEADER", "REPLICAS"
                    );
                    let list = |ids: &[u64]| {
                        ids.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    for p in &m.partitions {
                        println!(
                            "{:<32}  {:>9}  {:>6}  {:<12}  {}",
                            p.topic,
                            p.partition,
                            p.leader,
                            list(&p.replicas),
                            list(&p.in_sync)
                        );
                    }
                    if !m.groups.is_empty() {
                        println!();
                        println!("{:<32}  {:<32}  COORDINATOR", "GROUP", "TOPIC");
                        for g in &m.groups {
                            println!("{:<32}  {:<32}  {}", g.group, g.topic, g.coordinator);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
