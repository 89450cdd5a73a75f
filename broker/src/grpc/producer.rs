//! `weir.v1.Producer`: unary and pipelined produce.

use std::{pin::Pin, sync::Arc, time::Instant};

use futures::{Stream, StreamExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weir_proto::v1::{self as pb, producer_client::ProducerClient, producer_server::Producer};

use super::{Context, MAX_MESSAGE_BYTES, convert::record_from_pb, forward, status};
use crate::{
    cluster::route::Route,
    log::idempotence::Idempotence,
    produce::{self, Ack},
};

/// Most requests of one `ProduceStream` queued but not yet acknowledged; the stream stops
/// reading past this, which pushes back on the client (HTTP/2 flow control).
pub const MAX_IN_FLIGHT_PER_STREAM: usize = 1024;

/// Most bytes of requests of one `ProduceStream` queued but not yet acknowledged: 64 MiB.
/// Past it the stream stops reading, so a client cannot pin more broker memory than this
/// (1024 requests of up to 64 MiB each would otherwise fit).
pub const MAX_IN_FLIGHT_BYTES_PER_STREAM: usize = 64 * 1024 * 1024;

/// Serves `weir.v1.Producer` over the log.
#[derive(Debug, Clone)]
pub struct ProducerService {
    ctx: Context,
}

impl ProducerService {
    /// A service over `ctx`.
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }
}

fn acks_to_pb(acks: Vec<Ack>) -> pb::ProduceResponse {
    pb::ProduceResponse {
        acks: acks
            .into_iter()
            .map(|a| pb::PartitionAck {
                partition: a.partition,
                base_offset: a.base_offset,
                record_count: a.record_count,
            })
            .collect(),
    }
}

fn records(req: &mut pb::ProduceRequest) -> Vec<crate::log::Record> {
    std::mem::take(&mut req.records)
        .into_iter()
        .map(record_from_pb)
        .collect()
}

/// The request's producer id and sequence; producer id 0 means not idempotent.
fn idempotence(req: &pb::ProduceRequest) -> Option<Idempotence> {
    (req.producer_id != 0).then_some(Idempotence {
        producer_id: req.producer_id,
        sequence: req.sequence,
    })
}

type AckFuture = Pin<Box<dyn Future<Output = pb::ProduceStreamResponse> + Send>>;

#[tonic::async_trait]
impl Producer for ProducerService {
    async fn produce(
        &self,
        request: Request<pb::ProduceRequest>,
    ) -> Result<Response<pb::ProduceResponse>, Status> {
        let started = Instant::now();
        let metadata = request.metadata().clone();
        let mut req = request.into_inner();
        if forward::is_forwarded(&metadata) {
            forward::catch_up(&self.ctx.cluster, &metadata).await?;
        } else {
            let cluster = &self.ctx.cluster;
            cluster.settle(&req.topic).await;
            let route = match req.partition {
                Some(p) => cluster.route_partition(&req.topic, p),
                None => {
                    cluster.route_records(&req.topic, req.records.iter().map(|r| r.key.as_deref()))
                }
            };
            match route {
                Route::Here => {}
                Route::Leader { id, address } => {
                    let n = req.records.len();
                    let mut client = ProducerClient::new(cluster.channel_to(&address)?)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES);
                    let answer = client
                        .produce(forward::forwarded_at(
                            &metadata,
                            req,
                            cluster.applied_index(),
                        ))
                        .await;
                    self.ctx.metrics.observe_forward(id);
                    self.ctx.metrics.observe_produce(n, started, answer.is_ok());
                    return forward::hinted(answer, id, &address);
                }
                Route::Spread(leaders) => {
                    return Err(Status::failed_precondition(format!(
                        "the records of this request go to partitions of topic {:?} led by brokers {leaders:?}; send one request per leader (`weir cluster describe` shows them) or set a partition",
                        crate::validate::quote(&req.topic)
                    )));
                }
            }
        }
        let recs = records(&mut req);
        let n = recs.len();
        let producer = idempotence(&req);
        let result =
            match produce::submit(&self.ctx.log, &req.topic, req.partition, recs, producer).await {
                Ok(ticket) => ticket.wait().await,
                Err(e) => Err(e),
            };
        self.ctx.metrics.observe_produce(n, started, result.is_ok());
        Ok(Response::new(acks_to_pb(result?)))
    }

    type ProduceStreamStream =
        Pin<Box<dyn Stream<Item = Result<pb::ProduceStreamResponse, Status>> + Send>>;

    async fn produce_stream(
        &self,
        request: Request<Streaming<pb::ProduceStreamRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let metadata = request.metadata().clone();
        let forwarded_stream = forward::is_forwarded(&metadata);
        if forwarded_stream {
            forward::catch_up(&self.ctx.cluster, &metadata).await?;
        }
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<AckFuture>(MAX_IN_FLIGHT_PER_STREAM);
        let in_flight_bytes = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES_PER_STREAM));
        let ctx = self.ctx.clone();
        tokio::spawn(async move {
            let mut shutdown = ctx.shutdown.clone();
            // Streams to the leaders of partitions led elsewhere, one per leader, opened on
            // first use: requests to one leader keep their order.
            let mut outbound: std::collections::HashMap<u64, Outbound> =
                std::collections::HashMap::new();
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = shutdown.wait_for(|s| *s) => break,
                };
                let Ok(Some(msg)) = next else { break };
                let size =
                    prost::Message::encoded_len(&msg).clamp(1, MAX_IN_FLIGHT_BYTES_PER_STREAM);
                let Ok(permit) = Arc::clone(&in_flight_bytes)
                    .acquire_many_owned(u32::try_from(size).unwrap_or(u32::MAX))
                    .await
                else {
                    break;
                };
                let request_id = msg.request_id;
                let started = Instant::now();
                // Queue the batches now, in stream order, so offsets follow request order;
                // only the wait for durability is pipelined.
                if let (Some(req), false) = (&msg.request, forwarded_stream) {
                    ctx.cluster.settle(&req.topic).await;
                }
                let route = match &msg.request {
                    Some(req) if !forwarded_stream => route_of(&ctx, req),
                    _ => Route::Here,
                };
                if let (Route::Leader { id, address }, Some(req)) = (&route, &msg.request) {
                    let fut = forward_in_stream(
                        &ctx,
                        &mut outbound,
                        (*id, address),
                        &metadata,
                        req.clone(),
                        (request_id, permit),
                    )
                    .await;
                    if tx.send(fut).await.is_err() {
                        break;
                    }
                    continue;
                }
                let submitted = match msg.request {
                    Some(_) if matches!(route, Route::Spread(_)) => {
                        Err(Status::failed_precondition(
                            "the records of this request go to partitions led by several brokers; send one request per leader (`weir cluster describe` shows them) or set a partition",
                        ))
                    }
                    Some(mut req) => {
                        let recs = records(&mut req);
                        let n = recs.len();
                        let producer = idempotence(&req);
                        produce::submit(&ctx.log, &req.topic, req.partition, recs, producer)
                            .await
                            .map(|p| (p, n))
                            .map_err(Status::from)
                    }
                    None => Err(Status::invalid_argument(
                        "ProduceStreamRequest.request is missing; set request to a ProduceRequest",
                    )),
                };
                let metrics = ctx.metrics.clone();
                let fut: AckFuture = Box::pin(async move {
                    // The request's bytes count against the stream until it is answered.
                    let _permit = permit;
                    let result = match submitted {
                        Ok((ticket, n)) => {
                            let r = ticket.wait().await.map_err(Status::from);
                            metrics.observe_produce(n, started, r.is_ok());
                            r
                        }
                        Err(e) => {
                            metrics.observe_produce(0, started, false);
                            Err(e)
                        }
                    };
                    pb::ProduceStreamResponse {
                        request_id,
                        result: Some(match result {
                            Ok(acks) => pb::produce_stream_response::Result::Ack(acks_to_pb(acks)),
                            Err(s) => pb::produce_stream_response::Result::Error(status::to_pb(&s)),
                        }),
                    }
                });
                if tx.send(fut).await.is_err() {
                    break;
                }
            }
        });
        let out = ReceiverStream::new(rx).then(|fut| async move { Ok(fut.await) });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Where a produce request goes (see [`crate::cluster::route`]).
fn route_of(ctx: &Context, req: &pb::ProduceRequest) -> Route {
    match req.partition {
        Some(p) => ctx.cluster.route_partition(&req.topic, p),
        None => ctx
            .cluster
            .route_records(&req.topic, req.records.iter().map(|r| r.key.as_deref())),
    }
}

/// Sends `req` of an incoming stream to the leader `(id, address)` on the stream
/// `outbound` keeps for it (opened on first use, opened again after it failed); the future
/// answers with the leader's answer under the incoming `request_id`, holding `permit`.
async fn forward_in_stream(
    ctx: &Context,
    outbound: &mut std::collections::HashMap<u64, Outbound>,
    (id, address): (u64, &str),
    incoming: &tonic::metadata::MetadataMap,
    req: pb::ProduceRequest,
    (request_id, permit): (u64, tokio::sync::OwnedSemaphorePermit),
) -> AckFuture {
    let answer = match outbound.entry(id) {
        std::collections::hash_map::Entry::Occupied(o) => Ok(o.into_mut()),
        std::collections::hash_map::Entry::Vacant(v) => Outbound::open(ctx, address, incoming)
            .await
            .map(|o| v.insert(o)),
    }
    .and_then(|o| o.send(req));
    if answer.is_err() {
        // Opened again for the next request.
        outbound.remove(&id);
    }
    ctx.metrics.observe_forward(id);
    Box::pin(async move {
        let _permit = permit;
        let result = match answer {
            Ok(rx) => rx.await.ok().and_then(|r| r.result).unwrap_or_else(|| {
                pb::produce_stream_response::Result::Error(status::to_pb(&Status::unavailable(
                    "the partition's leader closed the forwarded stream; retry",
                )))
            }),
            Err(s) => pb::produce_stream_response::Result::Error(status::to_pb(&s)),
        };
        pb::ProduceStreamResponse {
            request_id,
            result: Some(result),
        }
    })
}

/// A `ProduceStream` to one partition leader on behalf of one incoming stream: requests
/// are sent in order and answered in order, so each answer goes to the oldest waiting
/// request.
struct Outbound {
    requests: mpsc::Sender<pb::ProduceStreamRequest>,
    waiting: Waiting,
    /// Set once the leader's answers ended; the stream is then opened again.
    closed: Arc<std::sync::atomic::AtomicBool>,
    next_id: u64,
}

/// The requests sent on an [`Outbound`] stream and not answered yet, oldest first.
type Waiting = Arc<
    parking_lot::Mutex<
        std::collections::VecDeque<tokio::sync::oneshot::Sender<pb::ProduceStreamResponse>>,
    >,
>;

impl Outbound {
    async fn open(
        ctx: &Context,
        address: &str,
        incoming: &tonic::metadata::MetadataMap,
    ) -> Result<Self, Status> {
        let (requests, rx) = mpsc::channel(MAX_IN_FLIGHT_PER_STREAM);
        let mut client = ProducerClient::new(ctx.cluster.channel_to(address)?)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let mut answers = client
            .produce_stream(forward::forwarded_at(
                incoming,
                ReceiverStream::new(rx),
                ctx.cluster.applied_index(),
            ))
            .await?
            .into_inner();
        let waiting = Waiting::default();
        let queue = Arc::clone(&waiting);
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ended = Arc::clone(&closed);
        tokio::spawn(async move {
            while let Ok(Some(answer)) = answers.message().await {
                let Some(w) = queue.lock().pop_front() else {
                    break;
                };
                let _ = w.send(answer);
            }
            // The stream ended: the requests still waiting get no answer (their receivers
            // see the sender dropped and answer UNAVAILABLE).
            ended.store(true, std::sync::atomic::Ordering::Release);
            queue.lock().clear();
        });
        Ok(Self {
            requests,
            waiting,
            closed,
            next_id: 0,
        })
    }

    /// Sends `req`; the receiver gets its answer.
    fn send(
        &mut self,
        req: pb::ProduceRequest,
    ) -> Result<tokio::sync::oneshot::Receiver<pb::ProduceStreamResponse>, Status> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.next_id += 1;
        // Queued before it is sent, so the answer finds it.
        self.waiting.lock().push_back(tx);
        let sent = self.requests.try_send(pb::ProduceStreamRequest {
            request_id: self.next_id,
            request: Some(req),
        });
        if sent.is_err() || self.closed.load(std::sync::atomic::Ordering::Acquire) {
            self.waiting.lock().pop_back();
            return Err(Status::unavailable(
                "the forwarded stream to the partition's leader is full or closed; retry",
            ));
        }
        Ok(rx)
    }
}
