//! The registry of a broker's groups: loading them at start-up, creating, updating,
//! deleting and resetting them, joining members, and writing their state.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use parking_lot::RwLock;

use super::{
    Error, Group, GroupConfig, Joined, StartFrom,
    cursor::Cursor,
    group::State,
    remote::{Remote, RemoteError, ReplicatedGroup},
    stored::{self, GroupMeta},
};
use crate::{
    log::{self, Log, Topic, keys},
    validate::{NameKind, quote, validate_name},
};

/// Longest a new group waits for the leader of a partition of its topic that is electing
/// one (a topic created a moment ago).
const LEADER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Longest a new group waits to hear the ends of the partitions other brokers lead, so its
/// first description (the answer to its creation) shows their lag.
const REMOTE_ENDS_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Every group of the broker.
#[derive(Debug)]
pub struct Groups {
    pub(super) log: Arc<Log>,
    by_name: RwLock<BTreeMap<String, Arc<Group>>>,
    /// Join order of members, broker-wide.
    member_seq: AtomicU64,
    /// Distinguishes member ids of this process from those of an earlier one.
    incarnation: String,
    /// The cluster: partitions led elsewhere, the metadata groups are recorded in.
    pub(super) remote: Arc<dyn Remote>,
}

impl Groups {
    /// Loads every group stored in the log. Blocking. A group whose topic no longer exists
    /// (or was created again since) is dropped with a warning.
    pub fn open(log: Arc<Log>, remote: Arc<dyn Remote>) -> Result<Arc<Self>, Error> {
        let mut groups = BTreeMap::new();
        for (key, value) in log.scan_meta(keys::GROUP_PREFIX)? {
            let meta = GroupMeta::decode(&key, &value)?;
            let topic = match log.topic(&meta.config.topic) {
                Ok(t) if t.id == meta.topic_id => t,
                _ => {
                    tracing::warn!(group = %meta.name, topic = %meta.config.topic, "group's topic is gone; group ignored");
                    continue;
                }
            };
            let cursors = log
                .scan_meta(&keys::cursor_prefix(&meta.name))?
                .iter()
                .map(|(k, v)| stored::decode_cursor(k, v))
                .collect::<Result<Vec<_>, _>>()?;
            let state = State::with_cursors(cursors, meta.dead_lettered);
            let group = Group::new(
                &meta.name,
                topic,
                Arc::clone(&log),
                meta.config,
                state,
                Arc::clone(&remote),
                None,
            );
            groups.insert(meta.name, Arc::new(group));
        }
        tracing::info!(groups = groups.len(), "groups recovered");
        Ok(Arc::new(Self {
            log,
            by_name: RwLock::new(groups),
            member_seq: AtomicU64::new(0),
            incarnation: format!("{:x}", log::now_ms()),
            remote,
        }))
    }

    /// The group named `name`; [`Error::CoordinatorMoved`] for a group of a replicated
    /// topic this broker does not coordinate now, else [`Error::GroupNotFound`].
    pub fn get(&self, name: &str) -> Result<Arc<Group>, Error> {
        if let Some(g) = self.by_name.read().get(name) {
            return Ok(Arc::clone(g));
        }
        if self.remote.is_replicated_group(name) {
            return Err(Error::CoordinatorMoved(name.to_owned()));
        }
        Err(Error::GroupNotFound(quote(name)))
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

    /// Offsets per partition of `topic` where `start` points: asked of their leaders for
    /// partitions another broker leads, from the log for the others.
    async fn start_offsets(
        &self,
        group: &str,
        topic: &Arc<Topic>,
        start: StartFrom,
    ) -> Result<Vec<u64>, Error> {
        let log = Arc::clone(&self.log);
        let partitions = topic.partitions();
        let served = topic.config().served;
        let elsewhere: Vec<bool> = partitions
            .iter()
            .map(|p| !served.contains(p.index) && self.remote.led_elsewhere(&topic.name, p.index))
            .collect();
        let mut offsets = tokio::task::spawn_blocking(move || {
            partitions
                .iter()
                .zip(elsewhere)
                .map(|(p, elsewhere)| {
                    if elsewhere {
                        return Ok(None);
                    }
                    match start {
                        StartFrom::Earliest => Ok(p.earliest_offset()),
                        StartFrom::Latest => Ok(p.next_offset()),
                        StartFrom::Timestamp(ts) => log.offset_for_timestamp(p, ts),
                    }
                    .map(Some)
                })
                .collect::<Result<Vec<Option<u64>>, log::Error>>()
        })
        .await
        .map_err(|e| Error::Task {
            group: topic.name.clone(),
            detail: e.to_string(),
        })??;
        for (p, offset) in offsets.iter_mut().enumerate() {
            if offset.is_none() {
                // A topic created a moment ago may still be electing its partitions' leaders.
                let deadline = std::time::Instant::now() + LEADER_WAIT;
                let at = loop {
                    match self.remote.offset_for(&topic.name, p as u32, start).await {
                        Err(e) if e.is_unavailable() && std::time::Instant::now() < deadline => {
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                        other => break other.map_err(|e| cluster_error(group, e))?,
                    }
                };
                *offset = Some(at);
            }
        }
        Ok(offsets.into_iter().flatten().collect())
    }

    /// Creates a group; returns it and whether it is new. Identical settings: unchanged;
    /// other settings: [`Error::GroupExists`].
    pub async fn create(
        &self,
        name: &str,
        config: GroupConfig,
    ) -> Result<(Arc<Group>, bool), Error> {
        validate_name(NameKind::Group, name)?;
        let config = config.normalized(name)?;
        match self.get(name) {
            Ok(existing) => {
                let current = existing.config();
                return if current == config {
                    Ok((existing, false))
                } else {
                    Err(Error::GroupExists {
                        group: name.to_owned(),
                        topic: current.topic,
                        group_type: current.group_type,
                    })
                };
            }
            // It exists, coordinated elsewhere: creating it here would reset its cursors.
            Err(e @ Error::CoordinatorMoved(_)) => return Err(e),
            Err(_) => {}
        }
        let topic = self.log.topic(&config.topic)?;
        let partition = self.remote.coordinator_partition(name, &topic.name);
        let starts = self.start_offsets(name, &topic, config.start).await?;
        let cursors: Vec<Cursor> = starts.iter().map(|s| Cursor::at(*s)).collect();
        let group = Group::new(
            name,
            topic,
            Arc::clone(&self.log),
            config.clone(),
            State::with_cursors(cursors, 0),
            Arc::clone(&self.remote),
            partition,
        );
        let mut cursors = Vec::new();
        for (p, c) in group.state.lock().cursors.iter().enumerate() {
            cursors.push((p as u32, stored::cursor_entry(name, p as u32, c)?));
        }
        if let Some(p) = partition {
            // A replicated topic's group keeps its state in its coordinator partition's log.
            let encoded = cursors.into_iter().map(|(p, (_, v))| (p, v)).collect();
            self.remote
                .store_cursors(&group.topic.name, p, name, encoded)
                .await
                .map_err(|e| cluster_error(name, e))?;
        } else {
            let mut puts = vec![group.meta().entry()?];
            puts.extend(cursors.into_iter().map(|(_, e)| e));
            self.log.write_meta(puts, Vec::new(), true).await?;
        }
        let group = Arc::new(group);
        {
            let mut groups = self.by_name.write();
            if let Some(raced) = groups.get(name) {
                return Ok((Arc::clone(raced), false));
            }
            groups.insert(name.to_owned(), Arc::clone(&group));
        }
        // Recorded in the cluster's metadata last: a group there always exists here.
        if let Err(e) = self.remote.put_group(name, &config).await {
            self.delete_local(name).await?;
            return Err(cluster_error(name, e));
        }
        group.await_remote_ends(REMOTE_ENDS_WAIT).await;
        tracing::info!(group = name, topic = %group.topic.name, "group created");
        Ok((group, true))
    }

    /// Changes `ack_wait_ms`, `max_deliveries`, `dead_letter_topic` and
    /// `session_timeout_ms`; topic, type and start are immutable.
    pub async fn update(&self, name: &str, config: GroupConfig) -> Result<Arc<Group>, Error> {
        let group = self.get(name)?;
        let config = config.normalized(name)?;
        let current = group.config();
        if config.topic != current.topic || config.group_type != current.group_type {
            return Err(Error::Immutable {
                group: name.to_owned(),
                topic: current.topic,
                group_type: current.group_type,
            });
        }
        let config = GroupConfig {
            start: current.start,
            ..config
        };
        self.remote
            .put_group(name, &config)
            .await
            .map_err(|e| cluster_error(name, e))?;
        if group.coordinator_partition.is_none() {
            let mut meta = group.meta();
            meta.config = config.clone();
            self.log
                .write_meta(vec![meta.entry()?], Vec::new(), true)
                .await?;
        }
        *group.config.write() = config;
        Ok(group)
    }

    /// Deletes a group and its state, from the cluster's metadata first.
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        self.get(name)?;
        self.remote
            .delete_group(name)
            .await
            .map_err(|e| cluster_error(name, e))?;
        self.delete_local(name).await
    }

    /// Deletes a group and its state here only (its topic is gone, so the cluster's
    /// metadata dropped it already).
    pub(super) async fn delete_local(&self, name: &str) -> Result<(), Error> {
        let group = self.get(name)?;
        if let Some(p) = group.coordinator_partition {
            // Its cursors leave its coordinator partition's state (best effort: a group
            // created again with this name writes all its cursors anew).
            if let Err(e) = self
                .remote
                .store_cursors(&group.topic.name, p, name, Vec::new())
                .await
            {
                tracing::warn!(group = name, error = %e.message, "the deleted group's cursors stay in its coordinator partition's state");
            }
        } else {
            let partitions = group.state.lock().cursors.len() as u32;
            let mut deletes = vec![keys::group_key(name)];
            deletes.extend((0..partitions).map(|p| keys::cursor_key(name, p)));
            self.log.write_meta(Vec::new(), deletes, true).await?;
        }
        self.by_name.write().remove(name);
        group.deleted.store(true, Ordering::Release);
        group.changed.notify_waiters();
        tracing::info!(group = name, "group deleted");
        Ok(())
    }

    /// Deletes every group of `topic` (when the topic is deleted).
    pub async fn delete_for_topic(&self, topic: &str) -> Result<(), Error> {
        for g in self.list(Some(topic)) {
            self.delete_local(&g.name).await?;
        }
        Ok(())
    }

    /// Moves the group to `to`, forgetting pending deliveries.
    pub async fn reset(&self, name: &str, to: StartFrom) -> Result<Arc<Group>, Error> {
        let group = self.get(name)?;
        let starts = self.start_offsets(name, &group.topic, to).await?;
        {
            let mut st = group.state.lock();
            let parts = group.topic.partitions();
            st.ensure_partitions(
                &parts,
                group.assignable(&parts, group.topic.config().served),
            );
            for (p, start) in starts.iter().enumerate() {
                if let Some(c) = st.cursors.get_mut(p) {
                    c.reset(*start);
                    st.dirty.insert(p);
                }
            }
        }
        group.persist().await?;
        group.changed.notify_waiters();
        tracing::info!(group = name, to = ?to, "group reset");
        Ok(group)
    }

    /// Adds a member (a push member when `push`); creates the group first when `create` is
    /// given and it does not exist. Joining with another topic or type than the group has
    /// fails with [`Error::JoinMismatch`].
    pub async fn join(
        &self,
        name: &str,
        create: Option<GroupConfig>,
        push: bool,
    ) -> Result<(Arc<Group>, Joined), Error> {
        let group = match (self.get(name), create) {
            (Ok(g), Some(want)) => {
                let have = g.config();
                if want.topic != have.topic || want.group_type != have.group_type {
                    return Err(Error::JoinMismatch {
                        group: name.to_owned(),
                        have_topic: have.topic,
                        have_type: have.group_type,
                        want_topic: quote(&want.topic),
                        want_type: want.group_type,
                    });
                }
                g
            }
            (Ok(g), None) => g,
            (Err(_), Some(config)) => self.create(name, config).await?.0,
            (Err(e), None) => return Err(e),
        };
        let seq = self.member_seq.fetch_add(1, Ordering::Relaxed);
        let member = format!("{name}-{}-{seq}", self.incarnation);
        let joined = group.add_member(member, seq, push);
        Ok((group, joined))
    }

    /// Persists every group's changed state (at shutdown).
    pub async fn flush(&self) -> Result<(), Error> {
        for g in self.list(None) {
            g.persist().await?;
        }
        Ok(())
    }
}

impl Groups {
    /// Follows the leadership of the coordinator partitions of groups of replicated
    /// topics: opens each such group whose coordinator partition this broker now leads
    /// (settings from the cluster's metadata, cursors as committed in that partition's log)
    /// and closes each it no longer leads (its members' calls and streams end with
    /// [`Error::CoordinatorMoved`]; they join again at the new coordinator). Runs every
    /// [`super::TICK`]. A group created here and not yet in the cluster's metadata stays.
    pub(super) async fn follow_coordinators(&self) {
        let known = self.remote.replicated_groups();
        for g in &known {
            if g.led_here {
                continue;
            }
            let moved = {
                let mut by_name = self.by_name.write();
                match by_name.get(&g.name) {
                    Some(open) if open.coordinator_partition.is_some() => by_name.remove(&g.name),
                    _ => None,
                }
            };
            if let Some(group) = moved {
                group.moved.store(true, Ordering::Release);
                group.changed.notify_waiters();
                tracing::info!(group = %g.name, topic = %g.config.topic, partition = g.partition, "the group's coordinator partition is led elsewhere now; group closed here");
            }
        }
        for g in known {
            if !g.led_here || self.by_name.read().contains_key(&g.name) {
                continue;
            }
            match self.open_replicated(&g).await {
                Ok(group) => {
                    let mut by_name = self.by_name.write();
                    by_name.entry(g.name.clone()).or_insert(group);
                    tracing::info!(group = %g.name, topic = %g.config.topic, partition = g.partition, "this broker leads the group's coordinator partition; group opened");
                }
                Err(e) => {
                    tracing::debug!(group = %g.name, error = %e, "group not opened yet");
                }
            }
        }
    }

    /// Opens a group of a replicated topic from its coordinator partition's log: the
    /// cursors as committed there; partitions without one (added since) start at their
    /// earliest record.
    async fn open_replicated(&self, g: &ReplicatedGroup) -> Result<Arc<Group>, Error> {
        let topic = self.log.topic(&g.config.topic)?;
        let stored = self
            .remote
            .load_cursors(&topic.name, g.partition, &g.name)
            .await
            .map_err(|e| cluster_error(&g.name, e))?;
        let by_partition: BTreeMap<u32, Vec<u8>> = stored.into_iter().collect();
        let mut cursors = Vec::new();
        while let Some(value) = by_partition.get(&(cursors.len() as u32)) {
            let key = keys::cursor_key(&g.name, cursors.len() as u32);
            cursors.push(stored::decode_cursor(&key, value)?);
        }
        Ok(Arc::new(Group::new(
            &g.name,
            topic,
            Arc::clone(&self.log),
            g.config.clone(),
            State::with_cursors(cursors, 0),
            Arc::clone(&self.remote),
            Some(g.partition),
        )))
    }
}

impl Group {
    /// Writes the cursors changed since the last write: into the log's metadata keyspace
    /// (no fsync wait; on failure they stay marked and are written with the next call), or
    /// for a group of a replicated topic as one entry of its coordinator partition's Raft
    /// log (returns once committed; when refused, because this broker no longer leads that
    /// partition, they stay marked and the group is about to close here).
    pub(super) async fn persist(&self) -> Result<(), Error> {
        let _one_at_a_time = self.persisting.lock().await;
        let (dirty, puts) = self.take_dirty_cursors()?;
        let generation = self.taken.load(Ordering::Acquire);
        if puts.is_empty() {
            // Nothing dirty and no write in flight: every earlier generation is stored.
            self.persisted.fetch_max(generation, Ordering::AcqRel);
            return Ok(());
        }
        if let Some(p) = self.coordinator_partition {
            let cursors = puts.into_iter().map(|(p, (_, v))| (p, v)).collect();
            match self
                .remote
                .store_cursors(&self.topic.name, p, &self.name, cursors)
                .await
            {
                Ok(()) => {
                    self.persisted.fetch_max(generation, Ordering::AcqRel);
                }
                Err(e) => {
                    self.mark_dirty(dirty);
                    tracing::debug!(group = %self.name, error = %e.message, "cursors not stored in the coordinator partition's log; retried");
                }
            }
            return Ok(());
        }
        let puts = puts.into_iter().map(|(_, e)| e).collect();
        if let Err(e) = self.log.write_meta(puts, Vec::new(), false).await {
            self.mark_dirty(dirty);
            return Err(e.into());
        }
        self.persisted.fetch_max(generation, Ordering::AcqRel);
        Ok(())
    }

    /// For a group of a replicated topic, waits until what changed before this call (an
    /// ack just taken) is committed in its coordinator partition's log, writing it now
    /// rather than at the next tick (acks waiting meanwhile share one write). So an ack
    /// answered is never lost with the coordinator, as Kafka answers an offset commit only
    /// once it is replicated. Other groups return at once (their cursors are written every
    /// tick, without an fsync wait: an ack may come again after a crash).
    ///
    /// # Errors
    ///
    /// [`Error::CoordinatorMoved`] when the write was refused (this broker no longer leads
    /// the coordinator partition): the ack may be lost, the client is told so.
    pub async fn until_persisted(&self) -> Result<(), Error> {
        if self.coordinator_partition.is_none() {
            return Ok(());
        }
        let need = self.taken.load(Ordering::Acquire) + 1;
        self.persist().await?;
        if self.persisted.load(Ordering::Acquire) >= need {
            Ok(())
        } else {
            Err(Error::CoordinatorMoved(self.name.clone()))
        }
    }
}

fn cluster_error(group: &str, e: RemoteError) -> Error {
    Error::Cluster {
        group: group.to_owned(),
        code: e.code,
        message: e.message,
    }
}
