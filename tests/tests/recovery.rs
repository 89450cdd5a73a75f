//! Restart and shutdown: partitions resume at their next offset from stored counters
//! (reading one tail batch each, never scanning), SIGTERM finishes in-flight work and exits
//! 0, and deleted topics stay deleted.

use std::time::Duration;

use weir_client::{FetchOptions, GroupConfig, GroupType, Record, TopicConfig};
use weir_tests::{Broker, produce_as};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_every_partition_reading_only_its_tail_batch() -> anyhow::Result<()> {
    let mut broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("resume", &TopicConfig::new(4)).await?;
    for i in 0..200u32 {
        let records = (0..5).map(|j| Record::value(format!("{i}-{j}"))).collect();
        client.produce("resume", Some(i % 4), records).await?;
    }
    let before = client.describe_topic("resume").await?;
    drop(client);
    broker.kill();
    broker.restart()?;
    let logs = broker.log_text();
    let recovered = logs
        .lines()
        .rfind(|l| l.contains("\"log recovered\""))
        .unwrap_or_default();
    assert!(recovered.contains("\"partitions\":4"), "{recovered}");
    assert!(
        recovered.contains("\"batches_read\":4"),
        "recovery must read one batch per partition, not scan 200: {recovered}"
    );
    assert!(recovered.contains("\"corrupt_tails\":0"), "{recovered}");
    let client = broker.client().await?;
    let after = client.describe_topic("resume").await?;
    assert_eq!(before.partitions, after.partitions);
    for p in &after.partitions {
        assert_eq!(p.next_offset, 250);
    }
    let acks = client
        .produce("resume", Some(2), vec![Record::value("next")])
        .await?;
    assert_eq!(acks[0].base_offset, 250);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_produces_and_exits_zero() -> anyhow::Result<()> {
    let mut broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("drain", &TopicConfig::new(2)).await?;
    let (mut tx, mut rx) = client.produce_stream(64).await?;
    let sender = tokio::spawn(async move {
        for i in 0u64.. {
            let records = (0..100)
                .map(|j| Record::value(format!("{i}-{j}")))
                .collect();
            if tx
                .send("drain", Some((i % 2) as u32), records)
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut acked = Vec::new();
    let receiver = tokio::spawn(async move {
        while let Some(answer) = rx.next().await {
            match answer.and_then(|a| a.result) {
                Ok(acks) => acked.extend(acks),
                Err(_) => break,
            }
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let code = tokio::task::spawn_blocking(move || {
        let code = broker.terminate();
        (broker, code)
    })
    .await?;
    let (mut broker, code) = code;
    assert_eq!(code?, Some(0), "graceful shutdown exits 0");
    sender.abort();
    let acked = receiver.await?;
    assert!(!acked.is_empty(), "nothing was acknowledged before SIGTERM");
    assert!(broker.log_text().contains("log persisted"));
    broker.restart()?;
    let client = broker.client().await?;
    let topic = client.describe_topic("drain").await?;
    for ack in &acked {
        let end = ack.base_offset + u64::from(ack.record_count);
        assert!(
            topic.partitions[ack.partition as usize].next_offset >= end,
            "acknowledged batch {ack:?} lost over a graceful restart"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_topic_data_is_gone_and_a_new_topic_of_that_name_starts_at_zero()
-> anyhow::Result<()> {
    let mut broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("gone", &TopicConfig::new(2)).await?;
    for _ in 0..10 {
        client
            .produce(
                "gone",
                None,
                (0..50).map(|i| Record::value(format!("old {i}"))).collect(),
            )
            .await?;
    }
    // A group with progress and an idempotent producer with a sequence on the old topic.
    let member = client
        .join(
            "readers",
            Some(&GroupConfig::new("gone", GroupType::Shared)),
        )
        .await?;
    let taken = member.pull(10, Duration::from_secs(1)).await?;
    member.ack(&taken).await?;
    let producer = weir_client::new_producer_id();
    produce_as(
        &client,
        "gone",
        Some(0),
        vec![Record::value("old seq 0")],
        producer,
        0,
    )
    .await?;
    client.delete_topic("gone").await?;
    assert!(client.describe_topic("gone").await.is_err());
    let t = client.create_topic("gone", &TopicConfig::new(1)).await?;
    assert_eq!(t.messages, 0);
    // A new topic: nothing of the old one applies (as Kafka's topic IDs make it).
    assert!(
        client.describe_group("readers").await.is_err(),
        "the group went with its topic"
    );
    let acks = produce_as(
        &client,
        "gone",
        Some(0),
        vec![Record::value("new")],
        producer,
        0,
    )
    .await?;
    assert_eq!(
        acks[0].base_offset, 0,
        "sequence 0 is new here, not a retry of the old one"
    );
    drop(client);
    broker.kill();
    broker.restart()?;
    let client = broker.client().await?;
    let fetched = client.fetch("gone", 0, 0, FetchOptions::default()).await?;
    let values: Vec<_> = fetched
        .records
        .iter()
        .map(|r| r.record.value.clone())
        .collect();
    assert_eq!(values, vec![bytes::Bytes::from_static(b"new")]);
    Ok(())
}

/// A data directory written by the previous version (metadata schema 1: `weir topic create
/// old --partitions 2`, three keyed records produced with `weir produce`, group `readers`
/// acked two of them, topic `second` created; `tests/data/schema-1-data-dir.tar.gz`) is
/// taken over: migrated once, records, group offsets and producer state intact, and new
/// topics do not collide with old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_of_the_previous_version_is_taken_over() -> anyhow::Result<()> {
    let dir = weir_tests::schema_1_data_dir()?;
    let data = dir.path().join("data");
    let mut broker = Broker::start_in(&data)?;
    assert!(
        broker.log_text().contains("metadata schema migrated"),
        "{}",
        broker.log_text()
    );
    let client = broker.client().await?;
    let names: Vec<String> = client
        .list_topics()
        .await?
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["old", "second"]);
    let old = client.describe_topic("old").await?;
    assert_eq!(old.messages, 3);
    let group = client.describe_group("readers").await?;
    assert_eq!(group.lag, 1, "two of three acked before the upgrade");

    // A new topic gets its own keys: the old topics read exactly what they held.
    client.create_topic("third", &TopicConfig::new(2)).await?;
    for p in 0..2 {
        client
            .produce("third", Some(p), vec![Record::value(format!("new-{p}"))])
            .await?;
    }
    let mut values = Vec::new();
    for p in &old.partitions {
        let f = client
            .fetch(
                "old",
                p.partition,
                p.earliest_offset,
                FetchOptions::default(),
            )
            .await?;
        values.extend(f.records.into_iter().map(|r| r.record.text().into_owned()));
    }
    assert_eq!(values, ["one", "two", "three"]);
    assert_eq!(client.describe_topic("third").await?.messages, 2);
    assert_eq!(client.describe_topic("second").await?.messages, 0);

    // Restarted, nothing is migrated again and everything is still there.
    broker.kill();
    broker
        .logs
        .lock()
        .map_err(|_| anyhow::anyhow!("logs"))?
        .clear();
    broker.restart()?;
    assert!(!broker.log_text().contains("metadata schema migrated"));
    let client = broker.client().await?;
    assert_eq!(client.describe_topic("old").await?.messages, 3);
    assert_eq!(client.describe_topic("third").await?.messages, 2);
    assert_eq!(client.describe_group("readers").await?.lag, 1);
    Ok(())
}
