//! The nemesis (`docs/reliability.md`): a three-broker cluster, an RF3 topic, idempotent
//! producers, and faults on one broker at a time (SIGKILL and restart, SIGSTOP and SIGCONT,
//! SIGTERM and restart, disk damage while it is down; `NEMESIS_FAULTS` chooses) for
//! `NEMESIS_MINUTES` minutes; then heal, read every replica and check the history. Run by `tests/fault/nemesis --minutes M` (ignored by a
//! plain `cargo test`). The last line it prints is the JSON summary.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use weir_client::{Client, Record, RetryPolicy, TopicConfig};
use weir_fault::{History, Outcome, Produce, check};
use weir_tests::{
    Broker, cut_file, damage_trailer, journal_data_len, newest_journal, replica_ends,
    replica_records, table_files, toxiproxy::Toxiproxy,
};

#[path = "nemesis/workloads.rs"]
mod workloads;

const TOPIC: &str = "nemesis";
const PARTITIONS: u32 = 4;
/// How long a group's acks may take to be stored (a tick plus a coordinator change).
const PERSIST_WINDOW_MS: u64 = 1000;

type Shared<T> = Arc<parking_lot::Mutex<T>>;

/// How long a workload's client waits for an answer (`Client::with_request_timeout`): 10 s,
/// twice the longest fault; a request lost to a fault then fails and is retried instead of
/// holding its workload.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// `step`'s output, or an error naming `what` when it takes longer than `limit`: a stuck step
/// fails the run with its name (and the brokers' logs are kept) instead of holding it, and
/// CI, forever. `what` is printed as the run's current stage, for a run stopped from outside.
async fn bounded<T>(
    what: &str,
    limit: Duration,
    step: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    println!("stage: {what}");
    tokio::time::timeout(limit, step)
        .await
        .map_err(|_| anyhow::anyhow!("stuck: {what} did not finish within {limit:?}"))?
}

/// A small xorshift generator: the run's choices, reproducible from `NEMESIS_SEED`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// An idempotent producer of partition `partition` (bootstrapped from `bootstrap`, every
/// broker, retrying for 30 s) sending requests of 5 records until `stop`, recording each
/// record's outcome. After a failure it starts again as a new producer. Unless `routed`, its
/// requests go to the first broker of `bootstrap` that answers, which forwards them to the
/// leader.
fn spawn_producer(
    bootstrap: String,
    routed: bool,
    partition: u32,
    history: Shared<History>,
    acks_at: Shared<Vec<(u32, Instant)>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        let mut client = Client::connect(&bootstrap)
            .await?
            .with_request_timeout(REQUEST_TIMEOUT);
        if !routed {
            client = client.without_routing();
        }
        let policy = RetryPolicy {
            attempts: 300,
            backoff: Duration::from_millis(100),
        };
        let mut producer = client.producer(policy);
        let mut sequence = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let values: Vec<Vec<u8>> = (0..5)
                .map(|i| format!("p{partition}-{}", sequence + i).into_bytes())
                .collect();
            let records = values
                .iter()
                .enumerate()
                .map(|(i, v)| Record::keyed(format!("key-{}", i % 2), v.clone()))
                .collect();
            let answer = producer.send(TOPIC, Some(partition), records).await;
            let outcomes: Vec<Outcome> = match &answer {
                Ok(acks) => (0..5)
                    .map(|i| Outcome::Acked {
                        offset: acks[0].base_offset + i,
                    })
                    .collect(),
                Err(_) => vec![Outcome::Unknown; 5],
            };
            {
                let mut h = history.lock();
                for (i, (value, outcome)) in values.into_iter().zip(outcomes).enumerate() {
                    h.produces.push(Produce {
                        producer: partition,
                        sequence: sequence + i as u64,
                        key: format!("key-{}", i % 2),
                        value,
                        partition,
                        outcome,
                    });
                }
            }
            if answer.is_ok() {
                acks_at.lock().push((partition, Instant::now()));
            } else {
                producer = client.producer(policy);
            }
            sequence += 5;
        }
        anyhow::Ok(())
    })
}

/// One producer per partition ([`spawn_producer`]): odd partitions' go through a broker of
/// their own (rotated), which forwards to the leader; the others' straight to the leader.
fn spawn_producers(
    brokers: &[Broker],
    history: &Shared<History>,
    acks_at: &Shared<Vec<(u32, Instant)>>,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let urls: Vec<String> = brokers.iter().map(Broker::advertised_url).collect();
    (0..PARTITIONS)
        .map(|p| {
            let first = p as usize % urls.len();
            let bootstrap = [&urls[first..], &urls[..first]].concat().join(",");
            spawn_producer(
                bootstrap,
                p % 2 == 0,
                p,
                Arc::clone(history),
                Arc::clone(acks_at),
                Arc::clone(stop),
            )
        })
        .collect()
}

/// The faults a run draws from: `NEMESIS_FAULTS` (comma-separated), else [`DEFAULT_FAULTS`].
const FAULTS: [&str; 9] = [
    "kill",
    "pause",
    "term",
    "table",
    "lostfile",
    "journal",
    "partition",
    "latency",
    "blackhole",
];
/// The faults of a run by default: all of them.
const DEFAULT_FAULTS: &str = "kill,pause,term,table,lostfile,journal,partition,latency,blackhole";

/// One fault of `kind` on broker `victim`, healed before it returns.
async fn inject(
    brokers: &mut [Broker],
    proxy: &Toxiproxy,
    victim: usize,
    kind: &str,
    rng: &mut Rng,
) -> anyhow::Result<()> {
    let b = &mut brokers[victim];
    let name = format!("broker-{victim}");
    match kind {
        "partition" => {
            // Nothing reaches the broker (its connections closed, new ones refused) for
            // 1-5 s; what it sends still arrives (an asymmetric partition).
            proxy.set_enabled(&name, false)?;
            tokio::time::sleep(Duration::from_millis(1000 + rng.below(4000))).await;
            return proxy.set_enabled(&name, true);
        }
        "latency" => {
            // 50-300 ms more each way (jitter of half of it) for 2-6 s.
            let latency = 50 + rng.below(250);
            let attributes = serde_json::json!({ "latency": latency, "jitter": latency / 2 });
            proxy.add_toxic(&name, "latency", "latency", &attributes)?;
            tokio::time::sleep(Duration::from_millis(2000 + rng.below(4000))).await;
            return proxy.remove_toxic(&name, "latency");
        }
        "blackhole" => {
            // Connections to the broker stay open but pass nothing for 1-5 s, as when
            // packets are dropped.
            let attributes = serde_json::json!({ "timeout": 0 });
            proxy.add_toxic(&name, "blackhole", "timeout", &attributes)?;
            tokio::time::sleep(Duration::from_millis(1000 + rng.below(4000))).await;
            return proxy.remove_toxic(&name, "blackhole");
        }
        _ => {}
    }
    match kind {
        "kill" => {
            b.kill();
            tokio::time::sleep(Duration::from_millis(500 + rng.below(2500))).await;
        }
        "pause" => {
            b.signal("STOP")?;
            tokio::time::sleep(Duration::from_millis(1000 + rng.below(4000))).await;
            b.signal("CONT")?;
            return Ok(());
        }
        "term" => {
            tokio::task::block_in_place(|| b.terminate())?;
        }
        "table" => {
            // A records table's trailer damaged while the broker is down: it quarantines the
            // table and its replicas are repaired from their peers.
            b.kill();
            let tables = table_files(b.data_dir());
            if tables.is_empty() {
                println!("fault without effect: table of broker {victim} (no table yet)");
            } else {
                let i = rng.below(tables.len() as u64) as usize;
                damage_trailer(&tables[i])?;
            }
        }
        "lostfile" => {
            // A records table file deleted while the broker is down (a lost file): the
            // broker quarantines what pointed into it and its replicas are repaired.
            b.kill();
            let tables = table_files(b.data_dir());
            if tables.is_empty() {
                println!("fault without effect: lostfile of broker {victim} (no table yet)");
            } else {
                let i = rng.below(tables.len() as u64) as usize;
                std::fs::remove_file(&tables[i])?;
            }
        }
        "journal" => {
            // Its newest journal cut at a random point of its written part while it is down
            // (what it had fsynced after that point is gone).
            b.kill();
            let journal = newest_journal(b.data_dir())?;
            let written = journal_data_len(&journal)?;
            cut_file(&journal, rng.below(written.max(1)))?;
        }
        other => anyhow::bail!("unknown fault {other:?}; faults are {FAULTS:?}"),
    }
    let ready = b.restart_nowait()?;
    tokio::task::block_in_place(|| b.wait_ready(&ready))
}

/// Waits (up to 60 s) until every broker's replica of every partition has the same ends.
async fn converge(brokers: &[Broker]) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let mut agree = true;
        for p in 0..PARTITIONS {
            let mut ends = Vec::new();
            for b in brokers {
                ends.push(replica_ends(b, TOPIC, p).await.ok());
            }
            agree &= ends.iter().all(|e| e.is_some() && *e == ends[0]);
        }
        if agree {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the replicas did not converge within 60 s of healing"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Unavailability of one fault, per partition: from `started` until the partition
/// acknowledged a produce after it (each at most 60 s).
async fn until_every_partition_acked(
    acks_at: &Shared<Vec<(u32, Instant)>>,
    started: Instant,
) -> anyhow::Result<Vec<Duration>> {
    loop {
        let firsts: Vec<Option<Instant>> = (0..PARTITIONS)
            .map(|p| {
                acks_at
                    .lock()
                    .iter()
                    .filter(|(q, at)| *q == p && *at > started)
                    .map(|(_, at)| *at)
                    .min()
            })
            .collect();
        if let Some(firsts) = firsts.iter().copied().collect::<Option<Vec<_>>>() {
            return Ok(firsts.into_iter().map(|at| at - started).collect());
        }
        if started.elapsed() >= Duration::from_secs(60) {
            let silent: Vec<u32> = (0..PARTITIONS)
                .filter(|p| firsts[*p as usize].is_none())
                .collect();
            anyhow::bail!("no acknowledgement on partitions {silent:?} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to 120 s) until no broker has a replica being repaired after damage: until
/// then the last fault is not healed (such a replica does not vote, so faulting a second
/// broker would take a majority of the partition's voters away).
async fn until_repaired(brokers: &[Broker]) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let repairing = tokio::task::block_in_place(|| {
            brokers
                .iter()
                .map(|b| b.metric("weir_replica_repairing"))
                .collect::<anyhow::Result<Vec<f64>>>()
        })?;
        if repairing.iter().all(|r| *r == 0.0) {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "replicas still being repaired 120 s after the fault (per broker: {repairing:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The brokers' logs, into `NEMESIS_LOGS` when it is set.
fn write_logs(brokers: &[Broker]) -> anyhow::Result<()> {
    if let Ok(dir) = std::env::var("NEMESIS_LOGS") {
        std::fs::create_dir_all(&dir)?;
        for (i, b) in brokers.iter().enumerate() {
            std::fs::write(format!("{dir}/broker-{i}.log"), b.log_text())?;
        }
    }
    Ok(())
}

/// Every broker's records of every partition, into `history`.
async fn read_replicas(brokers: &[Broker], history: &mut History) -> anyhow::Result<()> {
    for b in brokers {
        let mut partitions = BTreeMap::new();
        for p in 0..PARTITIONS {
            partitions.insert(p, replica_records(b, TOPIC, p, 0).await?);
        }
        history.replicas.insert(b.addr.clone(), partitions);
    }
    Ok(())
}

/// A run's settings, from the environment `tests/fault/nemesis` sets.
struct Settings {
    minutes: f64,
    seed: u64,
    kinds: Vec<String>,
}

impl Settings {
    fn from_env() -> anyhow::Result<Self> {
        let minutes: f64 = std::env::var("NEMESIS_MINUTES")
            .ok()
            .and_then(|m| m.parse().ok())
            .unwrap_or(1.0);
        let seed: u64 = std::env::var("NEMESIS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        let kinds: Vec<String> = std::env::var("NEMESIS_FAULTS")
            .unwrap_or_else(|_| DEFAULT_FAULTS.into())
            .split(',')
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .collect();
        anyhow::ensure!(!kinds.is_empty(), "no faults chosen; faults are {FAULTS:?}");
        Ok(Self {
            minutes,
            seed,
            kinds,
        })
    }
}

/// What the faults cost: their count by kind, each one's unavailability and time to heal.
#[derive(Default)]
struct FaultLog {
    by_kind: BTreeMap<String, u64>,
    unavailable_ms: Vec<u64>,
    /// From each fault's start until no replica is being repaired (ms).
    healed_ms: Vec<u64>,
}

/// Longest a fault takes from its start until its broker is back and ready: 3 minutes (a
/// stop of up to 60 s and a start of up to 30 s, with room).
const FAULT_LIMIT: Duration = Duration::from_secs(180);

/// Injects faults one at a time until `deadline`, recording each in `history.faults`; each
/// is healed (its broker back, acknowledging on every partition, no replica being repaired)
/// before the next.
async fn inject_until(
    deadline: Instant,
    brokers: &mut [Broker],
    proxy: &Toxiproxy,
    settings: &Settings,
    history: &Shared<History>,
    acks_at: &Shared<Vec<(u32, Instant)>>,
    run_started: Instant,
) -> anyhow::Result<FaultLog> {
    let mut rng = Rng(settings.seed.max(1));
    let kinds = &settings.kinds;
    let mut log = FaultLog::default();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1000 + rng.below(2000))).await;
        let victim = rng.below(3) as usize;
        let kind = kinds[rng.below(kinds.len() as u64) as usize].clone();
        let started = Instant::now();
        let start_ms = workloads::ms(run_started);
        let what = format!("{kind} of broker {victim} at {start_ms} ms");
        bounded(
            &what,
            FAULT_LIMIT,
            inject(brokers, proxy, victim, &kind, &mut rng),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
        history
            .lock()
            .faults
            .push((start_ms, workloads::ms(run_started)));
        *log.by_kind.entry(kind.clone()).or_default() += 1;
        let per_partition = until_every_partition_acked(acks_at, started)
            .await
            .map_err(|e| anyhow::anyhow!("after a {kind} of broker {victim}: {e}"))?;
        let waited = per_partition.iter().copied().max().unwrap_or_default();
        log.unavailable_ms.push(waited.as_millis() as u64);
        until_repaired(brokers)
            .await
            .map_err(|e| anyhow::anyhow!("after a {kind} of broker {victim}: {e}"))?;
        log.healed_ms.push(started.elapsed().as_millis() as u64);
        if waited > Duration::from_secs(10) {
            let at = started.duration_since(run_started);
            let per_partition: Vec<String> = per_partition
                .iter()
                .map(|w| format!("{:.1}", w.as_secs_f64()))
                .collect();
            println!(
                "slow fault: {kind} of broker {victim} at {at:?}: {waited:?} (by partition, s: {})",
                per_partition.join(", ")
            );
        }
    }
    log.unavailable_ms.sort_unstable();
    log.healed_ms.sort_unstable();
    Ok(log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by tests/fault/nemesis --minutes M"]
async fn nemesis() -> anyhow::Result<()> {
    let settings = Settings::from_env()?;
    let proxy = Toxiproxy::start()?;
    // Small memtables: records reach table files within seconds, so the table faults have
    // tables to damage in a short run too.
    let mut brokers = Broker::start_cluster_behind(&proxy, 3, &["--memtable-size", "1MiB"])?;
    let result = drive(&mut brokers, &proxy, &settings).await;
    write_logs(&brokers)?;
    result
}

/// The run on a started cluster: workloads, faults, healing, the check; prints the summary.
async fn drive(
    brokers: &mut [Broker],
    proxy: &Toxiproxy,
    settings: &Settings,
) -> anyhow::Result<()> {
    let client = brokers[0]
        .client()
        .await?
        .with_request_timeout(REQUEST_TIMEOUT);
    client
        .create_topic(
            TOPIC,
            &TopicConfig::new(PARTITIONS).with_replication_factor(3),
        )
        .await?;
    let all = brokers
        .iter()
        .map(Broker::advertised_url)
        .collect::<Vec<_>>()
        .join(",");
    workloads::create_groups(&client).await?;
    let history: Shared<History> = Shared::default();
    let acks_at: Shared<Vec<(u32, Instant)>> = Shared::default();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_consumers = Arc::new(AtomicBool::new(false));
    let run_started = Instant::now();
    let mut consumers = workloads::spawn_members(&all, &history, run_started, &stop_consumers);
    consumers.push(workloads::spawn_committed_poller(
        &all,
        &history,
        run_started,
        &stop_consumers,
    ));
    let admin = workloads::spawn_admin(&all, &history, &stop);
    let producers = spawn_producers(brokers, &history, &acks_at, &stop);

    let deadline = run_started + Duration::from_secs_f64(settings.minutes * 60.0);
    let faults = inject_until(
        deadline,
        brokers,
        proxy,
        settings,
        &history,
        &acks_at,
        run_started,
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    // A workload ends within its last request's retries.
    bounded(
        "stopping the producers and the admin workload",
        STOP_LIMIT,
        async {
            for p in producers {
                p.await??;
            }
            admin.await?
        },
    )
    .await?;

    bounded("converging", Duration::from_secs(90), converge(brokers)).await?;
    let ends = bounded("reading the ends", STOP_LIMIT, async {
        let mut ends = BTreeMap::new();
        for p in 0..PARTITIONS {
            ends.insert(p, replica_ends(&brokers[0], TOPIC, p).await?.1);
        }
        anyhow::Ok(ends)
    })
    .await?;
    let drained = bounded(
        "draining the groups",
        Duration::from_secs(90),
        workloads::until_groups_consumed_all(&client, &ends),
    )
    .await;
    stop_consumers.store(true, Ordering::Relaxed);
    bounded("stopping the consumers", STOP_LIMIT, async {
        for c in consumers {
            c.await??;
        }
        anyhow::Ok(())
    })
    .await?;
    let drained = drained?;
    let mut history = std::mem::take(&mut *history.lock());
    bounded("reading every replica", STOP_LIMIT, async {
        read_replicas(brokers, &mut history).await?;
        history.topics = workloads::admin_topics(&client).await?;
        anyhow::Ok(())
    })
    .await?;
    if let Ok(path) = std::env::var("NEMESIS_HISTORY") {
        std::fs::write(&path, serde_json::to_vec(&history)?)?;
    }
    let report = check(&history, PERSIST_WINDOW_MS);
    for v in report.violations.iter().take(20) {
        println!("violation: {v:?}");
    }
    println!("{}", summary(settings, &faults, &report, &history, drained));
    anyhow::ensure!(report.ok(), "{} violations", report.violations.len());
    Ok(())
}

/// Longest the workloads take to stop once told, and a healed cluster to answer a read: 2
/// minutes (a workload's last call may wait [`REQUEST_TIMEOUT`] several times).
const STOP_LIMIT: Duration = Duration::from_secs(120);

/// The JSON summary, the run's last line.
fn summary(
    settings: &Settings,
    faults: &FaultLog,
    report: &weir_fault::Report,
    history: &History,
    drained: Duration,
) -> serde_json::Value {
    let (unavailable, healed) = (&faults.unavailable_ms, &faults.healed_ms);
    serde_json::json!({
        "minutes": settings.minutes,
        "seed": settings.seed,
        "faults": faults.by_kind,
        "acknowledged": report.acknowledged,
        "lost": report.lost,
        "changed": report.changed,
        "duplicated": report.duplicated,
        "divergent": report.divergent,
        "reordered": report.reordered,
        "offset_regressions": report.offset_regressions,
        "redelivered_after_ack": report.redelivered_after_ack,
        "admin_lost": report.admin_lost,
        "group_events": history.groups.len(),
        "admin_requests": history.admin.len(),
        "groups_drained_ms": drained.as_millis() as u64,
        "unavailable_ms": {
            "p50": unavailable.get(unavailable.len() / 2),
            "max": unavailable.last(),
        },
        "healed_ms": {
            "p50": healed.get(healed.len() / 2),
            "max": healed.last(),
        },
    })
}

/// Checks a history kept by an earlier run (`tests/fault/nemesis --check FILE`): the
/// checker's verdict and its violations, without a cluster.
#[test]
#[ignore = "run by tests/fault/nemesis --check FILE"]
fn check_saved_history() -> anyhow::Result<()> {
    let path = std::env::var("NEMESIS_CHECK")
        .map_err(|_| anyhow::anyhow!("NEMESIS_CHECK names no history file"))?;
    let history: History = serde_json::from_slice(&std::fs::read(&path)?)?;
    let report = check(&history, PERSIST_WINDOW_MS);
    for v in report.violations.iter().take(20) {
        println!("violation: {v:?}");
    }
    let mut counts = serde_json::to_value(&report)?;
    if let Some(map) = counts.as_object_mut() {
        map.remove("violations");
    }
    println!("{counts}");
    anyhow::ensure!(report.ok(), "{} violations", report.violations.len());
    Ok(())
}
