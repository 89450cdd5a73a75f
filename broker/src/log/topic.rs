//! Topics and partitions in memory: settings, validation and live per-partition state.
//!
//! This module owns the rules for names and settings and the atomics that readers use to
//! see how far a partition is durable. It performs no I/O.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Error, keys};
use crate::validate::InvalidConfig;

/// Largest partition count a topic may have.
pub const MAX_PARTITIONS: u32 = 1024;
/// Record size limit used when a topic leaves `max_message_bytes` at 0: 1 MiB, as Kafka's
/// `message.max.bytes` default (1 MiB plus overhead).
pub const DEFAULT_MAX_MESSAGE_BYTES: u32 = 1024 * 1024;
/// Largest `max_message_bytes` a topic may set: 16 MiB.
pub const MAX_MESSAGE_BYTES_LIMIT: u32 = 16 * 1024 * 1024;

/// When records of a topic are deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Retention {
    /// Kept until a limit deletes them.
    #[default]
    Limits,
    /// Deleted once every group of the topic has acked them (NATS JetStream's WorkQueue
    /// retention). With no group, records wait.
    WorkQueue,
}

/// What happens when a produce would go past `max_messages` or `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Overflow {
    /// Delete from the head to make room (NATS JetStream `DiscardOld`).
    #[default]
    DropOldest,
    /// Refuse the whole request with `RESOURCE_EXHAUSTED` (NATS JetStream `DiscardNew`).
    Reject,
}

/// When a produce is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Durability {
    /// After the records are fsynced (group commit). Survives process and machine crashes.
    #[default]
    Fsync,
    /// After the records reach the OS (written, not fsynced); the broker fsyncs every
    /// `--buffered-flush-interval`. Survives a process crash; a machine crash or power loss
    /// can lose the last interval of acknowledged records.
    Buffered,
}

/// Settings of a topic, as stored in the metadata keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    /// Number of partitions, `1..=MAX_PARTITIONS`; only grows.
    pub partitions: u32,
    /// Largest accepted record in bytes (key + value + headers), `1..=MAX_MESSAGE_BYTES_LIMIT`.
    pub max_message_bytes: u32,
    /// When records are deleted.
    #[serde(default)]
    pub retention: Retention,
    /// Records older than this (ms, by record timestamp) are deleted; 0 keeps them forever.
    #[serde(default)]
    pub max_age_ms: u64,
    /// Most bytes of stored batches over all partitions; 0 for no limit.
    #[serde(default)]
    pub max_bytes: u64,
    /// Most records over all partitions; 0 for no limit.
    #[serde(default)]
    pub max_messages: u64,
    /// What a produce past `max_bytes` or `max_messages` does.
    #[serde(default)]
    pub overflow: Overflow,
    /// When a produce is acknowledged.
    #[serde(default)]
    pub durability: Durability,
    /// Partitions this broker serves: every one on a standalone broker; those the operator
    /// placed here when a topic spreads over several brokers.
    #[serde(default)]
    pub served: Served,
    /// Copies of each partition on distinct brokers, `1..=MAX_REPLICATION_FACTOR`; above 1
    /// each partition is a Raft group over its replicas (`crate::replica`).
    #[serde(default = "one")]
    pub replication_factor: u32,
}

fn one() -> u32 {
    1
}

/// Largest replication factor.
pub const MAX_REPLICATION_FACTOR: u32 = 5;

/// The partitions of a topic that this broker serves; the others exist (so partition numbers
/// and key hashing are the same on every broker) but stay empty here, and produce, fetch and
/// group deliveries for them are refused. Kafka's equivalent is partition leadership: a
/// broker answers `NOT_LEADER_OR_FOLLOWER` for a partition it does not lead.
///
/// Stored as the list of partition numbers, absent (`None`) for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(from = "Option<Vec<u32>>", into = "Option<Vec<u32>>")]
pub struct Served(Option<[u64; (MAX_PARTITIONS / 64) as usize]>);

impl Served {
    /// Every partition.
    pub const ALL: Served = Served(None);

    /// The partitions of `list`; an empty list means every partition. Errors when a
    /// number is not below `partitions`.
    pub fn from_list(list: &[u32], partitions: u32) -> Result<Self, InvalidConfig> {
        if list.is_empty() {
            return Ok(Self::ALL);
        }
        if let Some(p) = list.iter().find(|p| **p >= partitions) {
            return Err(InvalidConfig::new(
                "served_partitions",
                format!(
                    "served_partitions names partition {p}, but the topic has partitions 0..{partitions}; list partitions below {partitions}, or none to serve all"
                ),
            ));
        }
        Ok(Self::from(Some(list.to_vec())))
    }

    /// Whether partition `p` is served.
    pub fn contains(&self, p: u32) -> bool {
        match &self.0 {
            None => true,
            Some(bits) => bits
                .get((p / 64) as usize)
                .is_some_and(|w| w & (1 << (p % 64)) != 0),
        }
    }

    /// Whether every partition is served.
    pub fn is_all(&self) -> bool {
        self.0.is_none()
    }

    /// The served partition for round-robin turn `turn` of a topic with `partitions`
    /// partitions: partition `turn mod partitions` when all are served, otherwise the
    /// `(turn mod served)`-th served one. No allocation (it runs per produce request).
    pub fn round_robin(&self, turn: u32, partitions: u32) -> u32 {
        let Some(bits) = &self.0 else {
            return turn % partitions.max(1);
        };
        let served: u32 = bits.iter().map(|w| w.count_ones()).sum();
        let mut left = turn % served.max(1);
        for (i, word) in bits.iter().enumerate() {
            let ones = word.count_ones();
            if left < ones {
                let mut w = *word;
                for _ in 0..left {
                    w &= w - 1;
                }
                return i as u32 * 64 + w.trailing_zeros();
            }
            left -= ones;
        }
        0
    }

    /// `Ok` when partition `p` of `topic` is served, else [`Error::NotServed`].
    pub fn check(&self, topic: &str, p: u32) -> Result<(), Error> {
        if self.contains(p) {
            Ok(())
        } else {
            Err(Error::NotServed {
                topic: topic.to_owned(),
                partition: p,
                served: self.to_list(),
            })
        }
    }

    /// The served partitions, ascending; empty for [`Served::ALL`].
    pub fn to_list(&self) -> Vec<u32> {
        Option::<Vec<u32>>::from(*self).unwrap_or_default()
    }
}

impl From<Option<Vec<u32>>> for Served {
    fn from(list: Option<Vec<u32>>) -> Self {
        Served(list.map(|list| {
            let mut bits = [0u64; (MAX_PARTITIONS / 64) as usize];
            for p in list.into_iter().filter(|p| *p < MAX_PARTITIONS) {
                bits[(p / 64) as usize] |= 1 << (p % 64);
            }
            bits
        }))
    }
}

impl From<Served> for Option<Vec<u32>> {
    fn from(s: Served) -> Self {
        s.0.map(|bits| {
            (0..MAX_PARTITIONS)
                .filter(|p| bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
                .collect()
        })
    }
}

impl Default for TopicConfig {
    /// One partition, 1 MiB records, no limits, `Limits` retention, `DropOldest`, `Fsync`.
    fn default() -> Self {
        Self {
            partitions: 1,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            retention: Retention::Limits,
            max_age_ms: 0,
            max_bytes: 0,
            max_messages: 0,
            overflow: Overflow::DropOldest,
            durability: Durability::Fsync,
            served: Served::ALL,
            replication_factor: 1,
        }
    }
}

/// Longest `max_age_ms`: 100 years.
pub const MAX_AGE_LIMIT_MS: u64 = 100 * 365 * 24 * 3600 * 1000;
/// Smallest non-zero `max_bytes`: 64 KiB.
pub const MIN_MAX_BYTES: u64 = 64 * 1024;

impl TopicConfig {
    /// Builds a config from request values, where `max_message_bytes == 0` means the default.
    ///
    /// Errors name the bad field and the allowed range.
    pub fn new(partitions: u32, max_message_bytes: u32) -> Result<Self, InvalidConfig> {
        if partitions == 0 || partitions > MAX_PARTITIONS {
            return Err(InvalidConfig::new(
                "partitions",
                format!("partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}"),
            ));
        }
        let max_message_bytes = if max_message_bytes == 0 {
            DEFAULT_MAX_MESSAGE_BYTES
        } else {
            max_message_bytes
        };
        if max_message_bytes > MAX_MESSAGE_BYTES_LIMIT {
            return Err(InvalidConfig::new(
                "max_message_bytes",
                format!(
                    "max_message_bytes must be at most {MAX_MESSAGE_BYTES_LIMIT} (16 MiB), got {max_message_bytes}"
                ),
            ));
        }
        Ok(Self {
            partitions,
            max_message_bytes,
            ..Self::default()
        })
    }

    /// Checks the limits against each other; the message names the field and the allowed
    /// values.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let bad = |field, m: String| Err(InvalidConfig::new(field, m));
        if self.max_age_ms > MAX_AGE_LIMIT_MS {
            return bad(
                "max_age_ms",
                format!(
                    "max_age_ms is {}; it must be at most {MAX_AGE_LIMIT_MS} (100 years), or 0 for no limit",
                    self.max_age_ms
                ),
            );
        }
        if self.max_age_ms != 0 && self.max_age_ms < 1000 {
            return bad(
                "max_age_ms",
                format!(
                    "max_age_ms is {}; it must be at least 1000 (1 s), or 0 for no limit",
                    self.max_age_ms
                ),
            );
        }
        if self.max_bytes != 0
            && self.max_bytes < MIN_MAX_BYTES.max(u64::from(self.max_message_bytes))
        {
            return bad(
                "max_bytes",
                format!(
                    "max_bytes is {}; it must be at least {} (64 KiB and at least max_message_bytes), or 0 for no limit",
                    self.max_bytes,
                    MIN_MAX_BYTES.max(u64::from(self.max_message_bytes))
                ),
            );
        }
        if self.max_messages > i64::MAX as u64 || self.max_bytes > i64::MAX as u64 {
            return bad(
                "max_messages",
                "max_messages and max_bytes must fit in a signed 64-bit integer".into(),
            );
        }
        if self.replication_factor == 0 || self.replication_factor > MAX_REPLICATION_FACTOR {
            return bad(
                "replication_factor",
                format!(
                    "replication_factor is {}; it must be between 1 and {MAX_REPLICATION_FACTOR}",
                    self.replication_factor
                ),
            );
        }
        if self.replication_factor > 1
            && self.has_size_limits()
            && self.overflow == Overflow::Reject
        {
            return bad(
                "replication_factor",
                format!(
                    "replication_factor {} with max_bytes or max_messages and overflow Reject: replicated topics take size limits with overflow DropOldest only for now (so a replicated work queue takes no size limit); drop the limits, use DropOldest, or replication_factor 1",
                    self.replication_factor
                ),
            );
        }
        if self.retention == Retention::WorkQueue
            && self.overflow == Overflow::DropOldest
            && (self.max_messages != 0 || self.max_bytes != 0)
        {
            // A work queue that silently drops unacked work would lose it: refuse the combination.
            return bad(
                "overflow",
                "a work-queue topic with max_messages or max_bytes needs overflow Reject: dropping unacked work would lose it".into(),
            );
        }
        Ok(())
    }

    /// Whether any of `max_messages`, `max_bytes` is set.
    pub fn has_size_limits(&self) -> bool {
        self.max_messages != 0 || self.max_bytes != 0
    }
}

/// Stored form of a topic in the metadata keyspace (JSON under `t/<name>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TopicMeta {
    pub id: u32,
    pub name: String,
    pub config: TopicConfig,
    pub created_at_ms: i64,
}

/// A topic in memory.
#[derive(Debug)]
pub struct Topic {
    /// Internal id, never reused; prefixes the record keys of the topic's partitions.
    pub id: u32,
    /// Name as given at creation.
    pub name: String,
    /// Creation time, ms since the epoch.
    pub created_at_ms: i64,
    /// Current settings; changed only by the writer thread.
    pub(crate) config: RwLock<TopicConfig>,
    /// Partitions by index; grows only, and only on the writer thread.
    pub(crate) partitions: RwLock<Vec<std::sync::Arc<Partition>>>,
    /// Round-robin cursor for unkeyed records (sticky per request).
    pub(crate) next_unkeyed: AtomicU32,
    /// The topic's append signal and group readers' stamp, shared by its partitions.
    pub(crate) appended: std::sync::Arc<Appends>,
}

/// What a topic's partitions share about new records: a signal bumped after every commit
/// that made records of any of them durable, and when a group's pull last began waiting
/// on them all ([`Topic::subscribe_appends`]).
#[derive(Debug, Default)]
pub struct Appends {
    signal: watch::Sender<u64>,
    /// ms since the epoch; 0 never.
    reader_waited_at_ms: std::sync::atomic::AtomicI64,
}

impl Appends {
    /// Wakes every receiver of [`Topic::subscribe_appends`].
    pub(crate) fn bump(&self) {
        self.signal.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl Topic {
    /// Current settings.
    pub fn config(&self) -> TopicConfig {
        *self.config.read()
    }

    /// Partition `index`, or [`Error::PartitionNotFound`].
    pub fn partition(&self, index: u32) -> Result<std::sync::Arc<Partition>, Error> {
        let parts = self.partitions.read();
        parts
            .get(index as usize)
            .cloned()
            .ok_or_else(|| Error::PartitionNotFound {
                topic: self.name.clone(),
                partition: index,
                partitions: parts.len() as u32,
            })
    }

    /// Partition `index` when this broker serves it: [`Error::PartitionNotFound`] or
    /// [`Error::NotServed`] otherwise.
    pub fn served_partition(&self, index: u32) -> Result<std::sync::Arc<Partition>, Error> {
        let part = self.partition(index)?;
        self.config.read().served.check(&self.name, index)?;
        Ok(part)
    }

    /// All partitions, in index order.
    pub fn partitions(&self) -> Vec<std::sync::Arc<Partition>> {
        self.partitions.read().clone()
    }

    /// A receiver that changes whenever records of any partition become durable; notes a
    /// reader waiting on every partition ([`Partition::reader_waited_within`]) with one
    /// store, whatever the partition count.
    pub fn subscribe_appends(&self) -> watch::Receiver<u64> {
        self.appended
            .reader_waited_at_ms
            .store(super::now_ms(), Ordering::Relaxed);
        self.appended.signal.subscribe()
    }
}

/// Live state of one partition, shared by the writer (who advances it) and readers.
#[derive(Debug)]
pub struct Partition {
    /// Name of the owning topic (for errors and logs).
    pub topic: String,
    /// Index inside the topic.
    pub index: u32,
    /// `topic id ‖ partition index`, big-endian: the prefix of every record key.
    pub(crate) prefix: [u8; 8],
    /// Offset after the last durable batch (Kafka's high watermark); readers stop here.
    pub(crate) next_offset: AtomicU64,
    /// First offset still stored.
    pub(crate) earliest_offset: AtomicU64,
    /// Bytes of stored batches.
    pub(crate) bytes: AtomicU64,
    /// Offset the writer gives the next batch; ahead of `next_offset` while a commit runs.
    /// Touched only by the writer thread.
    pub(crate) assigned_next: AtomicU64,
    /// Bytes including batches of the commit in progress. Touched only by the writer.
    pub(crate) assigned_bytes: AtomicU64,
    /// Base offset of the first stored batch (physical head), so deletions and scans start
    /// there instead of stepping over the tombstones of deleted batches.
    pub(crate) head_base: AtomicU64,
    /// Set when the topic is deleted, so late appends fail instead of writing.
    pub(crate) deleted: AtomicBool,
    /// Set when the partition is a replica of a Raft group (`crate::replica`): the writer
    /// then stores appends without publishing them, and the group's state machine moves
    /// `next_offset` (the high watermark) as entries commit.
    pub(crate) replicated: AtomicBool,
    /// Publishes `next_offset` to long-polling fetches.
    pub(crate) durable: watch::Sender<u64>,
    /// The topic's append signal and group readers' stamp (shared by its partitions).
    pub(crate) appended: std::sync::Arc<Appends>,
    /// When a long-polling fetch last began waiting for this partition's next records (ms
    /// since the epoch; 0 never); a group's pull stamps [`Appends`] instead.
    pub(crate) reader_waited_at_ms: std::sync::atomic::AtomicI64,
    /// Ranges of lost records whose loss was accepted (`weir topic repair`): first offset →
    /// first offset after. Reads step over them instead of answering DATA_LOSS.
    pub(crate) accepted_losses: parking_lot::RwLock<std::collections::BTreeMap<u64, u64>>,
    /// A replicated partition's last stored Raft log id `(term, index)`, kept in the log end
    /// checkpoint ([`super::checkpoint`]): set by the writer as it stores and truncates
    /// entries, and at start-up to what the checkpoint held.
    pub(crate) last_log: parking_lot::Mutex<Option<super::checkpoint::LastLog>>,
}

impl Partition {
    pub(crate) fn new(
        topic: &str,
        topic_id: u32,
        index: u32,
        state: PartitionMeta,
        appended: std::sync::Arc<Appends>,
    ) -> Self {
        let prefix = keys::partition_prefix(topic_id, index);
        Self {
            topic: topic.to_owned(),
            index,
            prefix,
            next_offset: AtomicU64::new(state.next_offset),
            earliest_offset: AtomicU64::new(state.earliest_offset),
            bytes: AtomicU64::new(state.bytes),
            assigned_next: AtomicU64::new(state.next_offset),
            assigned_bytes: AtomicU64::new(state.bytes),
            head_base: AtomicU64::new(state.earliest_offset),
            deleted: AtomicBool::new(false),
            replicated: AtomicBool::new(false),
            durable: watch::Sender::new(state.next_offset),
            appended,
            reader_waited_at_ms: std::sync::atomic::AtomicI64::new(0),
            accepted_losses: parking_lot::RwLock::default(),
            last_log: parking_lot::Mutex::new(None),
        }
    }

    /// The partition's end as the log end checkpoint records it: the offset the writer
    /// gives next and a replicated partition's last stored log id.
    pub(crate) fn checkpoint_end(&self) -> super::checkpoint::End {
        super::checkpoint::End {
            next: self.assigned_next.load(Ordering::Relaxed),
            last_log: *self.last_log.lock(),
        }
    }

    /// A replicated partition's last stored Raft log id `(term, index)` as the log end
    /// checkpoint knows it: after a crash, how far the replica's log had reached even when
    /// the journal lost its tail.
    pub fn last_log(&self) -> Option<(u64, u64)> {
        *self.last_log.lock()
    }

    /// When `offset` lies in an accepted lost range, the first offset after that range.
    pub(crate) fn accepted_loss_end(&self, offset: u64) -> Option<u64> {
        self.accepted_losses
            .read()
            .range(..=offset)
            .next_back()
            .and_then(|(_, &to)| (offset < to).then_some(to))
    }

    /// Offset the next record will get; every offset below it is durable.
    pub fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// Marks the partition a replica of a Raft group and sets its high watermark (`next`,
    /// the end of the entries its state machine applied): from here on the group's state
    /// machine, not the writer, publishes how far records are readable.
    pub fn replicate_from(&self, next: u64) {
        self.replicated.store(true, Ordering::Release);
        self.publish(next);
    }

    /// Whether the partition is a replica of a Raft group (see [`Partition::replicate_from`]).
    pub fn is_replicated(&self) -> bool {
        self.replicated.load(Ordering::Acquire)
    }

    /// Makes records up to `next` readable (the high watermark of a replicated partition)
    /// and wakes long polls.
    pub fn publish(&self, next: u64) {
        self.next_offset.store(next, Ordering::Release);
        self.durable.send_replace(next);
        self.appended.bump();
    }

    /// The offset the next appended batch gets: the end of the stored log, ahead of
    /// [`Partition::next_offset`] while entries are not committed (replicated partitions)
    /// or a commit runs.
    pub fn log_end(&self) -> u64 {
        self.assigned_next.load(Ordering::Relaxed)
    }

    /// Whether the partition's topic was deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// `topic id ‖ partition index` of the local log (the prefix of its record keys).
    pub fn prefix(&self) -> [u8; 8] {
        self.prefix
    }

    /// First offset still stored.
    pub fn earliest_offset(&self) -> u64 {
        self.earliest_offset.load(Ordering::Acquire)
    }

    /// Bytes of stored batches.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// A receiver that sees `next_offset` each time a commit makes more records durable;
    /// notes a reader waiting ([`Partition::reader_waited_within`]).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.reader_waited_at_ms
            .store(super::now_ms(), Ordering::Relaxed);
        self.durable.subscribe()
    }

    /// Whether a reader began waiting for this partition's next records (a long-polling
    /// fetch, a group's pull) within `window_ms` before `now_ms` (ms since the epoch). A
    /// follower's replica tells its leader so: such a reader sees a record once the
    /// follower learns that it is committed, so the leader then sends commits at once
    /// (`crate::replica::network`).
    pub fn reader_waited_within(&self, now_ms: i64, window_ms: i64) -> bool {
        let last = self
            .reader_waited_at_ms
            .load(Ordering::Relaxed)
            .max(self.appended.reader_waited_at_ms.load(Ordering::Relaxed));
        now_ms.saturating_sub(last) < window_ms
    }

    /// Record key of the batch starting at `base_offset`: prefix ‖ offset (big-endian).
    pub(crate) fn key(&self, base_offset: u64) -> [u8; 16] {
        keys::record_key(self.prefix, base_offset)
    }

    /// Metadata key of this partition: `p/` ‖ prefix.
    pub(crate) fn meta_key(&self) -> [u8; 10] {
        keys::partition_meta_key(self.prefix)
    }

    pub(crate) fn meta(&self) -> PartitionMeta {
        PartitionMeta {
            next_offset: self.assigned_next.load(Ordering::Relaxed),
            earliest_offset: self.earliest_offset(),
            bytes: self.assigned_bytes.load(Ordering::Relaxed),
        }
    }
}

/// Stored per-partition counters, written in the same atomic fjall batch as the records they
/// describe, so start-up reads them instead of scanning the log. 24 bytes, little-endian.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PartitionMeta {
    pub next_offset: u64,
    pub earliest_offset: u64,
    pub bytes: u64,
}

impl PartitionMeta {
    pub fn encode(self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.next_offset.to_le_bytes());
        b[8..16].copy_from_slice(&self.earliest_offset.to_le_bytes());
        b[16..].copy_from_slice(&self.bytes.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        let n = |r: std::ops::Range<usize>| -> Option<u64> {
            Some(u64::from_le_bytes(b.get(r)?.try_into().ok()?))
        };
        Some(Self {
            next_offset: n(0..8)?,
            earliest_offset: n(8..16)?,
            bytes: n(16..24)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long-polling fetch (`Partition::subscribe`) and a group's pull
    /// (`Topic::subscribe_appends`) each count as a reader waiting, for the window after.
    #[test]
    fn a_waiting_reader_is_noted_for_the_window_after() {
        let appended = std::sync::Arc::new(Appends::default());
        let meta = PartitionMeta {
            next_offset: 0,
            earliest_offset: 0,
            bytes: 0,
        };
        let part = Partition::new("t", 1, 0, meta, std::sync::Arc::clone(&appended));
        let now = super::super::now_ms();
        assert!(!part.reader_waited_within(now, 1000), "no reader yet");
        let _fetch = part.subscribe();
        let at = super::super::now_ms();
        assert!(part.reader_waited_within(at, 1000));
        assert!(part.reader_waited_within(at + 999, 1000));
        assert!(!part.reader_waited_within(at + 1000, 1000));

        let appended = std::sync::Arc::new(Appends::default());
        let other = std::sync::Arc::new(Partition::new(
            "t",
            1,
            1,
            meta,
            std::sync::Arc::clone(&appended),
        ));
        let topic = Topic {
            id: 1,
            name: "t".into(),
            created_at_ms: 0,
            config: RwLock::new(TopicConfig::new(2, 0).expect("valid")),
            partitions: RwLock::new(vec![std::sync::Arc::clone(&other)]),
            next_unkeyed: AtomicU32::new(0),
            appended,
        };
        assert!(!other.reader_waited_within(at, 1000));
        let _pull = topic.subscribe_appends();
        assert!(other.reader_waited_within(super::super::now_ms(), 1000));
    }

    #[test]
    fn round_robin_visits_only_served_partitions_in_order() {
        let all = Served::ALL;
        assert_eq!(
            (0..5).map(|t| all.round_robin(t, 4)).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 0]
        );
        let some = Served::from_list(&[1, 3, 70], 100).expect("valid");
        assert_eq!(
            (0..4).map(|t| some.round_robin(t, 100)).collect::<Vec<_>>(),
            vec![1, 3, 70, 1]
        );
        assert!(some.check("t", 3).is_ok());
        assert!(matches!(
            some.check("t", 2),
            Err(Error::NotServed { partition: 2, .. })
        ));
    }

    #[test]
    fn config_bounds_are_enforced_with_the_range_in_the_message() {
        assert!(
            TopicConfig::new(0, 0)
                .expect_err("zero")
                .to_string()
                .contains("between 1 and 1024")
        );
        assert!(TopicConfig::new(1025, 0).is_err());
        assert!(TopicConfig::new(1, MAX_MESSAGE_BYTES_LIMIT + 1).is_err());
        assert_eq!(
            TopicConfig::new(3, 0).expect("valid").max_message_bytes,
            DEFAULT_MAX_MESSAGE_BYTES
        );
    }

    /// Replicated topics take `maxAge`, size limits that drop the oldest records and work
    /// queues (their leaders cut through the Raft log); size limits that refuse produce not
    /// yet.
    #[test]
    fn replicated_topics_take_age_and_drop_oldest_limits_only() {
        let rf3 = |f: fn(&mut TopicConfig)| {
            let mut c = TopicConfig::new(2, 0).expect("valid");
            c.replication_factor = 3;
            f(&mut c);
            c.validate()
        };
        assert!(rf3(|c| c.max_age_ms = 60_000).is_ok());
        assert!(rf3(|c| c.max_messages = 1000).is_ok());
        assert!(rf3(|c| c.max_bytes = 1 << 20).is_ok());
        let refused = rf3(|c| {
            c.max_messages = 1000;
            c.overflow = Overflow::Reject;
        })
        .expect_err("Reject with limits");
        assert!(
            refused.to_string().contains("overflow DropOldest only"),
            "{refused}"
        );
        assert!(rf3(|c| c.retention = Retention::WorkQueue).is_ok());
    }

    #[test]
    fn partition_meta_round_trips() {
        let m = PartitionMeta {
            next_offset: 9,
            earliest_offset: 3,
            bytes: 1 << 40,
        };
        assert_eq!(PartitionMeta::decode(&m.encode()), Some(m));
        assert_eq!(PartitionMeta::decode(&[0; 23]), None);
    }
}
