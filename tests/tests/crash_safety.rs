//! Crash safety: SIGKILL at random moments while a producer pipelines batches. After every
//! restart each acknowledged record is at the offset it was acknowledged with, offsets are
//! dense, and a batch is either wholly visible or not at all.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use weir_client::{Client, FetchOptions, Record, TopicConfig};
use weir_tests::Broker;

const PARTITIONS: u32 = 3;
const RECORDS_PER_REQUEST: usize = 40;
const ROUNDS: u64 = 6;

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
        self.next() % n
    }
}

#[derive(Default, Clone)]
struct Ledger {
    /// request id → (partition, record count) of every request sent.
    sent: HashMap<String, (u32, usize)>,
    /// (partition, offset) → value of every acknowledged record.
    acked: BTreeMap<(u32, u64), Vec<u8>>,
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
                l.acked.insert(
                    (ack.partition, ack.base_offset + u64::from(i)),
                    value.into_bytes(),
                );
            }
        }
        seq += 1;
    }
    sender.abort();
}

/// Reads every record of every partition and checks the ledger against it.
async fn verify(client: &Client, ledger: &Ledger) -> anyhow::Result<u64> {
    let mut total = 0;
    for p in 0..PARTITIONS {
        let mut offset = 0u64;
        let mut stored: Vec<(u64, Vec<u8>)> = Vec::new();
        loop {
            let resp = client
                .fetch(
                    "crash",
                    p,
                    offset,
                    FetchOptions {
                        max_bytes: Some(4 << 20),
                        ..FetchOptions::default()
                    },
                )
                .await?;
            if resp.records.is_empty() {
                break;
            }
            for r in resp.records {
                assert_eq!(r.offset, offset, "partition {p}: offsets must be dense");
                stored.push((r.offset, r.record.value.to_vec()));
                offset += 1;
            }
        }
        for ((ap, ao), value) in ledger.acked.range((p, 0)..(p + 1, 0)) {
            let got = stored.get(*ao as usize).map(|(_, v)| v);
            assert_eq!(
                got,
                Some(value),
                "acknowledged record {ap}/{ao} is missing or different after restart"
            );
        }
        // Whole batches only: group stored records by request id; every request present
        // has all of its records, contiguous and in order.
        let mut i = 0;
        while i < stored.len() {
            let text = String::from_utf8_lossy(&stored[i].1).into_owned();
            let id = text.split(':').next().unwrap_or_default().to_owned();
            let (partition, count) = *ledger
                .sent
                .get(&id)
                .unwrap_or_else(|| panic!("stored record {text:?} was never sent"));
            assert_eq!(partition, p);
            for k in 0..count {
                let (_, v) = stored
                    .get(i + k)
                    .unwrap_or_else(|| panic!("request {id} is only partly visible"));
                assert!(
                    String::from_utf8_lossy(v).starts_with(&format!("{id}:{k}:")),
                    "request {id} is not contiguous at record {k}"
                );
            }
            i += count;
        }
        total += stored.len() as u64;
    }
    Ok(total)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_repeated_sigkill() -> anyhow::Result<()> {
    sigkill_rounds(&[]).await
}

/// The same with 1 MiB memtables, so that records are flushed to tables and blob files
/// (and compacted) between the kills, not only replayed from the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_repeated_sigkill_across_flushes() -> anyhow::Result<()> {
    sigkill_rounds(&["--memtable-size", "1MiB", "--max-write-buffer-size", "4MiB"]).await
}

async fn sigkill_rounds(broker_args: &[&str]) -> anyhow::Result<()> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        | 1;
    println!("crash_safety seed {seed}, broker flags {broker_args:?}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_with(dir.path(), broker_args)?;
    broker
        .client()
        .await?
        .create_topic("crash", &TopicConfig::new(PARTITIONS))
        .await?;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut last_total = 0;
    for round in 0..ROUNDS {
        let client = broker.client().await?;
        let producer = tokio::spawn(produce_until_error(client, round, Arc::clone(&ledger)));
        tokio::time::sleep(Duration::from_millis(100 + rng.below(400))).await;
        broker.kill();
        producer.await?;
        broker.restart()?;
        let client = broker.client().await?;
        // The producer has stopped; verify a copy so no lock is held across awaits.
        let l = ledger.lock().expect("ledger").clone();
        let acked = l.acked.len();
        let total = verify(&client, &l).await?;
        println!("round {round}: {acked} acknowledged in all, {total} stored");
        assert!(
            total > last_total,
            "round {round} stored nothing new; the test proved nothing"
        );
        assert!(total as usize >= acked);
        last_total = total;
    }
    Ok(())
}
