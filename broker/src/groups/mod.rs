//! Consumer groups: who gets which message, acks, redelivery, dead letters, and the state
//! that survives restarts.
//!
//! This module owns group settings, membership, assignment and per-partition delivery
//! state ([`cursor`]); it reads records through the [`Log`] and writes its state to the log's
//! metadata keyspace. It knows nothing of gRPC.
//!
//! Every group on a topic gets every message (publish/subscribe). Inside a group:
//!
//! - `Ordered` (Kafka consumer groups, Pulsar Failover): each partition is owned by one
//!   member at a time (round robin over members in join order) and delivered in offset
//!   order. A partition moves to its new owner only after the old owner acked what it holds
//!   or left, so a member never sees a partition another member still owns. The committed
//!   offset is the ack floor; a nack rewinds the partition to that offset (a Kafka seek).
//! - `Shared` (Pulsar Shared, NATS JetStream pull consumers): any member gets any message;
//!   each is acked on its own; a nack redelivers after its delay; no ack within `ackWait`
//!   redelivers; a member that leaves or times out hands its deliveries back at once (as
//!   Pulsar does); after `maxDeliveries` deliveries the message goes to the dead-letter topic
//!   (Pulsar's DLQ naming `<topic>-<group>-DLQ`) with headers naming where it came from.
//!
//! State on disk ([`stored`]): settings and one cursor per partition in the log's metadata
//! keyspace. Acks update memory at once and are written every [`TICK`] without waiting for
//! fsync (the next produce's fsync, or shutdown, persists them): a crash can redeliver up
//! to one tick of acked messages (at-least-once), never lose one.
//!
//! # Parts
//!
//! - [`registry`]: the broker's groups by name; create, update, delete, reset, join.
//! - [`group`]: one group's state and its members' calls (heartbeat, leave, describe).
//! - [`membership`]: members and the Ordered assignment (pure, unit tested).
//! - [`delivery`]: pull and ack.
//! - [`cursor`]: delivery state of one partition (pure, unit tested).
//! - [`maintenance`]: the periodic pass (timeouts, redelivery, dead letters, retention).
//! - [`stored`]: stored forms.

pub mod cursor;
mod delivery;
mod error;
mod group;
mod maintenance;
mod membership;
mod registry;
mod remote;
mod stored;

use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::cursor::MemberId;
pub use self::{
    error::Error,
    group::Group,
    registry::Groups,
    remote::{ReadError, Remote, RemoteError, ReplicatedGroup},
};
use crate::{
    log::Record,
    validate::{InvalidConfig, NameKind, validate_name},
};

/// How often the group maintenance pass runs: expiry, session timeouts, dead letters,
/// persistence, work-queue deletion.
pub const TICK: Duration = Duration::from_millis(100);
/// `ackWait` when a group leaves it at 0: 30 s, NATS JetStream's default.
pub const DEFAULT_ACK_WAIT_MS: u32 = 30_000;
/// Longest delay a nack may ask for before the message is redelivered: 1 day, the longest
/// `ack_wait` too.
pub const MAX_NACK_DELAY: Duration = Duration::from_secs(86_400);
/// Session timeout when a group leaves it at 0: 10 s.
pub const DEFAULT_SESSION_TIMEOUT_MS: u32 = 10_000;

/// How a group hands out messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupType {
    /// One owner per partition, offset order.
    Ordered,
    /// Any member, per-message acks.
    Shared,
}

/// Where a new group (or a reset) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartFrom {
    /// The first stored record.
    Earliest,
    /// The next record produced.
    Latest,
    /// The first record with a timestamp at or after this (ms since the epoch).
    Timestamp(i64),
}

/// Settings of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupConfig {
    /// Topic read by the group.
    pub topic: String,
    /// Ordered or Shared.
    pub group_type: GroupType,
    /// Start of a new group.
    pub start: StartFrom,
    /// Shared: redelivery after this many ms without ack.
    pub ack_wait_ms: u32,
    /// Shared: dead-letter after this many deliveries; 0 never.
    pub max_deliveries: u32,
    /// Dead-letter topic name.
    pub dead_letter_topic: String,
    /// Members not heard from for this long (ms) are removed.
    pub session_timeout_ms: u32,
}

impl GroupConfig {
    /// Fills defaults (0 → default, empty DLQ → `<topic>-<group>-DLQ`, Pulsar's naming) and
    /// checks bounds.
    pub fn normalized(mut self, group: &str) -> Result<Self, InvalidConfig> {
        if self.ack_wait_ms == 0 {
            self.ack_wait_ms = DEFAULT_ACK_WAIT_MS;
        }
        if self.session_timeout_ms == 0 {
            self.session_timeout_ms = DEFAULT_SESSION_TIMEOUT_MS;
        }
        if self.dead_letter_topic.is_empty() {
            self.dead_letter_topic = format!("{}-{group}-DLQ", self.topic);
        }
        validate_name(NameKind::Topic, &self.dead_letter_topic)
            .map_err(|e| e.context("dead_letter_topic"))?;
        if self.dead_letter_topic == self.topic {
            return Err(InvalidConfig::new(
                "dead_letter_topic",
                format!(
                    "dead_letter_topic must differ from the group's topic {:?}",
                    self.topic
                ),
            ));
        }
        if !(100..=86_400_000).contains(&self.ack_wait_ms) {
            return Err(InvalidConfig::new(
                "ack_wait_ms",
                format!(
                    "ack_wait_ms must be between 100 and 86400000 (1 day), got {}",
                    self.ack_wait_ms
                ),
            ));
        }
        if self.group_type == GroupType::Ordered && self.max_deliveries != 0 {
            return Err(InvalidConfig::new(
                "max_deliveries",
                format!(
                    "max_deliveries is {}, but it applies to Shared groups only (an Ordered group redelivers in order and dead-letters nothing); leave it 0 or use a Shared group",
                    self.max_deliveries
                ),
            ));
        }
        if !(500..=3_600_000).contains(&self.session_timeout_ms) {
            return Err(InvalidConfig::new(
                "session_timeout_ms",
                format!(
                    "session_timeout_ms must be between 500 and 3600000 (1 hour), got {}",
                    self.session_timeout_ms
                ),
            ));
        }
        Ok(self)
    }
}

/// A message handed to a member.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Partition index.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// 1 on first delivery.
    pub count: u32,
    /// The record.
    pub record: Record,
}

/// A member as seen by describe.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    /// Member id.
    pub id: MemberId,
    /// Ordered: partitions owned.
    pub partitions: Vec<u32>,
    /// Deliveries not yet acked.
    pub pending: u64,
    /// ms since last heard from.
    pub idle_ms: u64,
}

/// A partition as seen by describe.
#[derive(Debug, Clone)]
pub struct PartitionInfo {
    /// Partition index.
    pub partition: u32,
    /// Ack floor.
    pub committed: u64,
    /// Partition's next offset.
    pub next: u64,
    /// Records not yet acked.
    pub lag: u64,
    /// Deliveries not yet acked.
    pub pending: u64,
    /// Ordered: owner.
    pub owner: Option<MemberId>,
}

/// A group as seen by describe.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Settings.
    pub config: GroupConfig,
    /// Members in join order.
    pub members: Vec<MemberInfo>,
    /// Per partition.
    pub partitions: Vec<PartitionInfo>,
    /// Messages moved to the dead-letter topic so far.
    pub dead_lettered: u64,
    /// Membership changes so far.
    pub generation: u64,
}

impl GroupInfo {
    /// Total lag.
    pub fn lag(&self) -> u64 {
        self.partitions.iter().map(|p| p.lag).sum()
    }
    /// Total pending.
    pub fn pending(&self) -> u64 {
        self.partitions.iter().map(|p| p.pending).sum()
    }
}

/// Result of a join.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The new member's id.
    pub member: MemberId,
    /// Generation after the join.
    pub generation: u64,
    /// Ordered: partitions the member owns now.
    pub partitions: Vec<u32>,
}

/// An inclusive range of offsets of one partition, as an ack names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AckRange {
    /// Partition index.
    pub partition: u32,
    /// First offset.
    pub first: u64,
    /// Last offset (inclusive).
    pub last: u64,
}

/// One offset of one partition, as a nack names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OffsetRef {
    /// Partition index.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
}
