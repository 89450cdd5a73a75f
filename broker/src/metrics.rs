//! Prometheus metrics and the HTTP port (`--http-listen`): `/metrics`, `/healthz`, `/readyz`.
//!
//! This module owns metric names and the HTTP server; it reads the log's counters but never
//! changes the log. Names follow Prometheus conventions (`_total` counters, base units:
//! seconds and bytes).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{groups::Groups, log::Log};

/// The broker's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    produce_requests: Counter,
    produce_errors: Counter,
    produce_records: Counter,
    produce_latency: Histogram,
    fetch_requests: Counter,
    fetch_records: Counter,
    commits: Counter,
    forwarded: Counter,
    metadata_commits: Counter,
    metadata_leader_changes: Counter,
    metadata_term: Gauge,
    metadata_leader: Gauge,
    data_loss_reads: Counter,
    accepted_lost_records: Counter,
    committed_records: Counter,
    committed_bytes: Counter,
    commit_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    stall_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    stored_messages: Gauge,
    stored_bytes: Gauge,
    disk_bytes: Gauge,
    resident_bytes: Gauge,
    write_buffer_bytes: Gauge,
    topics: Gauge,
    group_skipped: Counter,
    replica_repairs: Counter,
    replica_append_messages: Counter,
    replica_commits_folded: Counter,
    replica_repairing: Gauge,
    replica_elections: Counter,
    replica_partitions: Gauge,
    replica_leaders: Gauge,
    replica_under_replicated: Gauge,
    replica_max_lag: Gauge,
    /// The replica groups' counters, once [`Metrics::watch_replicas`] was called.
    replicas: std::sync::OnceLock<Arc<crate::replica::Replicas>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `weir_` prefix.
    #[allow(clippy::too_many_lines)] // one registration per metric, nothing else
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("weir");
        let produce_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.000_05, 2.0, 18),
        );
        let m = Self {
            produce_requests: Counter::default(),
            produce_errors: Counter::default(),
            produce_records: Counter::default(),
            produce_latency,
            fetch_requests: Counter::default(),
            fetch_records: Counter::default(),
            commits: Counter::default(),
            forwarded: Counter::default(),
            metadata_commits: Counter::default(),
            metadata_leader_changes: Counter::default(),
            metadata_term: Gauge::default(),
            metadata_leader: Gauge::default(),
            data_loss_reads: Counter::default(),
            accepted_lost_records: Counter::default(),
            committed_records: Counter::default(),
            committed_bytes: Counter::default(),
            commit_seconds: Counter::default(),
            stall_seconds: Counter::default(),
            stored_messages: Gauge::default(),
            stored_bytes: Gauge::default(),
            disk_bytes: Gauge::default(),
            resident_bytes: Gauge::default(),
            write_buffer_bytes: Gauge::default(),
            topics: Gauge::default(),
            group_skipped: Counter::default(),
            replica_repairs: Counter::default(),
            replica_append_messages: Counter::default(),
            replica_commits_folded: Counter::default(),
            replica_repairing: Gauge::default(),
            replica_elections: Counter::default(),
            replica_partitions: Gauge::default(),
            replica_leaders: Gauge::default(),
            replica_under_replicated: Gauge::default(),
            replica_max_lag: Gauge::default(),
            replicas: std::sync::OnceLock::new(),
            registry: Registry::default(),
        };
        registry.register(
            "produce_requests",
            "Produce requests handled",
            m.produce_requests.clone(),
        );
        registry.register(
            "produce_errors",
            "Produce requests that failed",
            m.produce_errors.clone(),
        );
        registry.register(
            "produce_records",
            "Records acknowledged",
            m.produce_records.clone(),
        );
        registry.register(
            "produce_latency_seconds",
            "Time from produce request to durable ack",
            m.produce_latency.clone(),
        );
        registry.register(
            "fetch_requests",
            "Fetch requests handled",
            m.fetch_requests.clone(),
        );
        registry.register(
            "fetch_records",
            "Records returned by fetches",
            m.fetch_records.clone(),
        );
        registry.register(
            "forwarded_requests",
            "Calls forwarded to another broker: produce and fetch to the partition's leader, group calls to the group's coordinator",
            m.forwarded.clone(),
        );
        registry.register(
            "metadata_commits",
            "Entries of the metadata group's log applied by this broker (its last applied index)",
            m.metadata_commits.clone(),
        );
        registry.register(
            "metadata_leader_changes",
            "Times this broker saw the metadata group elect a leader",
            m.metadata_leader_changes.clone(),
        );
        registry.register(
            "metadata_term",
            "The metadata group's current Raft term, as this broker knows it",
            m.metadata_term.clone(),
        );
        registry.register(
            "metadata_leader",
            "1 while this broker leads the metadata group (is the controller), else 0",
            m.metadata_leader.clone(),
        );
        registry.register(
            "log_data_loss_reads",
            "Reads answered DATA_LOSS: offsets with no stored batch, a batch failing its CRC, or storage that cannot be read back",
            m.data_loss_reads.clone(),
        );
        registry.register(
            "log_accepted_lost_records",
            "Offsets whose loss was accepted with `weir topic repair`; reads step over them",
            m.accepted_lost_records.clone(),
        );
        registry.register(
            "log_commits",
            "Group commits (one fjall batch and one fsync each)",
            m.commits.clone(),
        );
        registry.register(
            "log_committed_records",
            "Records written by group commits",
            m.committed_records.clone(),
        );
        registry.register(
            "log_committed_bytes",
            "Batch bytes written by group commits",
            m.committed_bytes.clone(),
        );
        registry.register(
            "log_commit_seconds",
            "Time spent in group commits (write + fsync)",
            m.commit_seconds.clone(),
        );
        registry.register(
            "log_write_stall_seconds",
            "Time the writer waited for memtable flushes (--max-write-buffer-size reached)",
            m.stall_seconds.clone(),
        );
        registry.register(
            "stored_messages",
            "Records stored over all partitions",
            m.stored_messages.clone(),
        );
        registry.register(
            "stored_bytes",
            "Batch bytes stored over all partitions",
            m.stored_bytes.clone(),
        );
        registry.register(
            "disk_bytes",
            "Bytes the log uses on disk: the database's files and the segment files",
            m.disk_bytes.clone(),
        );
        registry.register(
            "resident_memory_bytes",
            "Resident set size of the broker process, bytes (Linux VmRSS; 0 elsewhere)",
            m.resident_bytes.clone(),
        );
        registry.register(
            "write_buffer_bytes",
            "Bytes in the storage engine's memtables, not yet flushed to tables",
            m.write_buffer_bytes.clone(),
        );
        registry.register("topics", "Topics on this broker", m.topics.clone());
        registry.register(
            "group_skipped_messages",
            "Records deleted by retention before their group acked them (the group resumed at the head)",
            m.group_skipped.clone(),
        );
        registry.register(
            "replica_repairs",
            "Replicas of partitions that lost stored records (damaged storage) and were repaired from their peers",
            m.replica_repairs.clone(),
        );
        registry.register(
            "replica_repairing",
            "Replicas of partitions on this broker being repaired from their peers after damage to their stored records: they do not vote until repaired",
            m.replica_repairing.clone(),
        );
        registry.register(
            "replica_append_messages",
            "AppendEntries messages this broker sent to followers on streams of appends",
            m.replica_append_messages.clone(),
        );
        registry.register(
            "replica_commits_folded",
            "AppendEntries that carried only a newer commit index, folded into the next message to a follower that no reader waits on",
            m.replica_commits_folded.clone(),
        );
        registry.register(
            "replica_leader_elections",
            "Times a replica on this broker became its partition's leader",
            m.replica_elections.clone(),
        );
        registry.register(
            "replica_partitions",
            "Replicas of replicated partitions on this broker",
            m.replica_partitions.clone(),
        );
        registry.register(
            "replica_leaders",
            "Replicated partitions led by this broker",
            m.replica_leaders.clone(),
        );
        registry.register(
            "replica_under_replicated_partitions",
            "Partitions led by this broker with fewer replicas in sync than replicas",
            m.replica_under_replicated.clone(),
        );
        registry.register(
            "replica_max_lag_entries",
            "The most log entries a follower of a partition led by this broker is behind",
            m.replica_max_lag.clone(),
        );
        Self { registry, ..m }
    }

    /// Reads the replica groups' counters (`weir_replica_*`) from `replicas` from now on.
    pub fn watch_replicas(&self, replicas: Arc<crate::replica::Replicas>) {
        let _ = self.replicas.set(replicas);
    }

    /// Counts a produce request of `records` records that started at `started`.
    pub fn observe_produce(&self, records: usize, started: Instant, ok: bool) {
        self.produce_requests.inc();
        if ok {
            self.produce_records.inc_by(records as u64);
            self.produce_latency
                .observe(started.elapsed().as_secs_f64());
        } else {
            self.produce_errors.inc();
        }
    }

    /// Counts a call forwarded to broker `_leader` (the partition's leader).
    pub fn observe_forward(&self, _leader: u64) {
        self.forwarded.inc();
    }

    /// Records the metadata group's state as this broker sees it: entries applied, term,
    /// whether it leads, and whether the leader changed since the last call.
    pub fn observe_metadata(&self, applied: u64, term: u64, leads: bool, leader_changed: bool) {
        let cur = self.metadata_commits.get();
        if applied > cur {
            self.metadata_commits.inc_by(applied - cur);
        }
        self.metadata_term
            .set(i64::try_from(term).unwrap_or(i64::MAX));
        self.metadata_leader.set(i64::from(leads));
        if leader_changed {
            self.metadata_leader_changes.inc();
        }
    }

    /// Counts a fetch that returned `records` records.
    pub fn observe_fetch(&self, records: usize) {
        self.fetch_requests.inc();
        self.fetch_records.inc_by(records as u64);
    }

    /// Prometheus text exposition of every metric, with log figures read now.
    pub fn render(&self, log: &Log, groups: &Groups) -> String {
        let skipped: u64 = groups.list(None).iter().map(|g| g.skipped()).sum();
        if skipped > self.group_skipped.get() {
            self.group_skipped
                .inc_by(skipped - self.group_skipped.get());
        }
        let w = log.writer_stats();
        let set = |c: &Counter, v: u64| {
            let cur = c.get();
            if v > cur {
                c.inc_by(v - cur);
            }
        };
        set(&self.commits, w.commits.load(Ordering::Relaxed));
        set(
            &self.data_loss_reads,
            w.data_loss_reads.load(Ordering::Relaxed),
        );
        set(
            &self.accepted_lost_records,
            w.accepted_lost_records.load(Ordering::Relaxed),
        );
        set(&self.committed_records, w.records.load(Ordering::Relaxed));
        set(&self.committed_bytes, w.bytes.load(Ordering::Relaxed));
        for (counter, nanos) in [
            (&self.commit_seconds, &w.commit_nanos),
            (&self.stall_seconds, &w.stall_nanos),
        ] {
            let secs = nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let cur = counter.get();
            if secs > cur {
                counter.inc_by(secs - cur);
            }
        }
        let topics = log.topics();
        let (mut messages, mut bytes) = (0u64, 0u64);
        for t in &topics {
            for p in t.partitions() {
                messages += crate::log::partition_messages(&p);
                bytes += p.bytes();
            }
        }
        let gauge = |g: &Gauge, v: u64| g.set(i64::try_from(v).unwrap_or(i64::MAX));
        if let Some(r) = self.replicas.get() {
            let stats = r.stats();
            set(&self.replica_repairs, stats.repairs.load(Ordering::Relaxed));
            set(
                &self.replica_append_messages,
                stats.append_messages.load(Ordering::Relaxed),
            );
            set(
                &self.replica_commits_folded,
                stats.commits_folded.load(Ordering::Relaxed),
            );
            gauge(&self.replica_repairing, r.repairing_count());
            set(
                &self.replica_elections,
                stats.elections.load(Ordering::Relaxed),
            );
            gauge(
                &self.replica_partitions,
                stats.replicas.load(Ordering::Relaxed),
            );
            gauge(&self.replica_leaders, stats.leaders.load(Ordering::Relaxed));
            gauge(
                &self.replica_under_replicated,
                stats.under_replicated.load(Ordering::Relaxed),
            );
            gauge(
                &self.replica_max_lag,
                stats.max_lag_entries.load(Ordering::Relaxed),
            );
        }
        gauge(&self.stored_messages, messages);
        gauge(&self.stored_bytes, bytes);
        match log.disk_space() {
            Ok(bytes) => {
                gauge(&self.disk_bytes, bytes);
            }
            Err(e) => tracing::warn!(error = %e, "weir_disk_bytes not updated"),
        }
        gauge(&self.topics, topics.len() as u64);
        gauge(&self.resident_bytes, resident_bytes().unwrap_or(0));
        gauge(&self.write_buffer_bytes, log.write_buffer_bytes());
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "rendering metrics failed");
        }
        out
    }
}

#[derive(Clone)]
struct HttpState {
    log: Arc<Log>,
    groups: Arc<Groups>,
    metrics: Arc<Metrics>,
    ready: tokio::sync::watch::Receiver<bool>,
}

/// The HTTP router: `/metrics` (Prometheus text), `/healthz` (200 while the process runs),
/// `/readyz` (200 once serving; 503 while starting, shutting down, or once storage or a
/// worker failed).
pub fn router(
    log: Arc<Log>,
    groups: Arc<Groups>,
    metrics: Arc<Metrics>,
    ready: tokio::sync::watch::Receiver<bool>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(HttpState {
            log,
            groups,
            metrics,
            ready,
        })
}

async fn metrics_handler(State(s): State<HttpState>) -> impl IntoResponse {
    // Rendering asks fjall for disk usage (file system calls): keep it off the executor.
    let body = tokio::task::spawn_blocking(move || s.metrics.render(&s.log, &s.groups))
        .await
        .unwrap_or_else(|e| format!("# rendering metrics failed: {e}\n"));
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

async fn ready_handler(State(s): State<HttpState>) -> impl IntoResponse {
    if !*s.ready.borrow() || s.log.is_failed() {
        return (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned());
    }
    // A full disk refuses produce requests only: reads and acks go on, so the broker stays
    // ready (consumers must be able to drain) and says why it refuses writes.
    match s.log.disk_free() {
        (free, true) => (
            StatusCode::OK,
            format!("ready; produce refused: the disk is full ({free} bytes available)\n"),
        ),
        _ => (StatusCode::OK, "ready\n".to_owned()),
    }
}

/// Resident set size of this process in bytes, from `VmRSS` in `/proc/self/status` (Linux).
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
