//! The single writer: every change to the log goes through one dedicated thread that
//! group-commits it.
//!
//! The writer blocks for a command, then takes every command that queued up meanwhile (up to
//! the limits in [`LogOptions`]) — in practice, everything that arrived while the previous
//! fsync ran — assigns offsets, writes all of it as one atomic fjall batch and persists it
//! once with `PersistMode::SyncData`. Only then does it publish the new next offsets to
//! readers and acknowledge. fjall's write path may stall, so it never runs on the async
//! executor. A failed commit poisons fjall: the writer fails every waiting command, reports
//! the failure through [`Shared::failed`] and stops; the broker exits and recovers. A
//! panic of the writer thread is reported the same way (fjall's `PoisonDart` idea), so the
//! broker never lives on with a dead writer.
//!
//! The parts: this file runs rounds and group commits appends; [`retention`] applies
//! limits and deletions; [`admin`] changes topics and other metadata.

mod admin;
mod replica;
mod retention;
mod segments;

pub use self::replica::{Flushed, ReplicaAppend, ReplicaPayload, ReplicaState, Written};

use std::sync::{Arc, atomic::Ordering};

use fjall::PersistMode;
use tokio::sync::{mpsc, oneshot};

use super::{
    Ack, Error, Failpoint, LogOptions, MetaEntries, RecordStore, Shared, Topic, TopicConfig, batch,
    checkpoint::EndCheckpoint,
    idempotence::{Idempotence, ProducerKey, ProducerState, SequenceCheck},
    keys, relaxed_add,
    segment::{self, Pointer, SegmentWriter},
    topic::{Durability, Overflow, Partition},
};

/// Appends of one group commit.
struct Round {
    wb: fjall::OwnedWriteBatch,
    waiting: Vec<Waiting>,
    /// Whether any append of the round asks for fsync.
    fsync: bool,
    /// Topics with `DropOldest` limits touched by the round.
    limited: Vec<Arc<Topic>>,
    /// Replica state machines' state is in the batch ([`ReplicaState`]): it is committed
    /// even when no partition was written.
    states: bool,
    /// Partitions (key prefixes) whose segments got frames in this round.
    segments: Vec<[u8; 8]>,
    /// Segments closed in this round because they were full, with the frames this round
    /// appended to them before: written and synced with the round.
    retired: Vec<SegmentWriter>,
}

impl Round {
    fn new(shared: &Shared) -> Self {
        Self {
            wb: shared.db.batch(),
            waiting: Vec::new(),
            fsync: false,
            limited: Vec::new(),
            states: false,
            segments: Vec::new(),
            retired: Vec::new(),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// An encoded batch for one partition ([`batch::encode`]); the writer seals it with its
/// base offset.
pub struct PartBatch {
    /// The partition it goes to.
    pub partition: Arc<Partition>,
    /// The encoded batch.
    pub batch: Vec<u8>,
    /// Records in it.
    pub records: u32,
}

/// Work for the writer thread.
pub(crate) enum Command {
    /// One produce request: a batch per partition, committed atomically, checked against
    /// the topic's limits and (with a producer) deduplicated by sequence.
    Append {
        topic: Arc<Topic>,
        batches: Vec<PartBatch>,
        producer: Option<Idempotence>,
        reply: Reply<Vec<Ack>>,
    },
    CreateTopic {
        name: String,
        config: TopicConfig,
        reply: Reply<(Arc<Topic>, bool)>,
    },
    UpdateTopic {
        name: String,
        config: TopicConfig,
        reply: Reply<Arc<Topic>>,
    },
    DeleteTopic {
        name: String,
        reply: Reply<()>,
    },
    /// Puts and deletes in the metadata keyspace, atomically (group state).
    WriteMeta {
        puts: MetaEntries,
        deletes: Vec<Vec<u8>>,
        durable: bool,
        reply: Reply<()>,
    },
    /// Deletes whole batches of a partition that end at or before `before`.
    Truncate {
        partition: Arc<Partition>,
        before: u64,
        reply: Reply<u64>,
    },
    /// Deletes head batches of a partition whose newest record is older than `cutoff_ms`.
    Expire {
        partition: Arc<Partition>,
        cutoff_ms: i64,
        reply: Reply<u64>,
    },
    /// Deletes damaged batches of a partition and records lost ranges as accepted
    /// (`weir topic repair`), durably.
    AcceptLoss {
        partition: Arc<Partition>,
        /// `(from, to)` offset ranges.
        ranges: Vec<(u64, u64)>,
        damaged_keys: Vec<Vec<u8>>,
        reply: Reply<()>,
    },
    /// Entries of a partition replica group's Raft log, group-committed with appends;
    /// `done` is called once they are on disk (fsynced when `fsync`).
    ReplicaAppend(ReplicaAppend),
    /// A replica group's state machine state, written with the round's appends.
    ReplicaState(ReplicaState),
    /// Deletes a replica group's log entries from `from_index` on and the records after
    /// the entry before it (Raft's truncation of a divergent tail); `start_offset` is the
    /// log end when no entry before `from_index` is stored.
    ReplicaTruncate {
        partition: Arc<Partition>,
        raft: fjall::Keyspace,
        group: keys::GroupKey,
        from_index: u64,
        start_offset: u64,
        reply: Reply<()>,
    },
    /// Fsync if anything was committed without fsync since the last one.
    Sync {
        reply: Reply<()>,
    },
    Shutdown {
        reply: Reply<()>,
    },
}

pub(crate) fn spawn(
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Command>,
    options: LogOptions,
    checkpoint: EndCheckpoint,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("weir-log-writer".into())
        .spawn(move || {
            let _watch = DeathWatch(Arc::clone(&shared));
            Writer {
                shared,
                unsynced: std::cell::Cell::new(false),
                since_rotation: std::cell::Cell::new(options.memtable_offset_bytes),
                options,
                checkpoint: std::cell::RefCell::new(checkpoint),
                segment_writers: std::cell::RefCell::new(std::collections::HashMap::new()),
            }
            .run(rx);
        })
}

/// Reports a panic of the writer thread through [`Shared::failed`] when the thread unwinds
/// (fjall's `PoisonDart`): the broker turns unready and exits instead of answering
/// UNAVAILABLE forever.
struct DeathWatch(Arc<Shared>);

impl Drop for DeathWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let reason = "the log writer thread panicked".to_owned();
            tracing::error!(reason, "the broker must restart");
            self.0.failed.send_replace(Some(reason));
        }
    }
}

/// Longest the writer waits for flushes before one round (see `Writer::wait_for_flushes`).
const MAX_STALL: std::time::Duration = std::time::Duration::from_secs(10);

struct Writer {
    shared: Arc<Shared>,
    options: LogOptions,
    /// Something was committed without fsync since the last fsync.
    unsynced: std::cell::Cell<bool>,
    /// Record bytes committed since the records keyspace's memtable was last rotated here.
    since_rotation: std::cell::Cell<u64>,
    /// Each partition's committed end, recorded after a commit and before its acks.
    checkpoint: std::cell::RefCell<EndCheckpoint>,
    /// The segment each partition appends to (segment store), by key prefix; opened at the
    /// partition's first append after start-up.
    segment_writers: std::cell::RefCell<std::collections::HashMap<[u8; 8], SegmentWriter>>,
}

/// A request that is in the current fjall batch, waiting for the commit.
struct Waiting {
    /// Partitions written and bytes added to each.
    parts: Vec<(Arc<Partition>, u64)>,
    acks: Vec<Ack>,
    reply: Done,
    /// Told once the round's batch is in the journal, before its fsync (replica appends).
    written: Option<replica::Written>,
}

impl Waiting {
    /// A produce request waiting to be answered with `acks`.
    fn answer(parts: Vec<(Arc<Partition>, u64)>, acks: Vec<Ack>, reply: Reply<Vec<Ack>>) -> Self {
        Self {
            parts,
            acks,
            reply: Done::Acks(reply),
            written: None,
        }
    }
}

/// Whom a commit answers.
enum Done {
    /// A produce request, with its acks.
    Acks(Reply<Vec<Ack>>),
    /// A replica group's log store, told that its entries are on disk.
    Flushed(replica::Flushed),
}

impl Done {
    fn send(self, result: Result<Vec<Ack>, Error>) {
        match self {
            Done::Acks(reply) => {
                let _ = reply.send(result);
            }
            Done::Flushed(done) => done(result.map(|_| ())),
        }
    }
}

impl Writer {
    fn run(self, mut rx: mpsc::Receiver<Command>) {
        let mut queue = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            queue.push(first);
            let mut bytes = 0usize;
            while queue.len() < self.options.max_commit_commands
                && bytes < self.options.max_commit_bytes
            {
                match rx.try_recv() {
                    Ok(cmd) => {
                        match &cmd {
                            Command::Append { batches, .. } => {
                                bytes += batches.iter().map(|b| b.batch.len()).sum::<usize>();
                            }
                            Command::ReplicaAppend(r) => bytes += r.bytes(),
                            _ => {}
                        }
                        queue.push(cmd);
                    }
                    Err(_) => break,
                }
            }
            self.wait_for_flushes();
            match self.round(&mut queue) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => return,
                Err(e) => {
                    let reason = e.to_string();
                    tracing::error!(error = %reason, "commit failed; fjall is poisoned, the broker must restart");
                    self.shared.failed.send_replace(Some(reason));
                    rx.close();
                    return;
                }
            }
        }
        // Every sender is gone: persist what is buffered and stop.
        if let Err(e) = self.sync_all_segments() {
            tracing::error!(error = %e, "syncing segments after the last command failed");
        }
        if let Err(e) = self.shared.db.persist(PersistMode::SyncAll) {
            tracing::error!(error = %e, "persisting the log after the last command failed");
        }
    }

    /// Runs the commands of one round: appends are group-committed together; metadata
    /// commands commit on their own, in queue order, so their effect is ordered with appends.
    fn round(&self, queue: &mut Vec<Command>) -> Result<Flow, Error> {
        let mut round = Round::new(&self.shared);
        for cmd in queue.drain(..) {
            match cmd {
                Command::Append {
                    topic,
                    batches,
                    producer,
                    reply,
                } => {
                    assert!(
                        self.options.failpoint != Some(Failpoint::WriterPanic),
                        "failpoint writer-panic: the log writer panics on its first append"
                    );
                    self.append(&mut round, &topic, batches, producer, reply);
                }
                Command::ReplicaAppend(append) => self.replica_append(&mut round, append),
                Command::ReplicaState(state) => Self::replica_state(&mut round, state),
                other => {
                    // Commit what is batched so far, then the metadata command alone.
                    let full = std::mem::replace(&mut round, Round::new(&self.shared));
                    self.commit(full)?;
                    if let Flow::Stop = self.metadata(other)? {
                        return Ok(Flow::Stop);
                    }
                }
            }
        }
        self.commit(round)?;
        Ok(Flow::Continue)
    }

    /// Adds one produce request to the round, or answers it at once when it is refused.
    fn append(
        &self,
        round: &mut Round,
        topic: &Arc<Topic>,
        batches: Vec<PartBatch>,
        producer: Option<Idempotence>,
        reply: Reply<Vec<Ack>>,
    ) {
        if batches
            .iter()
            .any(|b| b.partition.deleted.load(Ordering::Acquire))
        {
            let _ = reply.send(Err(Error::TopicNotFound(topic.name.clone())));
            return;
        }
        if let Err(e) = self.shared.disk.check() {
            let _ = reply.send(Err(e));
            return;
        }
        let config = topic.config();
        let mut producers = self.shared.producers.lock();
        let producer = match producer.map(|idem| producer_key(topic, &batches, idem)) {
            None => None,
            Some(Ok(found)) => Some(found),
            Some(Err(e)) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        if let Some((idem, key)) = producer {
            let state = producers.get(&key);
            match ProducerState::check(state, &topic.name, key.1, idem) {
                Ok(SequenceCheck::New) => {}
                Ok(SequenceCheck::Duplicate(acks)) => {
                    // Answered after this round's commit: the original may be in it.
                    round.waiting.push(Waiting::answer(Vec::new(), acks, reply));
                    return;
                }
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                    return;
                }
            }
        }
        if config.overflow == Overflow::Reject
            && config.has_size_limits()
            && let Err(e) = retention::check_room(topic, &config, &batches)
        {
            let _ = reply.send(Err(e));
            return;
        }
        // Offsets first, without changing anything: the producer state that names them must
        // encode before the request takes effect.
        let acks: Vec<Ack> = batches
            .iter()
            .map(|b| Ack {
                partition: b.partition.index,
                base_offset: b.partition.assigned_next.load(Ordering::Relaxed),
                record_count: b.records,
            })
            .collect();
        // The state the request leaves, encoded before anything changes.
        let producer_entry = producer.map(|(idem, key)| {
            let stored = ProducerState::encode_recorded(producers.get(&key), idem.sequence, &acks);
            (idem, key, stored)
        });
        let mut parts = Vec::with_capacity(batches.len());
        for PartBatch {
            partition,
            batch,
            records,
        } in batches
        {
            let bytes = self.put_batch(round, &partition, batch, records, 0);
            partition.assigned_bytes.fetch_add(bytes, Ordering::Relaxed);
            parts.push((partition, bytes));
        }
        if let Some((idem, key, stored)) = producer_entry {
            round.wb.insert(
                &self.shared.meta,
                keys::producer_key(keys::partition_prefix(key.0, key.1), key.2),
                stored,
            );
            producers
                .entry(key)
                .or_default()
                .record(idem.sequence, acks.clone());
        }
        if config.durability == Durability::Fsync {
            round.fsync = true;
        }
        if config.overflow == Overflow::DropOldest
            && config.has_size_limits()
            && !round.limited.iter().any(|t| Arc::ptr_eq(t, topic))
        {
            round.limited.push(Arc::clone(topic));
        }
        round.waiting.push(Waiting::answer(parts, acks, reply));
    }

    /// Seals `batch` (`records` records) at `partition`'s next offset with `leader_epoch`,
    /// adds it to the round and moves the next offset past it; returns its size in bytes.
    fn put_batch(
        &self,
        round: &mut Round,
        partition: &Partition,
        mut batch: Vec<u8>,
        records: u32,
        leader_epoch: u64,
    ) -> u64 {
        let base = partition.assigned_next.load(Ordering::Relaxed);
        batch::seal_with_epoch(&mut batch, base, leader_epoch);
        let bytes = batch.len() as u64;
        let value = self.stored_value(round, partition, base, batch);
        round
            .wb
            .insert(&self.shared.records, partition.key(base), value);
        partition
            .assigned_next
            .store(base + u64::from(records), Ordering::Relaxed);
        bytes
    }

    fn commit(&self, round: Round) -> Result<(), Error> {
        let Round {
            mut wb,
            mut waiting,
            fsync,
            limited,
            states,
            segments,
            retired,
        } = round;
        if waiting.is_empty() && !states {
            return Ok(());
        }
        if self.options.failpoint == Some(Failpoint::SlowCommit) {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // Counters of every touched partition go into the same atomic batch.
        let mut touched: Vec<(Arc<Partition>, u64)> = Vec::new();
        for p in &waiting {
            for (part, bytes) in &p.parts {
                match touched.iter_mut().find(|(t, _)| Arc::ptr_eq(t, part)) {
                    Some((_, b)) => *b += bytes,
                    None => touched.push((Arc::clone(part), *bytes)),
                }
            }
        }
        for (p, _) in &touched {
            wb.insert(&self.shared.meta, p.meta_key(), p.meta().encode().to_vec());
        }
        // The batch goes to the journal and the OS first (it survives a process crash),
        // then, for a durable round, the journal is fsynced. In between, the round's
        // replica appends are told they are written: readable and before anything later
        // in the journal, so their state machines may apply them (Raft commits an entry
        // once a majority has it on disk, which may not include this replica); that they
        // are on this replica's disk is told after the fsync.
        let wb = wb.durability(Some(PersistMode::Buffer));
        // An fsync covers everything committed before it.
        self.unsynced.set(!fsync);
        let started = std::time::Instant::now();
        // Frames are on disk (fsynced with the round) before the pointers naming them are
        // committed, so a committed pointer never names a lost frame.
        self.write_segments(&segments, retired, fsync)?;
        let batch = !touched.is_empty() || states;
        let mut committed = if batch { wb.commit() } else { Ok(()) };
        if committed.is_ok() {
            for written in waiting.iter_mut().filter_map(|w| w.written.take()) {
                written();
            }
            if fsync && batch {
                committed = self.shared.db.persist(PersistMode::SyncData);
            }
        }
        relaxed_add(
            &self.shared.stats.commit_nanos,
            started.elapsed().as_nanos() as u64,
        );
        if let Err(e) = committed {
            for p in waiting.drain(..) {
                p.reply.send(Err(Error::Commit(fjall::Error::Poisoned)));
            }
            return Err(Error::Commit(e));
        }
        let added: u64 = touched.iter().map(|(_, b)| *b).sum();
        self.rotate_if_full(added)?;
        // The new ends outside the journal before any ack: a journal tail lost later can
        // then never give these offsets out again (see `checkpoint`).
        self.checkpoint
            .borrow_mut()
            .record(touched.iter().map(|(p, _)| (p.prefix, p.checkpoint_end())));
        for (p, added) in touched {
            relaxed_add(&p.bytes, added);
            if !p.is_replicated() {
                // A replica's records become readable when they commit (its state machine,
                // which waits for them to be stored).
                p.publish(p.assigned_next.load(Ordering::Relaxed));
            }
        }
        // DropOldest before the acks go out, so nobody sees a topic over its limit after
        // an ack.
        for topic in limited {
            self.drop_oldest(&topic)?;
        }
        let stats = &self.shared.stats;
        relaxed_add(&stats.commits, 1);
        for p in waiting.drain(..) {
            relaxed_add(&stats.appends, p.parts.len() as u64);
            for (_, bytes) in &p.parts {
                relaxed_add(&stats.bytes, *bytes);
            }
            for ack in &p.acks {
                relaxed_add(&stats.records, u64::from(ack.record_count));
            }
            p.reply.send(Ok(p.acks));
        }
        Ok(())
    }

    /// Waits while memtables hold `max_write_buffer_bytes` or more, polling every
    /// millisecond; the time goes to `stall_nanos`. When nothing is being flushed (a budget
    /// below the memtable size) the active memtables are sealed so that the budget can
    /// drain. After [`MAX_STALL`] the round goes ahead anyway, with a warning: a storage
    /// engine that cannot flush must not hang every producer.
    fn wait_for_flushes(&self) {
        let limit = self.options.max_write_buffer_bytes;
        if limit == 0 || self.shared.db.write_buffer_size() < limit {
            return;
        }
        let started = std::time::Instant::now();
        while self.shared.db.write_buffer_size() >= limit {
            if started.elapsed() >= MAX_STALL {
                tracing::warn!(
                    held = self.shared.db.write_buffer_size(),
                    limit,
                    "memtables stayed over --max-write-buffer-size; committing anyway"
                );
                break;
            }
            if self.shared.records.sealed_memtable_count() == 0
                && self.shared.meta.sealed_memtable_count() == 0
            {
                for keyspace in [&self.shared.records, &self.shared.meta] {
                    if let Err(e) = keyspace.rotate_memtable() {
                        tracing::warn!(error = %e, "sealing a memtable during a write stall failed");
                    }
                }
                self.since_rotation.set(0);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        relaxed_add(
            &self.shared.stats.stall_nanos,
            started.elapsed().as_nanos() as u64,
        );
    }

    /// Seals the records memtable once `memtable_bytes` were committed into it. fjall
    /// asks its worker threads to do this, and while they are busy flushing or compacting
    /// the active memtable kept growing (to 418 MB with a 32 MiB setting under
    /// `weir bench produce`), together with the journal a restart replays. Sealed here, the
    /// memtable goes to the flush queue at once and fjall's own write halt (at 4 sealed
    /// memtables) bounds the memory.
    fn rotate_if_full(&self, added: u64) -> Result<(), Error> {
        let total = self.since_rotation.get() + added;
        if total < self.options.memtable_bytes.max(1024 * 1024) {
            self.since_rotation.set(total);
            return Ok(());
        }
        self.since_rotation.set(0);
        self.shared
            .records
            .rotate_memtable()
            .map(|_| ())
            .map_err(Error::Commit)
    }

    fn metadata(&self, cmd: Command) -> Result<Flow, Error> {
        match cmd {
            Command::Append { .. } | Command::ReplicaAppend(_) | Command::ReplicaState(_) => {
                Ok(Flow::Continue)
            }
            Command::ReplicaTruncate {
                partition,
                raft,
                group,
                from_index,
                start_offset,
                reply,
            } => finish(
                self.replica_truncate(&partition, &raft, group, from_index, start_offset),
                reply,
            )
            .map(|()| Flow::Continue),
            Command::CreateTopic {
                name,
                config,
                reply,
            } => finish(self.create_topic(&name, config), reply).map(|()| Flow::Continue),
            Command::UpdateTopic {
                name,
                config,
                reply,
            } => finish(self.update_topic(&name, config), reply).map(|()| Flow::Continue),
            Command::DeleteTopic { name, reply } => {
                finish(self.delete_topic(&name), reply).map(|()| Flow::Continue)
            }
            Command::WriteMeta {
                puts,
                deletes,
                durable,
                reply,
            } => finish(self.write_meta(puts, deletes, durable), reply).map(|()| Flow::Continue),
            Command::Truncate {
                partition,
                before,
                reply,
            } => finish(self.truncate(&partition, before), reply).map(|()| Flow::Continue),
            Command::Expire {
                partition,
                cutoff_ms,
                reply,
            } => finish(self.expire(&partition, cutoff_ms), reply).map(|()| Flow::Continue),
            Command::AcceptLoss {
                partition,
                ranges,
                damaged_keys,
                reply,
            } => finish(self.accept_loss(&partition, &ranges, damaged_keys), reply)
                .map(|()| Flow::Continue),
            Command::Sync { reply } => {
                let result = if self.unsynced.replace(false) {
                    self.sync_all_segments().and_then(|()| {
                        self.shared
                            .db
                            .persist(PersistMode::SyncData)
                            .map_err(Error::Commit)
                    })
                } else {
                    Ok(())
                };
                finish(result, reply).map(|()| Flow::Continue)
            }
            Command::Shutdown { reply } => {
                let result = self.sync_all_segments().and_then(|()| {
                    self.shared
                        .db
                        .persist(PersistMode::SyncAll)
                        .map_err(Error::Commit)
                });
                let _ = reply.send(result);
                Ok(Flow::Stop)
            }
        }
    }
}

/// Whose sequence an idempotent request to `batches` of `topic` follows: the one partition
/// it lands on (`produce::submit` checks it before; checked again here, where the state is).
fn producer_key(
    topic: &Topic,
    batches: &[PartBatch],
    idem: Idempotence,
) -> Result<(Idempotence, ProducerKey), Error> {
    match batches {
        [only] => Ok((idem, (topic.id, only.partition.index, idem.producer_id))),
        _ => Err(Error::IdempotentSpansPartitions {
            topic: topic.name.clone(),
            partitions: batches.iter().map(|b| b.partition.index).collect(),
        }),
    }
}

enum Flow {
    Continue,
    Stop,
}

/// Sends a metadata command's result; a commit failure is also returned to stop the writer.
fn finish<T>(result: Result<T, Error>, reply: Reply<T>) -> Result<(), Error> {
    match result {
        Err(Error::Commit(e)) => {
            let _ = reply.send(Err(Error::Commit(fjall::Error::Poisoned)));
            Err(Error::Commit(e))
        }
        other => {
            let _ = reply.send(other);
            Ok(())
        }
    }
}
