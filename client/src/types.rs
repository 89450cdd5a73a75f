//! The client's domain types: records, acks, topic and group settings and descriptions,
//! deliveries. Times are [`Duration`]s and [`SystemTime`]s, defaults are `None`, enums are
//! Rust enums; the `weir.v1` wire types stay inside the crate (and in [`crate::pb`] for
//! tools that need them).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::{Error, pb};

/// A record to produce, or one read back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Routing key: records with the same key go to the same partition, in order.
    pub key: Option<Bytes>,
    /// The payload.
    pub value: Bytes,
    /// Headers, in order; a name may repeat.
    pub headers: Vec<(String, Bytes)>,
    /// When the record was produced; `None` when producing lets the broker stamp it.
    pub timestamp: Option<SystemTime>,
}

impl Record {
    /// A record with only a value.
    pub fn value(value: impl Into<Bytes>) -> Self {
        Self {
            value: value.into(),
            ..Self::default()
        }
    }

    /// A record with a key and a value.
    pub fn keyed(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Self {
            key: Some(key.into()),
            value: value.into(),
            ..Self::default()
        }
    }

    /// This record with one more header.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The value of the first header called `name`.
    pub fn header_value(&self, name: &str) -> Option<&Bytes> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The value as text (invalid UTF-8 replaced).
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.value)
    }
}

fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn from_ms(ms: i64) -> Option<SystemTime> {
    (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs()))
}

impl From<Record> for pb::Record {
    fn from(r: Record) -> Self {
        Self {
            key: r.key,
            value: r.value,
            headers: r
                .headers
                .into_iter()
                .map(|(key, value)| pb::Header { key, value })
                .collect(),
            timestamp_ms: r.timestamp.map_or(0, to_ms),
        }
    }
}

impl From<pb::Record> for Record {
    fn from(r: pb::Record) -> Self {
        Self {
            key: r.key,
            value: r.value,
            headers: r.headers.into_iter().map(|h| (h.key, h.value)).collect(),
            timestamp: from_ms(r.timestamp_ms),
        }
    }
}

/// Where the records of one partition of a produce landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Partition index.
    pub partition: u32,
    /// Offset of the first record.
    pub base_offset: u64,
    /// Number of records; their offsets are `base_offset..base_offset + record_count`.
    pub record_count: u32,
}

impl From<pb::PartitionAck> for Ack {
    fn from(a: pb::PartitionAck) -> Self {
        Self {
            partition: a.partition,
            base_offset: a.base_offset,
            record_count: a.record_count,
        }
    }
}

/// When a topic deletes records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retention {
    /// At its limits (`max_age`, `max_bytes`, `max_messages`).
    #[default]
    Limits,
    /// Once every group of the topic acked them (a work queue).
    WorkQueue,
}

/// What a produce past `max_bytes` or `max_messages` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Delete the oldest records to make room.
    #[default]
    DropOldest,
    /// Refuse the produce with `RESOURCE_EXHAUSTED`.
    Reject,
}

/// When a produce is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// After fsync.
    #[default]
    Fsync,
    /// After the write reached the OS; fsynced within `--buffered-flush-interval`.
    Buffered,
}

/// Settings of a topic. `TopicConfig::new(partitions)` and the `with_…` methods build one;
/// `None` leaves a setting at the broker's default (no limit, 1 MiB records).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicConfig {
    /// Partitions, 1 to 1024; only grows.
    pub partitions: u32,
    /// Largest record in bytes (key + value + headers); `None`: 1 MiB.
    pub max_message_bytes: Option<u32>,
    /// When records are deleted.
    pub retention: Retention,
    /// Records older than this are deleted.
    pub max_age: Option<Duration>,
    /// Most bytes over all partitions (at least 64 KiB).
    pub max_bytes: Option<u64>,
    /// Most records over all partitions.
    pub max_messages: Option<u64>,
    /// What a produce past a limit does.
    pub overflow: Overflow,
    /// When a produce is acknowledged.
    pub durability: Durability,
    /// Partitions the broker serves when a topic spreads over brokers; empty: all.
    pub served_partitions: Vec<u32>,
    /// Copies of each partition on distinct brokers (1 to 5, at most the brokers); above 1
    /// a produce is acknowledged once a majority of the replicas have it.
    pub replication_factor: u32,
}

impl TopicConfig {
    /// `partitions` partitions, everything else at the broker's defaults.
    pub fn new(partitions: u32) -> Self {
        Self {
            partitions,
            max_message_bytes: None,
            retention: Retention::Limits,
            max_age: None,
            max_bytes: None,
            max_messages: None,
            overflow: Overflow::DropOldest,
            durability: Durability::Fsync,
            served_partitions: Vec::new(),
            replication_factor: 1,
        }
    }

    /// With `factor` copies of each partition (1 to 5, at most the brokers).
    #[must_use]
    pub fn with_replication_factor(mut self, factor: u32) -> Self {
        self.replication_factor = factor;
        self
    }

    /// With a record size limit in bytes.
    #[must_use]
    pub fn with_max_message_bytes(mut self, bytes: u32) -> Self {
        self.max_message_bytes = Some(bytes);
        self
    }

    /// With a retention policy.
    #[must_use]
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// With records deleted once older than `age`.
    #[must_use]
    pub fn with_max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// With at most `bytes` stored over all partitions.
    #[must_use]
    pub fn with_max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = Some(bytes);
        self
    }

    /// With at most `messages` stored over all partitions.
    #[must_use]
    pub fn with_max_messages(mut self, messages: u64) -> Self {
        self.max_messages = Some(messages);
        self
    }

    /// With what a produce past a limit does.
    #[must_use]
    pub fn with_overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// With when a produce is acknowledged.
    #[must_use]
    pub fn with_durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Serving only these partitions on this broker.
    #[must_use]
    pub fn with_served_partitions(mut self, partitions: Vec<u32>) -> Self {
        self.served_partitions = partitions;
        self
    }
}

impl From<&TopicConfig> for pb::TopicConfig {
    fn from(c: &TopicConfig) -> Self {
        Self {
            partitions: c.partitions,
            max_message_bytes: c.max_message_bytes.unwrap_or(0),
            retention: match c.retention {
                Retention::Limits => pb::RetentionPolicy::Limits,
                Retention::WorkQueue => pb::RetentionPolicy::WorkQueue,
            } as i32,
            max_age_ms: c
                .max_age
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            max_bytes: c.max_bytes.unwrap_or(0),
            max_messages: c.max_messages.unwrap_or(0),
            overflow: match c.overflow {
                Overflow::DropOldest => pb::Overflow::DropOldest,
                Overflow::Reject => pb::Overflow::Reject,
            } as i32,
            durability: match c.durability {
                Durability::Fsync => pb::Durability::Fsync,
                Durability::Buffered => pb::Durability::Buffered,
            } as i32,
            served_partitions: c.served_partitions.clone(),
            replication_factor: c.replication_factor,
        }
    }
}

impl From<pb::TopicConfig> for TopicConfig {
    fn from(c: pb::TopicConfig) -> Self {
        let some = |v: u64| (v != 0).then_some(v);
        Self {
            partitions: c.partitions,
            max_message_bytes: (c.max_message_bytes != 0).then_some(c.max_message_bytes),
            retention: if c.retention == pb::RetentionPolicy::WorkQueue as i32 {
                Retention::WorkQueue
            } else {
                Retention::Limits
            },
            max_age: some(c.max_age_ms).map(Duration::from_millis),
            max_bytes: some(c.max_bytes),
            max_messages: some(c.max_messages),
            overflow: if c.overflow == pb::Overflow::Reject as i32 {
                Overflow::Reject
            } else {
                Overflow::DropOldest
            },
            durability: if c.durability == pb::Durability::Buffered as i32 {
                Durability::Buffered
            } else {
                Durability::Fsync
            },
            served_partitions: c.served_partitions,
            replication_factor: c.replication_factor.max(1),
        }
    }
}

/// Live figures of one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Partition index.
    pub partition: u32,
    /// First offset still stored.
    pub earliest_offset: u64,
    /// Offset the next record gets.
    pub next_offset: u64,
    /// Records stored.
    pub messages: u64,
    /// Bytes stored.
    pub bytes: u64,
}

/// A topic: its settings and live figures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// Name.
    pub name: String,
    /// Settings, with the broker's defaults filled in.
    pub config: TopicConfig,
    /// Per partition, in index order.
    pub partitions: Vec<PartitionInfo>,
    /// Records stored over all partitions.
    pub messages: u64,
    /// Bytes stored over all partitions.
    pub bytes: u64,
    /// When the topic was created.
    pub created_at: Option<SystemTime>,
}

impl TryFrom<pb::TopicDescription> for TopicInfo {
    type Error = Error;

    fn try_from(t: pb::TopicDescription) -> Result<Self, Error> {
        Ok(Self {
            name: t.name,
            config: t
                .config
                .ok_or(Error::Malformed("TopicDescription.config"))?
                .into(),
            partitions: t
                .partitions
                .into_iter()
                .map(|p| PartitionInfo {
                    partition: p.partition,
                    earliest_offset: p.earliest_offset,
                    next_offset: p.next_offset,
                    messages: p.messages,
                    bytes: p.bytes,
                })
                .collect(),
            messages: t.messages,
            bytes: t.bytes,
            created_at: from_ms(t.created_at_ms),
        })
    }
}

/// A record read by offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Its offset.
    pub offset: u64,
    /// The record.
    pub record: Record,
}

/// How a fetch reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FetchOptions {
    /// Most record bytes returned (at least one record is); `None`: 1 MiB.
    pub max_bytes: Option<u32>,
    /// Most records returned; `None`: as `max_bytes` allows.
    pub max_records: Option<u32>,
    /// How long to wait for a record when none is there yet (at most 60 s); zero: answer at
    /// once.
    pub max_wait: Duration,
}

impl FetchOptions {
    /// Waiting up to `wait` for the first record (long polling).
    pub fn wait(wait: Duration) -> Self {
        Self {
            max_wait: wait,
            ..Self::default()
        }
    }
}

/// The answer to a fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// Records from the requested offset on.
    pub records: Vec<StoredRecord>,
    /// The partition's next offset when the fetch was answered.
    pub next_offset: u64,
    /// The partition's earliest stored offset.
    pub earliest_offset: u64,
}

impl From<pb::FetchResponse> for Fetched {
    fn from(f: pb::FetchResponse) -> Self {
        Self {
            records: f
                .records
                .into_iter()
                .map(|r| StoredRecord {
                    offset: r.offset,
                    record: r.record.unwrap_or_default().into(),
                })
                .collect(),
            next_offset: f.next_offset,
            earliest_offset: f.earliest_offset,
        }
    }
}

pub(crate) fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Offsets `from..to` of a partition whose records were lost, as `Client::repair_topic`
/// accepted them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LostRange {
    /// Partition index.
    pub partition: u32,
    /// First lost offset.
    pub from: u64,
    /// First offset after the range.
    pub to: u64,
    /// `missing` (no stored batch) or `damaged` (a batch that fails its check or cannot be
    /// read back).
    pub reason: String,
}

/// The cluster as one broker sees it (`Client::metadata`); serialized with the keys
/// `weir cluster describe --output json` prints.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterMetadata {
    /// The metadata group's leader (the controller), when one is known.
    pub metadata_leader: Option<u64>,
    /// Every broker.
    pub brokers: Vec<BrokerInfo>,
    /// Every partition of every topic.
    pub partitions: Vec<PartitionLeader>,
    /// Every consumer group and its coordinator, sorted by name.
    pub groups: Vec<GroupCoordinator>,
}

/// Where a consumer group lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupCoordinator {
    /// Group name.
    pub group: String,
    /// Its topic.
    pub topic: String,
    /// Broker id of its coordinator, which keeps its members and cursors.
    pub coordinator: u64,
}

/// A broker of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BrokerInfo {
    /// `--node-id`.
    pub id: u64,
    /// `--advertise`: `host:port` of its gRPC port.
    pub address: String,
    /// `Alive`.
    pub state: String,
}

/// Where a partition lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionLeader {
    /// Topic name.
    pub topic: String,
    /// Partition index.
    pub partition: u32,
    /// Broker id of its leader.
    pub leader: u64,
    /// Broker ids of its replicas, leader first.
    pub replicas: Vec<u64>,
    /// Broker ids of the replicas that are caught up.
    pub in_sync: Vec<u64>,
}

impl From<pb::MetadataResponse> for ClusterMetadata {
    fn from(m: pb::MetadataResponse) -> Self {
        Self {
            metadata_leader: m.metadata_leader,
            brokers: m
                .brokers
                .into_iter()
                .map(|b| BrokerInfo {
                    id: b.id,
                    address: b.address,
                    state: b.state,
                })
                .collect(),
            partitions: m
                .partitions
                .into_iter()
                .map(|p| PartitionLeader {
                    topic: p.topic,
                    partition: p.partition,
                    leader: p.leader,
                    replicas: p.replicas,
                    in_sync: p.in_sync,
                })
                .collect(),
            groups: m
                .groups
                .into_iter()
                .map(|g| GroupCoordinator {
                    group: g.group,
                    topic: g.topic,
                    coordinator: g.coordinator,
                })
                .collect(),
        }
    }
}
