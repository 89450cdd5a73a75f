//! The metadata group's Raft log and state machine, in the broker's fjall database
//! (keyspace `raft`), after openraft's `log-rocks` and `sm-rocks` examples.
//!
//! | key | value |
//! | --- | --- |
//! | `l` ‖ index (u64 big-endian) | a log entry (JSON) |
//! | `v` | the vote (JSON) |
//! | `c` | the committed log id (JSON) |
//! | `p` | the last purged log id (JSON) |
//! | `s` | the state machine: last applied log id, membership and [`ClusterState`] (JSON) |
//!
//! Appends and votes are fsynced before openraft is told (`PersistMode::SyncData`, which
//! also covers whatever the broker's record writer committed meanwhile). The state machine is
//! written in one batch per `apply` call; metadata changes are rare (admin calls, broker
//! registrations), so one small fsync each is cheap. A snapshot is the state machine's JSON.
//!
//! The vote and the last log index are also kept in `metadata-marks` in the data directory
//! (JSON; temporary file, fsync, rename, directory fsync), outside the database's journal: a journal that
//! lost its tail (damaged storage) would otherwise give back an older vote, letting this
//! broker vote twice in a term, and a shorter log, letting it elect a leader without entries
//! it acknowledged (Raft's persistent state, Figure 2 of the Raft paper, must not go back).
//! At start-up [`LogStore::check_marks`] restores the vote and reports lost entries; the
//! broker then votes again only once it has them back (`super::Cluster::open`).
//!
//! Applying a command also makes the local log match it (`local_effects`): the topics with
//! a partition led here exist locally with the partitions they lead. Those effects are
//! idempotent, so an entry applied again after a crash (before `s` was written) does no harm.

use std::{
    fmt::Debug,
    io,
    ops::RangeBounds,
    path::{Path, PathBuf},
    sync::Arc,
};

use fjall::{Database, Keyspace, PersistMode};
use futures::{Stream, TryStreamExt};
use openraft::{
    EntryPayload, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf},
    entry::RaftEntry,
    storage::{EntryResponder, IOFlushed, RaftLogStorage, RaftStateMachine},
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{
    TypeConfig,
    state::{Applied, BrokerId, ClusterState, Command},
};
use crate::log::{Log, TopicConfig, topic::Served};

type C = TypeConfig;

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn to_json<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn from_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn log_key(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'l';
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io_err)?
}

/// File name of the [`Marks`] in the data directory.
pub(crate) const MARKS_FILE: &str = "metadata-marks";

/// What the metadata log had stored at most: its vote and its last entry's index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Marks {
    /// The vote, as last saved.
    pub(crate) vote: Option<VoteOf<C>>,
    /// The index of the last entry stored (fsynced), as of the last append or truncation.
    pub(crate) last_index: Option<u64>,
}

/// The [`Marks`] file, rewritten after every vote, append and truncation.
struct MarksFile {
    path: PathBuf,
    marks: parking_lot::Mutex<Marks>,
}

impl MarksFile {
    /// Reads the file in `dir` (no file: no marks, a new data directory or one from before
    /// the file existed).
    fn open(dir: &Path) -> io::Result<Self> {
        let path = dir.join(MARKS_FILE);
        let marks = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is not the metadata's marks: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Marks::default(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path,
            marks: parking_lot::Mutex::new(marks),
        })
    }

    fn get(&self) -> Marks {
        *self.marks.lock()
    }

    /// Changes the marks with `change` and writes them durably (under the lock, so the file
    /// ends with the last change).
    fn update(&self, change: impl FnOnce(&mut Marks)) -> io::Result<()> {
        let mut marks = self.marks.lock();
        change(&mut marks);
        crate::log::checkpoint::replace_durably(
            &self.path,
            &self.path.with_extension("tmp"),
            &to_json(&*marks)?,
        )
    }
}

/// Entries the metadata log had stored and lost (damaged storage): indexes after
/// `stored_to` up to `had_to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LostEntries {
    /// The last index still stored (`None`: none).
    pub(crate) stored_to: Option<u64>,
    /// The last index it had stored.
    pub(crate) had_to: u64,
}

/// The metadata group's log.
#[derive(Clone)]
pub struct LogStore {
    db: Database,
    ks: Keyspace,
    marks: Arc<MarksFile>,
    /// Whether each write is also flushed to a table ([`seal`]): on a broker without
    /// peers, which has no leader to take lost entries again from.
    seal: bool,
}

impl LogStore {
    /// The log in keyspace `ks` of `db`, its marks in `dir`; with `seal` (a broker without
    /// peers) the vote and entries are flushed to tables after each write ([`seal`]).
    pub(crate) fn new(db: Database, ks: Keyspace, dir: &Path, seal: bool) -> io::Result<Self> {
        Ok(Self {
            db,
            ks,
            seal,
            marks: Arc::new(MarksFile::open(dir)?),
        })
    }

    /// Compares what is stored with the marks: restores a vote that went back (and logs
    /// it), and reports entries that were lost. Before openraft reads the log.
    pub(crate) async fn check_marks(&mut self) -> io::Result<Option<LostEntries>> {
        let marks = self.marks.get();
        let stored: Option<VoteOf<C>> = self.get_json(b"v")?;
        if let Some(vote) = marks.vote
            && stored.is_none_or(|s| s < vote)
        {
            tracing::error!(stored = ?stored, had = %vote, "the metadata's stored vote went back (damaged storage); restored from its marks");
            let store = self.clone();
            blocking(move || store.put_json_synced(b"v", &vote)).await?;
        }
        let last = self.get_log_state().await?.last_log_id.map(|l| l.index());
        Ok(match marks.last_index {
            Some(had) if last.is_none_or(|l| l < had) => Some(LostEntries {
                stored_to: last,
                had_to: had,
            }),
            _ => None,
        })
    }

    fn get_json<T: for<'de> Deserialize<'de>>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.ks.get(key).map_err(io_err)? {
            Some(v) => from_json(&v).map(Some),
            None => Ok(None),
        }
    }

    fn put_json_synced<T: Serialize>(&self, key: &'static [u8], value: &T) -> io::Result<()> {
        self.ks.insert(key, to_json(value)?).map_err(io_err)?;
        self.db.persist(PersistMode::SyncData).map_err(io_err)
    }

    /// Whether nothing was ever stored (no vote, no entry): a broker that has never been
    /// part of a cluster.
    pub(crate) fn is_empty(&self) -> io::Result<bool> {
        Ok(self.ks.get(b"v").map_err(io_err)?.is_none() && self.ks.prefix(b"l").next().is_none())
    }
}

impl RaftLogReader<C> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<C>>, io::Error> {
        let start = match range.start_bound() {
            std::ops::Bound::Included(x) => *x,
            std::ops::Bound::Excluded(x) => x + 1,
            std::ops::Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for guard in self.ks.range(log_key(start)..=log_key(u64::MAX)) {
            let (key, value) = guard.into_inner().map_err(io_err)?;
            let index = u64::from_be_bytes(
                key.get(1..9)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| io_err("malformed raft log key"))?,
            );
            if !range.contains(&index) {
                break;
            }
            out.push(from_json(&value)?);
        }
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        self.get_json(b"v")
    }
}

impl RaftLogStorage<C> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let last_purged: Option<LogIdOf<C>> = self.get_json(b"p")?;
        let last = match self.ks.prefix(b"l").next_back() {
            Some(guard) => {
                let (_, value) = guard.into_inner().map_err(io_err)?;
                Some(from_json::<EntryOf<C>>(&value)?.log_id())
            }
            None => None,
        };
        Ok(LogState {
            last_log_id: last.or(last_purged),
            last_purged_log_id: last_purged,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        let store = self.clone();
        let vote = *vote;
        blocking(move || {
            store.put_json_synced(b"v", &vote)?;
            if store.seal {
                seal(&store.ks);
            }
            store.marks.update(|m| m.vote = Some(vote))
        })
        .await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        self.ks.insert(b"c", to_json(&committed)?).map_err(io_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        Ok(self.get_json::<Option<LogIdOf<C>>>(b"c")?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<C>> + OptionalSend,
    {
        let mut batch = self.db.batch();
        let mut last = None;
        for entry in entries {
            batch.insert(&self.ks, log_key(entry.index()), to_json(&entry)?);
            last = Some(entry.index());
        }
        // Written here, so the entries can be read once this returns; fsynced in the
        // background (then the marks), and openraft told when it is done.
        batch.commit().map_err(io_err)?;
        let (db, ks) = (self.db.clone(), self.seal.then(|| self.ks.clone()));
        let marks = Arc::clone(&self.marks);
        tokio::task::spawn_blocking(move || {
            let done = db
                .persist(PersistMode::SyncData)
                .map_err(io_err)
                .and_then(|()| {
                    if let Some(ks) = &ks {
                        seal(ks);
                    }
                    marks.update(|m| m.last_index = m.last_index.max(last))
                });
            callback.io_completed(done);
        });
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        let mut batch = self.db.batch();
        for guard in self.ks.range(log_key(from)..=log_key(u64::MAX)) {
            batch.remove(&self.ks, guard.key().map_err(io_err)?);
        }
        batch.commit().map_err(io_err)?;
        // Entries removed by the leader's order (never committed) are not lost ones.
        let marks = Arc::clone(&self.marks);
        let last = last_log_id.map(|l| l.index());
        blocking(move || {
            marks.update(|m| m.last_index = m.last_index.and_then(|h| last.map(|l| h.min(l))))
        })
        .await
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        // The purge point first: entries at or before it are ignored from then on.
        self.ks.insert(b"p", to_json(&log_id)?).map_err(io_err)?;
        let mut batch = self.db.batch();
        for guard in self.ks.range(log_key(0)..=log_key(log_id.index())) {
            batch.remove(&self.ks, guard.key().map_err(io_err)?);
        }
        batch.commit().map_err(io_err)
    }
}

/// Moves the keyspace's memtable out of the way after a metadata write (fjall's
/// `rotate_memtable`: flushed to a table in the background), so that the metadata group's
/// vote, entries and state do not stay in the journal alone. With the segment store
/// nothing else may flush this keyspace for as long as the broker runs, and a journal that
/// lost its tail after a crash took the metadata with it: the vote comes back from the
/// marks, and lost entries from the leader ([`LogStore::check_marks`]), but a broker
/// without peers has no leader to take them from and waited for one forever. Done on such
/// brokers only: in a cluster the leader has the entries (and `cluster.rs` damages a
/// journal to test that path). Metadata writes are rare (admin calls), so a small table
/// each is cheap. Failure is logged: the write is fsynced either way.
fn seal(ks: &Keyspace) {
    crate::log::seal_to_table(ks, "the metadata group's state");
}

/// The applied state as the state machine publishes it: (index applied, state).
pub type AppliedState = watch::Receiver<(u64, Arc<ClusterState>)>;

/// The state machine as stored under `s` and sent as a snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Stored {
    last_applied: Option<LogIdOf<C>>,
    membership: StoredMembershipOf<C>,
    state: ClusterState,
}

/// The metadata group's state machine: [`ClusterState`], and this broker's log made to
/// match it.
pub struct StateMachine {
    db: Database,
    ks: Keyspace,
    stored: Stored,
    /// Publishes the state after every apply, with the index applied.
    published: watch::Sender<(u64, Arc<ClusterState>)>,
    log: Arc<Log>,
    me: BrokerId,
    replicas: Arc<crate::replica::Replicas>,
    /// Whether each write of the state is also flushed to a table ([`seal`]).
    seal: bool,
}

impl StateMachine {
    /// Loads the stored state machine (empty when none); with `seal` (a broker without
    /// peers) each write of it is flushed to a table ([`seal`]).
    pub(crate) fn open(
        db: Database,
        ks: Keyspace,
        log: Arc<Log>,
        me: BrokerId,
        replicas: Arc<crate::replica::Replicas>,
        seal: bool,
    ) -> io::Result<(Self, AppliedState)> {
        let stored: Stored = match ks.get(b"s").map_err(io_err)? {
            Some(v) => from_json(&v)?,
            None => Stored::default(),
        };
        let index = stored
            .last_applied
            .as_ref()
            .map_or(0, openraft::LogId::index);
        let (published, rx) = watch::channel((index, Arc::new(stored.state.clone())));
        Ok((
            Self {
                db,
                ks,
                stored,
                published,
                log,
                me,
                replicas,
                seal,
            },
            rx,
        ))
    }

    async fn persist(&self) -> io::Result<()> {
        let bytes = to_json(&self.stored)?;
        let (db, ks, sealed) = (self.db.clone(), self.ks.clone(), self.seal);
        blocking(move || {
            ks.insert(b"s", bytes).map_err(io_err)?;
            db.persist(PersistMode::SyncData).map_err(io_err)?;
            if sealed {
                seal(&ks);
            }
            Ok(())
        })
        .await
    }

    fn publish(&self) {
        let index = self
            .stored
            .last_applied
            .as_ref()
            .map_or(0, openraft::LogId::index);
        self.published
            .send_replace((index, Arc::new(self.stored.state.clone())));
    }

    /// Makes the local log match `cmd`, applied to `state` (the state after it).
    async fn local_effects(&self, cmd: &Command, state: &ClusterState) -> io::Result<()> {
        match cmd {
            // A group's state lives on its coordinator, which changes it before it proposes.
            Command::RegisterBroker { .. }
            | Command::RemoveBroker { .. }
            | Command::PutGroup { .. }
            | Command::DeleteGroup { .. }
            | Command::AdoptGroups { .. }
            // Routing follows it; the replicas know their leader already.
            | Command::PartitionLeader { .. } => Ok(()),
            Command::CreateTopic { name, .. } | Command::UpdateTopic { name, .. } => {
                let Some(topic) = state.topics.get(name) else {
                    return Ok(());
                };
                let Some(config) = local_config(&topic.config, &topic.replicas, self.me) else {
                    return Ok(());
                };
                let result = if let Ok(local) = self.log.topic(name) {
                    if local.config() == config {
                        // Already so (an adopted topic, an entry applied again).
                        Ok(())
                    } else {
                        self.log.update_topic(name, config).await.map(|_| ())
                    }
                } else {
                    self.log.create_topic(name, config).await.map(|_| ())
                };
                local_result(name, result)?;
                Box::pin(open_topic_replicas(
                    name,
                    topic,
                    state,
                    &self.log,
                    &self.replicas,
                    self.me,
                ))
                .await
            }
            Command::DeleteTopic { name } => {
                self.replicas.close_topic(name).await;
                match self.log.delete_topic(name).await {
                    Err(crate::log::Error::TopicNotFound(_)) => Ok(()),
                    other => local_result(name, other),
                }
            }
        }
    }
}

/// Opens this broker's replicas of every replicated partition `state` places here (at
/// start-up; the local topics exist already).
pub(crate) async fn open_replicas(
    state: &ClusterState,
    log: &Arc<Log>,
    replicas: &crate::replica::Replicas,
    me: BrokerId,
) -> io::Result<()> {
    for (name, topic) in &state.topics {
        open_topic_replicas(name, topic, state, log, replicas, me).await?;
    }
    Ok(())
}

/// Opens this broker's replicas of topic `name`'s replicated partitions (none when its
/// replication factor is 1).
async fn open_topic_replicas(
    name: &str,
    topic: &super::state::TopicState,
    state: &ClusterState,
    log: &Arc<Log>,
    replicas: &crate::replica::Replicas,
    me: BrokerId,
) -> io::Result<()> {
    if topic.config.replication_factor <= 1 {
        return Ok(());
    }
    let Ok(local) = log.topic(name) else {
        return Ok(());
    };
    for (index, members) in topic.replicas.iter().enumerate() {
        if !members.contains(&me) {
            continue;
        }
        let addresses = members
            .iter()
            .filter_map(|b| state.brokers.get(b).map(|i| (*b, i.address.clone())))
            .collect();
        if let Err(e) = Box::pin(replicas.open(
            &local,
            topic.id,
            index as u32,
            &addresses,
            members.first().copied(),
        ))
        .await
        {
            return Err(io_err(format!(
                "opening the replica of {name}/{index}: {e}"
            )));
        }
    }
    Ok(())
}

/// The local settings of a topic whose partitions are placed by `replicas`: `None` when no
/// partition is held here (led, or replicated for a replication factor above 1); all partitions served when every one is (and then `config`'s own
/// `served` list, which a standalone broker's admin callers may set), else those led here,
/// with the topic-wide `max_bytes` and `max_messages` shared out in proportion to the
/// partitions led here (rounded up; `max_bytes` at least 64 KiB and one record, as a topic
/// requires), as Kafka's limits are per partition.
fn local_config(
    config: &TopicConfig,
    replicas: &[Vec<BrokerId>],
    me: BrokerId,
) -> Option<TopicConfig> {
    let led: Vec<u32> = replicas
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            if config.replication_factor > 1 {
                r.contains(&me)
            } else {
                r.first() == Some(&me)
            }
        })
        .map(|(i, _)| i as u32)
        .collect();
    if led.is_empty() {
        return None;
    }
    let mut local = *config;
    if led.len() != replicas.len() {
        local.served = Served::from_list(&led, config.partitions).ok()?;
        let (n, all) = (led.len() as u64, u64::from(config.partitions.max(1)));
        let share = |total: u64| {
            if total == 0 {
                0
            } else {
                total.saturating_mul(n).div_ceil(all).max(1)
            }
        };
        local.max_messages = share(config.max_messages);
        local.max_bytes = match share(config.max_bytes) {
            0 => 0,
            b => b
                .max(crate::log::topic::MIN_MAX_BYTES)
                .max(u64::from(config.max_message_bytes)),
        };
    }
    Some(local)
}

/// A storage failure of the local log is fatal to the state machine (openraft stops, the
/// broker exits and recovers, as after any failed commit); a refusal means the local log
/// and the cluster's state disagree, which is logged and left for the operator.
fn local_result(name: &str, result: Result<(), crate::log::Error>) -> io::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(e @ (crate::log::Error::Commit(_) | crate::log::Error::ShuttingDown)) => Err(io_err(
            format!("applying topic {name} to the local log: {e}"),
        )),
        Err(e) => {
            tracing::error!(topic = %name, error = %e, "the local log refused a change of the cluster's metadata");
            Ok(())
        }
    }
}

impl RaftSnapshotBuilder<C> for StateMachineSnapshot {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, Vec<u8>>, io::Error> {
        Ok(SnapshotOf::<C, Vec<u8>> {
            meta: self.meta.clone(),
            snapshot: self.data.clone(),
        })
    }
}

/// A copy of the state machine taken for a snapshot.
pub struct StateMachineSnapshot {
    meta: SnapshotMetaOf<C>,
    data: Vec<u8>,
}

impl StateMachine {
    fn snapshot_now(&self) -> io::Result<StateMachineSnapshot> {
        Ok(StateMachineSnapshot {
            meta: SnapshotMetaOf::<C> {
                last_log_id: self.stored.last_applied,
                last_membership: self.stored.membership.clone(),
            },
            data: to_json(&self.stored)?,
        })
    }
}

impl RaftStateMachine<C> for StateMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = StateMachineSnapshot;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<C>>, StoredMembershipOf<C>), io::Error> {
        Ok((self.stored.last_applied, self.stored.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        let mut answers = Vec::new();
        while let Some((entry, responder)) = entries.try_next().await? {
            self.stored.last_applied = Some(entry.log_id());
            let applied = match &entry.payload {
                EntryPayload::Blank => Applied::default(),
                EntryPayload::Normal(cmd) => {
                    let applied = self.stored.state.apply(cmd);
                    if !applied.unchanged {
                        self.local_effects(cmd, &self.stored.state).await?;
                    }
                    applied
                }
                EntryPayload::Membership(m) => {
                    self.stored.membership =
                        StoredMembershipOf::<C>::new(Some(entry.log_id()), m.clone());
                    Applied::default()
                }
            };
            if let Some(r) = responder {
                answers.push((r, applied));
            }
        }
        self.persist().await?;
        self.publish();
        for (r, applied) in answers {
            r.send(applied);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_now().unwrap_or_else(|e| {
            tracing::error!(error = %e, "encoding the metadata snapshot failed");
            StateMachineSnapshot {
                meta: SnapshotMetaOf::<C>::default(),
                data: Vec::new(),
            }
        })
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<C>,
        snapshot: Self::SnapshotData,
    ) -> Result<(), io::Error> {
        let mut stored: Stored = from_json(&snapshot)?;
        stored.last_applied.clone_from(&meta.last_log_id);
        stored.membership.clone_from(&meta.last_membership);
        let before = std::mem::replace(&mut self.stored, stored);
        // The local log follows the new state: topics created, grown or deleted meanwhile.
        for name in before.state.topics.keys() {
            if !self.stored.state.topics.contains_key(name) {
                self.local_effects(
                    &Command::DeleteTopic { name: name.clone() },
                    &self.stored.state,
                )
                .await?;
            }
        }
        for (name, t) in &self.stored.state.topics {
            if before.state.topics.get(name) != Some(t) {
                let cmd = Command::CreateTopic {
                    name: name.clone(),
                    config: t.config,
                    replicas: t.replicas.clone(),
                };
                self.local_effects(&cmd, &self.stored.state).await?;
            }
        }
        self.persist().await?;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<C, Vec<u8>>>, io::Error> {
        if self.stored.last_applied.is_none() {
            return Ok(None);
        }
        let s = self.snapshot_now()?;
        Ok(Some(SnapshotOf::<C, Vec<u8>> {
            meta: s.meta,
            snapshot: s.data,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_leading_some_partitions_gets_its_share_of_the_limits() {
        let mut config = TopicConfig::new(4, 0).expect("config");
        config.max_messages = 10;
        config.max_bytes = 8 << 20;
        let replicas = vec![vec![0], vec![1], vec![0], vec![2]];
        let local = local_config(&config, &replicas, 0).expect("leads two");
        assert_eq!(local.served.to_list(), vec![0, 2]);
        assert_eq!((local.max_messages, local.max_bytes), (5, 4 << 20));
        let one = local_config(&config, &replicas, 1).expect("leads one");
        assert_eq!(one.max_messages, 3, "rounded up");
        assert!(local_config(&config, &replicas, 3).is_none(), "leads none");
        let all =
            local_config(&config, &[vec![0], vec![0], vec![0], vec![0]], 0).expect("leads all");
        assert_eq!((all.max_messages, all.max_bytes), (10, 8 << 20));
    }
}
