//! `weir topic create|list|describe|delete`.

use clap::Subcommand;
use weir_client::{Client, pb};

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
}

impl Settings {
    /// Applies the given flags to `c`.
    fn apply(&self, mut c: pb::TopicConfig) -> anyhow::Result<pb::TopicConfig> {
        if let Some(p) = self.partitions {
            c.partitions = p;
        }
        if let Some(b) = self.max_message_bytes {
            c.max_message_bytes = u32::try_from(b.as_u64()).map_err(|_| {
                anyhow::anyhow!("--max-message-bytes {b} is too large; the limit is 16MiB")
            })?;
        }
        if let Some(r) = self.retention {
            c.retention = match r {
                RetentionArg::Limits => pb::RetentionPolicy::Limits,
                RetentionArg::WorkQueue => pb::RetentionPolicy::WorkQueue,
            } as i32;
        }
        if let Some(a) = self.max_age {
            c.max_age_ms = u64::try_from(a.as_millis())?;
        }
        if let Some(b) = self.max_bytes {
            c.max_bytes = b.as_u64();
        }
        if let Some(m) = self.max_messages {
            c.max_messages = m;
        }
        if let Some(o) = self.overflow {
            c.overflow = match o {
                OverflowArg::DropOldest => pb::Overflow::DropOldest,
                OverflowArg::Reject => pb::Overflow::Reject,
            } as i32;
        }
        if let Some(d) = self.durability {
            c.durability = match d {
                DurabilityArg::Fsync => pb::Durability::Fsync,
                DurabilityArg::Buffered => pb::Durability::Buffered,
            } as i32;
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
}

pub async fn run(client: &Client, cmd: TopicCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        TopicCommand::Create { name, settings } => {
            let config = settings.apply(pb::TopicConfig {
                partitions: 1,
                ..pb::TopicConfig::default()
            })?;
            let t = client.create_topic_with(&name, config).await?;
            print_topics(&[t], output, true);
        }
        TopicCommand::Update { name, settings } => {
            let current = client.describe_topic(&name).await?;
            let config = settings.apply(current.config.unwrap_or_default())?;
            let t = client.update_topic(&name, config).await?;
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
    let c = t.config.clone().unwrap_or_default();
    serde_json::json!({
        "name": t.name,
        "partitions": c.partitions,
        "maxMessageBytes": c.max_message_bytes,
        "retention": if c.retention == pb::RetentionPolicy::WorkQueue as i32 { "work-queue" } else { "limits" },
        "maxAgeMs": c.max_age_ms,
        "maxBytes": c.max_bytes,
        "maxMessages": c.max_messages,
        "overflow": if c.overflow == pb::Overflow::Reject as i32 { "reject" } else { "drop-oldest" },
        "durability": if c.durability == pb::Durability::Buffered as i32 { "buffered" } else { "fsync" },
        "servedPartitions": c.served_partitions,
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
                let c = t.config.clone().unwrap_or_default();
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
                    let c = t.config.clone().unwrap_or_default();
                    let limit = |v: u64, f: &dyn Fn(u64) -> String| {
                        if v == 0 { "none".to_owned() } else { f(v) }
                    };
                    println!();
                    println!(
                        "limits: max-age {}  max-bytes {}  max-messages {}  overflow {}  retention {}  durability {}",
                        limit(c.max_age_ms, &|v| humantime::format_duration(
                            std::time::Duration::from_millis(v)
                        )
                        .to_string()),
                        limit(c.max_bytes, &|v| bytesize::ByteSize(v)
                            .display()
                            .iec()
                            .to_string()),
                        limit(c.max_messages, &|v| v.to_string()),
                        if c.overflow == pb::Overflow::Reject as i32 {
                            "reject"
                        } else {
                            "drop-oldest"
                        },
                        if c.retention == pb::RetentionPolicy::WorkQueue as i32 {
                            "work-queue"
                        } else {
                            "limits"
                        },
                        if c.durability == pb::Durability::Buffered as i32 {
                            "buffered"
                        } else {
                            "fsync"
                        },
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
