//! A topic spread over several brokers: each broker serves only the partitions placed on it
//! (`TopicConfig.served_partitions`). Real broker process, real gRPC client.

use tonic::Code;
use weir_client::{Client, FetchOptions, GroupConfig, GroupType, Record, TopicConfig};
use weir_tests::Broker;

fn served(partitions: u32, served: &[u32]) -> TopicConfig {
    TopicConfig::new(partitions).with_served_partitions(served.to_vec())
}

async fn counts(client: &Client, topic: &str) -> anyhow::Result<Vec<u64>> {
    Ok(client
        .describe_topic(topic)
        .await?
        .partitions
        .iter()
        .map(|p| p.messages)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_serves_only_its_partitions() -> anyhow::Result<()> {
    let mut broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("orders", &served(4, &[1, 3])).await?;

    // Explicit partition of another broker: refused, nothing stored, the message says where.
    let e = client
        .produce("orders", Some(0), vec![Record::value("x")])
        .await
        .expect_err("partition 0 is not served here");
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
    assert!(e.to_string().contains("serves partitions [1, 3]"), "{e}");
    let e = client
        .fetch(
            "orders",
            2,
            0,
            FetchOptions {
                max_bytes: Some(1 << 20),
                ..FetchOptions::default()
            },
        )
        .await
        .expect_err("fetch of partition 2 is refused");
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");

    // Unkeyed records go round robin over the served partitions only.
    for i in 0..10 {
        client
            .produce("orders", None, vec![Record::value(format!("m{i}"))])
            .await?;
    }
    assert_eq!(counts(&client, "orders").await?, vec![0, 5, 0, 5]);

    // A key that hashes to an unserved partition fails the whole request.
    let keys = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let e = client
        .produce(
            "orders",
            None,
            keys.iter()
                .map(|k| Record::keyed(*k, "v"))
                .collect::<Vec<_>>(),
        )
        .await
        .expect_err("some of eight keys hash to partitions 0 or 2");
    assert_eq!(e.code(), Some(Code::FailedPrecondition), "{e}");
    assert_eq!(counts(&client, "orders").await?, vec![0, 5, 0, 5]);

    // The served set survives a restart and can grow with the partitions.
    broker.restart()?;
    let client = broker.client().await?;
    let d = client.describe_topic("orders").await?;
    assert_eq!(d.config.served_partitions, vec![1, 3]);
    let out = broker.weir(&["topic", "describe", "orders"], b"")?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("served here: partitions 1, 3"),
        "weir topic describe says which partitions this broker serves: {text}"
    );
    client
        .update_topic("orders", &served(6, &[1, 3, 5]))
        .await?;
    client
        .produce("orders", Some(5), vec![Record::value("new")])
        .await?;
    assert_eq!(counts(&client, "orders").await?, vec![0, 5, 0, 5, 0, 1]);

    // Serving a partition the topic does not have is refused with the range.
    let e = client
        .update_topic("orders", &served(6, &[7]))
        .await
        .expect_err("partition 7 of 6");
    assert_eq!(e.code(), Some(Code::InvalidArgument), "{e}");
    assert!(e.to_string().contains("partitions 0..6"), "{e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_groups_assign_only_served_partitions() -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = broker.client().await?;
    client.create_topic("logs", &served(4, &[0, 2])).await?;
    let group = GroupConfig::new("logs", GroupType::Ordered);
    let a = client.subscribe("readers", Some(&group), 10).await?;
    let b = client.subscribe("readers", Some(&group), 10).await?;
    // Join order decides; each member owns one served partition once handover settles.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let d = client.describe_group("readers").await?;
        let owned = |m: &str| {
            d.partitions
                .iter()
                .filter(|p| p.owner.as_deref() == Some(m))
                .map(|p| p.partition)
                .collect::<Vec<_>>()
        };
        let pa = (owned(a.member_id()), owned(b.member_id()));
        if pa.0.len() == 1 && pa.1.len() == 1 {
            let mut all = [pa.0[0], pa.1[0]];
            all.sort_unstable();
            assert_eq!(all, [0, 2]);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "owners never settled on one served partition each: {pa:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}
