//! What a group needs from the rest of the cluster (`docs/cluster.md`, "Groups across the
//! cluster").
//!
//! A group lives on its coordinator: members, assignment and one cursor per partition of its
//! topic. The partitions the coordinator leads are read from its log; the others through
//! [`Remote`], which the cluster layer implements over the partitions' leaders. The same
//! trait carries the group's settings into the cluster's metadata, dead letters to their
//! topic wherever it is led, and ack floors to the leaders that delete a work-queue
//! topic's records. A cluster of one implements it too, with every partition local.

use std::sync::Arc;

use futures::future::BoxFuture;

use super::{GroupConfig, StartFrom};
use crate::log::{Record, StoredRecord, Topic, TopicConfig};

/// Why reading records of a partition led elsewhere failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The leader answered that the records are gone (retention) or damaged: they are
    /// skipped, as local ones would be.
    Gone(String),
    /// The leader could not be reached or did not answer: the deliveries are handed out
    /// again later.
    Unavailable(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gone(s) | Self::Unavailable(s) => f.write_str(s),
        }
    }
}

/// An error of the cluster: a gRPC status code (`tonic::Code` as an integer) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteError {
    /// `tonic::Code` as an integer.
    pub code: i32,
    /// What went wrong.
    pub message: String,
}

impl RemoteError {
    /// gRPC's `UNAVAILABLE` (14): nothing was done, the call may be made again (a leader is
    /// being elected, a broker is down).
    pub fn is_unavailable(&self) -> bool {
        self.code == 14
    }
}

/// The cluster as the groups of one broker see it.
pub trait Remote: Send + Sync + std::fmt::Debug {
    /// `(earliest, next)` offsets of partition `partition` of `topic`, which another broker
    /// leads, as last heard from that leader; `None` until first heard. The first call
    /// starts following the partition: when its leader appends, `topic`'s append signal
    /// fires here too, so waiting pulls look again.
    fn ends(&self, topic: &Arc<Topic>, partition: u32) -> Option<(u64, u64)>;

    /// Whether another broker leads partition `partition` of `topic` (then it is assigned
    /// to members like the partitions served here).
    fn led_elsewhere(&self, topic: &str, partition: u32) -> bool;

    /// Up to `max` records of a partition led elsewhere, from `offset` on.
    fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> BoxFuture<'static, Result<Vec<StoredRecord>, ReadError>>;

    /// The offset `start` points at in a partition led elsewhere (Kafka's `ListOffsets`).
    fn offset_for(
        &self,
        topic: &str,
        partition: u32,
        start: StartFrom,
    ) -> BoxFuture<'static, Result<u64, RemoteError>>;

    /// Records group `name` (coordinated here) with `config` in the cluster's metadata.
    fn put_group(
        &self,
        name: &str,
        config: &GroupConfig,
    ) -> BoxFuture<'static, Result<(), RemoteError>>;

    /// Removes group `name` from the cluster's metadata.
    fn delete_group(&self, name: &str) -> BoxFuture<'static, Result<(), RemoteError>>;

    /// Creates topic `name` through the cluster when it does not exist (a dead-letter topic).
    fn ensure_topic(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> BoxFuture<'static, Result<(), RemoteError>>;

    /// Appends `record` to partition 0 of `topic`, at its leader.
    fn produce(&self, topic: &str, record: Record) -> BoxFuture<'static, Result<(), RemoteError>>;

    /// Tells the leaders of a work-queue topic's partitions how far group `group` has
    /// acked each of them (`(partition, floor)`), so they delete what every group acked.
    /// Sent again when it changes and every few seconds; failures are retried that way.
    fn report_floors(&self, topic: &Arc<Topic>, group: &str, floors: Vec<(u32, u64)>);

    /// For partition `partition` of work-queue topic `topic`, led here: the lowest ack
    /// floor reported by the groups of `topic` not open here (`open_here`: those count with
    /// their own floors), `u64::MAX` when there are none; `None` while one of them has not
    /// reported, so nothing is deleted early (a group whose coordinator is moving counts as
    /// not reported until its new coordinator reports).
    fn reported_floor(
        &self,
        topic: &Topic,
        partition: u32,
        open_here: &std::collections::BTreeSet<String>,
    ) -> Option<u64>;

    /// The groups whose state lives in their coordinator partition's Raft log (groups
    /// created on a replicated topic) as the cluster's metadata knows them, each with its
    /// settings, coordinator partition and whether this broker's replica of that partition
    /// leads it now (then this broker coordinates the group).
    fn replicated_groups(&self) -> Vec<ReplicatedGroup>;

    /// For a group `name` about to be created on topic `topic`: its coordinator partition
    /// when the topic is replicated (the group's state then lives in that partition's Raft
    /// log, [`Remote::store_cursors`]), else `None` (it lives on this broker's disk).
    fn coordinator_partition(&self, name: &str, topic: &str) -> Option<u32>;

    /// Whether the cluster knows group `name` as one whose state lives in its coordinator
    /// partition's Raft log.
    fn is_replicated_group(&self, name: &str) -> bool;

    /// The cursors of group `name` (encoded, by partition) committed in partition
    /// `partition` of `topic` when this broker's replica of it took the leadership.
    /// Unavailable when this broker does not lead it.
    fn load_cursors(
        &self,
        topic: &str,
        partition: u32,
        name: &str,
    ) -> BoxFuture<'static, Result<EncodedCursors, RemoteError>>;

    /// Stores cursors of group `name` (encoded, by partition) in the Raft log of partition
    /// `partition` of `topic`, led here; no cursors removes all of the group's. Returns
    /// once committed. Unavailable when this broker does not lead it.
    fn store_cursors(
        &self,
        topic: &str,
        partition: u32,
        name: &str,
        cursors: EncodedCursors,
    ) -> BoxFuture<'static, Result<(), RemoteError>>;
}

/// A group's cursors in their stored form, by partition: `(partition, encoded cursor)`.
pub type EncodedCursors = Vec<(u32, Vec<u8>)>;

/// A group whose state lives in its coordinator partition's Raft log, as
/// [`Remote::replicated_groups`] lists it.
#[derive(Debug, Clone)]
pub struct ReplicatedGroup {
    /// Group name.
    pub name: String,
    /// Settings.
    pub config: GroupConfig,
    /// Its coordinator partition (of `config.topic`).
    pub partition: u32,
    /// Whether this broker's replica of that partition leads it now.
    pub led_here: bool,
}
