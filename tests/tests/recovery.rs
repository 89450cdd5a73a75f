//! Restart and shutdown: partitions resume at their next offset from stored counters
//! (reading one tail batch each, never scanning), SIGTERM finishes in-flight work and exits
//! 0, and deleted topics stay deleted.

use std::time::Duration;

use weir_client::{FetchOptions, Record, TopicConfig};
use weir_tests::Broker;

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
    client.delete_topic("gone").await?;
    assert!(client.describe_topic("gone").await.is_err());
    let t = client.create_topic("gone", &TopicConfig::new(1)).await?;
    assert_eq!(t.messages, 0);
    let acks = client
        .produce("gone", None, vec![Record::value("new")])
        .await?;
    assert_eq!(acks[0].base_offset, 0);
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
