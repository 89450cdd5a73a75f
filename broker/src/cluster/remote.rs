//! The cluster as a group coordinator sees it ([`crate::groups::Remote`]): partitions led
//! by other brokers followed and read over the pooled inter-broker channels, group settings
//! recorded through the metadata group, dead letters produced at their topic's leader, and
//! work-queue ack floors exchanged with the leaders that delete records.
//!
//! Following a partition: one task per partition led elsewhere that a group here reads. It
//! asks the leader for the partition's ends (a [`PeerCall::Ends`]), then long-polls a
//! `Fetch` at the end; each answer carries the leader's earliest and next offsets, so a
//! group's lag and pulls follow the leader within one round trip of an append. While a
//! group reads at the end (its last read reached what the follower knew), the fetch takes
//! the new records too (at most [`TAIL_BYTES`]), and the group's next read of them is
//! answered from memory instead of a second fetch; otherwise it takes one record, which
//! only wakes it. A task that no group asked about for [`IDLE`] stops.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tonic::Code;
use weir_proto::v1::{
    self as pb, consumer_client::ConsumerClient, producer_client::ProducerClient,
};

use super::{AdminOp, BrokerId, Cluster, Error, route::Route};
use crate::{
    groups::{GroupConfig, ReadError, Remote, RemoteError, ReplicatedGroup, StartFrom},
    log::{self, Log, Record, StoredRecord, Topic, TopicConfig},
};

/// A partition follower stops after this long without a group asking about it.
pub const IDLE: Duration = Duration::from_secs(60);
/// Longest a follower's fetch waits at the leader for a record.
const FOLLOW_WAIT_MS: u32 = 5_000;
/// Pause after a follower's fetch that found records, so a busy partition costs one
/// round trip per few milliseconds, not one per record.
const FOLLOW_PAUSE: Duration = Duration::from_millis(2);
/// Pause after a failed follower call.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Ack floors are sent again at least this often, also unchanged (a restarted leader
/// keeps them in memory only).
const FLOORS_EVERY: Duration = Duration::from_secs(5);
/// Most bytes one remote read asks for.
const READ_BYTES: u32 = 4 * 1024 * 1024;
/// Most bytes of records a follower's fetch takes for groups reading at the end (Kafka's
/// `max.partition.fetch.bytes` is 1 MiB; a follower keeps one answer per partition).
const TAIL_BYTES: u32 = 64 * 1024;
/// A group's read counts as reading at the end for this long: the follower's fetches take
/// records only while one did (a group that stopped reading would not use them).
const TAIL_READER: Duration = Duration::from_secs(1);

/// A call between brokers other than Raft's (`weir.v1.Raft/Peer`, JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerCall {
    /// The earliest and next offsets of a partition led by the callee.
    Ends {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
    },
    /// The offset `start` points at in a partition led by the callee (Kafka's
    /// `ListOffsets`).
    Offset {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// Earliest, latest or by timestamp.
        start: StartFrom,
    },
    /// A group's ack floors of a work-queue topic's partitions led by the callee.
    Floors {
        /// Topic name.
        topic: String,
        /// The topic's cluster-wide id (a topic deleted and created again is another).
        topic_id: u64,
        /// Group name.
        group: String,
        /// `(partition, floor)`: every offset below `floor` is acked by the group.
        floors: Vec<(u32, u64)>,
    },
}

/// The answer to a [`PeerCall`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PeerAnswer {
    /// `Ends`: `(earliest, next)`.
    Ends(u64, u64),
    /// `Offset`.
    Offset(u64),
    /// `Floors`: stored.
    Done,
}

/// Ack floors other brokers' groups reported for partitions led here, by `(topic, group)`:
/// the topic's cluster-wide id and `(partition, floor)` pairs.
pub(super) type ReportedFloors = HashMap<(String, String), (u64, Vec<(u32, u64)>)>;

/// Ack floors a coordinator last sent, by `(topic, group)`, and when.
type SentFloors = HashMap<(String, String), (Vec<(u32, u64)>, Instant)>;

impl Cluster {
    /// Serves a [`PeerCall`] from another broker.
    ///
    /// # Errors
    ///
    /// The log's errors (unknown topic or partition, a partition not led here).
    pub async fn peer_here(&self, call: PeerCall) -> Result<PeerAnswer, Error> {
        match call {
            PeerCall::Ends { topic, partition } => {
                let part = self.log.topic(&topic)?.served_partition(partition)?;
                Ok(PeerAnswer::Ends(part.earliest_offset(), part.next_offset()))
            }
            PeerCall::Offset {
                topic,
                partition,
                start,
            } => {
                let part = self.log.topic(&topic)?.served_partition(partition)?;
                let offset = match start {
                    StartFrom::Earliest => part.earliest_offset(),
                    StartFrom::Latest => part.next_offset(),
                    StartFrom::Timestamp(ts) => {
                        let log = Arc::clone(&self.log);
                        tokio::task::spawn_blocking(move || log.offset_for_timestamp(&part, ts))
                            .await
                            .map_err(|e| Error::Storage(e.to_string()))??
                    }
                };
                Ok(PeerAnswer::Offset(offset))
            }
            PeerCall::Floors {
                topic,
                topic_id,
                group,
                floors,
            } => {
                self.reported_floors
                    .lock()
                    .insert((topic, group), (topic_id, floors));
                Ok(PeerAnswer::Done)
            }
        }
    }

    /// Sends `call` to the broker at `address`.
    async fn peer(&self, address: &str, call: &PeerCall) -> Result<PeerAnswer, RemoteError> {
        let json = serde_json::to_vec(call).map_err(|e| RemoteError {
            code: Code::Internal as i32,
            message: e.to_string(),
        })?;
        let mut client =
            weir_proto::v1::raft_client::RaftClient::new(self.channel(address).map_err(remote)?);
        let mut request = tonic::Request::new(pb::RaftMessage { json: json.into() });
        request.set_timeout(Duration::from_secs(10));
        // The peer answers once it has applied the metadata as far as this broker (a topic
        // created a moment ago exists there too).
        crate::grpc::with_metadata_index(&mut request, self.applied_index());
        let answer = client.peer(request).await.map_err(|s| RemoteError {
            code: s.code() as i32,
            message: format!("broker at {address}: {}", s.message()),
        })?;
        let answer: Result<PeerAnswer, super::RemoteError> =
            serde_json::from_slice(&answer.into_inner().json).map_err(|e| RemoteError {
                code: Code::Internal as i32,
                message: format!("undecodable answer of the broker at {address}: {e}"),
            })?;
        answer.map_err(|e| RemoteError {
            code: e.code,
            message: e.message,
        })
    }

    /// The address of the leader of `topic`/`partition` when another broker leads it.
    fn leader_address(&self, topic: &str, partition: u32) -> Result<String, RemoteError> {
        match self.route_partition(topic, partition) {
            Route::Leader { address, .. } => Ok(address),
            _ => Err(RemoteError {
                code: Code::Unavailable as i32,
                message: format!(
                    "partition {partition} of topic {topic:?} has no leader on another broker"
                ),
            }),
        }
    }
}

fn remote(e: Error) -> RemoteError {
    let status = tonic::Status::from(e);
    RemoteError {
        code: status.code() as i32,
        message: status.message().to_owned(),
    }
}

/// What a follower knows of a partition led elsewhere.
#[derive(Debug, Default)]
struct Followed {
    earliest: AtomicU64,
    next: AtomicU64,
    known: AtomicBool,
    /// When a group last asked (ms since the follower started).
    asked_ms: AtomicU64,
    /// When a group's read last reached the end the follower knew (ms since the follower
    /// started, plus one: 0 is never).
    at_end_ms: AtomicU64,
    /// The records of the follower's last fetch, until a read takes them.
    tail: Mutex<Option<Tail>>,
}

impl Followed {
    /// Notes that a group's read reached offset `reached` (the offset after its last
    /// record): at the end the follower knows, the next fetches take records.
    fn note_read(&self, reached: u64, started: Instant) {
        if reached >= self.next.load(Ordering::Acquire) {
            let now = started.elapsed().as_millis() as u64;
            self.at_end_ms.store(now + 1, Ordering::Relaxed);
        }
    }
}

/// Records a follower's fetch brought, in offset order without gaps: committed at the
/// leader, so an offset's record never changes.
#[derive(Debug)]
struct Tail {
    /// The local id of the topic they belong to ([`Topic::id`]; a topic deleted and created
    /// again has another).
    topic_id: u32,
    records: Vec<StoredRecord>,
}

impl Tail {
    /// Up to `max` records from `offset` on, when `offset` is within the tail (offsets may
    /// skip a range whose loss was accepted at the leader: the records after it come next).
    fn take(&self, offset: u64, max: usize) -> Option<Vec<StoredRecord>> {
        let (first, last) = (self.records.first()?.offset, self.records.last()?.offset);
        if offset < first || offset > last {
            return None;
        }
        let at = self.records.partition_point(|r| r.offset < offset);
        let rest = self.records.get(at..)?;
        Some(rest.iter().take(max).cloned().collect())
    }
}

/// [`Remote`] over this broker's cluster.
#[derive(Debug)]
pub struct GroupsRemote {
    cluster: Arc<Cluster>,
    log: Arc<Log>,
    followed: Mutex<HashMap<(String, u32), Arc<Followed>>>,
    /// Floors last sent, by `(topic, group)`, and when.
    sent: Mutex<SentFloors>,
    started: Instant,
    /// Itself, for the follower tasks it starts.
    me: std::sync::Weak<GroupsRemote>,
}

impl GroupsRemote {
    /// The groups' view of `cluster`, whose local log is `log`.
    pub fn new(cluster: Arc<Cluster>, log: Arc<Log>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            cluster,
            log,
            followed: Mutex::new(HashMap::new()),
            sent: Mutex::new(HashMap::new()),
            started: Instant::now(),
            me: me.clone(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Up to `max` records of `topic` from `offset` on from `f`'s tail, when it holds
    /// `offset`; a tail read to its end is dropped.
    fn read_tail(
        &self,
        f: &Followed,
        topic: &str,
        offset: u64,
        max: usize,
    ) -> Option<Vec<StoredRecord>> {
        let topic_id = self.log.topic(topic).ok()?.id;
        let records = {
            let mut tail = f.tail.lock();
            let kept = tail.as_ref().filter(|t| t.topic_id == topic_id)?;
            let records = kept.take(offset, max)?;
            if records.last().map(|r| r.offset) == kept.records.last().map(|r| r.offset) {
                *tail = None;
            }
            records
        };
        let reached = records.last().map_or(offset, |r| r.offset + 1);
        f.note_read(reached, self.started);
        Some(records)
    }

    /// Follows `topic`/`partition` until no group asked for [`IDLE`], the topic is gone
    /// here, or the partition is led here.
    async fn follow(self: Arc<Self>, topic: Arc<Topic>, partition: u32, f: Arc<Followed>) {
        let key = (topic.name.clone(), partition);
        loop {
            let idle = self
                .now_ms()
                .saturating_sub(f.asked_ms.load(Ordering::Relaxed));
            let current = self.log.topic(&topic.name);
            if idle > IDLE.as_millis() as u64
                || !current.is_ok_and(|t| Arc::ptr_eq(&t, &topic))
                || topic.config().served.contains(partition)
            {
                break;
            }
            let pause = match self.follow_once(&topic, partition, &f).await {
                Ok(true) => FOLLOW_PAUSE,
                Ok(false) => Duration::ZERO,
                Err(e) => {
                    tracing::debug!(topic = %topic.name, partition, error = %e.message, "following a partition led elsewhere");
                    f.known.store(false, Ordering::Release);
                    RETRY_PAUSE
                }
            };
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        self.followed.lock().remove(&key);
    }

    /// One step of following: the ends when unknown, else one long-polling fetch at the
    /// end. Returns whether records arrived.
    async fn follow_once(
        &self,
        topic: &Topic,
        partition: u32,
        f: &Followed,
    ) -> Result<bool, RemoteError> {
        let address = self.cluster.leader_address(&topic.name, partition)?;
        let (earliest, next) = if f.known.load(Ordering::Acquire) {
            let offset = f.next.load(Ordering::Acquire);
            let at_end = f.at_end_ms.load(Ordering::Relaxed);
            let take_records = at_end != 0
                && self.now_ms().saturating_sub(at_end - 1) < TAIL_READER.as_millis() as u64;
            let mut client = ConsumerClient::new(self.cluster.channel(&address).map_err(remote)?)
                .max_decoding_message_size(crate::grpc::MAX_MESSAGE_BYTES);
            let mut request = tonic::Request::new(pb::FetchRequest {
                topic: topic.name.clone(),
                partition,
                offset,
                max_bytes: if take_records { TAIL_BYTES } else { 1 },
                // 0: no count limit.
                max_records: u32::from(!take_records),
                max_wait_ms: FOLLOW_WAIT_MS,
            });
            mark_forwarded(&mut request);
            request.set_timeout(Duration::from_millis(u64::from(FOLLOW_WAIT_MS) + 5_000));
            let answer = client.fetch(request).await.map_err(|s| RemoteError {
                code: s.code() as i32,
                message: s.message().to_owned(),
            })?;
            let answer = answer.into_inner();
            let ends = (answer.earliest_offset, answer.next_offset);
            if take_records && answer.records.first().is_some_and(|r| r.offset == offset) {
                // Kept before the append signal below wakes the groups that read them; a
                // malformed answer is not kept (the groups' reads fetch and report it).
                if let Ok(records) = stored_records(answer.records) {
                    *f.tail.lock() = Some(Tail {
                        topic_id: topic.id,
                        records,
                    });
                }
            }
            ends
        } else {
            let call = PeerCall::Ends {
                topic: topic.name.clone(),
                partition,
            };
            match self.cluster.peer(&address, &call).await? {
                PeerAnswer::Ends(earliest, next) => (earliest, next),
                other => {
                    return Err(RemoteError {
                        code: Code::Internal as i32,
                        message: format!("unexpected answer {other:?} to {call:?}"),
                    });
                }
            }
        };
        let before = (
            f.earliest.swap(earliest, Ordering::AcqRel),
            f.next.swap(next, Ordering::AcqRel),
        );
        let was_known = f.known.swap(true, Ordering::AcqRel);
        let changed = !was_known || before != (earliest, next);
        if changed {
            topic.appended.bump();
        }
        Ok(changed && next > before.1)
    }
}

/// The records of a leader's `Fetch` answer; a record without its body (a malformed
/// answer) is an error that names its offset.
fn stored_records(records: Vec<pb::StoredRecord>) -> Result<Vec<StoredRecord>, String> {
    records
        .into_iter()
        .map(|r| match r.record {
            Some(record) => Ok(StoredRecord {
                offset: r.offset,
                record: crate::grpc::convert::record_from_pb(record),
            }),
            None => Err(format!(
                "the leader answered offset {} without its record",
                r.offset
            )),
        })
        .collect()
}

/// Marks `request` as forwarded, so the leader serves it itself.
fn mark_forwarded<T>(request: &mut tonic::Request<T>) {
    request.metadata_mut().insert(
        super::route::FORWARDED,
        tonic::metadata::MetadataValue::from_static("1"),
    );
}

/// No replica of partition `partition` of `topic` on this broker.
fn not_here(topic: &str, partition: u32) -> RemoteError {
    unavailable(format!(
        "this broker holds no replica of partition {partition} of topic {topic:?}"
    ))
}

/// A replica's refusal as the groups see it: not leading (or the outcome unknown after a
/// leadership change) is Unavailable (call again at the new leader), the rest Internal.
fn replica_error(e: &crate::log::Error) -> RemoteError {
    let code = match e {
        crate::log::Error::NotLeader { .. } | crate::log::Error::OutcomeUnknown { .. } => {
            Code::Unavailable
        }
        _ => Code::Internal,
    };
    RemoteError {
        code: code as i32,
        message: e.to_string(),
    }
}

fn unavailable(message: String) -> RemoteError {
    RemoteError {
        code: Code::Unavailable as i32,
        message,
    }
}

impl Remote for GroupsRemote {
    fn ends(&self, topic: &Arc<Topic>, partition: u32) -> Option<(u64, u64)> {
        let key = (topic.name.clone(), partition);
        let f = {
            let mut followed = self.followed.lock();
            if let Some(f) = followed.get(&key) {
                Arc::clone(f)
            } else {
                let f = Arc::new(Followed::default());
                followed.insert(key, Arc::clone(&f));
                f.asked_ms.store(self.now_ms(), Ordering::Relaxed);
                if let Some(me) = self.me.upgrade() {
                    tokio::spawn(me.follow(Arc::clone(topic), partition, Arc::clone(&f)));
                }
                f
            }
        };
        f.asked_ms.store(self.now_ms(), Ordering::Relaxed);
        f.known.load(Ordering::Acquire).then(|| {
            (
                f.earliest.load(Ordering::Acquire),
                f.next.load(Ordering::Acquire),
            )
        })
    }

    fn led_elsewhere(&self, topic: &str, partition: u32) -> bool {
        matches!(
            self.cluster.route_partition(topic, partition),
            Route::Leader { .. }
        )
    }

    fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> BoxFuture<'static, Result<Vec<StoredRecord>, ReadError>> {
        let followed = self
            .followed
            .lock()
            .get(&(topic.to_owned(), partition))
            .cloned();
        if let Some(f) = &followed
            && let Some(records) = self.read_tail(f, topic, offset, max)
        {
            return Box::pin(std::future::ready(Ok(records)));
        }
        let address = self.cluster.leader_address(topic, partition);
        let channel = address
            .as_ref()
            .ok()
            .map(|a| self.cluster.channel(a).map_err(remote));
        let topic = topic.to_owned();
        let started = self.started;
        Box::pin(async move {
            let address = address.map_err(|e| ReadError::Unavailable(e.message))?;
            let channel = channel
                .unwrap_or_else(|| Err(unavailable(format!("no channel to {address}"))))
                .map_err(|e| ReadError::Unavailable(e.message))?;
            let mut client = ConsumerClient::new(channel)
                .max_decoding_message_size(crate::grpc::MAX_MESSAGE_BYTES);
            let mut request = tonic::Request::new(pb::FetchRequest {
                topic,
                partition,
                offset,
                max_bytes: READ_BYTES,
                max_records: u32::try_from(max).unwrap_or(u32::MAX),
                max_wait_ms: 0,
            });
            mark_forwarded(&mut request);
            request.set_timeout(Duration::from_secs(10));
            match client.fetch(request).await {
                Ok(answer) => {
                    let records = stored_records(answer.into_inner().records).map_err(|why| {
                        ReadError::Unavailable(format!("leader at {address}: {why}"))
                    })?;
                    if let Some(f) = followed {
                        let reached = records.last().map_or(offset, |r| r.offset + 1);
                        f.note_read(reached, started);
                    }
                    Ok(records)
                }
                Err(s) => {
                    let why = format!("leader at {address}: {}", s.message());
                    Err(match s.code() {
                        Code::OutOfRange | Code::DataLoss | Code::NotFound => ReadError::Gone(why),
                        _ => ReadError::Unavailable(why),
                    })
                }
            }
        })
    }

    fn offset_for(
        &self,
        topic: &str,
        partition: u32,
        start: StartFrom,
    ) -> BoxFuture<'static, Result<u64, RemoteError>> {
        let cluster = Arc::clone(&self.cluster);
        let topic = topic.to_owned();
        Box::pin(async move {
            let address = cluster.leader_address(&topic, partition)?;
            let call = PeerCall::Offset {
                topic,
                partition,
                start,
            };
            match cluster.peer(&address, &call).await? {
                PeerAnswer::Offset(o) => Ok(o),
                other => Err(RemoteError {
                    code: Code::Internal as i32,
                    message: format!("unexpected answer {other:?} to {call:?}"),
                }),
            }
        })
    }

    fn put_group(
        &self,
        name: &str,
        config: &GroupConfig,
    ) -> BoxFuture<'static, Result<(), RemoteError>> {
        let cluster = Arc::clone(&self.cluster);
        let op = AdminOp::PutGroup {
            name: name.to_owned(),
            config: config.clone(),
            coordinator: cluster.me(),
        };
        Box::pin(async move {
            cluster.until_joined().await.map_err(remote)?;
            cluster.admin(op).await.map(|_| ()).map_err(remote)
        })
    }

    fn delete_group(&self, name: &str) -> BoxFuture<'static, Result<(), RemoteError>> {
        let cluster = Arc::clone(&self.cluster);
        let op = AdminOp::DeleteGroup {
            name: name.to_owned(),
        };
        Box::pin(async move {
            cluster.until_joined().await.map_err(remote)?;
            cluster.admin(op).await.map(|_| ()).map_err(remote)
        })
    }

    fn ensure_topic(
        &self,
        name: &str,
        config: TopicConfig,
    ) -> BoxFuture<'static, Result<(), RemoteError>> {
        let cluster = Arc::clone(&self.cluster);
        let name = name.to_owned();
        Box::pin(async move {
            if cluster.state().topics.contains_key(&name) {
                return Ok(());
            }
            match cluster.create_topic(&name, config).await {
                Ok(_) | Err(Error::Log(log::Error::TopicExists { .. })) => Ok(()),
                Err(e) => Err(remote(e)),
            }
        })
    }

    fn produce(&self, topic: &str, record: Record) -> BoxFuture<'static, Result<(), RemoteError>> {
        let cluster = Arc::clone(&self.cluster);
        let log = Arc::clone(&self.log);
        let topic = topic.to_owned();
        Box::pin(async move {
            cluster.settle(&topic).await;
            match cluster.route_partition(&topic, 0) {
                Route::Leader { address, .. } => {
                    let mut client =
                        ProducerClient::new(cluster.channel(&address).map_err(remote)?);
                    let mut request = tonic::Request::new(pb::ProduceRequest {
                        topic,
                        partition: Some(0),
                        records: vec![crate::grpc::convert::record_to_pb(record)],
                        producer_id: 0,
                        sequence: 0,
                    });
                    mark_forwarded(&mut request);
                    request.set_timeout(Duration::from_secs(10));
                    client
                        .produce(request)
                        .await
                        .map(|_| ())
                        .map_err(|s| RemoteError {
                            code: s.code() as i32,
                            message: format!("leader at {address}: {}", s.message()),
                        })
                }
                _ => crate::produce::produce(&log, &topic, Some(0), vec![record])
                    .await
                    .map(|_| ())
                    .map_err(|e| remote(Error::Log(e))),
            }
        })
    }

    fn report_floors(&self, topic: &Arc<Topic>, group: &str, floors: Vec<(u32, u64)>) {
        let state = self.cluster.state();
        let Some(t) = state.topics.get(&topic.name) else {
            return;
        };
        let key = (topic.name.clone(), group.to_owned());
        {
            let mut sent = self.sent.lock();
            if let Some((last, at)) = sent.get(&key)
                && *last == floors
                && at.elapsed() < FLOORS_EVERY
            {
                return;
            }
            sent.insert(key, (floors.clone(), Instant::now()));
        }
        // One call per leader, with the floors of the partitions it leads.
        let mut by_leader: HashMap<BrokerId, Vec<(u32, u64)>> = HashMap::new();
        for (p, floor) in floors {
            if let Some(leader) = t.leader(p)
                && leader != self.cluster.me()
            {
                by_leader.entry(leader).or_default().push((p, floor));
            }
        }
        for (leader, floors) in by_leader {
            let Some(address) = state.brokers.get(&leader).map(|b| b.address.clone()) else {
                continue;
            };
            let call = PeerCall::Floors {
                topic: topic.name.clone(),
                topic_id: t.id,
                group: group.to_owned(),
                floors,
            };
            let cluster = Arc::clone(&self.cluster);
            tokio::spawn(async move {
                if let Err(e) = cluster.peer(&address, &call).await {
                    tracing::debug!(leader, error = %e.message, "reporting ack floors to a partition's leader failed; sent again within 5 s");
                }
            });
        }
    }

    fn reported_floor(
        &self,
        topic: &Topic,
        partition: u32,
        open_here: &std::collections::BTreeSet<String>,
    ) -> Option<u64> {
        let state = self.cluster.state();
        let topic_id = state.topics.get(&topic.name)?.id;
        let reported = self.cluster.reported_floors.lock();
        let mut floor = u64::MAX;
        for (name, g) in &state.groups {
            // Groups open here count with their own floors.
            if g.config.topic != topic.name || open_here.contains(name) {
                continue;
            }
            let (id, floors) = reported.get(&(topic.name.clone(), name.clone()))?;
            if *id != topic_id {
                return None;
            }
            let (_, f) = floors.iter().find(|(p, _)| *p == partition)?;
            floor = floor.min(*f);
        }
        Some(floor)
    }

    fn replicated_groups(&self) -> Vec<ReplicatedGroup> {
        let replicas = self.cluster.replicas();
        self.cluster
            .state()
            .replicated_groups()
            .into_iter()
            .map(|(name, config, partition)| {
                let led_here = replicas
                    .of(&config.topic, partition)
                    .is_some_and(|r| r.leads());
                ReplicatedGroup {
                    name,
                    config,
                    partition,
                    led_here,
                }
            })
            .collect()
    }

    fn coordinator_partition(&self, name: &str, topic: &str) -> Option<u32> {
        let state = self.cluster.state();
        let (t, p) = state.coordinator_partition(name, topic)?;
        (t.config.replication_factor > 1).then_some(p)
    }

    fn is_replicated_group(&self, name: &str) -> bool {
        self.cluster.state().group_is_replicated(name)
    }

    fn load_cursors(
        &self,
        topic: &str,
        partition: u32,
        name: &str,
    ) -> BoxFuture<'static, Result<Vec<(u32, Vec<u8>)>, RemoteError>> {
        let replica = self.cluster.replicas().of(topic, partition);
        let (topic, name) = (topic.to_owned(), name.to_owned());
        Box::pin(async move {
            let replica = replica.ok_or_else(|| not_here(&topic, partition))?;
            replica
                .committed_cursors(&name)
                .await
                .map_err(|e| replica_error(&e))
        })
    }

    fn store_cursors(
        &self,
        topic: &str,
        partition: u32,
        name: &str,
        cursors: Vec<(u32, Vec<u8>)>,
    ) -> BoxFuture<'static, Result<(), RemoteError>> {
        let replica = self.cluster.replicas().of(topic, partition);
        let (topic, group) = (topic.to_owned(), name.to_owned());
        Box::pin(async move {
            let replica = replica.ok_or_else(|| not_here(&topic, partition))?;
            replica
                .put_cursors(crate::replica::GroupCursors { group, cursors })
                .await
                .map_err(|e| replica_error(&e))
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn tail(from: u64, n: u64) -> Tail {
        Tail {
            topic_id: 7,
            records: (from..from + n)
                .map(|offset| StoredRecord {
                    offset,
                    record: Record {
                        key: None,
                        value: Bytes::from(offset.to_string()),
                        headers: Vec::new(),
                        timestamp_ms: 1,
                    },
                })
                .collect(),
        }
    }

    fn offsets(records: Option<Vec<StoredRecord>>) -> Option<Vec<u64>> {
        records.map(|r| r.iter().map(|r| r.offset).collect())
    }

    #[test]
    fn a_tail_answers_only_for_offsets_it_holds() {
        let t = tail(10, 4);
        assert_eq!(offsets(t.take(10, 100)), Some(vec![10, 11, 12, 13]));
        assert_eq!(offsets(t.take(12, 100)), Some(vec![12, 13]));
        assert_eq!(offsets(t.take(11, 2)), Some(vec![11, 12]), "at most max");
        assert_eq!(offsets(t.take(9, 100)), None, "before the tail: a fetch");
        assert_eq!(offsets(t.take(14, 100)), None, "past the tail: a fetch");
        assert_eq!(offsets(tail(10, 0).take(10, 100)), None, "empty");
        // Offsets 12..15 lost and the loss accepted at the leader: reads step over them.
        let mut gap = tail(10, 2);
        gap.records.extend(tail(15, 2).records);
        assert_eq!(
            offsets(gap.take(13, 100)),
            Some(vec![15, 16]),
            "nothing skipped"
        );
        assert_eq!(offsets(gap.take(12, 1)), Some(vec![15]));
        assert_eq!(offsets(gap.take(11, 2)), Some(vec![11, 15]));
        let values = t
            .take(13, 1)
            .map(|r| r.into_iter().map(|r| r.record.value).collect::<Vec<_>>());
        assert_eq!(
            values,
            Some(vec![Bytes::from("13")]),
            "each offset's own record"
        );
    }
}
