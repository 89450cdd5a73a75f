//! The writer's part of replicated partitions: storing a replica group's Raft log entries
//! (record batches at the offsets the log gives them, and the entries' index in the `raft`
//! keyspace) in the same group commit as every other append, and truncating a divergent tail.
//!
//! Offsets: an entry's base offset is the end of the entry before it (the partition's
//! `assigned_next`), so every replica that holds the same log prefix stores the same batches
//! at the same offsets, sealed with the entry's term as leader epoch (identical bytes).

use std::sync::{Arc, atomic::Ordering};

use super::{Done, Round, Waiting, Writer};
use crate::log::{
    Error, Partition,
    keys::{self, GroupKey, ReplicaEntry, ReplicaEntryKind},
    topic::PartitionMeta,
};

/// Called once a replica append is on disk (or failed).
pub type Flushed = Box<dyn FnOnce(Result<(), Error>) + Send>;

/// Called once a replica append is in the journal, readable, before the round's fsync (not
/// called when the commit fails).
pub type Written = Box<dyn FnOnce() + Send>;

/// What one Raft log entry of a replica group holds, for the writer.
#[derive(Debug, Clone)]
pub enum ReplicaPayload {
    /// An encoded record batch ([`batch::encode`], or a batch as another replica stored
    /// it: it is sealed again here with this replica's offset and the entry's term).
    Records {
        /// The batch.
        batch: Vec<u8>,
        /// Records in it.
        records: u32,
        /// The idempotent producer's `(id, sequence)`, if any.
        producer: Option<(u64, u64)>,
    },
    /// A new leader's blank entry.
    Blank,
    /// A membership entry (openraft's membership as JSON).
    Membership(Vec<u8>),
    /// Consumer groups' cursors ([`ReplicaEntryKind::Cursors`]).
    Cursors(Vec<u8>),
    /// Retention's cut ([`ReplicaEntryKind::Trim`]).
    Trim(u64),
}

/// Entries of one replica group's log to store, in index order, following the group's
/// last stored entry without a gap.
pub struct ReplicaAppend {
    /// The local partition the group replicates.
    pub partition: Arc<Partition>,
    /// The `raft` keyspace.
    pub raft: fjall::Keyspace,
    /// The group.
    pub group: GroupKey,
    /// Whether the round must be fsynced before `done` (the topic's durability is `Fsync`).
    pub fsync: bool,
    /// `(index, term, payload)` per entry.
    pub entries: Vec<(u64, u64, ReplicaPayload)>,
    /// Told once the entries are written (in the journal and readable, before the
    /// round's fsync).
    pub written: Written,
    /// Told once the entries are on disk.
    pub done: Flushed,
}

impl ReplicaAppend {
    /// Bytes of record batches in it (for the round's byte limit).
    pub(super) fn bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|(_, _, p)| match p {
                ReplicaPayload::Records { batch, .. } => batch.len(),
                _ => 0,
            })
            .sum()
    }
}

/// What one apply round of a replica group's state machine changed (its applied point,
/// producers' states, consumer groups' cursors): written in the writer's next round, in
/// the same batch as that round's appends, in the order the rounds were sent. Not fsynced
/// by itself: the next fsync covers it, and after a crash the entries after the stored
/// applied point are applied again.
pub struct ReplicaState {
    /// The `raft` keyspace.
    pub raft: fjall::Keyspace,
    /// Keys removed (before the puts).
    pub removes: Vec<Vec<u8>>,
    /// Keys written, with their values.
    pub puts: Vec<(Vec<u8>, Vec<u8>)>,
    /// Told once the round that holds it is committed; `None` when nobody waits.
    pub done: Option<Flushed>,
}

impl Writer {
    /// Adds a replica group's state machine state to the round.
    pub(super) fn replica_state(round: &mut Round, state: ReplicaState) {
        let ReplicaState {
            raft,
            removes,
            puts,
            done,
        } = state;
        for key in removes {
            round.wb.remove(&raft, key);
        }
        for (key, value) in puts {
            round.wb.insert(&raft, key, value);
        }
        round.states = true;
        if let Some(done) = done {
            round.waiting.push(Waiting {
                parts: Vec::new(),
                acks: Vec::new(),
                reply: Done::Flushed(done),
                written: None,
            });
        }
    }

    /// Adds a replica group's entries to the round.
    pub(super) fn replica_append(&self, round: &mut Round, append: ReplicaAppend) {
        let ReplicaAppend {
            partition,
            raft,
            group,
            fsync,
            entries,
            written,
            done,
        } = append;
        if partition.is_deleted() {
            done(Err(Error::TopicNotFound(partition.topic.clone())));
            return;
        }
        let mut added = 0u64;
        let last_log = entries.last().map(|(index, term, _)| (*term, *index));
        for (index, term, payload) in entries {
            let base = partition.assigned_next.load(Ordering::Relaxed);
            let kind = match payload {
                ReplicaPayload::Records {
                    batch,
                    records,
                    producer,
                } => {
                    added += self.put_batch(round, &partition, batch, records, term);
                    ReplicaEntryKind::Records { records, producer }
                }
                ReplicaPayload::Blank => ReplicaEntryKind::Blank,
                ReplicaPayload::Membership(json) => ReplicaEntryKind::Membership(json),
                ReplicaPayload::Cursors(bytes) => ReplicaEntryKind::Cursors(bytes),
                ReplicaPayload::Trim(earliest) => ReplicaEntryKind::Trim(earliest),
            };
            let entry = ReplicaEntry {
                term,
                base_offset: base,
                kind,
            };
            round
                .wb
                .insert(&raft, keys::replica_entry_key(group, index), entry.encode());
        }
        partition.assigned_bytes.fetch_add(added, Ordering::Relaxed);
        if last_log.is_some() {
            // Recorded in the log end checkpoint once the round is committed.
            *partition.last_log.lock() = last_log;
        }
        round.fsync |= fsync;
        round.waiting.push(Waiting {
            parts: vec![(partition, added)],
            acks: Vec::new(),
            reply: Done::Flushed(done),
            written: Some(written),
        });
    }

    /// Deletes a replica group's entries from `from_index` on and the partition's batches
    /// after the entry before it, and moves the log end back to that entry's end
    /// (`start_offset` when no entry before `from_index` is stored). Only uncommitted entries
    /// are ever truncated (Raft), so nothing readable goes.
    pub(super) fn replica_truncate(
        &self,
        p: &Partition,
        raft: &fjall::Keyspace,
        group: GroupKey,
        from_index: u64,
        start_offset: u64,
    ) -> Result<(), Error> {
        let read_err = |source| Error::Read {
            topic: p.topic.clone(),
            partition: p.index,
            source,
        };
        let before = match from_index.checked_sub(1) {
            Some(i) => raft
                .get(keys::replica_entry_key(group, i))
                .map_err(read_err)?,
            None => None,
        };
        let before = match before {
            Some(bytes) => Some(ReplicaEntry::decode(&bytes).ok_or_else(|| Error::Replica {
                topic: p.topic.clone(),
                partition: p.index,
                message: format!("malformed replica log entry {}", from_index - 1),
            })?),
            None => None,
        };
        let end_offset = before
            .as_ref()
            .map_or(start_offset, ReplicaEntry::end_offset);
        let mut wb = self.shared.db.batch();
        for guard in raft.range(
            keys::replica_entry_key(group, from_index)..=keys::replica_entry_key(group, u64::MAX),
        ) {
            wb.remove(raft, guard.key().map_err(read_err)?);
        }
        let mut freed = 0u64;
        for guard in self
            .shared
            .records
            .range(p.key(end_offset)..=p.key(u64::MAX))
        {
            let (key, value) = guard.into_inner().map_err(read_err)?;
            freed += super::super::segment::stored_len(&value);
            wb.remove(&self.shared.records, key);
        }
        let bytes = p
            .assigned_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(freed);
        let meta = PartitionMeta {
            next_offset: end_offset,
            earliest_offset: p.earliest_offset().min(end_offset),
            bytes,
        };
        wb.insert(&self.shared.meta, p.meta_key(), meta.encode().to_vec());
        wb.commit().map_err(Error::Commit)?;
        self.unsynced.set(true);
        self.truncate_segments(p, end_offset);
        p.assigned_next.store(end_offset, Ordering::Relaxed);
        p.assigned_bytes.store(bytes, Ordering::Relaxed);
        p.bytes.fetch_sub(freed.min(p.bytes()), Ordering::Relaxed);
        // The checkpoint names the stored end; offsets past it were never committed. Its
        // last log id becomes the entry before; with none before (every entry purged) it
        // stays as it was, at least as high as the log's, which only makes a damaged
        // replica more careful with its votes.
        if let (Some(entry), Some(index)) = (&before, from_index.checked_sub(1)) {
            *p.last_log.lock() = Some((entry.term, index));
        }
        self.checkpoint
            .borrow_mut()
            .record([(p.prefix, p.checkpoint_end())]);
        Ok(())
    }
}
