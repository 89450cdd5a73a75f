//! Resource specs → the broker's admin API settings (`weir.v1.TopicConfig`,
//! `weir.v1.GroupConfig`).
//!
//! Pure: parses the human units of the spec (`10d`, `1GiB`) once, here, and says which field
//! was wrong. The CRD schema already refuses malformed values at apply time; these checks
//! catch what a pattern cannot (a size too large, a duration past the broker's bounds).

use weir_proto::v1 as pb;

use crate::crd::{
    ConsumerGroupSpec, Durability, GroupType, Overflow, RetentionPolicy, StartFrom, TopicSpec,
};

/// Largest `maxMessageBytes` a broker accepts: 16 MiB.
pub const MAX_MESSAGE_BYTES_LIMIT: u64 = 16 * 1024 * 1024;

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
        None => 0,
    };
    let r = &spec.retention;
    Ok(pb::TopicConfig {
        partitions: spec.partitions,
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

/// The broker settings of a ConsumerGroup.
pub fn group_config(spec: &ConsumerGroupSpec) -> Result<pb::GroupConfig, ConvertError> {
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
        ack_wait_ms: u32::try_from(ack_wait_ms).unwrap_or(u32::MAX),
        max_deliveries: spec.max_deliveries.unwrap_or(0),
        dead_letter_topic: spec.dead_letter_topic.clone().unwrap_or_default(),
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
            (0, 0, 0, 0)
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
        let c = group_config(&g).expect("converts");
        assert_eq!(c.topic, "orders");
        assert_eq!(c.r#type, pb::GroupType::Shared as i32);
        assert_eq!(c.ack_wait_ms, 45_000);
        assert_eq!(c.max_deliveries, 5);
    }
}
