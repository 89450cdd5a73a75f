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
use weir_tests::Broker;

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
    let db = Database::builder(data_dir).open()?;
    let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
    let records = db.keyspace("records", KeyspaceCreateOptions::default)?;
    let topic_meta = meta
        .get(format!("t/{topic}"))?
        .ok_or_else(|| anyhow::anyhow!("topic metadata missing"))?;
    let id = serde_json::from_slice::<serde_json::Value>(&topic_meta)?["id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("topic id missing"))? as u32;
    let mut key = Vec::new();
    key.extend_from_slice(&id.to_be_bytes());
    key.extend_from_slice(&partition.to_be_bytes());
    key.extend_from_slice(&base_offset.to_be_bytes());
    let mut value = records
        .get(&key)?
        .ok_or_else(|| anyhow::anyhow!("no batch at {partition}/{base_offset}"))?
        .to_vec();
    let last = value.len() - 1;
    value[last] ^= 0x01;
    records.insert(key, value)?;
    db.persist(PersistMode::SyncAll)?;
    Ok(())
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
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_in(dir.path())?;
    fill(&broker.client().await?).await?;
    assert_eq!(broker.terminate()?, Some(0), "graceful stop exits 0");
    flip_byte(dir.path(), "corrupt", 0, 2 * PER_BATCH)?;
    broker.restart()?;
    let client = broker.client().await?;

    // Reading from the start stops before the bad batch.
    let head = client
        .fetch(
            "corrupt",
            0,
            0,
            FetchOptions {
                max_bytes: Some(16 << 20),
                ..FetchOptions::default()
            },
        )
        .await?;
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
    let tail = client
        .fetch(
            "corrupt",
            0,
            3 * PER_BATCH,
            FetchOptions {
                max_bytes: Some(16 << 20),
                ..FetchOptions::default()
            },
        )
        .await?;
    assert_eq!(tail.records.len() as u64, 2 * PER_BATCH);
    let other = client
        .fetch(
            "corrupt",
            1,
            0,
            FetchOptions {
                max_bytes: Some(16 << 20),
                ..FetchOptions::default()
            },
        )
        .await?;
    assert_eq!(other.records.len() as u64, BATCHES * PER_BATCH);
    let acks = client
        .produce("corrupt", Some(0), vec![Record::value("after")])
        .await?;
    assert_eq!(acks[0].base_offset, BATCHES * PER_BATCH);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_tail_batch_is_reported_at_start_up_and_offsets_never_repeat() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_in(dir.path())?;
    fill(&broker.client().await?).await?;
    assert_eq!(broker.terminate()?, Some(0));
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
        client
            .fetch(
                "corrupt",
                0,
                0,
                FetchOptions {
                    max_bytes: Some(16 << 20),
                    ..FetchOptions::default()
                }
            )
            .await?
            .records
            .len() as u64,
        BATCHES * PER_BATCH
    );
    Ok(())
}
