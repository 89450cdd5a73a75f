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
pub mod state;
pub mod store;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use openraft::{BasicNode, async_runtime::WatchReceiver};

use self::state::{Applied, Command};
pub use self::state::{BrokerId, ClusterState};
use crate::log::{self, Log, TopicConfig};

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
}

/// This broker's view of, and part in, the cluster.
pub struct Cluster {
    raft: Raft,
    me: BrokerId,
    address: String,
    state: store::AppliedState,
    /// Nothing of a metadata group was stored when this broker started.
    fresh: bool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.me)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// How long start-up waits for the metadata group to elect a leader.
const LEADER_WAIT: Duration = Duration::from_secs(30);

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
        let log_store = store::LogStore::new(db.clone(), ks.clone());
        let fresh = log_store.is_empty()?;
        let (sm, state) = store::StateMachine::open(db, ks, Arc::clone(&log), options.node_id)?;
        let config = openraft::Config {
            cluster_name: "weir-metadata".into(),
            heartbeat_interval: 100,
            election_timeout_min: 500,
            election_timeout_max: 1000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
            max_in_snapshot_log_to_keep: 100,
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
        Ok(Arc::new(Self {
            raft,
            me: options.node_id,
            address: options.advertise,
            state,
            fresh,
        }))
    }

    /// Brings this broker into the cluster: a broker that was never part of one starts a
    /// cluster of its own (and adopts the topics of its data directory); then it waits for a
    /// leader and registers its address.
    ///
    /// # Errors
    ///
    /// Storage errors, or no leader within 30 s.
    pub async fn join(&self, log: &Log) -> Result<(), Error> {
        let cluster = self;
        if self.fresh {
            let members = BTreeMap::from([(
                self.me,
                BasicNode {
                    addr: self.address.clone(),
                },
            )]);
            cluster
                .raft
                .initialize(members)
                .await
                .map_err(|e| Error::Storage(format!("initializing the metadata group: {e}")))?;
        } else if cluster.is_sole_voter() {
            // A cluster of one need not wait out an election timeout at every restart.
            if let Err(e) = cluster.raft.trigger().elect(false).await {
                tracing::warn!(error = %e, "starting the election at once failed");
            }
        }
        cluster.wait_for_leader().await?;
        cluster.register().await?;
        if self.fresh {
            cluster.adopt_local(log).await?;
        }
        Ok(())
    }

    fn is_sole_voter(&self) -> bool {
        let m = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .clone();
        let voters: Vec<_> = m.membership().voter_ids().collect();
        voters == [self.me]
    }

    async fn wait_for_leader(&self) -> Result<(), Error> {
        self.raft
            .wait(Some(LEADER_WAIT))
            .metrics(|m| m.current_leader.is_some(), "a metadata leader")
            .await
            .map(|_| ())
            .map_err(|e| Error::NoLeader(e.to_string()))
    }

    /// Announces this broker's address (again) unless the state already has it.
    async fn register(&self) -> Result<(), Error> {
        let known = self
            .state()
            .brokers
            .get(&self.me)
            .map(|b| b.address.clone());
        if known.as_deref() != Some(self.address.as_str()) {
            self.propose(Command::RegisterBroker {
                id: self.me,
                address: self.address.clone(),
            })
            .await?;
        }
        Ok(())
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
        match self.raft.client_write(cmd).await {
            Ok(answer) => Ok(answer.data),
            Err(openraft::errors::RaftError::APIError(e)) => Err(Error::NoLeader(e.to_string())),
            Err(e) => Err(Error::Storage(e.to_string())),
        }
    }

    /// Creates a topic through the metadata group: `Ok(true)` when created, `Ok(false)` when
    /// it exists with the same settings.
    ///
    /// # Errors
    ///
    /// [`log::Error::TopicExists`] with other settings; see [`Cluster::propose`].
    pub async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<bool, Error> {
        if let Some(existing) = self.state().topics.get(name) {
            return same_config(name, existing.config, config).map(|()| false);
        }
        let replicas = self.state().place(config.partitions);
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
        let added = state.place(config.partitions - current.config.partitions);
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

    /// Stops the Raft node.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "stopping the metadata group's node");
        }
    }

    /// The node, for the `weir.v1.Raft` service.
    pub fn raft(&self) -> &Raft {
        &self.raft
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
