//! `weir consume` without a group: reads partitions from an offset and writes one message
//! per line (the value, then `\n`), or one JSON object per line with `--output json`.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use tokio::{
    io::{AsyncWriteExt, BufWriter},
    sync::mpsc,
};
use weir_client::{
    Client, Delivery, FetchOptions, GroupConfig, GroupType, PartitionInfo, StartFrom, StoredRecord,
};

use crate::Output;

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Topic to consume.
    topic: String,
    /// Read only this partition (default: all).
    #[arg(long)]
    partition: Option<u32>,
    /// Start at this offset of the partition given with --partition; overrides --from.
    /// (Offsets differ between partitions, so --offset needs --partition.)
    #[arg(long, requires = "partition")]
    offset: Option<u64>,
    /// Where to start when --offset is not given.
    #[arg(long, value_enum, default_value_t = From::Earliest)]
    from: From,
    /// Stop after this many messages.
    #[arg(long)]
    max_messages: Option<u64>,
    /// Stop when no message arrived for this long, e.g. `2s` (default: wait forever).
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// Consume as a member of this group: each message is acked after it is written.
    /// The group is created on first use with --type and --from.
    #[arg(long)]
    group: Option<String>,
    /// Group type when the group is created.
    #[arg(long, value_enum, default_value_t = GroupKind::Ordered, requires = "group")]
    r#type: GroupKind,
    /// Most unacked messages in flight for this member.
    #[arg(long, default_value_t = 500, requires = "group")]
    window: u32,
}

/// Group type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GroupKind {
    /// Each partition owned by one member, in offset order.
    Ordered,
    /// Any member gets any message; per-message acks.
    Shared,
}

/// Start position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum From {
    /// The first stored message.
    Earliest,
    /// Only messages produced from now on.
    Latest,
}

/// Longest one fetch waits on the broker.
const FETCH_WAIT: Duration = Duration::from_secs(1);

pub async fn run(client: &Client, args: ConsumeArgs, output: Output) -> anyhow::Result<()> {
    if let Some(group) = args.group.clone() {
        return run_group(client, &group, args, output).await;
    }
    let topic = client.describe_topic(&args.topic).await?;
    let partitions: Vec<&PartitionInfo> = match args.partition {
        Some(p) => vec![
            topic
                .partitions
                .iter()
                .find(|s| s.partition == p)
                .with_context(|| {
                    format!(
                        "topic {} has partitions 0..{}, there is no partition {p}",
                        topic.name,
                        topic.partitions.len()
                    )
                })?,
        ],
        None => topic.partitions.iter().collect(),
    };
    let (tx, mut rx) = mpsc::channel::<anyhow::Result<(u32, Vec<StoredRecord>)>>(64);
    for p in partitions {
        let start = match (args.offset, args.from) {
            (Some(o), _) => o,
            (None, From::Earliest) => p.earliest_offset,
            (None, From::Latest) => p.next_offset,
        };
        spawn_fetcher(
            client.clone(),
            topic.name.clone(),
            p.partition,
            start,
            tx.clone(),
        );
    }
    drop(tx);

    let mut out = BufWriter::with_capacity(1 << 20, tokio::io::stdout());
    let mut count = 0u64;
    let max = args.max_messages.unwrap_or(u64::MAX);
    while count < max {
        let next = match args.idle_timeout {
            Some(idle) => match tokio::time::timeout(idle, rx.recv()).await {
                Ok(n) => n,
                Err(_) => break,
            },
            None => rx.recv().await,
        };
        let Some(item) = next else { break };
        let (partition, records) = item?;
        for r in records {
            if count >= max {
                break;
            }
            write_record(&mut out, partition, r.offset, &r.record, output).await?;
            count += 1;
        }
        if rx.is_empty() {
            out.flush().await?;
        }
    }
    out.flush().await?;
    Ok(())
}

/// Channel of fetched batches, tagged with their partition.
type Batches = mpsc::Sender<anyhow::Result<(u32, Vec<StoredRecord>)>>;

/// Fetches `topic`/`partition` from `start` forever, sending each non-empty batch to `tx`;
/// stops at the first error (sent on) or when the receiver is gone.
fn spawn_fetcher(client: Client, topic: String, partition: u32, start: u64, tx: Batches) {
    tokio::spawn(async move {
        let mut offset = start;
        loop {
            match client
                .fetch(&topic, partition, offset, FetchOptions::wait(FETCH_WAIT))
                .await
            {
                Ok(resp) => {
                    if let Some(last) = resp.records.last() {
                        offset = last.offset + 1;
                        if tx.send(Ok((partition, resp.records))).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(anyhow::anyhow!(
                            "fetching {topic}/{partition} at offset {offset}: {e}"
                        )))
                        .await;
                    return;
                }
            }
        }
    });
}

/// Writes one record: its value and `\n` (human), or one JSON object per line.
async fn write_record(
    out: &mut BufWriter<tokio::io::Stdout>,
    partition: u32,
    offset: u64,
    rec: &weir_client::Record,
    output: Output,
) -> std::io::Result<()> {
    match output {
        Output::Human => {
            out.write_all(&rec.value).await?;
            out.write_all(b"\n").await
        }
        Output::Json => {
            let v = serde_json::json!({
                "partition": partition,
                "offset": offset,
                "timestampMs": rec.timestamp.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_millis()),
                "key": rec.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
                "value": String::from_utf8_lossy(&rec.value),
            });
            out.write_all(v.to_string().as_bytes()).await?;
            out.write_all(b"\n").await
        }
    }
}

/// `weir consume --group`: a push member that writes each message, then acks it.
async fn run_group(
    client: &Client,
    group: &str,
    args: ConsumeArgs,
    output: Output,
) -> anyhow::Result<()> {
    let group_type = match args.r#type {
        GroupKind::Ordered => GroupType::Ordered,
        GroupKind::Shared => GroupType::Shared,
    };
    let start = match args.from {
        From::Earliest => StartFrom::Earliest,
        From::Latest => StartFrom::Latest,
    };
    let create = GroupConfig::new(args.topic.clone(), group_type).with_start(start);
    let mut consumer = client.subscribe(group, Some(&create), args.window).await?;
    let mut out = BufWriter::with_capacity(1 << 20, tokio::io::stdout());
    let max = args.max_messages.unwrap_or(u64::MAX);
    let mut count = 0u64;
    while count < max {
        let next = match args.idle_timeout {
            Some(idle) => {
                if let Ok(n) = tokio::time::timeout(idle, consumer.next()).await {
                    n
                } else {
                    out.flush().await?;
                    break;
                }
            }
            None => consumer.next().await,
        };
        let Some(delivery) = next else { break };
        let delivery: Delivery = delivery?;
        write_record(
            &mut out,
            delivery.partition,
            delivery.offset,
            &delivery.record,
            output,
        )
        .await?;
        // At-least-once: the message is written (flushed) before it is acked.
        out.flush().await?;
        consumer.ack(&delivery).await?;
        count += 1;
    }
    out.flush().await?;
    consumer.close(Duration::from_secs(5)).await?;
    Ok(())
}
