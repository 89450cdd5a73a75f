//! Delivery and acks: what a member gets when it pulls, and what its acks and nacks do.
//!
//! Ordered: a member takes only from partitions it owns, in offset order; a nack rewinds
//! the partition to that offset (a Kafka seek). Shared: any member takes from any
//! partition; a nack redelivers after its delay, and after `max_deliveries` the message is
//! held for the dead-letter topic ([`super::maintenance`] writes it there).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{log::StoredRecord, validate::InvalidConfig};

use super::{
    AckRange, Delivery, Error, Group, GroupType, OffsetRef, ReadError, cursor::Cursor, group::State,
};

/// An offset chosen for a member, before its record is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Claim {
    /// Partition index.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// Deliveries so far, this one included.
    pub count: u32,
}

/// Member that holds messages while they are written to the dead-letter topic.
pub(super) const DEAD_LETTER_HOLDER: &str = "~dead-letter";
/// Longest a message stays held for the dead-letter topic before it is redelivered (when
/// writing it there keeps failing).
pub(super) const DEAD_LETTER_HOLD: Duration = Duration::from_secs(60);

impl Group {
    /// Up to `max` deliveries for `member`, waiting up to `wait` for the first one.
    pub async fn pull(
        &self,
        member: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, Error> {
        if max == 0 {
            return Err(Error::PullNothing);
        }
        let deadline = Instant::now() + wait;
        let mut appends = self.topic.subscribe_appends();
        loop {
            self.check_open()?;
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            appends.borrow_and_update();
            let (claims, next_due) = self.take(member, max)?;
            if !claims.is_empty() {
                let out = self.read_deliveries(member, claims).await;
                if !out.is_empty() {
                    return Ok(out);
                }
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let mut sleep_until = deadline;
            if let Some(due) = next_due {
                sleep_until = sleep_until.min(due.max(now + Duration::from_millis(1)));
            }
            tokio::select! {
                () = &mut changed => {}
                _ = appends.changed() => {}
                () = tokio::time::sleep_until(sleep_until.into()) => {}
            }
        }
    }

    /// Chooses up to `max` offsets for `member` (which must be in the group), and the
    /// earliest time a waiting redelivery becomes due.
    fn take(&self, member: &str, max: usize) -> Result<(Vec<Claim>, Option<Instant>), Error> {
        let config = self.config();
        let parts = self.topic.partitions();
        let served = self.topic.config().served;
        let ends: Vec<Option<(u64, u64)>> = (0..parts.len())
            .map(|p| self.ends(&parts, served, p))
            .collect();
        let now = Instant::now();
        let ack_wait = Duration::from_millis(u64::from(config.ack_wait_ms));
        let mut st = self.state.lock();
        st.touch_member(&self.name, member)?;
        st.ensure_partitions(&parts, self.assignable(&parts, served));
        let n = st.cursors.len();
        let mut out = Vec::new();
        let start = st.round_robin;
        st.round_robin = st.round_robin.wrapping_add(1);
        for i in 0..n {
            if out.len() >= max {
                break;
            }
            let p = (start + i) % n;
            let allowed = match config.group_type {
                GroupType::Ordered => st.owns(member, p),
                GroupType::Shared => true,
            };
            if !allowed {
                continue;
            }
            // A partition whose leader was not heard from yet waits.
            let Some((earliest, end)) = ends.get(p).copied().flatten() else {
                continue;
            };
            let skipped = st.cursors[p].clamp_to(earliest);
            if skipped > 0 {
                self.report_skip(p, skipped);
            }
            let taken = st.cursors[p].take(member, max - out.len(), end, now, ack_wait);
            if !taken.is_empty() {
                st.dirty.insert(p);
            }
            out.extend(taken.into_iter().map(|(offset, count)| Claim {
                partition: p as u32,
                offset,
                count,
            }));
        }
        let next_due = st.cursors.iter().filter_map(Cursor::next_due).min();
        Ok((out, next_due))
    }

    /// Reads the records of `claims`, taken for `member`: from the log for partitions this
    /// broker serves, from their leaders for the others. Offsets that are gone (retention)
    /// or cannot be returned (damaged) are settled and logged, never delivered; claims whose
    /// leader could not be reached are handed out again (an Ordered partition rewinds to
    /// the first of them; a Shared message is redelivered at once).
    pub(super) async fn read_deliveries(&self, member: &str, claims: Vec<Claim>) -> Vec<Delivery> {
        let served = self.topic.config().served;
        let (local, remote): (Vec<Claim>, Vec<Claim>) = claims
            .into_iter()
            .partition(|c| served.contains(c.partition));
        let (mut out, mut skipped) = if local.is_empty() {
            (Vec::new(), Vec::new())
        } else {
            match self.read_local(local).await {
                Ok(read) => read,
                Err(e) => {
                    // The deliveries stay pending and are redelivered after ack_wait.
                    tracing::error!(group = %self.name, error = %e, "reading deliveries failed");
                    (Vec::new(), Vec::new())
                }
            }
        };
        let mut unavailable = Vec::new();
        for run in remote.chunk_by(|a, b| a.partition == b.partition && b.offset == a.offset + 1) {
            self.read_remote(run, &mut out, &mut skipped, &mut unavailable)
                .await;
        }
        if skipped.is_empty() && unavailable.is_empty() {
            return out;
        }
        let group_type = self.group_type();
        let now = Instant::now();
        let mut st = self.state.lock();
        for (c, why) in &skipped {
            tracing::warn!(group = %self.name, topic = %self.topic.name, partition = c.partition, offset = c.offset, reason = %why, "message cannot be delivered; skipped");
            if let Some(cursor) = st.cursors.get_mut(c.partition as usize) {
                cursor.settle(c.offset);
            }
            st.dirty.insert(c.partition as usize);
        }
        for (c, why) in &unavailable {
            let Some(cursor) = st.cursors.get_mut(c.partition as usize) else {
                continue;
            };
            match group_type {
                // Claims of a partition are in offset order: the first rewinds over the rest.
                GroupType::Ordered => cursor.rewind_to(c.offset),
                GroupType::Shared => {
                    let _ = cursor.nack(c.offset, member, now, why);
                }
            }
            st.dirty.insert(c.partition as usize);
        }
        if let Some((c, why)) = unavailable.first() {
            tracing::warn!(group = %self.name, topic = %self.topic.name, partition = c.partition, messages = unavailable.len(), reason = %why, "the partition's leader did not answer; messages handed out again");
        }
        drop(st);
        self.changed.notify_waiters();
        out
    }

    /// Reads `claims` of partitions this broker serves: deliveries, and claims that cannot
    /// be delivered with the reason.
    async fn read_local(
        &self,
        claims: Vec<Claim>,
    ) -> Result<(Vec<Delivery>, Vec<(Claim, String)>), tokio::task::JoinError> {
        let log = Arc::clone(&self.log);
        let partitions = self.topic.partitions();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(claims.len());
            let mut skipped = Vec::new();
            // A run of consecutive offsets of one partition is one read.
            for run in
                claims.chunk_by(|a, b| a.partition == b.partition && b.offset == a.offset + 1)
            {
                let first = run[0];
                let records = match partitions.get(first.partition as usize) {
                    Some(part) => log.read(part, first.offset, usize::MAX, run.len()),
                    None => Ok(Vec::new()),
                };
                match records {
                    Ok(records) => merge(run, records, &mut out, &mut skipped),
                    Err(e) => {
                        let why = e.to_string();
                        skipped.extend(run.iter().map(|c| (*c, why.clone())));
                    }
                }
            }
            (out, skipped)
        })
        .await
    }

    /// Reads a run of consecutive claims of one partition from its leader, as many
    /// fetches as it takes.
    async fn read_remote(
        &self,
        run: &[Claim],
        out: &mut Vec<Delivery>,
        skipped: &mut Vec<(Claim, String)>,
        unavailable: &mut Vec<(Claim, String)>,
    ) {
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return;
        };
        let mut next = first.offset;
        let mut records = Vec::new();
        let mut failed = None;
        while next <= last.offset {
            let want = (last.offset - next + 1) as usize;
            match self
                .remote
                .read(&self.topic.name, first.partition, next, want)
                .await
            {
                Ok(read) => match read.last() {
                    Some(r) => {
                        next = r.offset + 1;
                        records.extend(read);
                    }
                    None => break,
                },
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let (read, rest): (Vec<Claim>, Vec<Claim>) = run.iter().partition(|c| c.offset < next);
        merge(&read, records, out, skipped);
        for c in rest {
            match &failed {
                Some(ReadError::Unavailable(why)) => unavailable.push((c, why.clone())),
                Some(ReadError::Gone(why)) => skipped.push((c, why.clone())),
                None => skipped.push((c, "not stored".to_owned())),
            }
        }
    }

    /// Acks and nacks deliveries of `member`. `acks` are inclusive ranges; `nacks` name
    /// single offsets, redelivered after `nack_delay` (Shared) with `error` kept for the
    /// dead-letter headers. Every reference is checked first: if any is unknown, already
    /// acked, held by another member or named twice, nothing changes. A group deleted or
    /// no longer coordinated here refuses ([`Group::check_open`]).
    pub fn ack(
        &self,
        member: &str,
        acks: &[AckRange],
        nacks: &[OffsetRef],
        nack_delay: Duration,
        error: &str,
    ) -> Result<(), Error> {
        // An ack taken by a group closed here would never be stored.
        self.check_open()?;
        if nack_delay > super::MAX_NACK_DELAY {
            return Err(InvalidConfig::new(
                "nack_delay_ms",
                format!(
                    "nack_delay_ms is {}; it must be at most {} (1 day)",
                    nack_delay.as_millis(),
                    super::MAX_NACK_DELAY.as_millis()
                ),
            )
            .into());
        }
        let config = self.config();
        let malformed = |detail: String| Error::MalformedAck {
            group: self.name.clone(),
            detail,
        };
        let acks = coalesce(acks).map_err(malformed)?;
        let mut nacked: Vec<OffsetRef> = nacks.to_vec();
        nacked.sort_unstable();
        if let Some(w) = nacked.windows(2).find(|w| w[0] == w[1]) {
            return Err(malformed(format!(
                "partition {} offset {} is nacked twice in one request",
                w[0].partition, w[0].offset
            )));
        }
        let mut st = self.state.lock();
        st.touch_member(&self.name, member)?;
        for r in &acks {
            self.cursor(&st, r.partition)?
                .can_ack_range(r.first, r.last, member)
                .map_err(|e| self.ack_error(r.partition, e))?;
        }
        for n in nacks {
            self.cursor(&st, n.partition)?
                .can_ack(n.offset, member)
                .map_err(|e| self.ack_error(n.partition, e))?;
            if acks.iter().any(|r| r.contains(*n)) {
                return Err(malformed(format!(
                    "partition {} offset {} is both acked and nacked in one request; send one of them",
                    n.partition, n.offset
                )));
            }
        }
        // Checked: from here on nothing fails.
        for r in &acks {
            let p = r.partition as usize;
            st.cursors[p]
                .ack_range(r.first, r.last, member)
                .map_err(|e| self.ack_error(r.partition, e))?;
            st.dirty.insert(p);
            if config.group_type == GroupType::Ordered {
                st.handover(p);
            }
        }
        let due = Instant::now() + nack_delay;
        for n in nacks {
            self.nack(
                &mut st,
                member,
                *n,
                due,
                error,
                config.group_type,
                config.max_deliveries,
            )?;
        }
        drop(st);
        self.changed.notify_waiters();
        Ok(())
    }

    /// One checked nack: Ordered rewinds the partition, Shared schedules a redelivery and,
    /// at `max_deliveries`, holds the message for the dead-letter topic.
    #[allow(clippy::too_many_arguments)]
    fn nack(
        &self,
        st: &mut State,
        member: &str,
        n: OffsetRef,
        due: Instant,
        error: &str,
        group_type: GroupType,
        max_deliveries: u32,
    ) -> Result<(), Error> {
        let p = n.partition as usize;
        match group_type {
            GroupType::Ordered => st.cursors[p].rewind_to(n.offset),
            GroupType::Shared => {
                let count = st.cursors[p]
                    .nack(n.offset, member, due, error)
                    .map_err(|e| self.ack_error(n.partition, e))?;
                if max_deliveries > 0 && count >= max_deliveries {
                    // Out of circulation now; maintenance writes it to the dead-letter topic.
                    st.cursors[p].hold(
                        &[n.offset],
                        DEAD_LETTER_HOLDER,
                        Instant::now(),
                        DEAD_LETTER_HOLD,
                    );
                }
            }
        }
        st.dirty.insert(p);
        Ok(())
    }

    /// The cursor of partition `p`, or [`Error::NoPartition`].
    fn cursor<'a>(&self, st: &'a State, p: u32) -> Result<&'a Cursor, Error> {
        st.cursors
            .get(p as usize)
            .ok_or_else(|| Error::NoPartition {
                group: self.name.clone(),
                partition: p,
            })
    }

    fn ack_error(&self, partition: u32, source: super::cursor::AckError) -> Error {
        Error::Ack {
            group: self.name.clone(),
            partition,
            source,
        }
    }
}

impl AckRange {
    fn contains(self, r: OffsetRef) -> bool {
        self.partition == r.partition && (self.first..=self.last).contains(&r.offset)
    }
}

/// Matches `run` (claims of one partition in offset order) with `records` read from that
/// partition (in offset order): one merge, no lookup per record. Claims without a record
/// are skipped as "not stored".
fn merge(
    run: &[Claim],
    records: Vec<StoredRecord>,
    out: &mut Vec<Delivery>,
    skipped: &mut Vec<(Claim, String)>,
) {
    let mut records = records.into_iter().peekable();
    for c in run {
        while records.next_if(|r| r.offset < c.offset).is_some() {}
        match records.next_if(|r| r.offset == c.offset) {
            Some(r) => out.push(Delivery {
                partition: c.partition,
                offset: c.offset,
                count: c.count,
                record: r.record,
            }),
            None => skipped.push((*c, "not stored".to_owned())),
        }
    }
}

/// Sorts ack ranges by partition and offset and joins adjacent ones; an offset named twice
/// (Kafka would see a duplicate commit; here it is a client bug) or a range whose first
/// offset is after its last is refused with a message saying which.
pub(super) fn coalesce(acks: &[AckRange]) -> Result<Vec<AckRange>, String> {
    let mut sorted = acks.to_vec();
    if !sorted.is_sorted() {
        sorted.sort_unstable();
    }
    let mut out: Vec<AckRange> = Vec::with_capacity(sorted.len().min(16));
    for r in sorted {
        if r.first > r.last {
            return Err(format!(
                "ack range {}..={} of partition {} is empty; the first offset must not be after the last",
                r.first, r.last, r.partition
            ));
        }
        if let Some(last) = out.last_mut()
            && last.partition == r.partition
        {
            if r.first <= last.last {
                return Err(format!(
                    "partition {} offset {} is acked twice in one request",
                    r.partition,
                    r.first.max(last.first)
                ));
            }
            if r.first == last.last + 1 {
                last.last = r.last;
                continue;
            }
        }
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(partition: u32, first: u64, last: u64) -> AckRange {
        AckRange {
            partition,
            first,
            last,
        }
    }

    #[test]
    fn coalesce_sorts_and_joins_adjacent_ranges_per_partition() {
        assert_eq!(
            coalesce(&[r(1, 5, 5), r(0, 3, 4), r(0, 0, 2), r(1, 6, 9), r(0, 7, 7)]),
            Ok(vec![r(0, 0, 4), r(0, 7, 7), r(1, 5, 9)])
        );
        assert_eq!(coalesce(&[]), Ok(Vec::new()));
        assert_eq!(
            coalesce(&[r(0, 2, 2), r(1, 3, 3)]),
            Ok(vec![r(0, 2, 2), r(1, 3, 3)])
        );
    }

    #[test]
    fn coalesce_refuses_overlaps_and_backwards_ranges() {
        let twice = coalesce(&[r(0, 0, 3), r(0, 2, 5)]).expect_err("overlap");
        assert!(
            twice.contains("partition 0 offset 2 is acked twice"),
            "{twice}"
        );
        let same = coalesce(&[r(2, 4, 4), r(2, 4, 4)]).expect_err("duplicate");
        assert!(same.contains("offset 4 is acked twice"), "{same}");
        let back = coalesce(&[r(0, 5, 4)]).expect_err("backwards");
        assert!(
            back.contains("the first offset must not be after the last"),
            "{back}"
        );
    }
}
