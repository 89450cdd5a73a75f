//! Topic administration inside the writer: create, update (partitions only grow), delete,
//! and atomic writes of other metadata (group state). Each commits on its own, ordered with
//! the appends around it, and waits for fsync where the change must survive a crash.

use std::sync::{Arc, atomic::Ordering};

use fjall::PersistMode;
use parking_lot::RwLock;

use super::Writer;
use crate::log::{
    Error, MetaEntries, Topic, TopicConfig, keys, now_ms,
    topic::{Appends, Partition, PartitionMeta, TopicMeta},
};

/// Tombstones per fjall batch when deleting a topic.
const DELETE_CHUNK: usize = 10_000;

impl Writer {
    pub(super) fn create_topic(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> Result<(Arc<Topic>, bool), Error> {
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
        let appended = Arc::new(Appends::default());
        let partitions = new_partitions(name, id, 0..config.partitions, &appended);
        let mut wb = self.topic_batch(&stored, &partitions)?;
        wb.insert(
            &self.shared.meta,
            keys::TOPIC_ID_KEY,
            (id + 1).to_be_bytes(),
        );
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
        self.seal_metadata();
        tracing::info!(
            topic = name,
            partitions = config.partitions,
            "topic created"
        );
        Ok((topic, true))
    }

    pub(super) fn update_topic(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> Result<Arc<Topic>, Error> {
        let topic = self
            .shared
            .topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::TopicNotFound(crate::validate::quote(name)))?;
        let current = topic.config();
        if config.partitions < current.partitions {
            return Err(Error::PartitionsShrink {
                topic: name.to_owned(),
                current: current.partitions,
                requested: config.partitions,
            });
        }
        let added = new_partitions(
            name,
            topic.id,
            current.partitions..config.partitions,
            &topic.appended,
        );
        let stored = TopicMeta {
            id: topic.id,
            name: name.to_owned(),
            config,
            created_at_ms: topic.created_at_ms,
        };
        self.topic_batch(&stored, &added)?
            .commit()
            .map_err(Error::Commit)?;
        topic.partitions.write().extend(added);
        *topic.config.write() = config;
        self.seal_metadata();
        tracing::info!(
            topic = name,
            partitions = config.partitions,
            max_message_bytes = config.max_message_bytes,
            "topic updated"
        );
        Ok(topic)
    }

    /// Deletes `damaged_keys` (record batches that cannot be read back) and stores `ranges`
    /// of `p` as accepted losses, in one fsynced batch; then reads step over them.
    pub(super) fn accept_loss(
        &self,
        p: &Partition,
        ranges: &[(u64, u64)],
        damaged_keys: Vec<Vec<u8>>,
    ) -> Result<(), Error> {
        if p.deleted.load(Ordering::Acquire) {
            return Err(Error::TopicNotFound(p.topic.clone()));
        }
        let mut wb = self
            .shared
            .db
            .batch()
            .durability(Some(PersistMode::SyncData));
        for key in damaged_keys {
            wb.remove(&self.shared.records, key);
        }
        for &(from, to) in ranges {
            wb.insert(
                &self.shared.meta,
                keys::loss_key(p.prefix, from),
                to.to_be_bytes(),
            );
        }
        wb.commit().map_err(Error::Commit)?;
        let mut accepted = p.accepted_losses.write();
        for &(from, to) in ranges {
            accepted.insert(from, to);
        }
        Ok(())
    }

    pub(super) fn delete_topic(&self, name: &str) -> Result<(), Error> {
        let topic = self
            .shared
            .topics
            .write()
            .remove(name)
            .ok_or_else(|| Error::TopicNotFound(crate::validate::quote(name)))?;
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
        let producers: Vec<(u32, u32, u64)> = {
            let mut map = self.shared.producers.lock();
            let gone: Vec<(u32, u32, u64)> =
                map.keys().filter(|k| k.0 == topic.id).copied().collect();
            for k in &gone {
                map.remove(k);
            }
            gone
        };
        for (t, p, id) in producers {
            wb.remove(
                &self.shared.meta,
                keys::producer_key(keys::partition_prefix(t, p), id),
            );
        }
        for p in &partitions {
            let prefix = [keys::LOSS_PREFIX, &p.prefix[..]].concat();
            for guard in self.shared.meta.prefix(&prefix) {
                let key = guard.key().map_err(|source| Error::ReadMetadata {
                    prefix: "l/".into(),
                    source,
                })?;
                wb.remove(&self.shared.meta, key);
            }
        }
        wb.remove(&self.shared.meta, keys::topic_key(name));
        for p in &partitions {
            wb.remove(&self.shared.meta, p.meta_key());
        }
        wb.commit().map_err(Error::Commit)?;
        self.seal_metadata();
        for p in &partitions {
            self.remove_partition_segments(p);
        }
        tracing::info!(topic = name, "topic deleted");
        Ok(())
    }

    /// Moves the metadata keyspace's memtable out of the way after a topic's settings
    /// changed (fjall's `rotate_memtable`: the memtable is sealed and flushed to a table in
    /// the background; the journal file goes on), so that a later loss of the journal's
    /// tail cannot take the change with it. With the segment store the records
    /// keyspace holds only pointers and rarely fills a memtable, so without this a topic's
    /// creation could stay in the journal alone for as long as the broker runs, and a
    /// journal cut short after a crash lost the topic itself (`crash_safety.rs`). Failure
    /// is logged: the change is committed and fsynced either way.
    fn seal_metadata(&self) {
        crate::log::seal_to_table(&self.shared.meta, "topic metadata");
    }

    /// A fsynced batch that stores the topic's settings and empty counters for `new`
    /// partitions; nothing is written when the settings do not encode.
    fn topic_batch(
        &self,
        stored: &TopicMeta,
        new: &[Arc<Partition>],
    ) -> Result<fjall::OwnedWriteBatch, Error> {
        let json = encode_topic(stored)?;
        let mut wb = self
            .shared
            .db
            .batch()
            .durability(Some(PersistMode::SyncData));
        wb.insert(&self.shared.meta, keys::topic_key(&stored.name), json);
        for p in new {
            wb.insert(
                &self.shared.meta,
                p.meta_key(),
                PartitionMeta::default().encode().to_vec(),
            );
        }
        Ok(wb)
    }

    /// Puts and deletes in the metadata keyspace in one atomic batch. Without `durable` the
    /// batch still reaches the OS (a process crash keeps it) and the next fsync persists it.
    pub(super) fn write_meta(
        &self,
        puts: MetaEntries,
        deletes: Vec<Vec<u8>>,
        durable: bool,
    ) -> Result<(), Error> {
        let mode = if durable {
            PersistMode::SyncData
        } else {
            self.unsynced.set(true);
            PersistMode::Buffer
        };
        let mut wb = self.shared.db.batch().durability(Some(mode));
        for (k, v) in puts {
            wb.insert(&self.shared.meta, k, v);
        }
        for k in deletes {
            wb.remove(&self.shared.meta, k);
        }
        wb.commit().map_err(Error::Commit)
    }
}

/// Partitions `range` of topic `name` (id `topic_id`), empty, sharing the topic's append
/// signal.
fn new_partitions(
    name: &str,
    topic_id: u32,
    range: std::ops::Range<u32>,
    appended: &Arc<Appends>,
) -> Vec<Arc<Partition>> {
    range
        .map(|i| {
            Arc::new(Partition::new(
                name,
                topic_id,
                i,
                PartitionMeta::default(),
                Arc::clone(appended),
            ))
        })
        .collect()
}

fn encode_topic(meta: &TopicMeta) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(meta).map_err(|source| Error::Encode {
        what: "topic settings",
        source,
    })
}
