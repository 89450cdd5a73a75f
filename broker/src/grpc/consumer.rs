//! `weir.v1.Consumer`: fetch by partition and offset, with long polling.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::Stream;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weir_proto::v1::{self as pb, consumer_server::Consumer};

use super::{Context, group_config_from_pb, record_to_pb, status};
use crate::{
    groups::{Delivery, Groups},
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

fn refs(r: &[pb::DeliveryRef]) -> Vec<(u32, u64)> {
    r.iter().map(|d| (d.partition, d.offset)).collect()
}

/// `acks` and `ack_ranges` of a request as inclusive ranges `(partition, first, last)`.
fn ack_ranges(req: &pb::AckRequest) -> Vec<(u32, u64, u64)> {
    req.acks
        .iter()
        .map(|d| (d.partition, d.offset, d.offset))
        .chain(
            req.ack_ranges
                .iter()
                .map(|r| (r.partition, r.first_offset, r.last_offset)),
        )
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

fn ack(groups: &Groups, req: &pb::AckRequest) -> Result<(), Status> {
    groups
        .ack(
            &req.group,
            &req.member_id,
            &ack_ranges(req),
            &refs(&req.nacks),
            Duration::from_millis(u64::from(req.nack_delay_ms)),
            &req.error,
        )
        .map_err(|e| status(&e))
}

fn stream_error(s: &Status) -> pb::SubscribeResponse {
    pb::SubscribeResponse {
        response: Some(pb::subscribe_response::Response::Error(pb::Error {
            code: s.code() as i32,
            message: s.message().to_owned(),
        })),
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
        let req = request.into_inner();
        let create = match req.create {
            Some(c) => Some(group_config_from_pb(&req.group, Some(c))?),
            None => None,
        };
        let (_, joined) = self
            .ctx
            .groups
            .join(&req.group, create, false)
            .await
            .map_err(|e| status(&e))?;
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
        let req = request.into_inner();
        let (generation, partitions) = self
            .ctx
            .groups
            .heartbeat(&req.group, &req.member_id)
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::HeartbeatResponse {
            generation,
            partitions,
        }))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let req = request.into_inner();
        self.ctx
            .groups
            .leave(&req.group, &req.member_id)
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::LeaveResponse {}))
    }

    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<pb::PullResponse>, Status> {
        let req = request.into_inner();
        let wait = wait_of(req.max_wait_ms)?;
        let deliveries = self
            .ctx
            .groups
            .pull(&req.group, &req.member_id, req.max_messages as usize, wait)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::PullResponse {
            deliveries: deliveries.into_iter().map(delivery_to_pb).collect(),
        }))
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        ack(&self.ctx.groups, &request.into_inner())?;
        Ok(Response::new(pb::AckResponse {}))
    }

    type SubscribeStream =
        Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the subscribe stream closed before its join request")
        })?;
        let Some(pb::subscribe_request::Request::Join(join)) = first.request else {
            return Err(Status::invalid_argument(
                "the first SubscribeRequest must be a join",
            ));
        };
        let create = match join.create {
            Some(c) => Some(group_config_from_pb(&join.group, Some(c))?),
            None => None,
        };
        let groups = Arc::clone(&self.ctx.groups);
        let (group, joined) = groups
            .join(&join.group, create, true)
            .await
            .map_err(|e| status(&e))?;
        let name = join.group.clone();
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
        let member_ref = (name, member);
        tokio::spawn(read_subscribe_requests(
            inbound,
            Arc::clone(&groups),
            member_ref.clone(),
            Arc::clone(&credits),
            tx.clone(),
            closed_tx,
        ));
        tokio::spawn(push_deliveries(
            groups,
            group,
            member_ref,
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
        let req = request.into_inner();
        let wait = Duration::from_millis(u64::from(req.max_wait_ms));
        if wait > MAX_FETCH_WAIT {
            return Err(Status::invalid_argument(format!(
                "max_wait_ms is {}; it must be at most {}",
                req.max_wait_ms,
                MAX_FETCH_WAIT.as_millis()
            )));
        }
        let topic = self.ctx.log.topic(&req.topic).map_err(|e| status(&e))?;
        let partition = topic
            .served_partition(req.partition)
            .map_err(|e| status(&e))?;
        let earliest = partition.earliest_offset();
        let next = partition.next_offset();
        if req.offset < earliest || req.offset > next {
            return Err(status(&Error::OffsetOutOfRange {
                topic: topic.name.clone(),
                partition: partition.index,
                offset: req.offset,
                earliest,
                next,
            }));
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
        let log = self.ctx.log.clone();
        let part = partition.clone();
        let records = tokio::task::spawn_blocking(move || {
            log.read(&part, req.offset, max_bytes, max_records)
        })
        .await
        .map_err(|e| Status::internal(format!("fetch task failed: {e}")))?
        .map_err(|e| status(&e))?;
        self.ctx.metrics.observe_fetch(records.len());
        Ok(Response::new(pb::FetchResponse {
            records: records
                .into_iter()
                .map(|r| pb::StoredRecord {
                    offset: r.offset,
                    record: Some(record_to_pb(r.record)),
                })
                .collect(),
            next_offset: partition.next_offset(),
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
    groups: Arc<Groups>,
    (name, member): (String, String),
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
            Some(pb::subscribe_request::Request::Ack(mut a)) => {
                a.group.clone_from(&name);
                a.member_id.clone_from(&member);
                ack(&groups, &a).err()
            }
            Some(pb::subscribe_request::Request::Join(_)) => Some(Status::failed_precondition(
                "this stream has joined already; open another stream for another member",
            )),
            None => Some(Status::invalid_argument("empty SubscribeRequest")),
        };
        if let Some(e) = err {
            if tx.send(Ok(stream_error(&e))).await.is_err() {
                break;
            }
        }
    }
    closed.send_replace(true);
}

/// Sends deliveries to a push member while it has credits (one credit per delivery), and
/// its new assignment when the generation changes; leaves the group when the stream ends.
#[allow(clippy::too_many_arguments)]
async fn push_deliveries(
    groups: Arc<Groups>,
    group: Arc<crate::groups::Group>,
    (name, member): (String, String),
    credits: Credits,
    tx: Outbound,
    mut closed: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    mut generation: u64,
) {
    'outer: loop {
        while credits.0.load(Ordering::Acquire) == 0 {
            tokio::select! {
                () = credits.1.notified() => {}
                _ = closed.wait_for(|c| *c) => break 'outer,
                _ = shutdown.wait_for(|s| *s) => break 'outer,
            }
        }
        let n = credits.0.load(Ordering::Acquire).min(PUSH_BATCH);
        let pulled = tokio::select! {
            r = groups.pull(&name, &member, n as usize, PUSH_POLL) => r,
            _ = closed.wait_for(|c| *c) => break,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let deliveries = match pulled {
            Ok(d) => d,
            Err(e) => {
                let _ = tx.send(Err(status(&e))).await;
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
        let (g, partitions) = group.assignment(&member);
        if g != generation {
            generation = g;
            let msg = pb::SubscribeResponse {
                response: Some(pb::subscribe_response::Response::Assignment(
                    pb::HeartbeatResponse {
                        generation: g,
                        partitions,
                    },
                )),
            };
            if tx.send(Ok(msg)).await.is_err() {
                break;
            }
        }
    }
    let _ = groups.leave(&name, &member);
}
