//! Every periodic job of the broker, in one place: what runs, how often, and why.
//!
//! | job | every | why |
//! | --- | --- | --- |
//! | group maintenance ([`Groups::tick`]) | [`groups::TICK`] (100 ms) | session timeouts, redelivery after `ackWait`, dead letters, handovers, writing acks, work-queue deletion |
//! | `maxAge` expiry ([`expire_max_age`]) | [`MAX_AGE_CHECK`] (1 s) | a record is gone at most ~1 s after it passes its topic's `maxAge` |
//! | fsync of buffered writes ([`Log::sync`]) | `--buffered-flush-interval` (1 s) | `Buffered` topics and group acks are fsynced at least this often |
//!
//! Not periodic: `DropOldest` limits are applied by the log's writer after each commit
//! that passes them, and `Reject` limits before an append.
//!
//! A job that fails logs and tries again on its next turn. A job that *dies* (panics)
//! reports through [`Log::report_failure`]: the broker turns unready and exits non-zero,
//! so Kubernetes restarts it, never a live process without its maintenance.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};

use crate::{
    groups::{self, Groups},
    log::{self, Log},
};

/// How often `maxAge` is enforced: records disappear at most this long (plus the time to
/// delete them) after they pass their topic's `maxAge`.
pub const MAX_AGE_CHECK: Duration = Duration::from_secs(1);

/// How long a job's turn under way when the broker stops may still take: 1 s.
pub const TURN_AFTER_STOP: Duration = Duration::from_secs(1);

/// Starts every job; each stops when `stop` turns true. Join the handles to wait for them.
pub fn spawn(
    log: &Arc<Log>,
    groups: &Arc<Groups>,
    buffered_flush_interval: Duration,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let jobs: [(&'static str, Duration, Job); 3] = [
        ("group maintenance", groups::TICK, {
            let groups = Arc::clone(groups);
            Box::new(move || {
                let groups = Arc::clone(&groups);
                Box::pin(async move { groups.tick().await.map_err(|e| e.to_string()) })
            })
        }),
        ("max-age expiry", MAX_AGE_CHECK, {
            let log = Arc::clone(log);
            Box::new(move || {
                let log = Arc::clone(&log);
                Box::pin(async move { expire_max_age(&log).await.map_err(|e| e.to_string()) })
            })
        }),
        ("buffered fsync", buffered_flush_interval, {
            let log = Arc::clone(log);
            Box::new(move || {
                let log = Arc::clone(&log);
                Box::pin(async move { log.sync().await.map_err(|e| e.to_string()) })
            })
        }),
    ];
    jobs.into_iter()
        .map(|(name, every, job)| {
            let log = Arc::clone(log);
            let stop = stop.clone();
            tokio::spawn(async move {
                let run = tokio::spawn(every_interval(name, every, job, stop));
                if let Err(e) = run.await
                    && e.is_panic()
                {
                    log.report_failure(format!("the {name} job panicked"));
                }
            })
        })
        .collect()
}

/// One turn of a job: its error, if any, as text for the log line.
type Job = Box<
    dyn Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync,
>;

async fn every_interval(
    name: &'static str,
    every: Duration,
    job: Job,
    mut stop: watch::Receiver<bool>,
) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let turn = job();
        tokio::pin!(turn);
        let finished = tokio::select! {
            finished = &mut turn => finished,
            () = async { drop(stop.wait_for(|s| *s).await) } => {
                // A turn may wait on a Raft commit (a group's cursors, a retention cut) that a
                // stopping broker, its gRPC server closed, no longer takes part in: it gets
                // TURN_AFTER_STOP to finish, then is abandoned. Nothing it would have stored
                // was acknowledged to anyone (an ack is answered once committed).
                if tokio::time::timeout(TURN_AFTER_STOP, &mut turn).await.is_err() {
                    tracing::warn!(job = name, "a turn of the job did not finish after the stop; abandoned");
                }
                return;
            }
        };
        if let Err(e) = finished {
            tracing::warn!(job = name, error = %e, "periodic job failed; retrying on its next turn");
        }
    }
}

/// Deletes records past their topic's `maxAge`; for replicated topics, the partitions led
/// here also propose their retention cut (`maxAge` and their share of the size limits,
/// [`Log::retention_cut`]) to their group, and every replica deletes the same records.
/// Errors of one partition are logged and the others still run; the first is returned.
pub async fn expire_max_age(log: &Arc<Log>) -> Result<(), log::Error> {
    let mut first = Ok(());
    for topic in log.topics() {
        let config = topic.config();
        if config.replication_factor > 1 {
            if config.max_age_ms == 0 && config.max_messages == 0 && config.max_bytes == 0 {
                continue;
            }
            for p in topic.partitions() {
                if let Err(e) = log.trim_replicated(&p).await {
                    tracing::debug!(topic = %topic.name, partition = p.index, error = %e, "retention of a replicated partition not proposed");
                }
            }
            continue;
        }
        let max_age = config.max_age_ms;
        if max_age == 0 {
            continue;
        }
        let cutoff = log::now_ms().saturating_sub(i64::try_from(max_age).unwrap_or(i64::MAX));
        for p in topic.partitions() {
            if let Err(e) = log.expire(p, cutoff).await {
                tracing::warn!(topic = %topic.name, error = %e, "max-age enforcement failed");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
    }
    first
}
