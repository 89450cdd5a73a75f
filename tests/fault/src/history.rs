//! What a nemesis run records: the history [`crate::check`] reads. Serializable (JSON), so
//! a run's history can be kept and checked again.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A partition's records by offset.
pub type Records = BTreeMap<u64, Vec<u8>>;

/// Everything a run observed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    /// Every produce attempt, in the order the clients made them.
    pub produces: Vec<Produce>,
    /// Every record a read returned while the faults ran (fetches and group deliveries).
    pub reads: Vec<Read>,
    /// After healing: each replica's records (replica name → partition → offset → value).
    pub replicas: BTreeMap<String, BTreeMap<u32, Records>>,
    /// What consumer groups did, in the order observed.
    pub groups: Vec<GroupEvent>,
    /// Admin requests made while the faults ran, with what the clients were told.
    pub admin: Vec<AdminOp>,
    /// After healing: each topic's partition count as the cluster's metadata lists it.
    pub topics: BTreeMap<String, u32>,
    /// The faults injected: (start, end) in ms since the run began.
    pub faults: Vec<(u64, u64)>,
}

impl History {
    /// Whether a fault started within `[from_ms, to_ms]`.
    pub fn fault_started_within(&self, from_ms: u64, to_ms: u64) -> bool {
        self.faults
            .iter()
            .any(|(start, _)| (from_ms..=to_ms).contains(start))
    }
}

/// One admin request of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminOp {
    /// The topic.
    pub topic: String,
    /// What was asked.
    pub kind: AdminKind,
    /// The partition count asked for: at creation, or a grow to it (0 for a deletion).
    pub partitions: u32,
    /// Whether the cluster answered success (else an error or no answer: either outcome may
    /// have happened).
    pub acked: bool,
}

/// What an admin request asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminKind {
    /// Create the topic.
    Create,
    /// Grow its partitions (and change a setting).
    Grow,
    /// Delete it.
    Delete,
}

/// One produce of one record by an idempotent producer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Produce {
    /// The producer (a client of the run).
    pub producer: u32,
    /// Its sequence: the order in which the producer sent its records.
    pub sequence: u64,
    /// The record's key.
    pub key: String,
    /// The record's value, unique in the run.
    pub value: Vec<u8>,
    /// The partition it was sent to.
    pub partition: u32,
    /// What the client was told.
    pub outcome: Outcome,
}

/// What a producer was told about a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Acknowledged at this offset: it must be there, on every replica, forever.
    Acked {
        /// The acknowledged offset.
        offset: u64,
    },
    /// Refused with an answer that says nothing was stored.
    Refused,
    /// No answer (a timeout, a lost connection): stored once or not at all.
    Unknown,
}

/// A record a read returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Read {
    /// Who read it (a broker, a group member).
    pub source: String,
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// The value served.
    pub value: Vec<u8>,
}

/// Something a consumer group did, with when it was observed (ms since the run began).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupEvent {
    /// A member was given the record at `offset`.
    Delivered {
        /// Group name.
        group: String,
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
        /// When (ms).
        at_ms: u64,
    },
    /// A member acked the record at `offset` and the broker took the ack.
    Acked {
        /// Group name.
        group: String,
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
        /// When (ms).
        at_ms: u64,
    },
    /// The group's committed offset (ack floor) of `partition` as a describe showed it.
    Committed {
        /// Group name.
        group: String,
        /// Partition.
        partition: u32,
        /// The committed offset.
        offset: u64,
        /// When (ms).
        at_ms: u64,
    },
}

impl GroupEvent {
    /// When it was observed (ms since the run began).
    pub fn at_ms(&self) -> u64 {
        match self {
            GroupEvent::Delivered { at_ms, .. }
            | GroupEvent::Acked { at_ms, .. }
            | GroupEvent::Committed { at_ms, .. } => *at_ms,
        }
    }
}
