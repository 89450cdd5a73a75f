//! Corruption: a stored batch whose bytes are altered is detected (DATA_LOSS, logged with
//! topic, partition and offset), never returned as data, and the broker keeps serving the
//! other partitions.
//!
//! The test stops the broker, alters one byte of a stored batch value through fjall (the
//! storage engine's own block checksums would catch damage to its files; this reaches the
//! layer above, as a bug or a bad write path would), and restarts the broker.

use std::path::Path;

use fjall::{Database, KeyspaceCreateOptions, PersistMode};
use tonic::Code;
use weir_client::{Client, FetchOptions, Record, TopicConfig};
use weir_tests::{Broker, damage_trailer, table_files};

/// A fetch that takes every record of these small partitions at once.
const WHOLE: FetchOptions = FetchOptions {
    max_bytes: Some(16 << 20),
    max_records: None,
    max_wait: std::time::Duration::ZERO,
};

const BATCHES: u64 = 5;
const PER_BATCH: u64 = 10;

async fn fill(client: &Client) -> anyhow::Result<()> {
    client.create_topic("corrupt", &TopicConfig::new(2)).await?;
    for p in 0..2 {
        for b in 0..BATCHES {
            let records = (0..PER_BATCH)
                .map(|i| Record::value(format!("p{p} b{b} r{i}")))
                .collect();
            client.produce("corrupt", Some(p), records).await?;
        }
    }
    Ok(())
}

/// Flips the last byte of the batch of `topic`/`partition` at `base_offset`.
fn flip_byte(data_dir: &Path, topic: &str, partition: u32, base_offset: u64) -> anyhow::Result<()> {
    with_db(data_dir, topic, |_, records, id| {
        let key = record_key(id, partition, base_offset);
        let mut value = records
            .get(&key)?
            .ok_or_else(|| anyhow::anyhow!("no batch at {partition}/{base_offset}"))?
            .to_vec();
        let last = value.len() - 1;
        value[last] ^= 0x01;
        records.insert(key, value)?;
        Ok(())
    })
}

/// A broker on a new directory with [`fill`]'s records, stopped gracefully (exit 0) so
/// its data can be damaged.
async fn filled_and_stopped() -> anyhow::Result<(tempfile::TempDir, Broker)> {
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_in(dir.path())?;
    fill(&broker.client().await?).await?;
    assert_eq!(broker.terminate()?, Some(0), "graceful stop exits 0");
    Ok((dir, broker))
}

/// Opens the broker's database (the broker stopped) and calls `change` with its keyspaces
/// and the id of `topic`.
fn with_db(
    data_dir: &Path,
    topic: &str,
    change: impl FnOnce(&fjall::Keyspace, &fjall::Keyspace, u32) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let db = Database::builder(data_dir).open()?;
    let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
    let records = db.keyspace("records", KeyspaceCreateOptions::default)?;
    let topic_meta = meta
        .get(format!("t/{topic}"))?
        .ok_or_else(|| anyhow::anyhow!("topic metadata missing"))?;
    let id = serde_json::from_slice::<serde_json::Value>(&topic_meta)?["id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("topic id missing"))? as u32;
    change(&meta, &records, id)?;
    db.persist(PersistMode::SyncAll)?;
    Ok(())
}

fn record_key(id: u32, partition: u32, offset: u64) -> Vec<u8> {
    [
        &id.to_be_bytes()[..],
        &partition.to_be_bytes(),
        &offset.to_be_bytes(),
    ]
    .concat()
}

fn values(records: &[weir_client::StoredRecord]) -> Vec<(u64, String)> {
    records
        .iter()
        .map(|r| (r.offset, r.record.text().into_owned()))
        .collect()
}

fn expect_data_loss<T: std::fmt::Debug>(r: Result<T, weir_client::Error>, needle: &str) {
    let err = r.expect_err("a corrupt batch must not be returned");
    assert_eq!(err.code(), Some(Code::DataLoss), "{err}");
    assert!(
        err.to_string().contains(needle),
        "{err} should contain {needle:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_batch_in_the_middle_is_refused_and_other_data_keeps_flowing() -> anyhow::Result<()>
{
    let (dir, mut broker) = filled_and_stopped().await?;
    flip_byte(dir.path(), "corrupt", 0, 2 * PER_BATCH)?;
    broker.restart()?;
    let client = broker.client().await?;

    // Reading from the start stops before the bad batch.
    let head = client.fetch("corrupt", 0, 0, WHOLE).await?;
    let offsets: Vec<u64> = head.records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (0..2 * PER_BATCH).collect::<Vec<_>>());

    // At and inside the bad batch: DATA_LOSS naming topic, partition and offset.
    expect_data_loss(
        client
            .fetch("corrupt", 0, 20, FetchOptions::default())
            .await,
        "corrupt/0 at offset 20",
    );
    expect_data_loss(
        client
            .fetch("corrupt", 0, 25, FetchOptions::default())
            .await,
        "CRC32C mismatch",
    );
    let logs = broker.log_text();
    assert!(
        logs.lines().any(|l| l.contains("corrupt batch refused")
            && l.contains("\"topic\":\"corrupt\"")
            && l.contains("\"partition\":0")
            && l.contains("\"offset\":20")),
        "no error log line names topic, partition and offset:\n{logs}"
    );

    // After it, and on the other partition, everything is served.
    let tail = client.fetch("corrupt", 0, 3 * PER_BATCH, WHOLE).await?;
    assert_eq!(tail.records.len() as u64, 2 * PER_BATCH);
    let other = client.fetch("corrupt", 1, 0, WHOLE).await?;
    assert_eq!(other.records.len() as u64, BATCHES * PER_BATCH);
    let acks = client
        .produce("corrupt", Some(0), vec![Record::value("after")])
        .await?;
    assert_eq!(acks[0].base_offset, BATCHES * PER_BATCH);

    // Accepting the loss deletes the bad batch; reads step over it from then on.
    let lost = client.repair_topic("corrupt", &[]).await?;
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(
        (
            lost[0].partition,
            lost[0].from,
            lost[0].to,
            lost[0].reason.as_str()
        ),
        (0, 2 * PER_BATCH, 3 * PER_BATCH, "damaged")
    );
    let all = client.fetch("corrupt", 0, 0, WHOLE).await?;
    let offsets: Vec<u64> = all.records.iter().map(|r| r.offset).collect();
    let want: Vec<u64> = (0..2 * PER_BATCH)
        .chain(3 * PER_BATCH..=BATCHES * PER_BATCH)
        .collect();
    assert_eq!(offsets, want, "the accepted range is stepped over");
    assert!(client.repair_topic("corrupt", &[]).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_tail_batch_is_reported_at_start_up_and_offsets_never_repeat() -> anyhow::Result<()>
{
    let (dir, mut broker) = filled_and_stopped().await?;
    let tail = (BATCHES - 1) * PER_BATCH;
    flip_byte(dir.path(), "corrupt", 1, tail)?;
    broker.restart()?;
    let logs = broker.log_text();
    assert!(
        logs.lines()
            .any(|l| l.contains("tail batch failed its check")
                && l.contains("\"partition\":1")
                && l.contains(&format!("\"offset\":{tail}"))),
        "start-up did not report the corrupt tail:\n{logs}"
    );
    let client = broker.client().await?;
    expect_data_loss(
        client
            .fetch("corrupt", 1, tail, FetchOptions::default())
            .await,
        &format!("corrupt/1 at offset {tail}"),
    );
    // New records go after the damaged batch: offsets are never reused.
    let acks = client
        .produce("corrupt", Some(1), vec![Record::value("new")])
        .await?;
    assert_eq!(acks[0].base_offset, BATCHES * PER_BATCH);
    let fetched = client
        .fetch("corrupt", 1, BATCHES * PER_BATCH, FetchOptions::default())
        .await?;
    assert_eq!(fetched.records.len(), 1);
    // Partition 0 is intact.
    assert_eq!(
        client.fetch("corrupt", 0, 0, WHOLE).await?.records.len() as u64,
        BATCHES * PER_BATCH
    );
    Ok(())
}

/// The journal's tail holding the partition counters is lost while the records were
/// already flushed (simulated by putting back older counters): the broker takes the next
/// offset from the stored batches, so a new record never gets an acknowledged offset and
/// every acknowledged offset still reads its own record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_behind_the_stored_batches_never_give_an_offset_twice() -> anyhow::Result<()> {
    let (dir, mut broker) = filled_and_stopped().await?;
    with_db(dir.path(), "corrupt", |meta, _, id| {
        let key = [&b"p/"[..], &id.to_be_bytes(), &0u32.to_be_bytes()].concat();
        // next offset 20, earliest 0, 100 bytes: what the counters said two batches ago.
        let old = [
            20u64.to_le_bytes(),
            0u64.to_le_bytes(),
            100u64.to_le_bytes(),
        ]
        .concat();
        meta.insert(key, old)?;
        Ok(())
    })?;
    broker.restart()?;
    assert!(
        broker
            .log_text()
            .contains("stored counters were behind the stored batches"),
        "{}",
        broker.log_text()
    );
    let client = broker.client().await?;
    let acks = client
        .produce("corrupt", Some(0), vec![Record::value("new")])
        .await?;
    assert_eq!(
        acks[0].base_offset,
        BATCHES * PER_BATCH,
        "no offset given twice"
    );
    let all = client.fetch("corrupt", 0, 0, WHOLE).await?;
    let got = values(&all.records);
    assert_eq!(got.len() as u64, BATCHES * PER_BATCH + 1);
    for (i, (offset, value)) in got.iter().enumerate() {
        assert_eq!(*offset, i as u64);
        if (i as u64) < BATCHES * PER_BATCH {
            let want = format!("p0 b{} r{}", i as u64 / PER_BATCH, i as u64 % PER_BATCH);
            assert_eq!(value, &want, "offset {i} reads its acknowledged record");
        }
    }
    let t = client.describe_topic("corrupt").await?;
    assert_eq!(t.partitions[0].messages, BATCHES * PER_BATCH + 1);
    Ok(())
}

/// Batches lost from storage (a lost table or blob file): reads stop before them, the
/// missing offsets answer DATA_LOSS naming the range and never another record, reads after
/// them work, and new records get new offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_batches_are_data_loss_and_never_another_record() -> anyhow::Result<()> {
    let (_dir, broker) = with_missing_batches().await?;
    let client = broker.client().await?;
    let head = client.fetch("corrupt", 0, 0, WHOLE).await?;
    let offsets: Vec<u64> = head.records.iter().map(|r| r.offset).collect();
    assert_eq!(
        offsets,
        (0..2 * PER_BATCH).collect::<Vec<_>>(),
        "stops before the gap"
    );
    expect_data_loss(
        client.fetch("corrupt", 0, 2 * PER_BATCH, WHOLE).await,
        &format!(
            "offsets {}..{} of corrupt/0 are missing",
            2 * PER_BATCH,
            3 * PER_BATCH
        ),
    );
    expect_data_loss(
        client.fetch("corrupt", 0, 2 * PER_BATCH + 5, WHOLE).await,
        &format!("offsets {}..{}", 2 * PER_BATCH + 5, 3 * PER_BATCH),
    );
    let after = client.fetch("corrupt", 0, 3 * PER_BATCH, WHOLE).await?;
    assert_eq!(after.records.len() as u64, 2 * PER_BATCH);
    assert_eq!(after.records[0].record.text(), "p0 b3 r0");
    // The tail of partition 1 is gone; its offsets are not given out again.
    let tail = (BATCHES - 1) * PER_BATCH;
    expect_data_loss(
        client.fetch("corrupt", 1, tail, WHOLE).await,
        &format!(
            "offsets {tail}..{} of corrupt/1 are missing",
            BATCHES * PER_BATCH
        ),
    );
    let acks = client
        .produce("corrupt", Some(1), vec![Record::value("new")])
        .await?;
    assert_eq!(acks[0].base_offset, BATCHES * PER_BATCH);
    let new = client
        .fetch("corrupt", 1, BATCHES * PER_BATCH, WHOLE)
        .await?;
    assert_eq!(
        values(&new.records),
        [(BATCHES * PER_BATCH, "new".to_owned())]
    );

    Ok(())
}

/// [`fill`]'s records with two batches deleted (one in the middle of partition 0, the tail
/// of partition 1), the broker restarted on them.
async fn with_missing_batches() -> anyhow::Result<(tempfile::TempDir, Broker)> {
    let (dir, mut broker) = filled_and_stopped().await?;
    with_db(dir.path(), "corrupt", |_, records, id| {
        records.remove(record_key(id, 0, 2 * PER_BATCH))?;
        records.remove(record_key(id, 1, (BATCHES - 1) * PER_BATCH))?;
        Ok(())
    })?;
    broker.restart()?;
    Ok((dir, broker))
}

/// `weir topic repair` accepts the loss: the ranges are printed, logged and counted, and
/// reads step over them, also after a restart; a second repair finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_topic_repair_accepts_a_loss_and_reads_step_over_it() -> anyhow::Result<()> {
    let (_dir, mut broker) = with_missing_batches().await?;
    let tail = (BATCHES - 1) * PER_BATCH;
    broker
        .client()
        .await?
        .produce("corrupt", Some(1), vec![Record::value("new")])
        .await?;
    let out = broker.weir(&["topic", "repair", "corrupt"], b"")?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        format!(
            "0  {:>20}  {:>20}  {:>8}  missing",
            2 * PER_BATCH,
            3 * PER_BATCH,
            PER_BATCH
        ),
        format!(
            "1  {:>20}  {:>20}  {:>8}  missing",
            tail,
            BATCHES * PER_BATCH,
            PER_BATCH
        ),
    ] {
        assert!(text.contains(&line), "{text} lacks {line:?}");
    }
    let metrics = weir_tests::http_get(&broker.http_addr, "/metrics")?;
    assert!(
        metrics.contains(&format!(
            "weir_log_accepted_lost_records_total {}",
            2 * PER_BATCH
        )),
        "{metrics}"
    );
    assert!(broker.log_text().contains("loss accepted"));
    for round in ["before", "after"] {
        if round == "after" {
            broker.restart()?;
        }
        let client = broker.client().await?;
        let all = client.fetch("corrupt", 0, 0, WHOLE).await?;
        let offsets: Vec<u64> = all.records.iter().map(|r| r.offset).collect();
        let want: Vec<u64> = (0..2 * PER_BATCH)
            .chain(3 * PER_BATCH..BATCHES * PER_BATCH)
            .collect();
        assert_eq!(offsets, want, "{round} a restart");
        let p1 = client.fetch("corrupt", 1, tail, WHOLE).await?;
        assert_eq!(
            values(&p1.records),
            [(BATCHES * PER_BATCH, "new".to_owned())]
        );
    }
    let again = broker.weir(&["topic", "repair", "corrupt"], b"")?;
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing lost"));
    Ok(())
}

/// Every blob file (record data of the records keyspace) in the data directory.
fn blob_files(data_dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(keyspaces) = std::fs::read_dir(data_dir.join("keyspaces")) {
        for ks in keyspaces.filter_map(Result::ok) {
            if let Ok(blobs) = std::fs::read_dir(ks.path().join("blobs")) {
                out.extend(blobs.filter_map(Result::ok).map(|b| b.path()));
            }
        }
    }
    out.sort();
    out
}

/// Produces `batches` batches of 100 records of ~1 KB to `topic`/0.
async fn produce_kb(client: &Client, topic: &str, batches: u32) -> anyhow::Result<()> {
    for b in 0..batches {
        let records = (0..100)
            .map(|i| Record::value(format!("{topic} {b} {i} {}", "v".repeat(1000))))
            .collect();
        client.produce(topic, Some(0), records).await?;
    }
    Ok(())
}

/// Waits until the set of blob files has not changed for a second (flushes settled).
async fn settled_blobs(data_dir: &Path) -> Vec<std::path::PathBuf> {
    let mut last = blob_files(data_dir);
    for _ in 0..20 {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let now = blob_files(data_dir);
        if now == last && !now.is_empty() {
            break;
        }
        last = now;
    }
    last
}

/// Bytes overwritten inside a blob file (where flushed record data of the fjall store
/// lives: `--record-store fjall`, and batches below `--segment-min-batch`): reads that
/// reach the damaged data answer DATA_LOSS, never other bytes; the other topic reads whole
/// and producing goes on, and the broker stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_blob_file_is_data_loss_for_its_records_only() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_with(
        dir.path(),
        &["--memtable-size", "1MiB", "--record-store", "fjall"],
    )?;
    let client = broker.client().await?;
    client.create_topic("kept", &TopicConfig::new(1)).await?;
    client.create_topic("hit", &TopicConfig::new(1)).await?;
    produce_kb(&client, "kept", 60).await?;
    let before = settled_blobs(dir.path()).await;
    produce_kb(&client, "hit", 60).await?;
    let after = settled_blobs(dir.path()).await;
    let hit: Vec<_> = after.iter().filter(|f| !before.contains(f)).collect();
    let target: std::path::PathBuf = hit
        .iter()
        .max_by_key(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .map(|f| (*f).clone())
        .ok_or_else(|| anyhow::anyhow!("no blob file written for the second topic"))?;
    assert_eq!(broker.terminate()?, Some(0));
    let mut bytes = std::fs::read(&target)?;
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&target, bytes)?;
    broker.restart()?;
    let client = broker.client().await?;

    // The other topic: whole.
    let kept = client.fetch("kept", 0, 0, WHOLE).await?;
    assert_eq!(kept.records.len(), 6000);
    // The damaged one: records before the damage, then DATA_LOSS, never altered bytes.
    let mut offset = 0u64;
    let mut losses = 0;
    while offset < 6000 {
        match client.fetch("hit", 0, offset, WHOLE).await {
            Ok(f) if !f.records.is_empty() => {
                for r in &f.records {
                    let want = format!(
                        "hit {} {} {}",
                        r.offset / 100,
                        r.offset % 100,
                        "v".repeat(1000)
                    );
                    assert_eq!(r.record.text(), want, "offset {}", r.offset);
                }
                offset = f.records.last().map_or(offset, |r| r.offset + 1);
            }
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Some(Code::DataLoss), "{e}");
                losses += 1;
                offset += 100;
            }
        }
    }
    assert!(losses > 0, "the damaged blob file was never read");
    let acks = client
        .produce("kept", Some(0), vec![Record::value("after")])
        .await?;
    assert_eq!(acks[0].base_offset, 6000);
    assert!(
        broker.wait_exit(std::time::Duration::from_secs(2)).is_err(),
        "still running"
    );
    Ok(())
}

/// Reads `topic`/0 from 0 to its end as [`produce_kb`] wrote it: every record served must
/// be the one produced at its offset; ranges that cannot be served must answer DATA_LOSS.
/// Returns (records served, DATA_LOSS answers).
async fn read_kb(client: &Client, topic: &str, end: u64) -> anyhow::Result<(u64, u64)> {
    let mut offset = 0u64;
    let (mut served, mut losses) = (0, 0);
    while offset < end {
        match client.fetch(topic, 0, offset, WHOLE).await {
            Ok(f) if f.records.is_empty() => break,
            Ok(f) => {
                for r in f.records.iter().filter(|r| r.offset < end) {
                    served += 1;
                    let want = format!(
                        "{topic} {} {} {}",
                        r.offset / 100,
                        r.offset % 100,
                        "v".repeat(1000)
                    );
                    assert_eq!(r.record.text(), want, "{topic} offset {}", r.offset);
                }
                offset = f.records.last().map_or(offset, |r| r.offset + 1);
            }
            Err(e) => {
                assert_eq!(e.code(), Some(Code::DataLoss), "{e}");
                assert!(
                    e.to_string().contains(&format!("{topic}/0")),
                    "names the partition: {e}"
                );
                losses += 1;
                // Batches hold 100 records: skip to the next one.
                offset = (offset / 100 + 1) * 100;
            }
        }
    }
    Ok((served, losses))
}

/// A table file whose trailer is overwritten and a deleted blob file (the fjall store, so
/// that the records are in blob files): the storage engine
/// refuses to open, the broker moves the damaged files (and tables pointing into the lost
/// blob file) to `quarantine/` and starts; the damaged topics answer DATA_LOSS where their
/// records were, never other bytes, and the untouched topic reads whole and keeps serving
/// reads and writes for a minute of load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_table_and_a_lost_blob_file_are_contained() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_with(
        dir.path(),
        &["--memtable-size", "1MiB", "--record-store", "fjall"],
    )?;
    let client = broker.client().await?;
    for topic in ["hit-table", "hit-blob", "kept"] {
        client.create_topic(topic, &TopicConfig::new(1)).await?;
    }
    produce_kb(&client, "hit-table", 30).await?;
    let blobs_before = settled_blobs(dir.path()).await;
    produce_kb(&client, "hit-blob", 30).await?;
    let blobs_hit = settled_blobs(dir.path()).await;
    let tables_hit = table_files(dir.path());
    produce_kb(&client, "kept", 30).await?;
    let blobs_after = settled_blobs(dir.path()).await;
    let tables_after = table_files(dir.path());
    assert_eq!(broker.terminate()?, Some(0));

    // A table written before `kept` and still in use holds no key of `kept`.
    let table = tables_hit
        .iter()
        .find(|t| tables_after.contains(t))
        .ok_or_else(|| anyhow::anyhow!("no table of the first topics left: {tables_after:?}"))?;
    damage_trailer(table)?;
    let blob = blobs_hit
        .iter()
        .find(|b| !blobs_before.contains(b) && blobs_after.contains(b))
        .ok_or_else(|| anyhow::anyhow!("no blob file of hit-blob left"))?;
    std::fs::remove_file(blob)?;

    broker.restart()?;
    let logs = broker.log_text();
    assert!(logs.contains("moved to quarantine"), "{logs}");
    assert!(dir.path().join("quarantine").is_dir());
    let client = broker.client().await?;
    let (kept, kept_losses) = read_kb(&client, "kept", 3000).await?;
    assert_eq!(
        (kept, kept_losses),
        (3000, 0),
        "the untouched topic reads whole"
    );
    let mut losses = 0;
    for topic in ["hit-table", "hit-blob"] {
        let (served, lost) = read_kb(&client, topic, 3000).await?;
        println!("{topic}: {served} records served, {lost} DATA_LOSS answers");
        losses += lost;
    }
    assert!(losses > 0, "the damage was never reported");

    // A minute of load on every topic: produce and read back; the broker stays up.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut rounds = 0u64;
    while std::time::Instant::now() < until {
        for topic in ["kept", "hit-table", "hit-blob"] {
            let acks = client
                .produce(
                    topic,
                    Some(0),
                    (0..100)
                        .map(|i| Record::value(format!("load {rounds} {i}")))
                        .collect(),
                )
                .await?;
            let back = client.fetch(topic, 0, acks[0].base_offset, WHOLE).await?;
            assert_eq!(back.records.len(), 100);
            assert_eq!(back.records[0].record.text(), format!("load {rounds} 0"));
        }
        rounds += 1;
    }
    let (kept, kept_losses) = read_kb(&client, "kept", 3000).await?;
    assert_eq!((kept, kept_losses), (3000, 0), "still whole after the load");
    assert!(
        broker
            .wait_exit(std::time::Duration::from_millis(100))
            .is_err(),
        "still running"
    );
    println!("{rounds} load rounds");
    Ok(())
}

/// The segment files of `topic`/0 (the broker stopped), oldest first.
fn segment_files(data_dir: &Path, topic: &str) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let mut id = 0;
    with_db(data_dir, topic, |_, _, topic_id| {
        id = topic_id;
        Ok(())
    })?;
    let dir = data_dir.join("segments").join(format!("{id}-0"));
    let mut files: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    Ok(files)
}

/// Damage to the segment store's files (batches of 100 KB, segments of 1 MiB): 64 bytes
/// overwritten in an older segment, a segment deleted, and the newest segment cut to half
/// its length. Every offset of the damaged topic then reads as the record produced there
/// or as DATA_LOSS naming the partition, never other bytes; the other topic reads whole;
/// producing to both goes on (the damaged partition starts a new segment) and reads back;
/// the broker stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_lost_and_truncated_segments_are_data_loss_for_their_records_only()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_with(dir.path(), &["--segment-size", "1MiB"])?;
    let client = broker.client().await?;
    client.create_topic("kept", &TopicConfig::new(1)).await?;
    client.create_topic("hit", &TopicConfig::new(1)).await?;
    produce_kb(&client, "kept", 30).await?;
    produce_kb(&client, "hit", 60).await?;
    assert_eq!(broker.terminate()?, Some(0));

    let files = segment_files(dir.path(), "hit")?;
    assert!(
        files.len() >= 5,
        "60 batches of 100 KB in 1 MiB segments: {files:?}"
    );
    let mut bytes = std::fs::read(&files[1])?;
    let middle = bytes.len() / 2;
    for b in &mut bytes[middle..middle + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&files[1], bytes)?;
    std::fs::remove_file(&files[3])?;
    let newest = files.last().ok_or_else(|| anyhow::anyhow!("no segment"))?;
    let len = std::fs::metadata(newest)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(newest)?
        .set_len(len / 2)?;

    broker.restart()?;
    let client = broker.client().await?;
    assert_eq!(read_kb(&client, "kept", 3000).await?, (3000, 0));
    let (served, losses) = read_kb(&client, "hit", 6000).await?;
    println!("hit: {served} records served, {losses} DATA_LOSS answers");
    assert_eq!(
        served + 100 * losses,
        6000,
        "every batch is served whole or answered with DATA_LOSS"
    );
    // At least the batch under the overwritten bytes, the deleted segment's (ten or more)
    // and one past the cut.
    assert!(losses >= 12, "{losses} batches lost");

    for topic in ["kept", "hit"] {
        let end = if topic == "kept" { 3000 } else { 6000 };
        produce_kb(&client, topic, 3).await?;
        let back = client.fetch(topic, 0, end, WHOLE).await?;
        assert_eq!(back.records.len(), 300, "{topic}");
        let want = format!("{topic} 0 0 {}", "v".repeat(1000));
        assert_eq!(back.records[0].record.text(), want);
        assert_eq!(back.records[0].offset, end);
    }
    assert!(
        broker.wait_exit(std::time::Duration::from_secs(1)).is_err(),
        "still running"
    );
    Ok(())
}
