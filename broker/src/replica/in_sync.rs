//! In-sync replicas: which followers of a partition this broker leads are caught up, and the
//! replica figures of `/metrics`.
//!
//! A follower is in sync while it has every entry the leader had `lag_max` ago
//! (`--replica-lag-max`) and has acknowledged the leader within `lag_max`: Kafka's
//! `replica.lag.time.max.ms` rule (KIP-16), time-based so that a burst of writes does not
//! shrink the set while a follower that stopped fetching leaves it. A leader younger than
//! `lag_max` has no older sample: its followers count as caught up, and as alive until they
//! have been silent for `lag_max` of its term. The leader samples every second (every half
//! `lag_max` when that is shorter), and reports a
//! changed set to the controller (`PartitionLeader` with `in_sync`), which keeps it in the
//! cluster's metadata: `Metadata`, `weir topic describe` and the Topic's `UnderReplicated`
//! condition read it there.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use openraft::{Instant as _, async_runtime::WatchReceiver};

use super::{LeaderChange, Replicas};
use crate::log::keys::GroupKey;

/// What the sampler remembers of a partition led here.
struct Track {
    /// The term the samples are of.
    term: u64,
    /// When this broker was first seen leading in that term.
    since: Instant,
    /// One past the leader's last log index over time, oldest first: the newest sample at
    /// least `lag_max` old, then the younger ones.
    history: VecDeque<(Instant, u64)>,
    /// The set last sent to the controller.
    reported: Option<Vec<u64>>,
}

impl Track {
    fn new(term: u64, now: Instant) -> Self {
        Self {
            term,
            since: now,
            history: VecDeque::new(),
            reported: None,
        }
    }
}

/// A follower as its leader sees it.
struct Follower {
    /// One past the last index it has matched the leader's log to (0: none).
    matched: u64,
    /// Time since it last acknowledged the leader, if it did in this term.
    acked: Option<Duration>,
}

/// Whether `f` is in sync: acknowledged within `lag_max` (or, with no acknowledgement yet,
/// the leader is younger than `lag_max`: `young`), and holds the leader's log of `lag_max`
/// ago (`reference`: one past its last index then; `None` for a leader younger than that).
fn in_sync(f: &Follower, lag_max: Duration, young: bool, reference: Option<u64>) -> bool {
    let alive = f.acked.map_or(young, |e| e <= lag_max);
    let caught_up = reference.is_none_or(|r| f.matched >= r);
    alive && caught_up
}

impl Replicas {
    /// Every second (or half `lag_max`, when shorter), works out the in-sync replicas of
    /// each partition led here, reports changes to the controller and updates the replica
    /// figures of `/metrics`, until the registry is dropped.
    pub fn spawn_in_sync(self: &Arc<Self>) {
        let every = (Duration::from_millis(self.lag_max_ms) / 2)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tracks: HashMap<GroupKey, Track> = HashMap::new();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                this.sample_in_sync(&mut tracks);
            }
        });
    }

    fn sample_in_sync(&self, tracks: &mut HashMap<GroupKey, Track>) {
        let lag_max = Duration::from_millis(self.lag_max_ms);
        let now = Instant::now();
        let all = self.all();
        let (mut leaders, mut under, mut max_lag) = (0u64, 0u64, 0u64);
        let mut led = HashSet::new();
        for r in &all {
            let (term, last, members, followers) = {
                let m = r.raft.metrics();
                let m = m.borrow_watched();
                if m.current_leader != Some(self.me) {
                    continue;
                }
                let members: Vec<u64> = m.membership_config.membership().voter_ids().collect();
                let followers: Vec<(u64, Follower)> = members
                    .iter()
                    .filter(|id| **id != self.me)
                    .map(|id| {
                        let matched = m
                            .replication
                            .as_ref()
                            .and_then(|p| p.get(id))
                            .and_then(|l| l.as_ref().map(|l| l.index() + 1))
                            .unwrap_or(0);
                        let acked = m
                            .heartbeat
                            .as_ref()
                            .and_then(|h| h.get(id))
                            .and_then(|t| t.as_ref().map(|t| t.elapsed()));
                        (*id, Follower { matched, acked })
                    })
                    .collect();
                let end = m.last_log_index.map_or(0, |i| i + 1);
                (m.current_term, end, members, followers)
            };
            leaders += 1;
            led.insert(r.group);
            let track = tracks
                .entry(r.group)
                .or_insert_with(|| Track::new(term, now));
            if track.term != term {
                *track = Track::new(term, now);
            }
            track.history.push_back((now, last));
            while track
                .history
                .get(1)
                .is_some_and(|(t, _)| *t + lag_max <= now)
            {
                track.history.pop_front();
            }
            let reference = track
                .history
                .front()
                .filter(|(t, _)| *t + lag_max <= now)
                .map(|(_, index)| *index);
            let young = now.duration_since(track.since) < lag_max;
            let mut isr = vec![self.me];
            for (id, f) in &followers {
                max_lag = max_lag.max(last.saturating_sub(f.matched));
                if in_sync(f, lag_max, young, reference) {
                    isr.push(*id);
                }
            }
            isr.sort_unstable();
            if isr.len() < members.len() {
                under += 1;
            }
            if track.reported.as_ref() != Some(&isr) {
                if track.reported.is_some() {
                    tracing::info!(topic = %r.topic, partition = r.partition.index, in_sync = ?isr, replicas = ?members, "in-sync replicas changed");
                }
                track.reported = Some(isr.clone());
                let _ = self.leaders.send(LeaderChange {
                    topic: r.topic.clone(),
                    partition: r.partition.index,
                    leader: self.me,
                    term,
                    in_sync: isr,
                });
            }
        }
        tracks.retain(|g, _| led.contains(g));
        let stats = &self.stats;
        stats.replicas.store(all.len() as u64, Ordering::Relaxed);
        stats.leaders.store(leaders, Ordering::Relaxed);
        stats.under_replicated.store(under, Ordering::Relaxed);
        stats.max_lag_entries.store(max_lag, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAG: Duration = Duration::from_secs(10);

    fn f(matched: u64, acked_secs: Option<u64>) -> Follower {
        Follower {
            matched,
            acked: acked_secs.map(Duration::from_secs),
        }
    }

    #[test]
    fn a_follower_is_in_sync_while_it_acks_and_holds_what_the_leader_had_lag_max_ago() {
        // Caught up to the reference and acked recently.
        assert!(in_sync(&f(100, Some(1)), LAG, false, Some(90)));
        assert!(in_sync(&f(90, Some(1)), LAG, false, Some(90)));
        // Behind the leader's log of lag_max ago.
        assert!(!in_sync(&f(80, Some(1)), LAG, false, Some(90)));
        // Silent longer than lag_max.
        assert!(!in_sync(&f(100, Some(11)), LAG, false, Some(90)));
        // Never acked: in sync only while the leader is young.
        assert!(in_sync(&f(0, None), LAG, true, None));
        assert!(!in_sync(&f(0, None), LAG, false, None));
        // An empty log lag_max ago: anything holds it.
        assert!(in_sync(&f(0, Some(1)), LAG, false, Some(0)));
    }
}
