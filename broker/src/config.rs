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

    /// Address of the gRPC server (weir.v1, health, reflection). Port 0 picks a free port;
    /// the bound address is logged.
    #[arg(long, env = "WEIR_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: SocketAddr,

    /// Address of the HTTP server: /metrics (Prometheus), /healthz, /readyz.
    #[arg(long, env = "WEIR_HTTP_LISTEN", default_value = "0.0.0.0:7071")]
    pub http_listen: SocketAddr,

    /// Longest a graceful shutdown (SIGTERM, SIGINT) waits for in-flight requests before it
    /// persists and exits anyway, e.g. `10s`.
    #[arg(long, env = "WEIR_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Block cache of the database, e.g. `64MiB`.
    #[arg(long, env = "WEIR_CACHE_SIZE", default_value = "64MiB")]
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

    /// How often records of `Buffered` topics are fsynced, e.g. `1s`.
    #[arg(long, env = "WEIR_BUFFERED_FLUSH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub buffered_flush_interval: Duration,

    /// Log format: `text` for terminals, `json` for log collectors in a cluster.
    #[arg(long, env = "WEIR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Format of the broker's own log lines (on stderr).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}
