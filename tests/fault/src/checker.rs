//! The checker: [`check`] reads a [`History`] and reports every violation of the invariants
//! listed in the crate documentation.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::history::{AdminKind, AdminOp, GroupEvent, History, Outcome, Produce};

/// One broken invariant, with what shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Violation {
    /// An acknowledged record missing from a replica after healing.
    Lost {
        /// Replica name.
        replica: String,
        /// Partition.
        partition: u32,
        /// The acknowledged offset.
        offset: u64,
    },
    /// A replica holds other bytes at an acknowledged record's offset.
    Changed {
        /// Replica name.
        replica: String,
        /// Partition.
        partition: u32,
        /// The acknowledged offset.
        offset: u64,
    },
    /// A produced value stored at more than one offset.
    Duplicated {
        /// Partition.
        partition: u32,
        /// Every offset it is at.
        offsets: Vec<u64>,
    },
    /// Two different records served or stored at one offset.
    Divergent {
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
        /// Who showed the first one, and who the other.
        sources: (String, String),
    },
    /// A producer's acknowledged records of one key at offsets out of their sequence order.
    Reordered {
        /// Producer.
        producer: u32,
        /// Key.
        key: String,
        /// Partition.
        partition: u32,
        /// The earlier record's sequence and offset.
        earlier: (u64, u64),
        /// The later record's sequence and offset.
        later: (u64, u64),
    },
    /// A group's committed offset observed below an offset every record under which the
    /// group had acknowledged (acks answered, so stored) at least the window earlier.
    OffsetRegression {
        /// Group.
        group: String,
        /// Partition.
        partition: u32,
        /// The acknowledged floor it had reached (and when, ms).
        had: (u64, u64),
        /// The committed offset observed after it (and when, ms).
        then: (u64, u64),
    },
    /// A record acked by a group delivered to it again later than the persistence window
    /// after the ack.
    RedeliveredAfterAck {
        /// Group.
        group: String,
        /// Partition.
        partition: u32,
        /// Offset.
        offset: u64,
        /// When it was acked and delivered again (ms).
        acked_at_ms: u64,
        /// When it was delivered again (ms).
        delivered_at_ms: u64,
    },
    /// An acknowledged admin request whose effect the metadata does not show after healing
    /// (a created topic missing, or fewer partitions than a grow acknowledged), or a topic
    /// with partitions no request asked for.
    AdminLost {
        /// The request.
        op: AdminOp,
        /// The topic's partitions after healing (`None`: no such topic).
        found: Option<u32>,
    },
}

/// What [`check`] found: counts by kind (the nemesis's summary) and every violation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Records acknowledged.
    pub acknowledged: u64,
    /// Acknowledged records missing on some replica.
    pub lost: u64,
    /// Acknowledged records with other bytes on some replica.
    pub changed: u64,
    /// Values stored twice.
    pub duplicated: u64,
    /// Offsets seen with two records.
    pub divergent: u64,
    /// Per-key order violations.
    pub reordered: u64,
    /// Committed offsets that went back.
    pub offset_regressions: u64,
    /// Acked records delivered again too late.
    pub redelivered_after_ack: u64,
    /// Acknowledged admin requests without their effect.
    pub admin_lost: u64,
    /// Every violation.
    pub violations: Vec<Violation>,
}

impl Report {
    /// Whether no invariant was broken.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    fn add(&mut self, v: Violation) {
        match v {
            Violation::Lost { .. } => self.lost += 1,
            Violation::Changed { .. } => self.changed += 1,
            Violation::Duplicated { .. } => self.duplicated += 1,
            Violation::Divergent { .. } => self.divergent += 1,
            Violation::Reordered { .. } => self.reordered += 1,
            Violation::OffsetRegression { .. } => self.offset_regressions += 1,
            Violation::RedeliveredAfterAck { .. } => self.redelivered_after_ack += 1,
            Violation::AdminLost { .. } => self.admin_lost += 1,
        }
        self.violations.push(v);
    }
}

/// Checks `history`. `persist_window_ms` is how long a group's acks may take to be persisted
/// (its persistence tick and the commit of its cursors, `docs/replication.md`): a committed
/// offset may go back, and an acked record come again, only when a fault started within
/// that window after the ack (or the observation of the committed offset).
pub fn check(history: &History, persist_window_ms: u64) -> Report {
    let mut report = Report {
        acknowledged: history
            .produces
            .iter()
            .filter(|p| matches!(p.outcome, Outcome::Acked { .. }))
            .count() as u64,
        ..Report::default()
    };
    acknowledged_records(history, &mut report);
    duplicates(history, &mut report);
    divergence(history, &mut report);
    order(history, &mut report);
    groups(history, persist_window_ms, &mut report);
    admin(history, &mut report);
    report
}

/// Admin requests: each acknowledged one's effect is in the metadata after healing (a
/// created topic exists with at least the partitions asked for, a grown one has at least
/// what the grow asked for, unless a deletion of it was asked after; a deleted topic is
/// gone: topic names are never used again in a run), and no topic of the run has more
/// partitions than some request (acknowledged or not) asked for. Metadata changes are
/// committed in Raft's log before they are answered, so an acknowledged change is never
/// undone.
fn admin(history: &History, report: &mut Report) {
    // Per topic, the request asking for the most partitions.
    let mut most: BTreeMap<&str, &AdminOp> = BTreeMap::new();
    for (i, op) in history.admin.iter().enumerate() {
        let found = history.topics.get(&op.topic).copied();
        let deleted_after = history.admin[i + 1..]
            .iter()
            .any(|later| later.topic == op.topic && later.kind == AdminKind::Delete);
        let undone = match op.kind {
            AdminKind::Create | AdminKind::Grow => {
                !deleted_after && found.is_none_or(|n| n < op.partitions)
            }
            AdminKind::Delete => found.is_some(),
        };
        if op.acked && undone {
            report.add(Violation::AdminLost {
                op: op.clone(),
                found,
            });
        }
        let m = most.entry(op.topic.as_str()).or_insert(op);
        if op.partitions > m.partitions {
            *m = op;
        }
    }
    for (topic, op) in most {
        let found = history.topics.get(topic).copied();
        if found.is_some_and(|n| n > op.partitions) {
            report.add(Violation::AdminLost {
                op: op.clone(),
                found,
            });
        }
    }
}

/// Lost and changed: each acknowledged record on every replica, at its offset, same bytes.
fn acknowledged_records(history: &History, report: &mut Report) {
    for p in &history.produces {
        let Outcome::Acked { offset } = p.outcome else {
            continue;
        };
        for (replica, partitions) in &history.replicas {
            match partitions.get(&p.partition).and_then(|r| r.get(&offset)) {
                None => report.add(Violation::Lost {
                    replica: replica.clone(),
                    partition: p.partition,
                    offset,
                }),
                Some(v) if *v != p.value => report.add(Violation::Changed {
                    replica: replica.clone(),
                    partition: p.partition,
                    offset,
                }),
                Some(_) => {}
            }
        }
    }
}

/// Duplicated: a produced value at more than one offset of a replica.
fn duplicates(history: &History, report: &mut Report) {
    let produced: BTreeSet<&[u8]> = history
        .produces
        .iter()
        .map(|p| p.value.as_slice())
        .collect();
    let mut found: BTreeSet<(u32, Vec<u64>)> = BTreeSet::new();
    for partitions in history.replicas.values() {
        for (partition, records) in partitions {
            let mut at: BTreeMap<&[u8], Vec<u64>> = BTreeMap::new();
            for (offset, value) in records {
                if produced.contains(value.as_slice()) {
                    at.entry(value.as_slice()).or_default().push(*offset);
                }
            }
            for offsets in at.into_values().filter(|o| o.len() > 1) {
                found.insert((*partition, offsets));
            }
        }
    }
    for (partition, offsets) in found {
        report.add(Violation::Duplicated { partition, offsets });
    }
}

/// Divergent: every read and every replica agree on each offset's record.
fn divergence(history: &History, report: &mut Report) {
    let mut seen: BTreeMap<(u32, u64), (&[u8], &str)> = BTreeMap::new();
    let mut reported: BTreeSet<(u32, u64)> = BTreeSet::new();
    let replicas = history.replicas.iter().flat_map(|(name, partitions)| {
        partitions.iter().flat_map(move |(p, records)| {
            records
                .iter()
                .map(move |(o, v)| (name.as_str(), *p, *o, v.as_slice()))
        })
    });
    let reads = history
        .reads
        .iter()
        .map(|r| (r.source.as_str(), r.partition, r.offset, r.value.as_slice()));
    for (source, partition, offset, value) in reads.chain(replicas) {
        match seen.get(&(partition, offset)) {
            None => {
                seen.insert((partition, offset), (value, source));
            }
            Some((first, first_source)) if *first != value => {
                if reported.insert((partition, offset)) {
                    report.add(Violation::Divergent {
                        partition,
                        offset,
                        sources: ((*first_source).to_owned(), source.to_owned()),
                    });
                }
            }
            Some(_) => {}
        }
    }
}

/// Reordered: a producer's acknowledged records of one key, by sequence, at growing offsets.
fn order(history: &History, report: &mut Report) {
    let mut by_key: BTreeMap<(u32, &str, u32), Vec<&Produce>> = BTreeMap::new();
    for p in &history.produces {
        if matches!(p.outcome, Outcome::Acked { .. }) {
            by_key
                .entry((p.producer, p.key.as_str(), p.partition))
                .or_default()
                .push(p);
        }
    }
    for ((producer, key, partition), mut produces) in by_key {
        produces.sort_by_key(|p| p.sequence);
        for pair in produces.windows(2) {
            let (Outcome::Acked { offset: a }, Outcome::Acked { offset: b }) =
                (pair[0].outcome, pair[1].outcome)
            else {
                continue;
            };
            if b <= a {
                report.add(Violation::Reordered {
                    producer,
                    key: key.to_owned(),
                    partition,
                    earlier: (pair[0].sequence, a),
                    later: (pair[1].sequence, b),
                });
            }
        }
    }
}

/// Committed offsets and redeliveries of each group. An ack answered is stored (for a
/// replicated topic's group, committed in its coordinator partition's log), so:
///
/// - the committed offset observed at `t` is at least the acknowledged floor (the lowest
///   offset whose record the group has not acknowledged, counting from 0) as of
///   `t - window` (the window covers an observation answered before an ack but received
///   after it);
/// - a record acknowledged at `a` is delivered again after `a + window` only when a fault
///   started within `[a, a + window]` (a delivery made before the fault, received late).
fn groups(history: &History, window_ms: u64, report: &mut Report) {
    // Per (group, partition): offsets acked so far, and the floor's history (ms, floor).
    let mut acked_offsets: BTreeMap<(&str, u32), BTreeSet<u64>> = BTreeMap::new();
    let mut floors: BTreeMap<(&str, u32), Vec<(u64, u64)>> = BTreeMap::new();
    let mut acked: BTreeMap<(&str, u32, u64), u64> = BTreeMap::new();
    let mut events: Vec<&GroupEvent> = history.groups.iter().collect();
    events.sort_by_key(|e| e.at_ms());
    for e in events {
        match e {
            GroupEvent::Committed {
                group,
                partition,
                offset,
                at_ms,
            } => {
                let reached = floors
                    .get(&(group.as_str(), *partition))
                    .and_then(|f| {
                        f.iter()
                            .take_while(|(at, _)| at + window_ms <= *at_ms)
                            .last()
                    })
                    .copied();
                if let Some((at, floor)) = reached
                    && *offset < floor
                {
                    report.add(Violation::OffsetRegression {
                        group: group.clone(),
                        partition: *partition,
                        had: (floor, at),
                        then: (*offset, *at_ms),
                    });
                }
            }
            GroupEvent::Acked {
                group,
                partition,
                offset,
                at_ms,
            } => {
                acked
                    .entry((group.as_str(), *partition, *offset))
                    .or_insert(*at_ms);
                let key = (group.as_str(), *partition);
                let offsets = acked_offsets.entry(key).or_default();
                offsets.insert(*offset);
                let history = floors.entry(key).or_default();
                let mut floor = history.last().map_or(0, |(_, f)| *f);
                while offsets.contains(&floor) {
                    floor += 1;
                }
                if history.last().is_none_or(|(_, f)| *f < floor) {
                    history.push((*at_ms, floor));
                }
            }
            GroupEvent::Delivered {
                group,
                partition,
                offset,
                at_ms,
            } => {
                if let Some(acked_at) = acked.get(&(group.as_str(), *partition, *offset))
                    && acked_at + window_ms < *at_ms
                    && !history.fault_started_within(*acked_at, acked_at + window_ms)
                {
                    report.add(Violation::RedeliveredAfterAck {
                        group: group.clone(),
                        partition: *partition,
                        offset: *offset,
                        acked_at_ms: *acked_at,
                        delivered_at_ms: *at_ms,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Read;

    const WINDOW: u64 = 1000;

    fn produce(producer: u32, sequence: u64, key: &str, offset: Option<u64>) -> Produce {
        Produce {
            producer,
            sequence,
            key: key.into(),
            value: format!("p{producer}-{sequence}").into_bytes(),
            partition: 0,
            outcome: offset.map_or(Outcome::Unknown, |offset| Outcome::Acked { offset }),
        }
    }

    /// Two producers, four acknowledged records and one unknown outcome that was stored;
    /// three replicas agree; a group acks and commits in order.
    fn good() -> History {
        let produces = vec![
            produce(0, 0, "a", Some(0)),
            produce(1, 0, "b", Some(1)),
            produce(0, 1, "a", Some(2)),
            produce(1, 1, "b", None),
            produce(0, 2, "a", Some(4)),
        ];
        let records: Records = [
            (0, "p0-0"),
            (1, "p1-0"),
            (2, "p0-1"),
            (3, "p1-1"),
            (4, "p0-2"),
        ]
        .into_iter()
        .map(|(o, v)| (o, v.as_bytes().to_vec()))
        .collect();
        let replicas = ["b0", "b1", "b2"]
            .into_iter()
            .map(|r| (r.to_owned(), BTreeMap::from([(0, records.clone())])))
            .collect();
        let ev = |kind: &str, offset: u64, at_ms: u64| {
            let (group, partition) = ("g".to_owned(), 0);
            match kind {
                "delivered" => GroupEvent::Delivered {
                    group,
                    partition,
                    offset,
                    at_ms,
                },
                "acked" => GroupEvent::Acked {
                    group,
                    partition,
                    offset,
                    at_ms,
                },
                _ => GroupEvent::Committed {
                    group,
                    partition,
                    offset,
                    at_ms,
                },
            }
        };
        History {
            produces,
            reads: vec![Read {
                source: "member".into(),
                partition: 0,
                offset: 1,
                value: b"p1-0".to_vec(),
            }],
            replicas,
            groups: vec![
                ev("delivered", 0, 10),
                ev("acked", 0, 20),
                ev("committed", 1, 150),
                // Delivered again within the window (a coordinator change): allowed.
                ev("delivered", 0, 400),
                ev("committed", 1, 500),
                ev("committed", 3, 3000),
            ],
            admin: vec![
                admin_op("t", AdminKind::Create, 1, true),
                admin_op("t", AdminKind::Grow, 2, true),
                // Not acknowledged, and it did not happen: allowed.
                admin_op("t", AdminKind::Grow, 3, false),
                // Not acknowledged, and it happened: allowed.
                admin_op("u", AdminKind::Create, 1, false),
                // Created, then deleted (acknowledged).
                admin_op("v", AdminKind::Create, 1, true),
                admin_op("v", AdminKind::Delete, 0, true),
            ],
            topics: BTreeMap::from([("t".to_owned(), 2), ("u".to_owned(), 1)]),
            faults: vec![(6000, 8000)],
        }
    }

    fn admin_op(topic: &str, kind: AdminKind, partitions: u32, acked: bool) -> AdminOp {
        AdminOp {
            topic: topic.into(),
            kind,
            partitions,
            acked,
        }
    }

    type Records = crate::history::Records;

    #[test]
    fn a_good_history_passes() {
        let report = check(&good(), WINDOW);
        assert!(report.ok(), "{:?}", report.violations);
        assert_eq!(report.acknowledged, 4);
    }

    #[test]
    fn a_lost_acknowledged_record_is_caught() {
        let mut h = good();
        h.replicas
            .get_mut("b2")
            .and_then(|p| p.get_mut(&0))
            .map(|r| r.remove(&2));
        let report = check(&h, WINDOW);
        assert_eq!(report.lost, 1, "{:?}", report.violations);
        assert_eq!(
            report.violations,
            vec![Violation::Lost {
                replica: "b2".into(),
                partition: 0,
                offset: 2
            }]
        );
    }

    #[test]
    fn a_changed_record_is_caught() {
        let mut h = good();
        if let Some(r) = h.replicas.get_mut("b1").and_then(|p| p.get_mut(&0)) {
            r.insert(4, b"p0-2 but flipped".to_vec());
        }
        let report = check(&h, WINDOW);
        assert_eq!(report.changed, 1, "{:?}", report.violations);
        assert_eq!(report.divergent, 1, "the replicas disagree at offset 4 too");
    }

    #[test]
    fn a_duplicate_is_caught_even_of_an_unknown_outcome() {
        let mut h = good();
        for partitions in h.replicas.values_mut() {
            if let Some(r) = partitions.get_mut(&0) {
                r.insert(5, b"p1-1".to_vec());
            }
        }
        let report = check(&h, WINDOW);
        assert_eq!(report.duplicated, 1, "{:?}", report.violations);
        assert_eq!(
            report.violations,
            vec![Violation::Duplicated {
                partition: 0,
                offsets: vec![3, 5]
            }]
        );
    }

    #[test]
    fn two_records_served_at_one_offset_are_caught() {
        let mut h = good();
        h.reads.push(Read {
            source: "deposed leader".into(),
            partition: 0,
            offset: 3,
            value: b"something else".to_vec(),
        });
        let report = check(&h, WINDOW);
        assert_eq!(report.divergent, 1, "{:?}", report.violations);
    }

    #[test]
    fn a_reorder_within_a_key_is_caught() {
        let mut h = good();
        // The producer's third record of key "a" acknowledged below its second.
        h.produces[4].outcome = Outcome::Acked { offset: 1 };
        h.produces[1].outcome = Outcome::Refused;
        for partitions in h.replicas.values_mut() {
            if let Some(r) = partitions.get_mut(&0) {
                r.insert(1, b"p0-2".to_vec());
                r.remove(&4);
            }
        }
        let report = check(&h, WINDOW);
        assert_eq!(report.reordered, 1, "{:?}", report.violations);
        assert!(report.violations.contains(&Violation::Reordered {
            producer: 0,
            key: "a".into(),
            partition: 0,
            earlier: (1, 2),
            later: (2, 1),
        }));
    }

    #[test]
    fn a_committed_offset_going_back_past_the_window_is_caught() {
        let ev = |kind: &str, offset: u64, at_ms: u64| {
            let (group, partition) = ("g".to_owned(), 0);
            if kind == "acked" {
                GroupEvent::Acked {
                    group,
                    partition,
                    offset,
                    at_ms,
                }
            } else {
                GroupEvent::Committed {
                    group,
                    partition,
                    offset,
                    at_ms,
                }
            }
        };
        // Offsets 0 (at 20), 1 and 2 (at 2000) acknowledged: the floor is 3 from 2000.
        let mut h = good();
        h.groups
            .extend([ev("acked", 2, 2000), ev("acked", 1, 2000)]);
        h.groups.push(ev("committed", 1, 5000));
        let report = check(&h, WINDOW);
        assert_eq!(report.offset_regressions, 1, "{:?}", report.violations);
        assert!(
            matches!(
                report.violations[0],
                Violation::OffsetRegression {
                    had: (3, 2000),
                    then: (1, 5000),
                    ..
                }
            ),
            "{:?}",
            report.violations
        );
        // Observed within the window after the acks: allowed (answered before them).
        let mut h = good();
        h.groups
            .extend([ev("acked", 2, 2000), ev("acked", 1, 2000)]);
        h.groups.push(ev("committed", 1, 2500));
        let report = check(&h, WINDOW);
        assert!(report.ok(), "{:?}", report.violations);
        // An observed committed offset going back with no acknowledged ack under it (acks
        // taken but never answered, lost with the coordinator): allowed.
        let mut h = good();
        h.groups
            .extend([ev("committed", 9, 2000), ev("committed", 1, 5000)]);
        let report = check(&h, WINDOW);
        assert!(report.ok(), "{:?}", report.violations);
    }

    #[test]
    fn an_acked_record_delivered_again_after_the_window_is_caught() {
        let mut h = good();
        h.groups.push(GroupEvent::Delivered {
            group: "g".into(),
            partition: 0,
            offset: 0,
            at_ms: 2000,
        });
        let report = check(&h, WINDOW);
        assert_eq!(report.redelivered_after_ack, 1, "{:?}", report.violations);
    }

    #[test]
    fn an_ack_a_fault_interrupted_before_it_was_persisted_may_come_again() {
        let mut h = good();
        // Acked at 20; a fault (the coordinator paused, say) at 500, within the window.
        h.faults.push((500, 3000));
        h.groups.push(GroupEvent::Delivered {
            group: "g".into(),
            partition: 0,
            offset: 0,
            at_ms: 2000,
        });
        let report = check(&h, WINDOW);
        assert!(report.ok(), "{:?}", report.violations);
        // A fault after the window excuses nothing.
        let mut h = good();
        h.faults.push((1500, 3000));
        h.groups.push(GroupEvent::Delivered {
            group: "g".into(),
            partition: 0,
            offset: 0,
            at_ms: 2000,
        });
        let report = check(&h, WINDOW);
        assert_eq!(report.redelivered_after_ack, 1, "{:?}", report.violations);
    }

    #[test]
    fn an_acknowledged_topic_creation_missing_after_healing_is_caught() {
        let mut h = good();
        h.topics.remove("t");
        let report = check(&h, WINDOW);
        // Its creation and its grow.
        assert_eq!(report.admin_lost, 2, "{:?}", report.violations);
    }

    #[test]
    fn an_acknowledged_grow_undone_is_caught() {
        let mut h = good();
        h.topics.insert("t".into(), 1);
        let report = check(&h, WINDOW);
        assert_eq!(report.admin_lost, 1, "{:?}", report.violations);
    }

    #[test]
    fn an_acknowledged_deletion_undone_is_caught() {
        let mut h = good();
        h.topics.insert("v".into(), 1);
        let report = check(&h, WINDOW);
        assert_eq!(report.admin_lost, 1, "{:?}", report.violations);
    }

    #[test]
    fn partitions_no_request_asked_for_are_caught() {
        let mut h = good();
        h.topics.insert("u".into(), 4);
        let report = check(&h, WINDOW);
        assert_eq!(report.admin_lost, 1, "{:?}", report.violations);
    }

    #[test]
    fn a_history_round_trips_through_json() {
        let h = good();
        let json = serde_json::to_string(&h).expect("encodes");
        let back: History = serde_json::from_str(&json).expect("decodes");
        assert_eq!(check(&back, WINDOW), check(&h, WINDOW));
    }
}
