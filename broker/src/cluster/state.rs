//! The cluster's metadata: what the metadata group replicates, and the commands that change
//! it. Pure: applying a command depends on the state and the command only (the controller
//! decides placement before it proposes), so every broker that applies the same log reaches
//! the same state.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::{
    groups::GroupConfig,
    log::{TopicConfig, partitioner},
};

/// A broker's id (`--node-id`), also its id in the metadata group.
pub type BrokerId = u64;

/// A broker as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerInfo {
    /// `--node-id`.
    pub id: BrokerId,
    /// `--advertise`: `host:port` where peers and clients reach its gRPC port.
    pub address: String,
    /// `Alive` once registered.
    pub state: BrokerState,
}

/// A broker's state in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerState {
    /// Registered; serves its partitions.
    Alive,
}

/// A topic as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicState {
    /// Cluster-wide topic id: a topic deleted and created again gets a new one.
    pub id: u64,
    /// Settings (as the broker's admin API takes them).
    pub config: TopicConfig,
    /// Per partition: its replicas, the first being the preferred leader (the leader of a
    /// partition with one replica).
    pub replicas: Vec<Vec<BrokerId>>,
    /// Leaders of replicated partitions as their groups elected them: partition →
    /// (leader, term). A partition missing here is led by its first replica.
    #[serde(default)]
    pub leaders: BTreeMap<u32, (BrokerId, u64)>,
    /// In-sync replicas of replicated partitions as their leaders reported them, sorted:
    /// partition → brokers. A partition missing here has all its replicas in sync
    /// ([`TopicState::in_sync`]).
    #[serde(default)]
    pub in_sync: BTreeMap<u32, Vec<BrokerId>>,
}

impl TopicState {
    /// The in-sync replicas of `partition`, sorted: as its leader last reported them, else
    /// all its replicas (a new partition's replicas are all empty, so in sync, as Kafka's
    /// ISR starts); empty for a partition that does not exist.
    pub fn in_sync(&self, partition: u32) -> Vec<BrokerId> {
        if let Some(isr) = self.in_sync.get(&partition) {
            return isr.clone();
        }
        let mut all = self
            .replicas
            .get(partition as usize)
            .cloned()
            .unwrap_or_default();
        all.sort_unstable();
        all
    }

    /// Whether `partition` has fewer replicas in sync than replicas.
    pub fn under_replicated(&self, partition: u32) -> bool {
        self.replicas
            .get(partition as usize)
            .is_some_and(|r| self.in_sync(partition).len() < r.len())
    }

    /// The leader of `partition`, if the partition exists: the last one its group reported,
    /// else its first replica.
    pub fn leader(&self, partition: u32) -> Option<BrokerId> {
        if let Some((leader, _)) = self.leaders.get(&partition) {
            return Some(*leader);
        }
        self.replicas
            .get(partition as usize)
            .and_then(|r| r.first().copied())
    }
}

/// A consumer group as the cluster knows it. Its members, assignment and cursors live on
/// its coordinator (as a Kafka group's offsets live with its coordinator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    /// Settings (normalized).
    pub config: GroupConfig,
    /// The broker that coordinates the group (the one that created it). A group of a
    /// replicated topic is coordinated by the leader of [`GroupState::partition`] instead.
    pub coordinator: BrokerId,
    /// A group of a replicated topic: its coordinator partition, whose Raft log keeps its
    /// cursors; fixed when the group is created (`murmur2(name) mod partitions` then), so
    /// that adding partitions to the topic does not move its state.
    #[serde(default)]
    pub partition: Option<u32>,
}

/// Everything the metadata group replicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Brokers by id.
    pub brokers: BTreeMap<BrokerId, BrokerInfo>,
    /// Topics by name.
    pub topics: BTreeMap<String, TopicState>,
    /// Id of the next topic created.
    pub next_topic_id: u64,
    /// Consumer groups by name.
    #[serde(default)]
    pub groups: BTreeMap<String, GroupState>,
    /// Brokers that have put the groups of their data directory into the state (once, on
    /// their first start with groups in the cluster's metadata).
    #[serde(default)]
    pub groups_adopted: BTreeSet<BrokerId>,
}

/// A change to the cluster's metadata: one entry of the metadata group's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A broker announces itself (at every start; its address may have changed).
    RegisterBroker {
        /// Broker id.
        id: BrokerId,
        /// Advertised `host:port`.
        address: String,
    },
    /// A topic is created with the placement the controller chose.
    CreateTopic {
        /// Topic name.
        name: String,
        /// Settings.
        config: TopicConfig,
        /// Replicas per partition, leader first.
        replicas: Vec<Vec<BrokerId>>,
    },
    /// A topic's settings change; `added` places new partitions (partitions only grow).
    UpdateTopic {
        /// Topic name.
        name: String,
        /// New settings.
        config: TopicConfig,
        /// Replicas of the partitions added, leader first.
        added: Vec<Vec<BrokerId>>,
    },
    /// A topic is deleted, and its groups with it.
    DeleteTopic {
        /// Topic name.
        name: String,
    },
    /// A group is created (or its settings change) on its coordinator.
    PutGroup {
        /// Group name.
        name: String,
        /// Settings.
        config: GroupConfig,
        /// Its coordinator.
        coordinator: BrokerId,
    },
    /// A group is deleted.
    DeleteGroup {
        /// Group name.
        name: String,
    },
    /// A broker's groups of before the cluster kept groups, coordinated by it.
    AdoptGroups {
        /// The broker.
        broker: BrokerId,
        /// Its groups, by name.
        groups: Vec<(String, GroupConfig)>,
    },
    /// A broker leaves the cluster; changes nothing while it holds a partition.
    RemoveBroker {
        /// Broker id.
        id: BrokerId,
    },
    /// A replicated partition's group elected `leader` in `term`; an older term changes
    /// nothing.
    PartitionLeader {
        /// Topic name.
        topic: String,
        /// Partition.
        partition: u32,
        /// The leader.
        leader: BrokerId,
        /// Its Raft term in the partition's group.
        term: u64,
        /// The replicas in sync (the leader among them); empty: not known yet (a new
        /// leader), the recorded ones stay, with the new leader added.
        #[serde(default)]
        in_sync: Vec<BrokerId>,
    },
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RegisterBroker { id, address } => write!(f, "register broker {id} at {address}"),
            Self::CreateTopic { name, config, .. } => {
                write!(f, "create topic {name} ({} partitions)", config.partitions)
            }
            Self::UpdateTopic { name, config, .. } => {
                write!(f, "update topic {name} ({} partitions)", config.partitions)
            }
            Self::DeleteTopic { name } => write!(f, "delete topic {name}"),
            Self::PutGroup {
                name, coordinator, ..
            } => write!(f, "put group {name} (coordinator {coordinator})"),
            Self::DeleteGroup { name } => write!(f, "delete group {name}"),
            Self::AdoptGroups { broker, groups } => {
                write!(f, "adopt {} groups of broker {broker}", groups.len())
            }
            Self::RemoveBroker { id } => write!(f, "remove broker {id}"),
            Self::PartitionLeader {
                topic,
                partition,
                leader,
                term,
                in_sync,
            } => write!(
                f,
                "{topic}/{partition} led by broker {leader} in term {term}, in sync {in_sync:?}"
            ),
        }
    }
}

/// What applying a command did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The topic id a `CreateTopic` gave, or that an update or delete concerned.
    pub topic_id: Option<u64>,
    /// Whether the command changed nothing (a repeated registration or creation).
    pub unchanged: bool,
}

impl ClusterState {
    /// Applies `cmd`. Commands are validated by the controller before they are proposed;
    /// one that no longer fits (a topic deleted meanwhile) changes nothing.
    pub fn apply(&mut self, cmd: &Command) -> Applied {
        match cmd {
            Command::RegisterBroker { id, address } => {
                let info = BrokerInfo {
                    id: *id,
                    address: address.clone(),
                    state: BrokerState::Alive,
                };
                let unchanged = self.brokers.get(id) == Some(&info);
                self.brokers.insert(*id, info);
                Applied {
                    topic_id: None,
                    unchanged,
                }
            }
            Command::CreateTopic {
                name,
                config,
                replicas,
            } => {
                if let Some(t) = self.topics.get(name) {
                    return Applied {
                        topic_id: Some(t.id),
                        unchanged: true,
                    };
                }
                let id = self.next_topic_id.max(1);
                self.next_topic_id = id + 1;
                self.topics.insert(
                    name.clone(),
                    TopicState {
                        id,
                        config: *config,
                        replicas: replicas.clone(),
                        leaders: BTreeMap::new(),
                        in_sync: BTreeMap::new(),
                    },
                );
                Applied {
                    topic_id: Some(id),
                    unchanged: false,
                }
            }
            Command::UpdateTopic {
                name,
                config,
                added,
            } => match self.topics.get_mut(name) {
                Some(t) => {
                    t.config = *config;
                    t.replicas.extend(added.iter().cloned());
                    Applied {
                        topic_id: Some(t.id),
                        unchanged: false,
                    }
                }
                None => Applied {
                    topic_id: None,
                    unchanged: true,
                },
            },
            Command::DeleteTopic { name } => match self.topics.remove(name) {
                Some(t) => {
                    self.groups.retain(|_, g| g.config.topic != *name);
                    Applied {
                        topic_id: Some(t.id),
                        unchanged: false,
                    }
                }
                None => Applied {
                    topic_id: None,
                    unchanged: true,
                },
            },
            Command::RemoveBroker { id } => {
                let holds = self
                    .topics
                    .values()
                    .any(|t| t.replicas.iter().any(|r| r.contains(id)));
                let removed = !holds && self.brokers.remove(id).is_some();
                Applied {
                    topic_id: None,
                    unchanged: !removed,
                }
            }
            Command::PartitionLeader {
                topic,
                partition,
                leader,
                term,
                in_sync,
            } => self.apply_leader(topic, *partition, *leader, *term, in_sync),
            Command::PutGroup { .. }
            | Command::DeleteGroup { .. }
            | Command::AdoptGroups { .. } => self.apply_group(cmd),
        }
    }

    /// The partitions broker `id` holds (leads or replicates), as `(topic, partition)`, in
    /// topic order.
    pub fn partitions_led_by(&self, id: BrokerId) -> Vec<(String, u32)> {
        self.topics
            .iter()
            .flat_map(|(name, t)| {
                t.replicas
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.contains(&id))
                    .map(move |(p, _)| (name.clone(), p as u32))
            })
            .collect()
    }

    /// [`Command::PartitionLeader`]: a leader is recorded when its term is newer than the
    /// recorded one and it is one of the partition's replicas; in-sync replicas when they
    /// come from the recorded leader of the recorded term (or with the new leader), kept to
    /// the partition's replicas, the leader always among them. A new leader reported without
    /// them keeps the recorded ones, the leader added (as Kafka's ISR outlives a leader
    /// change).
    fn apply_leader(
        &mut self,
        topic: &str,
        partition: u32,
        leader: BrokerId,
        term: u64,
        in_sync: &[BrokerId],
    ) -> Applied {
        let changed = self.topics.get_mut(topic).is_some_and(|t| {
            let Some(replicas) = t.replicas.get(partition as usize).cloned() else {
                return false;
            };
            if !replicas.contains(&leader) {
                return false;
            }
            let recorded = t.leaders.get(&partition).copied();
            let newer =
                recorded.is_none_or(|(l, known)| term > known || (term == known && l != leader));
            let current = recorded == Some((leader, term));
            if !newer && !current {
                return false;
            }
            let mut isr: Vec<BrokerId> = if in_sync.is_empty() {
                t.in_sync
                    .get(&partition)
                    .cloned()
                    .unwrap_or_else(|| replicas.clone())
            } else {
                in_sync.to_vec()
            };
            isr.retain(|b| replicas.contains(b));
            isr.push(leader);
            isr.sort_unstable();
            isr.dedup();
            let isr_changed = t.in_sync.get(&partition) != Some(&isr);
            if newer {
                t.leaders.insert(partition, (leader, term));
            }
            if isr_changed {
                t.in_sync.insert(partition, isr);
            }
            newer || isr_changed
        });
        Applied {
            topic_id: self.topics.get(topic).map(|t| t.id),
            unchanged: !changed,
        }
    }

    /// The group commands of [`ClusterState::apply`].
    fn apply_group(&mut self, cmd: &Command) -> Applied {
        match cmd {
            Command::PutGroup {
                name,
                config,
                coordinator,
            } => {
                let partition = match self.groups.get(name) {
                    Some(g) if g.config.topic == config.topic => g.partition,
                    _ => self
                        .coordinator_partition(name, &config.topic)
                        .filter(|(t, _)| t.config.replication_factor > 1)
                        .map(|(_, p)| p),
                };
                let group = GroupState {
                    config: config.clone(),
                    coordinator: *coordinator,
                    partition,
                };
                let unchanged = !self.topics.contains_key(&config.topic)
                    || self.groups.get(name) == Some(&group);
                if !unchanged {
                    self.groups.insert(name.clone(), group);
                }
                Applied {
                    topic_id: None,
                    unchanged,
                }
            }
            Command::DeleteGroup { name } => Applied {
                topic_id: None,
                unchanged: self.groups.remove(name).is_none(),
            },
            Command::AdoptGroups { broker, groups } => {
                let unchanged = !self.groups_adopted.insert(*broker);
                if !unchanged {
                    for (name, config) in groups {
                        if self.topics.contains_key(&config.topic) {
                            self.groups
                                .entry(name.clone())
                                .or_insert_with(|| GroupState {
                                    config: config.clone(),
                                    coordinator: *broker,
                                    partition: None,
                                });
                        }
                    }
                }
                Applied {
                    topic_id: None,
                    unchanged,
                }
            }
            _ => Applied {
                topic_id: None,
                unchanged: true,
            },
        }
    }

    /// The broker that coordinates group `name` of `topic`. A group of a replicated topic
    /// is coordinated by the current leader of its coordinator partition
    /// ([`GroupState::partition`]), whose Raft log keeps its cursors, so the coordinator
    /// follows that partition's leadership (as a Kafka group's coordinator is the leader of
    /// its `__consumer_offsets` partition). Any other group: the broker the state names. A
    /// group not created yet: the leader of its coordinator partition
    /// ([`ClusterState::coordinator_partition`]), so every broker routes a new group's calls
    /// to the same broker. `None` for an unknown topic.
    pub fn coordinator(&self, name: &str, topic: Option<&str>) -> Option<BrokerId> {
        if let Some(g) = self.groups.get(name) {
            return match g.partition {
                Some(p) => self.topics.get(&g.config.topic)?.leader(p),
                None => Some(g.coordinator),
            };
        }
        let (t, p) = self.coordinator_partition(name, topic?)?;
        t.leader(p)
    }

    /// Topic `topic` and the partition of it that coordinates group `name`: the one
    /// recorded at the group's creation, else `murmur2(name) mod partitions` (Kafka hashes a
    /// group onto a `__consumer_offsets` partition the same way). `None` for an unknown
    /// topic or one without partitions.
    pub fn coordinator_partition(&self, name: &str, topic: &str) -> Option<(&TopicState, u32)> {
        let t = self.topics.get(topic)?;
        if let Some(p) = self
            .groups
            .get(name)
            .filter(|g| g.config.topic == topic)
            .and_then(|g| g.partition)
        {
            return Some((t, p));
        }
        let count = t.replicas.len() as u32;
        if count == 0 {
            return None;
        }
        Some((t, partitioner::partition_for_key(name.as_bytes(), count)))
    }

    /// Whether group `name`'s state lives in its coordinator partition's Raft log (it was
    /// created on a replicated topic) rather than on one broker's disk.
    pub fn group_is_replicated(&self, name: &str) -> bool {
        self.groups.get(name).is_some_and(|g| g.partition.is_some())
    }

    /// The groups whose state lives in their coordinator partition's Raft log: name,
    /// settings and coordinator partition.
    pub fn replicated_groups(&self) -> Vec<(String, GroupConfig, u32)> {
        self.groups
            .iter()
            .filter_map(|(name, g)| Some((name.clone(), g.config.clone(), g.partition?)))
            .collect()
    }

    /// Replicas for `count` new partitions of a topic, `replication_factor` distinct
    /// brokers each (at most the brokers there are): each partition's leader (first replica)
    /// is the broker with the fewest partition leaders so far, its followers the brokers
    /// with the fewest replicas (ties by lowest id), so leaders and replicas spread evenly;
    /// existing partitions never move (sticky).
    pub fn place(&self, count: u32, replication_factor: u32) -> Vec<Vec<BrokerId>> {
        let mut leads: BTreeMap<BrokerId, usize> = self.brokers.keys().map(|&b| (b, 0)).collect();
        let mut holds = leads.clone();
        for t in self.topics.values() {
            for r in &t.replicas {
                if let Some(leader) = r.first()
                    && let Some(n) = leads.get_mut(leader)
                {
                    *n += 1;
                }
                for b in r {
                    if let Some(n) = holds.get_mut(b) {
                        *n += 1;
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let Some((&leader, _)) = leads.iter().min_by_key(|&(&id, &n)| (n, id)) else {
                break;
            };
            let mut replicas = vec![leader];
            let mut followers: Vec<(usize, BrokerId)> = holds
                .iter()
                .filter(|(b, _)| **b != leader)
                .map(|(&b, &n)| (n, b))
                .collect();
            followers.sort_unstable();
            replicas.extend(
                followers
                    .into_iter()
                    .take(replication_factor.saturating_sub(1) as usize)
                    .map(|(_, b)| b),
            );
            for b in &replicas {
                if let Some(n) = holds.get_mut(b) {
                    *n += 1;
                }
            }
            if let Some(n) = leads.get_mut(&leader) {
                *n += 1;
            }
            out.push(replicas);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with_brokers(ids: &[BrokerId]) -> ClusterState {
        let mut s = ClusterState::default();
        for &id in ids {
            s.apply(&Command::RegisterBroker {
                id,
                address: format!("b{id}:7070"),
            });
        }
        s
    }

    fn config(partitions: u32) -> TopicConfig {
        TopicConfig::new(partitions, 0).expect("config")
    }

    #[test]
    fn placement_spreads_leaders_and_is_sticky() {
        let mut s = state_with_brokers(&[0, 1, 2]);
        let placed = s.place(6, 1);
        assert_eq!(
            placed,
            vec![vec![0], vec![1], vec![2], vec![0], vec![1], vec![2]]
        );
        s.apply(&Command::CreateTopic {
            name: "a".into(),
            config: config(6),
            replicas: placed.clone(),
        });
        // A second topic of 2 partitions starts where the load is lowest.
        let second = s.place(2, 1);
        assert_eq!(second, vec![vec![0], vec![1]]);
        // Growing keeps the existing partitions where they are.
        s.apply(&Command::UpdateTopic {
            name: "a".into(),
            config: config(7),
            added: s.place(1, 1),
        });
        assert_eq!(s.topics["a"].replicas[..6], placed[..]);
        assert_eq!(s.topics["a"].replicas.len(), 7);
    }

    /// A group of a replicated topic is coordinated by its coordinator partition's current
    /// leader, whichever broker created it, and keeps that partition when the topic grows.
    #[test]
    fn a_replicated_groups_coordinator_follows_its_partitions_leader() {
        let mut s = state_with_brokers(&[0, 1, 2]);
        let mut rf3 = config(3);
        rf3.replication_factor = 3;
        s.apply(&Command::CreateTopic {
            name: "t".into(),
            config: rf3,
            replicas: s.place(3, 3),
        });
        let group = GroupConfig {
            topic: "t".into(),
            group_type: crate::groups::GroupType::Shared,
            start: crate::groups::StartFrom::Earliest,
            ack_wait_ms: 30_000,
            max_deliveries: 0,
            dead_letter_topic: "t-g-DLQ".into(),
            session_timeout_ms: 10_000,
        };
        let p = partitioner::partition_for_key(b"g", 3);
        let first = s.topics["t"].leader(p).expect("a leader");
        s.apply(&Command::PutGroup {
            name: "g".into(),
            config: group.clone(),
            coordinator: first,
        });
        assert!(s.group_is_replicated("g"));
        assert_eq!(s.groups["g"].partition, Some(p));
        let other = (first + 1) % 3;
        s.apply(&Command::PartitionLeader {
            topic: "t".into(),
            partition: p,
            leader: other,
            term: 7,
            in_sync: Vec::new(),
        });
        assert_eq!(s.coordinator("g", None), Some(other), "follows the leader");
        // Settings changed through the new coordinator: accepted, partition kept.
        s.apply(&Command::PutGroup {
            name: "g".into(),
            config: group,
            coordinator: other,
        });
        let mut grown = rf3;
        grown.partitions = 50;
        s.apply(&Command::UpdateTopic {
            name: "t".into(),
            config: grown,
            added: s.place(47, 3),
        });
        assert_eq!(s.groups["g"].partition, Some(p), "growth does not move it");
        assert_eq!(s.coordinator("g", None), Some(other));
        assert_eq!(
            s.replicated_groups(),
            vec![("g".to_owned(), s.groups["g"].config.clone(), p)]
        );
    }

    #[test]
    fn topic_ids_are_never_reused() {
        let mut s = state_with_brokers(&[0]);
        let create = Command::CreateTopic {
            name: "t".into(),
            config: config(1),
            replicas: vec![vec![0]],
        };
        let first = s.apply(&create);
        assert_eq!(first.topic_id, Some(1));
        assert!(s.apply(&create).unchanged, "creating again changes nothing");
        s.apply(&Command::DeleteTopic { name: "t".into() });
        let again = s.apply(&create);
        assert_eq!(again.topic_id, Some(2), "delete + create is a new topic");
    }

    #[test]
    fn groups_go_with_their_topic_and_are_adopted_once() {
        let mut s = state_with_brokers(&[0, 1]);
        let placed = s.place(4, 1);
        s.apply(&Command::CreateTopic {
            name: "t".into(),
            config: config(4),
            replicas: placed,
        });
        let group = GroupConfig {
            topic: "t".into(),
            group_type: crate::groups::GroupType::Ordered,
            start: crate::groups::StartFrom::Earliest,
            ack_wait_ms: 30_000,
            max_deliveries: 0,
            dead_letter_topic: "t-g-DLQ".into(),
            session_timeout_ms: 10_000,
        };
        let coordinator = s.coordinator("g", Some("t")).expect("a coordinator");
        let p = partitioner::partition_for_key(b"g", 4);
        assert_eq!(Some(coordinator), s.topics["t"].leader(p));
        assert!(
            !s.apply(&Command::PutGroup {
                name: "g".into(),
                config: group.clone(),
                coordinator,
            })
            .unchanged
        );
        assert_eq!(s.coordinator("g", None), Some(coordinator));
        let mut other = group.clone();
        other.topic = "missing".into();
        assert!(
            s.apply(&Command::PutGroup {
                name: "h".into(),
                config: other,
                coordinator: 0,
            })
            .unchanged,
            "a group of an unknown topic is not stored"
        );
        let adopt = Command::AdoptGroups {
            broker: 1,
            groups: vec![("g".into(), group.clone()), ("a".into(), group.clone())],
        };
        assert!(!s.apply(&adopt).unchanged);
        assert_eq!(
            s.groups["g"].coordinator, coordinator,
            "existing groups kept"
        );
        assert_eq!(s.groups["a"].coordinator, 1);
        assert!(s.apply(&adopt).unchanged, "adopted once");
        s.apply(&Command::DeleteTopic { name: "t".into() });
        assert!(s.groups.is_empty(), "a topic's groups go with it");
    }

    #[test]
    fn registering_again_with_the_same_address_changes_nothing() {
        let mut s = state_with_brokers(&[0]);
        assert!(
            s.apply(&Command::RegisterBroker {
                id: 0,
                address: "b0:7070".into()
            })
            .unchanged
        );
        assert!(
            !s.apply(&Command::RegisterBroker {
                id: 0,
                address: "elsewhere:7070".into()
            })
            .unchanged
        );
        assert_eq!(s.brokers[&0].address, "elsewhere:7070");
    }

    #[test]
    fn replicas_are_distinct_brokers_and_spread() {
        let mut s = state_with_brokers(&[0, 1, 2, 3]);
        let placed = s.place(4, 3);
        for r in &placed {
            let mut sorted = r.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), 3, "three distinct brokers: {placed:?}");
        }
        let leaders: Vec<u64> = placed.iter().map(|r| r[0]).collect();
        assert_eq!(leaders, [0, 1, 2, 3], "leaders spread");
        let mut held = [0usize; 4];
        for b in placed.iter().flatten() {
            held[*b as usize] += 1;
        }
        assert_eq!(held, [3, 3, 3, 3], "replicas spread: {placed:?}");
        // More copies than brokers: as many as there are.
        assert_eq!(state_with_brokers(&[0, 1]).place(1, 3), vec![vec![0, 1]]);
        s.apply(&Command::CreateTopic {
            name: "r".into(),
            config: config(4),
            replicas: placed,
        });
        // A reported leader moves routing; an older term does not.
        let elect = |leader, term| Command::PartitionLeader {
            topic: "r".into(),
            partition: 0,
            leader,
            term,
            in_sync: Vec::new(),
        };
        assert!(!s.apply(&elect(1, 5)).unchanged);
        assert_eq!(s.topics["r"].leader(0), Some(1));
        assert!(s.apply(&elect(0, 4)).unchanged, "an older term");
        assert_eq!(s.topics["r"].leader(0), Some(1));
        assert_eq!(s.topics["r"].replicas[0], [0, 1, 2]);
        assert!(
            s.apply(&elect(3, 9)).unchanged,
            "broker 3 holds no replica of it"
        );
    }

    /// In-sync replicas: all replicas at creation; the current leader's reports shrink and
    /// grow them (kept to the replicas, the leader always in); a new leader reported without
    /// them keeps them; a deposed leader's report changes nothing.
    #[test]
    fn in_sync_replicas_follow_their_leaders_reports() {
        let mut s = state_with_brokers(&[0, 1, 2]);
        s.apply(&Command::CreateTopic {
            name: "r".into(),
            config: config(1),
            replicas: vec![vec![2, 0, 1]],
        });
        assert_eq!(s.topics["r"].in_sync(0), [0, 1, 2]);
        assert!(!s.topics["r"].under_replicated(0));
        let report = |leader, term, in_sync: &[u64]| Command::PartitionLeader {
            topic: "r".into(),
            partition: 0,
            leader,
            term,
            in_sync: in_sync.to_vec(),
        };
        assert!(!s.apply(&report(2, 1, &[])).unchanged, "a leader recorded");
        assert_eq!(s.topics["r"].in_sync(0), [0, 1, 2], "kept");
        assert!(!s.apply(&report(2, 1, &[2, 1])).unchanged, "shrunk");
        assert_eq!(s.topics["r"].in_sync(0), [1, 2]);
        assert!(s.topics["r"].under_replicated(0));
        assert!(s.apply(&report(2, 1, &[1, 2])).unchanged, "the same");
        assert!(
            s.apply(&report(0, 0, &[0])).unchanged,
            "an older term changes nothing"
        );
        assert!(!s.apply(&report(1, 2, &[])).unchanged, "a new leader");
        assert_eq!(s.topics["r"].leader(0), Some(1));
        assert_eq!(s.topics["r"].in_sync(0), [1, 2], "kept, the leader in");
        assert!(
            s.apply(&report(2, 1, &[0, 1, 2])).unchanged,
            "the deposed leader's report"
        );
        assert!(!s.apply(&report(1, 2, &[1, 7, 0])).unchanged);
        assert_eq!(s.topics["r"].in_sync(0), [0, 1], "kept to the replicas");
        assert!(
            s.apply(&report(1, 2, &[0])).unchanged,
            "the leader always in"
        );
        assert_eq!(s.topics["r"].in_sync(0), [0, 1]);
    }
}
