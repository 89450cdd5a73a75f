//! Errors of consumer groups: unknown groups and members, refused acks, and the log's
//! errors underneath. No gRPC words: the gRPC edge maps each variant to a status code once.

use super::{GroupType, cursor::AckError};
use crate::{log, validate::InvalidConfig};

/// Errors of consumer groups. Bad input changes no state.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No group of that name.
    #[error("group {0:?} does not exist")]
    GroupNotFound(String),
    /// The group was deleted while a call waited on it.
    #[error("group {0:?} was deleted")]
    GroupDeleted(String),
    /// The group's state lives in its coordinator partition's Raft log and this broker does
    /// not lead that partition now (its leadership moved, or is moving here and the group
    /// is not open yet).
    #[error(
        "group {0:?} is not coordinated by this broker now: the leadership of its coordinator partition moved; call again (any broker routes the call to the group's new coordinator) and join again"
    )]
    CoordinatorMoved(String),
    /// A create with settings other than the existing group's.
    #[error(
        "group {group:?} already exists on topic {topic:?} as {group_type:?}; create it with identical settings or update it"
    )]
    GroupExists {
        /// Group name.
        group: String,
        /// Its topic.
        topic: String,
        /// Its type.
        group_type: GroupType,
    },
    /// An update tried to change the topic or type.
    #[error(
        "group {group:?}: topic and type are immutable (topic {topic:?}, type {group_type:?}); delete the group and create it again"
    )]
    Immutable {
        /// Group name.
        group: String,
        /// Its topic.
        topic: String,
        /// Its type.
        group_type: GroupType,
    },
    /// A member asked to join with another topic or type than the group has.
    #[error(
        "group {group:?} reads topic {have_topic:?} as {have_type:?}; this member asked for topic {want_topic:?} as {want_type:?}"
    )]
    JoinMismatch {
        /// Group name.
        group: String,
        /// The group's topic.
        have_topic: String,
        /// The group's type.
        have_type: GroupType,
        /// The topic the member asked for.
        want_topic: String,
        /// The type the member asked for.
        want_type: GroupType,
    },
    /// The member is not (or no longer) in the group.
    #[error(
        "member {member:?} is not in group {group:?} (it left or missed its session timeout); join again"
    )]
    NotMember {
        /// Group name.
        group: String,
        /// Member id.
        member: String,
    },
    /// An ack or nack named a partition the group's topic does not have.
    #[error("group {group:?} has no partition {partition}")]
    NoPartition {
        /// Group name.
        group: String,
        /// Partition named.
        partition: u32,
    },
    /// An ack or nack the cursor refused (not pending, another member's, …).
    #[error("group {group:?} partition {partition}: {source}")]
    Ack {
        /// Group name.
        group: String,
        /// Partition.
        partition: u32,
        /// Why.
        source: AckError,
    },
    /// One request acked (or nacked) an offset twice, or both acked and nacked it, or named
    /// a backwards range; the message says which.
    #[error("group {group:?}: {detail}")]
    MalformedAck {
        /// Group name.
        group: String,
        /// What was wrong.
        detail: String,
    },
    /// A pull for no messages.
    #[error("max_messages must be at least 1")]
    PullNothing,
    /// A setting or name broke a rule.
    #[error(transparent)]
    InvalidConfig(#[from] InvalidConfig),
    /// The log failed or refused (e.g. the group's topic does not exist).
    #[error(transparent)]
    Log(#[from] log::Error),
    /// A blocking task of the group died.
    #[error("a background task of group {group:?} failed: {detail}")]
    Task {
        /// Group name.
        group: String,
        /// The join error.
        detail: String,
    },
    /// The cluster refused or could not take a change of the group (its status code and
    /// message).
    #[error("group {group:?}: {message}")]
    Cluster {
        /// Group name.
        group: String,
        /// `tonic::Code` as an integer.
        code: i32,
        /// What the cluster answered.
        message: String,
    },
}
