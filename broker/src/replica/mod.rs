//! Replicated partitions: each partition of a topic with `replication_factor` above 1 is a
//! Raft group (openraft) over its replicas, one group per partition, as Redpanda does.
//! Design: `docs/replication.md`.
//!
//! The partition's log is the Raft log ([`store`]): a produce is one entry holding the
//! request's record batch; every replica stores it at the same offsets with the entry's term
//! as the batch's leader epoch; the leader answers once a majority have it fsynced and the
//! entry is applied, which moves the partition's high watermark (what fetches and groups
//! read up to). Uncommitted entries of a deposed leader are truncated, never served.
//!
//! Parts: [`store`] (log store and state machine over the log engine), [`network`] (the
//! messages between brokers). This module holds the registry of the groups this broker
//! takes part in and proposes produce requests ([`Replicas`] implements
//! [`crate::log::Replicator`]).

mod in_sync;
pub mod network;
pub mod store;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use fjall::Keyspace;
use futures::StreamExt;
use openraft::{BasicNode, async_runtime::WatchReceiver, impls::ProgressResponder};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use weir_proto::v1::PartitionRaftMessage;

use crate::log::{
    self, Ack, Log, Partition, Topic,
    idempotence::{Idempotence, ProducerState, SequenceCheck, SequenceError},
    keys::{self, GroupKey},
    topic::Durability,
};

openraft::declare_raft_types!(
    /// A replica group's types: record batches in, their offsets out; standard Raft leader
    /// ids (one leader per term), so an entry's term is its batch's leader epoch.
    pub ReplicaTypes:
        D = Proposal,
        R = Appended,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

/// A replica group's Raft node.
pub type ReplicaRaft = openraft::Raft<ReplicaTypes, store::ReplicaMachine>;

/// What a leader proposes to its partition's Raft log: one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Proposal {
    /// A produce request's records for the partition.
    Records {
        /// The record batch ([`crate::log::batch::encode`]; sealed on each replica with its
        /// offset and the entry's term).
        batch: bytes::Bytes,
        /// Records in it.
        records: u32,
        /// The idempotent producer's `(id, sequence)`, if any: every replica rebuilds the
        /// producers' state from the entries it applies.
        producer: Option<(u64, u64)>,
    },
    /// A consumer group's cursors, kept in its coordinator partition's log (as Kafka
    /// commits offsets into `__consumer_offsets`): every replica keeps the latest of each.
    Cursors(GroupCursors),
    /// Retention decided by the leader (`maxAge`, size limits): every replica deletes the
    /// records below `earliest` (whole batches; the earliest offset may fall inside one),
    /// so all replicas keep the same records.
    Trim {
        /// The partition's new earliest offset.
        earliest: u64,
    },
}

/// A consumer group's cursors of some partitions of its topic, as the group stores them
/// (opaque here).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCursors {
    /// Group name.
    pub group: String,
    /// `(partition, cursor)` pairs.
    pub cursors: Vec<(u32, Vec<u8>)>,
}

impl std::fmt::Display for Proposal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Records { batch, records, .. } => {
                write!(f, "{records} records, {} bytes", batch.len())
            }
            Self::Cursors(c) => write!(f, "{} cursors of group {}", c.cursors.len(), c.group),
            Self::Trim { earliest } => write!(f, "trim below offset {earliest}"),
        }
    }
}

/// Where an applied entry's records are: offsets `base_offset..base_offset + records`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Records.
    pub records: u32,
}

/// Settings of replica groups.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaOptions {
    /// Leader heartbeat interval (ms).
    pub heartbeat_ms: u64,
    /// Followers start an election after between this and twice this without hearing from
    /// a leader (ms).
    pub election_timeout_ms: u64,
    /// A follower is in sync while it has every entry its leader had this long ago and has
    /// acknowledged the leader within it (ms; Kafka's `replica.lag.time.max.ms`).
    pub lag_max_ms: u64,
}

impl Default for ReplicaOptions {
    /// Heartbeats every 100 ms, elections after 500–1,000 ms (a leader's loss is repaired
    /// within 2 s, as `docs/replication.md` sets).
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_timeout_ms: 500,
            lag_max_ms: 10_000,
        }
    }
}

/// How many entries a preferred replica may be behind its leader for the leadership to move
/// back to it.
const PREFERRED_LAG: u64 = 1000;

/// A preferred replica is handed the leadership only if it answered the leader's last
/// heartbeat or append within this (ms: two heartbeat intervals at the defaults).
const PREFERRED_ANSWERED_WITHIN: Duration = Duration::from_millis(300);

/// The answers of a `weir.v1.Raft/PartitionAppends` stream ([`Replicas::serve_appends`]).
pub type AppendAnswers =
    futures::stream::BoxStream<'static, Result<PartitionRaftMessage, tonic::Status>>;

/// The pooled channels to peers, by address (shared by every group).
#[derive(Clone, Default)]
pub struct Channels(Arc<parking_lot::Mutex<HashMap<String, tonic::transport::Channel>>>);

impl Channels {
    /// The channel to `address` (`host:port`), opened lazily.
    pub fn get(&self, address: &str) -> Result<tonic::transport::Channel, String> {
        let mut map = self.0.lock();
        if let Some(c) = map.get(address) {
            return Ok(c.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| format!("bad peer address {address:?}: {e}"))?
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .connect_lazy();
        map.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }
}

/// A partition replica on this broker.
pub struct Replica {
    /// The group's Raft node.
    pub raft: ReplicaRaft,
    /// The local partition.
    pub partition: Arc<Partition>,
    /// Topic name.
    pub topic: String,
    /// The group.
    pub group: GroupKey,
    /// Idempotent producers' sequences as this leader proposed them.
    sequencer: tokio::sync::Mutex<Sequencer>,
    /// The state the store and state machine share (the applied producers' state).
    shared: Arc<store::Shared>,
    /// The preferred leader: the partition's first replica in the placement.
    preferred: Option<u64>,
    /// This replica lost stored entries (damaged storage) and has not received them again
    /// yet: it neither stands for election nor votes for a candidate behind `had_log`
    /// ([`Replicas::open`]).
    repairing: std::sync::atomic::AtomicBool,
    /// While repairing: the last log id `(term, index)` this replica's log had reached
    /// before the damage (`None`: not known, and then it votes for nobody).
    had_log: Option<(u64, u64)>,
}

impl Replica {
    /// Whether this replica is being repaired from its peers (see [`Replicas::open`]).
    pub fn is_repairing(&self) -> bool {
        self.repairing.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// Refuses a vote (or pre-vote) request while `replica` is being repaired unless the
/// candidate's last log id is at least the one the replica had before its damage: Raft's
/// voting rule (§5.4.1 of the Raft paper) applied to the log the replica had, not the
/// shorter one it has. Refused as if down (`UNAVAILABLE`), so the candidate counts it
/// among the replicas that did not answer.
fn refuse_if_behind_damage(
    replica: &Replica,
    req: &openraft::raft::VoteRequest<ReplicaTypes>,
) -> Result<(), tonic::Status> {
    if !replica.is_repairing() {
        return Ok(());
    }
    let candidate = req.last_log_id.as_ref().map(store::log_pair);
    match replica.had_log {
        Some(had) if candidate.is_some_and(|c| c >= had) => Ok(()),
        had => Err(tonic::Status::unavailable(format!(
            "this replica is being repaired from its peers after damage to its storage; it votes only for a candidate whose last log id (term, index) reaches {had:?}, the one it had, and this candidate's is {candidate:?}"
        ))),
    }
}

/// Counters of this broker's replicas, read by `/metrics`.
#[derive(Debug, Default)]
pub struct ReplicaStats {
    /// Replicas repaired from their peers after damage to their stored data
    /// (`weir_replica_repairs_total`).
    pub repairs: std::sync::atomic::AtomicU64,
    /// Times a replica here became its partition's leader
    /// (`weir_replica_leader_elections_total`).
    pub elections: std::sync::atomic::AtomicU64,
    /// Partition replicas on this broker (`weir_replica_partitions`).
    pub replicas: std::sync::atomic::AtomicU64,
    /// Partitions led here (`weir_replica_leaders`).
    pub leaders: std::sync::atomic::AtomicU64,
    /// Partitions led here with fewer replicas in sync than replicas
    /// (`weir_replica_under_replicated_partitions`, Kafka's `UnderReplicatedPartitions`).
    pub under_replicated: std::sync::atomic::AtomicU64,
    /// The most entries a follower of a partition led here is behind its leader's log
    /// (`weir_replica_max_lag_entries`, Kafka's `MaxLag`).
    pub max_lag_entries: std::sync::atomic::AtomicU64,
    /// AppendEntries messages sent to followers on streams of appends
    /// (`weir_replica_append_messages_total`).
    pub append_messages: std::sync::atomic::AtomicU64,
    /// AppendEntries that carried only a newer commit index, folded into the next message
    /// to a follower that no reader waits on (`weir_replica_commits_folded_total`).
    pub commits_folded: std::sync::atomic::AtomicU64,
}

/// The leader's view of idempotent producers' sequences: the applied state plus the
/// proposals of its term not yet applied, so that a pipelined request is checked against
/// the one before it (Kafka's leader checks at append time against its log, unreplicated
/// batches included). Valid for one term: a leader that took over first waits until every
/// entry of earlier terms is applied (a ReadIndex round), then starts from the applied state.
#[derive(Default)]
struct Sequencer {
    /// The term the view is for; `None` until built.
    term: Option<u64>,
    /// Highest sequence proposed or applied, by producer id.
    last: HashMap<u64, u64>,
}

/// A replica that became its group's leader, or whose in-sync replicas changed, for the
/// controller to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderChange {
    /// Topic name.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The leader (this broker).
    pub leader: u64,
    /// Its term.
    pub term: u64,
    /// The replicas in sync, the leader among them, sorted.
    pub in_sync: Vec<u64>,
}

/// The replica groups this broker takes part in.
pub struct Replicas {
    me: u64,
    log: Arc<Log>,
    raft_ks: Keyspace,
    config: Arc<openraft::Config>,
    channels: Channels,
    groups: parking_lot::Mutex<HashMap<GroupKey, Arc<Replica>>>,
    /// The same replicas by their local partition's key prefix (the produce path's lookup).
    by_partition: parking_lot::Mutex<HashMap<[u8; 8], Arc<Replica>>>,
    /// Serializes opening and closing groups.
    opening: tokio::sync::Mutex<()>,
    leaders: mpsc::UnboundedSender<LeaderChange>,
    stats: Arc<ReplicaStats>,
    /// [`ReplicaOptions::lag_max_ms`].
    lag_max_ms: u64,
}

impl std::fmt::Debug for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicas")
            .field("me", &self.me)
            .field("groups", &self.groups.lock().len())
            .finish_non_exhaustive()
    }
}

impl Replicas {
    /// The registry of `log`'s replica groups, for broker `me`; returns the receiver of the
    /// leader changes of its groups.
    ///
    /// # Errors
    ///
    /// The `raft` keyspace cannot be opened, or the Raft settings are invalid.
    pub fn new(
        me: u64,
        log: &Arc<Log>,
        options: ReplicaOptions,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<LeaderChange>), log::Error> {
        let raft_ks = log.keyspace("raft")?;
        let config = openraft::Config {
            cluster_name: "weir-partition".into(),
            heartbeat_interval: options.heartbeat_ms,
            election_timeout_min: options.election_timeout_ms,
            election_timeout_max: options.election_timeout_ms * 2,
            // Under writes, replication stands in for heartbeats.
            heartbeat_min_interval: Some(options.heartbeat_ms),
            // The log is the partition's records: never compacted into a snapshot (records
            // leave by retention).
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: u64::MAX,
            enable_pre_vote: Some(true),
            // A replica whose storage lost entries truncates its log and is sent them again
            // (`Replicas::open`); the leader must then accept that the follower's log went
            // back instead of treating it as a bug. Safe because such a replica neither
            // votes nor stands until it has them again.
            allow_log_reversion: Some(true),
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(|e| log::Error::Replica {
            topic: String::new(),
            partition: 0,
            message: format!("raft settings: {e}"),
        })?);
        let (leaders, rx) = mpsc::unbounded_channel();
        let replicas = Arc::new(Self {
            me,
            log: Arc::clone(log),
            raft_ks,
            config,
            channels: Channels::default(),
            groups: parking_lot::Mutex::default(),
            by_partition: parking_lot::Mutex::default(),
            opening: tokio::sync::Mutex::new(()),
            leaders,
            stats: Arc::default(),
            lag_max_ms: options.lag_max_ms,
        });
        log.set_replicator(Arc::clone(&replicas) as Arc<dyn log::Replicator>);
        Ok((replicas, rx))
    }

    /// The replica of `group`, if this broker has one.
    pub fn get(&self, group: &GroupKey) -> Option<Arc<Replica>> {
        self.groups.lock().get(group).cloned()
    }

    /// The counters of this broker's replicas.
    pub fn stats(&self) -> &ReplicaStats {
        &self.stats
    }

    /// Every replica on this broker.
    pub fn all(&self) -> Vec<Arc<Replica>> {
        self.groups.lock().values().cloned().collect()
    }

    /// How many replicas here are being repaired after damage (not voting meanwhile).
    pub fn repairing_count(&self) -> u64 {
        self.groups
            .lock()
            .values()
            .filter(|r| r.is_repairing())
            .count() as u64
    }

    /// Opens this broker's replica of partition `index` of `topic` (cluster topic id
    /// `topic_id`) whose replicas are `members` (broker id → address), unless open. A group
    /// that never stored anything is initialized with `members` (every replica does so
    /// with the same membership; openraft accepts that, one election wins), and its
    /// `preferred` leader starts the first election at once.
    ///
    /// A replica whose stored data was damaged (entries whose batches are gone, a lost
    /// journal tail: [`store::Shared::check_and_align`]) truncates its log before the damage
    /// and takes the rest from the leader like a follower that fell behind. Until its log
    /// is again at least as up to date as it was (Raft's order of logs: last term, then
    /// last index), it neither stands for election, nor takes a leadership transfer, nor
    /// restores a leadership it held, and it votes only for a candidate whose last log id
    /// is at least the one it had before the damage (kept outside the journal by the log
    /// end checkpoint): Raft counts on a voter keeping what it acknowledged, and one that
    /// forgot, voting by its shorter log, could help elect a leader without committed
    /// entries (the "protocol-aware recovery" rule, Alagappan et al., FAST '18). Voting by
    /// the log it had keeps Raft's rule, so two damaged replicas of three still elect the
    /// third when it holds what they had. Logged when found and when repaired, and counted
    /// (`weir_replica_repairs_total`).
    ///
    /// # Errors
    ///
    /// Storage errors.
    pub async fn open(
        &self,
        topic: &Arc<Topic>,
        topic_id: u64,
        index: u32,
        members: &BTreeMap<u64, String>,
        preferred: Option<u64>,
    ) -> Result<(), log::Error> {
        let group = keys::group_key_of(topic_id, index);
        let _guard = self.opening.lock().await;
        if self.groups.lock().contains_key(&group) {
            return Ok(());
        }
        let partition = topic.partition(index)?;
        let fail = |message: String| log::Error::Replica {
            topic: topic.name.clone(),
            partition: index,
            message,
        };
        let shared = store::Shared::new(
            Arc::clone(&self.log),
            self.raft_ks.clone(),
            group,
            Arc::clone(&partition),
            topic.config().durability == Durability::Fsync,
        );
        let fresh = shared.is_empty().map_err(|e| fail(e.to_string()))?;
        let kept = Arc::clone(&shared);
        let damage = shared
            .check_and_align()
            .await
            .map_err(|e| fail(e.to_string()))?;
        let config = match damage {
            Some(d) => {
                tracing::error!(topic = %topic.name, partition = index, lost_from = d.lost_from, lost_to = d.lost_to, truncated_from_entry = d.truncated_from, had_log = ?d.had_log, "this replica lost stored records (damaged storage): log truncated before the damage; it takes the records from the leader, does not stand for election and votes only for a candidate whose log reaches what it had, until it has them again");
                Arc::new(openraft::Config {
                    enable_leader_restore: Some(false),
                    ..(*self.config).clone()
                })
            }
            None => Arc::clone(&self.config),
        };
        let machine =
            store::ReplicaMachine::open(Arc::clone(&shared)).map_err(|e| fail(e.to_string()))?;
        let network = network::Network {
            group,
            channels: self.channels.clone(),
            answer_deadline: Duration::from_millis(self.config.election_timeout_min),
            stats: Arc::clone(&self.stats),
        };
        let raft = ReplicaRaft::new(self.me, config, network, store::ReplicaLog(shared), machine)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if fresh {
            let nodes: BTreeMap<u64, BasicNode> = members
                .iter()
                .map(|(&id, addr)| (id, BasicNode::new(addr.clone())))
                .collect();
            match raft.initialize(nodes).await {
                Ok(()) | Err(openraft::errors::RaftError::APIError(_)) => {}
                Err(e) => return Err(fail(format!("initializing the replica group: {e}"))),
            }
            if preferred == Some(self.me) {
                // The preferred leader (the first replica, whom routing names until a leader
                // is reported) stands at once; the others wait out an election timeout.
                if let Err(e) = raft.trigger().elect(false).await {
                    tracing::warn!(topic = %topic.name, partition = index, error = %e, "starting the first election failed");
                }
            }
        }
        let replica = Arc::new(Replica {
            raft,
            partition,
            topic: topic.name.clone(),
            group,
            sequencer: tokio::sync::Mutex::default(),
            shared: kept,
            preferred,
            repairing: std::sync::atomic::AtomicBool::new(damage.is_some()),
            had_log: damage.and_then(|d| d.had_log),
        });
        if let Some(d) = damage {
            replica.raft.runtime_config().elect(false);
            self.watch_repair(&replica, d);
        }
        self.watch_leadership(&replica, index);
        spawn_purges(&replica);
        self.by_partition
            .lock()
            .insert(replica.partition.prefix(), Arc::clone(&replica));
        self.groups.lock().insert(group, replica);
        tracing::info!(topic = %topic.name, partition = index, members = ?members.keys().collect::<Vec<_>>(), "replica opened");
        Ok(())
    }

    /// Waits until a damaged `replica` is repaired, then lets it stand again; logged and
    /// counted. Repaired: its last stored log id is at least the one it had before the
    /// damage (when that is not known: it stored again every offset it had). Gives up when
    /// the replica is closed.
    fn watch_repair(&self, replica: &Arc<Replica>, damage: store::Damage) {
        let weak = Arc::downgrade(replica);
        let mut stored = replica.shared.stored_index();
        let stats = Arc::clone(&self.stats);
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            loop {
                let Some(r) = weak.upgrade() else { return };
                if r.partition.is_deleted() {
                    return;
                }
                let next = *stored.borrow_and_update();
                let repaired = match damage.had_log {
                    Some(had) => r
                        .shared
                        .last_log_before(next)
                        .map(|now| now.is_some_and(|now| now >= had)),
                    None => r.shared.stored_end(next).map(|end| end >= damage.lost_to),
                }
                .and_then(|repaired| {
                    if repaired {
                        r.shared.repaired()?;
                    }
                    Ok(repaired)
                });
                match repaired {
                    Ok(true) => {
                        r.repairing
                            .store(false, std::sync::atomic::Ordering::Release);
                        r.raft.runtime_config().elect(true);
                        stats
                            .repairs
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(topic = %r.topic, partition = r.partition.index, records_from = damage.lost_from, records_to = damage.lost_to, had_log = ?damage.had_log, elapsed_ms = started.elapsed().as_millis() as u64, "replica repaired from its peers: its log is again as up to date as it was; it stands and votes as before");
                        return;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(topic = %r.topic, partition = r.partition.index, error = %e, "reading a repairing replica's log end failed");
                    }
                }
                drop(r);
                if let Ok(Err(_)) =
                    tokio::time::timeout(Duration::from_secs(5), stored.changed()).await
                {
                    return;
                }
            }
        });
    }

    /// Reports each time this broker's replica becomes its group's leader.
    ///
    /// Watches openraft's server metrics (vote, state, leader, membership), which change
    /// only with them: its full metrics are sent after every turn of the Raft core's loop,
    /// several times per entry, and a watcher of those would be woken as often.
    fn watch_leadership(&self, replica: &Arc<Replica>, index: u32) {
        let mut metrics = replica.raft.server_metrics();
        let tx = self.leaders.clone();
        let stats = Arc::clone(&self.stats);
        let (me, topic) = (self.me, replica.topic.clone());
        tokio::spawn(async move {
            let mut reported = None;
            loop {
                let (leader, term) = {
                    let m = metrics.borrow_watched();
                    (m.current_leader, m.vote.leader_id.term)
                };
                if leader == Some(me) && reported != Some(term) {
                    reported = Some(term);
                    stats
                        .elections
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let change = LeaderChange {
                        topic: topic.clone(),
                        partition: index,
                        leader: me,
                        term,
                        // Not known yet: the recorded ones stay until the leader's first
                        // sample ([`Replicas::spawn_in_sync`]).
                        in_sync: Vec::new(),
                    };
                    if tx.send(change).is_err() {
                        return;
                    }
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Closes and forgets the replicas of topic `name` (deleted): their Raft nodes stop and
    /// their Raft state is deleted (the records go with the topic).
    pub async fn close_topic(&self, name: &str) {
        let _guard = self.opening.lock().await;
        let closing: Vec<Arc<Replica>> = {
            let mut groups = self.groups.lock();
            let keys: Vec<GroupKey> = groups
                .iter()
                .filter(|(_, r)| r.topic == name)
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| groups.remove(k)).collect()
        };
        {
            let mut by_partition = self.by_partition.lock();
            for r in &closing {
                by_partition.remove(&r.partition.prefix());
            }
        }
        for replica in closing {
            if let Err(e) = replica.raft.shutdown().await {
                tracing::warn!(topic = %name, error = %e, "stopping a replica failed");
            }
            let prefix = keys::replica_key(replica.group, 0);
            let ks = self.raft_ks.clone();
            let db = self.log.database();
            let deleted = tokio::task::spawn_blocking(move || {
                let mut wb = db.batch();
                for guard in ks.prefix(&prefix[..13]) {
                    wb.remove(&ks, guard.key()?);
                }
                wb.commit()
            })
            .await;
            if !matches!(deleted, Ok(Ok(()))) {
                tracing::warn!(topic = %name, "deleting a replica's raft state failed");
            }
        }
    }

    /// Hands the leadership of every group this broker leads to its most caught-up
    /// follower (openraft's `transfer_leader`; Kafka's controlled shutdown moves leaders
    /// the same way), then waits up to `wait` until none is led here: a broker that stops
    /// (SIGTERM, a rolling restart) costs its partitions a leader change, not an election
    /// timeout.
    pub async fn hand_over(&self, wait: Duration) {
        let led: Vec<Arc<Replica>> = self
            .all()
            .into_iter()
            .filter(|r| r.leading_term().is_ok())
            .collect();
        if led.is_empty() {
            return;
        }
        for r in &led {
            let target = {
                let m = r.raft.metrics();
                let m = m.borrow_watched();
                m.replication.as_ref().and_then(|progress| {
                    progress
                        .iter()
                        .filter(|(id, _)| **id != self.me)
                        .max_by_key(|(_, matched)| matched.as_ref().map(openraft::LogId::index))
                        .map(|(id, _)| *id)
                })
            };
            if let Some(to) = target
                && let Err(e) = r.raft.trigger().transfer_leader(to).await
            {
                tracing::warn!(topic = %r.topic, partition = r.partition.index, error = %e, "handing leadership over failed");
            }
        }
        let started = std::time::Instant::now();
        let handed = tokio::time::timeout(wait, async {
            for r in &led {
                let mut m = r.raft.metrics();
                loop {
                    let leader = m.borrow_watched().current_leader;
                    if leader.is_some_and(|l| l != self.me) || m.changed().await.is_err() {
                        break;
                    }
                }
            }
        })
        .await;
        tracing::info!(
            partitions = led.len(),
            handed_over = handed.is_ok(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "leadership of the partitions led here handed over"
        );
    }

    /// Every `every`, moves the leadership of each group this broker leads to the group's
    /// preferred replica once that replica is caught up (Kafka's preferred leader
    /// election, `auto.leader.rebalance.enable`): after a broker returns, the leaders
    /// placement spread over the brokers are spread again. Ends when `self` is dropped.
    pub fn spawn_preferred_leaders(self: &Arc<Self>, every: Duration) {
        let replicas = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(replicas) = replicas.upgrade() else {
                    return;
                };
                for r in replicas.all() {
                    let Some(preferred) = r.preferred.filter(|p| *p != replicas.me) else {
                        continue;
                    };
                    let caught_up = {
                        let m = r.raft.metrics();
                        let m = m.borrow_watched();
                        // Answering now: openraft's leader refuses writes from the moment it
                        // starts a transfer until the target stands, so a target that does
                        // not answer (a broker just restarted and busy catching up) would
                        // leave the partition without a writable leader until an election.
                        let answering = m.heartbeat.as_ref().is_some_and(|acked| {
                            acked.get(&preferred).is_some_and(|at| {
                                at.as_ref().is_some_and(|at| {
                                    openraft::Instant::elapsed(&**at) < PREFERRED_ANSWERED_WITHIN
                                })
                            })
                        });
                        m.current_leader == Some(replicas.me)
                            && answering
                            && m.replication.as_ref().is_some_and(|progress| {
                                progress.get(&preferred).is_some_and(|matched| {
                                    // Close behind is enough: openraft's transfer lets the
                                    // target catch up before it stands.
                                    matched.as_ref().map_or(0, openraft::LogId::index)
                                        + PREFERRED_LAG
                                        >= m.last_log_index.unwrap_or(0)
                                        && matched.is_some()
                                })
                            })
                    };
                    if caught_up {
                        tracing::info!(topic = %r.topic, partition = r.partition.index, to = preferred, "moving leadership back to the preferred replica");
                        if let Err(e) = r.raft.trigger().transfer_leader(preferred).await {
                            tracing::warn!(topic = %r.topic, partition = r.partition.index, error = %e, "moving leadership to the preferred replica failed");
                        }
                    }
                }
            }
        });
    }

    /// Stops every replica (broker shutdown).
    pub async fn shutdown(&self) {
        let all = self.all();
        for r in all {
            let _ = r.raft.shutdown().await;
        }
    }

    /// The group a peer's message names and this broker's replica of it.
    ///
    /// # Errors
    ///
    /// INVALID_ARGUMENT when the message does not name a 12-byte group, NOT_FOUND when this
    /// broker has no replica of it (yet).
    fn addressed(
        &self,
        message: &PartitionRaftMessage,
    ) -> Result<(GroupKey, Arc<Replica>), tonic::Status> {
        let group: GroupKey = message.group.as_ref().try_into().map_err(|_| {
            tonic::Status::invalid_argument("a partition raft message names a 12-byte group")
        })?;
        let replica = self.get(&group).ok_or_else(|| {
            tonic::Status::not_found("no replica of this partition on this broker (yet)")
        })?;
        Ok((group, replica))
    }

    /// Serves one `weir.v1.Raft/Partition` call from a peer.
    ///
    /// # Errors
    ///
    /// NOT_FOUND for a group without a replica here, INVALID_ARGUMENT for an undecodable
    /// message.
    pub async fn serve(
        &self,
        message: PartitionRaftMessage,
    ) -> Result<PartitionRaftMessage, tonic::Status> {
        let (_, replica) = self.addressed(&message)?;
        let bad = |e: postcard::Error| {
            tonic::Status::invalid_argument(format!("undecodable partition raft message: {e}"))
        };
        let encode = |r: Result<Vec<u8>, postcard::Error>| {
            r.map_err(|e| tonic::Status::internal(format!("encoding a raft answer: {e}")))
        };
        let kind = network::Kind::from_number(message.kind)
            .ok_or_else(|| tonic::Status::invalid_argument("unknown partition raft call"))?;
        if replica.is_repairing() && kind == network::Kind::TransferLeader {
            return Err(tonic::Status::unavailable(
                "this replica is being repaired from its peers after damage to its storage; it takes no leadership until it has what it lost",
            ));
        }
        let body = match kind {
            network::Kind::Append => {
                let req = network::decode(&message.body).map_err(bad)?;
                encode(network::encode(&replica.raft.append_entries(req).await))?
            }
            network::Kind::Vote => {
                let req = network::decode(&message.body).map_err(bad)?;
                refuse_if_behind_damage(&replica, &req)?;
                encode(network::encode(&replica.raft.vote(req).await))?
            }
            network::Kind::PreVote => {
                let req = network::decode(&message.body).map_err(bad)?;
                refuse_if_behind_damage(&replica, &req)?;
                encode(network::encode(&replica.raft.pre_vote(req).await))?
            }
            network::Kind::TransferLeader => {
                let req = network::decode(&message.body).map_err(bad)?;
                let answer: Result<_, openraft::errors::RaftError<ReplicaTypes>> = replica
                    .raft
                    .handle_transfer_leader(req)
                    .await
                    .map_err(openraft::errors::RaftError::Fatal);
                encode(network::encode(&answer))?
            }
            network::Kind::Snapshot => {
                let (vote, meta, data): (
                    openraft::alias::VoteOf<ReplicaTypes>,
                    openraft::alias::SnapshotMetaOf<ReplicaTypes>,
                    Vec<u8>,
                ) = network::decode(&message.body).map_err(bad)?;
                // Its point first, so that the purge up to it knows the offset after it.
                let point = store::snapshot_point(&meta, &data).map_err(|e| {
                    tonic::Status::invalid_argument(format!("undecodable partition snapshot: {e}"))
                })?;
                replica.shared.note_snapshot(&point).map_err(|e| {
                    tonic::Status::internal(format!("noting the snapshot's point: {e}"))
                })?;
                let snapshot = openraft::alias::SnapshotOf::<ReplicaTypes, Vec<u8>> {
                    meta,
                    snapshot: data,
                };
                let answer: Result<_, openraft::errors::RaftError<ReplicaTypes>> = replica
                    .raft
                    .install_full_snapshot(vote, snapshot)
                    .await
                    .map_err(openraft::errors::RaftError::Fatal);
                encode(network::encode(&answer))?
            }
        };
        Ok(PartitionRaftMessage {
            group: message.group,
            kind: message.kind,
            body: body.into(),
            commits_may_wait: false,
        })
    }

    /// Serves one `weir.v1.Raft/PartitionAppends` stream from a group's leader: the
    /// AppendEntries requests go to this broker's replica as they arrive (openraft's
    /// `Raft::stream_append` keeps several in flight; each answer is sent once its entries
    /// are flushed), the answers go back in the requests' order. The stream ends when the
    /// leader closes its side, when the replica answers with an error (a conflict or a
    /// higher vote, carried in that last answer), or when a message does not decode or names
    /// another group (logged; the leader opens a new stream).
    ///
    /// # Errors
    ///
    /// NOT_FOUND for a group without a replica here, INVALID_ARGUMENT when the first message
    /// does not name a group; a failed read of the first message as it failed.
    pub async fn serve_appends(
        &self,
        mut inbound: tonic::Streaming<PartitionRaftMessage>,
    ) -> Result<AppendAnswers, tonic::Status> {
        let Some(first) = inbound.message().await? else {
            return Ok(Box::pin(futures::stream::empty()));
        };
        let (group, replica) = self.addressed(&first)?;
        let group_bytes = first.group.clone();
        // The state carries the replica along (for the logs), so nothing is cloned per
        // message.
        let requests = futures::stream::unfold(
            (Some(first), inbound, Arc::clone(&replica)),
            move |(pending, mut inbound, replica)| async move {
                let (topic, partition) = (&replica.topic, replica.partition.index);
                let message = match pending {
                    Some(m) => m,
                    None => match inbound.message().await {
                        Ok(Some(m)) => m,
                        Ok(None) => return None,
                        Err(status) => {
                            tracing::debug!(%topic, partition, %status, "a leader's stream of appends failed");
                            return None;
                        }
                    },
                };
                match network::decode_append(group, &message) {
                    Ok(req) => Some((req, (None, inbound, replica))),
                    Err(e) => {
                        tracing::warn!(%topic, partition, error = %e, "a leader's stream of appends sent a bad message; the stream ends");
                        None
                    }
                }
            },
        );
        let partition = Arc::clone(&replica.partition);
        let answers = replica.raft.stream_append(requests).map(move |result| {
            network::encode(&result)
                .map(|body| PartitionRaftMessage {
                    group: group_bytes.clone(),
                    kind: network::Kind::Append as u32,
                    body: body.into(),
                    commits_may_wait: !partition
                        .reader_waited_within(crate::log::now_ms(), network::READER_WINDOW_MS),
                })
                .map_err(|e| tonic::Status::internal(format!("encoding a raft answer: {e}")))
        });
        Ok(Box::pin(answers))
    }

    /// The leader this broker's replica of `topic`/`partition` knows and that leader's term
    /// (openraft's `current_leader` and its stored vote's term); `None` when this broker has no
    /// replica of it or the replica knows no leader (an election is under way).
    pub fn known_leader(&self, topic: &str, partition: u32) -> Option<(u64, u64)> {
        let replica = self.of(topic, partition)?;
        let metrics = replica.raft.server_metrics();
        let m = metrics.borrow_watched();
        Some((m.current_leader?, m.vote.leader_id.term))
    }

    /// This broker's replica of partition `partition` of topic `topic`, if it has one.
    pub fn of(&self, topic: &str, partition: u32) -> Option<Arc<Replica>> {
        let topic = self.log.topic(topic).ok()?;
        let partition = topic.partitions().get(partition as usize).cloned()?;
        self.replica_of(&partition)
    }

    /// This broker's replica of `partition`, or [`log::Error::Replica`] saying there is none.
    fn replica_here(&self, partition: &Partition) -> Result<Arc<Replica>, log::Error> {
        self.replica_of(partition)
            .ok_or_else(|| log::Error::Replica {
                topic: partition.topic.clone(),
                partition: partition.index,
                message: "no replica of this partition on this broker".into(),
            })
    }

    fn replica_of(&self, partition: &Partition) -> Option<Arc<Replica>> {
        self.by_partition.lock().get(&partition.prefix()).cloned()
    }
}

impl log::Replicator for Replicas {
    fn leads(&self, partition: &Partition) -> bool {
        self.replica_of(partition).is_some_and(|r| {
            let m = r.raft.server_metrics();
            let m = m.borrow_watched();
            m.current_leader == Some(m.id)
        })
    }

    fn propose(
        &self,
        partition: &Arc<Partition>,
        batch: Vec<u8>,
        records: u32,
        producer: Option<Idempotence>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<log::Proposed, log::Error>> + Send + '_>>
    {
        let replica = self.replica_here(partition);
        Box::pin(async move { replica?.propose(batch, records, producer).await })
    }

    fn trim(
        &self,
        partition: &Arc<Partition>,
        earliest: u64,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), log::Error>> + Send + '_>> {
        let replica = self.replica_here(partition);
        Box::pin(async move { replica?.write_state(Proposal::Trim { earliest }).await })
    }
}

impl Replica {
    /// Proposes `cursors` to this partition's log (the group's coordinator partition) and
    /// returns once they are committed and applied here: every replica then keeps them, so
    /// the next leader has them ([`Replica::cursors`]). An entry without cursors removes
    /// every cursor of the group (it was deleted). While an election is under way it waits
    /// for its outcome (at most 10 s).
    ///
    /// # Errors
    ///
    /// [`log::Error::NotLeader`] when this replica does not lead (nothing stored), or
    /// [`log::Error::OutcomeUnknown`] when the leadership changed before the entry committed
    /// (it may be stored: cursors are absolute, so storing them again is harmless).
    pub async fn put_cursors(&self, cursors: GroupCursors) -> Result<(), log::Error> {
        // A group created with its topic finds the first election under way: wait for it.
        let _ = self
            .raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(|m| m.current_leader.is_some(), "a leader of the partition")
            .await;
        self.write_state(Proposal::Cursors(cursors)).await
    }

    /// Proposes an entry without records (cursors, a retention cut) and returns once it is
    /// committed and applied here. [`log::Error::NotLeader`] when this replica does not lead
    /// (nothing stored); [`log::Error::OutcomeUnknown`] when the leadership changed before
    /// it committed (such entries are absolute, so proposing them again is harmless).
    async fn write_state(&self, proposal: Proposal) -> Result<(), log::Error> {
        self.leading_term()?;
        match self.raft.client_write(proposal).await {
            Ok(_) => Ok(()),
            Err(openraft::errors::RaftError::APIError(
                openraft::errors::ClientWriteError::ForwardToLeader(f),
            )) => Err(not_leader(&self.topic, self.partition.index, f.leader_id)),
            Err(_) => Err(log::Error::OutcomeUnknown {
                topic: self.topic.clone(),
                partition: self.partition.index,
            }),
        }
    }

    /// Whether this replica leads its partition now.
    pub fn leads(&self) -> bool {
        self.leading_term().is_ok()
    }

    /// The cursors of consumer group `name` as committed when this replica took the
    /// leadership: waits until every entry of earlier terms is applied (openraft's
    /// ReadIndex), then reads them ([`Replica::cursors`]).
    ///
    /// # Errors
    ///
    /// [`log::Error::NotLeader`] when this replica does not lead (or lost the leadership
    /// meanwhile); [`log::Error::Replica`] when the stored state cannot be read.
    pub async fn committed_cursors(&self, name: &str) -> Result<Vec<(u32, Vec<u8>)>, log::Error> {
        self.leading_term()?;
        self.raft
            .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
            .await
            .map_err(|e| log::Error::NotLeader {
                topic: self.topic.clone(),
                partition: self.partition.index,
                leader: format!("leadership not confirmed: {e}"),
            })?;
        self.cursors(name)
    }

    /// The latest cursors of consumer group `name` this replica applied, by partition.
    ///
    /// # Errors
    ///
    /// [`log::Error::Replica`] when the stored state cannot be read.
    pub fn cursors(&self, name: &str) -> Result<Vec<(u32, Vec<u8>)>, log::Error> {
        let prefix = keys::replica_cursor_prefix(self.group, name);
        let fail = |e: &dyn std::fmt::Display| log::Error::Replica {
            topic: self.topic.clone(),
            partition: self.partition.index,
            message: format!("reading group {name:?}'s cursors: {e}"),
        };
        let mut out = Vec::new();
        for guard in self.shared.raft.prefix(&prefix) {
            let (k, v) = guard.into_inner().map_err(|e| fail(&e))?;
            let partition = k
                .get(prefix.len()..)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| fail(&"malformed cursor key"))?;
            out.push((partition, v.to_vec()));
        }
        Ok(out)
    }

    /// The current term when this replica leads, else [`log::Error::NotLeader`].
    fn leading_term(&self) -> Result<u64, log::Error> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        if m.current_leader == Some(m.id) {
            Ok(m.current_term)
        } else {
            Err(not_leader(
                &self.topic,
                self.partition.index,
                m.current_leader,
            ))
        }
    }

    /// Proposes one batch; with `producer`, checks its sequence first (a retry of an
    /// applied request is answered with its offsets and stored once).
    async fn propose(
        &self,
        batch: Vec<u8>,
        records: u32,
        producer: Option<Idempotence>,
    ) -> Result<log::Proposed, log::Error> {
        let index = self.partition.index;
        let term = self.leading_term()?;
        // Held until the proposal is queued: proposals leave in the order they were checked.
        let mut sequencer = self.sequencer.lock().await;
        if let Some(idem) = producer {
            if sequencer.term != Some(term) {
                self.rebuild(&mut sequencer, term).await?;
            }
            let last = sequencer.last.get(&idem.producer_id).copied();
            match last {
                None if idem.sequence == 0 => {}
                Some(l) if idem.sequence == l + 1 => {}
                Some(l) if idem.sequence <= l => {
                    // A retry: answered from the applied state, or asked again once applied.
                    let applied = self.shared.producers.lock().get(&idem.producer_id).cloned();
                    let check = ProducerState::check(applied.as_ref(), &self.topic, index, idem);
                    return match check {
                        Ok(SequenceCheck::Duplicate(acks)) => {
                            let ack = acks.first().copied().ok_or_else(|| log::Error::Replica {
                                topic: self.topic.clone(),
                                partition: index,
                                message: "a remembered request without acks".into(),
                            })?;
                            Ok(Box::pin(async move { Ok(ack) }))
                        }
                        Err(e @ SequenceError::Forgotten { .. }) => Err(e.into()),
                        _ => Err(log::Error::InFlight {
                            topic: self.topic.clone(),
                            partition: index,
                            producer_id: idem.producer_id,
                            sequence: idem.sequence,
                        }),
                    };
                }
                _ => {
                    // A gap (or a first request that is not 0): Kafka's rule refuses it.
                    let state = ProducerState {
                        last,
                        ..ProducerState::default()
                    };
                    return match ProducerState::check(Some(&state), &self.topic, index, idem) {
                        Err(e) => Err(e.into()),
                        Ok(_) => Err(log::Error::Replica {
                            topic: self.topic.clone(),
                            partition: index,
                            message: "inconsistent sequence check".into(),
                        }),
                    };
                }
            }
            sequencer.last.insert(idem.producer_id, idem.sequence);
        }
        let (responder, rx) = ProgressResponder::complete_only();
        let queued = self
            .raft
            .write(Proposal::Records {
                batch: bytes::Bytes::from(batch),
                records,
                producer: producer.map(|p| (p.producer_id, p.sequence)),
            })
            .responder(responder)
            .await;
        if let Err(e) = queued {
            sequencer.term = None;
            return Err(log::Error::Replica {
                topic: self.topic.clone(),
                partition: index,
                message: e.to_string(),
            });
        }
        drop(sequencer);
        let topic = self.topic.clone();
        let proposed: log::Proposed = Box::pin(async move {
            let result = rx.await.map_err(|_| log::Error::OutcomeUnknown {
                topic: topic.clone(),
                partition: index,
            })?;
            match result {
                Ok(answer) => Ok(Ack {
                    partition: index,
                    base_offset: answer.data.base_offset,
                    record_count: answer.data.records,
                }),
                Err(openraft::errors::ClientWriteError::ForwardToLeader(f)) => {
                    Err(not_leader(&topic, index, f.leader_id))
                }
                Err(openraft::errors::ClientWriteError::LogEntryDiscarded(_)) => {
                    Err(log::Error::OutcomeUnknown {
                        topic,
                        partition: index,
                    })
                }
                Err(e) => Err(log::Error::Replica {
                    topic,
                    partition: index,
                    message: e.to_string(),
                }),
            }
        });
        Ok(proposed)
    }

    /// Builds the sequencer for `term`: waits until every entry of this leader's log is
    /// applied, then takes the applied producers' state.
    ///
    /// Every entry, not only those before the read index: a leader that restarted and
    /// restored its leadership of the same term (openraft's leader restore) may hold entries
    /// it proposed before the crash that a majority stored but its commit index does not
    /// cover yet. Built from the state before them, the sequencer took a retry of such a
    /// request for a new one and stored it a second time (found by the nemesis,
    /// `docs/reliability.md`). The leader commits its whole log, so the wait ends.
    async fn rebuild(&self, sequencer: &mut Sequencer, term: u64) -> Result<(), log::Error> {
        let unconfirmed = |e: &dyn std::fmt::Display| log::Error::NotLeader {
            topic: self.topic.clone(),
            partition: self.partition.index,
            leader: format!("leadership not confirmed: {e}"),
        };
        self.raft
            .ensure_linearizable(openraft::raft::ReadPolicy::ReadIndex)
            .await
            .map_err(|e| unconfirmed(&e))?;
        let last = self.raft.metrics().borrow_watched().last_log_index;
        self.raft
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(last, "every entry of the leader's log applied")
            .await
            .map_err(|e| unconfirmed(&e))?;
        if self.leading_term()? != term {
            return Err(unconfirmed(
                &"the leadership changed while the log was applied",
            ));
        }
        sequencer.last = self
            .shared
            .producers
            .lock()
            .iter()
            .filter_map(|(id, s)| s.last.map(|l| (*id, l)))
            .collect();
        sequencer.term = Some(term);
        Ok(())
    }
}

/// Follows `replica`'s retention cuts: for each, a snapshot at the cut, then the log purged
/// up to it (openraft purges once no replication stream still reads those entries; a
/// follower that needs them gets the snapshot). At start-up it finishes a cut an earlier
/// run applied. Ends when the replica's group stops.
fn spawn_purges(replica: &Arc<Replica>) {
    let weak = Arc::downgrade(replica);
    let mut trimmed = replica.shared.trimmed.subscribe();
    tokio::spawn(async move {
        loop {
            let cut = trimmed.borrow_and_update().clone();
            let Some(r) = weak.upgrade() else { return };
            if let Some(cut) = cut {
                let index = cut.log_id.index();
                if r.raft.trigger().snapshot().await.is_err() {
                    return;
                }
                let built = r
                    .raft
                    .wait(Some(Duration::from_secs(30)))
                    .metrics(
                        |m| m.snapshot.is_some_and(|s| s.index() >= index),
                        "a snapshot at the retention cut",
                    )
                    .await;
                match built {
                    Ok(_) => {
                        if r.raft.trigger().purge_log(index).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(topic = %r.topic, partition = r.partition.index, error = %e, "no snapshot at the retention cut; the log is purged at the next one");
                    }
                }
            }
            drop(r);
            if trimmed.changed().await.is_err() {
                return;
            }
        }
    });
}

fn not_leader(topic: &str, partition: u32, leader: Option<u64>) -> log::Error {
    log::Error::NotLeader {
        topic: topic.to_owned(),
        partition,
        leader: leader.map_or_else(
            || "no leader is known: an election is under way".to_owned(),
            |l| format!("broker {l} leads it"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{LogOptions, TopicConfig};

    /// A log on a new temporary directory (kept while the guard lives) with topic `t` of
    /// one partition and replication factor 3.
    async fn log_with_replicated_topic() -> (tempfile::TempDir, Arc<Log>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = Arc::new(Log::open(dir.path(), &LogOptions::default()).expect("opens"));
        let mut config = TopicConfig::new(1, 0).expect("config");
        config.replication_factor = 3;
        log.create_topic("t", config).await.expect("topic");
        (dir, log)
    }

    /// A one-replica group of partition 0 of topic `t` on `log`, led here.
    async fn led_replica(log: &Arc<Log>) -> (Arc<Replicas>, Arc<Replica>) {
        let (replicas, _changes) =
            Replicas::new(0, log, ReplicaOptions::default()).expect("replicas");
        let topic = log.topic("t").expect("topic");
        let members = BTreeMap::from([(0, "127.0.0.1:1".to_owned())]);
        replicas
            .open(&topic, 1, 0, &members, Some(0))
            .await
            .expect("opens");
        let replica = replicas.all().pop().expect("one replica");
        replica
            .raft
            .wait(Some(Duration::from_secs(10)))
            .current_leader(0, "leads")
            .await
            .expect("leads");
        (replicas, replica)
    }

    /// The log reader gives openraft at most 1 MiB of record batches per AppendEntries
    /// request ([`store::MAX_APPEND_BYTES`]) — more only by the entry that crosses it — in
    /// order and without a gap: 300 KB entries go 4 to a request, and an entry of 1 KB after
    /// one of 3 MB goes in the next.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_carry_at_most_a_mebibyte_of_records() {
        use openraft::{entry::RaftEntry, storage::RaftLogReader};
        let (_dir, log) = log_with_replicated_topic().await;
        let (_replicas, replica) = led_replica(&log).await;
        let record = |size: usize| crate::log::Record {
            value: bytes::Bytes::from(vec![7u8; size]),
            ..crate::log::Record::default()
        };
        let first = replica.raft.metrics().borrow_watched().last_log_index;
        let mut sizes = vec![300_000; 10];
        sizes.push(3_000_000);
        sizes.push(1_000);
        for size in &sizes {
            let batch = crate::log::batch::encode(&[record(*size)], 0);
            let proposed = replica.propose(batch, 1, None).await.expect("proposed");
            proposed.await.expect("committed");
        }
        let start = first.map_or(0, |i| i + 1);
        let end = start + sizes.len() as u64;
        let mut reader = store::ReplicaLog(Arc::clone(&replica.shared));
        let mut from = start;
        let mut requests = Vec::new();
        while from < end {
            let entries = reader
                .limited_get_log_entries(from, end)
                .await
                .expect("reads");
            assert!(!entries.is_empty(), "an empty answer at {from}");
            for (i, e) in entries.iter().enumerate() {
                assert_eq!(e.log_id().index(), from + i as u64, "in order, no gap");
            }
            from += entries.len() as u64;
            requests.push(entries.len());
        }
        assert_eq!(requests, [4, 4, 3, 1], "entries per request");
    }

    /// Entries stay in memory from their append until applied, then leave it: the applied
    /// entries read back from the storage, the same as proposed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn applied_entries_leave_memory_and_read_back_from_the_storage() {
        use openraft::{entry::RaftEntry, storage::RaftLogReader};
        let (_dir, log) = log_with_replicated_topic().await;
        let (_replicas, replica) = led_replica(&log).await;
        let first = replica.raft.metrics().borrow_watched().last_log_index;
        let mut batches = Vec::new();
        for i in 0..5u8 {
            let record = crate::log::Record {
                value: bytes::Bytes::from(vec![i; 100 * usize::from(i + 1)]),
                ..crate::log::Record::default()
            };
            let batch = crate::log::batch::encode(&[record], 0);
            batches.push(batch.clone());
            let proposed = replica.propose(batch, 1, None).await.expect("proposed");
            proposed.await.expect("committed");
        }
        replica
            .raft
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(first.map(|i| i + 5), "applied")
            .await
            .expect("applied");
        assert_eq!(
            replica.shared.in_memory(),
            (0, 0),
            "applied entries left memory"
        );
        let start = first.map_or(0, |i| i + 1);
        let mut reader = store::ReplicaLog(Arc::clone(&replica.shared));
        let entries = reader
            .try_get_log_entries(start..start + 5)
            .await
            .expect("reads");
        assert_eq!(entries.len(), 5);
        for (i, (e, proposed)) in entries.iter().zip(&batches).enumerate() {
            assert_eq!(e.log_id().index(), start + i as u64);
            let openraft::EntryPayload::Normal(Proposal::Records { batch, records, .. }) =
                &e.payload
            else {
                panic!("entry {i} is not records: {:?}", e.payload);
            };
            assert_eq!(*records, 1);
            // Stored sealed (base offset and epoch set): the records are the proposed ones.
            let (_, stored) = crate::log::batch::decode(batch).expect("decodes");
            let (_, want) =
                crate::log::batch::decode(&bytes::Bytes::from(proposed.clone())).expect("decodes");
            assert_eq!(stored.len(), 1);
            assert_eq!(stored[0].record.value, want[0].record.value);
        }
    }

    /// The index of the last applied entry in the state machine state stored for
    /// `replica`'s group (what a restart starts applying after), once the writer's queue
    /// has been committed.
    async fn stored_applied_index(log: &Log, replica: &Replica) -> Option<u64> {
        log.sync().await.expect("syncs");
        let key = keys::replica_key(replica.group, b'a');
        let bytes = replica.shared.raft.get(key).expect("reads")?;
        let state: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
        state["last_applied"]["index"].as_u64()
    }

    /// Rounds of records only write the state machine's state at most every
    /// [`store::STATE_WRITE_INTERVAL`], so the stored applied point lags the applied one;
    /// a restart applies the entries after it again and ends where it was: the same high
    /// watermark, an idempotent producer's retry of its last request answered with the
    /// original offset, its next sequence taken after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_applies_again_what_the_stored_state_had_not_reached() {
        let (_dir, log) = log_with_replicated_topic().await;
        let (replicas, replica) = led_replica(&log).await;
        let request = |n: u8| {
            let record = crate::log::Record {
                value: bytes::Bytes::from(vec![n; 10]),
                ..crate::log::Record::default()
            };
            crate::log::batch::encode(&[record.clone(), record], 0)
        };
        let idem = |sequence: u64| Idempotence {
            producer_id: 7,
            sequence,
        };
        let started = std::time::Instant::now();
        let mut acks = Vec::new();
        for n in 0..20u8 {
            let proposed = replica
                .propose(request(n), 2, Some(idem(u64::from(n))))
                .await
                .expect("proposed");
            acks.push(proposed.await.expect("committed"));
        }
        assert!(
            started.elapsed() < store::STATE_WRITE_INTERVAL,
            "20 proposals took {:?}: the test needs them within one interval",
            started.elapsed()
        );
        let applied = replica
            .raft
            .metrics()
            .borrow_watched()
            .last_applied
            .map(|l| l.index());
        let stored = stored_applied_index(&log, &replica).await;
        assert!(
            stored < applied,
            "stored applied point {stored:?}, applied {applied:?}: every round wrote its state"
        );
        assert_eq!(acks.last().map(|a| a.base_offset), Some(38));

        replicas.shutdown().await;
        drop((replicas, replica));
        let (_replicas, replica) = led_replica(&log).await;
        replica
            .raft
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(applied, "applied again")
            .await
            .expect("applied again");
        assert_eq!(
            replica.partition.next_offset(),
            40,
            "high watermark after restart"
        );
        let retried = replica
            .propose(request(19), 2, Some(idem(19)))
            .await
            .expect("a retry is answered");
        assert_eq!(retried.await.expect("original ack"), acks[19]);
        let next = replica
            .propose(request(20), 2, Some(idem(20)))
            .await
            .expect("proposed");
        assert_eq!(next.await.expect("committed").base_offset, 40);
    }

    /// A group's cursors proposed to its coordinator partition's log: the latest of each
    /// partition is kept, apart from other groups' (a name that extends another's included),
    /// is there again after the replica group restarts, and goes when the group is deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_groups_cursors_are_kept_by_its_partitions_log_across_a_restart() {
        let (_dir, log) = log_with_replicated_topic().await;
        let (replicas, replica) = led_replica(&log).await;
        let put = |group: &str, cursors: &[(u32, &str)]| GroupCursors {
            group: group.into(),
            cursors: cursors
                .iter()
                .map(|(p, c)| (*p, c.as_bytes().to_vec()))
                .collect(),
        };
        replica
            .put_cursors(put("g", &[(0, "a"), (2, "b")]))
            .await
            .expect("stored");
        replica
            .put_cursors(put("g2", &[(0, "other")]))
            .await
            .expect("stored");
        replica
            .put_cursors(put("g", &[(0, "c")]))
            .await
            .expect("stored");
        let want = vec![(0, b"c".to_vec()), (2, b"b".to_vec())];
        assert_eq!(replica.cursors("g").expect("reads"), want);
        assert_eq!(
            replica.cursors("g2").expect("reads"),
            vec![(0, b"other".to_vec())]
        );
        assert!(replica.cursors("none").expect("reads").is_empty());
        // Records and cursors share the log: offsets count records only.
        assert_eq!(replica.partition.next_offset(), 0);

        // The group stopped and opened again (its state machine reloaded, its log applied
        // again on top).
        replicas.shutdown().await;
        drop((replicas, replica));
        let (_replicas, replica) = led_replica(&log).await;
        assert_eq!(replica.cursors("g").expect("reads"), want);
        assert_eq!(
            replica
                .committed_cursors("g")
                .await
                .expect("reads as leader"),
            want
        );

        // An entry without cursors forgets the group (deleted), and only that group.
        replica.put_cursors(put("g", &[])).await.expect("stored");
        assert!(replica.cursors("g").expect("reads").is_empty());
        assert_eq!(
            replica.cursors("g2").expect("reads"),
            vec![(0, b"other".to_vec())]
        );
    }
}
