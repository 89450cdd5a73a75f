//! Where a data-path call goes: here, or to the broker that leads the partition (one hop).
//!
//! A call another broker forwarded carries [`FORWARDED`] and is served here whatever the
//! state says: a broker forwards at most once, so a stale view can cost a refusal, never a
//! loop.

use super::{BrokerId, Cluster, ClusterState};
use crate::log::partitioner;

/// Metadata key a forwarded call carries.
pub const FORWARDED: &str = "weir-forwarded";

/// Where a call goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Served by this broker.
    Here,
    /// Forwarded to this broker.
    Leader {
        /// Broker id.
        id: BrokerId,
        /// Its advertised `host:port`.
        address: String,
    },
    /// The records of one produce request go to partitions of several brokers.
    Spread(Vec<BrokerId>),
}

impl Cluster {
    /// Waits (at most 1 s) while `topic` is in this broker's log but not yet in the
    /// published metadata: the entry that creates it is being applied (the log is changed
    /// first, the state published after), and routing before it would send the call to a
    /// local topic that serves only some of the partitions. A topic this broker does not
    /// know at all may have been created through another broker a moment ago: it catches
    /// up with the metadata leader first ([`Cluster::catch_up`], at most 2 s).
    pub async fn settle(&self, topic: &str) {
        if self.state().topics.contains_key(topic) {
            return;
        }
        if self.log.topic(topic).is_err() {
            self.catch_up().await;
            return;
        }
        let mut rx = self.state.clone();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            rx.wait_for(|(_, s)| s.topics.contains_key(topic)),
        )
        .await;
    }

    /// Waits (at most `wait`) until group `name` is in the published metadata: a group
    /// created through another broker a moment ago may not be applied here yet, and a call
    /// naming it without its topic can only be routed once it is.
    pub async fn settle_group(&self, name: &str, wait: std::time::Duration) {
        if self.state().groups.contains_key(name) {
            return;
        }
        let mut rx = self.state.clone();
        let _ = tokio::time::timeout(wait, rx.wait_for(|(_, s)| s.groups.contains_key(name))).await;
    }

    /// The route of a call for `topic`/`partition` (fetch, and produce to one partition).
    /// Unknown topics and partitions are served here (and refused here).
    pub fn route_partition(&self, topic: &str, partition: u32) -> Route {
        let state = self.state();
        match state
            .topics
            .get(topic)
            .and_then(|t| self.partition_leader(t, topic, partition))
        {
            Some(leader) => self.to(&state, leader),
            None => Route::Here,
        }
    }

    /// The leader of `topic`/`partition` (of topic state `t`): the one recorded in the
    /// metadata, unless this broker's own replica of the partition follows a leader of a
    /// later term. A new leader is recorded only once its report commits on the metadata
    /// group, which may itself be electing a leader (both led by a broker that stopped);
    /// meanwhile the replicas know the new leader and route to it. `None` for a partition
    /// that does not exist.
    pub fn partition_leader(
        &self,
        t: &super::state::TopicState,
        topic: &str,
        partition: u32,
    ) -> Option<BrokerId> {
        let recorded = t.leader(partition)?;
        let recorded_term = t.leaders.get(&partition).map_or(0, |(_, term)| *term);
        match self.replicas.known_leader(topic, partition) {
            Some((leader, term)) if term > recorded_term => Some(leader),
            _ => Some(recorded),
        }
    }

    /// The route of a produce request of `topic` without an explicit partition, whose
    /// records have `keys`: keyed records go to their partition's leader
    /// (`murmur2(key) mod partitions`); unkeyed records stay here when this broker leads a
    /// partition of the topic, else go to the leader of partition 0.
    pub fn route_records<'a>(
        &self,
        topic: &str,
        keys: impl Iterator<Item = Option<&'a [u8]>>,
    ) -> Route {
        let state = self.state();
        let Some(t) = state.topics.get(topic) else {
            return Route::Here;
        };
        let count = t.replicas.len() as u32;
        if count == 0 {
            return Route::Here;
        }
        // Unkeyed records stay here when the metadata says this broker leads a partition
        // (a preference: each partition's own leader is looked up only when used).
        let leads_one = (0..count).any(|p| t.leader(p) == Some(self.me()));
        let unkeyed_to = if leads_one {
            self.me()
        } else {
            self.partition_leader(t, topic, 0).unwrap_or(self.me())
        };
        // Each partition's leader once per request (a request's keys name few partitions).
        let mut looked_up: Vec<(u32, BrokerId)> = Vec::new();
        let mut leaders: Vec<BrokerId> = Vec::new();
        for key in keys {
            let leader = match key {
                Some(k) => {
                    let p = partitioner::partition_for_key(k, count);
                    if let Some((_, l)) = looked_up.iter().find(|(q, _)| *q == p) {
                        *l
                    } else {
                        let l = self.partition_leader(t, topic, p).unwrap_or(self.me());
                        looked_up.push((p, l));
                        l
                    }
                }
                None => unkeyed_to,
            };
            if !leaders.contains(&leader) {
                leaders.push(leader);
            }
        }
        match leaders.as_slice() {
            [] => Route::Here,
            [one] => self.to(&state, *one),
            _ => {
                leaders.sort_unstable();
                Route::Spread(leaders)
            }
        }
    }

    /// The route of a call of group `name` (of `topic`, when the call may create it): its
    /// coordinator ([`ClusterState::coordinator`]). Unknown groups are served here (and
    /// refused here).
    pub fn route_group(&self, name: &str, topic: Option<&str>) -> Route {
        let state = self.state();
        match state.coordinator(name, topic) {
            Some(coordinator) => self.to(&state, coordinator),
            None => Route::Here,
        }
    }

    fn to(&self, state: &ClusterState, leader: BrokerId) -> Route {
        if leader == self.me() {
            return Route::Here;
        }
        match state.brokers.get(&leader) {
            Some(b) => Route::Leader {
                id: leader,
                address: b.address.clone(),
            },
            // A leader that never registered cannot be reached; refused here.
            None => Route::Here,
        }
    }

    /// A pooled channel to the broker at `address` (one per peer, HTTP/2 multiplexed).
    ///
    /// # Errors
    ///
    /// An address that is not a valid URI authority.
    pub fn channel_to(&self, address: &str) -> Result<tonic::transport::Channel, super::Error> {
        self.channel(address)
    }
}
