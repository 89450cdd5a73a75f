//! Conversions between `weir.v1` wire types and domain types. Enum values a client sends
//! that this broker does not know are refused with a message listing the known ones.

use tonic::Status;
use weir_proto::v1 as pb;

use crate::{
    groups::{GroupConfig, GroupInfo, GroupType, StartFrom},
    log::{
        self,
        topic::{Durability, Overflow, Retention},
    },
    validate::quote,
};

pub(crate) fn record_from_pb(r: pb::Record) -> log::Record {
    log::Record {
        key: r.key,
        value: r.value,
        headers: r.headers.into_iter().map(|h| (h.key, h.value)).collect(),
        timestamp_ms: r.timestamp_ms,
    }
}

pub(crate) fn record_to_pb(r: log::Record) -> pb::Record {
    pb::Record {
        key: r.key,
        value: r.value,
        headers: r
            .headers
            .into_iter()
            .map(|(key, value)| pb::Header { key, value })
            .collect(),
        timestamp_ms: r.timestamp_ms,
    }
}

pub(crate) fn describe(topic: &log::Topic) -> pb::TopicDescription {
    let config = topic.config();
    let partitions: Vec<pb::PartitionStats> = topic
        .partitions()
        .iter()
        .map(|p| pb::PartitionStats {
            partition: p.index,
            earliest_offset: p.earliest_offset(),
            next_offset: p.next_offset(),
            messages: log::partition_messages(p),
            bytes: p.bytes(),
        })
        .collect();
    pb::TopicDescription {
        name: topic.name.clone(),
        config: Some(config_to_pb(&config)),
        messages: partitions.iter().map(|p| p.messages).sum(),
        bytes: partitions.iter().map(|p| p.bytes).sum(),
        partitions,
        created_at_ms: topic.created_at_ms,
    }
}

/// A topic this broker leads no partition of, from the cluster's metadata: its settings,
/// without live figures (those are on the brokers that lead its partitions).
pub(crate) fn describe_remote(name: &str, config: &log::TopicConfig) -> pb::TopicDescription {
    pb::TopicDescription {
        name: name.to_owned(),
        config: Some(config_to_pb(config)),
        ..Default::default()
    }
}

pub(crate) fn config_to_pb(config: &log::TopicConfig) -> pb::TopicConfig {
    pb::TopicConfig {
        partitions: config.partitions,
        max_message_bytes: config.max_message_bytes,
        retention: match config.retention {
            Retention::Limits => pb::RetentionPolicy::Limits,
            Retention::WorkQueue => pb::RetentionPolicy::WorkQueue,
        } as i32,
        max_age_ms: config.max_age_ms,
        max_bytes: config.max_bytes,
        max_messages: config.max_messages,
        overflow: match config.overflow {
            Overflow::DropOldest => pb::Overflow::DropOldest,
            Overflow::Reject => pb::Overflow::Reject,
        } as i32,
        durability: match config.durability {
            Durability::Fsync => pb::Durability::Fsync,
            Durability::Buffered => pb::Durability::Buffered,
        } as i32,
        served_partitions: config.served.to_list(),
        replication_factor: config.replication_factor,
    }
}

/// Topic settings from the wire; `what` names the topic for messages.
pub(crate) fn topic_config_from_pb(
    what: &str,
    c: Option<pb::TopicConfig>,
) -> Result<log::TopicConfig, Status> {
    let c = c.ok_or_else(|| {
        Status::invalid_argument(format!(
            "topic {:?}: config is missing; set at least config.partitions (1..=1024)",
            quote(what)
        ))
    })?;
    let mut config = log::TopicConfig::new(c.partitions, c.max_message_bytes)?;
    config.retention = match pb::RetentionPolicy::try_from(c.retention) {
        Ok(pb::RetentionPolicy::Limits) => Retention::Limits,
        Ok(pb::RetentionPolicy::WorkQueue) => Retention::WorkQueue,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "topic {:?}: retention {} is unknown; use RETENTION_POLICY_LIMITS (0) or RETENTION_POLICY_WORK_QUEUE (1)",
                quote(what),
                c.retention
            )));
        }
    };
    config.overflow = match pb::Overflow::try_from(c.overflow) {
        Ok(pb::Overflow::DropOldest) => Overflow::DropOldest,
        Ok(pb::Overflow::Reject) => Overflow::Reject,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "topic {:?}: overflow {} is unknown; use OVERFLOW_DROP_OLDEST (0) or OVERFLOW_REJECT (1)",
                quote(what),
                c.overflow
            )));
        }
    };
    config.durability = match pb::Durability::try_from(c.durability) {
        Ok(pb::Durability::Fsync) => Durability::Fsync,
        Ok(pb::Durability::Buffered) => Durability::Buffered,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "topic {:?}: durability {} is unknown; use DURABILITY_FSYNC (0) or DURABILITY_BUFFERED (1)",
                quote(what),
                c.durability
            )));
        }
    };
    config.max_age_ms = c.max_age_ms;
    config.max_bytes = c.max_bytes;
    config.max_messages = c.max_messages;
    config.served = log::topic::Served::from_list(&c.served_partitions, c.partitions)?;
    config.replication_factor = c.replication_factor.max(1);
    config.validate()?;
    Ok(config)
}

pub(crate) fn start_from_pb(s: Option<&pb::StartPosition>) -> StartFrom {
    match s.and_then(|s| s.position) {
        Some(pb::start_position::Position::Latest(true)) => StartFrom::Latest,
        Some(pb::start_position::Position::TimestampMs(ts)) => StartFrom::Timestamp(ts),
        _ => StartFrom::Earliest,
    }
}

pub(crate) fn start_to_pb(s: StartFrom) -> pb::StartPosition {
    pb::StartPosition {
        position: Some(match s {
            StartFrom::Earliest => pb::start_position::Position::Earliest(true),
            StartFrom::Latest => pb::start_position::Position::Latest(true),
            StartFrom::Timestamp(ts) => pb::start_position::Position::TimestampMs(ts),
        }),
    }
}

/// Group settings from the wire; `group` names the group for messages.
pub(crate) fn group_config_from_pb(
    group: &str,
    c: Option<pb::GroupConfig>,
) -> Result<GroupConfig, Status> {
    let c = c.ok_or_else(|| {
        Status::invalid_argument(format!(
            "group {:?}: config is missing; set at least config.topic and config.type",
            quote(group)
        ))
    })?;
    let group_type = match pb::GroupType::try_from(c.r#type) {
        Ok(pb::GroupType::Ordered) => GroupType::Ordered,
        Ok(pb::GroupType::Shared) => GroupType::Shared,
        _ => {
            return Err(Status::invalid_argument(format!(
                "group {:?}: type must be GROUP_TYPE_ORDERED (1) or GROUP_TYPE_SHARED (2), got {}",
                quote(group),
                c.r#type
            )));
        }
    };
    if c.topic.is_empty() {
        return Err(Status::invalid_argument(format!(
            "group {:?}: config.topic is empty; name the topic the group reads",
            quote(group)
        )));
    }
    Ok(GroupConfig {
        topic: c.topic,
        group_type,
        start: start_from_pb(c.start.as_ref()),
        ack_wait_ms: c.ack_wait_ms,
        max_deliveries: c.max_deliveries,
        dead_letter_topic: c.dead_letter_topic,
        session_timeout_ms: c.session_timeout_ms,
    })
}

pub(crate) fn group_config_to_pb(c: &GroupConfig) -> pb::GroupConfig {
    pb::GroupConfig {
        topic: c.topic.clone(),
        r#type: match c.group_type {
            GroupType::Ordered => pb::GroupType::Ordered,
            GroupType::Shared => pb::GroupType::Shared,
        } as i32,
        start: Some(start_to_pb(c.start)),
        ack_wait_ms: c.ack_wait_ms,
        max_deliveries: c.max_deliveries,
        dead_letter_topic: c.dead_letter_topic.clone(),
        session_timeout_ms: c.session_timeout_ms,
    }
}

pub(crate) fn group_to_pb(g: &GroupInfo) -> pb::GroupDescription {
    pb::GroupDescription {
        name: g.name.clone(),
        config: Some(group_config_to_pb(&g.config)),
        members: g
            .members
            .iter()
            .map(|m| pb::GroupMember {
                member_id: m.id.clone(),
                partitions: m.partitions.clone(),
                pending: m.pending,
                idle_ms: m.idle_ms,
            })
            .collect(),
        partitions: g
            .partitions
            .iter()
            .map(|p| pb::GroupPartition {
                partition: p.partition,
                committed_offset: p.committed,
                next_offset: p.next,
                lag: p.lag,
                pending: p.pending,
                owner: p.owner.clone().unwrap_or_default(),
            })
            .collect(),
        lag: g.lag(),
        pending: g.pending(),
        dead_lettered: g.dead_lettered,
        generation: g.generation,
    }
}
