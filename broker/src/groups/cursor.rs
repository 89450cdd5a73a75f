//! Delivery state of one group on one partition: which offsets were delivered, to whom,
//! how often, which are acked, and which wait for redelivery.
//!
//! Pure bookkeeping: no I/O, no clock of its own (callers pass `now`), so every rule is unit
//! tested here. The committed offset is the ack floor: every offset below it is acked (or
//! dead-lettered), as Kafka's committed offset and NATS JetStream's ack floor.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

/// Identifies a member inside a group.
pub type MemberId = String;

/// A delivered, not yet acked offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Member holding it (shared by the deliveries of one take: no allocation per message).
    pub member: std::sync::Arc<str>,
    /// When it is redelivered if not acked.
    pub deadline: Instant,
}

/// Why an ack or nack was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The offset is not delivered-and-unacked (never delivered, already acked, or waiting
    /// for redelivery).
    #[error(
        "offset {0} has no pending delivery (never delivered, already acked, or expired and waiting for redelivery)"
    )]
    NotPending(u64),
    /// Another member holds the delivery.
    #[error("offset {offset} is held by member {holder}, not by this member")]
    OtherMember {
        /// The offset.
        offset: u64,
        /// Member holding it.
        holder: MemberId,
    },
}

/// Delivery state of one partition for one group.
#[derive(Debug, Clone, Default)]
pub struct Cursor {
    /// Every offset below is acked.
    floor: u64,
    /// First offset never delivered.
    next: u64,
    /// Acked offsets at or above the floor.
    acked: BTreeSet<u64>,
    /// Delivered and unacked.
    pending: BTreeMap<u64, Pending>,
    /// Waiting for redelivery: offset → when it becomes due.
    redeliver: BTreeMap<u64, Instant>,
    /// Deliveries so far of offsets not yet acked.
    counts: BTreeMap<u64, u32>,
    /// Last error text given with a nack, per offset.
    errors: BTreeMap<u64, String>,
}

impl Cursor {
    /// A cursor whose floor and next offset are `start`.
    pub fn at(start: u64) -> Self {
        Self {
            floor: start,
            next: start,
            ..Self::default()
        }
    }

    /// Restores a cursor from its stored form: the floor, acked offsets above it and
    /// delivery counts of unacked offsets. Offsets not acked above the floor are delivered
    /// again (at-least-once).
    pub fn restore(
        floor: u64,
        acked: impl IntoIterator<Item = u64>,
        counts: impl IntoIterator<Item = (u64, u32)>,
    ) -> Self {
        let mut c = Self::at(floor);
        c.acked = acked.into_iter().filter(|o| *o >= floor).collect();
        c.counts = counts.into_iter().filter(|(o, _)| *o >= floor).collect();
        c.advance_floor();
        c
    }

    /// The ack floor (committed offset).
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Acked offsets above the floor.
    pub fn acked(&self) -> impl Iterator<Item = u64> + '_ {
        self.acked.iter().copied()
    }

    /// Delivery counts of offsets not yet acked.
    pub fn counts(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.counts.iter().map(|(o, c)| (*o, *c))
    }

    /// Number of deliveries not yet acked.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Pending deliveries held by `member`.
    pub fn pending_of(&self, member: &str) -> usize {
        self.pending
            .values()
            .filter(|p| &*p.member == member)
            .count()
    }

    /// Records not yet acked up to `end` (the partition's next offset).
    pub fn lag(&self, end: u64) -> u64 {
        end.saturating_sub(self.floor)
            .saturating_sub(self.acked.len() as u64)
    }

    /// Deliveries so far of `offset` (0 if never delivered or acked).
    pub fn count(&self, offset: u64) -> u32 {
        self.counts.get(&offset).copied().unwrap_or(0)
    }

    /// Last nack error of `offset`.
    pub fn last_error(&self, offset: u64) -> Option<&str> {
        self.errors.get(&offset).map(String::as_str)
    }

    /// Moves the floor up to `earliest` when the log no longer holds older records.
    /// Returns how many never-acked offsets were skipped.
    pub fn clamp_to(&mut self, earliest: u64) -> u64 {
        if self.floor >= earliest {
            return 0;
        }
        let skipped = self.lag(earliest);
        self.floor = earliest;
        self.next = self.next.max(earliest);
        self.acked = self.acked.split_off(&earliest);
        self.pending = self.pending.split_off(&earliest);
        self.redeliver = self.redeliver.split_off(&earliest);
        self.counts = self.counts.split_off(&earliest);
        self.errors = self.errors.split_off(&earliest);
        skipped
    }

    /// Takes up to `limit` offsets for `member`: first redeliveries that are due at `now`,
    /// then new offsets below `end`. Each becomes pending until `now + ack_wait` and its
    /// delivery count goes up. Returns `(offset, delivery count)` in offset order within
    /// each kind.
    pub fn take(
        &mut self,
        member: &str,
        limit: usize,
        end: u64,
        now: Instant,
        ack_wait: Duration,
    ) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        let due: Vec<u64> = self
            .redeliver
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(o, _)| *o)
            .take(limit)
            .collect();
        for o in due {
            self.redeliver.remove(&o);
            out.push(o);
        }
        while out.len() < limit && self.next < end {
            if !self.acked.contains(&self.next) {
                out.push(self.next);
            }
            self.next += 1;
        }
        let holder: std::sync::Arc<str> = std::sync::Arc::from(member);
        out.into_iter()
            .map(|o| {
                let count = self.counts.entry(o).or_insert(0);
                *count += 1;
                self.pending.insert(
                    o,
                    Pending {
                        member: std::sync::Arc::clone(&holder),
                        deadline: now + ack_wait,
                    },
                );
                (o, *count)
            })
            .collect()
    }

    /// Whether a redelivery is due at `now` or a new offset is below `end`.
    pub fn has_work(&self, end: u64, now: Instant) -> bool {
        self.next < end || self.redeliver.values().any(|t| *t <= now)
    }

    /// Earliest time a waiting redelivery becomes due.
    pub fn next_due(&self) -> Option<Instant> {
        self.redeliver.values().min().copied()
    }

    fn check(&self, offset: u64, member: &str) -> Result<(), AckError> {
        match self.pending.get(&offset) {
            None => Err(AckError::NotPending(offset)),
            Some(p) if &*p.member != member => Err(AckError::OtherMember {
                offset,
                holder: p.member.to_string(),
            }),
            Some(_) => Ok(()),
        }
    }

    /// Checks that `member` holds `offset` without changing anything.
    pub fn can_ack(&self, offset: u64, member: &str) -> Result<(), AckError> {
        self.check(offset, member)
    }

    /// Acks `offset` held by `member`; the floor advances over contiguous acks.
    pub fn ack(&mut self, offset: u64, member: &str) -> Result<(), AckError> {
        self.check(offset, member)?;
        self.settle(offset);
        Ok(())
    }

    /// Marks `offset` done whatever its state (used after dead-lettering).
    pub fn settle(&mut self, offset: u64) {
        self.pending.remove(&offset);
        self.redeliver.remove(&offset);
        self.counts.remove(&offset);
        self.errors.remove(&offset);
        if offset == self.floor {
            // The common case, acks in offset order: the floor moves without touching the
            // set of acks above it.
            self.floor += 1;
        } else if offset > self.floor {
            self.acked.insert(offset);
        }
        self.advance_floor();
    }

    /// Negatively acks `offset` held by `member`: it is redelivered at `due`. Returns its
    /// delivery count so far.
    pub fn nack(
        &mut self,
        offset: u64,
        member: &str,
        due: Instant,
        error: &str,
    ) -> Result<u32, AckError> {
        self.check(offset, member)?;
        self.pending.remove(&offset);
        self.redeliver.insert(offset, due);
        if !error.is_empty() {
            self.errors.insert(offset, error.to_owned());
        }
        Ok(self.count(offset))
    }

    /// Moves every pending delivery whose deadline passed at `now` to redelivery (due now);
    /// returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(o, _)| *o)
            .collect();
        for o in &expired {
            self.pending.remove(o);
            self.redeliver.insert(*o, now);
        }
        expired
    }

    /// Moves every pending delivery of `member` to redelivery (due `now`), as Pulsar does
    /// when a consumer of a Shared subscription disconnects.
    pub fn release(&mut self, member: &str, now: Instant) -> usize {
        let held: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| &*p.member == member)
            .map(|(o, _)| *o)
            .collect();
        for o in &held {
            self.pending.remove(o);
            self.redeliver.insert(*o, now);
        }
        held.len()
    }

    /// Offsets waiting for redelivery whose delivery count reached `max` (dead-letter
    /// candidates).
    pub fn exhausted(&self, max: u32) -> Vec<u64> {
        if max == 0 {
            return Vec::new();
        }
        self.redeliver
            .keys()
            .filter(|o| self.count(**o) >= max)
            .copied()
            .collect()
    }

    /// Takes the given waiting redeliveries out of circulation for `holder` (the
    /// dead-letter step) until they are settled or released.
    pub fn hold(&mut self, offsets: &[u64], holder: &str, now: Instant, wait: Duration) {
        for o in offsets {
            if self.redeliver.remove(o).is_some() {
                self.pending.insert(
                    *o,
                    Pending {
                        member: std::sync::Arc::from(holder),
                        deadline: now + wait,
                    },
                );
            }
        }
    }

    /// Offsets pending for `member`, in order.
    pub fn held_by(&self, member: &str) -> Vec<u64> {
        self.pending
            .iter()
            .filter(|(_, p)| &*p.member == member)
            .map(|(o, _)| *o)
            .collect()
    }

    /// Ordered groups: forget every delivery and restart from the floor (a new owner, or a
    /// nack, which rewinds the partition as a Kafka seek does).
    pub fn rewind_to_floor(&mut self) {
        self.next = self.floor;
        self.pending.clear();
        self.redeliver.clear();
        self.acked.clear();
    }

    /// Ordered groups: rewind to `offset` (≥ floor): deliveries at and after it are
    /// forgotten and will be made again in order.
    pub fn rewind_to(&mut self, offset: u64) {
        let offset = offset.max(self.floor);
        self.next = self.next.min(offset);
        let _ = self.pending.split_off(&offset);
        let _ = self.redeliver.split_off(&offset);
        let _ = self.acked.split_off(&offset);
    }

    /// Moves floor and next to `to`, forgetting every delivery (offset reset).
    pub fn reset(&mut self, to: u64) {
        *self = Self::at(to);
    }

    fn advance_floor(&mut self) {
        while self.acked.remove(&self.floor) {
            self.floor += 1;
        }
        self.next = self.next.max(self.floor);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_in_order_move_the_floor_and_acks_above_a_gap_wait_for_it() {
        let now = Instant::now();
        let mut c = Cursor::at(10);
        let taken = c.take("m", 5, 100, now, Duration::from_secs(30));
        assert_eq!(
            taken.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![10, 11, 12, 13, 14]
        );
        c.ack(10, "m").expect("ack");
        c.ack(11, "m").expect("ack");
        assert_eq!(
            (c.floor(), c.acked().count()),
            (12, 0),
            "in-order acks are not stored"
        );
        c.ack(14, "m").expect("ack");
        assert_eq!((c.floor(), c.acked().collect::<Vec<_>>()), (12, vec![14]));
        c.ack(12, "m").expect("ack");
        assert_eq!(c.floor(), 13);
        c.ack(13, "m").expect("ack");
        assert_eq!(
            (c.floor(), c.acked().count()),
            (15, 0),
            "the gap closed over 14"
        );
        assert_eq!(c.lag(100), 85);
        assert!(matches!(c.ack(13, "m"), Err(AckError::NotPending(13))));
    }

    const WAIT: Duration = Duration::from_secs(30);

    #[test]
    fn floor_advances_only_over_contiguous_acks() {
        let now = Instant::now();
        let mut c = Cursor::at(10);
        let got = c.take("a", 3, 100, now, WAIT);
        assert_eq!(got, vec![(10, 1), (11, 1), (12, 1)]);
        c.ack(11, "a").expect("ack");
        assert_eq!(c.floor(), 10);
        assert_eq!(c.lag(100), 89);
        c.ack(10, "a").expect("ack");
        assert_eq!(c.floor(), 12);
        c.ack(12, "a").expect("ack");
        assert_eq!(c.floor(), 13);
        assert_eq!(c.lag(100), 87);
    }

    #[test]
    fn ack_of_unknown_acked_or_foreign_delivery_is_refused_without_change() {
        let now = Instant::now();
        let mut c = Cursor::at(0);
        c.take("a", 2, 10, now, WAIT);
        assert_eq!(c.ack(5, "a"), Err(AckError::NotPending(5)));
        assert!(matches!(c.ack(0, "b"), Err(AckError::OtherMember { .. })));
        c.ack(0, "a").expect("ack");
        assert_eq!(c.ack(0, "a"), Err(AckError::NotPending(0)));
        assert_eq!(c.floor(), 1);
        assert_eq!(c.pending_len(), 1);
    }

    #[test]
    fn expired_and_nacked_deliveries_come_back_first_with_higher_counts() {
        let now = Instant::now();
        let mut c = Cursor::at(0);
        c.take("a", 3, 10, now, WAIT);
        assert!(c.expire(now + WAIT / 2).is_empty());
        assert_eq!(c.expire(now + WAIT), vec![0, 1, 2]);
        c.take("b", 1, 10, now + WAIT, WAIT);
        c.nack(0, "b", now + WAIT, "boom").expect("nack");
        let again = c.take("b", 2, 10, now + WAIT, WAIT);
        assert_eq!(again, vec![(0, 3), (1, 2)]);
        assert_eq!(c.last_error(0), Some("boom"));
    }

    #[test]
    fn delayed_nack_waits_until_due() {
        let now = Instant::now();
        let mut c = Cursor::at(0);
        c.take("a", 1, 1, now, WAIT);
        c.nack(0, "a", now + Duration::from_secs(5), "")
            .expect("nack");
        assert!(c.take("a", 1, 1, now, WAIT).is_empty());
        assert!(!c.has_work(1, now));
        assert_eq!(
            c.take("a", 1, 1, now + Duration::from_secs(5), WAIT),
            vec![(0, 2)]
        );
    }

    #[test]
    fn release_hands_a_members_deliveries_back() {
        let now = Instant::now();
        let mut c = Cursor::at(0);
        c.take("a", 2, 10, now, WAIT);
        c.take("b", 1, 10, now, WAIT);
        assert_eq!(c.release("a", now), 2);
        assert_eq!(c.pending_of("b"), 1);
        assert_eq!(c.take("b", 5, 3, now, WAIT), vec![(0, 2), (1, 2)]);
    }

    #[test]
    fn exhausted_lists_messages_at_max_deliveries() {
        let now = Instant::now();
        let mut c = Cursor::at(0);
        for _ in 0..3 {
            c.take("a", 1, 1, now, WAIT);
            c.nack(0, "a", now, "bad").expect("nack");
        }
        assert_eq!(c.exhausted(3), vec![0]);
        assert!(c.exhausted(4).is_empty());
        assert!(c.exhausted(0).is_empty());
        c.settle(0);
        assert_eq!(c.floor(), 1);
        assert_eq!(c.count(0), 0);
    }

    #[test]
    fn restore_keeps_acks_and_counts_and_redelivers_the_rest() {
        let c = Cursor::restore(5, [7, 5, 3], [(6, 2), (1, 9)]);
        assert_eq!(c.floor(), 6);
        assert_eq!(c.acked().collect::<Vec<_>>(), vec![7]);
        assert_eq!(c.count(6), 2);
        assert_eq!(c.count(1), 0);
        let mut c = c;
        assert_eq!(
            c.take("a", 3, 10, Instant::now(), WAIT),
            vec![(6, 3), (8, 1), (9, 1)]
        );
    }

    #[test]
    fn clamp_skips_deleted_offsets_and_reports_them() {
        let mut c = Cursor::at(0);
        c.take("a", 2, 10, Instant::now(), WAIT);
        assert_eq!(c.clamp_to(4), 4);
        assert_eq!(c.floor(), 4);
        assert_eq!(c.pending_len(), 0);
        assert_eq!(c.clamp_to(2), 0);
    }

    #[test]
    fn rewind_redelivers_in_order() {
        let now = Instant::now();
        let mut c = Cursor::at(0);
        c.take("a", 5, 10, now, WAIT);
        c.ack(0, "a").expect("ack");
        c.rewind_to(2);
        let again: Vec<u64> = c
            .take("a", 10, 10, now, WAIT)
            .into_iter()
            .map(|(o, _)| o)
            .collect();
        assert_eq!(again, vec![2, 3, 4, 5, 6, 7, 8, 9]);
        c.rewind_to_floor();
        assert_eq!(c.take("a", 1, 10, now, WAIT)[0].0, 1);
    }
}
