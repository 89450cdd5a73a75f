//! Delivery state of one group on one partition: which offsets were delivered, to whom,
//! how often, which are acked, and which wait for redelivery.
//!
//! Pure bookkeeping: no I/O, no clock of its own (callers pass `now`), so every rule is unit
//! tested here. The committed offset is the ack floor: every offset below it is acked (or
//! dead-lettered), as Kafka's committed offset and NATS JetStream's ack floor.
//!
//! The common case costs nothing per message: deliveries taken together are one pending
//! *run* of consecutive offsets, an ack of a range settles whole runs, and a delivery count
//! is stored only once it passes 1 (an offset below `next` that is neither acked nor listed
//! was delivered once). Pulsar keeps individual acks as ranges for the same reason.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

/// Identifies a member inside a group.
pub type MemberId = String;

/// Consecutive offsets delivered together and not yet acked.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    /// One past the last offset of the run.
    end: u64,
    /// Member holding them (shared by the runs of one take: no allocation per message).
    member: Arc<str>,
    /// When they are redelivered if not acked.
    deadline: Instant,
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
    /// Delivered and unacked, as runs: first offset → run. Runs never overlap.
    pending: BTreeMap<u64, Run>,
    /// Waiting for redelivery: offset → when it becomes due.
    redeliver: BTreeMap<u64, Instant>,
    /// Deliveries so far of unacked offsets, where that is not the default: an offset in
    /// `[floor, next)` that is not acked was delivered once, any other offset never.
    counts: BTreeMap<u64, u32>,
    /// Last error text given with a nack, per offset.
    errors: BTreeMap<u64, String>,
}

/// Removes the keys of `map` in `from..=to` (cheap when the map is empty, the usual case).
fn remove_range<V>(map: &mut BTreeMap<u64, V>, from: u64, to: u64) {
    if map.is_empty() || from > to {
        return;
    }
    let keys: Vec<u64> = map.range(from..=to).map(|(k, _)| *k).collect();
    for k in keys {
        map.remove(&k);
    }
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
        c.counts = counts
            .into_iter()
            .filter(|(o, n)| *o >= floor && *n > 0)
            .collect();
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

    /// Delivery counts of unacked offsets delivered more than once, or of offsets at or
    /// above `next` delivered before a rewind or restart; see [`Cursor::delivered_once`]
    /// for the rest.
    pub fn counts(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.counts.iter().map(|(o, c)| (*o, *c))
    }

    /// Unacked offsets delivered (at least) once, as half-open ranges `[from, to)` in
    /// order; together with [`Cursor::counts`] (which wins where both name an offset) the
    /// delivery count of every unacked offset.
    pub fn delivered_once(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let singles = self.redeliver.keys().map(|o| (*o, *o + 1));
        let mut all: Vec<(u64, u64)> = self
            .pending
            .iter()
            .map(|(s, r)| (*s, r.end))
            .chain(singles)
            .collect();
        all.sort_unstable();
        for (from, to) in all {
            match out.last_mut() {
                Some(last) if last.1 == from => last.1 = to,
                _ => out.push((from, to)),
            }
        }
        out
    }

    /// Number of deliveries not yet acked.
    pub fn pending_len(&self) -> usize {
        self.pending
            .iter()
            .map(|(s, r)| usize::try_from(r.end - s).unwrap_or(usize::MAX))
            .sum()
    }

    /// Pending deliveries held by `member`.
    pub fn pending_of(&self, member: &str) -> usize {
        self.pending
            .iter()
            .filter(|(_, r)| &*r.member == member)
            .map(|(s, r)| usize::try_from(r.end - s).unwrap_or(usize::MAX))
            .sum()
    }

    /// Records not yet acked up to `end` (the partition's next offset).
    pub fn lag(&self, end: u64) -> u64 {
        end.saturating_sub(self.floor)
            .saturating_sub(self.acked.len() as u64)
    }

    /// Deliveries so far of `offset` (0 if never delivered or acked).
    pub fn count(&self, offset: u64) -> u32 {
        if let Some(c) = self.counts.get(&offset) {
            return *c;
        }
        u32::from(offset >= self.floor && offset < self.next && !self.acked.contains(&offset))
    }

    /// Last nack error of `offset`.
    pub fn last_error(&self, offset: u64) -> Option<&str> {
        self.errors.get(&offset).map(String::as_str)
    }

    /// Gives the offsets at or above `from` that were delivered (pending or waiting for
    /// redelivery) an explicit count, before `next` moves below them.
    fn pin_counts_from(&mut self, from: u64) {
        let delivered: Vec<u64> = self
            .pending
            .iter()
            .flat_map(|(s, r)| (*s).max(from)..r.end)
            .chain(self.redeliver.range(from..).map(|(o, _)| *o))
            .collect();
        for o in delivered {
            self.counts.entry(o).or_insert(1);
        }
    }

    /// Splits the pending run containing `at` (if it starts below `at`) so that a run
    /// starts at `at`.
    fn split_at(&mut self, at: u64) {
        let Some((_, run)) = self.pending.range_mut(..at).next_back() else {
            return;
        };
        if run.end <= at {
            return;
        }
        let tail = Run {
            end: run.end,
            member: Arc::clone(&run.member),
            deadline: run.deadline,
        };
        run.end = at;
        self.pending.insert(at, tail);
    }

    /// Removes the offsets `from..=to` from the pending runs.
    fn unpend(&mut self, from: u64, to: u64) {
        if self.pending.is_empty() {
            return;
        }
        self.split_at(from);
        self.split_at(to.saturating_add(1));
        let keys: Vec<u64> = self.pending.range(from..=to).map(|(k, _)| *k).collect();
        for k in keys {
            self.pending.remove(&k);
        }
    }

    /// Adds `offset..end` as pending for `member`, joined to the run before when that one
    /// ends at `offset` with the same holder and deadline.
    fn pend(&mut self, offset: u64, end: u64, member: &Arc<str>, deadline: Instant) {
        if let Some((_, prev)) = self.pending.range_mut(..offset).next_back()
            && prev.end == offset
            && Arc::ptr_eq(&prev.member, member)
            && prev.deadline == deadline
        {
            prev.end = end;
            return;
        }
        self.pending.insert(
            offset,
            Run {
                end,
                member: Arc::clone(member),
                deadline,
            },
        );
    }

    /// Every pending offset with the run holding it, in order.
    fn pending_offsets(&self) -> impl Iterator<Item = (u64, &Run)> + '_ {
        self.pending
            .iter()
            .flat_map(|(s, r)| (*s..r.end).map(move |o| (o, r)))
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
        self.split_at(earliest);
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
        let holder: Arc<str> = Arc::from(member);
        let deadline = now + ack_wait;
        let mut out = Vec::new();
        if !self.redeliver.is_empty() {
            let due: Vec<u64> = self
                .redeliver
                .iter()
                .filter(|(_, t)| **t <= now)
                .map(|(o, _)| *o)
                .take(limit)
                .collect();
            for o in due {
                self.redeliver.remove(&o);
                let count = self.count(o).saturating_add(1);
                self.counts.insert(o, count);
                self.pend(o, o + 1, &holder, deadline);
                out.push((o, count));
            }
        }
        while out.len() < limit && self.next < end {
            let o = self.next;
            let room = u64::try_from(limit - out.len()).unwrap_or(u64::MAX);
            let to = end.min(o.saturating_add(room));
            if self.acked.range(o..to).next().is_none() && self.counts.range(o..to).next().is_none()
            {
                // The common case: one run, every count 1.
                self.pend(o, to, &holder, deadline);
                out.extend((o..to).map(|x| (x, 1)));
                self.next = to;
                break;
            }
            self.next += 1;
            if self.acked.contains(&o) {
                continue;
            }
            let count = match self.counts.get_mut(&o) {
                Some(c) => {
                    *c = c.saturating_add(1);
                    *c
                }
                None => 1,
            };
            self.pend(o, o + 1, &holder, deadline);
            out.push((o, count));
        }
        out
    }

    /// Whether a redelivery is due at `now` or a new offset is below `end`.
    pub fn has_work(&self, end: u64, now: Instant) -> bool {
        self.next < end || self.redeliver.values().any(|t| *t <= now)
    }

    /// Earliest time a waiting redelivery becomes due.
    pub fn next_due(&self) -> Option<Instant> {
        self.redeliver.values().min().copied()
    }

    /// Checks that `member` holds `offset` without changing anything.
    pub fn can_ack(&self, offset: u64, member: &str) -> Result<(), AckError> {
        self.can_ack_range(offset, offset, member)
    }

    /// Checks that `member` holds every offset of `from..=to` without changing anything.
    pub fn can_ack_range(&self, from: u64, to: u64, member: &str) -> Result<(), AckError> {
        let mut o = from;
        while o <= to {
            let run = match self.pending.range(..=o).next_back() {
                Some((_, r)) if o < r.end => r,
                _ => return Err(AckError::NotPending(o)),
            };
            if &*run.member != member {
                return Err(AckError::OtherMember {
                    offset: o,
                    holder: run.member.to_string(),
                });
            }
            o = run.end;
        }
        Ok(())
    }

    /// Acks `offset` held by `member`; the floor advances over contiguous acks.
    pub fn ack(&mut self, offset: u64, member: &str) -> Result<(), AckError> {
        self.ack_range(offset, offset, member)
    }

    /// Acks every offset of `from..=to`, all held by `member`; if one is not, nothing
    /// changes.
    pub fn ack_range(&mut self, from: u64, to: u64, member: &str) -> Result<(), AckError> {
        self.can_ack_range(from, to, member)?;
        self.settle_range(from, to);
        Ok(())
    }

    /// Marks `offset` done whatever its state (used after dead-lettering).
    pub fn settle(&mut self, offset: u64) {
        self.settle_range(offset, offset);
    }

    /// Marks every offset of `from..=to` done whatever its state.
    pub fn settle_range(&mut self, from: u64, to: u64) {
        if from > to {
            return;
        }
        self.unpend(from, to);
        remove_range(&mut self.redeliver, from, to);
        remove_range(&mut self.counts, from, to);
        remove_range(&mut self.errors, from, to);
        if from <= self.floor && to >= self.floor {
            // The common case, acks in offset order: the floor moves without touching the
            // set of acks above it.
            self.floor = to + 1;
            if !self.acked.is_empty() {
                self.acked = self.acked.split_off(&self.floor);
            }
        } else if from > self.floor {
            self.acked.extend(from..=to);
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
        self.can_ack_range(offset, offset, member)?;
        self.unpend(offset, offset);
        self.redeliver.insert(offset, due);
        if !error.is_empty() {
            self.errors.insert(offset, error.to_owned());
        }
        Ok(self.count(offset))
    }

    /// Moves every pending delivery whose deadline passed at `now` to redelivery (due now);
    /// returns them.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        self.requeue(|r| r.deadline <= now, now)
    }

    /// Moves the pending runs `pick` chooses to redelivery (due `now`); returns their
    /// offsets.
    fn requeue(&mut self, pick: impl Fn(&Run) -> bool, now: Instant) -> Vec<u64> {
        let runs: Vec<(u64, u64)> = self
            .pending
            .iter()
            .filter(|(_, r)| pick(r))
            .map(|(s, r)| (*s, r.end))
            .collect();
        let mut offsets = Vec::new();
        for (start, end) in runs {
            self.pending.remove(&start);
            for o in start..end {
                self.redeliver.insert(o, now);
                offsets.push(o);
            }
        }
        offsets
    }

    /// Moves every pending delivery of `member` to redelivery (due `now`), as Pulsar does
    /// when a consumer of a Shared subscription disconnects.
    pub fn release(&mut self, member: &str, now: Instant) -> usize {
        self.requeue(|r| &*r.member == member, now).len()
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
        let holder: Arc<str> = Arc::from(holder);
        for o in offsets {
            if self.redeliver.remove(o).is_some() {
                self.pend(*o, *o + 1, &holder, now + wait);
            }
        }
    }

    /// Offsets pending for `member`, in order.
    pub fn held_by(&self, member: &str) -> Vec<u64> {
        self.pending_offsets()
            .filter(|(_, r)| &*r.member == member)
            .map(|(o, _)| o)
            .collect()
    }

    /// Ordered groups: forget every delivery and restart from the floor (a new owner, or a
    /// nack, which rewinds the partition as a Kafka seek does).
    pub fn rewind_to_floor(&mut self) {
        self.pin_counts_from(self.floor);
        self.next = self.floor;
        self.pending.clear();
        self.redeliver.clear();
        self.acked.clear();
    }

    /// Ordered groups: rewind to `offset` (≥ floor): deliveries at and after it are
    /// forgotten and will be made again in order.
    pub fn rewind_to(&mut self, offset: u64) {
        let offset = offset.max(self.floor);
        self.pin_counts_from(offset);
        self.next = self.next.min(offset);
        self.split_at(offset);
        let _ = self.pending.split_off(&offset);
        let _ = self.redeliver.split_off(&offset);
        let _ = self.acked.split_off(&offset);
    }

    /// Moves floor and next to `to`, forgetting every delivery (offset reset).
    pub fn reset(&mut self, to: u64) {
        *self = Self::at(to);
    }

    fn advance_floor(&mut self) {
        if !self.acked.is_empty() {
            while self.acked.remove(&self.floor) {
                self.floor += 1;
            }
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

    #[test]
    fn a_range_ack_settles_whole_runs_and_splits_partial_ones() {
        let now = Instant::now();
        let mut c = Cursor::at(0);
        c.take("a", 10, 100, now, WAIT);
        c.take("a", 10, 100, now + Duration::from_millis(1), WAIT);
        assert_eq!(c.pending_len(), 20);
        c.ack_range(0, 14, "a").expect("ack across two runs");
        assert_eq!((c.floor(), c.pending_len()), (15, 5));
        c.ack_range(17, 18, "a").expect("ack inside a run");
        assert_eq!(c.acked().collect::<Vec<_>>(), vec![17, 18]);
        assert_eq!(c.held_by("a"), vec![15, 16, 19]);
        assert_eq!(c.ack_range(15, 17, "a"), Err(AckError::NotPending(17)));
        assert_eq!(
            c.held_by("a"),
            vec![15, 16, 19],
            "a refused range changes nothing"
        );
        c.ack_range(15, 16, "a").expect("ack");
        assert_eq!((c.floor(), c.acked().count()), (19, 0));
        c.ack(19, "a").expect("ack");
        assert_eq!((c.floor(), c.pending_len(), c.lag(100)), (20, 0, 80));
    }

    #[test]
    fn a_range_over_another_members_deliveries_is_refused_without_change() {
        let now = Instant::now();
        let mut c = Cursor::at(0);
        c.take("a", 3, 10, now, WAIT);
        c.take("b", 3, 10, now, WAIT);
        assert!(matches!(
            c.ack_range(1, 4, "a"),
            Err(AckError::OtherMember { offset: 3, .. })
        ));
        assert_eq!((c.pending_of("a"), c.pending_of("b"), c.floor()), (3, 3, 0));
        c.ack_range(3, 5, "b").expect("b's run");
        assert_eq!(c.acked().collect::<Vec<_>>(), vec![3, 4, 5]);
        c.ack_range(0, 2, "a").expect("a's run");
        assert_eq!((c.floor(), c.acked().count()), (6, 0));
    }

    #[test]
    fn counts_survive_a_rewind_and_a_restore_without_one_entry_per_delivery() {
        let now = Instant::now();
        let mut c = Cursor::at(0);
        c.take("a", 4, 10, now, WAIT);
        assert_eq!(c.counts().count(), 0, "first deliveries are not listed");
        assert_eq!(c.count(2), 1);
        assert_eq!(c.delivered_once(), vec![(0, 4)]);
        c.rewind_to(2);
        assert_eq!(c.take("a", 3, 10, now, WAIT), vec![(2, 2), (3, 2), (4, 1)]);
        // Stored and restored as the group does: once-delivered ranges, then counts.
        let once: Vec<(u64, u32)> = c
            .delivered_once()
            .into_iter()
            .flat_map(|(f, t)| f..t)
            .map(|o| (o, 1))
            .collect();
        let mut r = Cursor::restore(c.floor(), c.acked(), once.into_iter().chain(c.counts()));
        assert_eq!(
            r.take("a", 6, 10, now, WAIT),
            vec![(0, 2), (1, 2), (2, 3), (3, 3), (4, 2), (5, 1)]
        );
    }
}
