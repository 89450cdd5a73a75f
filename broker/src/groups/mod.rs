//! Consumer groups: who gets which message, acks, redelivery, dead letters, and the state
//! that survives restarts.
//!
//! This module owns group settings, membership, assignment and per-partition delivery
//! state ([`cursor`]); it reads records through the [`Log`] and writes its state to the log's
//! metadata keyspace. It knows nothing of gRPC.
//!
//! Every group on a topic gets every message (publish/subscribe). Inside a group:
//!
//! - `Ordered` (Kafka consumer groups, Pulsar Failover): each partition is owned by one
//!   member at a time (round robin over members in join order) and delivered in offset
//!   order. A partition moves to its new owner only after the old owner acked what it holds
//!   or left, so a member never sees a partition another member still owns. The committed
//!   offset is the ack floor; a nack rewinds the partition to that offset (a Kafka seek).
//! - `Shared` (Pulsar Shared, NATS JetStream pull consumers): any member gets any message;
//!   each is acked on its own; a nack redelivers after its delay; no ack within `ackWait`
//!   redelivers; a member that leaves or times out hands its deliveries back at once (as
//!   Pulsar does); after `maxDeliveries` deliveries the message goes to the dead-letter topic
//!   (Pulsar's DLQ naming `<topic>-<group>-DLQ`) with headers naming where it came from.
//!
//! State on disk (metadata keyspace): `g/<group>` the settings (JSON), `o/<group>/<partition>`
//! the ack floor, acks above it and delivery counts (JSON). Acks update memory at once and
//! are written every [`TICK`] without waiting for fsync (the next produce's fsync, or
//! shutdown, persists them): a crash can redeliver up to one tick of acked messages
//! (at-least-once), never lose one.

pub mod cursor;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use self::cursor::{AckError, Cursor, MemberId};
use crate::log::{
    self, Error, Log, Partition, Record, Topic,
    topic::{Retention, Served},
};

/// How often the group ticker runs: expiry, session timeouts, dead letters, persistence,
/// work-queue deletion.
pub const TICK: Duration = Duration::from_millis(100);
/// `ackWait` when a group leaves it at 0: 30 s, NATS JetStream's default.
pub const DEFAULT_ACK_WAIT_MS: u32 = 30_000;
/// Session timeout when a group leaves it at 0: 10 s.
pub const DEFAULT_SESSION_TIMEOUT_MS: u32 = 10_000;
/// Member that holds messages while they are written to the dead-letter topic.
const DEAD_LETTER_HOLDER: &str = "~dead-letter";

/// How a group hands out messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupType {
    /// One owner per partition, offset order.
    Ordered,
    /// Any member, per-message acks.
    Shared,
}

/// Where a new group (or a reset) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartFrom {
    /// The first stored record.
    Earliest,
    /// The next record produced.
    Latest,
    /// The first record with a timestamp at or after this (ms since the epoch).
    Timestamp(i64),
}

/// Settings of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupConfig {
    /// Topic read by the group.
    pub topic: String,
    /// Ordered or Shared.
    pub group_type: GroupType,
    /// Start of a new group.
    pub start: StartFrom,
    /// Shared: redelivery after this many ms without ack.
    pub ack_wait_ms: u32,
    /// Shared: dead-letter after this many deliveries; 0 never.
    pub max_deliveries: u32,
    /// Dead-letter topic name.
    pub dead_letter_topic: String,
    /// Members not heard from for this long (ms) are removed.
    pub session_timeout_ms: u32,
}

impl GroupConfig {
    /// Fills defaults (0 → default, empty DLQ → `<topic>-<group>-DLQ`) and checks bounds.
    pub fn normalized(mut self, group: &str) -> Result<Self, Error> {
        if self.ack_wait_ms == 0 {
            self.ack_wait_ms = DEFAULT_ACK_WAIT_MS;
        }
        if self.session_timeout_ms == 0 {
            self.session_timeout_ms = DEFAULT_SESSION_TIMEOUT_MS;
        }
        if self.dead_letter_topic.is_empty() {
            self.dead_letter_topic = format!("{}-{group}-DLQ", self.topic);
        }
        log::topic::validate_name(&self.dead_letter_topic)
            .map_err(|e| Error::InvalidArgument(format!("dead_letter_topic: {e}")))?;
        if self.dead_letter_topic == self.topic {
            return Err(Error::InvalidArgument(format!(
                "dead_letter_topic must differ from the group's topic {:?}",
                self.topic
            )));
        }
        if !(100..=86_400_000).contains(&self.ack_wait_ms) {
            return Err(Error::InvalidArgument(format!(
                "ack_wait_ms must be between 100 and 86400000 (1 day), got {}",
                self.ack_wait_ms
            )));
        }
        if !(500..=3_600_000).contains(&self.session_timeout_ms) {
            return Err(Error::InvalidArgument(format!(
                "session_timeout_ms must be between 500 and 3600000 (1 hour), got {}",
                self.session_timeout_ms
            )));
        }
        Ok(self)
    }
}

/// Stored form of a group (`g/<name>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GroupMeta {
    name: String,
    config: GroupConfig,
    topic_id: u32,
    dead_lettered: u64,
}

/// Stored form of a cursor (`o/<group>/<partition>`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct CursorMeta {
    floor: u64,
    acked: Vec<u64>,
    /// Delivery counts that are not 1 (and, in cursors written before `delivered`, every
    /// count).
    counts: Vec<(u64, u32)>,
    /// Unacked offsets delivered once, as half-open ranges; `counts` wins where both name
    /// an offset.
    #[serde(default)]
    delivered: Vec<(u64, u64)>,
}

/// Offsets chosen for a member: (partition, offset, delivery count).
type Taken = Vec<(u32, u64, u32)>;

/// A message handed to a member.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Partition index.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// 1 on first delivery.
    pub count: u32,
    /// The record.
    pub record: Record,
}

/// A member as seen by describe.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    /// Member id.
    pub id: MemberId,
    /// Ordered: partitions owned.
    pub partitions: Vec<u32>,
    /// Deliveries not yet acked.
    pub pending: u64,
    /// ms since last heard from.
    pub idle_ms: u64,
}

/// A partition as seen by describe.
#[derive(Debug, Clone)]
pub struct PartitionInfo {
    /// Partition index.
    pub partition: u32,
    /// Ack floor.
    pub committed: u64,
    /// Partition's next offset.
    pub next: u64,
    /// Records not yet acked.
    pub lag: u64,
    /// Deliveries not yet acked.
    pub pending: u64,
    /// Ordered: owner.
    pub owner: Option<MemberId>,
}

/// A group as seen by describe.
#[derive(Debug, Clone)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Settings.
    pub config: GroupConfig,
    /// Members in join order.
    pub members: Vec<MemberInfo>,
    /// Per partition.
    pub partitions: Vec<PartitionInfo>,
    /// Messages moved to the dead-letter topic so far.
    pub dead_lettered: u64,
    /// Membership changes so far.
    pub generation: u64,
}

impl GroupInfo {
    /// Total lag.
    pub fn lag(&self) -> u64 {
        self.partitions.iter().map(|p| p.lag).sum()
    }
    /// Total pending.
    pub fn pending(&self) -> u64 {
        self.partitions.iter().map(|p| p.pending).sum()
    }
}

#[derive(Debug)]
struct Member {
    seq: u64,
    last_seen: Instant,
    /// Push members live as long as their stream; they do not time out.
    push: bool,
}

#[derive(Debug, Default)]
struct State {
    cursors: Vec<Cursor>,
    members: BTreeMap<MemberId, Member>,
    owners: Vec<Option<MemberId>>,
    targets: Vec<Option<MemberId>>,
    generation: u64,
    dead_lettered: u64,
    dirty: BTreeSet<usize>,
    round_robin: usize,
    /// Partitions of the topic this broker serves; only they are assigned to members.
    served: Served,
}

/// One consumer group.
#[derive(Debug)]
pub struct Group {
    /// Name.
    pub name: String,
    topic: Arc<Topic>,
    config: RwLock<GroupConfig>,
    state: Mutex<State>,
    /// Woken on acks, nacks, membership changes and resets.
    changed: Notify,
    /// Records deleted (by retention) before the group acked them.
    skipped: AtomicU64,
}

/// Result of a join.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The new member's id.
    pub member: MemberId,
    /// Generation after the join.
    pub generation: u64,
    /// Ordered: partitions the member owns now.
    pub partitions: Vec<u32>,
}

/// Every group of the broker.
#[derive(Debug)]
pub struct Groups {
    log: Arc<Log>,
    by_name: RwLock<BTreeMap<String, Arc<Group>>>,
    member_seq: AtomicU64,
    /// Distinguishes member ids of this process from those of an earlier one.
    incarnation: String,
}

fn group_key(name: &str) -> Vec<u8> {
    format!("g/{name}").into_bytes()
}

fn cursor_prefix(name: &str) -> Vec<u8> {
    format!("o/{name}/").into_bytes()
}

fn cursor_key(name: &str, partition: usize) -> Vec<u8> {
    let mut k = cursor_prefix(name);
    k.extend_from_slice(&(partition as u32).to_be_bytes());
    k
}

fn not_member(group: &str, member: &str) -> Error {
    Error::NotFound(format!(
        "member {member:?} is not in group {group:?} (it left or missed its session timeout); join again"
    ))
}

impl State {
    /// Marks `member` of group `group` as heard from now, or [`Error::NotFound`] when it is
    /// not a member.
    fn touch_member(&mut self, group: &str, member: &str) -> Result<(), Error> {
        let m = self
            .members
            .get_mut(member)
            .ok_or_else(|| not_member(group, member))?;
        m.last_seen = Instant::now();
        Ok(())
    }

    /// Follows the topic: cursors for partitions added since, and the partitions served.
    /// Returns whether either changed (an Ordered group then rebalances).
    fn ensure_partitions(&mut self, partitions: &[Arc<Partition>], served: Served) -> bool {
        let changed = self.cursors.len() < partitions.len() || self.served != served;
        self.served = served;
        while self.cursors.len() < partitions.len() {
            let p = &partitions[self.cursors.len()];
            // Partitions added after the group was created start at their beginning.
            self.cursors.push(Cursor::at(p.earliest_offset()));
            self.owners.push(None);
            self.targets.push(None);
            self.dirty.insert(self.cursors.len() - 1);
        }
        changed
    }

    fn rebalance(&mut self) {
        self.generation += 1;
        let mut order: Vec<(&u64, &MemberId)> =
            self.members.iter().map(|(id, m)| (&m.seq, id)).collect();
        order.sort();
        let order: Vec<MemberId> = order.into_iter().map(|(_, id)| id.clone()).collect();
        let mut turn = 0;
        for p in 0..self.cursors.len() {
            self.targets[p] = if order.is_empty() || !self.served.contains(p as u32) {
                None
            } else {
                turn += 1;
                Some(order[(turn - 1) % order.len()].clone())
            };
            self.handover(p);
        }
    }

    /// Gives partition `p` to its target owner once the current owner holds nothing of it.
    fn handover(&mut self, p: usize) {
        if self.owners[p] == self.targets[p] {
            return;
        }
        if let Some(owner) = &self.owners[p] {
            if self.members.contains_key(owner) && self.cursors[p].pending_of(owner) > 0 {
                return;
            }
        }
        self.owners[p].clone_from(&self.targets[p]);
        self.cursors[p].rewind_to_floor();
    }

    fn assignment(&self, member: &str) -> Vec<u32> {
        (0..self.owners.len())
            .filter(|p| {
                self.owners[*p].as_deref() == Some(member)
                    && self.targets[*p].as_deref() == Some(member)
            })
            .map(|p| p as u32)
            .collect()
    }

    fn remove_member(&mut self, member: &str, group_type: GroupType, now: Instant) -> bool {
        if self.members.remove(member).is_none() {
            return false;
        }
        for (p, c) in self.cursors.iter_mut().enumerate() {
            if c.release(member, now) > 0 {
                self.dirty.insert(p);
            }
        }
        if group_type == GroupType::Ordered {
            self.rebalance();
        } else {
            self.generation += 1;
        }
        true
    }
}

impl Groups {
    /// Loads every group stored in the log. Blocking. A group whose topic no longer exists
    /// is dropped with a warning.
    pub fn open(log: Arc<Log>) -> Result<Arc<Self>, Error> {
        let mut groups = BTreeMap::new();
        for (key, value) in log.scan_meta(b"g/")? {
            let meta: GroupMeta =
                serde_json::from_slice(&value).map_err(|e| Error::RecoverMetadata {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    detail: e.to_string(),
                })?;
            let topic = match log.topic(&meta.config.topic) {
                Ok(t) if t.id == meta.topic_id => t,
                _ => {
                    tracing::warn!(group = %meta.name, topic = %meta.config.topic, "group's topic is gone; group ignored");
                    continue;
                }
            };
            let mut cursors = Vec::new();
            for (k, v) in log.scan_meta(&cursor_prefix(&meta.name))? {
                let stored: CursorMeta =
                    serde_json::from_slice(&v).map_err(|e| Error::RecoverMetadata {
                        key: String::from_utf8_lossy(&k).into_owned(),
                        detail: e.to_string(),
                    })?;
                let once = stored
                    .delivered
                    .iter()
                    .flat_map(|(from, to)| *from..*to)
                    .map(|o| (o, 1));
                // Explicit counts come last so they win over the once-delivered ranges.
                cursors.push(Cursor::restore(
                    stored.floor,
                    stored.acked,
                    once.chain(stored.counts),
                ));
            }
            let n = cursors.len();
            let state = State {
                cursors,
                owners: vec![None; n],
                targets: vec![None; n],
                dead_lettered: meta.dead_lettered,
                ..State::default()
            };
            groups.insert(
                meta.name.clone(),
                Arc::new(Group {
                    name: meta.name.clone(),
                    topic,
                    config: RwLock::new(meta.config),
                    state: Mutex::new(state),
                    changed: Notify::new(),
                    skipped: AtomicU64::new(0),
                }),
            );
        }
        tracing::info!(groups = groups.len(), "groups recovered");
        Ok(Arc::new(Self {
            log,
            by_name: RwLock::new(groups),
            member_seq: AtomicU64::new(0),
            incarnation: format!("{:x}", log::now_ms()),
        }))
    }

    /// The group named `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Group>, Error> {
        self.by_name
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("group {name:?} does not exist")))
    }

    /// Every group, optionally only those of `topic`, sorted by name.
    pub fn list(&self, topic: Option<&str>) -> Vec<Arc<Group>> {
        self.by_name
            .read()
            .values()
            .filter(|g| topic.is_none_or(|t| g.topic.name == t))
            .cloned()
            .collect()
    }

    async fn start_offsets(&self, topic: &Arc<Topic>, start: StartFrom) -> Result<Vec<u64>, Error> {
        let log = Arc::clone(&self.log);
        let partitions = topic.partitions();
        tokio::task::spawn_blocking(move || {
            partitions
                .iter()
                .map(|p| match start {
                    StartFrom::Earliest => Ok(p.earliest_offset()),
                    StartFrom::Latest => Ok(p.next_offset()),
                    StartFrom::Timestamp(ts) => log.offset_for_timestamp(p, ts),
                })
                .collect()
        })
        .await
        .map_err(|e| Error::InvalidArgument(format!("start position task failed: {e}")))?
    }

    /// Creates a group; returns it and whether it is new. Identical settings: unchanged;
    /// other settings: [`Error::AlreadyExists`].
    pub async fn create(
        &self,
        name: &str,
        config: GroupConfig,
    ) -> Result<(Arc<Group>, bool), Error> {
        log::topic::validate_name(name).map_err(|e| {
            Error::InvalidArgument(e.to_string().replace("topic name", "group name"))
        })?;
        let config = config.normalized(name)?;
        if let Ok(existing) = self.get(name) {
            let current = existing.config.read().clone();
            return if current == config {
                Ok((existing, false))
            } else {
                Err(Error::AlreadyExists(format!(
                    "group {name:?} already exists on topic {:?} as {:?}; create it with identical settings or update it",
                    current.topic, current.group_type
                )))
            };
        }
        let topic = self.log.topic(&config.topic)?;
        let starts = self.start_offsets(&topic, config.start).await?;
        let meta = GroupMeta {
            name: name.to_owned(),
            config: config.clone(),
            topic_id: topic.id,
            dead_lettered: 0,
        };
        let mut puts = vec![(
            group_key(name),
            serde_json::to_vec(&meta).unwrap_or_default(),
        )];
        let cursors: Vec<Cursor> = starts.iter().map(|s| Cursor::at(*s)).collect();
        for (p, c) in cursors.iter().enumerate() {
            puts.push((cursor_key(name, p), encode_cursor(c)));
        }
        self.log.write_meta(puts, Vec::new(), true).await?;
        let n = cursors.len();
        let group = Arc::new(Group {
            name: name.to_owned(),
            topic,
            config: RwLock::new(config),
            state: Mutex::new(State {
                cursors,
                owners: vec![None; n],
                targets: vec![None; n],
                ..State::default()
            }),
            changed: Notify::new(),
            skipped: AtomicU64::new(0),
        });
        let mut groups = self.by_name.write();
        if let Some(raced) = groups.get(name) {
            return Ok((Arc::clone(raced), false));
        }
        groups.insert(name.to_owned(), Arc::clone(&group));
        tracing::info!(group = name, topic = %group.topic.name, "group created");
        Ok((group, true))
    }

    /// Changes `ack_wait_ms`, `max_deliveries`, `dead_letter_topic` and
    /// `session_timeout_ms`; topic, type and start are immutable.
    pub async fn update(&self, name: &str, config: GroupConfig) -> Result<Arc<Group>, Error> {
        let group = self.get(name)?;
        let config = config.normalized(name)?;
        let current = group.config.read().clone();
        if config.topic != current.topic || config.group_type != current.group_type {
            return Err(Error::InvalidArgument(format!(
                "group {name:?}: topic and type are immutable (topic {:?}, type {:?}); delete the group and create it again",
                current.topic, current.group_type
            )));
        }
        let config = GroupConfig {
            start: current.start,
            ..config
        };
        let meta = GroupMeta {
            name: name.to_owned(),
            config: config.clone(),
            topic_id: group.topic.id,
            dead_lettered: group.state.lock().dead_lettered,
        };
        self.log
            .write_meta(
                vec![(
                    group_key(name),
                    serde_json::to_vec(&meta).unwrap_or_default(),
                )],
                Vec::new(),
                true,
            )
            .await?;
        *group.config.write() = config;
        Ok(group)
    }

    /// Deletes a group and its state.
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        let group = self.get(name)?;
        let partitions = group.state.lock().cursors.len();
        let mut deletes = vec![group_key(name)];
        deletes.extend((0..partitions).map(|p| cursor_key(name, p)));
        self.log.write_meta(Vec::new(), deletes, true).await?;
        self.by_name.write().remove(name);
        group.changed.notify_waiters();
        tracing::info!(group = name, "group deleted");
        Ok(())
    }

    /// Deletes every group of `topic` (when the topic is deleted).
    pub async fn delete_for_topic(&self, topic: &str) -> Result<(), Error> {
        for g in self.list(Some(topic)) {
            self.delete(&g.name).await?;
        }
        Ok(())
    }

    /// Moves the group to `to`, forgetting pending deliveries.
    pub async fn reset(&self, name: &str, to: StartFrom) -> Result<Arc<Group>, Error> {
        let group = self.get(name)?;
        let starts = self.start_offsets(&group.topic, to).await?;
        {
            let mut st = group.state.lock();
            st.ensure_partitions(&group.topic.partitions(), group.topic.config().served);
            for (p, start) in starts.iter().enumerate() {
                if let Some(c) = st.cursors.get_mut(p) {
                    c.reset(*start);
                    st.dirty.insert(p);
                }
            }
        }
        self.persist(&group).await?;
        group.changed.notify_waiters();
        tracing::info!(group = name, to = ?to, "group reset");
        Ok(group)
    }

    /// Adds a member; creates the group first when `create` is given and it does not
    /// exist. Joining with another topic or type than the group has fails with
    /// [`Error::FailedPrecondition`].
    pub async fn join(
        &self,
        name: &str,
        create: Option<GroupConfig>,
        push: bool,
    ) -> Result<(Arc<Group>, Joined), Error> {
        let group = match (self.get(name), create) {
            (Ok(g), Some(want)) => {
                let have = g.config.read().clone();
                if want.topic != have.topic || want.group_type != have.group_type {
                    return Err(Error::FailedPrecondition(format!(
                        "group {name:?} reads topic {:?} as {:?}; this member asked for topic {:?} as {:?}",
                        have.topic, have.group_type, want.topic, want.group_type
                    )));
                }
                g
            }
            (Ok(g), None) => g,
            (Err(_), Some(config)) => self.create(name, config).await?.0,
            (Err(e), None) => return Err(e),
        };
        let seq = self.member_seq.fetch_add(1, Ordering::Relaxed);
        let member = format!("{name}-{}-{seq}", self.incarnation);
        let group_type = group.config.read().group_type;
        let joined = {
            let mut st = group.state.lock();
            st.ensure_partitions(&group.topic.partitions(), group.topic.config().served);
            st.members.insert(
                member.clone(),
                Member {
                    seq,
                    last_seen: Instant::now(),
                    push,
                },
            );
            if group_type == GroupType::Ordered {
                st.rebalance();
            } else {
                st.generation += 1;
            }
            Joined {
                partitions: st.assignment(&member),
                generation: st.generation,
                member,
            }
        };
        group.changed.notify_waiters();
        tracing::info!(group = name, member = %joined.member, generation = joined.generation, "member joined");
        Ok((group, joined))
    }

    /// Removes a member at once.
    pub fn leave(&self, name: &str, member: &str) -> Result<(), Error> {
        let group = self.get(name)?;
        let group_type = group.config.read().group_type;
        let removed = group
            .state
            .lock()
            .remove_member(member, group_type, Instant::now());
        if !removed {
            return Err(not_member(name, member));
        }
        group.changed.notify_waiters();
        tracing::info!(group = name, member, "member left");
        Ok(())
    }

    /// Marks a member alive; returns its generation and assignment.
    pub fn heartbeat(&self, name: &str, member: &str) -> Result<(u64, Vec<u32>), Error> {
        let group = self.get(name)?;
        let mut st = group.state.lock();
        st.touch_member(name, member)?;
        Ok((st.generation, st.assignment(member)))
    }

    /// Up to `max` deliveries for `member`, waiting up to `wait` for the first one.
    pub async fn pull(
        &self,
        name: &str,
        member: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, Error> {
        if max == 0 {
            return Err(Error::InvalidArgument(
                "max_messages must be at least 1".into(),
            ));
        }
        let group = self.get(name)?;
        let deadline = Instant::now() + wait;
        let mut appends = group.topic.subscribe_appends();
        loop {
            let changed = group.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            appends.borrow_and_update();
            let (taken, next_due) = group.take(member, max)?;
            if !taken.is_empty() {
                let out = self.read_deliveries(&group, taken).await;
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
            if self.get(name).is_err() {
                return Err(Error::NotFound(format!("group {name:?} was deleted")));
            }
        }
    }

    /// Reads the records of `taken` deliveries; offsets the log no longer has (deleted by
    /// retention) or cannot return (damaged) are settled and logged, never delivered.
    async fn read_deliveries(&self, group: &Arc<Group>, taken: Taken) -> Vec<Delivery> {
        let log = Arc::clone(&self.log);
        let partitions = group.topic.partitions();
        let read = tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(taken.len());
            let mut skipped = Vec::new();
            let mut i = 0;
            while i < taken.len() {
                let (p, start, _) = taken[i];
                // A run of consecutive offsets of one partition is one read.
                let mut j = i + 1;
                while j < taken.len() && taken[j].0 == p && taken[j].1 == taken[j - 1].1 + 1 {
                    j += 1;
                }
                let run = &taken[i..j];
                let records = match partitions.get(p as usize) {
                    Some(part) => log.read(part, start, usize::MAX, run.len()),
                    None => Ok(Vec::new()),
                };
                match records {
                    Ok(records) => {
                        // Both in offset order: one merge, no lookup per record.
                        let mut records = records.into_iter().peekable();
                        for (p, o, count) in run {
                            while records.next_if(|r| r.offset < *o).is_some() {}
                            match records.next_if(|r| r.offset == *o) {
                                Some(r) => out.push(Delivery {
                                    partition: *p,
                                    offset: *o,
                                    count: *count,
                                    record: r.record,
                                }),
                                None => skipped.push((*p, *o, "not stored".to_owned())),
                            }
                        }
                    }
                    Err(e) => {
                        let why = e.to_string();
                        skipped.extend(run.iter().map(|(p, o, _)| (*p, *o, why.clone())));
                    }
                }
                i = j;
            }
            (out, skipped)
        })
        .await;
        let (out, skipped) = read.unwrap_or_default();
        if !skipped.is_empty() {
            let mut st = group.state.lock();
            for (p, o, why) in &skipped {
                tracing::warn!(group = %group.name, topic = %group.topic.name, partition = p, offset = o, reason = %why, "message cannot be delivered; skipped");
                if let Some(c) = st.cursors.get_mut(*p as usize) {
                    c.settle(*o);
                }
                st.dirty.insert(*p as usize);
            }
        }
        out
    }

    /// Acks and nacks deliveries of `member`. `acks` are inclusive ranges
    /// `(partition, first offset, last offset)`; `nacks` name single offsets. Every
    /// reference is checked first: if any is unknown, already acked, held by another member
    /// or named twice, nothing changes.
    pub fn ack(
        &self,
        name: &str,
        member: &str,
        acks: &[(u32, u64, u64)],
        nacks: &[(u32, u64)],
        nack_delay: Duration,
        error: &str,
    ) -> Result<(), Error> {
        let group = self.get(name)?;
        let group_type = group.config.read().group_type;
        let acks = coalesce(name, acks)?;
        let mut nacked: Vec<(u32, u64)> = nacks.to_vec();
        nacked.sort_unstable();
        if let Some(w) = nacked.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::InvalidArgument(format!(
                "group {name:?}: partition {} offset {} is nacked twice in one request",
                w[0].0, w[0].1
            )));
        }
        {
            let mut st = group.state.lock();
            st.touch_member(name, member)?;
            for (p, from, to) in &acks {
                cursor(&st, name, *p)?
                    .can_ack_range(*from, *to, member)
                    .map_err(|e| ack_error(name, *p, &e))?;
            }
            for (p, o) in nacks {
                cursor(&st, name, *p)?
                    .can_ack(*o, member)
                    .map_err(|e| ack_error(name, *p, &e))?;
                if acks
                    .iter()
                    .any(|(ap, from, to)| ap == p && (*from..=*to).contains(o))
                {
                    return Err(Error::InvalidArgument(format!(
                        "partition {p} offset {o} is both acked and nacked in one request; send one of them"
                    )));
                }
            }
            let due = Instant::now() + nack_delay;
            for (p, from, to) in &acks {
                let p = *p as usize;
                st.cursors[p]
                    .ack_range(*from, *to, member)
                    .map_err(|e| ack_error(name, p as u32, &e))?;
                st.dirty.insert(p);
                if group_type == GroupType::Ordered {
                    st.handover(p);
                }
            }
            let max = group.config.read().max_deliveries;
            for (p, o) in nacks {
                let p = *p as usize;
                if group_type == GroupType::Ordered {
                    st.cursors[p].rewind_to(*o);
                } else {
                    let count = st.cursors[p]
                        .nack(*o, member, due, error)
                        .map_err(|e| ack_error(name, p as u32, &e))?;
                    if max > 0 && count >= max {
                        // Out of circulation now; the ticker writes it to the dead-letter
                        // topic.
                        st.cursors[p].hold(
                            &[*o],
                            DEAD_LETTER_HOLDER,
                            Instant::now(),
                            Duration::from_secs(60),
                        );
                    }
                }
                st.dirty.insert(p);
            }
        }
        group.changed.notify_waiters();
        Ok(())
    }

    /// Describes a group.
    pub fn describe(&self, name: &str) -> Result<GroupInfo, Error> {
        Ok(self.get(name)?.info())
    }

    /// Writes the dirty cursors of `group` (no fsync wait).
    async fn persist(&self, group: &Group) -> Result<(), Error> {
        let puts: Vec<(Vec<u8>, Vec<u8>)> = {
            let mut st = group.state.lock();
            let dirty = std::mem::take(&mut st.dirty);
            dirty
                .into_iter()
                .filter_map(|p| {
                    st.cursors
                        .get(p)
                        .map(|c| (cursor_key(&group.name, p), encode_cursor(c)))
                })
                .collect()
        };
        if puts.is_empty() {
            return Ok(());
        }
        self.log.write_meta(puts, Vec::new(), false).await
    }

    /// Persists every group's dirty state (at shutdown).
    pub async fn flush(&self) -> Result<(), Error> {
        for g in self.list(None) {
            self.persist(&g).await?;
        }
        Ok(())
    }

    /// Runs the ticker until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "group maintenance failed; retrying next tick");
            }
        }
    }

    /// One maintenance pass: session timeouts, ack-wait expiry, dead letters, persistence,
    /// work-queue deletion.
    pub async fn tick(&self) -> Result<(), Error> {
        let now = Instant::now();
        let groups = self.list(None);
        for g in &groups {
            let config = g.config.read().clone();
            let mut dead = Vec::new();
            let mut woke = false;
            {
                let mut st = g.state.lock();
                if st.ensure_partitions(&g.topic.partitions(), g.topic.config().served)
                    && config.group_type == GroupType::Ordered
                    && !st.members.is_empty()
                {
                    st.rebalance();
                    woke = true;
                }
                let timeout = Duration::from_millis(u64::from(config.session_timeout_ms));
                let gone: Vec<MemberId> = st
                    .members
                    .iter()
                    .filter(|(_, m)| !m.push && now.duration_since(m.last_seen) > timeout)
                    .map(|(id, _)| id.clone())
                    .collect();
                for m in gone {
                    tracing::info!(group = %g.name, member = %m, "member missed its session timeout; removed");
                    st.remove_member(&m, config.group_type, now);
                    woke = true;
                }
                let parts = g.topic.partitions();
                for p in 0..st.cursors.len() {
                    if let Some(part) = parts.get(p) {
                        let skipped = st.cursors[p].clamp_to(part.earliest_offset());
                        if skipped > 0 {
                            g.report_skip(p, skipped);
                            st.dirty.insert(p);
                        }
                    }
                    if config.group_type == GroupType::Shared {
                        if !st.cursors[p].expire(now).is_empty() {
                            woke = true;
                        }
                        let exhausted = st.cursors[p].exhausted(config.max_deliveries);
                        st.cursors[p].hold(
                            &exhausted,
                            DEAD_LETTER_HOLDER,
                            now,
                            Duration::from_secs(60),
                        );
                        let held = st.cursors[p].held_by(DEAD_LETTER_HOLDER);
                        if !held.is_empty() {
                            dead.extend(held.into_iter().map(|o| {
                                let count = st.cursors[p].count(o);
                                let error =
                                    st.cursors[p].last_error(o).unwrap_or_default().to_owned();
                                (p as u32, o, count, error)
                            }));
                        }
                    } else {
                        st.handover(p);
                    }
                }
            }
            if !dead.is_empty() {
                self.dead_letter(g, &config, dead).await;
                woke = true;
            }
            if woke {
                g.changed.notify_waiters();
            }
            self.persist(g).await?;
        }
        self.work_queue_retention(&groups).await
    }

    /// Writes exhausted messages to the dead-letter topic, then settles them.
    async fn dead_letter(
        &self,
        g: &Arc<Group>,
        config: &GroupConfig,
        dead: Vec<(u32, u64, u32, String)>,
    ) {
        let taken: Vec<(u32, u64, u32)> = dead.iter().map(|(p, o, c, _)| (*p, *o, *c)).collect();
        let deliveries = self.read_deliveries(g, taken).await;
        let dlq_config = log::TopicConfig {
            max_message_bytes: log::topic::MAX_MESSAGE_BYTES_LIMIT,
            ..log::TopicConfig::default()
        };
        if let Err(e) = self
            .log
            .create_topic(&config.dead_letter_topic, dlq_config)
            .await
        {
            if !matches!(e, Error::TopicExists { .. }) {
                tracing::warn!(group = %g.name, dlq = %config.dead_letter_topic, error = %e, "dead-letter topic unavailable; will retry");
                Self::release_held(g);
                return;
            }
        }
        for d in deliveries {
            let error = dead
                .iter()
                .find(|(p, o, _, _)| *p == d.partition && *o == d.offset)
                .map(|(_, _, _, e)| e.clone())
                .unwrap_or_default();
            let mut record = d.record;
            record.timestamp_ms = 0;
            let h = |k: &str, v: String| (k.to_owned(), Bytes::from(v));
            record
                .headers
                .push(h("weir-dlq-topic", g.topic.name.clone()));
            record
                .headers
                .push(h("weir-dlq-partition", d.partition.to_string()));
            record
                .headers
                .push(h("weir-dlq-offset", d.offset.to_string()));
            record
                .headers
                .push(h("weir-dlq-delivery-count", d.count.to_string()));
            record.headers.push(h("weir-dlq-group", g.name.clone()));
            record.headers.push(h("weir-dlq-error", error));
            match crate::produce::produce(
                &self.log,
                &config.dead_letter_topic,
                Some(0),
                vec![record],
            )
            .await
            {
                Ok(_) => {
                    let mut st = g.state.lock();
                    if let Some(c) = st.cursors.get_mut(d.partition as usize) {
                        c.settle(d.offset);
                    }
                    st.dirty.insert(d.partition as usize);
                    st.dead_lettered += 1;
                    tracing::info!(group = %g.name, topic = %g.topic.name, partition = d.partition, offset = d.offset, deliveries = d.count, dlq = %config.dead_letter_topic, "message dead-lettered");
                }
                Err(e) => {
                    tracing::warn!(group = %g.name, error = %e, "writing to the dead-letter topic failed; will retry");
                }
            }
        }
        Self::release_held(g);
        let meta = GroupMeta {
            name: g.name.clone(),
            config: config.clone(),
            topic_id: g.topic.id,
            dead_lettered: g.state.lock().dead_lettered,
        };
        let _ = self
            .log
            .write_meta(
                vec![(
                    group_key(&g.name),
                    serde_json::to_vec(&meta).unwrap_or_default(),
                )],
                Vec::new(),
                false,
            )
            .await;
    }

    /// Returns messages still held for dead-lettering to redelivery.
    fn release_held(g: &Group) {
        let now = Instant::now();
        let mut st = g.state.lock();
        for c in &mut st.cursors {
            c.release(DEAD_LETTER_HOLDER, now);
        }
    }

    /// For `WorkQueue` topics with at least one group: deletes batches every group has
    /// acked.
    async fn work_queue_retention(&self, groups: &[Arc<Group>]) -> Result<(), Error> {
        let mut floors: BTreeMap<String, (Arc<Topic>, Vec<u64>)> = BTreeMap::new();
        for g in groups {
            if g.topic.config().retention != Retention::WorkQueue {
                continue;
            }
            let st = g.state.lock();
            let entry = floors
                .entry(g.topic.name.clone())
                .or_insert_with(|| (Arc::clone(&g.topic), vec![u64::MAX; st.cursors.len()]));
            for (p, c) in st.cursors.iter().enumerate() {
                if let Some(f) = entry.1.get_mut(p) {
                    *f = (*f).min(c.floor());
                }
            }
        }
        for (topic, floors) in floors.into_values() {
            for (p, floor) in floors.into_iter().enumerate() {
                let Ok(part) = topic.partition(p as u32) else {
                    continue;
                };
                if floor != u64::MAX && floor > part.earliest_offset() {
                    self.log.truncate(part, floor).await?;
                }
            }
        }
        Ok(())
    }
}

fn ack_error(group: &str, partition: u32, e: &AckError) -> Error {
    Error::FailedPrecondition(format!("group {group:?} partition {partition}: {e}"))
}

/// The cursor of partition `p`, or an error naming the group.
fn cursor<'a>(st: &'a State, name: &str, p: u32) -> Result<&'a Cursor, Error> {
    st.cursors
        .get(p as usize)
        .ok_or_else(|| Error::InvalidArgument(format!("group {name:?} has no partition {p}")))
}

/// Sorts ack ranges by partition and offset and joins adjacent ones; an offset named twice
/// (Kafka would see a duplicate commit; here it is a client bug) or a range whose first
/// offset is after its last is refused.
fn coalesce(name: &str, acks: &[(u32, u64, u64)]) -> Result<Vec<(u32, u64, u64)>, Error> {
    let mut sorted = acks.to_vec();
    if !sorted.is_sorted() {
        sorted.sort_unstable();
    }
    let mut out: Vec<(u32, u64, u64)> = Vec::with_capacity(sorted.len().min(16));
    for (p, from, to) in sorted {
        if from > to {
            return Err(Error::InvalidArgument(format!(
                "group {name:?}: ack range {from}..={to} of partition {p} is empty; the first offset must not be after the last"
            )));
        }
        if let Some(last) = out.last_mut() {
            if last.0 == p && from <= last.2 {
                return Err(Error::InvalidArgument(format!(
                    "group {name:?}: partition {p} offset {} is acked twice in one request",
                    from.max(last.1)
                )));
            }
            if last.0 == p && from == last.2 + 1 {
                last.2 = to;
                continue;
            }
        }
        out.push((p, from, to));
    }
    Ok(out)
}

fn encode_cursor(c: &Cursor) -> Vec<u8> {
    serde_json::to_vec(&CursorMeta {
        floor: c.floor(),
        acked: c.acked().collect(),
        counts: c.counts().collect(),
        delivered: c.delivered_once(),
    })
    .unwrap_or_default()
}

impl Group {
    fn report_skip(&self, partition: usize, skipped: u64) {
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

    /// The topic read.
    pub fn topic(&self) -> &Arc<Topic> {
        &self.topic
    }

    /// Current generation and the member's assignment (Ordered).
    pub fn assignment(&self, member: &str) -> (u64, Vec<u32>) {
        let st = self.state.lock();
        (st.generation, st.assignment(member))
    }

    /// A snapshot for describe.
    pub fn info(&self) -> GroupInfo {
        let config = self.config();
        let parts = self.topic.partitions();
        let mut st = self.state.lock();
        st.ensure_partitions(&parts, self.topic.config().served);
        let now = Instant::now();
        let partitions = st
            .cursors
            .iter()
            .enumerate()
            .map(|(p, c)| {
                let next = parts.get(p).map_or(0, |x| x.next_offset());
                PartitionInfo {
                    partition: p as u32,
                    committed: c.floor(),
                    next,
                    lag: c.lag(next),
                    pending: c.pending_len() as u64,
                    owner: if config.group_type == GroupType::Ordered {
                        st.owners[p].clone()
                    } else {
                        None
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

    /// Chooses up to `max` offsets for `member` (which must be in the group); returns them as
    /// (partition, offset, count), and the earliest time a waiting redelivery becomes due.
    fn take(&self, member: &str, max: usize) -> Result<(Taken, Option<Instant>), Error> {
        let g = self;
        let config = g.config();
        let parts = g.topic.partitions();
        let now = Instant::now();
        let ack_wait = Duration::from_millis(u64::from(config.ack_wait_ms));
        let mut st = g.state.lock();
        st.touch_member(&g.name, member)?;
        st.ensure_partitions(&parts, g.topic.config().served);
        let n = st.cursors.len();
        let mut out = Vec::new();
        let start = st.round_robin;
        st.round_robin = st.round_robin.wrapping_add(1);
        for i in 0..n {
            if out.len() >= max {
                break;
            }
            let p = (start + i) % n;
            if config.group_type == GroupType::Ordered
                && (st.owners[p].as_deref() != Some(member)
                    || st.targets[p].as_deref() != Some(member))
            {
                continue;
            }
            let end = parts.get(p).map_or(0, |x| x.next_offset());
            let earliest = parts.get(p).map_or(0, |x| x.earliest_offset());
            let skipped = st.cursors[p].clamp_to(earliest);
            if skipped > 0 {
                g.report_skip(p, skipped);
            }
            let taken = st.cursors[p].take(member, max - out.len(), end, now, ack_wait);
            if !taken.is_empty() {
                st.dirty.insert(p);
            }
            out.extend(taken.into_iter().map(|(o, c)| (p as u32, o, c)));
        }
        let next_due = st.cursors.iter().filter_map(Cursor::next_due).min();
        Ok((out, next_due))
    }
}
