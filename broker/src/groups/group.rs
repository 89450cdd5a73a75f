//! One consumer group: its settings, members and per-partition cursors behind one lock,
//! and the calls a member makes on it (join, heartbeat, leave) and describe.
//!
//! Delivery and acks are in [`super::delivery`], periodic work in [`super::maintenance`].

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Instant,
};

use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use super::{
    Error, GroupConfig, GroupInfo, GroupType, Joined, MemberInfo, PartitionInfo,
    cursor::{Cursor, MemberId},
    membership::Member,
    remote::Remote,
    stored::{self, GroupMeta},
};
use crate::log::{Log, Partition, Topic, topic::Served};

/// A key and value of the log's metadata keyspace.
type MetaEntry = (Vec<u8>, Vec<u8>);
/// Cursors taken for writing: the partitions marked, and each one's stored entry.
type DirtyCursors = (Vec<usize>, Vec<(u32, MetaEntry)>);

/// Mutable state of a group, behind [`Group`]'s lock.
#[derive(Debug, Default)]
pub(super) struct State {
    /// Delivery state per partition, by index.
    pub cursors: Vec<Cursor>,
    /// Members by id.
    pub members: BTreeMap<MemberId, Member>,
    /// Ordered: the member that owns each partition now.
    pub owners: Vec<Option<MemberId>>,
    /// Ordered: the member each partition goes to once its owner holds nothing of it.
    pub targets: Vec<Option<MemberId>>,
    /// Membership changes so far.
    pub generation: u64,
    /// Messages moved to the dead-letter topic so far.
    pub dead_lettered: u64,
    /// Partitions whose cursor changed since it was last written.
    pub dirty: BTreeSet<usize>,
    /// Partition a take starts at (rotates, so no partition starves).
    pub round_robin: usize,
    /// Partitions of the topic this broker serves; only they are assigned to members.
    pub served: Served,
}

impl State {
    /// A state with one cursor per start offset.
    pub fn with_cursors(cursors: Vec<Cursor>, dead_lettered: u64) -> Self {
        let n = cursors.len();
        Self {
            cursors,
            owners: vec![None; n],
            targets: vec![None; n],
            dead_lettered,
            ..Self::default()
        }
    }

    /// Marks `member` as heard from now, or [`Error::NotMember`].
    pub fn touch_member(&mut self, group: &str, member: &str) -> Result<(), Error> {
        let m = self
            .members
            .get_mut(member)
            .ok_or_else(|| Error::NotMember {
                group: group.to_owned(),
                member: member.to_owned(),
            })?;
        m.last_seen = Instant::now();
        Ok(())
    }

    /// Follows the topic: cursors for partitions added since, and the partitions served.
    /// Returns whether either changed (an Ordered group then rebalances).
    pub fn ensure_partitions(&mut self, partitions: &[Arc<Partition>], served: Served) -> bool {
        let changed = self.cursors.len() < partitions.len() || self.served != served;
        self.served = served;
        while let Some(p) = partitions.get(self.cursors.len()) {
            // Partitions added after the group was created start at their beginning.
            self.cursors.push(Cursor::at(p.earliest_offset()));
            self.owners.push(None);
            self.targets.push(None);
            self.dirty.insert(self.cursors.len() - 1);
        }
        changed
    }
}

/// One consumer group.
#[derive(Debug)]
pub struct Group {
    /// Name.
    pub name: String,
    pub(super) topic: Arc<Topic>,
    /// The log the group reads records from and writes its state to.
    pub(super) log: Arc<Log>,
    pub(super) config: RwLock<GroupConfig>,
    pub(super) state: Mutex<State>,
    /// Woken on acks, nacks, membership changes and resets.
    pub(super) changed: Notify,
    /// Records deleted (by retention) before the group acked them.
    pub(super) skipped: AtomicU64,
    /// Set when the group is deleted, so waiting pulls end.
    pub(super) deleted: AtomicBool,
    /// A group of a replicated topic: its coordinator partition, whose Raft log keeps the
    /// cursors (else they are in this broker's metadata keyspace).
    pub(super) coordinator_partition: Option<u32>,
    /// Set when this broker stops coordinating the group (its coordinator partition's
    /// leadership moved), so waiting pulls and push streams end.
    pub(super) moved: AtomicBool,
    /// The partitions of the topic other brokers lead, and the cluster's metadata.
    pub(super) remote: Arc<dyn Remote>,
    /// Writes of the cursors, one at a time (each writes whole cursors, so two racing
    /// could store an older one last).
    pub(super) persisting: tokio::sync::Mutex<()>,
    /// Takes of the dirty cursors so far ([`Group::take_dirty_cursors`]): the generation of
    /// the last one.
    pub(super) taken: AtomicU64,
    /// The last generation whose cursors are stored (for a replicated topic's group:
    /// committed in its coordinator partition's log).
    pub(super) persisted: AtomicU64,
}

impl Group {
    pub(super) fn new(
        name: &str,
        topic: Arc<Topic>,
        log: Arc<Log>,
        config: GroupConfig,
        state: State,
        remote: Arc<dyn Remote>,
        coordinator_partition: Option<u32>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            topic,
            log,
            config: RwLock::new(config),
            state: Mutex::new(state),
            changed: Notify::new(),
            skipped: AtomicU64::new(0),
            deleted: AtomicBool::new(false),
            coordinator_partition,
            moved: AtomicBool::new(false),
            remote,
            persisting: tokio::sync::Mutex::new(()),
            taken: AtomicU64::new(0),
            persisted: AtomicU64::new(0),
        }
    }

    /// The partitions assigned to members: those served here and those another broker
    /// leads (a partition of a standalone broker's `served_partitions` list that it does
    /// not serve has no leader, and is not assigned).
    pub(super) fn assignable(&self, parts: &[Arc<Partition>], served: Served) -> Served {
        if served.is_all() {
            return served;
        }
        let n = parts.len() as u32;
        let list: Vec<u32> = (0..n)
            .filter(|&p| served.contains(p) || self.remote.led_elsewhere(&self.topic.name, p))
            .collect();
        if list.len() == parts.len() {
            Served::ALL
        } else {
            Served::from_list(&list, n).unwrap_or(served)
        }
    }

    /// Starts following the partitions other brokers lead and waits (at most `wait`) until
    /// their ends are known.
    pub(super) async fn await_remote_ends(&self, wait: std::time::Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let parts = self.topic.partitions();
            let served = self.topic.config().served;
            let unknown = (0..parts.len())
                .filter(|&p| !served.contains(p as u32))
                .filter(|&p| self.remote.led_elsewhere(&self.topic.name, p as u32))
                .any(|p| self.ends(&parts, served, p).is_none());
            if !unknown || Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// `(earliest, next)` offsets of partition `p`: from the log when this broker serves
    /// it, else as last heard from its leader (`None` until then).
    pub(super) fn ends(
        &self,
        parts: &[Arc<Partition>],
        served: Served,
        p: usize,
    ) -> Option<(u64, u64)> {
        if served.contains(p as u32) {
            parts.get(p).map(|x| (x.earliest_offset(), x.next_offset()))
        } else {
            self.remote.ends(&self.topic, p as u32)
        }
    }

    /// Whether the group was deleted.
    pub(super) fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// [`Error::GroupDeleted`] once the group is deleted, [`Error::CoordinatorMoved`] once
    /// this broker stopped coordinating it: a member's calls and streams then end.
    pub fn check_open(&self) -> Result<(), Error> {
        if self.is_deleted() {
            return Err(Error::GroupDeleted(self.name.clone()));
        }
        if self.moved.load(Ordering::Acquire) {
            return Err(Error::CoordinatorMoved(self.name.clone()));
        }
        Ok(())
    }

    pub(super) fn report_skip(&self, partition: usize, skipped: u64) {
        self.skipped.fetch_add(skipped, Ordering::Relaxed);
        tracing::warn!(group = %self.name, topic = %self.topic.name, partition, skipped, "records were deleted by retention before the group acked them; resuming at the head");
    }

    /// Records deleted by retention before this group acked them.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    /// Settings.
    pub fn config(&self) -> GroupConfig {
        self.config.read().clone()
    }

    pub(super) fn group_type(&self) -> GroupType {
        self.config.read().group_type
    }

    /// The topic read.
    pub fn topic(&self) -> &Arc<Topic> {
        &self.topic
    }

    /// The stored form of the group's settings.
    pub(super) fn meta(&self) -> GroupMeta {
        GroupMeta {
            name: self.name.clone(),
            config: self.config(),
            topic_id: self.topic.id,
            dead_lettered: self.state.lock().dead_lettered,
        }
    }

    /// Adds member `id` (a push member when `push`); returns its assignment.
    pub(super) fn add_member(&self, id: MemberId, seq: u64, push: bool) -> Joined {
        let group_type = self.group_type();
        let joined = {
            let mut st = self.state.lock();
            let parts = self.topic.partitions();
            st.ensure_partitions(&parts, self.assignable(&parts, self.topic.config().served));
            let member = Member {
                seq,
                last_seen: Instant::now(),
                push,
            };
            st.add_member(id.clone(), member, group_type);
            Joined {
                partitions: st.assignment(&id),
                generation: st.generation,
                member: id,
            }
        };
        self.changed.notify_waiters();
        tracing::info!(group = %self.name, member = %joined.member, generation = joined.generation, "member joined");
        joined
    }

    /// Removes `member` at once: its deliveries go back to the group.
    pub fn leave(&self, member: &str) -> Result<(), Error> {
        let removed = self
            .state
            .lock()
            .remove_member(member, self.group_type(), Instant::now());
        if !removed {
            return Err(Error::NotMember {
                group: self.name.clone(),
                member: crate::validate::quote(member),
            });
        }
        self.changed.notify_waiters();
        tracing::info!(group = %self.name, member, "member left");
        Ok(())
    }

    /// Marks `member` alive; returns the generation and its assignment (Ordered).
    pub fn heartbeat(&self, member: &str) -> Result<(u64, Vec<u32>), Error> {
        let mut st = self.state.lock();
        st.touch_member(&self.name, member)?;
        Ok((st.generation, st.assignment(member)))
    }

    /// Resolves the next time the group changes (acks, nacks, membership, resets); call
    /// `enable` on it before checking the state it waits for.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Current generation and `member`'s assignment (Ordered).
    pub fn assignment(&self, member: &str) -> (u64, Vec<u32>) {
        let st = self.state.lock();
        (st.generation, st.assignment(member))
    }

    /// The `o/` entries of the cursors changed since the last call, by partition, marking
    /// them clean; on an error nothing is marked. Each call is a new generation
    /// ([`Group::taken`]).
    pub(super) fn take_dirty_cursors(&self) -> Result<DirtyCursors, Error> {
        let mut st = self.state.lock();
        self.taken.fetch_add(1, Ordering::AcqRel);
        let dirty: Vec<usize> = st.dirty.iter().copied().collect();
        let entries = dirty
            .iter()
            .filter_map(|p| {
                st.cursors
                    .get(*p)
                    .map(|c| stored::cursor_entry(&self.name, *p as u32, c).map(|e| (*p as u32, e)))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        st.dirty.clear();
        Ok((dirty, entries))
    }

    /// Marks cursors dirty again (their write failed).
    pub(super) fn mark_dirty(&self, partitions: Vec<usize>) {
        self.state.lock().dirty.extend(partitions);
    }

    /// A snapshot for describe.
    pub fn info(&self) -> GroupInfo {
        let config = self.config();
        let parts = self.topic.partitions();
        let served = self.topic.config().served;
        let ends: Vec<Option<(u64, u64)>> = (0..parts.len())
            .map(|p| self.ends(&parts, served, p))
            .collect();
        let mut st = self.state.lock();
        st.ensure_partitions(&parts, self.assignable(&parts, served));
        let now = Instant::now();
        let partitions = st
            .cursors
            .iter()
            .enumerate()
            .map(|(p, c)| {
                // Not heard from the leader yet: no lag known, none shown.
                let next = ends
                    .get(p)
                    .copied()
                    .flatten()
                    .map_or(c.floor(), |(_, next)| next);
                PartitionInfo {
                    partition: p as u32,
                    committed: c.floor(),
                    next,
                    lag: c.lag(next),
                    pending: c.pending_len() as u64,
                    owner: match config.group_type {
                        GroupType::Ordered => st.owners[p].clone(),
                        GroupType::Shared => None,
                    },
                }
            })
            .collect();
        let mut members: Vec<(&MemberId, &Member)> = st.members.iter().collect();
        members.sort_by_key(|(_, m)| m.seq);
        let members = members
            .into_iter()
            .map(|(id, m)| MemberInfo {
                id: id.clone(),
                partitions: st.assignment(id),
                pending: st.cursors.iter().map(|c| c.pending_of(id) as u64).sum(),
                idle_ms: now.duration_since(m.last_seen).as_millis() as u64,
            })
            .collect();
        GroupInfo {
            name: self.name.clone(),
            config,
            members,
            partitions,
            dead_lettered: st.dead_lettered,
            generation: st.generation,
        }
    }
}
