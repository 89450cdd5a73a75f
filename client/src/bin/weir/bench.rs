//! `weir bench`: load tests that print their settings and figures.
//!
//! `bench produce` opens `--producers` connections, each with one pipelined produce stream
//! keeping up to `--in-flight` requests of `--batch-size` messages outstanding, and sends
//! `--messages` messages of `--message-size` bytes in total. Latency is per request: from
//! the moment it is queued on the stream to its ack, which the broker sends after fsync.

use std::{collections::VecDeque, time::Instant};

use bytes::Bytes;
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use weir_client::{Client, Record};

use crate::Output;

/// Distinct start positions of message values inside the random payload.
const PAYLOAD_WINDOW: usize = 1 << 16;

/// Incompressible bytes to cut message values from (xorshift64*, fixed seed), so the
/// storage engine's compression does not flatter the figures.
fn random_payload(message_size: usize) -> Bytes {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut buf = Vec::with_capacity(PAYLOAD_WINDOW + message_size + 8);
    while buf.len() < PAYLOAD_WINDOW + message_size {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        buf.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    Bytes::from(buf)
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Produce load: throughput and ack latency.
    Produce(ProduceBench),
}

#[derive(Debug, Args, Clone)]
pub struct ProduceBench {
    /// Topic to load; created with --partitions when missing.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Partitions of the topic when it is created.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Messages to send in total.
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Bytes per message value.
    #[arg(long, default_value_t = 100)]
    message_size: usize,
    /// Messages per produce request.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Concurrent producers, each on its own connection and stream.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Requests each producer keeps in flight.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
}

pub async fn run(client: &Client, cmd: BenchCommand, output: Output) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Produce(b) => produce(client, b, output).await,
    }
}

struct ProducerResult {
    messages: u64,
    latencies_us: Histogram<u64>,
}

#[allow(clippy::too_many_lines)]
async fn produce(client: &Client, settings: ProduceBench, output: Output) -> anyhow::Result<()> {
    match client.describe_topic(&settings.topic).await {
        Ok(_) => {}
        Err(e) if e.code() == Some(tonic::Code::NotFound) => {
            client
                .create_topic(&settings.topic, settings.partitions, 0)
                .await?;
        }
        Err(e) => return Err(e.into()),
    }
    let producers = settings.producers.max(1);
    let batch = settings.batch_size.max(1);
    let per_producer = settings.messages.div_ceil(producers as u64);
    let payload = random_payload(settings.message_size);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let client = client.clone();
        let topic = settings.topic.clone();
        let payload = payload.clone();
        let size = settings.message_size;
        let in_flight = settings.in_flight.max(1);
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = client.produce_stream(in_flight).await?;
            let (ts_tx, mut ts_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            let sender = tokio::spawn(async move {
                let mut sent = 0u64;
                while sent < per_producer {
                    let n = (per_producer - sent).min(batch as u64) as usize;
                    let records = (0..n)
                        .map(|i| {
                            let at = (sent as usize + i) * 7 % PAYLOAD_WINDOW;
                            Record {
                                value: payload.slice(at..at + size),
                                ..Record::default()
                            }
                        })
                        .collect();
                    let _ = ts_tx.send(Instant::now());
                    tx.send(&topic, None, records).await?;
                    sent += n as u64;
                }
                Ok::<_, weir_client::Error>(())
            });
            let mut hist =
                Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
            let mut messages = 0u64;
            let mut pending: VecDeque<Instant> = VecDeque::new();
            while let Some((_, result)) = rx.next().await {
                while let Ok(t) = ts_rx.try_recv() {
                    pending.push_back(t);
                }
                if pending.is_empty() {
                    if let Some(t) = ts_rx.recv().await {
                        pending.push_back(t);
                    }
                }
                let acks = result?;
                if let Some(t) = pending.pop_front() {
                    let _ = hist.record(t.elapsed().as_micros() as u64);
                }
                messages += acks.iter().map(|a| u64::from(a.record_count)).sum::<u64>();
                if messages >= per_producer {
                    break;
                }
            }
            sender.await??;
            Ok::<_, anyhow::Error>(ProducerResult {
                messages,
                latencies_us: hist,
            })
        }));
    }
    let mut messages = 0u64;
    let mut hist = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
    for t in tasks {
        let r = t.await??;
        messages += r.messages;
        hist.add(&r.latencies_us)
            .map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
    }
    let secs = started.elapsed().as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let rate = messages as f64 / secs;
    #[allow(clippy::cast_precision_loss)]
    let mb = (messages * settings.message_size as u64) as f64 / secs / 1_000_000.0;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "benchmark": "produce",
                "settings": {
                    "topic": settings.topic, "partitions": settings.partitions,
                    "messages": settings.messages, "messageSize": settings.message_size,
                    "batchSize": batch, "producers": producers, "inFlight": settings.in_flight,
                    "durability": "fsync (group commit)",
                },
                "messages": messages, "seconds": secs, "messagesPerSecond": rate, "mbPerSecond": mb,
                "ackLatencyMs": { "p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": hist.max() as f64 / 1000.0 },
            })
        ),
        Output::Human => {
            println!("weir bench produce");
            println!(
                "  settings: messages={} message-size={}B batch-size={} producers={} in-flight={} partitions={} durability=fsync(group commit)",
                settings.messages,
                settings.message_size,
                batch,
                producers,
                settings.in_flight,
                settings.partitions
            );
            println!("  {:<22} {:>14}", "messages", messages);
            println!("  {:<22} {:>14.2}", "seconds", secs);
            println!("  {:<22} {:>14.0}", "messages/s", rate);
            println!("  {:<22} {:>14.1}", "MB/s", mb);
            println!("  {:<22} {:>14.2}", "ack latency p50 ms", ms(0.5));
            println!("  {:<22} {:>14.2}", "ack latency p99 ms", ms(0.99));
            println!("  {:<22} {:>14.2}", "ack latency p999 ms", ms(0.999));
            println!(
                "  {:<22} {:>14.2}",
                "ack latency max ms",
                hist.max() as f64 / 1000.0
            );
        }
    }
    Ok(())
}
