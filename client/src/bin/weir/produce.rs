//! `weir produce`: one message per input line.
//!
//! A line is the bytes up to `\n`; the `\n` is dropped and every other byte (a `\r` too) is
//! kept. A last line without a final `\n` is a message too; nothing after the last `\n` is
//! not. Lines are batched into requests and pipelined on one produce stream.

use std::path::PathBuf;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};
use weir_client::{Client, Record};

use crate::Output;

#[derive(Debug, Args)]
pub struct ProduceArgs {
    /// Topic to produce to.
    topic: String,
    /// Key of every message (keyed messages of one key stay in order on one partition).
    #[arg(long)]
    key: Option<String>,
    /// Partition for every message (overrides routing by key).
    #[arg(long)]
    partition: Option<u32>,
    /// Read lines from this file instead of stdin.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Most messages per request.
    #[arg(long, default_value_t = 1000)]
    batch_records: usize,
    /// Most value bytes per request, e.g. `1MiB`.
    #[arg(long, default_value = "1MiB")]
    batch_bytes: bytesize::ByteSize,
    /// Requests sent ahead of their acks.
    #[arg(long, default_value_t = 16)]
    in_flight: usize,
}

/// Reads the next line (without its `\n`) into a new buffer; `None` at end of input.
pub async fn next_line(
    reader: &mut (impl AsyncBufRead + Unpin),
) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let n = reader.read_until(b'\n', &mut buf).await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    Ok(Some(buf))
}

pub async fn run(client: &Client, args: ProduceArgs, output: Output) -> anyhow::Result<()> {
    let input: Box<dyn tokio::io::AsyncRead + Unpin + Send> = match &args.file {
        Some(path) => Box::new(
            tokio::fs::File::open(path)
                .await
                .with_context(|| format!("opening {}", path.display()))?,
        ),
        None => Box::new(tokio::io::stdin()),
    };
    let mut reader = BufReader::with_capacity(1 << 20, input);
    let (mut tx, mut rx) = client.produce_stream(args.in_flight).await?;
    let key = args.key.map(Bytes::from);
    let topic = args.topic.clone();
    let partition = args.partition;
    let batch_records = args.batch_records.max(1);
    let batch_bytes = usize::try_from(args.batch_bytes.as_u64()).unwrap_or(usize::MAX);

    let sender = tokio::spawn(async move {
        let mut batch: Vec<Record> = Vec::with_capacity(batch_records);
        let mut bytes = 0usize;
        let mut requests = 0u64;
        while let Some(line) = next_line(&mut reader).await.context("reading input")? {
            bytes += line.len();
            batch.push(Record {
                key: key.clone(),
                value: Bytes::from(line),
                ..Record::default()
            });
            if batch.len() >= batch_records || bytes >= batch_bytes {
                tx.send(&topic, partition, std::mem::take(&mut batch))
                    .await?;
                requests += 1;
                bytes = 0;
            }
        }
        if !batch.is_empty() {
            tx.send(&topic, partition, batch).await?;
            requests += 1;
        }
        drop(tx);
        Ok::<u64, anyhow::Error>(requests)
    });

    let mut messages = 0u64;
    let mut failure = None;
    while let Some(answer) = rx.next().await {
        match answer.and_then(|a| a.result) {
            Ok(acks) => messages += acks.iter().map(|a| u64::from(a.record_count)).sum::<u64>(),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    if let Some(e) = failure {
        sender.abort();
        anyhow::bail!("{e} ({messages} messages were acknowledged before the error)");
    }
    let requests = sender.await.context("input task")??;
    match output {
        Output::Human => eprintln!(
            "produced {messages} messages to {} in {requests} requests",
            args.topic
        ),
        Output::Json => println!(
            "{}",
            serde_json::json!({ "topic": args.topic, "messages": messages, "requests": requests })
        ),
    }
    Ok(())
}
