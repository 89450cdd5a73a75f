//! Membership: who is in a group, and for an Ordered group which member owns which
//! partition.
//!
//! Assignment is round robin over members in join order, over the partitions this broker
//! serves ([`assign`], pure). A partition moves to its new owner only after the old owner
//! acked what it holds or left ([`State::handover`]), so a member never sees a partition
//! that another member still owns (Kafka's cooperative rebalancing gives the same
//! guarantee by revoking before assigning).

use std::time::Instant;

use super::{GroupType, cursor::MemberId, group::State};
use crate::log::topic::Served;

/// A member of a group.
#[derive(Debug)]
pub(super) struct Member {
    /// Join order (a broker-wide sequence number).
    pub seq: u64,
    /// Last join, heartbeat, pull or ack.
    pub last_seen: Instant,
    /// Push members live as long as their stream; they do not time out.
    pub push: bool,
}

/// Target owner of each of `partitions` partitions: round robin over `members` (in join
/// order) across the served partitions, `None` for partitions not served or when there is
/// no member.
pub(super) fn assign(
    members: &[MemberId],
    partitions: usize,
    served: Served,
) -> Vec<Option<MemberId>> {
    let mut turn = 0;
    (0..partitions)
        .map(|p| {
            if members.is_empty() || !served.contains(p as u32) {
                return None;
            }
            let owner = members[turn % members.len()].clone();
            turn += 1;
            Some(owner)
        })
        .collect()
}

impl State {
    /// Members in join order.
    fn join_order(&self) -> Vec<MemberId> {
        let mut order: Vec<(u64, &MemberId)> =
            self.members.iter().map(|(id, m)| (m.seq, id)).collect();
        order.sort();
        order.into_iter().map(|(_, id)| id.clone()).collect()
    }

    /// Ordered: computes new target owners and hands over what can move now.
    pub(super) fn rebalance(&mut self) {
        self.generation += 1;
        self.targets = assign(&self.join_order(), self.cursors.len(), self.served);
        for p in 0..self.cursors.len() {
            self.handover(p);
        }
    }

    /// After a member joined or left: an Ordered group rebalances; a Shared group only
    /// counts a new generation (any member may take any message).
    pub(super) fn membership_changed(&mut self, group_type: GroupType) {
        match group_type {
            GroupType::Ordered => self.rebalance(),
            GroupType::Shared => self.generation += 1,
        }
    }

    /// Gives partition `p` to its target owner once the current owner holds nothing of it
    /// (or has left); the new owner starts at the ack floor.
    pub(super) fn handover(&mut self, p: usize) {
        if self.owners[p] == self.targets[p] {
            return;
        }
        if let Some(owner) = &self.owners[p]
            && self.members.contains_key(owner)
            && self.cursors[p].pending_of(owner) > 0
        {
            return;
        }
        self.owners[p].clone_from(&self.targets[p]);
        self.cursors[p].rewind_to_floor();
    }

    /// Whether `member` owns partition `p` now and keeps it (Ordered).
    pub(super) fn owns(&self, member: &str, p: usize) -> bool {
        self.owners[p].as_deref() == Some(member) && self.targets[p].as_deref() == Some(member)
    }

    /// Ordered: partitions `member` owns and keeps.
    pub(super) fn assignment(&self, member: &str) -> Vec<u32> {
        (0..self.owners.len())
            .filter(|p| self.owns(member, *p))
            .map(|p| p as u32)
            .collect()
    }

    /// Adds a member and rebalances (Ordered) or bumps the generation (Shared).
    pub(super) fn add_member(&mut self, id: MemberId, member: Member, group_type: GroupType) {
        self.members.insert(id, member);
        self.membership_changed(group_type);
    }

    /// Removes a member: its pending deliveries go back to the group at once (as Pulsar
    /// does), then the group rebalances. False when it was not a member.
    pub(super) fn remove_member(
        &mut self,
        member: &str,
        group_type: GroupType,
        now: Instant,
    ) -> bool {
        if self.members.remove(member).is_none() {
            return false;
        }
        for (p, c) in self.cursors.iter_mut().enumerate() {
            if c.release(member, now) > 0 {
                self.dirty.insert(p);
            }
        }
        self.membership_changed(group_type);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::groups::cursor::Cursor;

    fn ids(names: &[&str]) -> Vec<MemberId> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn some(names: &[&str]) -> Vec<Option<MemberId>> {
        names
            .iter()
            .map(|s| (!s.is_empty()).then(|| (*s).to_owned()))
            .collect()
    }

    #[test]
    fn assign_is_round_robin_in_join_order_over_served_partitions() {
        assert_eq!(
            assign(&ids(&["a", "b"]), 5, Served::ALL),
            some(&["a", "b", "a", "b", "a"])
        );
        let served = Served::from_list(&[1, 2, 4], 5).expect("valid");
        assert_eq!(
            assign(&ids(&["a", "b"]), 5, served),
            some(&["", "a", "b", "", "a"])
        );
        assert_eq!(assign(&[], 3, Served::ALL), some(&["", "", ""]));
        assert_eq!(
            assign(&ids(&["a", "b", "c"]), 2, Served::ALL),
            some(&["a", "b"])
        );
    }

    fn state(partitions: usize) -> State {
        State {
            cursors: (0..partitions).map(|_| Cursor::at(0)).collect(),
            owners: vec![None; partitions],
            targets: vec![None; partitions],
            ..State::default()
        }
    }

    fn member(seq: u64) -> Member {
        Member {
            seq,
            last_seen: Instant::now(),
            push: false,
        }
    }

    /// A partition stays with its owner while the owner holds unacked deliveries of it,
    /// and moves once they are acked.
    #[test]
    fn handover_waits_until_the_old_owner_holds_nothing() {
        let now = Instant::now();
        let wait = Duration::from_secs(30);
        let mut st = state(2);
        st.add_member("a".into(), member(0), GroupType::Ordered);
        assert_eq!(st.assignment("a"), vec![0, 1]);
        let taken = st.cursors[1].take("a", 3, 10, now, wait);
        assert_eq!(taken.len(), 3);
        st.add_member("b".into(), member(1), GroupType::Ordered);
        assert_eq!(st.assignment("a"), vec![0], "partition 1 is leaving a");
        assert!(st.assignment("b").is_empty(), "b waits for a's acks");
        assert_eq!(st.owners[1].as_deref(), Some("a"));
        st.cursors[1].ack_range(0, 2, "a").expect("acked");
        st.handover(1);
        assert_eq!(st.assignment("b"), vec![1]);
        assert_eq!(st.cursors[1].floor(), 3);
    }

    /// A member that leaves hands its partitions and its deliveries over at once.
    #[test]
    fn a_leaving_member_releases_its_partitions_and_deliveries() {
        let now = Instant::now();
        let mut st = state(2);
        st.add_member("a".into(), member(0), GroupType::Ordered);
        st.add_member("b".into(), member(1), GroupType::Ordered);
        assert_eq!(st.assignment("b"), vec![1]);
        st.cursors[1].take("b", 2, 10, now, Duration::from_secs(30));
        let generation = st.generation;
        assert!(st.remove_member("b", GroupType::Ordered, now));
        assert!(
            !st.remove_member("b", GroupType::Ordered, now),
            "gone already"
        );
        assert_eq!(st.assignment("a"), vec![0, 1]);
        assert_eq!(st.generation, generation + 1);
        assert_eq!(st.cursors[1].pending_len(), 0);
        assert!(st.dirty.contains(&1));
    }

    /// Shared groups do not assign partitions; membership changes only count generations.
    #[test]
    fn shared_groups_only_count_generations() {
        let mut st = state(3);
        st.add_member("a".into(), member(0), GroupType::Shared);
        assert_eq!(st.generation, 1);
        assert!(st.assignment("a").is_empty());
        assert!(st.targets.iter().all(Option::is_none));
    }
}
