//! Consumer group settings, descriptions and deliveries in domain terms.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Error, Record, pb, types::millis_u32};

/// How a group hands out messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupType {
    /// Each partition owned by one member at a time, delivered in offset order (Kafka
    /// consumer groups).
    Ordered,
    /// Any member gets any message, each acked on its own (a work queue).
    Shared,
}

/// Where a new group, or a reset, starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// The first stored record.
    #[default]
    Earliest,
    /// The next record produced.
    Latest,
    /// The first record at or after this time.
    Time(SystemTime),
}

impl From<StartFrom> for pb::StartPosition {
    fn from(s: StartFrom) -> Self {
        use pb::start_position::Position;
        Self {
            position: Some(match s {
                StartFrom::Earliest => Position::Earliest(true),
                StartFrom::Latest => Position::Latest(true),
                StartFrom::Time(t) => Position::TimestampMs(
                    t.duration_since(UNIX_EPOCH)
                        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
                ),
            }),
        }
    }
}

impl From<Option<pb::StartPosition>> for StartFrom {
    fn from(s: Option<pb::StartPosition>) -> Self {
        use pb::start_position::Position;
        match s.and_then(|s| s.position) {
            Some(Position::Latest(true)) => Self::Latest,
            Some(Position::TimestampMs(ms)) => {
                Self::Time(UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs()))
            }
            _ => Self::Earliest,
        }
    }
}

/// Settings of a group. `GroupConfig::new(topic, type)` and the `with_…` methods build one;
/// `None` leaves a setting at the broker's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// Topic the group reads.
    pub topic: String,
    /// Ordered or Shared.
    pub group_type: GroupType,
    /// Where a new group starts.
    pub start: StartFrom,
    /// Shared: redelivery after this long without an ack; `None`: 30 s.
    pub ack_wait: Option<Duration>,
    /// Shared: deliveries before a message goes to the dead-letter topic; `None`: never.
    pub max_deliveries: Option<u32>,
    /// Dead-letter topic; `None`: `<topic>-<group>-DLQ`.
    pub dead_letter_topic: Option<String>,
    /// Pull members not heard from for this long are removed; `None`: 10 s.
    pub session_timeout: Option<Duration>,
}

impl GroupConfig {
    /// A group of `group_type` reading `topic` from its earliest record.
    pub fn new(topic: impl Into<String>, group_type: GroupType) -> Self {
        Self {
            topic: topic.into(),
            group_type,
            start: StartFrom::Earliest,
            ack_wait: None,
            max_deliveries: None,
            dead_letter_topic: None,
            session_timeout: None,
        }
    }

    /// Starting at `start`.
    #[must_use]
    pub fn with_start(mut self, start: StartFrom) -> Self {
        self.start = start;
        self
    }

    /// Redelivering after `wait` without an ack.
    #[must_use]
    pub fn with_ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = Some(wait);
        self
    }

    /// Dead-lettering after `n` deliveries.
    #[must_use]
    pub fn with_max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = Some(n);
        self
    }

    /// Dead-lettering to `topic`.
    #[must_use]
    pub fn with_dead_letter_topic(mut self, topic: impl Into<String>) -> Self {
        self.dead_letter_topic = Some(topic.into());
        self
    }

    /// Removing pull members silent for `timeout`.
    #[must_use]
    pub fn with_session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = Some(timeout);
        self
    }
}

impl From<&GroupConfig> for pb::GroupConfig {
    fn from(c: &GroupConfig) -> Self {
        Self {
            topic: c.topic.clone(),
            r#type: match c.group_type {
                GroupType::Ordered => pb::GroupType::Ordered,
                GroupType::Shared => pb::GroupType::Shared,
            } as i32,
            start: Some(c.start.into()),
            ack_wait_ms: c.ack_wait.map_or(0, millis_u32),
            max_deliveries: c.max_deliveries.unwrap_or(0),
            dead_letter_topic: c.dead_letter_topic.clone().unwrap_or_default(),
            session_timeout_ms: c.session_timeout.map_or(0, millis_u32),
        }
    }
}

impl TryFrom<pb::GroupConfig> for GroupConfig {
    type Error = Error;

    fn try_from(c: pb::GroupConfig) -> Result<Self, Error> {
        let group_type = match pb::GroupType::try_from(c.r#type) {
            Ok(pb::GroupType::Ordered) => GroupType::Ordered,
            Ok(pb::GroupType::Shared) => GroupType::Shared,
            _ => return Err(Error::Malformed("GroupConfig.type")),
        };
        let ms = |v: u32| (v != 0).then(|| Duration::from_millis(u64::from(v)));
        Ok(Self {
            topic: c.topic,
            group_type,
            start: c.start.into(),
            ack_wait: ms(c.ack_wait_ms),
            max_deliveries: (c.max_deliveries != 0).then_some(c.max_deliveries),
            dead_letter_topic: (!c.dead_letter_topic.is_empty()).then_some(c.dead_letter_topic),
            session_timeout: ms(c.session_timeout_ms),
        })
    }
}

/// A member as `describe` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    /// Member id.
    pub id: String,
    /// Ordered: partitions it owns.
    pub partitions: Vec<u32>,
    /// Deliveries it holds unacked.
    pub pending: u64,
    /// Time since it was last heard from.
    pub idle: Duration,
}

/// A partition of a group as `describe` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPartitionInfo {
    /// Partition index.
    pub partition: u32,
    /// Committed offset (ack floor).
    pub committed_offset: u64,
    /// The partition's next offset.
    pub next_offset: u64,
    /// Records not yet acked.
    pub lag: u64,
    /// Deliveries not yet acked.
    pub pending: u64,
    /// Ordered: the member owning it.
    pub owner: Option<String>,
}

/// A group: settings, members and progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// Name.
    pub name: String,
    /// Settings, with the broker's defaults filled in.
    pub config: GroupConfig,
    /// Members in join order.
    pub members: Vec<MemberInfo>,
    /// Per partition.
    pub partitions: Vec<GroupPartitionInfo>,
    /// Records not yet acked, over all partitions.
    pub lag: u64,
    /// Deliveries not yet acked, over all partitions.
    pub pending: u64,
    /// Messages moved to the dead-letter topic.
    pub dead_lettered: u64,
    /// Membership changes so far.
    pub generation: u64,
}

impl TryFrom<pb::GroupDescription> for GroupInfo {
    type Error = Error;

    fn try_from(g: pb::GroupDescription) -> Result<Self, Error> {
        Ok(Self {
            name: g.name,
            config: g
                .config
                .ok_or(Error::Malformed("GroupDescription.config"))?
                .try_into()?,
            members: g
                .members
                .into_iter()
                .map(|m| MemberInfo {
                    id: m.member_id,
                    partitions: m.partitions,
                    pending: m.pending,
                    idle: Duration::from_millis(m.idle_ms),
                })
                .collect(),
            partitions: g
                .partitions
                .into_iter()
                .map(|p| GroupPartitionInfo {
                    partition: p.partition,
                    committed_offset: p.committed_offset,
                    next_offset: p.next_offset,
                    lag: p.lag,
                    pending: p.pending,
                    owner: (!p.owner.is_empty()).then_some(p.owner),
                })
                .collect(),
            lag: g.lag,
            pending: g.pending,
            dead_lettered: g.dead_lettered,
            generation: g.generation,
        })
    }
}

/// A message handed to a group member; ack or nack it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Partition index.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Deliveries of this message so far, this one included (1 the first time).
    pub delivery_count: u32,
    /// The record.
    pub record: Record,
    /// The [`crate::GroupConsumer`] join it came with (0 for pulled deliveries): an ack
    /// of a delivery from an earlier join is dropped, since that member is gone and the
    /// group delivers the message again.
    pub(crate) session: u64,
}

impl From<pb::Delivery> for Delivery {
    fn from(d: pb::Delivery) -> Self {
        Self {
            partition: d.partition,
            offset: d.offset,
            delivery_count: d.delivery_count,
            record: d.record.unwrap_or_default().into(),
            session: 0,
        }
    }
}

/// The offsets of `deliveries` as runs of consecutive offsets per partition (one range for
/// a whole in-order batch), in the order first seen: how acks go on the wire.
pub fn ranges(deliveries: &[Delivery]) -> Vec<pb::DeliveryRange> {
    let mut out: Vec<pb::DeliveryRange> = Vec::new();
    for d in deliveries {
        let joined = out
            .iter_mut()
            .rev()
            .find(|r| r.partition == d.partition)
            .is_some_and(|r| {
                if r.last_offset.checked_add(1) == Some(d.offset) {
                    r.last_offset = d.offset;
                    true
                } else {
                    false
                }
            });
        if !joined {
            out.push(pb::DeliveryRange {
                partition: d.partition,
                first_offset: d.offset,
                last_offset: d.offset,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(partition: u32, offset: u64) -> Delivery {
        Delivery {
            partition,
            offset,
            delivery_count: 1,
            record: Record::default(),
            session: 0,
        }
    }

    #[test]
    fn ranges_join_consecutive_offsets_per_partition() {
        let got = ranges(&[
            d(0, 5),
            d(1, 9),
            d(0, 6),
            d(0, 7),
            d(1, 10),
            d(0, 9),
            d(2, 0),
        ]);
        let r = |partition, first_offset, last_offset| pb::DeliveryRange {
            partition,
            first_offset,
            last_offset,
        };
        assert_eq!(got, vec![r(0, 5, 7), r(1, 9, 10), r(0, 9, 9), r(2, 0, 0)]);
        assert!(ranges(&[]).is_empty());
    }

    #[test]
    fn group_configs_round_trip_through_the_wire_form() {
        let c = GroupConfig::new("t", GroupType::Shared)
            .with_ack_wait(Duration::from_millis(1500))
            .with_max_deliveries(3)
            .with_start(StartFrom::Latest);
        let wire = pb::GroupConfig::from(&c);
        assert_eq!(wire.ack_wait_ms, 1500);
        assert_eq!(GroupConfig::try_from(wire).expect("valid"), c);
    }
}
