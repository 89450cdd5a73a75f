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
    topic::{Partition, PartitionMeta, TopicMeta},
};

type Reply<T> = oneshot::Sender<Result<T, Error>>;

/// Work for the writer thread.
pub(crate) enum Command {
    Append {
        partition: Arc<Partition>,
        batch: Vec<u8>,
        record_count: u32,
        reply: Reply<u64>,
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
        .spawn(move || Writer { shared, options }.run(rx))
}

struct Writer {
    shared: Arc<Shared>,
    options: LogOptions,
}

/// An append that is in the current fjall batch, waiting for the commit.
struct Pending {
    partition: Arc<Partition>,
    base: u64,
    records: u32,
    bytes: u64,
    reply: Reply<u64>,
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
                        if let Command::Append { batch, .. } = &cmd {
                            bytes += batch.len();
                        }
                        queue.push(cmd);
                    }
                    Err(_) => break,
                }
            }
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
        let mut pending: Vec<Pending> = Vec::new();
        let mut wb = self
            .shared
            .db
            .batch()
            .durability(Some(PersistMode::SyncData));
        for cmd in queue.drain(..) {
            match cmd {
                Command::Append {
                    partition,
                    mut batch,
                    record_count,
                    reply,
                } => {
                    if partition.deleted.load(Ordering::Acquire) {
                        let _ = reply.send(Err(Error::TopicNotFound(partition.topic.clone())));
                        continue;
                    }
                    let base = partition.assigned_next.load(Ordering::Relaxed);
                    batch::seal(&mut batch, base);
                    let bytes = batch.len() as u64;
                    wb.insert(&self.shared.records, partition.key(base), batch);
                    partition
                        .assigned_next
                        .store(base + u64::from(record_count), Ordering::Relaxed);
                    pending.push(Pending {
                        partition,
                        base,
                        records: record_count,
                        bytes,
                        reply,
                    });
                }
                other => {
                    // Commit what is batched so far, then the metadata command alone.
                    let full = std::mem::replace(
                        &mut wb,
                        self.shared
                            .db
                            .batch()
                            .durability(Some(PersistMode::SyncData)),
                    );
                    self.commit_appends(full, &mut pending)?;
                    if let Flow::Stop = self.metadata(other)? {
                        return Ok(Flow::Stop);
                    }
                }
            }
        }
        self.commit_appends(wb, &mut pending)?;
        Ok(Flow::Continue)
    }

    fn commit_appends(
        &self,
        mut wb: fjall::OwnedWriteBatch,
        pending: &mut Vec<Pending>,
    ) -> Result<(), Error> {
        if pending.is_empty() {
            return Ok(());
        }
        // Counters of every touched partition go into the same atomic batch.
        let mut touched: Vec<(Arc<Partition>, u64)> = Vec::new();
        for p in pending.iter() {
            match touched
                .iter_mut()
                .find(|(t, _)| Arc::ptr_eq(t, &p.partition))
            {
                Some((_, b)) => *b += p.bytes,
                None => touched.push((Arc::clone(&p.partition), p.bytes)),
            }
        }
        for (p, added) in &touched {
            let mut meta = p.meta();
            meta.bytes += added;
            wb.insert(&self.shared.meta, p.meta_key(), meta.encode().to_vec());
        }
        let started = std::time::Instant::now();
        let committed = wb.commit();
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
        for (p, added) in touched {
            relaxed_add(&p.bytes, added);
            let next = p.assigned_next.load(Ordering::Relaxed);
            p.next_offset.store(next, Ordering::Release);
            p.durable.send_replace(next);
            p.appended.send_modify(|n| *n = n.wrapping_add(1));
        }
        let stats = &self.shared.stats;
        relaxed_add(&stats.commits, 1);
        relaxed_add(&stats.appends, pending.len() as u64);
        for p in pending.drain(..) {
            relaxed_add(&stats.records, u64::from(p.records));
            relaxed_add(&stats.bytes, p.bytes);
            let _ = p.reply.send(Ok(p.base));
        }
        Ok(())
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
                let mut wb = self.shared.db.batch();
                if durable {
                    wb = wb.durability(Some(PersistMode::SyncData));
                }
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
                existing: current,
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

    /// Deletes the batches of `p` that lie wholly below `before` (one tombstone each) and
    /// moves its earliest offset to the first batch kept; returns the new earliest offset.
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
        let mut new_earliest = earliest;
        let mut freed = 0u64;
        for guard in self.shared.records.range(p.key(earliest)..p.key(before)) {
            let (key, value) = guard.into_inner().map_err(read_err)?;
            let end = match batch::verify(&value) {
                Ok(h) => h.next_offset(),
                // A damaged batch is deleted with the rest when the next batch's base says
                // where it ends; stop here and keep it otherwise.
                Err(_) => break,
            };
            if end > before {
                break;
            }
            wb.remove(&self.shared.records, key);
            freed += value.len() as u64;
            new_earliest = end;
        }
        if new_earliest == earliest {
            return Ok(earliest);
        }
        let meta = PartitionMeta {
            next_offset: next,
            earliest_offset: new_earliest,
            bytes: p.bytes().saturating_sub(freed),
        };
        wb.insert(&self.shared.meta, p.meta_key(), meta.encode().to_vec());
        wb.commit().map_err(Error::Commit)?;
        p.earliest_offset.store(new_earliest, Ordering::Release);
        p.bytes.fetch_sub(freed.min(p.bytes()), Ordering::Relaxed);
        Ok(new_earliest)
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
