//! Replicated partitions on Kubernetes (acceptance 5 of the replication issue): a Topic with
//! `replicationFactor: 3` on three broker Pods (run by the loopback kubelet), records
//! produced under load while the Pod that leads a partition is deleted: the StatefulSet
//! brings it back on its volume, the Topic goes `UnderReplicated` (the deleted broker's
//! replicas fall out of sync) and back, and every acknowledged record is still there, at its
//! offset, on every replica.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use weir_client::{Client, FetchOptions, Record};
use weir_tests::operator::{Cluster, is_ready, placement};

const MINUTE: Duration = Duration::from_secs(60);

/// Acknowledged records: partition → offset → value.
type Acked = BTreeMap<u32, BTreeMap<u64, Vec<u8>>>;

/// The status of condition `type_` of `obj` (`True`, `False`), if it has one.
fn condition<'a>(obj: &'a serde_json::Value, type_: &str) -> Option<&'a str> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?["status"]
        .as_str()
}

/// Whether every partition of the Topic `obj` has `replicas` replicas, all in sync.
fn all_in_sync(obj: &serde_json::Value, replicas: usize) -> bool {
    obj["status"]["placement"].as_array().is_some_and(|ps| {
        !ps.is_empty()
            && ps.iter().all(|p| {
                p["replicas"].as_array().map(Vec::len) == Some(replicas)
                    && p["inSync"].as_array().map(Vec::len) == Some(replicas)
            })
    })
}

/// Produces batches of 50 records round robin to `partitions` partitions of `topic` until
/// `stop`, retrying each batch (a leader change answers UNAVAILABLE) for up to a minute;
/// records what was acknowledged. Returns the number of failed attempts.
async fn produce_until(
    client: Client,
    topic: &'static str,
    partitions: u32,
    acked: Arc<Mutex<Acked>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<u64> {
    let mut retries = 0u64;
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let partition = u32::try_from(n % u64::from(partitions))?;
        let values: Vec<Vec<u8>> = (0..50)
            .map(|i| format!("batch {n} record {i}").into_bytes())
            .collect();
        let started = Instant::now();
        let base = loop {
            match client
                .produce(
                    topic,
                    Some(partition),
                    values.iter().cloned().map(Record::value).collect(),
                )
                .await
            {
                Ok(acks) => break acks[0].base_offset,
                Err(e) => {
                    anyhow::ensure!(
                        started.elapsed() < MINUTE,
                        "batch {n} not acknowledged within a minute: {e}"
                    );
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let mut acked = acked.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        for (i, v) in values.into_iter().enumerate() {
            let offset = base + i as u64;
            anyhow::ensure!(
                acked
                    .entry(partition)
                    .or_default()
                    .insert(offset, v)
                    .is_none(),
                "{topic}/{partition} offset {offset} acknowledged twice"
            );
        }
        n += 1;
    }
    Ok(retries)
}

/// Every acknowledged record of `payments` is read back, at its offset, with its bytes,
/// through each broker Pod.
async fn every_record_through_each_pod(c: &Cluster, acked: &Acked) -> anyhow::Result<()> {
    for pod in ["weir-broker-0", "weir-broker-1", "weir-broker-2"] {
        let client = c.pod_client(pod).await?.without_routing();
        for (partition, records) in acked {
            let end = records.keys().next_back().map_or(0, |o| o + 1);
            let mut offset = 0;
            while offset < end {
                let f = client
                    .fetch(
                        "payments",
                        *partition,
                        offset,
                        FetchOptions {
                            max_wait: Duration::from_secs(1),
                            ..FetchOptions::default()
                        },
                    )
                    .await?;
                anyhow::ensure!(
                    !f.records.is_empty(),
                    "through {pod}: payments/{partition} ends at {offset}, {end} acknowledged"
                );
                for r in f.records {
                    if let Some(want) = records.get(&r.offset) {
                        anyhow::ensure!(
                            &r.record.value[..] == want.as_slice(),
                            "through {pod}: payments/{partition}/{} changed",
                            r.offset
                        );
                    }
                    offset = r.offset + 1;
                }
            }
        }
    }
    Ok(())
}

/// The brokers' StatefulSet: three Pods for replicationFactor 3, with the broker config's
/// extra environment.
fn statefulset_for_rf3(c: &Cluster) -> anyhow::Result<()> {
    let sts = c.kubectl(&[
        "get",
        "statefulset",
        "weir-broker",
        "-o",
        "jsonpath={.spec.replicas}",
    ])?;
    assert_eq!(sts.trim(), "3", "three brokers for replicationFactor 3");
    let lag = c.kubectl(&[
        "get",
        "statefulset",
        "weir-broker",
        "-o",
        r#"jsonpath={.spec.template.spec.containers[0].env[?(@.name=="WEIR_REPLICA_LAG_MAX")].value}"#,
    ])?;
    assert_eq!(lag.trim(), "1s", "the broker config's extra environment");
    Ok(())
}

/// Watches Topic `payments` from its current version on; the task ends with the message
/// of the first `UnderReplicated: True` condition it sees.
async fn watch_under_replicated(
    c: &Cluster,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<String>>> {
    use futures::{StreamExt, TryStreamExt};
    use kube::{
        Api,
        api::{ApiResource, DynamicObject, GroupVersionKind, WatchEvent, WatchParams},
    };
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("weir.dev", "v1alpha1", "Topic"));
    let api: Api<DynamicObject> = Api::namespaced_with(c.cp.client().await?, &c.ns, &resource);
    let current = api.get("payments").await?;
    let version = current.metadata.resource_version.unwrap_or_default();
    let mut events = api
        .watch(
            &WatchParams::default().fields("metadata.name=payments"),
            &version,
        )
        .await?
        .boxed();
    Ok(tokio::spawn(async move {
        while let Some(event) = events.try_next().await? {
            if let WatchEvent::Modified(t) = event {
                let data = &t.data;
                if condition(data, "UnderReplicated") == Some("True") {
                    let message = data["status"]["conditions"]
                        .as_array()
                        .and_then(|cs| cs.iter().find(|c| c["type"] == "UnderReplicated"))
                        .and_then(|c| c["message"].as_str())
                        .unwrap_or_default();
                    return Ok(message.to_owned());
                }
            }
        }
        anyhow::bail!("the watch of payments ended")
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rf3_topic_keeps_every_acknowledged_record_when_a_broker_pod_is_deleted()
-> anyhow::Result<()> {
    // Brokers told (through the broker config's extra environment) to drop a silent
    // follower from the in-sync replicas after 1 s rather than 10 s.
    let config = tempfile::NamedTempFile::new()?;
    std::fs::write(
        config.path(),
        "env:\n- {name: WEIR_REPLICA_LAG_MAX, value: 1s}\n",
    )?;
    let config_path = config.path().to_string_lossy().into_owned();
    let c = Cluster::start(
        "rf3",
        150,
        &["--max-brokers", "3", "--broker-config", &config_path],
    )
    .await?;
    // The README's example and its wait.
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/topic-replicated.yaml");
    c.kubectl(&["apply", "-f", &example.to_string_lossy()])?;
    c.kubectl(&[
        "wait",
        "--for=condition=UnderReplicated=False",
        "topic/payments",
        "--timeout=3m",
    ])?;
    let topic = c
        .wait_for("topic", "payments", MINUTE, "Ready, all in sync", |t| {
            is_ready(t, "True")
                && condition(t, "UnderReplicated") == Some("False")
                && all_in_sync(t, 3)
        })
        .await?;
    statefulset_for_rf3(&c)?;
    // The leader of partition 0 goes; the client talks to another broker, which forwards.
    let victim = placement(&topic)
        .into_iter()
        .find(|(p, _, _)| *p == 0)
        .map(|(_, broker, _)| broker)
        .ok_or_else(|| anyhow::anyhow!("no placement: {topic}"))?;
    let other = ["weir-broker-0", "weir-broker-1", "weir-broker-2"]
        .into_iter()
        .find(|b| *b != victim)
        .unwrap_or_default();
    let client = c.pod_client(other).await?.without_routing();
    let acked = Arc::new(Mutex::new(Acked::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = tokio::spawn(produce_until(
        client.clone(),
        "payments",
        2,
        Arc::clone(&acked),
        Arc::clone(&stop),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old_pid = c.kubelet.pid(&victim).await;
    // Every version of the Topic from here on: the loopback kubelet has a deleted broker
    // back within about a second, so the condition is short-lived.
    let under = watch_under_replicated(&c).await?;
    c.kubectl(&["delete", "pod", &victim, "--wait=false"])?;
    let deleted = Instant::now();
    // Under-replicated while it is away, then back: Ready and all in sync again.
    let message = tokio::time::timeout(MINUTE, under)
        .await
        .map_err(|_| anyhow::anyhow!("payments never went UnderReplicated"))???;
    let under = deleted.elapsed();
    assert!(message.contains(&victim), "{message}");
    let back = c
        .wait_for(
            "topic",
            "payments",
            2 * MINUTE,
            "Ready, all in sync again",
            |t| {
                is_ready(t, "True")
                    && condition(t, "UnderReplicated") == Some("False")
                    && all_in_sync(t, 3)
            },
        )
        .await?;
    let restarted = c.kubelet.pid(&victim).await;
    assert!(
        restarted.is_some() && restarted != old_pid,
        "{victim} runs again as a new process"
    );
    println!(
        "{victim} deleted: UnderReplicated after {under:?} ({message}), all in sync again after {:?}",
        deleted.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let retries = producer.await??;
    let acked = acked
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let total: usize = acked.values().map(BTreeMap::len).sum();
    println!("{total} records acknowledged, {retries} produce attempts retried");
    assert!(total > 0, "nothing acknowledged");

    every_record_through_each_pod(&c, &acked).await?;
    assert_eq!(
        back["status"]["placement"]
            .as_array()
            .map(Vec::len)
            .unwrap_or_default(),
        2
    );
    Ok(())
}
