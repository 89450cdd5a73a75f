//! The `weir.dev/v1alpha1` custom resources: `Topic` and `ConsumerGroup`.
//!
//! This module owns the CRD schemas: field docs become `kubectl explain` text, and bounds,
//! enums, patterns and CEL rules (`x-kubernetes-validations`) make the API server refuse a bad
//! resource at apply time with a message that says what is wrong (Strimzi let a partition
//! decrease through and reported it afterwards; here the API server refuses it). It knows
//! nothing of brokers or reconciling.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Durations as `weir` and humantime write them: one or more `<number><unit>` with units
/// ns, us, ms, s, m, h, d, w (e.g. `10d`, `1h30m`).
pub const DURATION_PATTERN: &str = r"^([0-9]+(ns|us|ms|s|m|h|d|w))+$";
/// Topic and group names on the brokers: a-z, A-Z, 0-9, `.`, `_` and `-` (Kafka's rule).
pub const NAME_PATTERN: &str = r"^[a-zA-Z0-9._-]+$";
/// Byte sizes: a number with an optional unit B, KB, MB, GB, TB (powers of 1000) or KiB, MiB,
/// GiB, TiB (powers of 1024), e.g. `1GiB`, `500MB`, `4096`.
pub const SIZE_PATTERN: &str = r"^[0-9]+(\.[0-9]+)?(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$";

/// CEL: the bytes of the size string `s` (the forms of [`SIZE_PATTERN`]), as a double.
fn cel_size(s: &str) -> String {
    format!(
        "(double({s}.find('^[0-9]+([.][0-9]+)?')) * ({s}.endsWith('KiB') ? 1024.0 : {s}.endsWith('MiB') ? 1048576.0 : {s}.endsWith('GiB') ? 1073741824.0 : {s}.endsWith('TiB') ? 1099511627776.0 : {s}.endsWith('KB') ? 1000.0 : {s}.endsWith('MB') ? 1000000.0 : {s}.endsWith('GB') ? 1000000000.0 : {s}.endsWith('TB') ? 1000000000000.0 : 1.0))"
    )
}

/// CEL: the milliseconds of the duration string `self` (the forms of [`DURATION_PATTERN`],
/// including `d` and `w`, which CEL's own `duration()` does not read), as an int; ns and us
/// parts round down.
const CEL_DURATION_MS: &str = "self.findAll('[0-9]+[a-z]+').map(c, c.endsWith('ns') ? int(c.find('[0-9]+')) / 1000000 : c.endsWith('us') ? int(c.find('[0-9]+')) / 1000 : c.endsWith('ms') ? int(c.find('[0-9]+')) : c.endsWith('s') ? int(c.find('[0-9]+')) * 1000 : c.endsWith('m') ? int(c.find('[0-9]+')) * 60000 : c.endsWith('h') ? int(c.find('[0-9]+')) * 3600000 : c.endsWith('d') ? int(c.find('[0-9]+')) * 86400000 : int(c.find('[0-9]+')) * 604800000).sum()";

/// A topic: a named, partitioned log on the Weir brokers of this namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "Topic",
    namespaced,
    status = "TopicStatus",
    shortname = "wt",
    printcolumn = r#"{"name":"Partitions","type":"integer","jsonPath":".spec.partitions"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Messages","type":"integer","jsonPath":".status.messages"}"#,
    printcolumn = r#"{"name":"Bytes","type":"integer","jsonPath":".status.bytes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.metadata.name.size() <= 249").message("a topic name has at most 249 characters (Kafka's rule)")
)]
#[x_kube(validation = Rule::new("!has(oldSelf.partitions) || self.partitions >= oldSelf.partitions").message("partitions can only grow: a topic's partitions cannot be removed"))]
#[x_kube(validation = Rule::new(format!("!has(self.retention) || !has(self.retention.maxBytes) || ({max_bytes} >= 65536.0 && {max_bytes} >= (has(self.maxMessageBytes) ? {max_message_bytes} : 1048576.0))", max_bytes = cel_size("self.retention.maxBytes"), max_message_bytes = cel_size("self.maxMessageBytes"))).message("retention.maxBytes must be at least 64KiB and at least maxMessageBytes (1MiB when unset): a smaller limit could not hold one record"))]
#[x_kube(validation = Rule::new("!has(self.retention) || !has(self.retention.policy) || self.retention.policy != 'WorkQueue' || (!has(self.retention.maxMessages) && !has(self.retention.maxBytes)) || (has(self.overflow) && self.overflow == 'Reject')").message("a WorkQueue topic with maxMessages or maxBytes needs overflow: Reject (dropping unacked work would lose it)"))]
#[x_kube(validation = Rule::new("!has(self.replicationFactor) || self.replicationFactor == 1 || !has(self.retention) || (!has(self.retention.maxBytes) && !has(self.retention.maxMessages)) || !has(self.overflow) || self.overflow == 'DropOldest'").message("a replicated topic (replicationFactor above 1) takes retention.maxBytes and maxMessages with overflow DropOldest only, for now (a replicated WorkQueue takes no size limit): size limits with overflow Reject need replicationFactor 1"))]
#[serde(rename_all = "camelCase")]
pub struct TopicSpec {
    /// Number of partitions, 1 to 1024. Can grow later, never shrink.
    #[schemars(range(min = 1, max = 1024))]
    pub partitions: u32,
    /// Copies of each partition, each on its own broker: 1, 3 or 5 (at most the brokers).
    /// With 3 a produce is acknowledged once two brokers have it, and a partition survives
    /// the loss of one broker (of two with 5). Immutable.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 5))]
    #[x_kube(validation = Rule::new("self == 1 || self == 3 || self == 5").message("replicationFactor must be 1, 3 or 5: an odd count, so that a majority of the replicas outlives the loss of one broker (3) or two (5)"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("replicationFactor is immutable"))]
    pub replication_factor: u32,
    /// When records are deleted.
    #[serde(default)]
    pub retention: Retention,
    /// What a produce past `retention.maxBytes` or `retention.maxMessages` does.
    #[serde(default)]
    pub overflow: Overflow,
    /// Largest record accepted (key + value + headers), e.g. `1MiB`; at most 16 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SIZE_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new(format!("{} <= 16777216.0", cel_size("self"))).message("maxMessageBytes must be at most 16MiB"))]
    pub max_message_bytes: Option<String>,
    /// When a produce is acknowledged: `Fsync` after fsync (survives machine crashes),
    /// `Buffered` once the write reaches the OS (survives process crashes).
    #[serde(default)]
    pub durability: Durability,
    /// What deleting the Topic does to its records: `Delete` removes them from the brokers,
    /// `Retain` keeps them. Default `Delete`: a deleted resource should not leave data behind
    /// that the next Topic of that name would not own.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

fn one() -> u32 {
    1
}

/// Retention limits of a topic.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Retention {
    /// Delete records older than this, e.g. `10d`, `12h`; at least `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new(format!("{CEL_DURATION_MS} >= 1000")).message("maxAge must be at least 1s"))]
    #[x_kube(validation = Rule::new(format!("{CEL_DURATION_MS} <= 3153600000000")).message("maxAge must be at most 100 years (36500d)"))]
    pub max_age: Option<String>,
    /// Most bytes stored over all partitions, e.g. `1GiB`; at least 64 KiB and at least
    /// `maxMessageBytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = SIZE_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new(format!("{} <= 9.2e18", cel_size("self"))).message("maxBytes must be below 8EiB (a signed 64-bit count of bytes)"))]
    pub max_bytes: Option<String>,
    /// Most records stored over all partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_messages: Option<u64>,
    /// `Limits` keeps records until a limit deletes them; `WorkQueue` deletes a record once
    /// every group has acknowledged it. Immutable.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("retention.policy is immutable; create a new topic instead"))]
    pub policy: RetentionPolicy,
}

/// When records are deleted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RetentionPolicy {
    /// Until a limit deletes them.
    #[default]
    Limits,
    /// Once every group has acknowledged them.
    WorkQueue,
}

/// What a produce past a limit does.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Delete from the head to make room.
    #[default]
    DropOldest,
    /// Refuse the produce with RESOURCE_EXHAUSTED.
    Reject,
}

/// When a produce is acknowledged.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// After fsync.
    #[default]
    Fsync,
    /// After the write reaches the OS.
    Buffered,
}

/// What deleting the resource does to the broker-side data.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeletionPolicy {
    /// Remove the data from the brokers.
    #[default]
    Delete,
    /// Keep the data.
    Retain,
}

/// A status condition, as Kubernetes API conventions define it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// PascalCase reason.
    #[serde(default)]
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[serde(default)]
    pub last_transition_time: String,
    /// Generation the condition was computed for.
    #[serde(default)]
    pub observed_generation: i64,
}

/// Where a partition lives.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PartitionPlacement {
    /// Partition index.
    pub partition: u32,
    /// Broker Pod that leads it (the cluster's controller placed it there; the Pod's
    /// ordinal is the broker id).
    pub broker: String,
    /// The leader's advertised gRPC address, its stable name through the headless Service
    /// (`weir-broker-<n>.weir-broker.<namespace>.svc:7070`). Clients need not use it: any
    /// broker (the `weir` Service) serves every partition.
    #[serde(default)]
    pub address: String,
    /// Broker Pods holding a copy, the preferred leader first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<String>,
    /// The replicas caught up with the leader (Kafka's ISR); fewer than `replicas` is
    /// the `UnderReplicated` condition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_sync: Vec<String>,
}

/// Settings the brokers were given, units parsed (ms, bytes); 0 means no limit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EffectiveSettings {
    /// Partitions.
    pub partitions: u32,
    /// `retention.maxAge` in ms.
    pub max_age_ms: u64,
    /// `retention.maxBytes` in bytes, over all partitions; each broker enforces its share
    /// (in proportion to the partitions it serves, like Kafka's per-partition
    /// `retention.bytes`).
    pub max_bytes: u64,
    /// `retention.maxMessages`, over all partitions; shared out like `maxBytes`.
    pub max_messages: u64,
    /// Largest record in bytes.
    pub max_message_bytes: u32,
    /// `Limits` or `WorkQueue`.
    pub retention: String,
    /// `DropOldest` or `Reject`.
    pub overflow: String,
    /// `Fsync` or `Buffered`.
    pub durability: String,
}

/// Observed state of a Topic; written by the operator only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TopicStatus {
    /// `Ready` (the topic serves produce and fetch on every partition) and
    /// `UnderReplicated` (some partition has fewer replicas in sync than replicas), keyed by
    /// type.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Generation of the spec last acted on.
    #[serde(default)]
    pub observed_generation: i64,
    /// Which broker leads each partition, and its replicas.
    #[serde(default)]
    pub placement: Vec<PartitionPlacement>,
    /// Records stored over all partitions.
    #[serde(default)]
    pub messages: u64,
    /// Bytes stored over all partitions.
    #[serde(default)]
    pub bytes: u64,
    /// Age in seconds of the oldest stored record (by record timestamp); absent when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_message_age_seconds: Option<u64>,
    /// What the brokers were given for the observed generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<EffectiveSettings>,
}

/// A consumer group on a Topic of the same namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "ConsumerGroup",
    namespaced,
    status = "ConsumerGroupStatus",
    shortname = "wcg",
    printcolumn = r#"{"name":"Topic","type":"string","jsonPath":".spec.topic"}"#,
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"Members","type":"integer","jsonPath":".status.members"}"#,
    printcolumn = r#"{"name":"Lag","type":"integer","jsonPath":".status.lag"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    validation = Rule::new("self.metadata.name.size() <= 249").message("a group name has at most 249 characters"),
    validation = Rule::new("has(self.spec.deadLetterTopic) || self.spec.topic.size() + self.metadata.name.size() + 5 <= 249").message("the default dead-letter topic <topic>-<group>-DLQ would be longer than 249 characters; set spec.deadLetterTopic")
)]
#[x_kube(validation = Rule::new("!has(self.deadLetterTopic) || self.deadLetterTopic != self.topic").message("deadLetterTopic must differ from topic"))]
#[x_kube(validation = Rule::new("!has(self.maxDeliveries) || (has(self.type) && self.type == 'Shared')").message("maxDeliveries applies to Shared groups only: an Ordered group redelivers in order and dead-letters nothing"))]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroupSpec {
    /// Topic the group reads (same namespace). Immutable.
    #[schemars(length(min = 1, max = 249), regex(pattern = NAME_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("topic is immutable; create a new group instead"))]
    pub topic: String,
    /// `Ordered`: one member per partition, in order. `Shared`: any member, per-message acks.
    /// Immutable.
    #[serde(rename = "type", default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("type is immutable; create a new group instead"))]
    pub type_: GroupType,
    /// Where a new group starts.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Shared: redeliver a message not acked within this long, e.g. `30s`; `100ms` to
    /// `24h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN), length(max = 32))]
    #[x_kube(validation = Rule::new(format!("{CEL_DURATION_MS} >= 100 && {CEL_DURATION_MS} <= 86400000")).message("ackWait must be between 100ms and 24h (1d)"))]
    pub ack_wait: Option<String>,
    /// Shared: after this many deliveries without an ack the message goes to the dead-letter
    /// topic; unset means never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_deliveries: Option<u32>,
    /// Dead-letter topic; default `<topic>-<group>-DLQ`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = NAME_PATTERN))]
    #[x_kube(validation = Rule::new("self != '.' && self != '..'").message("'.' and '..' are reserved topic names"))]
    pub dead_letter_topic: Option<String>,
    /// Moves the group, once, to `Earliest`, `Latest` or an RFC 3339 time (the first record
    /// at or after it), forgetting unacked deliveries (Kafka's `kafka-consumer-groups
    /// --reset-offsets`). Applied when this value differs from `status.lastReset.to`; to
    /// repeat the same reset, remove the field, then set it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = RESET_PATTERN))]
    pub reset_to: Option<String>,
}

/// `resetTo`: `Earliest`, `Latest` or an RFC 3339 time such as `2026-11-23T10:00:00Z`.
pub const RESET_PATTERN: &str = r"^(Earliest|Latest|[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2}))$";

/// How a group hands out messages.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GroupType {
    /// One owner per partition, offset order.
    #[default]
    Ordered,
    /// Any member, per-message acks.
    Shared,
}

/// Where a new group starts.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartFrom {
    /// The first stored record.
    #[default]
    Earliest,
    /// Records produced after the group is created.
    Latest,
}

/// Observed state of a ConsumerGroup; written by the operator only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsumerGroupStatus {
    /// `Ready` and others, keyed by type.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Generation of the spec last acted on.
    #[serde(default)]
    pub observed_generation: i64,
    /// Members connected: the most any one broker of the topic has (a consumer joins every
    /// broker that serves partitions of the topic).
    #[serde(default)]
    pub members: u32,
    /// Records not yet acked over all partitions.
    #[serde(default)]
    pub lag: u64,
    /// Records delivered and waiting for an ack.
    #[serde(default)]
    pub pending: u64,
    /// Records moved to the dead-letter topic so far.
    #[serde(default)]
    pub dead_lettered: u64,
    /// Per partition: where it is served, how far the group is, who owns it.
    #[serde(default)]
    pub partitions: Vec<GroupPartitionStatus>,
    /// The last `resetTo` applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reset: Option<AppliedReset>,
}

/// One partition of a group.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GroupPartitionStatus {
    /// Partition index.
    pub partition: u32,
    /// Broker Pod serving it.
    pub broker: String,
    /// Every record below this offset is acked (the committed offset).
    pub committed_offset: u64,
    /// Offset the next produced record gets.
    pub next_offset: u64,
    /// Records not yet acked.
    pub lag: u64,
    /// Delivered, waiting for an ack.
    pub pending: u64,
    /// Ordered groups: the member that owns the partition.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
}

/// A `resetTo` that was applied.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AppliedReset {
    /// The value applied.
    pub to: String,
    /// Generation of the ConsumerGroup it was applied for.
    pub generation: i64,
}
