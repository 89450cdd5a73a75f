//! Resource specs → the broker's admin API settings (`weir.v1.TopicConfig`,
//! `weir.v1.GroupConfig`).
//!
//! Pure: parses the human units of the spec (`10d`, `1GiB`) once, here, and says which field
//! was wrong. The CRD schema already refuses malformed values at apply time; these checks
//! catch what a pattern cannot (a size too large, a duration past the broker's bounds).

use weir_proto::v1 as pb;

use crate::crd::{
    ConsumerGroupSpec, Durability, EffectiveSettings, GroupType, Overflow, RetentionPolicy,
    StartFrom, TopicSpec,
};

/// Largest `maxMessageBytes` a broker accepts: 16 MiB.
pub const MAX_MESSAGE_BYTES_LIMIT: u64 = 16 * 1024 * 1024;
/// `maxMessageBytes` when unset: 1 MiB, the broker's default (Kafka's `message.max.bytes`).
pub const DEFAULT_MAX_MESSAGE_BYTES: u32 = 1024 * 1024;
/// `ackWait` when unset: 30 s, the broker's default (NATS JetStream's `AckWait`).
pub const DEFAULT_ACK_WAIT_MS: u32 = 30_000;
/// Smallest non-zero `maxBytes` a broker takes: 64 KiB.
pub const MIN_MAX_BYTES: u64 = 64 * 1024;

/// A spec value the broker cannot take; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConvertError {
    /// A duration did not parse.
    #[error("{field}: {value:?} is not a duration such as 10d or 1h30m: {reason}")]
    Duration {
        /// Field path in the spec.
        field: &'static str,
        /// The value given.
        value: String,
        /// Parser message.
        reason: String,
    },
    /// A value of another kind that is not valid.
    #[error("{field}: {value:?} is {reason}")]
    Value {
        /// Field path in the spec.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A size did not parse or is out of range.
    #[error("{field}: {value:?} {reason}")]
    Size {
        /// Field path in the spec.
        field: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
}

fn duration_ms(field: &'static str, value: &str) -> Result<u64, ConvertError> {
    let d = humantime::parse_duration(value).map_err(|e| ConvertError::Duration {
        field,
        value: value.to_owned(),
        reason: e.to_string(),
    })?;
    u64::try_from(d.as_millis()).map_err(|_| ConvertError::Duration {
        field,
        value: value.to_owned(),
        reason: "too long".into(),
    })
}

fn size(field: &'static str, value: &str) -> Result<u64, ConvertError> {
    value
        .parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| ConvertError::Size {
            field,
            value: value.to_owned(),
            reason: format!("is not a size such as 1GiB: {e}"),
        })
}

/// The broker settings of a Topic.
pub fn topic_config(spec: &TopicSpec) -> Result<pb::TopicConfig, ConvertError> {
    let max_message_bytes = match &spec.max_message_bytes {
        Some(v) => {
            let n = size("spec.maxMessageBytes", v)?;
            if n > MAX_MESSAGE_BYTES_LIMIT {
                return Err(ConvertError::Size {
                    field: "spec.maxMessageBytes",
                    value: v.clone(),
                    reason: "is larger than the broker's limit of 16MiB".into(),
                });
            }
            n as u32
        }
        None => DEFAULT_MAX_MESSAGE_BYTES,
    };
    let r = &spec.retention;
    Ok(pb::TopicConfig {
        partitions: spec.partitions,
        replication_factor: spec.replication_factor,
        max_message_bytes,
        retention: match r.policy {
            RetentionPolicy::Limits => pb::RetentionPolicy::Limits,
            RetentionPolicy::WorkQueue => pb::RetentionPolicy::WorkQueue,
        } as i32,
        max_age_ms: r
            .max_age
            .as_deref()
            .map(|v| duration_ms("spec.retention.maxAge", v))
            .transpose()?
            .unwrap_or(0),
        max_bytes: r
            .max_bytes
            .as_deref()
            .map(|v| size("spec.retention.maxBytes", v))
            .transpose()?
            .unwrap_or(0),
        max_messages: r.max_messages.unwrap_or(0),
        overflow: match spec.overflow {
            Overflow::DropOldest => pb::Overflow::DropOldest,
            Overflow::Reject => pb::Overflow::Reject,
        } as i32,
        durability: match spec.durability {
            Durability::Fsync => pb::Durability::Fsync,
            Durability::Buffered => pb::Durability::Buffered,
        } as i32,
        served_partitions: Vec::new(),
    })
}

/// What a status reports of `c` (a Topic's settings before sharing out).
pub fn effective(c: &pb::TopicConfig) -> EffectiveSettings {
    EffectiveSettings {
        partitions: c.partitions,
        max_age_ms: c.max_age_ms,
        max_bytes: c.max_bytes,
        max_messages: c.max_messages,
        max_message_bytes: c.max_message_bytes,
        retention: if c.retention == pb::RetentionPolicy::WorkQueue as i32 {
            "WorkQueue"
        } else {
            "Limits"
        }
        .into(),
        overflow: if c.overflow == pb::Overflow::Reject as i32 {
            "Reject"
        } else {
            "DropOldest"
        }
        .into(),
        durability: if c.durability == pb::Durability::Buffered as i32 {
            "Buffered"
        } else {
            "Fsync"
        }
        .into(),
    }
}

/// Whether a broker's topic settings `have` already are `want` (what an update would set).
pub fn topic_matches(have: &pb::TopicConfig, want: &pb::TopicConfig) -> bool {
    have == want
}

/// Whether a broker's group settings `have` already are `want`, for the fields an update
/// can change (`ackWait`, `maxDeliveries`, `deadLetterTopic`).
pub fn group_matches(have: &pb::GroupConfig, want: &pb::GroupConfig) -> bool {
    (
        have.ack_wait_ms,
        have.max_deliveries,
        &have.dead_letter_topic,
    ) == (
        want.ack_wait_ms,
        want.max_deliveries,
        &want.dead_letter_topic,
    )
}

/// `resetTo` → the broker's start position: `Earliest`, `Latest` or an RFC 3339 time.
pub fn reset_position(value: &str) -> Result<pb::StartPosition, ConvertError> {
    use pb::start_position::Position;
    let position = match value {
        "Earliest" => Position::Earliest(true),
        "Latest" => Position::Latest(true),
        t => {
            let ts: k8s_openapi::jiff::Timestamp = t.parse().map_err(
                |e: k8s_openapi::jiff::Error| ConvertError::Value {
                    field: "spec.resetTo",
                    value: t.to_owned(),
                    reason: format!(
                        "not Earliest, Latest or an RFC 3339 time such as 2026-11-23T10:00:00Z: {e}"
                    ),
                },
            )?;
            Position::TimestampMs(ts.as_millisecond())
        }
    };
    Ok(pb::StartPosition {
        position: Some(position),
    })
}

/// The broker settings of ConsumerGroup `name`, with the broker's defaults filled in (so
/// they compare equal to what a broker describes).
pub fn group_config(name: &str, spec: &ConsumerGroupSpec) -> Result<pb::GroupConfig, ConvertError> {
    let ack_wait_ms = spec
        .ack_wait
        .as_deref()
        .map(|v| duration_ms("spec.ackWait", v))
        .transpose()?
        .unwrap_or(0);
    Ok(pb::GroupConfig {
        topic: spec.topic.clone(),
        r#type: match spec.type_ {
            GroupType::Ordered => pb::GroupType::Ordered,
            GroupType::Shared => pb::GroupType::Shared,
        } as i32,
        start: Some(pb::StartPosition {
            position: Some(match spec.start_from {
                StartFrom::Earliest => pb::start_position::Position::Earliest(true),
                StartFrom::Latest => pb::start_position::Position::Latest(true),
            }),
        }),
        ack_wait_ms: match u32::try_from(ack_wait_ms) {
            Ok(0) => DEFAULT_ACK_WAIT_MS,
            Ok(ms) => ms,
            Err(_) => {
                return Err(ConvertError::Duration {
                    field: "spec.ackWait",
                    value: spec.ack_wait.clone().unwrap_or_default(),
                    reason: "longer than the broker's limit of 49 days".into(),
                });
            }
        },
        max_deliveries: spec.max_deliveries.unwrap_or(0),
        dead_letter_topic: spec
            .dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}-{name}-DLQ", spec.topic)),
        session_timeout_ms: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Retention;

    fn spec() -> TopicSpec {
        serde_json::from_value(serde_json::json!({ "partitions": 4 })).expect("spec")
    }

    #[test]
    fn defaults_map_to_the_broker_defaults() {
        let c = topic_config(&spec()).expect("converts");
        assert_eq!(c.partitions, 4);
        assert_eq!(
            (
                c.max_age_ms,
                c.max_bytes,
                c.max_messages,
                c.max_message_bytes
            ),
            (0, 0, 0, DEFAULT_MAX_MESSAGE_BYTES)
        );
        assert_eq!(c.overflow, pb::Overflow::DropOldest as i32);
        assert_eq!(c.durability, pb::Durability::Fsync as i32);
    }

    #[test]
    fn human_units_are_parsed() {
        let mut s = spec();
        s.retention = Retention {
            max_age: Some("10d".into()),
            max_bytes: Some("1GiB".into()),
            max_messages: Some(1000),
            policy: RetentionPolicy::WorkQueue,
        };
        s.max_message_bytes = Some("512KiB".into());
        s.overflow = Overflow::Reject;
        let c = topic_config(&s).expect("converts");
        assert_eq!(c.max_age_ms, 10 * 24 * 3600 * 1000);
        assert_eq!(c.max_bytes, 1 << 30);
        assert_eq!(c.max_messages, 1000);
        assert_eq!(c.max_message_bytes, 512 * 1024);
        assert_eq!(c.retention, pb::RetentionPolicy::WorkQueue as i32);
        assert_eq!(c.overflow, pb::Overflow::Reject as i32);
    }

    #[test]
    fn values_the_broker_cannot_take_name_their_field() {
        let mut s = spec();
        s.max_message_bytes = Some("64MiB".into());
        let e = topic_config(&s).expect_err("too large").to_string();
        assert!(e.starts_with("spec.maxMessageBytes"), "{e}");
        let mut s = spec();
        s.retention.max_age = Some("10 parsecs".into());
        let e = topic_config(&s).expect_err("bad duration").to_string();
        assert!(e.starts_with("spec.retention.maxAge"), "{e}");
    }

    #[test]
    fn group_settings_carry_over() {
        let g: ConsumerGroupSpec = serde_json::from_value(serde_json::json!({
            "topic": "orders", "type": "Shared", "ackWait": "45s", "maxDeliveries": 5
        }))
        .expect("spec");
        let c = group_config("inventory", &g).expect("converts");
        assert_eq!(c.topic, "orders");
        assert_eq!(c.r#type, pb::GroupType::Shared as i32);
        assert_eq!(c.ack_wait_ms, 45_000);
        assert_eq!(c.max_deliveries, 5);
        assert_eq!(c.dead_letter_topic, "orders-inventory-DLQ");
    }

    #[test]
    fn reset_positions_parse() {
        use pb::start_position::Position;
        assert_eq!(
            reset_position("Earliest").expect("ok").position,
            Some(Position::Earliest(true))
        );
        assert_eq!(
            reset_position("2026-11-23T10:00:00Z").expect("ok").position,
            Some(Position::TimestampMs(1_795_428_000_000))
        );
        let e = reset_position("yesterday").expect_err("bad").to_string();
        assert!(e.starts_with("spec.resetTo"), "{e}");
    }
}
