//! `weir bench`: load tests that print their settings and figures.
//!
//! `bench produce` opens `--producers` connections, each with one pipelined produce stream
//! keeping up to `--in-flight` requests of `--batch-size` messages outstanding, and sends
//! `--messages` messages of `--message-size` bytes in total. Latency is per request: from
//! the moment it is queued on the stream to its ack, which the broker sends after fsync.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use weir_client::{Client, GroupConfig, GroupType, Record, StartFrom, TopicConfig};

use crate::Output;

/// Random bytes that message values are cut from, one after another: 16 MiB, far beyond
/// LZ4's 64 KiB match window, so no stored batch holds the same bytes twice. (A 64 KiB
/// window with values 7 bytes apart let LZ4 shrink 10 GiB of "random" 1000-byte values to
/// 0.8 GB.)
const PAYLOAD_WINDOW: usize = 16 << 20;

/// Incompressible bytes to cut message values from (xorshift64*, fixed seed), so the
/// storage engine's compression does not flatter the figures. Kept for the whole process
/// (`PAYLOAD_WINDOW` + `message_size` bytes, leaked once per run): values cut from it are
/// `Bytes::from_static`, which carry no reference count, so the millions of values a
/// second that producers clone and drop on different threads do not all contend for one
/// shared atomic counter (that made ~9 % of a 100-byte run's CPU samples).
fn random_payload(message_size: usize) -> &'static [u8] {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut buf = Vec::with_capacity(PAYLOAD_WINDOW + message_size + 8);
    while buf.len() < PAYLOAD_WINDOW + message_size {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        buf.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    buf.leak()
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Produce load: throughput and ack latency.
    Produce(ProduceBench),
    /// Catch-up consume: a group reads (and acks) a backlog as fast as it can.
    Consume(ConsumeBench),
    /// End to end: produce at a fixed rate while a group consumes; latency from send to
    /// delivery.
    EndToEnd(EndToEndBench),
}

/// Group type for benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Ordered group.
    Ordered,
    /// Shared group.
    Shared,
}

impl Kind {
    fn group_type(self) -> GroupType {
        match self {
            Self::Ordered => GroupType::Ordered,
            Self::Shared => GroupType::Shared,
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct ConsumeBench {
    /// Topic to read (fill it first, e.g. with `weir bench produce`).
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Group type; the group is created fresh (named after the run) from the earliest offset.
    #[arg(long, value_enum, default_value_t = Kind::Ordered)]
    r#type: Kind,
    /// Members, each on its own push stream.
    #[arg(long, default_value_t = 1)]
    members: usize,
    /// Credits per member (unacked deliveries in flight). The default, 2 MB of 100-byte
    /// messages, is of the order of a Kafka consumer's fetch read-ahead.
    #[arg(long, default_value_t = 20000)]
    window: u32,
    /// Deliveries acked per ack request.
    #[arg(long, default_value_t = 2000)]
    ack_batch: usize,
    /// Messages to read in total (default: the topic's backlog).
    #[arg(long)]
    messages: Option<u64>,
    /// Use (and keep) this group instead of a fresh one that is deleted afterwards.
    #[arg(long)]
    group: Option<String>,
    #[command(flatten)]
    common: BenchCommon,
}

#[derive(Debug, Args, Clone)]
pub struct EndToEndBench {
    /// Topic; created with --partitions when missing.
    #[arg(long, default_value = "bench-e2e")]
    topic: String,
    /// Partitions of the topic when it is created.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Messages per second to produce.
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    /// How long to run, e.g. `10s`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: std::time::Duration,
    /// Messages sent during this first part of the run are delivered and counted but left
    /// out of the latency figures (connection set-up, first allocations), e.g. `5s`, as
    /// the OpenMessaging Benchmark's warm-up. Default `0s`: every message is measured.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    warmup: std::time::Duration,
    /// Bytes per message (at least 16: the send time is in the value).
    #[arg(long, default_value_t = 100)]
    message_size: usize,
    /// Replicas of each partition when the topic is created.
    #[arg(long, default_value_t = 1)]
    replication_factor: u32,
    /// Group type of the consuming group.
    #[arg(long, value_enum, default_value_t = Kind::Shared)]
    r#type: Kind,
    /// Also write each measured message to this file, a line each in receipt order: its
    /// send time (Unix ns), its end-to-end latency (µs) and its partition, separated by
    /// spaces; for latency over time (`bench/latency-windows` finds the worst windows).
    #[arg(long)]
    latency_log: Option<std::path::PathBuf>,
    #[command(flatten)]
    common: BenchCommon,
}

#[derive(Debug, Args, Clone)]
pub struct ProduceBench {
    /// Topic to load; created with --partitions when missing.
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Partitions of the topic when it is created.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// Messages to send in total (unless `--duration` is given).
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    /// Send for this long instead of a number of messages, e.g. `60s` (sustained load: past
    /// the storage engine's first flushes and compactions).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<std::time::Duration>,
    /// Bytes per message value.
    #[arg(long, default_value_t = 100)]
    message_size: usize,
    /// Replicas of each partition when the topic is created (a cluster: acked once a
    /// majority of them stored each record). Above 1, one 16-byte warm-up record goes to
    /// each partition first, retried until the partition has a leader (not counted), and
    /// the load starts once each partition is led by its preferred replica (at most 15 s).
    #[arg(long, default_value_t = 1)]
    replication_factor: u32,
    /// Most bytes the topic keeps when it is created, e.g. `4GiB` (the oldest records are
    /// deleted past it, so a long run fits the disk); default: no limit.
    #[arg(long)]
    retention_bytes: Option<bytesize::ByteSize>,
    /// Messages per produce request.
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    /// Concurrent producers, each on its own connection and stream.
    #[arg(long, default_value_t = 4)]
    producers: usize,
    /// Requests each producer keeps in flight.
    #[arg(long, default_value_t = 8)]
    in_flight: usize,
    /// Send without a producer id and sequence (no deduplication of retries).
    #[arg(long)]
    no_idempotence: bool,
    /// Durability of the topic when it is created: `fsync` (acked after fsync) or
    /// `buffered` (acked once written to the OS).
    #[arg(long, value_enum, default_value_t = Durability::Fsync)]
    durability: Durability,
    #[command(flatten)]
    common: BenchCommon,
}

/// Durability of a benchmark topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Acked after fsync (group commit).
    Fsync,
    /// Acked once written to the OS.
    Buffered,
}

pub async fn run(
    client: &Client,
    broker: &str,
    cmd: BenchCommand,
    output: Output,
) -> anyhow::Result<()> {
    let common = match &cmd {
        BenchCommand::Produce(b) => &b.common,
        BenchCommand::Consume(b) => &b.common,
        BenchCommand::EndToEnd(b) => &b.common,
    };
    let rss = RssSampler::start(common.metrics_addr(broker));
    let mut report = match cmd {
        BenchCommand::Produce(b) => produce(client, b, output).await?,
        BenchCommand::Consume(b) => consume(client, b, output).await?,
        BenchCommand::EndToEnd(b) => end_to_end(client, b, output).await?,
    };
    report.broker_rss_mib = rss.finish().await.map(|b| b as f64 / (1024.0 * 1024.0));
    report.print(output);
    Ok(())
}

/// Settings every benchmark takes.
#[derive(Debug, Args, Clone)]
pub struct BenchCommon {
    /// The broker's HTTP address (`host:port`), where its peak resident memory is sampled
    /// from `/metrics` every 250 ms; default: the `--broker` host, port 7071.
    #[arg(long)]
    broker_metrics: Option<String>,
}

impl BenchCommon {
    fn metrics_addr(&self, broker: &str) -> String {
        self.broker_metrics.clone().unwrap_or_else(|| {
            let host = broker
                .split("://")
                .nth(1)
                .unwrap_or(broker)
                .split('/')
                .next()
                .unwrap_or_default();
            let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
            format!("{host}:7071")
        })
    }
}

/// Samples the broker's `weir_resident_memory_bytes` and keeps the largest value seen.
struct RssSampler {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Option<u64>>,
}

impl RssSampler {
    fn start(addr: String) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut peak: Option<u64> = None;
            loop {
                if let Some(v) = scrape_rss(&addr).await {
                    peak = Some(peak.map_or(v, |p| p.max(v)));
                }
                tokio::select! {
                    _ = stopped.changed() => break,
                    () = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
                }
            }
            if let Some(v) = scrape_rss(&addr).await {
                peak = Some(peak.map_or(v, |p| p.max(v)));
            }
            peak
        });
        Self { stop, task }
    }

    /// Stops sampling; the peak in bytes, or `None` when the broker's metrics were never
    /// reachable.
    async fn finish(self) -> Option<u64> {
        let _ = self.stop.send(true);
        self.task.await.ok().flatten()
    }
}

async fn scrape_rss(addr: &str) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: weir\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        body.lines()
            .find(|l| l.starts_with("weir_resident_memory_bytes "))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    tokio::time::timeout(std::time::Duration::from_secs(1), fetch)
        .await
        .ok()
        .flatten()
}

/// A progress bar on stderr for people (hidden for `--output json` and when stderr is not a
/// terminal).
fn progress(output: Output, len: u64, what: &str) -> indicatif::ProgressBar {
    if output == Output::Json {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(&format!(
        "{what} {{bar:40}} {{pos}}/{{len}} {{per_sec}} eta {{eta}}"
    )) {
        bar.set_style(style);
    }
    bar
}

/// The figures of one benchmark, printed as a table or one JSON object.
struct Report {
    name: &'static str,
    settings: serde_json::Value,
    /// (label for people, JSON key, value).
    rows: Vec<(&'static str, &'static str, f64)>,
    /// Further JSON-only figures: (JSON key, value), e.g. a throughput series.
    extra: Vec<(&'static str, serde_json::Value)>,
    broker_rss_mib: Option<f64>,
}

/// Quantiles reported for latency distributions (`latencyQuantilesMs`, for CDF plots).
const QUANTILES: [f64; 14] = [
    0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99999, 1.0,
];

/// A latency histogram (µs) as `{ quantile: ms }`, the quantiles of [`QUANTILES`].
fn quantiles_ms(hist: &Histogram<u64>) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = QUANTILES
        .iter()
        .map(|&q| {
            (
                q.to_string(),
                serde_json::json!(hist.value_at_quantile(q) as f64 / 1000.0),
            )
        })
        .collect();
    serde_json::Value::Object(map)
}

impl Report {
    fn print(&self, output: Output) {
        match output {
            Output::Json => {
                let mut v =
                    serde_json::json!({ "benchmark": self.name, "settings": self.settings });
                for (_, k, x) in &self.rows {
                    v[*k] = serde_json::json!(x);
                }
                for (k, x) in &self.extra {
                    v[*k] = x.clone();
                }
                v["brokerPeakRssMiB"] = serde_json::json!(self.broker_rss_mib);
                println!("{v}");
            }
            Output::Human => {
                println!("weir bench {}", self.name);
                println!("  settings: {}", self.settings);
                for (k, _, x) in &self.rows {
                    println!("  {k:<26} {x:>14.2}");
                }
                match self.broker_rss_mib {
                    Some(m) => println!("  {:<26} {m:>14.1}", "broker peak RSS MiB"),
                    None => println!("  {:<26} {:>14}", "broker peak RSS MiB", "n/a"),
                }
            }
        }
    }
}

struct ProducerResult {
    messages: u64,
    latencies_us: Histogram<u64>,
}

#[allow(clippy::too_many_lines)]
async fn produce(
    client: &Client,
    settings: ProduceBench,
    output: Output,
) -> anyhow::Result<Report> {
    let durability = ensure_topic(
        client,
        &settings.topic,
        TopicConfig::new(settings.partitions).with_replication_factor(settings.replication_factor),
        settings.retention_bytes.map(|b| b.as_u64()),
        settings.durability,
    )
    .await?;
    if settings.replication_factor > 1 {
        // A replicated topic just created has no leaders until the first elections.
        warm_up(client, &settings.topic).await?;
    }
    let bar = progress(output, settings.messages, "produce");
    let producers = settings.producers.max(1);
    let batch = settings.batch_size.max(1);
    // Each producer's share of the messages, or unbounded until the deadline.
    let per_producer = match settings.duration {
        Some(_) => u64::MAX,
        None => settings.messages.div_ceil(producers as u64),
    };
    let payload = random_payload(settings.message_size);
    let started = Instant::now();
    let deadline = settings.duration.map(|d| started + d);
    // Messages acknowledged so far, sampled every second into the throughput series.
    // The last, partial second is left out.
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let acked = Arc::clone(&acked);
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut series = Vec::new();
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.tick().await;
            let mut last = 0u64;
            loop {
                tick.tick().await;
                if stop.load(Ordering::Acquire) {
                    return series;
                }
                let now = acked.load(Ordering::Relaxed);
                series.push(now - last);
                last = now;
            }
        })
    };
    let mut tasks = Vec::new();
    for _ in 0..producers {
        let client = client.clone();
        let topic = settings.topic.clone();
        let size = settings.message_size;
        let in_flight = settings.in_flight.max(1);
        let no_idempotence = settings.no_idempotence;
        let bar = bar.clone();
        let acked = Arc::clone(&acked);
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = client.produce_stream(in_flight).await?;
            if no_idempotence {
                tx.disable_idempotence();
            }
            let (ts_tx, mut ts_rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            // What the sender sent in all, once it stopped (u64::MAX until then).
            let total = Arc::new(AtomicU64::new(u64::MAX));
            let sender_total = Arc::clone(&total);
            let sender = tokio::spawn(async move {
                let mut sent = 0u64;
                while sent < per_producer && deadline.is_none_or(|d| Instant::now() < d) {
                    let n = (per_producer - sent).min(batch as u64) as usize;
                    let records = (0..n)
                        .map(|i| {
                            let at = (sent as usize + i) * size % PAYLOAD_WINDOW;
                            Record {
                                value: Bytes::from_static(&payload[at..at + size]),
                                ..Record::default()
                            }
                        })
                        .collect();
                    let _ = ts_tx.send(Instant::now());
                    tx.send(&topic, None, records).await?;
                    sent += n as u64;
                }
                sender_total.store(sent, Ordering::Release);
                Ok::<_, weir_client::Error>(())
            });
            let mut hist =
                Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
            let mut messages = 0u64;
            let mut pending: VecDeque<Instant> = VecDeque::new();
            while let Some(answer) = rx.next().await {
                while let Ok(t) = ts_rx.try_recv() {
                    pending.push_back(t);
                }
                if pending.is_empty()
                    && let Some(t) = ts_rx.recv().await
                {
                    pending.push_back(t);
                }
                let acks = answer?.result?;
                if let Some(t) = pending.pop_front() {
                    let _ = hist.record(t.elapsed().as_micros() as u64);
                }
                let n: u64 = acks.iter().map(|a| u64::from(a.record_count)).sum();
                messages += n;
                acked.fetch_add(n, Ordering::Relaxed);
                bar.inc(n);
                if messages >= per_producer || messages >= total.load(Ordering::Acquire) {
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
    stop.store(true, Ordering::Release);
    let series = sampler.await?;
    #[allow(clippy::cast_precision_loss)]
    let rate = messages as f64 / secs;
    #[allow(clippy::cast_precision_loss)]
    let mb = (messages * settings.message_size as u64) as f64 / secs / 1_000_000.0;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    bar.finish_and_clear();
    Ok(Report {
        name: "produce",
        settings: serde_json::json!({
            "topic": settings.topic, "partitions": settings.partitions,
            "replicationFactor": settings.replication_factor,
            "retentionBytes": settings.retention_bytes.map(|b| b.as_u64()),
            "messages": settings.duration.is_none().then_some(settings.messages),
            "durationSeconds": settings.duration.map(|d| d.as_secs_f64()),
            "messageSize": settings.message_size,
            "batchSize": batch, "producers": producers, "inFlight": settings.in_flight,
            "durability": durability,
            "idempotence": !settings.no_idempotence,
        }),
        rows: vec![
            ("messages", "messages", messages as f64),
            ("seconds", "seconds", secs),
            ("messages/s", "messagesPerSecond", rate),
            ("MB/s", "mbPerSecond", mb),
            ("ack latency p50 ms", "latencyP50Ms", ms(0.5)),
            ("ack latency p99 ms", "latencyP99Ms", ms(0.99)),
            ("ack latency p999 ms", "latencyP999Ms", ms(0.999)),
            (
                "ack latency max ms",
                "latencyMaxMs",
                hist.max() as f64 / 1000.0,
            ),
        ],
        extra: vec![
            ("messagesPerSecondSeries", serde_json::json!(series)),
            ("latencyQuantilesMs", quantiles_ms(&hist)),
        ],
        broker_rss_mib: None,
    })
}

/// Sends one record of 16 zero bytes to each partition of `topic`, retried while refused
/// (UNAVAILABLE: the partition's first election is under way), as Kafka's producer
/// retries `NOT_LEADER_OR_FOLLOWER`; then waits (at most 15 s) until each partition is
/// led by its preferred replica (the first of its replicas): a broker hands the
/// leadership back to it within seconds of an election that chose another, and a
/// pipelined produce stream is refused (nothing stored) by the replica it leaves.
async fn warm_up(client: &Client, topic: &str) -> anyhow::Result<()> {
    let mut producer =
        weir_client::Producer::with_client(client.clone(), weir_client::RetryPolicy::default());
    let partitions = client.describe_topic(topic).await?.partitions.len();
    for partition in 0..u32::try_from(partitions)? {
        let record = Record {
            value: Bytes::from(vec![0u8; 16]),
            ..Record::default()
        };
        producer.send(topic, Some(partition), vec![record]).await?;
    }
    let started = Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(15) {
        let metadata = client.metadata().await?;
        let settled = metadata
            .partitions
            .iter()
            .filter(|p| p.topic == topic)
            .all(|p| p.replicas.first() == Some(&p.leader));
        if settled {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Creates `topic` with `config` (partitions, replication factor), at most
/// `retention_bytes` kept (oldest dropped) and `durability`, unless it exists; returns the
/// topic's durability as the broker reports it.
async fn ensure_topic(
    client: &Client,
    topic: &str,
    config: TopicConfig,
    retention_bytes: Option<u64>,
    durability: Durability,
) -> anyhow::Result<&'static str> {
    let d = match client.describe_topic(topic).await {
        Ok(d) => d,
        Err(e) if e.code() == Some(tonic::Code::NotFound) => {
            let mut config = config.with_durability(match durability {
                Durability::Fsync => weir_client::Durability::Fsync,
                Durability::Buffered => weir_client::Durability::Buffered,
            });
            if let Some(bytes) = retention_bytes {
                config = config
                    .with_max_bytes(bytes)
                    .with_overflow(weir_client::Overflow::DropOldest);
            }
            client.create_topic(topic, &config).await?
        }
        Err(e) => return Err(e.into()),
    };
    Ok(
        if d.config.durability == weir_client::Durability::Buffered {
            "buffered (acked once written to the OS)"
        } else {
            "fsync (acked after fsync, group commit)"
        },
    )
}

fn unique_group(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    )
}

async fn consume(
    client: &Client,
    settings: ConsumeBench,
    output: Output,
) -> anyhow::Result<Report> {
    let topic = client.describe_topic(&settings.topic).await?;
    let group = settings
        .group
        .clone()
        .unwrap_or_else(|| unique_group("bench-consume"));
    let create = GroupConfig::new(settings.topic.clone(), settings.r#type.group_type());
    let created = client.create_group(&group, &create).await?;
    let total = settings
        .messages
        .unwrap_or(created.lag.min(topic.messages.max(created.lag)));
    let members = settings.members.max(1);
    let bar = progress(output, total, "consume");
    let received = Arc::new(AtomicU64::new(0));
    let received_bytes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..members {
        let client = client.clone();
        let group = group.clone();
        let received = Arc::clone(&received);
        let received_bytes = Arc::clone(&received_bytes);
        let bar = bar.clone();
        let (window, ack_batch) = (settings.window, settings.ack_batch.max(1));
        tasks.push(tokio::spawn(async move {
            let mut c = client.subscribe(&group, None, window).await?;
            let mut unacked = Vec::with_capacity(ack_batch);
            while received.load(Ordering::Relaxed) < total {
                let Ok(next) =
                    tokio::time::timeout(std::time::Duration::from_secs(2), c.next_batch()).await
                else {
                    break;
                };
                let Some(batch) = next else { break };
                let batch = batch?;
                received.fetch_add(batch.len() as u64, Ordering::Relaxed);
                let bytes: usize = batch
                    .iter()
                    .map(|d| {
                        d.record.value.len() + d.record.key.as_ref().map_or(0, bytes::Bytes::len)
                    })
                    .sum();
                received_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
                bar.inc(batch.len() as u64);
                for d in batch {
                    unacked.push(d);
                    if unacked.len() >= ack_batch {
                        c.ack_all(&unacked).await?;
                        unacked.clear();
                    }
                }
            }
            c.ack_all(&unacked).await?;
            c.close(std::time::Duration::from_secs(5)).await?;
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let n = received.load(Ordering::Relaxed);
    let desc = client.describe_group(&group).await?;
    if settings.group.is_none() {
        client.delete_group(&group).await?;
    }
    Ok(Report {
        name: "consume",
        settings: serde_json::json!({
            "topic": settings.topic, "type": format!("{:?}", settings.r#type).to_lowercase(),
            "members": members, "window": settings.window, "ackBatch": settings.ack_batch,
        }),
        rows: vec![
            ("messages", "messages", n as f64),
            ("seconds", "seconds", secs),
            ("messages/s", "messagesPerSecond", n as f64 / secs),
            (
                "MB/s (values and keys)",
                "mbPerSecond",
                received_bytes.load(Ordering::Relaxed) as f64 / 1e6 / secs,
            ),
            ("lag after (messages)", "lagAfter", desc.lag as f64),
        ],
        extra: Vec::new(),
        broker_rss_mib: None,
    })
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[allow(clippy::too_many_lines, clippy::cast_sign_loss)]
async fn end_to_end(
    client: &Client,
    settings: EndToEndBench,
    _output: Output,
) -> anyhow::Result<Report> {
    let durability = ensure_topic(
        client,
        &settings.topic,
        TopicConfig::new(settings.partitions).with_replication_factor(settings.replication_factor),
        None,
        Durability::Fsync,
    )
    .await?;
    let group = unique_group("bench-e2e");
    let create = GroupConfig::new(settings.topic.clone(), settings.r#type.group_type())
        .with_start(StartFrom::Latest);
    // A topic just created with replicas has no partition leaders until their first
    // elections: the client tries the refused join again (`Client::subscribe`).
    let mut consumer = client.subscribe(&group, Some(&create), 5000).await?;
    // Every partition's first election may still be under way (the join needed only the
    // group's coordinator partition). The warm-up records' stamp 0 keeps them out of the
    // count and the histogram.
    warm_up(client, &settings.topic).await?;
    let size = settings.message_size.max(16);
    // Batches every millisecond at the requested rate.
    let per_ms = (settings.rate as f64 / 1000.0).max(1.0);
    let total = (settings.rate as f64 * settings.duration.as_secs_f64()) as u64;
    // Send stamps (Unix ns) before this are warm-up: received, not measured.
    let measured_from = now_ns() + u64::try_from(settings.warmup.as_nanos()).unwrap_or(u64::MAX);
    // Messages acknowledged so far, and whether the producer has finished.
    let progress = Arc::new((AtomicU64::new(0), AtomicBool::new(false)));
    let producer = {
        let client = client.clone();
        let topic = settings.topic.clone();
        let progress = Arc::clone(&progress);
        let duration = settings.duration;
        tokio::spawn(async move {
            let (mut tx, mut rx) = client.produce_stream(64).await?;
            // Each request's id and send time (Unix ns), in order: the stream answers in
            // request order.
            let (sends, mut sent_at) = tokio::sync::mpsc::unbounded_channel::<(u64, u64)>();
            let acks = {
                let progress = Arc::clone(&progress);
                tokio::spawn(async move {
                    // Ack latency of the requests sent after the warm-up (µs).
                    let mut acked =
                        Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
                    while let Some(answer) = rx.next().await {
                        let answer = answer?;
                        while let Some((id, at)) = sent_at.recv().await {
                            if id == answer.request_id {
                                if at >= measured_from {
                                    let _ = acked.record(now_ns().saturating_sub(at) / 1000);
                                }
                                break;
                            }
                        }
                        let n: u64 = answer
                            .result?
                            .iter()
                            .map(|a| u64::from(a.record_count))
                            .sum();
                        progress.0.fetch_add(n, Ordering::Relaxed);
                    }
                    Ok::<_, anyhow::Error>(acked)
                })
            };
            let started = Instant::now();
            let mut sent = 0u64;
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            // Sends stop at the deadline even when the broker fell behind the rate (the
            // stream's window is full): what was sent is measured.
            while sent < total && started.elapsed() < duration {
                tick.tick().await;
                let due = ((started.elapsed().as_secs_f64() * 1000.0 + 1.0) * per_ms) as u64;
                let n = due.saturating_sub(sent).min(total - sent);
                if n == 0 {
                    continue;
                }
                let records = (0..n)
                    .map(|_| {
                        let mut v = vec![0u8; size];
                        v[..8].copy_from_slice(&now_ns().to_le_bytes());
                        Record {
                            value: Bytes::from(v),
                            ..Record::default()
                        }
                    })
                    .collect();
                let at = now_ns();
                match tx.send(&topic, None, records).await {
                    Ok(id) => {
                        let _ = sends.send((id, at));
                    }
                    Err(e) => {
                        // The answers' reader stopped first: its error says why.
                        acks.await??;
                        return Err(e.into());
                    }
                }
                sent += n;
            }
            drop(tx);
            drop(sends);
            let acked = acks.await;
            progress.1.store(true, Ordering::Release);
            let acked = acked??;
            Ok::<_, anyhow::Error>((sent, acked))
        })
    };
    let mut hist = Histogram::<u64>::new(3).map_err(|e| anyhow::anyhow!("histogram: {e}"))?;
    let mut received = 0u64;
    let mut unacked = Vec::with_capacity(256);
    let started = Instant::now();
    // Until every acknowledged message is received, or none arrives for 5 s (looked at
    // every 10 ms: the producer may finish after the last message arrived).
    let mut last_receipt = started;
    let mut latency_log = match &settings.latency_log {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).map_err(|e| {
                anyhow::anyhow!("cannot create the latency log {}: {e}", path.display())
            })?,
        )),
        None => None,
    };
    while !(progress.1.load(Ordering::Acquire) && received >= progress.0.load(Ordering::Relaxed)) {
        let Ok(next) =
            tokio::time::timeout(std::time::Duration::from_millis(10), consumer.next()).await
        else {
            if last_receipt.elapsed() > std::time::Duration::from_secs(5) {
                break;
            }
            continue;
        };
        let Some(d) = next else { break };
        let d = d?;
        last_receipt = Instant::now();
        let stamp = d
            .record
            .value
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes);
        if let Some(sent) = stamp
            && sent >= measured_from
        {
            let latency_us = now_ns().saturating_sub(sent) / 1000;
            let _ = hist.record(latency_us);
            if let Some(log) = latency_log.as_mut() {
                use std::io::Write as _;
                writeln!(log, "{sent} {latency_us} {}", d.partition)?;
            }
        }
        if stamp != Some(0) {
            received += 1;
        }
        unacked.push(d);
        if unacked.len() >= 256 {
            consumer.ack_all(&unacked).await?;
            unacked.clear();
        }
    }
    consumer.ack_all(&unacked).await?;
    if let Some(mut log) = latency_log {
        use std::io::Write as _;
        log.flush()?;
    }
    // From the first send to the last receipt.
    let secs = last_receipt.duration_since(started).as_secs_f64().max(1e-9);
    let (sent, acked) = producer.await??;
    consumer.close(std::time::Duration::from_secs(5)).await?;
    client.delete_group(&group).await?;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let ack_ms = |q: f64| acked.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        name: "end-to-end",
        settings: serde_json::json!({
            "topic": settings.topic, "rate": settings.rate, "seconds": settings.duration.as_secs_f64(),
            "warmupSeconds": settings.warmup.as_secs_f64(),
            "messageSize": size, "type": format!("{:?}", settings.r#type).to_lowercase(),
            "replicationFactor": settings.replication_factor,
            "durability": durability,
        }),
        rows: vec![
            ("sent", "sent", sent as f64),
            ("received", "received", received as f64),
            ("received/s", "receivedPerSecond", received as f64 / secs),
            ("latency p50 ms", "latencyP50Ms", ms(0.5)),
            ("latency p99 ms", "latencyP99Ms", ms(0.99)),
            ("latency p999 ms", "latencyP999Ms", ms(0.999)),
            ("latency max ms", "latencyMaxMs", hist.max() as f64 / 1000.0),
            ("measured (after warm-up)", "measured", hist.len() as f64),
            ("produce ack p50 ms", "ackLatencyP50Ms", ack_ms(0.5)),
            ("produce ack p99 ms", "ackLatencyP99Ms", ack_ms(0.99)),
            ("produce ack p999 ms", "ackLatencyP999Ms", ack_ms(0.999)),
        ],
        extra: vec![("latencyQuantilesMs", quantiles_ms(&hist))],
        broker_rss_mib: None,
    })
}
