//! `weir topic create|list|describe|delete`.

use clap::Subcommand;
use weir_client::{
    Client, Durability, Overflow, PartitionLeader, Retention, TopicConfig, TopicInfo,
};

use crate::Output;

/// Topic settings; each flag left out keeps the current (or default) value.
#[derive(Debug, Clone, clap::Args)]
pub struct Settings {
    /// Number of partitions (1..=1024; default 1).
    #[arg(long)]
    partitions: Option<u32>,
    /// Largest record accepted, e.g. `1MiB` (default 1 MiB, at most 16 MiB).
    #[arg(long)]
    max_message_bytes: Option<bytesize::ByteSize>,
    /// `limits` keeps records until a limit deletes them; `work-queue` deletes each once
    /// every group has acked it.
    #[arg(long, value_enum)]
    retention: Option<RetentionArg>,
    /// Delete records older than this, e.g. `10d`, `12h`, `30s`; `0s` for no limit.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_age: Option<std::time::Duration>,
    /// Most bytes stored over all partitions, e.g. `1GiB`; `0` for no limit.
    #[arg(long)]
    max_bytes: Option<bytesize::ByteSize>,
    /// Most messages stored over all partitions; `0` for no limit.
    #[arg(long)]
    max_messages: Option<u64>,
    /// At a limit: `drop-oldest` deletes from the head, `reject` refuses new messages.
    #[arg(long, value_enum)]
    overflow: Option<OverflowArg>,
    /// `fsync`: ack after fsync; `buffered`: ack after the write reaches the OS.
    #[arg(long, value_enum)]
    durability: Option<DurabilityArg>,
    /// Copies of each partition on distinct brokers: 1, 3 or 5 (at most the brokers);
    /// above 1 a produce is acknowledged once a majority of them have it. Set at creation.
    #[arg(long)]
    replication_factor: Option<u32>,
}

impl Settings {
    /// Applies the given flags to `c` (`0` for a limit means none).
    fn apply(&self, mut c: TopicConfig) -> anyhow::Result<TopicConfig> {
        let limit = |v: u64| (v != 0).then_some(v);
        if let Some(p) = self.partitions {
            c.partitions = p;
        }
        if let Some(b) = self.max_message_bytes {
            c.max_message_bytes = Some(u32::try_from(b.as_u64()).map_err(|_| {
                anyhow::anyhow!("--max-message-bytes {b} is too large; the limit is 16MiB")
            })?);
        }
        if let Some(r) = self.retention {
            c.retention = match r {
                RetentionArg::Limits => Retention::Limits,
                RetentionArg::WorkQueue => Retention::WorkQueue,
            };
        }
        if let Some(a) = self.max_age {
            c.max_age = (!a.is_zero()).then_some(a);
        }
        if let Some(b) = self.max_bytes {
            c.max_bytes = limit(b.as_u64());
        }
        if let Some(m) = self.max_messages {
            c.max_messages = limit(m);
        }
        if let Some(o) = self.overflow {
            c.overflow = match o {
                OverflowArg::DropOldest => Overflow::DropOldest,
                OverflowArg::Reject => Overflow::Reject,
            };
        }
        if let Some(d) = self.durability {
            c.durability = match d {
                DurabilityArg::Fsync => Durability::Fsync,
                DurabilityArg::Buffered => Durability::Buffered,
            };
        }
        if let Some(r) = self.replication_factor {
            c.replication_factor = r;
        }
        Ok(c)
    }
}

/// Overflow policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OverflowArg {
    /// Delete from the head.
    DropOldest,
    /// Refuse new messages.
    Reject,
}

/// Durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DurabilityArg {
    /// Ack after fsync.
    Fsync,
    /// Ack after the write reaches the OS.
    Buffered,
}

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
        #[command(flatten)]
        settings: Settings,
    },
    /// Change a topic's settings; only the flags given change (partitions only grow).
    Update {
        /// Topic name.
        name: String,
        #[command(flatten)]
        settings: Settings,
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
    /// Accept the loss of records that can no longer be read back (fetches of them answer
    /// DATA_LOSS): damaged batches are deleted and the lost ranges recorded, so reads and
    /// groups step over them from then on. Prints the ranges accepted.
    Repair {
        /// Topic name.
        name: String,
        /// Only this partition (repeat for more); all when not given.
        #[arg(long = "partition")]
        partitions: Vec<u32>,
    },
}

pub async fn run(client: &Client, cmd: TopicCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        TopicCommand::Create { name, settings } => {
            let config = settings.apply(TopicConfig::new(1))?;
            let t = client.create_topic(&name, &config).await?;
            print_topics(&[t], output, Some(&placement(client).await?));
        }
        TopicCommand::Update { name, settings } => {
            let current = client.describe_topic(&name).await?;
            let config = settings.apply(current.config)?;
            let t = client.update_topic(&name, &config).await?;
            print_topics(&[t], output, Some(&placement(client).await?));
        }
        TopicCommand::List => print_topics(&client.list_topics().await?, output, None),
        TopicCommand::Describe { name } => {
            let t = client.describe_topic(&name).await?;
            print_topics(&[t], output, Some(&placement(client).await?));
        }
        TopicCommand::Repair { name, partitions } => {
            let lost = client.repair_topic(&name, &partitions).await?;
            match output {
                Output::Json => println!("{}", serde_json::json!({ "topic": name, "lost": lost })),
                Output::Human if lost.is_empty() => {
                    println!("topic {name}: nothing lost that was not accepted before");
                }
                Output::Human => {
                    println!(
                        "{:>9}  {:>20}  {:>20}  {:>8}  REASON",
                        "PARTITION", "FROM", "TO", "RECORDS"
                    );
                    for r in &lost {
                        println!(
                            "{:>9}  {:>20}  {:>20}  {:>8}  {}",
                            r.partition,
                            r.from,
                            r.to,
                            r.to - r.from,
                            r.reason
                        );
                    }
                    println!("accepted: reads of topic {name} step over these offsets from now on");
                }
            }
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

fn retention(r: Retention) -> &'static str {
    match r {
        Retention::Limits => "limits",
        Retention::WorkQueue => "work-queue",
    }
}

fn overflow(o: Overflow) -> &'static str {
    match o {
        Overflow::DropOldest => "drop-oldest",
        Overflow::Reject => "reject",
    }
}

fn durability(d: Durability) -> &'static str {
    match d {
        Durability::Fsync => "fsync",
        Durability::Buffered => "buffered",
    }
}

/// Every partition's leader, replicas and in-sync replicas, from the cluster's metadata.
async fn placement(client: &Client) -> anyhow::Result<Vec<PartitionLeader>> {
    Ok(client.metadata().await?.partitions)
}

/// The placement of `topic`'s partition `partition`, if known.
fn placed<'a>(
    placement: &'a [PartitionLeader],
    topic: &str,
    partition: u32,
) -> Option<&'a PartitionLeader> {
    placement
        .iter()
        .find(|p| p.topic == topic && p.partition == partition)
}

fn ids(ids: &[u64]) -> String {
    ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
}

fn topic_json(t: &TopicInfo, placement: &[PartitionLeader]) -> serde_json::Value {
    let c = &t.config;
    serde_json::json!({
        "name": t.name,
        "partitions": c.partitions,
        "maxMessageBytes": c.max_message_bytes,
        "retention": retention(c.retention),
        "maxAgeMs": c.max_age.map_or(0, |d| d.as_millis()),
        "maxBytes": c.max_bytes.unwrap_or(0),
        "maxMessages": c.max_messages.unwrap_or(0),
        "overflow": overflow(c.overflow),
        "durability": durability(c.durability),
        "servedPartitions": c.served_partitions,
        "replicationFactor": c.replication_factor,
        "messages": t.messages,
        "bytes": t.bytes,
        "createdAtMs": t.created_at.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_millis()),
        "partitionStats": t.partitions.iter().map(|p| {
            let mut stats = serde_json::json!({
                "partition": p.partition,
                "earliestOffset": p.earliest_offset,
                "nextOffset": p.next_offset,
                "messages": p.messages,
                "bytes": p.bytes,
            });
            if let Some(l) = placed(placement, &t.name, p.partition) {
                stats["leader"] = l.leader.into();
                stats["replicas"] = l.replicas.clone().into();
                stats["inSync"] = l.in_sync.clone().into();
                stats["underReplicated"] = (l.in_sync.len() < l.replicas.len()).into();
            }
            stats
        }).collect::<Vec<_>>(),
    })
}

/// Prints `topics`; with `placement` (describe, create, update), each one's settings and
/// partitions (offsets, usage, leader, replicas, in-sync replicas) too.
fn print_topics(topics: &[TopicInfo], output: Output, placement: Option<&[PartitionLeader]>) {
    match output {
        Output::Json => {
            for t in topics {
                println!("{}", topic_json(t, placement.unwrap_or_default()));
            }
        }
        Output::Human => {
            println!(
                "{:<32} {:>10} {:>12} {:>12} {:>12}",
                "TOPIC", "PARTITIONS", "MESSAGES", "BYTES", "MAX MSG"
            );
            for t in topics {
                let c = &t.config;
                println!(
                    "{:<32} {:>10} {:>12} {:>12} {:>12}",
                    t.name,
                    c.partitions,
                    t.messages,
                    bytesize::ByteSize(t.bytes).display().iec().to_string(),
                    bytesize::ByteSize(u64::from(c.max_message_bytes.unwrap_or(1024 * 1024)))
                        .display()
                        .iec()
                        .to_string()
                );
            }
            if let Some(placement) = placement {
                for t in topics {
                    let c = &t.config;
                    let limit = |v: Option<u64>, f: &dyn Fn(u64) -> String| {
                        v.map_or_else(|| "none".to_owned(), f)
                    };
                    println!();
                    println!(
                        "limits: max-age {}  max-bytes {}  max-messages {}  overflow {}  retention {}  durability {}  replication-factor {}",
                        limit(
                            c.max_age
                                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                            &|v| humantime::format_duration(std::time::Duration::from_millis(v))
                                .to_string()
                        ),
                        limit(c.max_bytes, &|v| bytesize::ByteSize(v)
                            .display()
                            .iec()
                            .to_string()),
                        limit(c.max_messages, &|v| v.to_string()),
                        overflow(c.overflow),
                        retention(c.retention),
                        durability(c.durability),
                        c.replication_factor,
                    );
                    println!(
                        "usage:  {} messages, {}",
                        t.messages,
                        bytesize::ByteSize(t.bytes).display().iec()
                    );
                    if !c.served_partitions.is_empty() {
                        let served: Vec<String> =
                            c.served_partitions.iter().map(u32::to_string).collect();
                        println!(
                            "served here: partitions {} (the others are on other brokers)",
                            served.join(", ")
                        );
                    }
                    println!();
                    println!(
                        "{:>9} {:>16} {:>16} {:>12} {:>12} {:>6} {:>10} {:>10}",
                        "PARTITION",
                        "EARLIEST OFFSET",
                        "NEXT OFFSET",
                        "MESSAGES",
                        "BYTES",
                        "LEADER",
                        "REPLICAS",
                        "IN SYNC"
                    );
                    for p in &t.partitions {
                        let (leader, replicas, in_sync) = placed(placement, &t.name, p.partition)
                            .map_or_else(
                                || ("-".to_owned(), "-".to_owned(), "-".to_owned()),
                                |l| (l.leader.to_string(), ids(&l.replicas), ids(&l.in_sync)),
                            );
                        println!(
                            "{:>9} {:>16} {:>16} {:>12} {:>12} {:>6} {:>10} {:>10}",
                            p.partition,
                            p.earliest_offset,
                            p.next_offset,
                            p.messages,
                            bytesize::ByteSize(p.bytes).display().iec().to_string(),
                            leader,
                            replicas,
                            in_sync
                        );
                    }
                }
            }
        }
    }
}
