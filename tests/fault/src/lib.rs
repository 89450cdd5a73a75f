//! Fault injection for a Weir cluster (`docs/reliability.md`).
//!
//! A run of the nemesis records a [`History`]: every produce and its outcome, every record a
//! read returned, what each replica holds once the faults are healed, and what consumer
//! groups delivered, acked and committed. [`check`] then proves the invariants the cluster
//! claims, the way Jepsen's checkers do over a recorded history rather than trusting the
//! system under test:
//!
//! - no acknowledged record lost or changed: each is at its acknowledged offset, with its
//!   bytes, on every replica after healing;
//! - none duplicated: a produced value (each is unique) is stored at one offset at most,
//!   whatever its produce's outcome;
//! - no offset ever served with two different records (by a read or a replica);
//! - per-partition order as produced: an idempotent producer's acknowledged records of one
//!   key have offsets in the order of their sequences;
//! - a group's committed offset never moves back past what was committed and persisted
//!   (observed at least a persistence window earlier), and a Shared group delivers an acked
//!   record again only within that window;
//! - an acknowledged admin request (topic created, partitions grown, topic deleted) is never
//!   undone, and no topic ends with partitions no request asked for.

pub mod checker;
pub mod history;

pub use checker::{Report, Violation, check};
pub use history::{AdminKind, AdminOp, GroupEvent, History, Outcome, Produce, Read};
