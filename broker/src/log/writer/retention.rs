//! Retention inside the writer: `Reject` limits checked before an append, `DropOldest`
//! limits applied after a commit, `maxAge` expiry and head truncation (work queues, resets).
//!
//! Deletion is by whole batches from the head (fjall has no range delete: one tombstone per
//! batch); the earliest offset may fall inside a batch, as Kafka's log start offset can.

use std::sync::atomic::Ordering;

use super::{PartBatch, Writer};
use crate::log::{
    Error, Topic, TopicConfig, segment,
    topic::{Partition, PartitionMeta},
};

/// `Reject`: refuses a request that would take the topic past `max_messages` or
/// `max_bytes`, counting what the current round already added.
pub(super) fn check_room(
    topic: &Topic,
    config: &TopicConfig,
    batches: &[PartBatch],
) -> Result<(), Error> {
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
        return Err(Error::TopicFull {
            topic: topic.name.clone(),
            limit: "max_messages",
            unit: "messages",
            held: stored,
            max: config.max_messages,
            adding: add,
        });
    }
    if config.max_bytes != 0 && bytes + add_bytes > config.max_bytes {
        return Err(Error::TopicFull {
            topic: topic.name.clone(),
            limit: "max_bytes",
            unit: "bytes",
            held: bytes,
            max: config.max_bytes,
            adding: add_bytes,
        });
    }
    Ok(())
}

impl Writer {
    /// `DropOldest`: while the topic is over `max_messages` or `max_bytes`, moves the head of
    /// the partition holding the most records (the most bytes, for `max_bytes`) forward.
    /// Messages are dropped exactly (the earliest offset may fall inside a batch, as Kafka's
    /// log start offset can); whole batches below it are deleted.
    pub(super) fn drop_oldest(&self, topic: &Topic) -> Result<(), Error> {
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
        let end = segment::stored_header(&value).map_or(earliest + 1, |(h, _)| h.next_offset());
        let before = self.truncate(p, end.max(earliest + 1))?;
        Ok(before > earliest)
    }

    /// `maxAge`: moves the earliest offset of `p` past every head batch whose newest record
    /// is older than `cutoff_ms`; returns the new earliest offset.
    pub(super) fn expire(&self, p: &Partition, cutoff_ms: i64) -> Result<u64, Error> {
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
            match segment::stored_header(&value).map(|(h, _)| h) {
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
    pub(super) fn truncate(&self, p: &Partition, before: u64) -> Result<u64, Error> {
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
            let end = segment::stored_header(&value).map_or(before, |(h, _)| h.next_offset());
            if end > before {
                break;
            }
            wb.remove(&self.shared.records, key);
            freed += segment::stored_len(&value);
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
        self.delete_segments_below(p, head);
        p.assigned_bytes.store(bytes, Ordering::Relaxed);
        p.bytes.fetch_sub(freed.min(p.bytes()), Ordering::Relaxed);
        Ok(before)
    }
}
