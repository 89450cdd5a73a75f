//! The operator against the real control plane, with broker Pods run as real broker
//! processes by the loopback kubelet: Topics reconciled into brokers and back out,
//! ConsumerGroup status from what a real consumer did, and an operator killed mid-reconcile
//! or replaced by a second replica.

// Each test walks through one scenario step by step.
#![allow(clippy::too_many_lines)]

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tonic::Code;
use weir_client::{Client, Record, RecordExt};
use weir_tests::operator::{Cluster, is_ready, placement};

const EXAMPLE_TOPIC: &str = include_str!("../../examples/topic.yaml");
const MINUTE: Duration = Duration::from_secs(60);

/// Clients of each broker serving the Topic, by broker name.
async fn brokers_of(
    topic: &serde_json::Value,
) -> anyhow::Result<BTreeMap<String, (Client, Vec<u32>)>> {
    let mut out: BTreeMap<String, (Client, Vec<u32>)> = BTreeMap::new();
    for (p, broker, address) in placement(topic) {
        if !out.contains_key(&broker) {
            out.insert(
                broker.clone(),
                (
                    Client::connect(&format!("http://{address}")).await?,
                    Vec::new(),
                ),
            );
        }
        if let Some((_, parts)) = out.get_mut(&broker) {
            parts.push(p);
        }
    }
    Ok(out)
}

fn owners(obj: &serde_json::Value) -> Vec<String> {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    format!(
                        "{}/{}",
                        r["kind"].as_str().unwrap_or(""),
                        r["name"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn columns(out: &str, name: &str) -> Vec<String> {
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_becomes_brokers_grows_updates_and_goes_per_deletion_policy() -> anyhow::Result<()>
{
    let c = Cluster::start(
        "op-topic",
        40,
        &["--min-brokers", "1", "--max-brokers", "3"],
    )
    .await?;

    // 1. The example Topic: brokers with owner references, topic on the placed brokers, Ready.
    let applied = Instant::now();
    c.apply(EXAMPLE_TOPIC)?;
    let topic = c
        .wait_for("topic", "orders", MINUTE, "Ready=True", |t| {
            is_ready(t, "True")
        })
        .await?;
    let took = applied.elapsed();
    println!("orders Ready {took:?} after kubectl apply (3 brokers started one after another)");
    for (kind, name) in [
        ("statefulset", "weir-broker"),
        ("service", "weir-broker"),
        ("service", "weir"),
        ("poddisruptionbudget", "weir-broker"),
    ] {
        let obj = c
            .get(kind, name)?
            .ok_or_else(|| anyhow::anyhow!("{kind}/{name} was not created"))?;
        assert_eq!(
            owners(&obj),
            vec!["Topic/orders"],
            "{kind}/{name} is owned by the Topic"
        );
    }
    let sts = c.get("statefulset", "weir-broker")?.unwrap_or_default();
    assert_eq!(
        sts["spec"]["replicas"], 3,
        "4 partitions, at most 3 brokers"
    );
    let place = placement(&topic);
    assert_eq!(place.len(), 4);
    let mut per_broker: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, b, a) in &place {
        *per_broker.entry(b.as_str()).or_default() += 1;
        assert!(
            a.starts_with("127.0.0.") && a.ends_with(":7070"),
            "address {a}"
        );
    }
    assert_eq!(
        per_broker.len(),
        3,
        "spread over the three brokers: {place:?}"
    );
    assert!(per_broker.values().all(|n| (1..=2).contains(n)));
    let brokers = brokers_of(&topic).await?;
    for (broker, (client, parts)) in &brokers {
        let d = client.describe_topic("orders").await?;
        let cfg = d.config.clone().unwrap_or_default();
        assert_eq!(cfg.partitions, 4, "{broker}");
        assert_eq!(
            &cfg.served_partitions, parts,
            "{broker} serves what status says"
        );
        assert_eq!(
            cfg.max_age_ms,
            10 * 24 * 3600 * 1000,
            "maxAge 10d reached {broker}"
        );
    }
    assert_eq!(topic["status"]["settings"]["maxBytes"], 1u64 << 30);

    // Records produced to each partition at the broker status names show up in status and
    // in `kubectl get topics`.
    for (client, parts) in brokers.values() {
        for p in parts {
            client
                .produce(
                    "orders",
                    Some(*p),
                    (0..25)
                        .map(|i| Record::value(format!("p{p}-{i}")))
                        .collect(),
                )
                .await?;
        }
    }
    c.wait_for("topic", "orders", MINUTE, "100 messages in status", |t| {
        t["status"]["messages"] == 100
    })
    .await?;
    let row = columns(&c.kubectl(&["get", "topics"])?, "orders");
    assert_eq!(&row[1..4], &["4", "True", "100"], "{row:?}");

    // 3. More partitions: placed on the least-loaded brokers, created there, old ones stay.
    c.kubectl(&[
        "patch",
        "topic",
        "orders",
        "--type=merge",
        "-p",
        r#"{"spec":{"partitions":6,"retention":{"maxAge":"2d"}}}"#,
    ])?;
    let topic = c
        .wait_for("topic", "orders", MINUTE, "6 partitions Ready", |t| {
            is_ready(t, "True") && placement(t).len() == 6
        })
        .await?;
    let grown = placement(&topic);
    assert_eq!(&grown[..4], &place[..], "placed partitions never move");
    for (broker, (client, parts)) in &brokers_of(&topic).await? {
        let cfg = client
            .describe_topic("orders")
            .await?
            .config
            .unwrap_or_default();
        assert_eq!(
            (cfg.partitions, &cfg.served_partitions),
            (6, parts),
            "{broker}"
        );
        assert_eq!(
            cfg.max_age_ms,
            2 * 24 * 3600 * 1000,
            "retention change reached {broker}"
        );
    }
    let (p5_broker, p5_addr) = grown
        .iter()
        .find(|(p, _, _)| *p == 5)
        .map(|(_, b, a)| (b.clone(), a.clone()))
        .unwrap_or_default();
    let client = Client::connect(&format!("http://{p5_addr}")).await?;
    let acks = client
        .produce("orders", Some(5), vec![Record::value("new partition")])
        .await?;
    assert_eq!(
        (acks[0].partition, acks[0].base_offset),
        (5, 0),
        "partition 5 on {p5_broker} takes records"
    );

    // 5a. Retain: the Topic goes, its records stay on the broker.
    c.apply("apiVersion: weir.dev/v1alpha1\nkind: Topic\nmetadata: {name: audit}\nspec: {partitions: 1, deletionPolicy: Retain}\n")?;
    let audit = c
        .wait_for("topic", "audit", MINUTE, "Ready", |t| is_ready(t, "True"))
        .await?;
    let (audit_client, _) = brokers_of(&audit)
        .await?
        .into_values()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no broker"))?;
    audit_client
        .produce("audit", Some(0), vec![Record::value("kept")])
        .await?;
    let sts = c.get("statefulset", "weir-broker")?.unwrap_or_default();
    let mut o = owners(&sts);
    o.sort();
    assert_eq!(
        o,
        vec!["Topic/audit", "Topic/orders"],
        "each Topic owns the brokers"
    );
    c.kubectl(&["delete", "topic", "audit", "--wait=true", "--timeout=60s"])?;
    let kept = audit_client.describe_topic("audit").await?;
    assert_eq!(kept.messages, 1, "Retain keeps the records");

    // 5b. Delete: the data goes from every broker before the finalizer is released, and
    // with no Topic left the brokers are scaled to zero.
    let clients = brokers_of(&topic).await?;
    c.kubectl(&["delete", "topic", "orders", "--wait=true", "--timeout=60s"])?;
    for (broker, (client, _)) in &clients {
        let e = client.describe_topic("orders").await.expect_err("deleted");
        assert_eq!(e.code(), Some(Code::NotFound), "{broker}: {e}");
    }
    c.wait_for("statefulset", "weir-broker", MINUTE, "replicas 0", |s| {
        s["spec"]["replicas"] == 0
    })
    .await?;
    let deadline = Instant::now() + MINUTE;
    while !c.kubelet.running().await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "broker processes still run: {:?}",
            c.kubelet.running().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
