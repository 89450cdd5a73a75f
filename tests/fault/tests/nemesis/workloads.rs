//! The nemesis's workloads besides the producers: consumer groups that pull and ack, and
//! admin requests, each recorded in the [`History`].

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use weir_client::{Client, GroupConfig, GroupType, TopicConfig};
use weir_fault::{AdminKind, AdminOp, GroupEvent, History, Read};

use super::{PARTITIONS, Shared, TOPIC};

/// The groups of a run: an Ordered one and a Shared one, two pull members each.
pub const GROUPS: [(&str, GroupType); 2] = [
    ("nemesis-ordered", GroupType::Ordered),
    ("nemesis-shared", GroupType::Shared),
];

/// Members per group.
const MEMBERS: u32 = 2;

/// Prefix of the topics the admin workload creates.
pub const ADMIN_PREFIX: &str = "nemesis-admin-";

/// Milliseconds since the run began.
pub fn ms(run_started: Instant) -> u64 {
    u64::try_from(run_started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The groups' settings: a member not heard from for 6 s leaves, a delivery not acked in 5 s
/// goes to another member.
pub fn group_config(group_type: GroupType) -> GroupConfig {
    GroupConfig::new(TOPIC, group_type)
        .with_session_timeout(Duration::from_secs(6))
        .with_ack_wait(Duration::from_secs(5))
}

/// Creates the groups (before the producers start, so they start at offset 0), retrying
/// for up to 30 s while the topic's partitions elect their first leaders.
pub async fn create_groups(client: &Client) -> anyhow::Result<()> {
    for (name, group_type) in GROUPS {
        let started = Instant::now();
        while let Err(e) = client.create_group(name, &group_config(group_type)).await {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "creating group {name}: {e}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Pull members of every group until `stop`: each pulls up to 50 deliveries, records them
/// (as deliveries and as reads), acks them and records the acks the broker took. A member
/// whose call fails joins again as a new member.
pub fn spawn_members(
    all: &str,
    history: &Shared<History>,
    run_started: Instant,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let mut out = Vec::new();
    for (group, _) in GROUPS {
        for member in 0..MEMBERS {
            let (all, history, stop) = (all.to_owned(), Arc::clone(history), Arc::clone(stop));
            out.push(tokio::spawn(async move {
                let client = Client::connect(&all)
                    .await?
                    .with_request_timeout(super::REQUEST_TIMEOUT);
                let source = format!("{group}/{member}");
                while !stop.load(Ordering::Relaxed) {
                    let Ok(m) = client.join(group, None).await else {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(deliveries) = m.pull(50, Duration::from_millis(500)).await else {
                            break;
                        };
                        let at_ms = ms(run_started);
                        {
                            let mut h = history.lock();
                            for d in &deliveries {
                                h.groups.push(GroupEvent::Delivered {
                                    group: group.to_owned(),
                                    partition: d.partition,
                                    offset: d.offset,
                                    at_ms,
                                });
                                h.reads.push(Read {
                                    source: source.clone(),
                                    partition: d.partition,
                                    offset: d.offset,
                                    value: d.record.value.to_vec(),
                                });
                            }
                        }
                        if deliveries.is_empty() {
                            continue;
                        }
                        if m.ack(&deliveries).await.is_err() {
                            break;
                        }
                        let at_ms = ms(run_started);
                        let mut h = history.lock();
                        for d in &deliveries {
                            h.groups.push(GroupEvent::Acked {
                                group: group.to_owned(),
                                partition: d.partition,
                                offset: d.offset,
                                at_ms,
                            });
                        }
                    }
                }
                anyhow::Ok(())
            }));
        }
    }
    out
}

/// Every 500 ms until `stop`, each group's committed offsets as `describe` shows them.
pub fn spawn_committed_poller(
    all: &str,
    history: &Shared<History>,
    run_started: Instant,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let (all, history, stop) = (all.to_owned(), Arc::clone(history), Arc::clone(stop));
    tokio::spawn(async move {
        let client = Client::connect(&all)
            .await?
            .with_request_timeout(super::REQUEST_TIMEOUT);
        while !stop.load(Ordering::Relaxed) {
            for (group, _) in GROUPS {
                if let Ok(info) = client.describe_group(group).await {
                    let at_ms = ms(run_started);
                    let mut h = history.lock();
                    for p in info.partitions {
                        h.groups.push(GroupEvent::Committed {
                            group: group.to_owned(),
                            partition: p.partition,
                            offset: p.committed_offset,
                            at_ms,
                        });
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        anyhow::Ok(())
    })
}

/// Admin requests every 2 s until `stop`, one topic at a time: an RF3 topic of one
/// partition created, then grown to two with a retention change, then deleted (so the
/// cluster's load stays flat over a long run). Each is recorded with whether it was
/// acknowledged.
pub fn spawn_admin(
    all: &str,
    history: &Shared<History>,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let (all, history, stop) = (all.to_owned(), Arc::clone(history), Arc::clone(stop));
    tokio::spawn(async move {
        let client = Client::connect(&all)
            .await?
            .with_request_timeout(super::REQUEST_TIMEOUT);
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let topic = format!("{ADMIN_PREFIX}{}", n / 3);
            let (kind, partitions, acked) = match n % 3 {
                0 => {
                    let config = TopicConfig::new(1).with_replication_factor(3);
                    let acked = client.create_topic(&topic, &config).await.is_ok();
                    (AdminKind::Create, 1, acked)
                }
                1 => {
                    let config = TopicConfig::new(2)
                        .with_replication_factor(3)
                        .with_max_age(Duration::from_secs(3600));
                    let acked = client.update_topic(&topic, &config).await.is_ok();
                    (AdminKind::Grow, 2, acked)
                }
                _ => {
                    let acked = client.delete_topic(&topic).await.is_ok();
                    (AdminKind::Delete, 0, acked)
                }
            };
            history.lock().admin.push(AdminOp {
                topic,
                kind,
                partitions,
                acked,
            });
            n += 1;
        }
        anyhow::Ok(())
    })
}

/// The partition counts of the admin workload's topics, as the metadata lists them.
pub async fn admin_topics(client: &Client) -> anyhow::Result<BTreeMap<String, u32>> {
    Ok(client
        .list_topics()
        .await?
        .into_iter()
        .filter(|t| t.name.starts_with(ADMIN_PREFIX))
        .map(|t| (t.name, t.config.partitions))
        .collect())
}

/// Liveness after healing: waits (up to 60 s) until every group committed every partition
/// to its end (`ends`: partition → next offset), the members still running.
pub async fn until_groups_consumed_all(
    client: &Client,
    ends: &BTreeMap<u32, u64>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let mut behind = Vec::new();
        for (group, _) in GROUPS {
            let info = client.describe_group(group).await;
            for p in 0..PARTITIONS {
                let committed = info.as_ref().ok().and_then(|i| {
                    i.partitions
                        .iter()
                        .find(|q| q.partition == p)
                        .map(|q| q.committed_offset)
                });
                if committed != ends.get(&p).copied() {
                    behind.push((group, p, committed, ends.get(&p).copied()));
                }
            }
        }
        if behind.is_empty() {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "groups did not consume every record within 60 s of healing: (group, partition, committed, end) {behind:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
