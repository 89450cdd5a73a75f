//! The cluster: a metadata group (openraft) over the brokers, whose leader is the controller.
//! Design: `docs/cluster.md`.
//!
//! Every broker runs the metadata group's Raft node on its own fjall database
//! ([`store`]). Topic administration goes through it: the controller checks a change
//! against the state, places new partitions ([`state::ClusterState::place`]) and proposes the
//! command; each broker applies it and makes its local log match (the partitions it leads).
//! A standalone broker is a cluster of one on the same path; on its first start with this
//! code, the topics already in its data directory are adopted into the cluster's state.
//!
//! Parts: [`state`] (what is replicated, pure), [`store`] (Raft log and state machine on
//! fjall), [`network`] (the messages between brokers).

pub mod network;
pub mod remote;
pub mod route;
pub mod state;
pub mod store;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use openraft::{BasicNode, async_runtime::WatchReceiver};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use weir_proto::v1::{RaftMessage, raft_client::RaftClient};

use self::state::{Applied, Command};
pub use self::state::{BrokerId, ClusterState};
use crate::{
    groups::GroupConfig,
    log::{self, Log, TopicConfig},
};

openraft::declare_raft_types!(
    /// The metadata group's types: commands in, [`Applied`] out, brokers by id and address.
    pub TypeConfig:
        D = Command,
        R = Applied,
);

/// The metadata group's Raft node.
pub type Raft = openraft::Raft<TypeConfig, store::StateMachine>;

/// How this broker takes part in the cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `--node-id`: this broker's id in the cluster.
    pub node_id: BrokerId,
    /// `--advertise`: `host:port` where peers and clients reach this broker's gRPC port.
    pub advertise: String,
    /// `--peers`: the metadata group's initial voters by id (empty: a cluster of one).
    pub peers: BTreeMap<BrokerId, String>,
    /// Timings of replicated partitions' groups.
    pub replica: crate::replica::ReplicaOptions,
}

/// A topic change as a broker forwards it to the controller (the metadata leader), which
/// checks it against the state, places partitions and proposes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminOp {
    /// Create a topic.
    CreateTopic {
        /// Topic name.
        name: String,
        /// Settings.
        config: TopicConfig,
    },
    /// Change a topic's settings.
    UpdateTopic {
        /// Topic name.
        name: String,
        /// Settings.
        config: TopicConfig,
    },
    /// Delete a topic.
    DeleteTopic {
        /// Topic name.
        name: String,
    },
    /// Record a group coordinated by `coordinator` (created there, or its settings changed).
    PutGroup {
        /// Group name.
        name: String,
        /// Settings.
        config: GroupConfig,
        /// The broker that coordinates it.
        coordinator: BrokerId,
    },
    /// Remove a group.
    DeleteGroup {
        /// Group name.
        name: String,
    },
    /// Record the groups a broker had before groups were in the cluster's metadata.
    AdoptGroups {
        /// The broker.
        broker: BrokerId,
        /// Its groups.
        groups: Vec<(String, GroupConfig)>,
    },
    /// Add a broker that is not among `--peers` to the metadata group (as a learner, then a
    /// voter while there are fewer than [`VOTERS`]).
    AddBroker {
        /// Broker id.
        id: BrokerId,
        /// Advertised `host:port`.
        address: String,
    },
    /// A broker announces its address.
    RegisterBroker {
        /// Broker id.
        id: BrokerId,
        /// Advertised `host:port`.
        address: String,
    },
    /// Remove a broker from the cluster (the metadata group and the state); refused while
    /// it leads a partition.
    RemoveBroker {
        /// Broker id.
        id: BrokerId,
    },
    /// No change: the controller confirms its leadership and answers the metadata index
    /// it has applied ([`Cluster::read_index`]), which the asking broker then applies
    /// too ([`Cluster::catch_up`]).
    ReadIndex,
    /// A replicated partition's group elected a leader, or its in-sync replicas changed
    /// (reported by the leader).
    PartitionLeader {
        /// Topic name.
        topic: String,
        /// Partition.
        partition: u32,
        /// The leader.
        leader: BrokerId,
        /// Its term.
        term: u64,
        /// The replicas in sync; empty: unknown yet (a new leader), the recorded ones stay.
        #[serde(default)]
        in_sync: Vec<BrokerId>,
    },
}

/// The controller's answer to a forwarded [`AdminOp`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forwarded {
    /// `CreateTopic`: whether it created the topic (`false`: it existed with the same
    /// settings).
    pub created: bool,
    /// The metadata log index the change was applied at; the forwarding broker answers its
    /// client once it has applied that far itself (read-your-writes on every broker).
    pub index: u64,
}

/// An error the controller answered a forwarded call with: a gRPC status code and message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteError {
    /// `tonic::Code` as an integer.
    pub code: i32,
    /// The message.
    pub message: String,
}

/// Errors of the cluster layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The metadata group has no leader this broker can reach (an election is under way, or
    /// too few brokers are up).
    #[error("the cluster's metadata group has no leader at the moment ({0}); retry shortly")]
    NoLeader(String),
    /// The metadata group's storage failed; the broker must restart.
    #[error("the cluster's metadata storage failed: {0}")]
    Storage(String),
    /// Opening the metadata group's storage failed.
    #[error("opening the cluster's metadata storage: {0}")]
    Open(#[from] std::io::Error),
    /// The local log refused or failed.
    #[error(transparent)]
    Log(#[from] log::Error),
    /// The controller refused a forwarded change (its status code and message).
    #[error("{message}")]
    Remote {
        /// `tonic::Code` as an integer.
        code: i32,
        /// The controller's message.
        message: String,
    },
    /// This broker is not the metadata leader (a leader change happened meanwhile).
    #[error("this broker is not the metadata leader; retry")]
    NotLeader,
}

/// This broker's view of, and part in, the cluster.
pub struct Cluster {
    raft: Raft,
    me: BrokerId,
    address: String,
    state: store::AppliedState,
    /// Nothing of a metadata group was stored when this broker started.
    fresh: bool,
    /// The initial voters (`--peers`), empty for a cluster of one.
    peers: BTreeMap<BrokerId, String>,
    /// This broker's log (to tell an apply in progress from an unknown topic).
    log: Arc<Log>,
    /// Set once [`Cluster::join`] finished: admin calls wait for it, so none is placed
    /// before this broker registered.
    joined: watch::Sender<bool>,
    /// Channels to peers for forwarded calls (admin and data path), by address.
    channels: parking_lot::Mutex<std::collections::HashMap<String, tonic::transport::Channel>>,
    /// Work-queue ack floors that groups coordinated elsewhere reported for partitions led
    /// here.
    reported_floors: parking_lot::Mutex<remote::ReportedFloors>,
    /// The replica groups of replicated partitions on this broker.
    replicas: Arc<crate::replica::Replicas>,
    /// The metadata log lost entries (damaged storage) and has not applied up to them
    /// again: this broker neither votes nor stands for election meanwhile.
    repairing: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.me)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// Voters the controller promotes learners to: a majority survives one broker's loss.
pub const VOTERS: usize = 3;

/// How often a broker moves the leadership of partitions it leads to their preferred
/// replicas, when those are caught up.
const PREFERRED_LEADER_INTERVAL: Duration = Duration::from_secs(5);

/// How long start-up waits for the metadata group to elect a leader.
const LEADER_WAIT: Duration = Duration::from_secs(30);

/// Longest [`Cluster::read_index`] waits for a quorum to confirm the metadata leadership
/// and for the state to apply what was committed.
const READ_INDEX_WAIT: Duration = Duration::from_secs(5);

/// Longest [`Cluster::catch_up`] waits for the metadata leader's index and its apply here.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

impl Cluster {
    /// Opens this broker's node of the metadata group on `log`'s database. It takes part in
    /// the group (answers its peers) from here on; [`Cluster::join`] then waits for a leader.
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub async fn open(log: Arc<Log>, options: ClusterOptions) -> Result<Arc<Self>, Error> {
        let ks = log.keyspace("raft")?;
        let db = log.database();
        // A broker without peers has no leader to take lost metadata entries from: it
        // keeps the metadata group's state in tables (`store::seal`).
        let alone = options.peers.keys().all(|id| *id == options.node_id);
        let mut log_store = store::LogStore::new(db.clone(), ks.clone(), log.dir(), alone)
            .map_err(|e| Error::Storage(e.to_string()))?;
        // Before anything reads the log: a vote that went back is restored here (so a
        // damaged broker does not take itself for a new one).
        let lost = log_store
            .check_marks()
            .await
            .map_err(|e| Error::Storage(e.to_string()))?;
        let fresh = log_store.is_empty()?;
        let (replicas, leader_changes) =
            crate::replica::Replicas::new(options.node_id, &log, options.replica)?;
        let (sm, state) = store::StateMachine::open(
            db,
            ks,
            Arc::clone(&log),
            options.node_id,
            Arc::clone(&replicas),
            alone,
        )?;
        let config = openraft::Config {
            cluster_name: "weir-metadata".into(),
            heartbeat_interval: 100,
            election_timeout_min: 500,
            election_timeout_max: 1000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
            max_in_snapshot_log_to_keep: 100,
            // A peer whose storage lost entries comes back with a shorter log; the leader
            // sends them again instead of treating it as a bug (openraft panics otherwise).
            // Safe because such a broker does not vote until it has them back (below).
            allow_log_reversion: Some(true),
            // A broker that lost entries must not resume leadership from its vote.
            enable_leader_restore: Some(lost.is_none()),
            ..Default::default()
        };
        let config = Arc::new(
            config
                .validate()
                .map_err(|e| Error::Storage(format!("raft config: {e}")))?,
        );
        let raft = Raft::new(options.node_id, config, network::Network, log_store, sm)
            .await
            .map_err(|e| Error::Storage(e.to_string()))?;
        let voters = raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .count();
        // A sole voter has no peer to take lost entries from: it goes on without them. (The
        // membership may be among what was lost: `--peers` counts too.)
        let lost = lost.filter(|_| voters > 1 || options.peers.len() > 1);
        if let Some(l) = lost {
            tracing::error!(
                stored_to = l.stored_to,
                had_to = l.had_to,
                "the metadata log lost entries it had stored (damaged storage); this broker takes them from the leader and does not vote until it has them again"
            );
            raft.runtime_config().elect(false);
        }
        // The replicas of replicated partitions this broker holds, as the state places them.
        let applied = Arc::clone(&state.borrow().1);
        store::open_replicas(&applied, &log, &replicas, options.node_id)
            .await
            .map_err(|e| Error::Storage(e.to_string()))?;
        let cluster = Arc::new(Self {
            raft,
            me: options.node_id,
            address: options.advertise,
            state,
            fresh,
            peers: options.peers,
            joined: watch::Sender::new(false),
            log,
            channels: parking_lot::Mutex::default(),
            reported_floors: parking_lot::Mutex::default(),
            replicas,
            repairing: std::sync::atomic::AtomicBool::new(lost.is_some()),
        });
        if let Some(l) = lost {
            cluster.watch_repair(l);
        }
        cluster.spawn_leader_reports(leader_changes);
        cluster
            .replicas
            .spawn_preferred_leaders(PREFERRED_LEADER_INTERVAL);
        cluster.replicas.spawn_in_sync();
        Ok(cluster)
    }

    /// Whether the metadata log is being repaired after damage ([`Cluster::open`]): its
    /// `Vote` calls are refused meanwhile, as if this broker were down.
    pub fn is_repairing(&self) -> bool {
        self.repairing.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Lets this broker vote and stand again once it applied every entry it had lost (the
    /// entries it acknowledged are then on a majority again, with it among them).
    fn watch_repair(self: &Arc<Self>, lost: store::LostEntries) {
        let cluster = Arc::downgrade(self);
        let mut applied = self.state.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            if applied
                .wait_for(|(index, _)| *index >= lost.had_to)
                .await
                .is_err()
            {
                return;
            }
            let Some(c) = cluster.upgrade() else { return };
            c.repairing
                .store(false, std::sync::atomic::Ordering::Release);
            c.raft.runtime_config().elect(true);
            tracing::warn!(
                had_to = lost.had_to,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "metadata log repaired from the leader: it has every entry it had lost and votes again"
            );
        });
    }

    /// The replica groups of replicated partitions on this broker.
    pub fn replicas(&self) -> &Arc<crate::replica::Replicas> {
        &self.replicas
    }

    /// Records in the metadata each leader the replica groups here elect (so routing and
    /// clients follow), retried until the controller takes it or a newer term replaced it.
    fn spawn_leader_reports(
        self: &Arc<Self>,
        mut changes: tokio::sync::mpsc::UnboundedReceiver<crate::replica::LeaderChange>,
    ) {
        let cluster = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(change) = changes.recv().await {
                let Some(c) = cluster.upgrade() else { return };
                let _ = c.until_joined().await;
                for attempt in 0..20u32 {
                    let state = c.state();
                    let Some(topic) = state.topics.get(&change.topic) else {
                        break;
                    };
                    let recorded = topic.leaders.get(&change.partition).copied();
                    let same_term = recorded == Some((change.leader, change.term));
                    if recorded.is_some_and(|(_, term)| term > change.term)
                        || (same_term
                            && (change.in_sync.is_empty()
                                || topic.in_sync(change.partition) == change.in_sync))
                    {
                        break;
                    }
                    let op = AdminOp::PartitionLeader {
                        topic: change.topic.clone(),
                        partition: change.partition,
                        leader: change.leader,
                        term: change.term,
                        in_sync: change.in_sync.clone(),
                    };
                    match c.admin(op).await {
                        Ok(_) => break,
                        Err(e) => {
                            tracing::warn!(topic = %change.topic, partition = change.partition, error = %e, attempt, "recording a partition leader failed; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        });
    }

    /// Brings this broker into the cluster: a broker that was never part of one starts a
    /// cluster of its own (and adopts the topics of its data directory); then it waits for a
    /// leader and registers its address.
    ///
    /// # Errors
    ///
    /// Storage errors, or no leader within 30 s.
    pub async fn join(&self, log: &Log, groups: Vec<(String, GroupConfig)>) -> Result<(), Error> {
        let cluster = self;
        if self.fresh && !self.peers.is_empty() && !self.peers.contains_key(&self.me) {
            self.join_as_learner().await?;
        } else if self.fresh {
            // Every initial voter initializes with the same membership (openraft allows it:
            // the entry is identical everywhere, one election wins).
            let members: BTreeMap<BrokerId, BasicNode> = if self.peers.is_empty() {
                BTreeMap::from([(self.me, BasicNode::new(self.address.clone()))])
            } else {
                self.peers
                    .iter()
                    .map(|(&id, addr)| (id, BasicNode::new(addr.clone())))
                    .collect()
            };
            match cluster.raft.initialize(members).await {
                Ok(()) => {}
                Err(openraft::errors::RaftError::APIError(e)) => {
                    tracing::info!(reason = %e, "the metadata group was initialized already");
                }
                Err(e) => {
                    return Err(Error::Storage(format!(
                        "initializing the metadata group: {e}"
                    )));
                }
            }
        } else if cluster.is_sole_voter() {
            // A cluster of one need not wait out an election timeout at every restart.
            if let Err(e) = cluster.raft.trigger().elect(false).await {
                tracing::warn!(error = %e, "starting the election at once failed");
            }
        }
        cluster.wait_for_leader().await?;
        self.until_done("registering", || cluster.register())
            .await?;
        if self.fresh {
            cluster.adopt_local(log).await?;
        }
        if !self.state().groups_adopted.contains(&self.me) {
            // Once per data directory: its groups of before the cluster kept groups.
            let count = groups.len();
            let op = AdminOp::AdoptGroups {
                broker: self.me,
                groups,
            };
            self.until_done("recording its groups", || self.admin(op.clone()))
                .await?;
            if count > 0 {
                tracing::info!(
                    groups = count,
                    "groups of the data directory recorded in the cluster's metadata, coordinated here"
                );
            }
        }
        self.joined.send_replace(true);
        Ok(())
    }

    /// Runs `step` of joining until it succeeds or fails for a reason other than the metadata
    /// group lacking a leader: a broker that starts while most of its peers are down waits
    /// for them (not ready meanwhile) instead of exiting. openraft restores a former leader
    /// as leader of its old term from its saved vote, so `wait_for_leader` can pass while
    /// nothing can commit yet.
    async fn until_done<F, Fut, T>(&self, what: &str, step: F) -> Result<T, Error>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let mut attempts = 0u64;
        loop {
            let error = match step().await {
                Err(e @ (Error::NotLeader | Error::NoLeader(_))) => e.to_string(),
                Err(Error::Remote { code, message }) if code == tonic::Code::Unavailable as i32 => {
                    message
                }
                other => return other,
            };
            attempts += 1;
            tracing::warn!(
                step = what,
                attempts,
                error,
                "not in the cluster yet: waiting for a majority of the peers"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn is_sole_voter(&self) -> bool {
        let voters: Vec<_> = self.membership().voter_ids().collect();
        voters == [self.me]
    }

    /// The metadata group's effective membership (voters and learners) as this broker
    /// knows it.
    fn membership(&self) -> openraft::Membership<BrokerId, BasicNode> {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .clone()
    }

    /// Waits until the metadata group has a leader, as long as it takes (a broker of a
    /// cluster starts before its peers are up); says so every 30 s.
    async fn wait_for_leader(&self) -> Result<(), Error> {
        loop {
            match self
                .raft
                .wait(Some(LEADER_WAIT))
                .metrics(|m| m.current_leader.is_some(), "a metadata leader")
                .await
            {
                Ok(_) => return Ok(()),
                Err(openraft::metrics::WaitError::Timeout(..)) => {
                    tracing::warn!(peers = ?self.peers, "no metadata leader yet: waiting for a majority of the peers");
                }
                Err(e) => return Err(Error::Storage(e.to_string())),
            }
        }
    }

    /// Announces this broker's address, through the controller, and waits until this broker
    /// has applied that entry: so a broker is ready only once it has caught up with the
    /// metadata committed before it (a registration with an unchanged address changes
    /// nothing else).
    async fn register(&self) -> Result<(), Error> {
        self.admin(AdminOp::RegisterBroker {
            id: self.me,
            address: self.address.clone(),
        })
        .await
        .map(|_| ())
    }

    /// Puts the topics of a data directory written before the cluster existed into the
    /// cluster's state, all partitions on this broker. Nothing in the log changes.
    async fn adopt_local(&self, log: &Log) -> Result<(), Error> {
        let mut adopted = 0usize;
        for topic in log.topics() {
            if self.state().topics.contains_key(&topic.name) {
                continue;
            }
            let config = topic.config();
            self.propose(Command::CreateTopic {
                name: topic.name.clone(),
                config,
                replicas: vec![vec![self.me]; config.partitions as usize],
            })
            .await?;
            // Adoption runs on a fresh cluster of one, where this broker leads.
            adopted += 1;
        }
        if adopted > 0 {
            tracing::info!(
                topics = adopted,
                "topics of the data directory adopted into the cluster's metadata"
            );
        }
        Ok(())
    }

    /// This broker's id.
    pub fn me(&self) -> BrokerId {
        self.me
    }

    /// The applied state (a snapshot of it; cheap).
    pub fn state(&self) -> Arc<ClusterState> {
        Arc::clone(&self.state.borrow().1)
    }

    /// The metadata group's leader (the controller), as far as this broker knows.
    pub fn metadata_leader(&self) -> Option<BrokerId> {
        self.raft.metrics().borrow_watched().current_leader
    }

    /// Proposes `cmd` to the metadata group and waits until it is applied here.
    ///
    /// # Errors
    ///
    /// [`Error::NoLeader`] when this broker is not the leader (forwarding comes with
    /// clusters of several brokers) or no leader is known.
    pub async fn propose(&self, cmd: Command) -> Result<Applied, Error> {
        self.raft
            .client_write(cmd)
            .await
            .map(|answer| answer.data)
            .map_err(write_error)
    }

    /// Creates a topic through the metadata group: `Ok(true)` when created, `Ok(false)` when
    /// it exists with the same settings.
    ///
    /// # Errors
    ///
    /// [`log::Error::TopicExists`] with other settings; see [`Cluster::propose`].
    pub async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<bool, Error> {
        self.until_joined().await?;
        self.admin(AdminOp::CreateTopic {
            name: name.to_owned(),
            config,
        })
        .await
    }

    async fn create_topic_here(&self, name: &str, config: TopicConfig) -> Result<bool, Error> {
        if let Some(existing) = self.state().topics.get(name) {
            return same_config(name, existing.config, config).map(|()| false);
        }
        let state = self.state();
        if config.replication_factor as usize > state.brokers.len() {
            return Err(
                log::Error::InvalidConfig(crate::validate::InvalidConfig::new(
                    "replication_factor",
                    format!(
                        "replication_factor is {} but the cluster has {} broker(s); use at most {}",
                        config.replication_factor,
                        state.brokers.len(),
                        state.brokers.len()
                    ),
                ))
                .into(),
            );
        }
        let replicas = state.place(config.partitions, config.replication_factor);
        let applied = self
            .propose(Command::CreateTopic {
                name: name.to_owned(),
                config,
                replicas,
            })
            .await?;
        if applied.unchanged {
            // Created meanwhile by another call: fine only with the same settings.
            if let Some(existing) = self.state().topics.get(name) {
                return same_config(name, existing.config, config).map(|()| false);
            }
        }
        Ok(true)
    }

    /// Changes a topic's settings through the metadata group; partitions only grow, new ones
    /// are placed by the controller.
    ///
    /// # Errors
    ///
    /// [`log::Error::TopicNotFound`], [`log::Error::PartitionsShrink`]; see
    /// [`Cluster::propose`].
    pub async fn update_topic(&self, name: &str, config: TopicConfig) -> Result<(), Error> {
        self.until_joined().await?;
        self.admin(AdminOp::UpdateTopic {
            name: name.to_owned(),
            config,
        })
        .await
        .map(|_| ())
    }

    async fn update_topic_here(&self, name: &str, config: TopicConfig) -> Result<(), Error> {
        let state = self.state();
        let current = state
            .topics
            .get(name)
            .ok_or_else(|| log::Error::TopicNotFound(crate::validate::quote(name)))?;
        if config.partitions < current.config.partitions {
            return Err(log::Error::PartitionsShrink {
                topic: name.to_owned(),
                current: current.config.partitions,
                requested: config.partitions,
            }
            .into());
        }
        if config.replication_factor != current.config.replication_factor {
            return Err(log::Error::InvalidConfig(crate::validate::InvalidConfig::new(
                "replication_factor",
                format!(
                    "the replication factor of topic {name:?} is {} and is set at creation; keep it {} in the update",
                    current.config.replication_factor, current.config.replication_factor
                ),
            ))
            .into());
        }
        let added = state.place(
            config.partitions - current.config.partitions,
            config.replication_factor,
        );
        self.propose(Command::UpdateTopic {
            name: name.to_owned(),
            config,
            added,
        })
        .await?;
        Ok(())
    }

    /// Deletes a topic through the metadata group.
    ///
    /// # Errors
    ///
    /// [`log::Error::TopicNotFound`]; see [`Cluster::propose`].
    pub async fn delete_topic(&self, name: &str) -> Result<(), Error> {
        self.until_joined().await?;
        self.admin(AdminOp::DeleteTopic {
            name: name.to_owned(),
        })
        .await
        .map(|_| ())
    }

    async fn delete_topic_here(&self, name: &str) -> Result<(), Error> {
        if !self.state().topics.contains_key(name) {
            return Err(log::Error::TopicNotFound(crate::validate::quote(name)).into());
        }
        let applied = self
            .propose(Command::DeleteTopic {
                name: name.to_owned(),
            })
            .await?;
        if applied.unchanged {
            return Err(log::Error::TopicNotFound(crate::validate::quote(name)).into());
        }
        Ok(())
    }

    async fn put_group_here(
        &self,
        name: &str,
        config: &GroupConfig,
        coordinator: BrokerId,
    ) -> Result<(), Error> {
        let state = self.state();
        if !state.topics.contains_key(&config.topic) {
            return Err(log::Error::TopicNotFound(crate::validate::quote(&config.topic)).into());
        }
        // A group of a replicated topic moves with its coordinator partition's leadership.
        if let Some(g) = state.groups.get(name)
            && g.coordinator != coordinator
            && g.partition.is_none()
        {
            return Err(Error::Remote {
                code: tonic::Code::AlreadyExists as i32,
                message: format!(
                    "group {name:?} exists, coordinated by broker {}",
                    g.coordinator
                ),
            });
        }
        self.propose(Command::PutGroup {
            name: name.to_owned(),
            config: config.clone(),
            coordinator,
        })
        .await?;
        Ok(())
    }

    /// Waits (up to 30 s) until this broker has joined the cluster.
    async fn until_joined(&self) -> Result<(), Error> {
        let mut joined = self.joined.subscribe();
        match tokio::time::timeout(LEADER_WAIT, joined.wait_for(|j| *j)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::NoLeader(
                "this broker has not joined the cluster yet".into(),
            )),
        }
    }

    /// Runs `op` on the controller: here when this broker leads the metadata group, else
    /// forwarded to the leader (one hop), retried over a leader change. Returns once this
    /// broker has applied the change too.
    async fn admin(&self, op: AdminOp) -> Result<bool, Error> {
        let mut last = Error::NoLeader("no attempt made".into());
        for attempt in 0..5u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            let Some(leader) = self.leader_within(Duration::from_secs(5)).await else {
                last = Error::NoLeader("no leader elected within 5 s".into());
                continue;
            };
            let result = if leader == self.me {
                self.admin_here(&op).await.map(|f| f.created)
            } else {
                self.forward(leader, &op).await
            };
            match result {
                Err(e @ (Error::NotLeader | Error::NoLeader(_))) => last = e,
                Err(Error::Remote { code, message }) if code == tonic::Code::Unavailable as i32 => {
                    last = Error::NoLeader(message);
                }
                other => return other,
            }
        }
        Err(last)
    }

    /// Runs `op` here, on the metadata leader; `Error::NotLeader` if this broker is not.
    /// Every change is checked against the state first ([`Cluster::read_index`]), so the
    /// state must be the leader's, with every committed entry applied.
    ///
    /// # Errors
    ///
    /// The checks of each change; see [`Cluster::propose`] and [`Cluster::read_index`].
    pub async fn admin_here(&self, op: &AdminOp) -> Result<Forwarded, Error> {
        self.read_index().await?;
        let created = match op {
            AdminOp::CreateTopic { name, config } => self.create_topic_here(name, *config).await?,
            AdminOp::UpdateTopic { name, config } => {
                self.update_topic_here(name, *config).await?;
                false
            }
            AdminOp::DeleteTopic { name } => {
                self.delete_topic_here(name).await?;
                false
            }
            AdminOp::PutGroup {
                name,
                config,
                coordinator,
            } => {
                self.put_group_here(name, config, *coordinator).await?;
                false
            }
            AdminOp::DeleteGroup { name } => {
                self.propose(Command::DeleteGroup { name: name.clone() })
                    .await?;
                false
            }
            AdminOp::AdoptGroups { broker, groups } => {
                self.propose(Command::AdoptGroups {
                    broker: *broker,
                    groups: groups.clone(),
                })
                .await?;
                false
            }
            AdminOp::AddBroker { id, address } => {
                self.add_broker_here(*id, address).await?;
                false
            }
            AdminOp::RemoveBroker { id } => {
                self.remove_broker_here(*id).await?;
                false
            }
            AdminOp::PartitionLeader {
                topic,
                partition,
                leader,
                term,
                in_sync,
            } => {
                self.propose(Command::PartitionLeader {
                    topic: topic.clone(),
                    partition: *partition,
                    leader: *leader,
                    term: *term,
                    in_sync: in_sync.clone(),
                })
                .await?;
                false
            }
            // `read_index` above did it.
            AdminOp::ReadIndex => false,
            AdminOp::RegisterBroker { id, address } => {
                // Always proposed: its commit is what tells a (re)starting broker that it
                // has caught up.
                self.propose(Command::RegisterBroker {
                    id: *id,
                    address: address.clone(),
                })
                .await?;
                false
            }
        };
        Ok(Forwarded {
            created,
            index: self.state.borrow().0,
        })
    }

    /// Confirms that this broker leads the metadata group and waits until its state has
    /// applied every entry committed before the call (at most [`READ_INDEX_WAIT`]): the
    /// ReadIndex of Raft's §6.4 (Ongaro's thesis; openraft's
    /// [`Raft::ensure_linearizable`](openraft::Raft::ensure_linearizable)). Without it a
    /// broker that was leader a moment ago, or a new leader that has not applied its
    /// predecessor's last entries yet, would judge a change against an older state (a
    /// topic created a moment before unknown to it).
    ///
    /// # Errors
    ///
    /// [`Error::NotLeader`] when another broker leads; [`Error::NoLeader`] when a quorum
    /// does not confirm the leadership in time.
    pub async fn read_index(&self) -> Result<(), Error> {
        match tokio::time::timeout(
            READ_INDEX_WAIT,
            self.raft
                .ensure_linearizable(openraft::ReadPolicy::ReadIndex),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(openraft::errors::RaftError::APIError(
                openraft::errors::LinearizableReadError::ForwardToLeader(_),
            ))) => Err(Error::NotLeader),
            Ok(Err(openraft::errors::RaftError::APIError(e))) => {
                Err(Error::NoLeader(e.to_string()))
            }
            Ok(Err(e @ openraft::errors::RaftError::Fatal(_))) => {
                Err(Error::Storage(e.to_string()))
            }
            Err(_) => Err(Error::NoLeader(format!(
                "a quorum did not confirm this broker's metadata leadership within {} ms",
                READ_INDEX_WAIT.as_millis()
            ))),
        }
    }

    /// Applies here at least what the metadata leader had applied when asked (a follower
    /// read: the leader's ReadIndex, then this broker's own apply up to it), at most
    /// [`CATCH_UP_WAIT`]; best effort: without a leader or an answer in time it returns
    /// all the same. For a call naming a topic or group this broker does not know: it may
    /// have been created through another broker a moment ago (a client that created a
    /// topic through one broker and produces to another), and an unknown name is answered
    /// NOT_FOUND only once this broker has seen what the leader had.
    pub async fn catch_up(&self) {
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(CATCH_UP_WAIT, self.admin(AdminOp::ReadIndex)).await {
            Ok(Ok(_)) => {
                tracing::trace!(took = ?started.elapsed(), "caught up with the metadata leader");
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, took = ?started.elapsed(), "catching up with the metadata leader failed");
            }
            Err(_) => {
                tracing::debug!(wait = ?CATCH_UP_WAIT, "catching up with the metadata leader: no answer in time");
            }
        }
    }

    /// The metadata leader, waiting up to `wait` for one.
    async fn leader_within(&self, wait: Duration) -> Option<BrokerId> {
        if let Some(l) = self.metadata_leader() {
            return Some(l);
        }
        self.raft
            .wait(Some(wait))
            .metrics(|m| m.current_leader.is_some(), "a metadata leader")
            .await
            .ok()
            .and_then(|m| m.current_leader)
    }

    /// Sends `op` to the leader `leader` and waits until this broker applied it.
    async fn forward(&self, leader: BrokerId, op: &AdminOp) -> Result<bool, Error> {
        let address = {
            let metrics = self.raft.metrics().borrow_watched().clone();
            metrics
                .membership_config
                .membership()
                .get_node(&leader)
                .map(|n| n.addr.clone())
        }
        .ok_or_else(|| Error::NoLeader(format!("no address known for broker {leader}")))?;
        // A leader that stops answering (paused, partitioned) is replaced by an election
        // within seconds, while the call would wait for its deadline (30 s): the call is
        // abandoned once another leader is known, and `admin` sends it there. Its outcome
        // is then unknown, as after that deadline or a broken connection (which `admin`
        // retries the same way).
        let wait = self.raft.wait(None);
        let replaced = wait.metrics(
            |m| m.current_leader.is_some_and(|l| l != leader),
            "another metadata leader",
        );
        let who = format!("broker {leader}");
        let forwarded = tokio::select! {
            answer = self.forward_to(&who, &address, op) => answer?,
            _ = replaced => {
                return Err(Error::NoLeader(format!(
                    "the metadata leader changed from broker {leader} while a change was forwarded to it"
                )));
            }
        };
        self.wait_applied(forwarded.index).await?;
        Ok(forwarded.created)
    }

    /// Sends `op` to the broker at `address` (`who` names it in errors).
    async fn forward_to(&self, who: &str, address: &str, op: &AdminOp) -> Result<Forwarded, Error> {
        let mut client = RaftClient::new(self.channel(address)?);
        let json = serde_json::to_vec(op).map_err(|e| Error::Storage(e.to_string()))?;
        let mut request = tonic::Request::new(RaftMessage { json: json.into() });
        request.set_timeout(Duration::from_secs(30));
        let answer = client.forward(request).await.map_err(|s| {
            Error::NoLeader(format!("forwarding to {who} at {address}: {}", s.message()))
        })?;
        let answer: Result<Forwarded, RemoteError> =
            serde_json::from_slice(&answer.into_inner().json)
                .map_err(|e| Error::Storage(format!("undecodable answer of {who}: {e}")))?;
        answer.map_err(|e| Error::Remote {
            code: e.code,
            message: e.message,
        })
    }

    /// Runs `op` on the controller wherever it is (forwarded when this broker does not
    /// lead): for a broker that asks a peer to let it join, when the peer may not lead.
    ///
    /// # Errors
    ///
    /// See [`Cluster::admin_here`].
    pub async fn relay(&self, op: AdminOp) -> Result<Forwarded, Error> {
        let created = self.admin(op).await?;
        Ok(Forwarded {
            created,
            index: self.applied_index(),
        })
    }

    /// Joins the metadata group that `--peers` formed, this broker not among them: asks
    /// each peer in turn until one lets it in (the controller adds it as a learner, waits
    /// until it caught up, and promotes it to voter while the group has fewer than
    /// [`VOTERS`]).
    async fn join_as_learner(&self) -> Result<(), Error> {
        let op = AdminOp::AddBroker {
            id: self.me,
            address: self.address.clone(),
        };
        let started = std::time::Instant::now();
        let mut warned = started;
        loop {
            for (id, address) in &self.peers {
                match self.forward_to(&format!("peer {id}"), address, &op).await {
                    Ok(_) => {
                        tracing::info!(peer = id, "joined the metadata group");
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::debug!(peer = id, error = %e, "joining through this peer failed");
                    }
                }
            }
            if warned.elapsed() > LEADER_WAIT {
                warned = std::time::Instant::now();
                tracing::warn!(peers = ?self.peers, waited_s = started.elapsed().as_secs(), "not in the metadata group yet: no peer let this broker join");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// On the controller: adds broker `id` at `address` as a learner (returning once it
    /// caught up with the log), then promotes learners to voters while there are fewer than
    /// [`VOTERS`], two at a time from one voter so the count stays odd (a group of two
    /// voters survives no loss, one of three survives one). The Raft rule: membership
    /// changes go through joint consensus (openraft `change_membership`).
    async fn add_broker_here(&self, id: BrokerId, address: &str) -> Result<(), Error> {
        if self.metadata_leader() != Some(self.me) {
            return Err(Error::NotLeader);
        }
        self.raft
            .add_learner(id, BasicNode::new(address), true)
            .await
            .map_err(write_error)?;
        tracing::info!(
            broker = id,
            address,
            "broker added to the metadata group as a learner"
        );
        let membership = self.membership();
        let voters: Vec<BrokerId> = membership.voter_ids().collect();
        let learners: Vec<BrokerId> = membership.learner_ids().collect();
        let need = VOTERS.saturating_sub(voters.len());
        if need == 0 || learners.len() < need {
            return Ok(());
        }
        let promoted: std::collections::BTreeSet<BrokerId> =
            learners.into_iter().take(need).collect();
        self.raft
            .change_membership(
                openraft::ChangeMembers::AddVoterIds(promoted.clone()),
                false,
            )
            .await
            .map_err(write_error)?;
        tracing::info!(brokers = ?promoted, "learners promoted to voters of the metadata group");
        Ok(())
    }

    /// Removes broker `id` from the cluster (scale-down): from the state, so nothing is
    /// placed on it any more, then from the metadata group, a voter replaced by a learner
    /// when one is there (up to [`VOTERS`]). Only a broker that leads no partition leaves
    /// (its partitions would be lost with it: moving them is for replication); the check is
    /// made again when the removal is applied, so a topic placed on it meanwhile keeps it.
    ///
    /// # Errors
    ///
    /// `NOT_FOUND` for a broker not in the cluster, `FAILED_PRECONDITION` while it leads
    /// partitions or is the only voter; see [`Cluster::propose`].
    pub async fn remove_broker(&self, id: BrokerId) -> Result<(), Error> {
        self.until_joined().await?;
        self.admin(AdminOp::RemoveBroker { id }).await.map(|_| ())
    }

    async fn remove_broker_here(&self, id: BrokerId) -> Result<(), Error> {
        if self.metadata_leader() != Some(self.me) {
            return Err(Error::NotLeader);
        }
        let held = |state: &ClusterState| -> Result<(), Error> {
            let led = state.partitions_led_by(id);
            if led.is_empty() {
                return Ok(());
            }
            let shown: Vec<String> = led
                .iter()
                .take(10)
                .map(|(t, p)| format!("{t}/{p}"))
                .collect();
            Err(Error::Remote {
                code: tonic::Code::FailedPrecondition as i32,
                message: format!(
                    "broker {id} leads {} partitions ({}{}); a broker leaves the cluster only once it holds no partition: delete their topics first (moving partitions comes with replication)",
                    led.len(),
                    shown.join(", "),
                    if led.len() > shown.len() { ", …" } else { "" }
                ),
            })
        };
        let state = self.state();
        held(&state)?;
        let membership = self.membership();
        let voters: std::collections::BTreeSet<BrokerId> = membership.voter_ids().collect();
        let member = membership.nodes().any(|(n, _)| *n == id);
        if !member && !state.brokers.contains_key(&id) {
            return Err(Error::Remote {
                code: tonic::Code::NotFound as i32,
                message: format!(
                    "broker {id} is not in the cluster; `weir cluster describe` lists its brokers"
                ),
            });
        }
        if voters.len() == 1 && voters.contains(&id) {
            return Err(Error::Remote {
                code: tonic::Code::FailedPrecondition as i32,
                message: format!("broker {id} is the metadata group's only voter; it cannot leave"),
            });
        }
        self.propose(Command::RemoveBroker { id }).await?;
        held(&self.state())?;
        if voters.contains(&id) {
            let mut next: std::collections::BTreeSet<BrokerId> =
                voters.iter().copied().filter(|&v| v != id).collect();
            for l in membership.learner_ids() {
                if next.len() >= VOTERS {
                    break;
                }
                if l != id {
                    next.insert(l);
                }
            }
            self.raft
                .change_membership(
                    openraft::ChangeMembers::ReplaceAllVoters(next.clone()),
                    false,
                )
                .await
                .map_err(write_error)?;
            tracing::info!(broker = id, voters = ?next, "broker removed from the metadata group");
        } else if member {
            self.raft
                .change_membership(
                    openraft::ChangeMembers::RemoveNodes(std::collections::BTreeSet::from([id])),
                    false,
                )
                .await
                .map_err(write_error)?;
            tracing::info!(broker = id, "learner removed from the metadata group");
        }
        Ok(())
    }

    fn channel(&self, address: &str) -> Result<tonic::transport::Channel, Error> {
        let mut channels = self.channels.lock();
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| Error::NoLeader(format!("bad peer address {address}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .initial_stream_window_size(8 * 1024 * 1024)
            .initial_connection_window_size(32 * 1024 * 1024);
        let channel = endpoint.connect_lazy();
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    /// The metadata log index this broker has applied.
    pub fn applied_index(&self) -> u64 {
        self.state.borrow().0
    }

    /// Waits until this broker's state machine applied `index` (at most 10 s): a call
    /// forwarded by a broker that has seen newer metadata (a topic just created) is served
    /// only once this broker has too.
    ///
    /// # Errors
    ///
    /// [`Error::NoLeader`] after 10 s.
    pub async fn wait_applied(&self, index: u64) -> Result<(), Error> {
        let mut rx = self.state.clone();
        match tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|(i, _)| *i >= index)).await
        {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::NoLeader(format!(
                "the change was committed but this broker has not applied it within 10 s (index {index})"
            ))),
        }
    }

    /// Reports the metadata group's figures to `metrics` until the node stops: entries
    /// applied, term, leadership, leader changes.
    pub fn spawn_metrics(&self, metrics: Arc<crate::metrics::Metrics>) {
        let mut rx = self.raft.metrics();
        let me = self.me;
        tokio::spawn(async move {
            let mut leader = None;
            loop {
                let (applied, term, current) = {
                    let m = rx.borrow_watched();
                    (
                        m.last_applied.as_ref().map_or(0, openraft::LogId::index),
                        m.current_term,
                        m.current_leader,
                    )
                };
                let changed = current.is_some() && current != leader;
                leader = current;
                metrics.observe_metadata(applied, term, current == Some(me), changed);
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
    }

    /// Stops the Raft node.
    pub async fn shutdown(&self) {
        self.replicas.shutdown().await;
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "stopping the metadata group's node");
        }
    }

    /// The node, for the `weir.v1.Raft` service.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }
}

/// A failed write to the metadata group as this module's error.
fn write_error(
    e: openraft::errors::RaftError<TypeConfig, openraft::errors::ClientWriteError<TypeConfig>>,
) -> Error {
    match e {
        openraft::errors::RaftError::APIError(
            openraft::errors::ClientWriteError::ForwardToLeader(_),
        ) => Error::NotLeader,
        openraft::errors::RaftError::APIError(e) => Error::NoLeader(e.to_string()),
        e @ openraft::errors::RaftError::Fatal(_) => Error::Storage(e.to_string()),
    }
}

fn same_config(name: &str, existing: TopicConfig, requested: TopicConfig) -> Result<(), Error> {
    if existing == requested {
        Ok(())
    } else {
        Err(log::Error::TopicExists {
            name: name.to_owned(),
            existing: Box::new(existing),
        }
        .into())
    }
}
