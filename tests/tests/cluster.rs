//! The cluster on one broker: a standalone broker is a cluster of one on the same code path
//! as many (`docs/cluster.md`): topic administration goes through the metadata group,
//! `weir cluster describe` shows brokers, the metadata leader and partition leaders, and a
//! data directory written before the cluster existed is adopted.

use serde_json::{Value, json};
use weir_client::TopicConfig;
use weir_tests::Broker;

fn describe_json(broker: &Broker) -> anyhow::Result<Value> {
    let out = broker.weir(&["cluster", "describe", "--output", "json"], b"")?;
    anyhow::ensure!(
        out.status.success(),
        "weir cluster describe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn partitions_of(m: &Value, topic: &str) -> Vec<Value> {
    m["partitions"]
        .as_array()
        .map(|a| a.iter().filter(|p| p["topic"] == topic).cloned().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_broker_is_a_cluster_of_one() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start_with(
        dir.path(),
        &["--node-id", "7", "--advertise", "weir-7.example:7070"],
    )?;
    let client = broker.client().await?;
    client.create_topic("orders", &TopicConfig::new(3)).await?;
    client.create_topic("gone", &TopicConfig::new(1)).await?;
    client.delete_topic("gone").await?;

    let m = describe_json(&broker)?;
    assert_eq!(m["metadataLeader"], 7, "{m}");
    assert_eq!(
        m["brokers"],
        json!([{"id": 7, "address": "weir-7.example:7070", "state": "Alive"}])
    );
    let orders = partitions_of(&m, "orders");
    assert_eq!(orders.len(), 3, "{m}");
    for (i, p) in orders.iter().enumerate() {
        assert_eq!(
            p,
            &json!({"topic": "orders", "partition": i, "leader": 7, "replicas": [7], "inSync": [7]})
        );
    }
    assert!(
        partitions_of(&m, "gone").is_empty(),
        "a deleted topic is gone: {m}"
    );
    let human = broker.weir(&["cluster", "describe"], b"")?;
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("metadata leader: 7"), "{text}");
    assert!(text.contains("weir-7.example:7070"), "{text}");

    // Growing places the new partitions; a restart keeps everything and the same leader.
    let mut grown = client.describe_topic("orders").await?.config;
    grown.partitions = 5;
    client.update_topic("orders", &grown).await?;
    broker.restart()?;
    let m = describe_json(&broker)?;
    assert_eq!(m["metadataLeader"], 7, "{m}");
    assert_eq!(partitions_of(&m, "orders").len(), 5, "{m}");
    assert_eq!(
        broker
            .client()
            .await?
            .describe_topic("orders")
            .await?
            .partitions
            .len(),
        5
    );
    Ok(())
}

/// A data directory written before the cluster existed (schema 1, as the recovery test
/// uses it): its topics are adopted into the cluster's metadata, all partitions led here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_from_before_the_cluster_is_adopted() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let archive = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join("schema-1-data-dir.tar.gz");
    let status = std::process::Command::new("tar")
        .arg("xzf")
        .arg(&archive)
        .arg("-C")
        .arg(dir.path())
        .status()?;
    anyhow::ensure!(status.success(), "unpacking {}", archive.display());
    let mut broker = Broker::start_in(&dir.path().join("data"))?;
    assert!(
        broker
            .log_text()
            .contains("adopted into the cluster's metadata"),
        "{}",
        broker.log_text()
    );
    let m = describe_json(&broker)?;
    for topic in ["old", "second"] {
        let parts = partitions_of(&m, topic);
        assert!(!parts.is_empty(), "{topic} adopted: {m}");
        assert!(parts.iter().all(|p| p["leader"] == 0), "{m}");
    }
    // Adopted once: a restart does not adopt again, and the topics still read.
    broker.restart()?;
    let logs = broker.log_text();
    assert_eq!(
        logs.matches("adopted into the cluster's metadata").count(),
        1,
        "{logs}"
    );
    assert_eq!(
        broker.client().await?.describe_topic("old").await?.messages,
        3
    );
    Ok(())
}

/// A malformed `--advertise` is refused at start-up with what would be right.
#[test]
fn a_malformed_advertise_address_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = std::process::Command::new(weir_tests::bin("weir-broker"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--advertise", "no-port-here"])
        .output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not HOST:PORT"), "{err}");
    Ok(())
}
