//! `weir.v1.Consumer`: fetch by partition and offset, with long polling.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt};
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weir_proto::v1::{self as pb, consumer_client::ConsumerClient, consumer_server::Consumer};

use super::{
    Context,
    convert::{group_config_from_pb, record_to_pb},
    forward::to_coordinator,
    status,
};
use crate::{
    groups::{AckRange, Delivery, Group, OffsetRef},
    log::{Error, MAX_FETCH_WAIT},
};

/// Most deliveries in one stream message: large enough that framing costs little, small
/// enough that the member decodes one message while the broker reads the next.
const PUSH_BATCH: u64 = 1024;

/// How long one push-delivery poll waits before it checks the stream again.
const PUSH_POLL: Duration = Duration::from_millis(500);

fn delivery_to_pb(d: Delivery) -> pb::Delivery {
    pb::Delivery {
        partition: d.partition,
        offset: d.offset,
        delivery_count: d.count,
        record: Some(record_to_pb(d.record)),
    }
}

fn refs(r: &[pb::DeliveryRef]) -> Vec<OffsetRef> {
    r.iter()
        .map(|d| OffsetRef {
            partition: d.partition,
            offset: d.offset,
        })
        .collect()
}

/// `acks` and `ack_ranges` of a request as inclusive ranges.
fn ack_ranges(req: &pb::AckRequest) -> Vec<AckRange> {
    req.acks
        .iter()
        .map(|d| AckRange {
            partition: d.partition,
            first: d.offset,
            last: d.offset,
        })
        .chain(req.ack_ranges.iter().map(|r| AckRange {
            partition: r.partition,
            first: r.first_offset,
            last: r.last_offset,
        }))
        .collect()
}

fn wait_of(ms: u32) -> Result<Duration, Status> {
    let wait = Duration::from_millis(u64::from(ms));
    if wait > MAX_FETCH_WAIT {
        return Err(Status::invalid_argument(format!(
            "max_wait_ms is {ms}; it must be at most {}",
            MAX_FETCH_WAIT.as_millis()
        )));
    }
    Ok(wait)
}

fn ack(group: &Group, member: &str, req: &pb::AckRequest) -> Result<(), Status> {
    group.ack(
        member,
        &ack_ranges(req),
        &refs(&req.nacks),
        Duration::from_millis(u64::from(req.nack_delay_ms)),
        &req.error,
    )?;
    Ok(())
}

fn stream_error(s: &Status) -> pb::SubscribeResponse {
    pb::SubscribeResponse {
        response: Some(pb::subscribe_response::Response::Error(status::to_pb(s))),
    }
}

/// `max_bytes` used when a fetch leaves it at 0: 1 MiB.
pub const DEFAULT_FETCH_BYTES: usize = 1024 * 1024;

/// Serves `weir.v1.Consumer` over the log.
#[derive(Debug, Clone)]
pub struct ConsumerService {
    ctx: Context,
}

impl ConsumerService {
    /// A service over `ctx`.
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl Consumer for ConsumerService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let topic = req.create.as_ref().map(|c| c.topic.clone());
        to_coordinator!(
            &self.ctx,
            metadata,
            req,
            &req.group,
            topic.as_deref(),
            ConsumerClient,
            join
        );
        let create = match req.create {
            Some(c) => Some(group_config_from_pb(&req.group, Some(c))?),
            None => None,
        };
        let (_, joined) = self.ctx.groups.join(&req.group, create, false).await?;
        Ok(Response::new(pb::JoinResponse {
            member_id: joined.member,
            generation: joined.generation,
            partitions: joined.partitions,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        to_coordinator!(
            &self.ctx,
            metadata,
            req,
            &req.group,
            None,
            ConsumerClient,
            heartbeat
        );
        let (generation, partitions) =
            self.ctx.groups.get(&req.group)?.heartbeat(&req.member_id)?;
        Ok(Response::new(pb::HeartbeatResponse {
            generation,
            partitions,
        }))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        to_coordinator!(
            &self.ctx,
            metadata,
            req,
            &req.group,
            None,
            ConsumerClient,
            leave
        );
        self.ctx.groups.get(&req.group)?.leave(&req.member_id)?;
        Ok(Response::new(pb::LeaveResponse {}))
    }

    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        to_coordinator!(
            &self.ctx,
            metadata,
            req,
            &req.group,
            None,
            ConsumerClient,
            pull
        );
        let wait = wait_of(req.max_wait_ms)?;
        let deliveries = self
            .ctx
            .groups
            .get(&req.group)?
            .pull(&req.member_id, req.max_messages as usize, wait)
            .await?;
        Ok(Response::new(pb::PullResponse {
            deliveries: deliveries.into_iter().map(delivery_to_pb).collect(),
        }))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        to_coordinator!(
            &self.ctx,
            metadata,
            req,
            &req.group,
            None,
            ConsumerClient,
            ack
        );
        let group = self.ctx.groups.get(&req.group)?;
        ack(&group, &req.member_id, &req)?;
        // Answered once stored (a replicated topic's group: committed in its log).
        group.until_persisted().await?;
        Ok(Response::new(pb::AckResponse {}))
    }

    type SubscribeStream =
        Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let metadata = request.metadata().clone();
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the subscribe stream closed before its join request")
        })?;
        let Some(pb::subscribe_request::Request::Join(join)) = first.request.clone() else {
            return Err(Status::invalid_argument(
                "the first SubscribeRequest must be a join",
            ));
        };
        let topic = join.create.as_ref().map(|c| c.topic.clone());
        let route =
            super::forward::group_route(&self.ctx, &metadata, &join.group, topic.as_deref())
                .await?;
        if let Some((channel, id, address)) = route {
            // The whole stream is relayed to the coordinator, which pushes from every
            // partition; the member's stream ending (or failing) ends the relayed one.
            let requests = futures::stream::once(async move { first })
                .chain(tokio_stream::StreamExt::map_while(inbound, Result::ok));
            let index = self.ctx.cluster.applied_index();
            let answer = ConsumerClient::new(channel)
                .max_decoding_message_size(super::MAX_MESSAGE_BYTES)
                .subscribe(super::forward::forwarded_at(&metadata, requests, index))
                .await;
            return super::forward::hinted(answer, id, &address)
                .map(|r| r.map(|answers| -> Self::SubscribeStream { Box::pin(answers) }));
        }
        let create = match join.create {
            Some(c) => Some(group_config_from_pb(&join.group, Some(c))?),
            None => None,
        };
        let (group, joined) = self.ctx.groups.join(&join.group, create, true).await?;
        let member = joined.member.clone();
        let (tx, rx) = mpsc::channel::<Result<pb::SubscribeResponse, Status>>(256);
        let _ = tx
            .send(Ok(pb::SubscribeResponse {
                response: Some(pb::subscribe_response::Response::Joined(pb::JoinResponse {
                    member_id: joined.member.clone(),
                    generation: joined.generation,
                    partitions: joined.partitions.clone(),
                })),
            }))
            .await;
        let credits = Arc::new((AtomicU64::new(0), Notify::new()));
        let (closed_tx, closed) = watch::channel(false);
        tokio::spawn(read_subscribe_requests(
            inbound,
            Arc::clone(&group),
            member.clone(),
            Arc::clone(&credits),
            tx.clone(),
            closed_tx,
        ));
        tokio::spawn(push_deliveries(
            group,
            member,
            credits,
            tx,
            closed,
            self.ctx.shutdown.clone(),
            joined.generation,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        if super::forward::is_forwarded(&metadata) {
            super::forward::catch_up(&self.ctx.cluster, &metadata).await?;
        } else {
            self.ctx.cluster.settle(&req.topic).await;
            if let crate::cluster::route::Route::Leader { id, address } =
                self.ctx.cluster.route_partition(&req.topic, req.partition)
            {
                let mut client = weir_proto::v1::consumer_client::ConsumerClient::new(
                    self.ctx.cluster.channel_to(&address)?,
                )
                .max_decoding_message_size(super::MAX_MESSAGE_BYTES);
                self.ctx.metrics.observe_forward(id);
                let answer = client
                    .fetch(super::forward::forwarded_at(
                        &metadata,
                        req,
                        self.ctx.cluster.applied_index(),
                    ))
                    .await;
                return super::forward::hinted(answer, id, &address);
            }
        }
        let wait = wait_of(req.max_wait_ms)?;
        let topic = self.ctx.log.topic(&req.topic)?;
        let partition = topic.served_partition(req.partition)?;
        let earliest = partition.earliest_offset();
        let next = partition.next_offset();
        if req.offset < earliest || req.offset > next {
            return Err(Error::OffsetOutOfRange {
                topic: topic.name.clone(),
                partition: partition.index,
                offset: req.offset,
                earliest,
                next,
            }
            .into());
        }
        if req.offset == next && !wait.is_zero() {
            let mut durable = partition.subscribe();
            let mut shutdown = self.ctx.shutdown.clone();
            tokio::select! {
                _ = tokio::time::timeout(wait, durable.wait_for(|n| *n > req.offset)) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
        }
        let max_bytes = if req.max_bytes == 0 {
            DEFAULT_FETCH_BYTES
        } else {
            req.max_bytes as usize
        };
        let max_records = if req.max_records == 0 {
            usize::MAX
        } else {
            req.max_records as usize
        };
        // The end as of the read (taken before it): an end taken after could pass records
        // published meanwhile, answering "no records at N" with an end beyond N.
        let end = partition.next_offset();
        let log = self.ctx.log.clone();
        let part = partition.clone();
        let records = tokio::task::spawn_blocking(move || {
            log.read(&part, req.offset, max_bytes, max_records)
        })
        .await
        .map_err(|e| Status::internal(format!("fetch task failed: {e}")))??;
        self.ctx.metrics.observe_fetch(records.len());
        let next_offset = records.last().map_or(end, |r| end.max(r.offset + 1));
        Ok(Response::new(pb::FetchResponse {
            records: records
                .into_iter()
                .map(|r| pb::StoredRecord {
                    offset: r.offset,
                    record: Some(record_to_pb(r.record)),
                })
                .collect(),
            next_offset,
            earliest_offset: partition.earliest_offset(),
        }))
    }
}

/// Credits granted to a push member, and a wake-up for the delivery loop.
type Credits = Arc<(AtomicU64, Notify)>;
type Outbound = mpsc::Sender<Result<pb::SubscribeResponse, Status>>;

/// Reads credits and acks of a subscribe stream until it ends, then marks it closed.
async fn read_subscribe_requests(
    mut inbound: Streaming<pb::SubscribeRequest>,
    group: Arc<Group>,
    member: String,
    credits: Credits,
    tx: Outbound,
    closed: watch::Sender<bool>,
) {
    while let Ok(Some(msg)) = inbound.message().await {
        let err = match msg.request {
            Some(pb::subscribe_request::Request::Credits(0)) => {
                Some(Status::invalid_argument("credits must be at least 1"))
            }
            Some(pb::subscribe_request::Request::Credits(n)) => {
                credits.0.fetch_add(u64::from(n), Ordering::AcqRel);
                credits.1.notify_one();
                None
            }
            Some(pb::subscribe_request::Request::Ack(a)) => ack(&group, &member, &a).err(),
            Some(pb::subscribe_request::Request::Join(_)) => Some(Status::failed_precondition(
                "this stream has joined already; open another stream for another member",
            )),
            None => Some(Status::invalid_argument("empty SubscribeRequest")),
        };
        if let Some(e) = err
            && tx.send(Ok(stream_error(&e))).await.is_err()
        {
            break;
        }
    }
    closed.send_replace(true);
}

/// What a push member's stream ends with when the broker stops: retriable, so the member
/// joins again (at the group's next coordinator, or here after the restart).
fn shutting_down() -> Status {
    Status::unavailable("the broker is shutting down; join the group again")
}

/// Sends `member` its assignment when the group's generation moved past `generation`;
/// false when the stream is gone.
async fn send_assignment(group: &Group, member: &str, generation: &mut u64, tx: &Outbound) -> bool {
    let (g, partitions) = group.assignment(member);
    if g == *generation {
        return true;
    }
    *generation = g;
    let msg = pb::SubscribeResponse {
        response: Some(pb::subscribe_response::Response::Assignment(
            pb::HeartbeatResponse {
                generation: g,
                partitions,
            },
        )),
    };
    tx.send(Ok(msg)).await.is_ok()
}

/// Sends deliveries to a push member while it has credits (one credit per delivery), and
/// its new assignment when the generation changes; leaves the group when the stream ends.
async fn push_deliveries(
    group: Arc<Group>,
    member: String,
    credits: Credits,
    tx: Outbound,
    mut closed: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    mut generation: u64,
) {
    'outer: loop {
        if let Err(e) = group.check_open() {
            // Deleted, or coordinated elsewhere now: the member joins again there.
            let _ = tx.send(Err(e.into())).await;
            break;
        }
        while credits.0.load(Ordering::Acquire) == 0 {
            // Without credits no delivery goes out, but a new assignment still does (a
            // member must learn at once that it lost a partition).
            let changed = group.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if group.check_open().is_err() {
                continue 'outer;
            }
            if !send_assignment(&group, &member, &mut generation, &tx).await {
                break 'outer;
            }
            let stopping = tokio::select! {
                () = credits.1.notified() => false,
                () = &mut changed => false,
                _ = closed.wait_for(|c| *c) => break 'outer,
                _ = shutdown.wait_for(|s| *s) => true,
            };
            if stopping {
                let _ = tx.send(Err(shutting_down())).await;
                break 'outer;
            }
        }
        let n = credits.0.load(Ordering::Acquire).min(PUSH_BATCH);
        let pulled = tokio::select! {
            r = group.pull(&member, n as usize, PUSH_POLL) => Some(r),
            _ = closed.wait_for(|c| *c) => break,
            _ = shutdown.wait_for(|s| *s) => None,
        };
        let Some(pulled) = pulled else {
            let _ = tx.send(Err(shutting_down())).await;
            break;
        };
        let deliveries = match pulled {
            Ok(d) => d,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                break;
            }
        };
        credits
            .0
            .fetch_sub(deliveries.len() as u64, Ordering::AcqRel);
        if !deliveries.is_empty() {
            // One stream message per pull: per-message framing cost dominated catch-up reads.
            let msg = pb::SubscribeResponse {
                response: Some(pb::subscribe_response::Response::Deliveries(
                    pb::Deliveries {
                        deliveries: deliveries.into_iter().map(delivery_to_pb).collect(),
                    },
                )),
            };
            if tx.send(Ok(msg)).await.is_err() {
                break 'outer;
            }
        }
        if !send_assignment(&group, &member, &mut generation, &tx).await {
            break;
        }
    }
    if let Err(e) = group.leave(&member) {
        // Already removed (the group was deleted or reset its members): nothing to do.
        tracing::debug!(group = %group.name, member, error = %e, "push member gone before its stream ended");
    }
}
