//! Crash safety: SIGKILL at random moments while a producer pipelines batches. After every
//! restart each acknowledged record is at the offset it was acknowledged with, no offset is
//! acknowledged twice or served with two different records, and a batch is either wholly
//! visible or not at all.
//!
//! With `truncate_every`, the newest journal file is also cut at a random length after some
//! kills (a torn or damaged journal): the acknowledged records it held are then lost, but
//! only as whole ranges that reads answer with DATA_LOSS, and their offsets are never
//! acknowledged again (the log end checkpoint, `broker/src/log/checkpoint.rs`).

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use tonic::Code;
use weir_client::{Client, FetchOptions, Record, TopicConfig};
use weir_tests::Broker;

const PARTITIONS: u32 = 3;
const RECORDS_PER_REQUEST: usize = 40;

/// A small deterministic generator (xorshift64*), seeded and printed for reproduction.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

#[derive(Default, Clone)]
struct Ledger {
    /// request id → (partition, record count) of every request sent.
    sent: HashMap<String, (u32, usize)>,
    /// (partition, offset) → value of every acknowledged record.
    acked: BTreeMap<(u32, u64), Vec<u8>>,
    /// Offsets acknowledged a second time (must stay empty).
    acked_twice: Vec<(u32, u64)>,
}

/// Sends requests until the broker dies; records what was sent and acknowledged.
async fn produce_until_error(client: Client, round: u64, ledger: Arc<Mutex<Ledger>>) {
    let Ok((mut tx, mut rx)) = client.produce_stream(8).await else {
        return;
    };
    let sender_ledger = Arc::clone(&ledger);
    let sender = tokio::spawn(async move {
        for seq in 0u64.. {
            let id = format!("r{round}q{seq}");
            let partition = (seq % u64::from(PARTITIONS)) as u32;
            let records: Vec<Record> = (0..RECORDS_PER_REQUEST)
                .map(|i| Record::value(format!("{id}:{i}:{}", "x".repeat(i * 7))))
                .collect();
            if let Ok(mut l) = sender_ledger.lock() {
                l.sent.insert(id.clone(), (partition, RECORDS_PER_REQUEST));
            }
            if tx.send("crash", Some(partition), records).await.is_err() {
                break;
            }
        }
    });
    // Requests are answered in order, so the n-th response belongs to the n-th request.
    let mut seq = 0u64;
    while let Some(answer) = rx.next().await {
        let Ok(acks) = answer.and_then(|a| a.result) else {
            break;
        };
        let id = format!("r{round}q{seq}");
        let mut l = ledger.lock().expect("ledger");
        for ack in acks {
            for i in 0..ack.record_count {
                let value = format!("{id}:{i}:{}", "x".repeat(i as usize * 7));
                let at = (ack.partition, ack.base_offset + u64::from(i));
                if l.acked.insert(at, value.into_bytes()).is_some() {
                    l.acked_twice.push(at);
                }
            }
        }
        seq += 1;
    }
    sender.abort();
}

/// What one pass over every partition found.
#[derive(Default, PartialEq, Eq)]
struct Stored {
    /// (partition, offset) → value of every record served.
    records: BTreeMap<(u32, u64), Vec<u8>>,
    /// Ranges answered with DATA_LOSS: (partition, first offset, first offset after).
    lost: Vec<(u32, u64, u64)>,
    /// partition → its earliest stored offset when read (above 0 once retention deleted).
    earliest: BTreeMap<u32, u64>,
}

impl Stored {
    fn is_lost(&self, partition: u32, offset: u64) -> bool {
        self.lost
            .iter()
            .any(|&(p, from, to)| p == partition && (from..to).contains(&offset))
    }
}

/// The range named by a missing-records error: `offsets A..B of t/p are missing …`.
fn missing_range(message: &str) -> Option<(u64, u64)> {
    let rest = message.split("offsets ").nth(1)?;
    let (range, _) = rest.split_once(' ')?;
    let (from, to) = range.split_once("..")?;
    Some((from.parse().ok()?, to.parse().ok()?))
}

/// Reads every partition from its earliest stored offset to its end, stepping over ranges
/// answered with DATA_LOSS (each must name its range, starting where the read was).
/// Offsets are dense except over the `accepted` ranges `(partition, from, to)`, which reads
/// step over.
async fn read_all(client: &Client, accepted: &[(u32, u64, u64)]) -> anyhow::Result<Stored> {
    let mut stored = Stored::default();
    let topic = client.describe_topic("crash").await?;
    for p in 0..PARTITIONS {
        let earliest = topic
            .partitions
            .iter()
            .find(|info| info.partition == p)
            .map(|info| info.earliest_offset)
            .ok_or_else(|| anyhow::anyhow!("partition {p} is not described"))?;
        stored.earliest.insert(p, earliest);
        let mut offset = earliest;
        loop {
            let options = FetchOptions {
                max_bytes: Some(4 << 20),
                ..FetchOptions::default()
            };
            match client.fetch("crash", p, offset, options).await {
                Ok(resp) if resp.records.is_empty() => break,
                Ok(resp) => {
                    for r in resp.records {
                        while let Some(&(_, _, to)) = accepted
                            .iter()
                            .find(|&&(ap, from, _)| ap == p && from == offset && r.offset > offset)
                        {
                            offset = to;
                        }
                        assert_eq!(
                            r.offset, offset,
                            "partition {p}: offsets are dense outside missing ranges"
                        );
                        stored
                            .records
                            .insert((p, r.offset), r.record.value.to_vec());
                        offset += 1;
                    }
                }
                Err(e) if e.code() == Some(Code::DataLoss) => {
                    let message = e.to_string();
                    let (from, to) = missing_range(&message).ok_or_else(|| {
                        anyhow::anyhow!("DATA_LOSS without the missing range: {message}")
                    })?;
                    assert_eq!(from, offset, "the missing range starts where the read was");
                    assert!(to > from, "{message}");
                    stored.lost.push((p, from, to));
                    offset = to;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(stored)
}

/// Checks one pass against the ledger and against everything served before; returns how
/// many acknowledged records are in missing ranges.
fn check(ledger: &Ledger, stored: &Stored, served: &mut BTreeMap<(u32, u64), Vec<u8>>) -> usize {
    assert!(
        ledger.acked_twice.is_empty(),
        "offsets acknowledged twice: {:?}",
        &ledger.acked_twice[..ledger.acked_twice.len().min(10)]
    );
    let mut lost = 0;
    for (&(p, o), value) in &ledger.acked {
        if o < stored.earliest.get(&p).copied().unwrap_or(0) {
            // Deleted by the topic's size limit (oldest first).
            continue;
        }
        if let Some(v) = stored.records.get(&(p, o)) {
            assert_eq!(v, value, "acknowledged record {p}/{o} changed");
        } else {
            assert!(
                stored.is_lost(p, o),
                "acknowledged record {p}/{o} is gone without DATA_LOSS"
            );
            lost += 1;
        }
    }
    for (at, value) in &stored.records {
        if let Some(before) = served.insert(*at, value.clone()) {
            assert_eq!(
                &before, value,
                "offset {at:?} served with two different records"
            );
        }
    }
    // Whole batches only: every request present has all of its records, contiguous and
    // in order (missing ranges cover whole batches, so they never split one).
    for p in 0..PARTITIONS {
        let records: Vec<&Vec<u8>> = stored
            .records
            .range((p, 0)..(p + 1, 0))
            .map(|(_, v)| v)
            .collect();
        let mut i = 0;
        while i < records.len() {
            let text = String::from_utf8_lossy(records[i]).into_owned();
            let id = text.split(':').next().unwrap_or_default().to_owned();
            let (partition, count) = *ledger
                .sent
                .get(&id)
                .unwrap_or_else(|| panic!("stored record {text:?} was never sent"));
            assert_eq!(partition, p);
            for k in 0..count {
                let v = records
                    .get(i + k)
                    .unwrap_or_else(|| panic!("request {id} is only partly visible"));
                assert!(
                    String::from_utf8_lossy(v).starts_with(&format!("{id}:{k}:")),
                    "request {id} is not contiguous at record {k}"
                );
            }
            i += count;
        }
    }
    lost
}

/// The lines of a broker's log from its last start on (its first line, "file descriptors
/// shared out"; all when none).
fn since_last_start(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let from = lines
        .iter()
        .rposition(|l| l.contains("file descriptors shared out"))
        .unwrap_or(0);
    lines[from..].join("\n")
}

/// The run's seed: `WEIR_CRASH_SEED`, else the clock (odd, as xorshift needs a nonzero
/// state).
fn seed() -> anyhow::Result<u64> {
    if let Some(seed) = std::env::var("WEIR_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return Ok(seed);
    }
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1)
}

/// Cuts the newest journal file in `data_dir` at a random length; returns its length
/// before and after.
fn truncate_newest_journal(data_dir: &Path, rng: &mut Rng) -> anyhow::Result<(u64, u64)> {
    let path = weir_tests::newest_journal(data_dir)?;
    let len = std::fs::metadata(&path)?.len();
    let keep = rng.below(len);
    weir_tests::cut_file(&path, keep)?;
    Ok((len, keep))
}

/// A crash run: `rounds` SIGKILLs under load; with `truncate_every: Some(n)` the newest
/// journal is cut at a random length after every n-th kill.
struct Torture<'a> {
    rounds: u64,
    truncate_every: Option<u64>,
    broker_args: &'a [&'a str],
    /// The topic's size limit (bytes over all partitions; the oldest records are deleted
    /// past it), if any.
    max_bytes: Option<u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_repeated_sigkill() -> anyhow::Result<()> {
    Torture {
        rounds: 6,
        truncate_every: None,
        broker_args: &[],
        max_bytes: None,
    }
    .run()
    .await
}

/// The same with 1 MiB memtables, so that records are flushed to tables and blob files
/// (and compacted) between the kills, not only replayed from the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_repeated_sigkill_across_flushes() -> anyhow::Result<()> {
    Torture {
        rounds: 6,
        truncate_every: None,
        broker_args: &["--memtable-size", "1MiB", "--max-write-buffer-size", "4MiB"],
        max_bytes: None,
    }
    .run()
    .await
}

/// The same with every batch in the segment store (`--segment-min-batch 0`: this test's
/// batches are a few KiB, below the default) and segments closed at 1 MiB, so that kills
/// land around segment rolls: a round that filled a segment used to drop the frames it had
/// appended to it, and its records read as lost after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_repeated_sigkill_in_the_segment_store() -> anyhow::Result<()>
{
    Torture {
        rounds: 6,
        truncate_every: None,
        broker_args: &["--segment-min-batch", "0", "--segment-size", "1MiB"],
        max_bytes: None,
    }
    .run()
    .await
}

/// The same in the segment store with a size limit of 3 MiB (1 MiB per partition) and
/// 1 MiB segments: retention deletes segments all along, keeps one per partition as a
/// spare and writes the next segment over it, so kills land around recycled segments.
/// Every acknowledged record at or after its partition's earliest offset reads back
/// unchanged, and no offset is served with two records across the restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_repeated_sigkill_over_recycled_segments() -> anyhow::Result<()>
{
    Torture {
        rounds: 6,
        truncate_every: None,
        broker_args: &["--segment-min-batch", "0", "--segment-size", "1MiB"],
        max_bytes: Some(3 * 1024 * 1024),
    }
    .run()
    .await
}

/// A topic outlives the loss of its journal: its creation (in the log's metadata and in the
/// metadata group's Raft log) is flushed to tables. In the segment store the records
/// keyspace holds only pointers and nothing flushed the metadata, so a topic's creation
/// stayed in the journal alone, and a journal cut short after a kill lost the topic (seen
/// in `a_truncated_journal_never_gives_an_offset_twice` with every batch in segments:
/// `NOT_FOUND: topic "crash" does not exist`), or the metadata group's entries, after
/// which a broker without peers never became ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_outlives_its_newest_journal_cut_to_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_with(dir.path(), &["--segment-min-batch", "0"])?;
    let client = broker.client().await?;
    client.create_topic("kept", &TopicConfig::new(2)).await?;
    client
        .produce("kept", Some(0), vec![Record::value("before the kill")])
        .await?;
    // The metadata's tables are flushed in the background.
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.kill();
    weir_tests::cut_file(&weir_tests::newest_journal(dir.path())?, 0)?;
    broker.restart()?;
    let client = broker.client().await?;
    let topic = client.describe_topic("kept").await?;
    assert_eq!(topic.partitions.len(), 2, "{topic:?}");
    let acks = client
        .produce("kept", Some(1), vec![Record::value("after the restart")])
        .await?;
    assert_eq!(acks[0].base_offset, 0);
    Ok(())
}

/// The newest journal cut at random lengths after kills: acknowledged records it held are
/// lost only as ranges answered with DATA_LOSS, never changed, and their offsets are never
/// acknowledged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_journal_never_gives_an_offset_twice() -> anyhow::Result<()> {
    Torture {
        rounds: 8,
        truncate_every: Some(2),
        broker_args: &["--memtable-size", "1MiB", "--max-write-buffer-size", "4MiB"],
        max_bytes: None,
    }
    .run()
    .await
}

/// The torture run of the storage-integrity work: 100 SIGKILLs under load with 1 MiB
/// memtables, the newest journal cut at a random length after every tenth. Minutes long, so
/// run by hand: `cargo test -p weir-tests --test crash_safety -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; run by hand (see the doc comment)"]
async fn torture_100_sigkills_cutting_every_tenth_journal() -> anyhow::Result<()> {
    Torture {
        rounds: 100,
        truncate_every: Some(10),
        broker_args: &["--memtable-size", "1MiB", "--max-write-buffer-size", "4MiB"],
        max_bytes: None,
    }
    .run()
    .await
}

impl Torture<'_> {
    async fn run(self) -> anyhow::Result<()> {
        let seed = seed()?;
        println!(
            "crash_safety seed {seed} (WEIR_CRASH_SEED), {} rounds, truncate every {:?}, broker flags {:?}",
            self.rounds, self.truncate_every, self.broker_args
        );
        let mut rng = Rng(seed);
        let dir = tempfile::tempdir()?;
        let mut broker = Broker::start_with(dir.path(), self.broker_args)?;
        let mut config = TopicConfig::new(PARTITIONS);
        config.max_bytes = self.max_bytes;
        broker
            .client()
            .await?
            .create_topic("crash", &config)
            .await?;
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let mut served = BTreeMap::new();
        let mut last_lost_ranges = Vec::new();
        let mut last_records = BTreeMap::new();
        let mut last_earliest = BTreeMap::new();
        let mut last_acked = 0;
        let mut lost_in_all = 0;
        for round in 0..self.rounds {
            let client = broker.client().await?;
            let producer = tokio::spawn(produce_until_error(client, round, Arc::clone(&ledger)));
            // Once this round has an acknowledgement (the broker is serving; on a loaded
            // machine that can take a while), a random while longer, then the kill.
            let serving = std::time::Instant::now();
            while ledger.lock().expect("ledger").acked.len() == last_acked
                && serving.elapsed() < Duration::from_secs(10)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
            broker.kill();
            producer.await?;
            let truncated = match self.truncate_every {
                Some(n) if round % n == n - 1 => {
                    Some(truncate_newest_journal(dir.path(), &mut rng)?)
                }
                _ => None,
            };
            broker.restart()?;
            let client = broker.client().await?;
            // The producer has stopped; check a copy so no lock is held across awaits.
            let l = ledger.lock().expect("ledger").clone();
            let stored = read_all(&client, &[]).await.map_err(|e| {
                let log = since_last_start(&broker.log_text());
                anyhow::anyhow!("after round {round}, journal cut {truncated:?}: {e}; log:\n{log}")
            })?;
            let lost = check(&l, &stored, &mut served);
            println!(
                "round {round}: {} acknowledged in all, {} stored, {lost} acknowledged in missing ranges {:?}, journal cut {truncated:?}",
                l.acked.len(),
                stored.records.len(),
                stored.lost
            );
            assert!(
                l.acked.len() > last_acked,
                "round {round} acknowledged nothing new; the test proved nothing"
            );
            if truncated.is_none() {
                assert_eq!(
                    stored.lost, last_lost_ranges,
                    "records went missing in a round without damage"
                );
            }
            lost_in_all = lost_in_all.max(lost);
            last_acked = l.acked.len();
            last_lost_ranges = stored.lost;
            last_records = stored.records;
            last_earliest = stored.earliest;
        }
        if self.max_bytes.is_some() {
            assert!(
                last_earliest.values().all(|&e| e > 0),
                "the size limit deleted nothing in some partition ({last_earliest:?}); the test proved nothing"
            );
        }
        if self.truncate_every.is_some() {
            assert!(
                lost_in_all > 0,
                "no cut journal lost an acknowledged record; the test proved nothing (seed {seed})"
            );
            // Accepting the loss finds exactly the ranges reads reported; then reads step
            // over them and everything else is unchanged.
            let client = broker.client().await?;
            let accepted: Vec<(u32, u64, u64)> = client
                .repair_topic("crash", &[])
                .await?
                .iter()
                .map(|r| (r.partition, r.from, r.to))
                .collect();
            assert_eq!(
                accepted, last_lost_ranges,
                "repair accepts what reads reported"
            );
            let after = read_all(&client, &accepted).await?;
            assert!(after.lost.is_empty(), "{:?}", after.lost);
            assert_eq!(after.records, last_records, "nothing else changed");
        }
        Ok(())
    }
}
