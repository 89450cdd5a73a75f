//! Periodic group work, one pass every [`super::TICK`] (run by [`crate::jobs`]):
//!
//! 1. follow the topic (new partitions, served partitions) and rebalance Ordered groups;
//! 2. remove pull members past their session timeout;
//! 3. move cursors past records retention deleted;
//! 4. Shared: redeliver after `ack_wait`, hold and write dead letters;
//!    Ordered: finish handovers;
//! 5. write changed cursors (no fsync wait: a crash redelivers at most one tick of acks);
//! 6. delete what every group of a work-queue topic has acked: groups coordinated here
//!    report their floors of partitions led elsewhere to those leaders, and the partitions
//!    led here go as far as the groups here and the reports from elsewhere allow;
//! 7. drop groups whose topic was deleted (through any broker).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;

use super::{
    Error, Group, GroupType, Groups,
    cursor::MemberId,
    delivery::{Claim, DEAD_LETTER_HOLD, DEAD_LETTER_HOLDER},
};
use crate::log::{self, topic::Retention};

/// A message that reached `max_deliveries`, on its way to the dead-letter topic.
#[derive(Debug, Clone)]
struct DeadLetter {
    claim: Claim,
    /// The last nack's error text.
    error: String,
}

impl Groups {
    /// One maintenance pass over every group (the steps in the module documentation).
    pub async fn tick(&self) -> Result<(), Error> {
        self.follow_coordinators().await;
        let groups = self.list(None);
        for g in &groups {
            if !g.topic_exists() {
                tracing::info!(group = %g.name, topic = %g.topic.name, "the group's topic was deleted; group deleted");
                self.delete_local(&g.name).await?;
                continue;
            }
            let (dead, mut woke) = g.maintain(Instant::now());
            if !dead.is_empty() {
                g.dead_letter(dead).await;
                woke = true;
            }
            if woke {
                g.changed.notify_waiters();
            }
            g.persist().await?;
            g.report_floors();
        }
        self.work_queue_retention(&groups).await
    }

    /// Step 6 for the partitions led here: for each work-queue topic, deletes batches below
    /// the lowest ack floor of its groups, here and (as reported) elsewhere. A topic with
    /// no group yet keeps its records.
    async fn work_queue_retention(&self, groups: &[Arc<Group>]) -> Result<(), Error> {
        for topic in self.log.topics() {
            if topic.config().retention != Retention::WorkQueue {
                continue;
            }
            let served = topic.config().served;
            let mut floors: Vec<u64> = vec![u64::MAX; topic.partitions().len()];
            let open_here: std::collections::BTreeSet<String> = groups
                .iter()
                .filter(|g| Arc::ptr_eq(&g.topic, &topic))
                .map(|g| g.name.clone())
                .collect();
            for g in groups.iter().filter(|g| Arc::ptr_eq(&g.topic, &topic)) {
                let st = g.state.lock();
                for (f, c) in floors.iter_mut().zip(&st.cursors) {
                    *f = (*f).min(c.floor());
                }
            }
            for (p, part) in topic.partitions().iter().enumerate() {
                let replicated = part.is_replicated();
                if !served.contains(p as u32) || (replicated && !self.log.leads(part)) {
                    continue;
                }
                let Some(reported) = self.remote.reported_floor(&topic, p as u32, &open_here)
                else {
                    continue;
                };
                let floor = floors[p].min(reported);
                if floor == u64::MAX || floor <= part.earliest_offset() {
                    continue;
                }
                if replicated {
                    // Through the partition's log, so every replica deletes the same records.
                    if let Err(e) = self.log.trim_replicated_to(part, floor).await {
                        tracing::debug!(topic = %topic.name, partition = p, error = %e, "work-queue deletion not proposed");
                    }
                } else {
                    self.log.truncate(Arc::clone(part), floor).await?;
                }
            }
        }
        Ok(())
    }
}

impl Group {
    /// Steps 1 to 4 for this group, under its lock: returns the messages to dead-letter
    /// and whether waiting members should look again.
    fn maintain(&self, now: Instant) -> (Vec<DeadLetter>, bool) {
        let config = self.config();
        let parts = self.topic.partitions();
        let served = self.topic.config().served;
        let ends: Vec<Option<(u64, u64)>> = (0..parts.len())
            .map(|p| self.ends(&parts, served, p))
            .collect();
        let mut dead = Vec::new();
        let mut woke = false;
        let mut st = self.state.lock();
        if st.ensure_partitions(&parts, self.assignable(&parts, served))
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
            tracing::info!(group = %self.name, member = %m, "member missed its session timeout; removed");
            st.remove_member(&m, config.group_type, now);
            woke = true;
        }
        for p in 0..st.cursors.len() {
            if let Some((earliest, _)) = ends.get(p).copied().flatten() {
                let skipped = st.cursors[p].clamp_to(earliest);
                if skipped > 0 {
                    self.report_skip(p, skipped);
                    st.dirty.insert(p);
                }
            }
            match config.group_type {
                GroupType::Shared => {
                    let cursor = &mut st.cursors[p];
                    if !cursor.expire(now).is_empty() {
                        woke = true;
                    }
                    let exhausted = cursor.exhausted(config.max_deliveries);
                    cursor.hold(&exhausted, DEAD_LETTER_HOLDER, now, DEAD_LETTER_HOLD);
                    dead.extend(cursor.held_by(DEAD_LETTER_HOLDER).into_iter().map(|o| {
                        DeadLetter {
                            claim: Claim {
                                partition: p as u32,
                                offset: o,
                                count: cursor.count(o),
                            },
                            error: cursor.last_error(o).unwrap_or_default().to_owned(),
                        }
                    }));
                }
                GroupType::Ordered => st.handover(p),
            }
        }
        (dead, woke)
    }

    /// Writes exhausted messages to the dead-letter topic (created on first use), then
    /// settles them. Messages that could not be written go back to redelivery.
    async fn dead_letter(&self, dead: Vec<DeadLetter>) {
        let config = self.config();
        let deliveries = self
            .read_deliveries(DEAD_LETTER_HOLDER, dead.iter().map(|d| d.claim).collect())
            .await;
        let dlq_config = log::TopicConfig {
            max_message_bytes: log::topic::MAX_MESSAGE_BYTES_LIMIT,
            ..log::TopicConfig::default()
        };
        if let Err(e) = self
            .remote
            .ensure_topic(&config.dead_letter_topic, dlq_config)
            .await
        {
            tracing::warn!(group = %self.name, dlq = %config.dead_letter_topic, error = %e.message, "dead-letter topic unavailable; will retry");
            self.release_held();
            return;
        }
        for d in deliveries {
            let error = dead
                .iter()
                .find(|x| x.claim.partition == d.partition && x.claim.offset == d.offset)
                .map(|x| x.error.clone())
                .unwrap_or_default();
            let mut record = d.record;
            record.timestamp_ms = 0;
            let h = |k: &str, v: String| (k.to_owned(), Bytes::from(v));
            record.headers.extend([
                h("weir-dlq-topic", self.topic.name.clone()),
                h("weir-dlq-partition", d.partition.to_string()),
                h("weir-dlq-offset", d.offset.to_string()),
                h("weir-dlq-delivery-count", d.count.to_string()),
                h("weir-dlq-group", self.name.clone()),
                h("weir-dlq-error", error),
            ]);
            match self.remote.produce(&config.dead_letter_topic, record).await {
                Ok(()) => {
                    let mut st = self.state.lock();
                    if let Some(c) = st.cursors.get_mut(d.partition as usize) {
                        c.settle(d.offset);
                    }
                    st.dirty.insert(d.partition as usize);
                    st.dead_lettered += 1;
                    tracing::info!(group = %self.name, topic = %self.topic.name, partition = d.partition, offset = d.offset, deliveries = d.count, dlq = %config.dead_letter_topic, "message dead-lettered");
                }
                Err(e) => {
                    tracing::warn!(group = %self.name, error = %e.message, "writing to the dead-letter topic failed; will retry");
                }
            }
        }
        self.release_held();
        if self.coordinator_partition.is_some() {
            // A replicated topic's group keeps no state on this broker's disk (its
            // dead-lettered count is not kept yet).
            return;
        }
        let written = match self.meta().entry() {
            Ok(entry) => self
                .log
                .write_meta(vec![entry], Vec::new(), false)
                .await
                .map_err(Error::from),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::warn!(group = %self.name, error = %e, "storing the dead-lettered count failed; it is written again with the next dead letter");
        }
    }

    /// Whether the group's topic is still the one in the log (not deleted, nor deleted and
    /// created again).
    fn topic_exists(&self) -> bool {
        self.log
            .topic(&self.topic.name)
            .is_ok_and(|t| t.id == self.topic.id)
    }

    /// Step 6 for partitions led elsewhere: reports this group's ack floors of a
    /// work-queue topic's partitions that other brokers lead to them (a replicated
    /// partition's replica here that does not lead counts as led elsewhere).
    fn report_floors(&self) {
        let config = self.topic.config();
        if config.retention != Retention::WorkQueue
            || (config.served.is_all() && config.replication_factor <= 1)
        {
            return;
        }
        let elsewhere: Vec<bool> = (0..self.topic.partitions().len() as u32)
            .map(|p| !config.served.contains(p) || self.remote.led_elsewhere(&self.topic.name, p))
            .collect();
        let floors: Vec<(u32, u64)> = self
            .state
            .lock()
            .cursors
            .iter()
            .enumerate()
            .filter(|(p, _)| elsewhere.get(*p).copied().unwrap_or(false))
            .map(|(p, c)| (p as u32, c.floor()))
            .collect();
        if floors.is_empty() {
            return;
        }
        self.remote.report_floors(&self.topic, &self.name, floors);
    }

    /// Returns messages still held for dead-lettering to redelivery.
    fn release_held(&self) {
        let now = Instant::now();
        let mut st = self.state.lock();
        for c in &mut st.cursors {
            c.release(DEAD_LETTER_HOLDER, now);
        }
    }
}
