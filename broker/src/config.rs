//! Command-line flags and environment of `weir-broker`, validated once at start-up.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

/// The Weir message broker: stores topics in an embedded fjall database and serves
/// producers and consumers over gRPC.
#[derive(Debug, Clone, Parser)]
#[command(name = "weir-broker", version)]
pub struct Config {
    /// Directory of the embedded database; created if missing. One broker per directory.
    #[arg(long, env = "WEIR_DATA_DIR", default_value = "./weir-data")]
    pub data_dir: PathBuf,

    /// Address of the gRPC server (weir.v1, health, reflection), `HOST:PORT` with an IP
    /// address or a host name (`localhost:7070`). Port 0 picks a free port; the bound
    /// address is logged.
    #[arg(long, env = "WEIR_LISTEN", default_value = "0.0.0.0:7070", value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// This broker's id in the cluster (`docs/cluster.md`): unique per broker, stable across
    /// restarts (in Kubernetes, the Pod's ordinal).
    #[arg(long, env = "WEIR_NODE_ID", default_value_t = 0)]
    pub node_id: u64,

    /// `HOST:PORT` at which peers and clients reach this broker's gRPC port; by default the
    /// bound address, with this host's name when bound to every interface (`0.0.0.0`).
    #[arg(long, env = "WEIR_ADVERTISE", value_parser = parse_advertise)]
    pub advertise: Option<String>,

    /// The metadata group's initial voters, `ID=HOST:PORT` separated by commas, this broker
    /// among them (`0=weir-broker-0.weir-broker:7070,1=…`): 1, 3 or 5 brokers. Every voter
    /// gets the same list. Empty: a cluster of one.
    #[arg(long, env = "WEIR_PEERS", value_parser = parse_peers, default_value = "")]
    pub peers: Peers,

    /// Address of the HTTP server: /metrics (Prometheus), /healthz, /readyz; `HOST:PORT`.
    #[arg(long, env = "WEIR_HTTP_LISTEN", default_value = "0.0.0.0:7071", value_parser = parse_listen)]
    pub http_listen: SocketAddr,

    /// Longest a graceful shutdown (SIGTERM, SIGINT) waits for in-flight requests before it
    /// persists and exits anyway, e.g. `10s`.
    #[arg(long, env = "WEIR_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Most client connections the gRPC port holds at once; at most half the open-files
    /// limit (raised to its hard limit at start-up) is used, a quarter is kept for storage.
    /// A connection past the bound is closed at once; one silent for 10 s is closed.
    #[arg(long, env = "WEIR_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,

    /// Block cache of the database, e.g. `64MiB`. 16 MiB by default: produce never reads
    /// through it, a catch-up read of a backlog larger than it gains nothing from a bigger
    /// one, and at 64 MiB it held 43–68 MiB more of the broker's peak RSS under sustained
    /// produce (`docs/benchmarks.md`, "Block cache of 16 MiB").
    #[arg(long, env = "WEIR_CACHE_SIZE", default_value = "16MiB")]
    pub cache_size: bytesize::ByteSize,

    /// Background threads of the storage engine (memtable flushes and compactions).
    /// Default 1: with more, fjall 3.1's first worker hands compaction jobs back to the
    /// queue while the others are busy, which spins a core; on 2 cores one worker gave 1.0M
    /// against 0.83M messages/s and 230 against 490 MB RSS (`weir bench produce`, 10M
    /// messages of 100 B).
    #[arg(long, env = "WEIR_STORAGE_WORKERS", default_value_t = 1)]
    pub storage_workers: usize,

    /// Journal size after which the storage engine flushes and deletes old journals, e.g.
    /// `512MiB` (at least 64 MiB). Smaller gives disk space back sooner after deletions.
    #[arg(long, env = "WEIR_MAX_JOURNAL_SIZE", default_value = "512MiB")]
    pub max_journal_size: bytesize::ByteSize,

    /// Largest in-memory table of records before it is flushed to disk, e.g. `64MiB`
    /// (fjall's default; at least 1 MiB). Taken when the data directory is created.
    #[arg(long, env = "WEIR_MEMTABLE_SIZE", default_value = "64MiB")]
    pub memtable_size: bytesize::ByteSize,

    /// Most record bytes held in memory tables waiting to be flushed, e.g. `128MiB`; past
    /// it produce requests wait for the flush (backpressure instead of memory growth).
    /// `0` leaves only the storage engine's own limit (4 full memtables).
    #[arg(long, env = "WEIR_MAX_WRITE_BUFFER_SIZE", default_value = "128MiB")]
    pub max_write_buffer_size: bytesize::ByteSize,

    /// Produce requests are refused (`RESOURCE_EXHAUSTED`, "the disk … is full") while the
    /// file system of the data directory has less than this available, e.g. `256MiB`, so
    /// the storage engine never runs out of space mid-write; reads, acks and deletions go
    /// on, and produce resumes once space is freed. `0` never refuses.
    #[arg(long, env = "WEIR_MIN_FREE_DISK", default_value = "256MiB")]
    pub min_free_disk: bytesize::ByteSize,

    /// Replicated partitions: a follower that hears nothing from its leader for between
    /// this and twice this starts an election (the leader's loss is repaired within about
    /// twice this plus an election round). At least 3 × `--replica-heartbeat`.
    #[arg(long, env = "WEIR_ELECTION_TIMEOUT", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub election_timeout: Duration,

    /// Replicated partitions: how often a leader with nothing to replicate tells its
    /// followers it is alive.
    #[arg(long, env = "WEIR_REPLICA_HEARTBEAT", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub replica_heartbeat: Duration,

    /// Replicated partitions: a follower stays in sync while it has every record its leader
    /// had this long ago and has answered the leader within it (Kafka's
    /// `replica.lag.time.max.ms`); fewer in-sync replicas than replicas is
    /// `UnderReplicated`.
    #[arg(long, env = "WEIR_REPLICA_LAG_MAX", default_value = "10s", value_parser = humantime::parse_duration)]
    pub replica_lag_max: Duration,

    /// How often records of `Buffered` topics are fsynced, e.g. `1s`.
    #[arg(long, env = "WEIR_BUFFERED_FLUSH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub buffered_flush_interval: Duration,

    /// Log format: `text` for terminals, `json` for log collectors in a cluster.
    #[arg(long, env = "WEIR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Where new record batches are stored: `segments` (each partition's segment files,
    /// written once with `O_DIRECT`, the database keeping a pointer per batch; batches
    /// below `--segment-min-batch` stay in the database; `docs/record-store.md`) or
    /// `fjall` (every batch in the database's journal, then its blob files: every byte
    /// written twice). Batches stored either way are read either way.
    #[arg(long, env = "WEIR_RECORD_STORE", value_enum, default_value_t = RecordStore::Segments, hide = true)]
    pub record_store: RecordStore,

    /// Segment store: size after which a partition's segment is closed and a new one
    /// started, e.g. `128MiB`. Retention deletes whole segments.
    #[arg(long, env = "WEIR_SEGMENT_SIZE", default_value = "128MiB", hide = true)]
    pub segment_size: bytesize::ByteSize,

    /// Segment store: batches smaller than this, e.g. `64KiB`, are stored in the
    /// database's journal instead (one fsync per round for small batches, not one per
    /// partition). `0` sends every batch to the segments.
    #[arg(
        long,
        env = "WEIR_SEGMENT_MIN_BATCH",
        default_value = "64KiB",
        hide = true
    )]
    pub segment_min_batch: bytesize::ByteSize,

    /// Segment store: the newest batches written kept in memory for consumers near the
    /// end, e.g. `32MiB` (writes bypass the page cache). `0` keeps none.
    #[arg(
        long,
        env = "WEIR_TAIL_CACHE_SIZE",
        default_value = "32MiB",
        hide = true
    )]
    pub tail_cache_size: bytesize::ByteSize,

    /// A fault to inject, for the broker's own tests (`writer-panic`: the log writer
    /// panics on the first produce; `slow-commit`: each group commit waits 50 ms first).
    /// Never set it in production.
    #[arg(long, env = "WEIR_FAILPOINT", value_enum, hide = true)]
    pub failpoint: Option<Failpoint>,
}

/// Where new record batches go (see [`crate::log::RecordStore`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RecordStore {
    /// In the database: journal, then blob files.
    Fjall,
    /// In each partition's segment files, written once.
    Segments,
}

impl From<RecordStore> for crate::log::RecordStore {
    fn from(r: RecordStore) -> Self {
        match r {
            RecordStore::Fjall => Self::Fjall,
            RecordStore::Segments => Self::Segments,
        }
    }
}

/// Faults the broker's tests inject (see [`crate::log::Failpoint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Failpoint {
    /// The log writer thread panics on the first produce.
    WriterPanic,
    /// Each group commit waits 50 ms first (a slow disk).
    SlowCommit,
}

impl From<Failpoint> for crate::log::Failpoint {
    fn from(f: Failpoint) -> Self {
        match f {
            Failpoint::WriterPanic => Self::WriterPanic,
            Failpoint::SlowCommit => Self::SlowCommit,
        }
    }
}

/// Parses `HOST:PORT`, resolving a host name (the first address it resolves to).
fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    let hint = "expected HOST:PORT, e.g. 0.0.0.0:7070, 127.0.0.1:7070 or localhost:7070";
    if !s.contains(':') || s.contains("://") {
        return Err(format!("{s:?} is not an address to listen on; {hint}"));
    }
    match s.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{s:?} resolves to no address; {hint}")),
        Err(e) => Err(format!("cannot resolve {s:?}: {e}; {hint}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_take_ips_and_host_names() {
        assert_eq!(
            parse_listen("0.0.0.0:7070"),
            Ok(SocketAddr::from(([0, 0, 0, 0], 7070)))
        );
        let local = parse_listen("localhost:7070").expect("resolves");
        assert!(local.ip().is_loopback() && local.port() == 7070, "{local}");
        let scheme = parse_listen("http://127.0.0.1:7070").expect_err("a URL");
        assert!(scheme.contains("expected HOST:PORT"), "{scheme}");
        assert!(parse_listen("7070").is_err());
    }
}

/// Format of the broker's own log lines (on stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `--advertise` (and each `--peers` address): `HOST:PORT` with a port in 1..=65535.
fn parse_advertise(s: &str) -> Result<String, String> {
    let bad = || {
        format!(
            "--advertise {:?} is not HOST:PORT with a port from 1 to 65535, e.g. weir-broker-0.weir-broker:7070",
            crate::validate::quote(s)
        )
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 && !host.is_empty() => Ok(s.to_owned()),
        _ => Err(bad()),
    }
}

/// `--peers`: broker id → `HOST:PORT`.
pub type Peers = std::collections::BTreeMap<u64, String>;

/// `--peers ID=HOST:PORT,…` with distinct ids and well-formed addresses.
fn parse_peers(s: &str) -> Result<Peers, String> {
    let mut peers = Peers::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part.split_once('=').ok_or_else(|| {
            format!(
                "--peers entry {:?} is not ID=HOST:PORT, e.g. 0=weir-broker-0.weir-broker:7070",
                crate::validate::quote(part)
            )
        })?;
        let id: u64 = id.trim().parse().map_err(|_| {
            format!(
                "--peers entry {:?}: {:?} is not a broker id (a number)",
                crate::validate::quote(part),
                crate::validate::quote(id)
            )
        })?;
        let addr = parse_advertise(addr.trim())?;
        if peers.insert(id, addr).is_some() {
            return Err(format!("--peers names broker {id} twice"));
        }
    }
    Ok(peers)
}
