//! A replica group's Raft log and state machine over the broker's log engine.
//!
//! The log store keeps the group's entries where the partition's records are: a `Records`
//! entry's batch in the `records` keyspace at its base offset, and the entry's term, base
//! offset and kind under `R ‖ group ‖ e ‖ index` in the `raft` keyspace
//! ([`crate::log::keys`]). Appends go to the broker's single writer thread and are
//! group-committed (one fsync per round for every partition's appends, leader and follower
//! alike); openraft is told an entry is flushed only once that round's fsync returned, so
//! Raft's commit (a majority flushed) means a majority have it on disk. Entries handed to
//! the writer and not yet stored are kept in memory (`pending`) so that they can be read at
//! once, as openraft requires; once stored they stay there until applied (up to
//! [`RETAIN_BYTES`] of batches), so that the state machine's read of the entries it applies
//! and the leader's reads for AppendEntries come from memory, not from the storage on a
//! blocking thread.
//!
//! The state machine is the partition's high watermark: applying a `Records` entry moves it
//! past the entry's records, makes them readable ([`Partition::publish`]) and answers the
//! produce with their offsets. It applies an entry once this replica has it written (in the
//! journal, perhaps before the round's fsync: Raft committed it, so a majority has it on
//! disk), never before. Its state (last applied log id, membership, end offset) is
//! written without an fsync, at most once a second for rounds of records only
//! ([`STATE_WRITE_INTERVAL`]; a later fsync of any round covers it); after a crash openraft
//! applies again from the stored point up to the stored committed log id.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Debug,
    io,
    ops::{Bound, RangeBounds},
    sync::Arc,
};

use fjall::{Database, Keyspace};
use futures::{Stream, TryStreamExt};
use openraft::{
    EntryPayload, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf},
    entry::RaftEntry,
    storage::{ApplyResponder, EntryResponder, IOFlushed, RaftLogStorage, RaftStateMachine},
};
use serde::{Deserialize, Serialize};

use super::{Appended, Proposal, ReplicaTypes};
use crate::log::{
    Ack, Log, Partition, ReplicaAppend, ReplicaPayload, ReplicaState,
    idempotence::ProducerState,
    keys::{self, GroupKey, ReplicaEntry, ReplicaEntryKind},
};

type C = ReplicaTypes;

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

fn to_json<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn from_json<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io_err)?
}

/// What a replica group shares between its log store, log reader and state machine.
pub(crate) struct Shared {
    pub log: Arc<Log>,
    pub db: Database,
    pub raft: Keyspace,
    pub group: GroupKey,
    pub partition: Arc<Partition>,
    /// Appends are fsynced before they count as flushed (the topic's durability is Fsync).
    pub fsync: bool,
    /// Entries handed to the writer and not yet applied, by index (see [`InMemory`]).
    pending: parking_lot::Mutex<InMemory>,
    /// The committed log id openraft saved last; stored with the next apply round's state
    /// (one write per round instead of one per commit, each of which took the journal's
    /// lock on the runtime's threads, waiting out a group commit's fsync).
    committed: parking_lot::Mutex<Option<LogIdOf<C>>>,
    /// Idempotent producers' state after the applied entries, by producer id (the state
    /// machine changes it; a new leader's sequencer starts from it).
    pub producers: parking_lot::Mutex<HashMap<u64, ProducerState>>,
    /// One past the index of the last entry the writer has stored (0: none). Set on the
    /// writer thread as appends complete and after truncations, so it follows the log in
    /// order. Raft may commit an entry this replica has not stored yet (a majority of the
    /// others has it); the state machine waits for it before it records or publishes
    /// anything, so that neither a reader nor a restart sees an applied entry that is not
    /// on this replica's disk.
    stored: tokio::sync::watch::Sender<u64>,
    /// One past the index of the last entry the writer has written (in the journal and
    /// readable, perhaps not fsynced yet: at least [`Shared::stored`]). The state machine
    /// applies an entry once it is written here: Raft committed it, so a majority has it on
    /// disk, which may not include this replica, and anything the state machine writes
    /// after it comes later in the journal, so no restart finds an applied point past its
    /// log. Lowered with `stored` by truncations.
    written: tokio::sync::watch::Sender<u64>,
    /// The last retention cut applied: the log may be purged up to it once a snapshot
    /// covers it ([`super::Replicas::open`] follows it).
    pub trimmed: tokio::sync::watch::Sender<Option<Purged>>,
}

/// Most bytes of record batches a replica group keeps in memory of entries that are stored
/// and not yet applied: 1 MiB (one AppendEntries request's worth, [`MAX_APPEND_BYTES`]).
/// Beyond it the oldest stored entries are read from the storage when needed.
pub const RETAIN_BYTES: usize = MAX_APPEND_BYTES;

/// A replica group's entries kept in memory: every entry appended and not yet stored (the
/// storage cannot return it yet), and stored entries not yet applied while their batches
/// total at most [`RETAIN_BYTES`]. Entries leave once applied, truncated or purged.
#[derive(Default)]
struct InMemory {
    entries: BTreeMap<u64, EntryOf<C>>,
    /// Bytes of the entries' record batches ([`entry_bytes`]).
    bytes: usize,
}

impl InMemory {
    fn insert(&mut self, index: u64, entry: EntryOf<C>) {
        self.bytes += entry_bytes(&entry);
        if let Some(old) = self.entries.insert(index, entry) {
            self.bytes -= entry_bytes(&old);
        }
    }

    /// Keeps the entries for which `keep(index)` holds.
    fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        let bytes = &mut self.bytes;
        self.entries.retain(|i, e| {
            let kept = keep(*i);
            if !kept {
                *bytes -= entry_bytes(e);
            }
            kept
        });
    }

    /// Drops the oldest stored entries (indexes below `stored_end`) while the kept batches
    /// exceed [`RETAIN_BYTES`]; entries not stored yet always stay.
    fn shed_stored(&mut self, stored_end: u64) {
        while self.bytes > RETAIN_BYTES {
            match self.entries.first_entry() {
                Some(first) if *first.key() < stored_end => {
                    self.bytes -= entry_bytes(&first.remove());
                }
                _ => break,
            }
        }
    }
}

impl Shared {
    /// Entries kept in memory and the bytes of their record batches.
    #[cfg(test)]
    pub(crate) fn in_memory(&self) -> (usize, usize) {
        let m = self.pending.lock();
        (m.entries.len(), m.bytes)
    }

    pub(crate) fn new(
        log: Arc<Log>,
        raft: Keyspace,
        group: GroupKey,
        partition: Arc<Partition>,
        fsync: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            db: log.database(),
            log,
            raft,
            group,
            partition,
            fsync,
            pending: parking_lot::Mutex::default(),
            committed: parking_lot::Mutex::default(),
            producers: parking_lot::Mutex::default(),
            stored: tokio::sync::watch::Sender::new(0),
            written: tokio::sync::watch::Sender::new(0),
            trimmed: tokio::sync::watch::Sender::new(None),
        })
    }

    fn get_json<T: for<'de> Deserialize<'de>>(&self, tag: u8) -> io::Result<Option<T>> {
        match self
            .raft
            .get(keys::replica_key(self.group, tag))
            .map_err(io_err)?
        {
            Some(v) => from_json(&v).map(Some),
            None => Ok(None),
        }
    }

    fn put_json<T: Serialize>(&self, tag: u8, value: &T) -> io::Result<()> {
        self.raft
            .insert(keys::replica_key(self.group, tag), to_json(value)?)
            .map_err(io_err)
    }

    /// Stores `value` as JSON under `tag` and fsyncs the journal before returning (off the
    /// runtime's threads).
    async fn put_json_durably<T: Serialize + Send + 'static>(
        self: &Arc<Self>,
        tag: u8,
        value: T,
    ) -> io::Result<()> {
        let shared = Arc::clone(self);
        blocking(move || {
            shared.put_json(tag, &value)?;
            shared
                .db
                .persist(fjall::PersistMode::SyncData)
                .map_err(io_err)
        })
        .await
    }

    /// The stored entry at `index`, if any.
    fn stored_entry(&self, index: u64) -> io::Result<Option<ReplicaEntry>> {
        match self
            .raft
            .get(keys::replica_entry_key(self.group, index))
            .map_err(io_err)?
        {
            Some(v) => Ok(Some(decode_entry(&v)?)),
            None => Ok(None),
        }
    }

    /// Whether nothing of the group was ever stored (no vote, no entry, and the log end
    /// checkpoint knows no log id: a journal that lost all of them is not a new group).
    pub(crate) fn is_empty(&self) -> io::Result<bool> {
        Ok(self.partition.last_log().is_none()
            && self
                .raft
                .get(keys::replica_key(self.group, b'v'))
                .map_err(io_err)?
                .is_none()
            && self.last_stored()?.is_none())
    }

    /// The last stored entry: `(index, entry)`.
    fn last_stored(&self) -> io::Result<Option<(u64, ReplicaEntry)>> {
        let range =
            keys::replica_entry_key(self.group, 0)..=keys::replica_entry_key(self.group, u64::MAX);
        match self.raft.range(range).next_back() {
            Some(guard) => {
                let (k, v) = guard.into_inner().map_err(io_err)?;
                let index = keys::parse_replica_entry_key(&k)
                    .ok_or_else(|| io_err("malformed replica entry key"))?;
                Ok(Some((index, decode_entry(&v)?)))
            }
            None => Ok(None),
        }
    }

    /// The end offset of the log after entry `index` (`None`: before any entry, the purge
    /// point's end).
    fn end_after(&self, index: Option<u64>) -> io::Result<u64> {
        let Some(index) = index else {
            return Ok(self.purged()?.map_or(0, |p| p.end_offset));
        };
        match self.stored_entry(index)? {
            Some(e) => Ok(e.end_offset()),
            None => match self.purged()? {
                Some(p) if p.log_id.index() >= index => Ok(p.end_offset),
                _ => Err(io_err(format!(
                    "replica log entry {index} is neither stored nor purged"
                ))),
            },
        }
    }

    fn purged(&self) -> io::Result<Option<Purged>> {
        self.get_json(b'p')
    }

    /// Records the point of a snapshot about to be installed (`R ‖ group ‖ s`), so that the
    /// purge up to it, which openraft may run before the state machine has installed it,
    /// knows the offset after it.
    pub(crate) fn note_snapshot(&self, point: &Purged) -> io::Result<()> {
        self.put_json(b's', point)
    }

    /// Checks the group's log against the partition's stored batches and repairs what it
    /// can locally, before the group starts:
    ///
    /// - An entry whose batch is gone (a damaged table or blob file the broker quarantined
    ///   at start-up, `log::salvage`) and every entry after it are truncated, and the state
    ///   machine is moved back before them, so the leader sends them again.
    /// - The partition's log end is made to match the last entry kept: after a lost journal
    ///   tail the end checkpoint runs ahead of the entries (`log::checkpoint`).
    ///
    /// Returns the damage found: entries and offsets this replica had stored and no longer
    /// has, with the last log id its log had reached (the log end checkpoint keeps it
    /// outside the journal). Such a replica must not stand for election until it has them
    /// again, and votes only for a candidate whose log is at least as up to date as its own
    /// was (see [`super::Replicas::open`]): a Raft voter that forgot entries it acknowledged
    /// could otherwise help elect a leader without them. The damage is kept (`R ‖ group ‖
    /// d`, fsynced) until the replica is repaired ([`Shared::repaired`]), so a restart
    /// before that does not forget it.
    pub(crate) async fn check_and_align(self: &Arc<Self>) -> io::Result<Option<Damage>> {
        let start = self.purged()?.map_or(0, |p| p.end_offset);
        // A purge interrupted between its entries and its batches.
        self.delete_purged_batches(start).await?;
        // The end the local log recovered: the stored batches, counters and end checkpoint.
        let recovered_end = self.partition.log_end();
        let checkpointed_log = self.partition.last_log();
        let last = self.last_stored()?;
        let stored_end = last.as_ref().map_or(start, |(_, e)| e.end_offset());
        let shared = Arc::clone(self);
        let missing = blocking(move || shared.first_missing_batch()).await?;
        let (from, end) = match missing {
            Some(index) => (index, self.end_after(index.checked_sub(1))?),
            None => (last.as_ref().map_or(0, |(i, _)| i + 1), stored_end),
        };
        let had_log = checkpointed_log.max(last.as_ref().map(|(i, e)| (e.term, *i)));
        let kept_log = self.last_log_before(from)?;
        if let Some(index) = missing {
            self.rewind_machine(index)?;
        }
        self.stored.send_replace(from);
        self.written.send_replace(from);
        if self.partition.log_end() != end || missing.is_some() {
            self.log
                .replica_truncate(
                    Arc::clone(&self.partition),
                    self.raft.clone(),
                    self.group,
                    from,
                    start,
                )
                .await
                .map_err(io_err)?;
        }
        *self.partition.last_log.lock() = kept_log;
        let had = recovered_end.max(stored_end);
        let found = (had > end || had_log > kept_log).then_some(Damage {
            truncated_from: missing,
            lost_from: end,
            lost_to: had,
            had_log,
        });
        let earlier: Option<Damage> = self.get_json(b'd')?;
        let damage = match (found, earlier) {
            (Some(f), Some(e)) => Some(Damage {
                truncated_from: f.truncated_from,
                lost_from: f.lost_from.min(e.lost_from),
                lost_to: f.lost_to.max(e.lost_to),
                had_log: f.had_log.max(e.had_log),
            }),
            (f, e) => f.or(e),
        };
        if damage != earlier
            && let Some(d) = damage
        {
            self.put_json_durably(b'd', d).await?;
        }
        Ok(damage)
    }

    /// Forgets the damage [`Shared::check_and_align`] kept: the replica has what it lost.
    pub(crate) fn repaired(&self) -> io::Result<()> {
        self.raft
            .remove(keys::replica_key(self.group, b'd'))
            .map_err(io_err)
    }

    /// The last log id `(term, index)` of the entries before index `next` (blocking read of
    /// one entry; the purge point when none is stored).
    pub(crate) fn last_log_before(&self, next: u64) -> io::Result<Option<(u64, u64)>> {
        let stored = match next.checked_sub(1) {
            Some(i) => self.stored_entry(i)?.map(|e| (e.term, i)),
            None => None,
        };
        match stored {
            Some(id) => Ok(Some(id)),
            None => Ok(self.purged()?.map(|p| log_pair(&p.log_id))),
        }
    }

    /// The index of the first `Records` entry whose batch is not stored. Reads keys only.
    fn first_missing_batch(&self) -> io::Result<Option<u64>> {
        let start = self.purged()?.map_or(0, |p| p.end_offset);
        let stored = self
            .log
            .batch_offsets(&self.partition, start)
            .map_err(io_err)?;
        let mut stored = stored.into_iter().peekable();
        let range =
            keys::replica_entry_key(self.group, 0)..=keys::replica_entry_key(self.group, u64::MAX);
        for guard in self.raft.range(range) {
            let (k, v) = guard.into_inner().map_err(io_err)?;
            let index = keys::parse_replica_entry_key(&k)
                .ok_or_else(|| io_err("malformed replica entry key"))?;
            let entry = decode_entry(&v)?;
            if !matches!(entry.kind, ReplicaEntryKind::Records { records, .. } if records > 0) {
                continue;
            }
            while stored.next_if(|o| *o < entry.base_offset).is_some() {}
            if stored.next_if_eq(&entry.base_offset).is_none() {
                return Ok(Some(index));
            }
        }
        Ok(None)
    }

    /// Moves the state machine's stored state back before entry `index` when it applied
    /// it: openraft takes a log that ends before the applied point for a purged one (a
    /// snapshot) and would never ask for the entries again. Producers' states stay: an
    /// entry applied again is recorded once.
    fn rewind_machine(&self, index: u64) -> io::Result<()> {
        let mut state: MachineState = self.get_json(b'a')?.unwrap_or_default();
        if state.last_applied.is_none_or(|a| a.index() < index) {
            return Ok(());
        }
        let before = match index.checked_sub(1) {
            Some(i) => self
                .stored_entry(i)?
                .map(|e| (LogIdOf::<C>::new_term_index(e.term, i), e.end_offset())),
            None => None,
        };
        let (last_applied, end_offset) = match before {
            Some((id, end)) => (Some(id), end),
            None => match self.purged()? {
                Some(p) => (Some(p.log_id), p.end_offset),
                None => (None, 0),
            },
        };
        if state
            .membership
            .log_id()
            .is_some_and(|m| last_applied.is_none_or(|a| m.index() > a.index()))
        {
            state.membership = StoredMembershipOf::<C>::default();
        }
        state.last_applied = last_applied;
        state.end_offset = end_offset;
        self.put_json(b'a', &state)
    }

    /// Deletes the partition's batches below `end` (the purge point's end), which moves its
    /// earliest offset there.
    async fn delete_purged_batches(&self, end: u64) -> io::Result<()> {
        if self.partition.earliest_offset() < end {
            self.log
                .truncate(Arc::clone(&self.partition), end)
                .await
                .map_err(io_err)?;
        }
        Ok(())
    }

    /// One past the last stored entry's index, as the writer thread last set it.
    pub(crate) fn stored_index(&self) -> tokio::sync::watch::Receiver<u64> {
        self.stored.subscribe()
    }

    /// The offset after the records of the stored entries before index `next` (blocking
    /// read of one entry).
    pub(crate) fn stored_end(&self, next: u64) -> io::Result<u64> {
        self.end_after(next.checked_sub(1))
    }
}

/// Data a replica had and lost (found by [`Shared::check_and_align`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Damage {
    /// The first entry truncated because its batch was gone, if any (else only the log's
    /// tail was lost, with the journal's).
    pub truncated_from: Option<u64>,
    /// First offset lost.
    pub lost_from: u64,
    /// The offset this replica's log had reached.
    pub lost_to: u64,
    /// The last log id `(term, index)` this replica's log had reached, when known (the
    /// log end checkpoint or the entries kept it; a data directory of an earlier version
    /// may not know it).
    pub had_log: Option<(u64, u64)>,
}

/// A log id as `(term, index)`, ordered as Raft compares logs.
pub(crate) fn log_pair(id: &LogIdOf<C>) -> (u64, u64) {
    (**id.committed_leader_id(), id.index())
}

fn decode_entry(bytes: &[u8]) -> io::Result<ReplicaEntry> {
    ReplicaEntry::decode(bytes).ok_or_else(|| io_err("malformed replica log entry"))
}

/// A point of the log: an entry's log id and the offset after its records (the purge point,
/// a retention cut, a snapshot's point).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Purged {
    pub log_id: LogIdOf<C>,
    pub end_offset: u64,
}

/// A replica group's Raft log.
#[derive(Clone)]
pub struct ReplicaLog(pub(crate) Arc<Shared>);

impl RaftLogReader<C> for ReplicaLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<C>>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x + 1,
            Bound::Unbounded => 0,
        };
        let shared = Arc::clone(&self.0);
        let pending: BTreeMap<u64, EntryOf<C>> = {
            let p = shared.pending.lock();
            p.entries
                .range(start..)
                .take_while(|(i, _)| range.contains(i))
                .map(|(i, e)| (*i, e.clone()))
                .collect()
        };
        let first_pending = pending.keys().next().copied().unwrap_or(u64::MAX);
        if start >= first_pending {
            // All in memory (the usual case: appended or applied moments ago).
            return Ok(pending.into_values().collect());
        }
        let end = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        let mut out = blocking(move || {
            let mut out = Vec::new();
            let from = keys::replica_entry_key(shared.group, start);
            let to = keys::replica_entry_key(shared.group, first_pending.saturating_sub(1));
            for guard in shared.raft.range(from..=to) {
                let (k, v) = guard.into_inner().map_err(io_err)?;
                let index = keys::parse_replica_entry_key(&k)
                    .ok_or_else(|| io_err("malformed replica entry key"))?;
                if index >= end {
                    break;
                }
                let stored = decode_entry(&v)?;
                let log_id = LogIdOf::<C>::new_term_index(stored.term, index);
                let payload = match stored.kind {
                    ReplicaEntryKind::Records { records, producer } => {
                        let batch = shared
                            .log
                            .read_batch(&shared.partition, stored.base_offset)
                            .map_err(io_err)?
                            .ok_or_else(|| {
                                io_err(format!(
                                    "the batch of replica log entry {index} (offset {}) is missing",
                                    stored.base_offset
                                ))
                            })?;
                        EntryPayload::Normal(Proposal::Records {
                            batch,
                            records,
                            producer,
                        })
                    }
                    ReplicaEntryKind::Blank => EntryPayload::Blank,
                    ReplicaEntryKind::Membership(json) => {
                        EntryPayload::Membership(from_json(&json)?)
                    }
                    ReplicaEntryKind::Cursors(json) => {
                        EntryPayload::Normal(Proposal::Cursors(from_json(&json)?))
                    }
                    ReplicaEntryKind::Trim(earliest) => {
                        EntryPayload::Normal(Proposal::Trim { earliest })
                    }
                };
                out.push(EntryOf::<C>::new(log_id, payload));
            }
            Ok(out)
        })
        .await?;
        out.extend(pending.into_values());
        Ok(out)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        self.0.get_json(b'v')
    }

    /// The entries of `[start, end)` for one AppendEntries request: read a few at a time
    /// until their record batches reach [`MAX_APPEND_BYTES`] (at least one entry).
    /// openraft's `max_payload_entries` (300) counts entries, and an entry here is a whole
    /// produce request's batch (up to MiBs); a request's entries are held by the leader
    /// until sent and by the follower until stored, for each request in flight.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<EntryOf<C>>, io::Error> {
        const STEP: u64 = 8;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut from = start;
        while from < end && (out.is_empty() || bytes < MAX_APPEND_BYTES) {
            let to = end.min(from + STEP);
            let chunk = self.try_get_log_entries(from..to).await?;
            if chunk.is_empty() {
                break;
            }
            for entry in chunk {
                if !out.is_empty() && bytes >= MAX_APPEND_BYTES {
                    break;
                }
                bytes += entry_bytes(&entry);
                out.push(entry);
            }
            from = to;
        }
        Ok(out)
    }
}

/// Most bytes of record batches in one AppendEntries request (more only when one entry is
/// larger): 1 MiB.
pub const MAX_APPEND_BYTES: usize = 1024 * 1024;

/// Bytes of `entry`'s record batch (0 for entries without records).
fn entry_bytes(entry: &EntryOf<C>) -> usize {
    match &entry.payload {
        EntryPayload::Normal(Proposal::Records { batch, .. }) => batch.len(),
        _ => 0,
    }
}

impl RaftLogStorage<C> for ReplicaLog {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let purged = self.0.purged()?.map(|p| p.log_id);
        let last = self
            .0
            .last_stored()?
            .map(|(index, e)| LogIdOf::<C>::new_term_index(e.term, index));
        let pending = self
            .0
            .pending
            .lock()
            .entries
            .values()
            .next_back()
            .map(RaftEntry::log_id);
        Ok(LogState {
            last_log_id: pending.or(last).or(purged),
            last_purged_log_id: purged,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        self.0.put_json_durably(b'v', *vote).await
    }

    /// Kept in memory and stored with the next apply round's state (openraft makes saving
    /// it optional: it only lets a restarted replica apply up to it before it hears from a
    /// leader). openraft saves it just before it applies the entries up to it.
    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        if committed.is_some() {
            *self.0.committed.lock() = committed;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        // Saved without waiting for the entries it names to be stored: after a crash it can
        // be ahead of this replica's log, and then it is not used (the leader tells again).
        let committed = self.0.get_json::<Option<LogIdOf<C>>>(b'c')?.flatten();
        let last = self.0.last_stored()?.map(|(index, _)| index);
        Ok(committed.filter(|c| last.is_some_and(|l| c.index() <= l)))
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<C>> + OptionalSend,
    {
        let mut batch = Vec::new();
        let mut last = None;
        {
            let mut pending = self.0.pending.lock();
            for entry in entries {
                let log_id = entry.log_id();
                let payload = match &entry.payload {
                    EntryPayload::Normal(Proposal::Records {
                        batch,
                        records,
                        producer,
                    }) => ReplicaPayload::Records {
                        batch: batch.to_vec(),
                        records: *records,
                        producer: *producer,
                    },
                    EntryPayload::Normal(Proposal::Cursors(c)) => {
                        ReplicaPayload::Cursors(to_json(c)?)
                    }
                    EntryPayload::Normal(Proposal::Trim { earliest }) => {
                        ReplicaPayload::Trim(*earliest)
                    }
                    EntryPayload::Blank => ReplicaPayload::Blank,
                    EntryPayload::Membership(m) => ReplicaPayload::Membership(to_json(m)?),
                };
                batch.push((log_id.index(), **log_id.committed_leader_id(), payload));
                last = Some(log_id.index());
                pending.insert(log_id.index(), entry);
            }
        }
        let shared = Arc::clone(&self.0);
        let next = last.map(|index| index + 1);
        let written = {
            let shared = Arc::clone(&self.0);
            Box::new(move || {
                if let Some(next) = next {
                    shared.written.send_replace(next);
                }
            })
        };
        let done = Box::new(move |result: Result<(), crate::log::Error>| {
            if result.is_ok()
                && let Some(next) = next
            {
                shared.stored.send_replace(next);
            }
            // Stored now (or failed, and the broker stops): readable from fjall too, and kept
            // in memory until applied within the budget.
            let stored_end = *shared.stored.borrow();
            shared.pending.lock().shed_stored(stored_end);
            callback.io_completed(result.map_err(io_err));
        });
        self.0
            .log
            .replica_append(ReplicaAppend {
                partition: Arc::clone(&self.0.partition),
                raft: self.0.raft.clone(),
                group: self.0.group,
                fsync: self.0.fsync,
                entries: batch,
                written,
                done,
            })
            .await
            .map_err(io_err)
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last_log_id.map_or(0, |l| l.index() + 1);
        self.0.pending.lock().retain(|i| i < from);
        // The writer takes commands in order: entries before `from` still queued are stored
        // by the time it truncates, and it reads the new log end from the entry before.
        let start = self.0.purged()?.map_or(0, |p| p.end_offset);
        self.0
            .log
            .replica_truncate(
                Arc::clone(&self.0.partition),
                self.0.raft.clone(),
                self.0.group,
                from,
                start,
            )
            .await
            .map_err(io_err)?;
        // Appends queued before the truncation have completed (the writer runs in order).
        for index in [&self.0.stored, &self.0.written] {
            index.send_if_modified(|s| {
                let lower = (*s).min(from);
                std::mem::replace(s, lower) != lower
            });
        }
        Ok(())
    }

    /// Purges the entries up to `log_id` (a retention cut a snapshot covers, or a snapshot
    /// installed from the leader), then deletes the partition's batches below the offset
    /// after them: entries go first, so that no entry this replica still has names a batch
    /// that is gone (a crash between the two leaves batches that the next start deletes).
    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        let end_offset = match self.0.end_after(Some(log_id.index())) {
            Ok(end) => end,
            Err(e) => self
                .0
                .get_json::<Purged>(b's')?
                .filter(|s| s.log_id == log_id)
                .map(|s| s.end_offset)
                .ok_or(e)?,
        };
        self.0.put_json(b'p', &Purged { log_id, end_offset })?;
        self.0.pending.lock().retain(|i| i > log_id.index());
        let shared = Arc::clone(&self.0);
        blocking(move || {
            let mut wb = shared.db.batch();
            for guard in shared.raft.range(
                keys::replica_entry_key(shared.group, 0)
                    ..=keys::replica_entry_key(shared.group, log_id.index()),
            ) {
                wb.remove(&shared.raft, guard.key().map_err(io_err)?);
            }
            wb.commit().map_err(io_err)
        })
        .await?;
        self.0.delete_purged_batches(end_offset).await
    }
}

/// The state machine's stored state (`R ‖ group ‖ a`) and snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MachineState {
    last_applied: Option<LogIdOf<C>>,
    membership: StoredMembershipOf<C>,
    /// The high watermark: the offset after the last applied entry's records.
    end_offset: u64,
    /// The last retention cut applied: the last entry whose records all lie below the
    /// `Trim` entry's earliest offset. Snapshots are taken at it (the log is purged up to
    /// it); `None` before the first trim.
    #[serde(default)]
    trim_point: Option<Purged>,
}

/// The point of a snapshot a leader sent (its log id and the offset after it).
pub(crate) fn snapshot_point(meta: &SnapshotMetaOf<C>, data: &[u8]) -> io::Result<Purged> {
    let log_id = meta
        .last_log_id
        .ok_or_else(|| io_err("a replica snapshot without a log id"))?;
    let state: SnapshotState = from_json(data)?;
    Ok(Purged {
        log_id,
        end_offset: state.end_offset,
    })
}

/// A snapshot of a replicated partition's state at a retention cut: what a replica needs to
/// take the log from the entry after the cut on. The records stay in the log (entries after
/// the cut are sent as usual); a replica that had fewer starts its partition empty at
/// `end_offset`. Producers' states and cursors are the latest the snapshotting replica
/// applied: applying the entries after the cut on top of them changes nothing (an entry's
/// sequence or cursor is recorded only when newer), so the state after catching up is the
/// leader's.
#[derive(Debug, Default, Serialize, Deserialize)]
struct SnapshotState {
    /// The offset after the cut's records: the partition's earliest offset.
    end_offset: u64,
    /// Idempotent producers' states by producer id.
    producers: Vec<(u64, ProducerState)>,
    /// Groups' cursors: key after the group prefix (`name ‖ 0 ‖ partition`) → cursor.
    cursors: Vec<(Vec<u8>, Vec<u8>)>,
}

/// How often at most a round of records only writes the state machine's state (its
/// applied point and the producers' states it changed): the state is not fsynced and a
/// restart applies the entries after the stored point again, so the interval bounds that
/// work, not what survives. Kafka checkpoints its high watermarks every 5 s
/// (`replica.high.watermark.checkpoint.interval.ms`). Writing it every round cost each
/// replica a JSON state, ~400 bytes per idempotent producer and a journal write per entry.
pub const STATE_WRITE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// A replica group's state machine: the partition's high watermark.
pub struct ReplicaMachine {
    shared: Arc<Shared>,
    state: MachineState,
    /// When a round last wrote the state (`None`: not since it was opened).
    written_at: Option<std::time::Instant>,
    /// Producers whose state changed since the state was last written.
    unwritten: BTreeSet<u64>,
}

impl ReplicaMachine {
    /// Loads the stored state and makes the partition readable up to its high watermark.
    pub(crate) fn open(shared: Arc<Shared>) -> io::Result<Self> {
        let state: MachineState = shared.get_json(b'a')?.unwrap_or_default();
        let mut producers = HashMap::new();
        let prefix = keys::replica_key(shared.group, b'q');
        for guard in shared.raft.prefix(prefix) {
            let (k, v) = guard.into_inner().map_err(io_err)?;
            let id = k
                .get(14..22)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| io_err("malformed replica producer key"))?;
            let state = ProducerState::decode(&v)
                .map_err(|e| io_err(format!("unreadable producer state of producer {id}: {e}")))?;
            producers.insert(id, state);
        }
        *shared.producers.lock() = producers;
        shared.partition.replicate_from(state.end_offset);
        shared.trimmed.send_replace(state.trim_point.clone());
        Ok(Self {
            shared,
            state,
            written_at: None,
            unwritten: BTreeSet::new(),
        })
    }
}

impl RaftSnapshotBuilder<C> for ReplicaSnapshot {
    type SnapshotData = Vec<u8>;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, Vec<u8>>, io::Error> {
        Ok(SnapshotOf::<C, Vec<u8>> {
            meta: self.meta.clone(),
            snapshot: self.data.clone(),
        })
    }
}

/// A copy of the state machine taken for a snapshot.
pub struct ReplicaSnapshot {
    meta: SnapshotMetaOf<C>,
    data: Vec<u8>,
}

impl ReplicaMachine {
    /// A snapshot at the last retention cut ([`SnapshotState`]); without one, an empty
    /// snapshot (no log id) that openraft ignores.
    fn snapshot_now(&self) -> io::Result<ReplicaSnapshot> {
        let Some(point) = self.state.trim_point.clone() else {
            return Ok(ReplicaSnapshot {
                meta: SnapshotMetaOf::<C>::default(),
                data: Vec::new(),
            });
        };
        let producers = self
            .shared
            .producers
            .lock()
            .iter()
            .map(|(id, p)| (*id, p.clone()))
            .collect();
        let prefix = keys::replica_key(self.shared.group, b'o');
        let mut cursors = Vec::new();
        for guard in self.shared.raft.prefix(prefix) {
            let (k, v) = guard.into_inner().map_err(io_err)?;
            cursors.push((
                k.get(prefix.len()..).unwrap_or_default().to_vec(),
                v.to_vec(),
            ));
        }
        let state = SnapshotState {
            end_offset: point.end_offset,
            producers,
            cursors,
        };
        Ok(ReplicaSnapshot {
            meta: SnapshotMetaOf::<C> {
                last_log_id: Some(point.log_id),
                last_membership: self.state.membership.clone(),
            },
            data: to_json(&state)?,
        })
    }

    /// The retention cut for `earliest`: the last entry after the current cut, up to
    /// `last`, whose records all lie below `earliest` (entries' ends only grow, so the scan
    /// stops at the first one past it). `None` when no entry moved. Reads entry keys.
    fn trim_point(&self, earliest: u64, last: u64) -> io::Result<Option<Purged>> {
        let from = match (&self.state.trim_point, self.shared.purged()?) {
            (Some(t), _) => t.log_id.index() + 1,
            (None, Some(p)) => p.log_id.index() + 1,
            (None, None) => 0,
        };
        if from > last {
            return Ok(None);
        }
        let mut point = None;
        for guard in self.shared.raft.range(
            keys::replica_entry_key(self.shared.group, from)
                ..=keys::replica_entry_key(self.shared.group, last),
        ) {
            let (k, v) = guard.into_inner().map_err(io_err)?;
            let index = keys::parse_replica_entry_key(&k)
                .ok_or_else(|| io_err("malformed replica entry key"))?;
            let entry = decode_entry(&v)?;
            if entry.end_offset() > earliest {
                break;
            }
            point = Some(Purged {
                log_id: LogIdOf::<C>::new_term_index(entry.term, index),
                end_offset: entry.end_offset(),
            });
        }
        Ok(point)
    }

    /// Takes a snapshot from the leader: the partition restarts empty at the snapshot's
    /// offset (its entries and batches deleted, as a follower behind the leader's retention
    /// has nothing the leader still sends), then producers' states and cursors are the
    /// snapshot's.
    async fn install(
        &mut self,
        point: Purged,
        state: SnapshotState,
        membership: StoredMembershipOf<C>,
    ) -> io::Result<()> {
        let shared = Arc::clone(&self.shared);
        shared.note_snapshot(&point)?;
        shared.put_json(b'p', &point)?;
        shared
            .log
            .replica_truncate(
                Arc::clone(&shared.partition),
                shared.raft.clone(),
                shared.group,
                0,
                point.end_offset,
            )
            .await
            .map_err(io_err)?;
        shared.delete_purged_batches(point.end_offset).await?;
        shared.pending.lock().retain(|i| i > point.log_id.index());
        shared.stored.send_replace(point.log_id.index() + 1);
        shared.written.send_replace(point.log_id.index() + 1);
        let group = shared.group;
        let mut wb = shared.db.batch();
        for tag in [b'q', b'o'] {
            for key in shared
                .raft
                .prefix(keys::replica_key(group, tag))
                .map(fjall::Guard::key)
            {
                wb.remove(&shared.raft, key.map_err(io_err)?);
            }
        }
        for (id, p) in &state.producers {
            let mut key = keys::replica_key(group, b'q').to_vec();
            key.extend_from_slice(&id.to_be_bytes());
            wb.insert(&shared.raft, key, p.encode());
        }
        for (suffix, cursor) in &state.cursors {
            let mut key = keys::replica_key(group, b'o').to_vec();
            key.extend_from_slice(suffix);
            wb.insert(&shared.raft, key, cursor.clone());
        }
        self.state = MachineState {
            last_applied: Some(point.log_id),
            membership,
            end_offset: point.end_offset,
            trim_point: Some(point.clone()),
        };
        wb.insert(
            &shared.raft,
            keys::replica_key(group, b'a'),
            to_json(&self.state)?,
        );
        wb.commit().map_err(io_err)?;
        self.unwritten.clear();
        self.written_at = Some(std::time::Instant::now());
        *shared.producers.lock() = state.producers.into_iter().collect();
        shared.partition.publish(point.end_offset);
        tracing::info!(topic = %shared.partition.topic, partition = shared.partition.index, offset = point.end_offset, "replica caught up from a snapshot of its leader (its log started past this replica's)");
        Ok(())
    }
}

impl ReplicaMachine {
    /// Makes the applied records readable (the end offset moved from `before`) and answers
    /// the proposals of the round with where their records are.
    fn publish_and_answer(&self, before: u64, answers: Vec<(ApplyResponder<C>, Appended)>) {
        if self.state.end_offset != before {
            self.shared.partition.publish(self.state.end_offset);
        }
        for (r, appended) in answers {
            r.send(appended);
        }
    }

    /// Writes the state as one atomic batch, through the log writer, in the order of the
    /// rounds (not fsynced: a later round's fsync covers it; after a crash the entries
    /// after the stored point are applied again): the states of the producers changed
    /// since the last write ([`ReplicaMachine::unwritten`], emptied), groups' cursors
    /// (`forgotten` groups' removed first), and the applied point; notes the time of the
    /// write. With `wait`, returns once the batch is committed; without, once it is queued,
    /// so that the next round does not wait for the writer's round (whose fsync holds the
    /// journal).
    async fn write_applied(
        &mut self,
        forgotten: &BTreeSet<String>,
        cursors: BTreeMap<(String, u32), Vec<u8>>,
        wait: bool,
    ) -> Result<(), io::Error> {
        let touched = std::mem::take(&mut self.unwritten);
        self.written_at = Some(std::time::Instant::now());
        let group = self.shared.group;
        let mut puts = Vec::with_capacity(touched.len() + cursors.len() + 2);
        let mut removes = Vec::new();
        {
            let producers = self.shared.producers.lock();
            for (id, state) in touched
                .iter()
                .filter_map(|id| Some((id, producers.get(id)?)))
            {
                let mut key = keys::replica_key(group, b'q').to_vec();
                key.extend_from_slice(&id.to_be_bytes());
                puts.push((key, state.encode()));
            }
        }
        for name in forgotten {
            let prefix = keys::replica_cursor_prefix(group, name);
            for key in self.shared.raft.prefix(&prefix).map(fjall::Guard::key) {
                removes.push(key.map_err(io_err)?.to_vec());
            }
        }
        for ((name, partition), cursor) in cursors {
            puts.push((keys::replica_cursor_key(group, &name, partition), cursor));
        }
        puts.push((
            keys::replica_key(group, b'a').to_vec(),
            to_json(&self.state)?,
        ));
        if let Some(committed) = self.shared.committed.lock().take() {
            puts.push((
                keys::replica_key(group, b'c').to_vec(),
                to_json(&Some(committed))?,
            ));
        }
        let (done, committed) = if wait {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let done: crate::log::Flushed = Box::new(move |result| {
                let _ = tx.send(result);
            });
            (Some(done), Some(rx))
        } else {
            (None, None)
        };
        self.shared
            .log
            .replica_state(ReplicaState {
                raft: self.shared.raft.clone(),
                removes,
                puts,
                done,
            })
            .await
            .map_err(io_err)?;
        if let Some(rx) = committed {
            rx.await.map_err(io_err)?.map_err(io_err)?;
        }
        Ok(())
    }
}

/// What one apply round's entries changed besides the records and producers (see
/// [`ReplicaMachine::apply_entry`]).
#[derive(Default)]
struct RoundChanges {
    /// Groups' cursors by `(group, partition)`, the latest of the round.
    cursors: BTreeMap<(String, u32), Vec<u8>>,
    /// Groups whose cursors an entry without cursors removed (the group was deleted).
    forgotten: BTreeSet<String>,
    /// The highest retention cut among the entries.
    trim: Option<u64>,
    /// A membership entry was applied.
    membership_changed: bool,
}

impl ReplicaMachine {
    /// Applies one entry to the in-memory state: a `Records` entry moves the end offset
    /// past its records and records its idempotent producer's request (once, also when
    /// applied again after a restart; the producer is then left in
    /// [`ReplicaMachine::unwritten`]); other entries go to `round`. Returns what the
    /// entry's proposer is answered.
    fn apply_entry(&mut self, entry: &EntryOf<C>, round: &mut RoundChanges) -> Appended {
        let log_id = entry.log_id();
        self.state.last_applied = Some(log_id);
        let base = self.state.end_offset;
        let nothing = Appended {
            base_offset: base,
            records: 0,
        };
        match &entry.payload {
            EntryPayload::Normal(Proposal::Cursors(c)) => {
                if c.cursors.is_empty() {
                    round.cursors.retain(|(group, _), _| *group != c.group);
                    round.forgotten.insert(c.group.clone());
                }
                for (partition, cursor) in &c.cursors {
                    round
                        .cursors
                        .insert((c.group.clone(), *partition), cursor.clone());
                }
                nothing
            }
            EntryPayload::Normal(Proposal::Records {
                records, producer, ..
            }) => {
                let records = *records;
                self.state.end_offset += u64::from(records);
                if let Some((id, sequence)) = *producer {
                    let mut producers = self.shared.producers.lock();
                    let state = producers.entry(id).or_default();
                    // An entry applied again after a restart is recorded once.
                    if state.last.is_none_or(|last| sequence > last) {
                        state.record(
                            sequence,
                            vec![Ack {
                                partition: self.shared.partition.index,
                                base_offset: base,
                                record_count: records,
                            }],
                        );
                        self.unwritten.insert(id);
                    }
                }
                Appended {
                    base_offset: base,
                    records,
                }
            }
            EntryPayload::Normal(Proposal::Trim { earliest }) => {
                round.trim = round.trim.max(Some(*earliest));
                nothing
            }
            EntryPayload::Blank => nothing,
            EntryPayload::Membership(m) => {
                round.membership_changed = true;
                self.state.membership = StoredMembershipOf::<C>::new(Some(log_id), m.clone());
                nothing
            }
        }
    }
}

impl RaftStateMachine<C> for ReplicaMachine {
    type SnapshotData = Vec<u8>;
    type SnapshotBuilder = ReplicaSnapshot;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<C>>, StoredMembershipOf<C>), io::Error> {
        Ok((self.state.last_applied, self.state.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        let mut answers = Vec::new();
        let mut round = RoundChanges::default();
        let before = self.state.end_offset;
        while let Some((entry, responder)) = entries.try_next().await? {
            let appended = self.apply_entry(&entry, &mut round);
            if let Some(r) = responder {
                answers.push((r, appended));
            }
        }
        // Nothing of an entry this replica has not written yet is recorded or published.
        if let Some(last) = self.state.last_applied {
            let mut written = self.shared.written.subscribe();
            let _ = written.wait_for(|s| *s > last.index()).await;
            // Applied: read from the storage from now on, if ever (a follower far behind).
            self.shared.pending.lock().retain(|i| i > last.index());
        }
        // A round of records only is answered before its state is written: the records are
        // committed (a majority has them fsynced) and the state write is not fsynced anyway
        // (after a crash the round is applied again). openraft counts the round applied
        // (for linearizable reads) only once this returns, after the write. It writes the
        // state at most every STATE_WRITE_INTERVAL; a membership change, cursors and
        // retention always write it (with the producers earlier rounds left unwritten).
        let RoundChanges {
            cursors,
            forgotten,
            trim,
            membership_changed,
        } = round;
        let records_only = trim.is_none() && cursors.is_empty() && forgotten.is_empty();
        if records_only {
            self.publish_and_answer(before, answers);
            let recent = self
                .written_at
                .is_some_and(|at| at.elapsed() < STATE_WRITE_INTERVAL);
            if recent && !membership_changed {
                return Ok(());
            }
            return self.write_applied(&forgotten, cursors, false).await;
        }
        let mut cut = None;
        if let (Some(earliest), Some(last)) = (trim, self.state.last_applied) {
            cut = self.trim_point(earliest, last.index())?;
            if cut.is_some() {
                self.state.trim_point.clone_from(&cut);
            }
        }
        self.write_applied(&forgotten, cursors, true).await?;
        if cut.is_some() {
            self.shared.trimmed.send_replace(cut);
        }
        self.publish_and_answer(before, answers);
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.snapshot_now().unwrap_or_else(|e| {
            tracing::error!(error = %e, "encoding a replica snapshot failed");
            ReplicaSnapshot {
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
        let log_id = meta
            .last_log_id
            .ok_or_else(|| io_err("a replica snapshot without a log id"))?;
        let state: SnapshotState = from_json(&snapshot)?;
        let point = Purged {
            log_id,
            end_offset: state.end_offset,
        };
        self.install(point, state, meta.last_membership.clone())
            .await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<C, Vec<u8>>>, io::Error> {
        if self.state.trim_point.is_none() {
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
    use openraft::entry::RaftEntry;

    use super::*;

    fn entry(index: u64, bytes: usize) -> EntryOf<C> {
        EntryOf::<C>::new(
            LogIdOf::<C>::new_term_index(1, index),
            EntryPayload::Normal(Proposal::Records {
                batch: bytes::Bytes::from(vec![0u8; bytes]),
                records: 1,
                producer: None,
            }),
        )
    }

    /// Stored entries are shed oldest first once the batches pass [`RETAIN_BYTES`];
    /// entries not stored yet stay whatever their size; the byte count follows inserts,
    /// replacements and removals.
    #[test]
    fn stored_entries_are_shed_oldest_first_beyond_the_budget() {
        let third = RETAIN_BYTES / 3;
        let mut m = InMemory::default();
        for i in 0..6 {
            m.insert(i, entry(i, third));
        }
        assert_eq!(m.bytes, 6 * third);
        // Nothing stored: nothing may go.
        m.shed_stored(0);
        assert_eq!(m.entries.len(), 6);
        // Entries 0..4 stored: the oldest go until the rest fit (or only unstored are left).
        m.shed_stored(4);
        assert_eq!(m.entries.keys().copied().collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(m.bytes, 3 * third);
        // A replaced entry (same index, another term after a truncation) counts once.
        m.insert(5, entry(5, 10));
        assert_eq!(m.bytes, 2 * third + 10);
        m.retain(|i| i > 3);
        assert_eq!(m.entries.keys().copied().collect::<Vec<_>>(), [4, 5]);
        assert_eq!(m.bytes, third + 10);
        // Unstored entries above the budget stay.
        m.insert(6, entry(6, 2 * RETAIN_BYTES));
        m.shed_stored(5);
        assert_eq!(m.entries.keys().copied().collect::<Vec<_>>(), [5, 6]);
        m.retain(|_| false);
        assert_eq!((m.entries.len(), m.bytes), (0, 0));
    }
}
