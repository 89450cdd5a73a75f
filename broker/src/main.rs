//! `weir-broker`: parses flags, opens the log, serves until SIGTERM or SIGINT.

use std::sync::Arc;

use std::{io::IsTerminal, process::ExitCode};

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use weir_broker::{
    config::{Config, LogFormat},
    connections::{FdBudget, raise_open_files_limit},
    log::{Log, LogOptions},
    server::{self, ServeOptions},
};

/// jemalloc, not the system allocator: the broker frees large buffers (request batches,
/// group-commit rounds, memtables) all the time, and glibc's heap kept what they left as
/// resident memory (371 MiB peak RSS at 1 KB sustained produce; jemalloc returns it:
/// `docs/benchmarks.md`, "Where the broker's memory goes").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let config = Config::parse();
    init_tracing(config.log_format);
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("weir-rt")
        .build()
        .context("starting the async runtime")
        .and_then(|runtime| runtime.block_on(run(config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir-broker: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// What failed and why, outermost first, on one line; a cause whose text the message
/// before it already shows is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

async fn run(config: Config) -> anyhow::Result<()> {
    if config.max_journal_size.as_u64() < 64 * 1024 * 1024 {
        anyhow::bail!(
            "--max-journal-size is {}; it must be at least 64MiB",
            config.max_journal_size
        );
    }
    if ![0, 1, 3, 5].contains(&config.peers.len()) {
        anyhow::bail!(
            "--peers names {} brokers; the metadata group takes 1, 3 or 5 voters (a majority must survive a loss)",
            config.peers.len()
        );
    }
    if config.buffered_flush_interval.is_zero() {
        anyhow::bail!("--buffered-flush-interval must be more than 0, e.g. 1s");
    }
    let budget = FdBudget::new(raise_open_files_limit(), config.max_connections);
    tracing::info!(
        open_files = budget.open_files,
        storage_files = budget.storage_files,
        grpc_connections = budget.grpc_connections,
        http_connections = budget.http_connections,
        "file descriptors shared out"
    );
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    let options = LogOptions {
        cache_bytes: config.cache_size.as_u64(),
        storage_workers: Some(config.storage_workers),
        max_journal_bytes: config.max_journal_size.as_u64(),
        memtable_bytes: config.memtable_size.as_u64(),
        memtable_offset_bytes: weir_broker::log::memtable_offset(
            config.memtable_size.as_u64(),
            config.node_id,
        ),
        max_write_buffer_bytes: config.max_write_buffer_size.as_u64(),
        min_free_disk_bytes: config.min_free_disk.as_u64(),
        max_cached_files: Some(budget.storage_files),
        failpoint: config.failpoint.map(Into::into),
        record_store: config.record_store.into(),
        segment_bytes: config.segment_size.as_u64().max(1024 * 1024),
        segment_min_batch_bytes: config.segment_min_batch.as_u64(),
        tail_cache_bytes: config.tail_cache_size.as_u64(),
        ..LogOptions::default()
    };
    let dir = config.data_dir.clone();
    let log = tokio::task::spawn_blocking(move || Log::open(&dir, &options))
        .await
        .context("opening the log")??;
    let log = Arc::new(log);
    let grpc = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding gRPC address {}", config.listen))?;
    let http = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("binding HTTP address {}", config.http_listen))?;
    let options = ServeOptions {
        grace: config.shutdown_timeout,
        buffered_flush_interval: config.buffered_flush_interval,
        grpc_connections: budget.grpc_connections,
        http_connections: budget.http_connections,
        node_id: config.node_id,
        advertise: config.advertise.clone(),
        peers: config.peers.clone(),
        replica: weir_broker::replica::ReplicaOptions {
            heartbeat_ms: (config.replica_heartbeat.as_millis() as u64).max(1),
            election_timeout_ms: (config.election_timeout.as_millis() as u64)
                .max(3 * (config.replica_heartbeat.as_millis() as u64).max(1)),
            lag_max_ms: (config.replica_lag_max.as_millis() as u64).max(1),
        },
    };
    server::run(log, grpc, http, shutdown_signal(), options).await?;
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the broker");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    // Colours only on a terminal: a file or a log collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
