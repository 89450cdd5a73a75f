//! The single writer: every change to the log goes through one dedicated thread that
//! group-commits it.
//!
//! The writer blocks for a command, then takes every command that queued up meanwhile (up to
//! the limits in [`LogOptions`]) — in practice, everything that arrived while the previous
//! fsync ran — assigns offsets, writes all of it as one atomic fjall batch and persists it
//! once with `PersistMode::SyncData`. Only then does it publish the new next offsets to
//! readers and acknowledge. fjall's write path may stall, so it never runs on the async
//! executor. A failed commit poisons fjall: the writer fails every waiting command, reports
//! the failure through [`Shared::failed`] and stops; the broker exits and recovers.

use std::sync::{Arc, atomic::Ordering};

use fjall::PersistMode;
use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};

use super::{
    Error, LogOptions, Shared, TOPIC_ID_KEY, Topic, TopicConfig, batch, now_ms, relaxed_add,
    topic::{Durability, Overflow, Partition, PartitionMeta, TopicMeta},
};

/// Appends of one group commit.
struct Round {
    wb: fjall::OwnedWriteBatch,
    pending: Vec<Pending>,
    /// Whether any append of the round asks for fsync.
    fsync: bool,
    /// Topics with `DropOldest` limits touched by the round.
    limited: Vec<Arc<Topic>>,
}

impl Round {
    fn new(shared: &Shared) -> Self {
        Self {
            wb: shared.db.batch(),
            pending: Vec::new(),
            fsync: false,
            limited: Vec::new(),
        }
    }
}

enum SequenceCheck {
    New,
    Duplicate(Vec<Appended>),
}

/// Kafka's idempotent-producer rule, per producer and topic: the next sequence is accepted,
/// a remembered one is a retry (answered with its original acks), anything else is refused.
fn check_sequence(
    topic: &str,
    idem: Idempotence,
    state: Option<&ProducerState>,
) -> Result<SequenceCheck, Error> {
    let seq = idem.sequence;
    let id = idem.producer_id;
    match state.and_then(|s| s.last) {
        None if seq == 0 => Ok(SequenceCheck::New),
        None => Err(Error::FailedPrecondition(format!(
            "producer {id} is new to topic {topic:?}: its first sequence must be 0, got {seq}"
        ))),
        Some(last) if seq == last + 1 => Ok(SequenceCheck::New),
        Some(last) if seq > last + 1 => Err(Error::FailedPrecondition(format!(
            "out-of-order sequence for producer {id} on topic {topic:?}: expected {}, got {seq} (requests {}..{seq} are missing)",
            last + 1,
            last + 1
        ))),
        Some(last) => {
            let known = state.and_then(|s| s.recent.iter().find(|(q, _)| *q == seq));
            match known {
                Some((_, acks)) => Ok(SequenceCheck::Duplicate(acks.clone())),
                None => Err(Error::FailedPrecondition(format!(
                    "sequence {seq} of producer {id} on topic {topic:?} is older than the last {PRODUCER_WINDOW} remembered (latest {last}); it cannot be answered"
                ))),
            }
        }
    }
}

/// `Reject`: refuses a request that would take the topic past `max_messages` or
/// `max_bytes`, counting what the current round already added.
fn check_room(topic: &Topic, config: &TopicConfig, batches: &[PartBatch]) -> Result<(), Error> {
    let parts = topic.partitions();
    let stored: u64 = parts
        .iter()
        .map(|p| {
            p.assigned_next
                .load(Ordering::Relaxed)
                .saturating_sub(p.earliest_offset())
        })
        .sum();
    let bytes: u64 = parts
        .iter()
        .map(|p| p.assigned_bytes.load(Ordering::Relaxed))
        .sum();
    let add: u64 = batches.iter().map(|b| u64::from(b.records)).sum();
    let add_bytes: u64 = batches.iter().map(|b| b.batch.len() as u64).sum();
    if config.max_messages != 0 && stored + add > config.max_messages {
        return Err(Error::LimitReached(format!(
            "topic {:?} is full: it holds {stored} messages and its limit max_messages is {}; this request of {add} was refused whole. Retry after consumers ack (work-queue topics) or messages expire",
            topic.name, config.max_messages
        )));
    }
    if config.max_bytes != 0 && bytes + add_bytes > config.max_bytes {
        return Err(Error::LimitReached(format!(
            "topic {:?} is full: it holds {bytes} bytes and its limit max_bytes is {}; this request of {add_bytes} bytes was refused whole. Retry after consumers ack (work-queue topics) or messages expire",
            topic.name, config.max_bytes
        )));
    }
    Ok(())
}

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// An encoded batch for one partition.
pub(crate) struct PartBatch {
    pub partition: Arc<Partition>,
    pub batch: Vec<u8>,
    pub records: u32,
}

/// Producer id and sequence of an idempotent request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Idempotence {
    pub producer_id: u64,
    pub sequence: u64,
}

/// Where one partition's batch of a request landed: (partition, base offset, records).
pub type Appended = (u32, u64, u32);

/// Requests per producer and topic whose acks are remembered to answer retries (Kafka
/// keeps 5 batches per partition; a request here may span partitions).
pub const PRODUCER_WINDOW: usize = 64;

/// Deduplication state of one producer on one topic, stored under
/// `q/<topic id><producer id>` in the same fjall batch as the records it describes.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct ProducerState {
    /// Highest sequence appended.
    pub last: Option<u64>,
    /// Acks of the last requests, oldest first.
    pub recent: std::collections::VecDeque<(u64, Vec<Appended>)>,
}

pub(crate) fn producer_key(topic_id: u32, producer_id: u64) -> Vec<u8> {
    let mut k = b"q/".to_vec();
    k.extend_from_slice(&topic_id.to_be_bytes());
    k.extend_from_slice(&producer_id.to_be_bytes());
    k
}

/// Work for the writer thread.
pub(crate) enum Command {
    /// One produce request: a batch per partition, committed atomically, checked against
    /// the topic's limits and (with a producer) deduplicated by sequence.
    Append {
        topic: Arc<Topic>,
        batches: Vec<PartBatch>,
        producer: Option<Idempotence>,
        reply: Reply<Vec<Appended>>,
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
        puts: Vec<(Vec<u8>, Vec<u8>)>,
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
    /// Fsync if anything was committed without fsync since the last one.
    Sync,
    Shutdown {
        reply: Reply<()>,
    },
}

pub(crate) fn spawn(
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Command>,
    options: LogOptions,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("weir-log-writer".into())
        .spawn(move || {
            Writer {
                shared,
                options,
                unsynced: std::cell::Cell::new(false),
                since_rotation: std::cell::Cell::new(0),
            }
            .run(rx);
        })
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
}

/// A request that is in the current fjall batch, waiting for the commit.
struct Pending {
    /// Partitions written and bytes added to each.
    parts: Vec<(Arc<Partition>, u64)>,
    acks: Vec<Appended>,
    reply: Reply<Vec<Appended>>,
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
                        if let Command::Append { batches, .. } = &cmd {
                            bytes += batches.iter().map(|b| b.batch.len()).sum::<usize>();
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
        let _ = self.shared.db.persist(PersistMode::SyncAll);
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
                } => self.append(&mut round, &topic, batches, producer, reply),
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
        reply: Reply<Vec<Appended>>,
    ) {
        if batches
            .iter()
            .any(|b| b.partition.deleted.load(Ordering::Acquire))
        {
            let _ = reply.send(Err(Error::TopicNotFound(topic.name.clone())));
            return;
        }
        let config = topic.config();
        let mut producers = self.shared.producers.lock();
        if let Some(idem) = producer {
            let state = producers.get(&(topic.id, idem.producer_id));
            match check_sequence(&topic.name, idem, state) {
                Ok(SequenceCheck::New) => {}
                Ok(SequenceCheck::Duplicate(acks)) => {
                    // Answered after this round's commit: the original may be in it.
                    round.pending.push(Pending {
                        parts: Vec::new(),
                        acks,
                        reply,
                    });
                    return;
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                    return;
                }
            }
        }
        if config.overflow == Overflow::Reject && config.has_size_limits() {
            if let Err(e) = check_room(topic, &config, &batches) {
                let _ = reply.send(Err(e));
                return;
            }
        }
        let mut acks = Vec::with_capacity(batches.len());
        let mut parts = Vec::with_capacity(batches.len());
        for PartBatch {
            partition,
            mut batch,
            records,
        } in batches
        {
            let base = partition.assigned_next.load(Ordering::Relaxed);
            batch::seal(&mut batch, base);
            let bytes = batch.len() as u64;
            round
                .wb
                .insert(&self.shared.records, partition.key(base), batch);
            partition
                .assigned_next
                .store(base + u64::from(records), Ordering::Relaxed);
            partition.assigned_bytes.fetch_add(bytes, Ordering::Relaxed);
            acks.push((partition.index, base, records));
            parts.push((partition, bytes));
        }
        if let Some(idem) = producer {
            let state = producers.entry((topic.id, idem.producer_id)).or_default();
            state.last = Some(idem.sequence);
            state.recent.push_back((idem.sequence, acks.clone()));
            while state.recent.len() > PRODUCER_WINDOW {
                state.recent.pop_front();
            }
            round.wb.insert(
                &self.shared.meta,
                producer_key(topic.id, idem.producer_id),
                serde_json::to_vec(state).unwrap_or_default(),
            );
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
        round.pending.push(Pending { parts, acks, reply });
    }

    fn commit(&self, round: Round) -> Result<(), Error> {
        let Round {
            mut wb,
            mut pending,
            fsync,
            limited,
        } = round;
        if pending.is_empty() {
            return Ok(());
        }
        // Counters of every touched partition go into the same atomic batch.
        let mut touched: Vec<(Arc<Partition>, u64)> = Vec::new();
        for p in &pending {
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
        // Buffered: flush fjall's journal buffer to the OS (survives a process crash), no fsync.
        let wb = wb.durability(Some(if fsync {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        }));
        // An fsync covers everything committed before it.
        self.unsynced.set(!fsync);
        let started = std::time::Instant::now();
        let committed = if touched.is_empty() {
            Ok(())
        } else {
            wb.commit()
        };
        relaxed_add(
            &self.shared.stats.commit_nanos,
            started.elapsed().as_nanos() as u64,
        );
        if let Err(e) = committed {
            for p in pending.drain(..) {
                let _ = p.reply.send(Err(Error::Commit(fjall::Error::Poisoned)));
            }
            return Err(Error::Commit(e));
        }
        let added: u64 = touched.iter().map(|(_, b)| *b).sum();
        self.rotate_if_full(added)?;
        for (p, added) in touched {
            relaxed_add(&p.bytes, added);
            let next = p.assigned_next.load(Ordering::Relaxed);
            p.next_offset.store(next, Ordering::Release);
            p.durable.send_replace(next);
            p.appended.send_modify(|n| *n = n.wrapping_add(1));
        }
        // DropOldest before the acks go out, so nobody sees a topic over its limit after
        // an ack.
        for topic in limited {
            self.drop_oldest(&topic)?;
        }
        let stats = &self.shared.stats;
        relaxed_add(&stats.commits, 1);
        for p in pending.drain(..) {
            relaxed_add(&stats.appends, p.parts.len() as u64);
            for (_, bytes) in &p.parts {
                relaxed_add(&stats.bytes, *bytes);
            }
            for (_, _, records) in &p.acks {
                relaxed_add(&stats.records, u64::from(*records));
            }
            let _ = p.reply.send(Ok(p.acks));
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
                let _ = self.shared.records.rotate_memtable();
                let _ = self.shared.meta.rotate_memtable();
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

    /// `DropOldest`: while the topic is over `max_messages` or `max_bytes`, moves the head of
    /// the partition holding the most records (the most bytes, for `max_bytes`) forward.
    /// Messages are dropped exactly (the earliest offset may fall inside a batch, as Kafka's
    /// log start offset can); whole batches below it are deleted.
    fn drop_oldest(&self, topic: &Topic) -> Result<(), Error> {
        let config = topic.config();
        let parts = topic.partitions();
        let count = |p: &Partition| {
            p.assigned_next
                .load(Ordering::Relaxed)
                .saturating_sub(p.earliest_offset())
        };
        let mut targets: Vec<u64> = parts.iter().map(|p| p.earliest_offset()).collect();
        if config.max_messages != 0 {
            let mut counts: Vec<u64> = parts.iter().map(|p| count(p)).collect();
            let mut excess = counts
                .iter()
                .sum::<u64>()
                .saturating_sub(config.max_messages);
            while excess > 0 {
                let (i, top) = counts
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, c)| **c)
                    .map_or((0, 0), |(i, c)| (i, *c));
                if top == 0 {
                    break;
                }
                let second = counts
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, c)| *c)
                    .max()
                    .unwrap_or(0);
                let d = excess.min((top - second).max(1));
                counts[i] -= d;
                targets[i] += d;
                excess -= d;
            }
        }
        for (i, p) in parts.iter().enumerate() {
            if targets[i] > p.earliest_offset() {
                self.truncate(p, targets[i])?;
            }
        }
        if config.max_bytes != 0 {
            loop {
                let total: u64 = parts.iter().map(|p| p.bytes()).sum();
                if total <= config.max_bytes {
                    break;
                }
                let Some(p) = parts.iter().max_by_key(|p| p.bytes()) else {
                    break;
                };
                if !self.drop_head_batch(p)? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Deletes the first whole batch of `p`; false when there is none to delete.
    fn drop_head_batch(&self, p: &Partition) -> Result<bool, Error> {
        let earliest = p.earliest_offset();
        let next = p.assigned_next.load(Ordering::Relaxed);
        let first = self
            .shared
            .records
            .range(p.key(p.head_base.load(Ordering::Relaxed))..p.key(next))
            .next()
            .map(fjall::Guard::into_inner);
        let Some(first) = first else {
            return Ok(false);
        };
        let (_, value) = first.map_err(|source| Error::Read {
            topic: p.topic.clone(),
            partition: p.index,
            source,
        })?;
        let end = batch::verify(&value).map_or(earliest + 1, |h| h.next_offset());
        let before = self.truncate(p, end.max(earliest + 1))?;
        Ok(before > earliest)
    }

    fn metadata(&self, cmd: Command) -> Result<Flow, Error> {
        match cmd {
            Command::Append { .. } => Ok(Flow::Continue),
            Command::CreateTopic {
                name,
                config,
                reply,
            } => {
                let result = self.create_topic(&name, config);
                finish(result, reply).map(|()| Flow::Continue)
            }
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
            } => {
                // Without fsync the batch still reaches the OS, so a process crash keeps it.
                let wb_mode = if durable {
                    PersistMode::SyncData
                } else {
                    PersistMode::Buffer
                };
                if !durable {
                    self.unsynced.set(true);
                }
                let mut wb = self.shared.db.batch().durability(Some(wb_mode));
                for (k, v) in puts {
                    wb.insert(&self.shared.meta, k, v);
                }
                for k in deletes {
                    wb.remove(&self.shared.meta, k);
                }
                finish(wb.commit().map_err(Error::Commit), reply).map(|()| Flow::Continue)
            }
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
            Command::Sync => {
                if self.unsynced.replace(false) {
                    self.shared
                        .db
                        .persist(PersistMode::SyncData)
                        .map_err(Error::Commit)?;
                }
                Ok(Flow::Continue)
            }
            Command::Shutdown { reply } => {
                let result = self
                    .shared
                    .db
                    .persist(PersistMode::SyncAll)
                    .map_err(Error::Commit);
                let _ = reply.send(result);
                Ok(Flow::Stop)
            }
        }
    }

    fn create_topic(&self, name: &str, config: TopicConfig) -> Result<(Arc<Topic>, bool), Error> {
        if let Some(existing) = self.shared.topics.read().get(name) {
            let current = existing.config();
            if current == config {
                return Ok((Arc::clone(existing), false));
            }
            return Err(Error::TopicExists {
                name: name.to_owned(),
                existing: Box::new(current),
            });
        }
        let id = self.shared.next_topic_id.load(Ordering::Relaxed);
        let stored = TopicMeta {
            id,
            name: name.to_owned(),
            config,
            created_at_ms: now_ms(),
        };
        let appended = Arc::new(tokio::sync::watch::Sender::new(0));
        let partitions: Vec<Arc<Partition>> = (0..config.partitions)
            .map(|i| {
                Arc::new(Partition::new(
                    name,
                    id,
                    i,
                    PartitionMeta::default(),
                    Arc::clone(&appended),
                ))
            })
            .collect();
        let mut wb = self
            .shared
            .db
            .batch()
            .durability(Some(PersistMode::SyncData));
        wb.insert(
            &self.shared.meta,
            TOPIC_ID_KEY,
            (id + 1).to_le_bytes().to_vec(),
        );
        wb.insert(&self.shared.meta, topic_key(name), to_json(&stored));
        for p in &partitions {
            wb.insert(
                &self.shared.meta,
                p.meta_key(),
                PartitionMeta::default().encode().to_vec(),
            );
        }
        wb.commit().map_err(Error::Commit)?;
        self.shared.next_topic_id.store(id + 1, Ordering::Relaxed);
        let topic = Arc::new(Topic {
            id,
            name: name.to_owned(),
            created_at_ms: stored.created_at_ms,
            config: RwLock::new(config),
            partitions: RwLock::new(partitions),
            next_unkeyed: 0.into(),
            appended,
        });
        self.shared
            .topics
            .write()
            .insert(name.to_owned(), Arc::clone(&topic));
        tracing::info!(
            topic = name,
            partitions = config.partitions,
            "topic created"
        );
        Ok((topic, true))
    }

    fn update_topic(&self, name: &str, config: TopicConfig) -> Result<Arc<Topic>, Error> {
        let topic = self
            .shared
            .topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::TopicNotFound(name.to_owned()))?;
        let current = topic.config();
        if config.partitions < current.partitions {
            return Err(Error::InvalidArgument(format!(
                "topic {name:?} has {} partitions; partitions can only grow, not shrink to {}",
                current.partitions, config.partitions
            )));
        }
        let added: Vec<Arc<Partition>> = (current.partitions..config.partitions)
            .map(|i| {
                Arc::new(Partition::new(
                    name,
                    topic.id,
                    i,
                    PartitionMeta::default(),
                    Arc::clone(&topic.appended),
                ))
            })
            .collect();
        let stored = TopicMeta {
            id: topic.id,
            name: name.to_owned(),
            config,
            created_at_ms: topic.created_at_ms,
        };
        let mut wb = self
            .shared
            .db
            .batch()
            .durability(Some(PersistMode::SyncData));
        wb.insert(&self.shared.meta, topic_key(name), to_json(&stored));
        for p in &added {
            wb.insert(
                &self.shared.meta,
                p.meta_key(),
                PartitionMeta::default().encode().to_vec(),
            );
        }
        wb.commit().map_err(Error::Commit)?;
        topic.partitions.write().extend(added);
        *topic.config.write() = config;
        tracing::info!(
            topic = name,
            partitions = config.partitions,
            max_message_bytes = config.max_message_bytes,
            "topic updated"
        );
        Ok(topic)
    }

    /// `maxAge`: moves the earliest offset of `p` past every head batch whose newest record
    /// is older than `cutoff_ms`; returns the new earliest offset.
    fn expire(&self, p: &Partition, cutoff_ms: i64) -> Result<u64, Error> {
        let earliest = p.earliest_offset();
        let next = p.assigned_next.load(Ordering::Relaxed);
        let mut end = earliest;
        let head = p.head_base.load(Ordering::Relaxed);
        for guard in self.shared.records.range(p.key(head)..p.key(next)) {
            let (_, value) = guard.into_inner().map_err(|source| Error::Read {
                topic: p.topic.clone(),
                partition: p.index,
                source,
            })?;
            match batch::verify(&value) {
                Ok(h) if h.max_timestamp_ms < cutoff_ms => end = end.max(h.next_offset()),
                _ => break,
            }
        }
        if end <= earliest {
            return Ok(earliest);
        }
        tracing::debug!(topic = %p.topic, partition = p.index, from = earliest, to = end, "expired by max age");
        self.truncate(p, end)
    }

    /// Moves the earliest offset of `p` to `before` (at most its next offset) and deletes the
    /// batches that lie wholly below it (one tombstone each); returns the new earliest offset.
    fn truncate(&self, p: &Partition, before: u64) -> Result<u64, Error> {
        let earliest = p.earliest_offset();
        let next = p.assigned_next.load(Ordering::Relaxed);
        let before = before.min(next);
        if before <= earliest || p.deleted.load(Ordering::Acquire) {
            return Ok(earliest);
        }
        let read_err = |source| Error::Read {
            topic: p.topic.clone(),
            partition: p.index,
            source,
        };
        let mut wb = self.shared.db.batch();
        let mut freed = 0u64;
        let mut head = p.head_base.load(Ordering::Relaxed);
        for guard in self.shared.records.range(p.key(head)..p.key(before)) {
            let (key, value) = guard.into_inner().map_err(read_err)?;
            // A damaged batch is deleted once the next batch starts at or below `before`.
            let end = batch::verify(&value).map_or(before, |h| h.next_offset());
            if end > before {
                break;
            }
            wb.remove(&self.shared.records, key);
            freed += value.len() as u64;
            head = end;
        }
        let bytes = p
            .assigned_bytes
            .load(Ordering::Relaxed)
            .saturating_sub(freed);
        let meta = PartitionMeta {
            next_offset: next,
            earliest_offset: before,
            bytes,
        };
        wb.insert(&self.shared.meta, p.meta_key(), meta.encode().to_vec());
        wb.commit().map_err(Error::Commit)?;
        self.unsynced.set(true);
        p.earliest_offset.store(before, Ordering::Release);
        p.head_base.store(head, Ordering::Relaxed);
        p.assigned_bytes.store(bytes, Ordering::Relaxed);
        p.bytes.fetch_sub(freed.min(p.bytes()), Ordering::Relaxed);
        Ok(before)
    }

    fn delete_topic(&self, name: &str) -> Result<(), Error> {
        let topic = self
            .shared
            .topics
            .write()
            .remove(name)
            .ok_or_else(|| Error::TopicNotFound(name.to_owned()))?;
        let partitions = topic.partitions();
        for p in &partitions {
            p.deleted.store(true, Ordering::Release);
        }
        // One tombstone per batch, committed in chunks so a huge topic does not build one
        // huge fjall batch; the metadata goes last, so a crash midway leaves a topic that
        // still exists and can be deleted again.
        for p in &partitions {
            let mut wb = self.shared.db.batch();
            for guard in self.shared.records.prefix(p.prefix) {
                let key = guard.key().map_err(|source| Error::Read {
                    topic: name.to_owned(),
                    partition: p.index,
                    source,
                })?;
                wb.remove(&self.shared.records, key);
                if wb.len() >= DELETE_CHUNK {
                    let full = std::mem::replace(&mut wb, self.shared.db.batch());
                    full.commit().map_err(Error::Commit)?;
                }
            }
            wb.commit().map_err(Error::Commit)?;
        }
        let mut wb = self
            .shared
            .db
            .batch()
            .durability(Some(PersistMode::SyncData));
        let producers: Vec<u64> = {
            let mut map = self.shared.producers.lock();
            let ids: Vec<u64> = map
                .keys()
                .filter(|(t, _)| *t == topic.id)
                .map(|(_, p)| *p)
                .collect();
            for id in &ids {
                map.remove(&(topic.id, *id));
            }
            ids
        };
        for id in producers {
            wb.remove(&self.shared.meta, producer_key(topic.id, id));
        }
        wb.remove(&self.shared.meta, topic_key(name));
        for p in &partitions {
            wb.remove(&self.shared.meta, p.meta_key());
        }
        wb.commit().map_err(Error::Commit)?;
        tracing::info!(topic = name, "topic deleted");
        Ok(())
    }
}

/// Tombstones per fjall batch when deleting a topic.
const DELETE_CHUNK: usize = 10_000;

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

fn topic_key(name: &str) -> Vec<u8> {
    let mut k = b"t/".to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn to_json(meta: &TopicMeta) -> Vec<u8> {
    serde_json::to_vec(meta).unwrap_or_default()
}
