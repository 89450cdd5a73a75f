//! Rust client of the Weir message broker.
//!
//! [`Client`] wraps the `weir.v1` services: topic administration, unary and pipelined
//! produce ([`Client::produce_stream`]), and fetch. It adds no state of its own beyond the
//! gRPC channel, so it is cheap to clone and share.
//!
//! ```no_run
//! # async fn demo() -> Result<(), weir_client::Error> {
//! use weir_client::{Client, Record, RecordExt};
//! let client = Client::connect("http://127.0.0.1:7070").await?;
//! client.create_topic("orders", 4, 0).await?;
//! let acks = client
//!     .produce("orders", None, vec![Record::keyed("order-17", "paid")])
//!     .await?;
//! let fetched = client.fetch("orders", acks[0].partition, acks[0].base_offset, 0, 0).await?;
//! # Ok(()) }
//! ```

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Code, Status, Streaming,
    transport::{Channel, Endpoint},
};
pub use weir_proto::v1 as pb;
use weir_proto::v1::{
    admin_client::AdminClient, consumer_client::ConsumerClient, producer_client::ProducerClient,
};

/// HTTP/2 receive window per stream: 8 MiB.
pub const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
/// HTTP/2 receive window per connection: 32 MiB.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;

/// Largest gRPC message the client sends or accepts: 64 MiB, as the broker.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker URL did not parse.
    #[error("invalid broker URL {url:?}: {source}; expected e.g. http://127.0.0.1:7070")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// Parser error.
        source: tonic::transport::Error,
    },
    /// The broker could not be reached.
    #[error("cannot connect to the broker at {url}: {source}")]
    Connect {
        /// The URL given.
        url: String,
        /// Transport error.
        source: tonic::transport::Error,
    },
    /// The broker answered with an error status.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(Status),
    /// A response lacked a field the contract requires.
    #[error("malformed response from the broker: {0}")]
    Malformed(&'static str),
    /// The stream to the broker closed.
    #[error("the produce stream to the broker closed")]
    StreamClosed,
}

impl From<Status> for Error {
    fn from(status: Status) -> Self {
        Self::Status(status)
    }
}

impl Error {
    /// The gRPC status code when the broker refused the request.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

/// Upper-snake name of a gRPC code, as in the gRPC spec (`NOT_FOUND`, `DATA_LOSS`, …).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A record to produce (re-exported wire type with helpers).
pub type Record = pb::Record;

/// Helpers to build records.
pub trait RecordExt {
    /// A record with only a value.
    fn value(value: impl Into<Bytes>) -> Self;
    /// A record with a key and a value.
    fn keyed(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self;
}

impl RecordExt for Record {
    fn value(value: impl Into<Bytes>) -> Self {
        Self {
            value: value.into(),
            ..Self::default()
        }
    }
    fn keyed(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Self {
            key: Some(key.into()),
            value: value.into(),
            ..Self::default()
        }
    }
}

/// A connection to one broker.
#[derive(Debug, Clone)]
pub struct Client {
    admin: AdminClient<Channel>,
    producer: ProducerClient<Channel>,
    consumer: ConsumerClient<Channel>,
}

impl Client {
    /// Connects to the broker at `url` (e.g. `http://127.0.0.1:7070`).
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let endpoint =
            Endpoint::from_shared(url.to_owned()).map_err(|source| Error::InvalidUrl {
                url: url.to_owned(),
                source,
            })?;
        let channel = endpoint
            .tcp_nodelay(true)
            // Large HTTP/2 windows: batches of deliveries and produce requests are hundreds of
            // KiB; the 64 KiB default costs a window update round trip per 64 KiB.
            .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
            .connect()
            .await
            .map_err(|source| Error::Connect {
                url: url.to_owned(),
                source,
            })?;
        Ok(Self::from_channel(channel))
    }

    /// A client over an existing channel.
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            admin: AdminClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            producer: ProducerClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            consumer: ConsumerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// Creates topic `name` with `partitions` partitions and a per-record size limit in bytes
    /// (0 for the broker default, 1 MiB). Idempotent with identical settings.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        max_message_bytes: u32,
    ) -> Result<pb::TopicDescription, Error> {
        self.create_topic_with(
            name,
            pb::TopicConfig {
                partitions,
                max_message_bytes,
                ..pb::TopicConfig::default()
            },
        )
        .await
    }

    /// Creates topic `name` with every setting given. Idempotent with identical settings.
    pub async fn create_topic_with(
        &self,
        name: &str,
        config: pb::TopicConfig,
    ) -> Result<pb::TopicDescription, Error> {
        let resp = self
            .admin
            .clone()
            .create_topic(pb::CreateTopicRequest {
                name: name.to_owned(),
                config: Some(config),
            })
            .await?
            .into_inner();
        resp.topic
            .ok_or(Error::Malformed("CreateTopicResponse.topic"))
    }

    /// Replaces the settings of topic `name`; partitions only grow.
    pub async fn update_topic(
        &self,
        name: &str,
        config: pb::TopicConfig,
    ) -> Result<pb::TopicDescription, Error> {
        let resp = self
            .admin
            .clone()
            .update_topic(pb::UpdateTopicRequest {
                name: name.to_owned(),
                config: Some(config),
            })
            .await?
            .into_inner();
        resp.topic
            .ok_or(Error::Malformed("UpdateTopicResponse.topic"))
    }

    /// Deletes topic `name` and its records.
    pub async fn delete_topic(&self, name: &str) -> Result<(), Error> {
        self.admin
            .clone()
            .delete_topic(pb::DeleteTopicRequest {
                name: name.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// Settings and live figures of topic `name`.
    pub async fn describe_topic(&self, name: &str) -> Result<pb::TopicDescription, Error> {
        let resp = self
            .admin
            .clone()
            .describe_topic(pb::DescribeTopicRequest {
                name: name.to_owned(),
            })
            .await?
            .into_inner();
        resp.topic
            .ok_or(Error::Malformed("DescribeTopicResponse.topic"))
    }

    /// Every topic, sorted by name.
    pub async fn list_topics(&self) -> Result<Vec<pb::TopicDescription>, Error> {
        Ok(self
            .admin
            .clone()
            .list_topics(pb::ListTopicsRequest {})
            .await?
            .into_inner()
            .topics)
    }

    /// Produces `records` to `topic` (to `partition` when given, else by key / round robin)
    /// and returns one ack per partition once durable.
    pub async fn produce(
        &self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<Record>,
    ) -> Result<Vec<pb::PartitionAck>, Error> {
        Ok(self
            .producer
            .clone()
            .produce(pb::ProduceRequest {
                topic: topic.to_owned(),
                partition,
                records,
                ..pb::ProduceRequest::default()
            })
            .await?
            .into_inner()
            .acks)
    }

    /// Produces as idempotent producer `producer_id` with `sequence` (see
    /// [`Producer`] for a producer that numbers and retries its requests itself).
    pub async fn produce_idempotent(
        &self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<Record>,
        producer_id: u64,
        sequence: u64,
    ) -> Result<Vec<pb::PartitionAck>, Error> {
        Ok(self
            .producer
            .clone()
            .produce(pb::ProduceRequest {
                topic: topic.to_owned(),
                partition,
                records,
                producer_id,
                sequence,
            })
            .await?
            .into_inner()
            .acks)
    }

    /// Opens a pipelined produce stream (idempotent: a random producer id, sequences per
    /// topic): send requests with [`ProduceSender::send`] without
    /// waiting, and read one response per request, in order, from [`ProduceReceiver`].
    /// At most `window` requests are in flight (sent and not yet answered); `send` waits for
    /// a response to be read past that.
    pub async fn produce_stream(
        &self,
        window: usize,
    ) -> Result<(ProduceSender, ProduceReceiver), Error> {
        let window = window.max(1);
        let (tx, rx) = mpsc::channel(window);
        let permits = Arc::new(Semaphore::new(window));
        let inbound = self
            .producer
            .clone()
            .produce_stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok((
            ProduceSender {
                tx,
                next_id: 0,
                permits: Arc::clone(&permits),
                producer_id: new_producer_id(),
                sequences: std::collections::HashMap::new(),
            },
            ProduceReceiver { inbound, permits },
        ))
    }

    /// Fetches records of `topic`/`partition` from `offset`; waits up to `max_wait_ms` for
    /// one when none is there yet. `max_bytes` 0 means 1 MiB.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<pb::FetchResponse, Error> {
        Ok(self
            .consumer
            .clone()
            .fetch(pb::FetchRequest {
                topic: topic.to_owned(),
                partition,
                offset,
                max_bytes,
                max_records: 0,
                max_wait_ms,
            })
            .await?
            .into_inner())
    }
}

/// Group API: admin and consumption.
impl Client {
    /// Creates group `name` (idempotent with identical settings).
    pub async fn create_group(
        &self,
        name: &str,
        config: pb::GroupConfig,
    ) -> Result<pb::GroupDescription, Error> {
        let resp = self
            .admin
            .clone()
            .create_group(pb::CreateGroupRequest {
                name: name.to_owned(),
                config: Some(config),
            })
            .await?
            .into_inner();
        resp.group
            .ok_or(Error::Malformed("CreateGroupResponse.group"))
    }

    /// Changes the mutable settings of group `name` (ack wait, max deliveries, dead-letter
    /// topic, session timeout).
    pub async fn update_group(
        &self,
        name: &str,
        config: pb::GroupConfig,
    ) -> Result<pb::GroupDescription, Error> {
        let resp = self
            .admin
            .clone()
            .update_group(pb::UpdateGroupRequest {
                name: name.to_owned(),
                config: Some(config),
            })
            .await?
            .into_inner();
        resp.group
            .ok_or(Error::Malformed("UpdateGroupResponse.group"))
    }

    /// Deletes group `name`.
    pub async fn delete_group(&self, name: &str) -> Result<(), Error> {
        self.admin
            .clone()
            .delete_group(pb::DeleteGroupRequest {
                name: name.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// Members, committed offsets, lag, pending and dead-lettered count of group `name`.
    pub async fn describe_group(&self, name: &str) -> Result<pb::GroupDescription, Error> {
        let resp = self
            .admin
            .clone()
            .describe_group(pb::DescribeGroupRequest {
                name: name.to_owned(),
            })
            .await?
            .into_inner();
        resp.group
            .ok_or(Error::Malformed("DescribeGroupResponse.group"))
    }

    /// Every group, or those of `topic`.
    pub async fn list_groups(
        &self,
        topic: Option<&str>,
    ) -> Result<Vec<pb::GroupDescription>, Error> {
        Ok(self
            .admin
            .clone()
            .list_groups(pb::ListGroupsRequest {
                topic: topic.unwrap_or_default().to_owned(),
            })
            .await?
            .into_inner()
            .groups)
    }

    /// Moves group `name` to `to`.
    pub async fn reset_group(
        &self,
        name: &str,
        to: pb::StartPosition,
    ) -> Result<pb::GroupDescription, Error> {
        let resp = self
            .admin
            .clone()
            .reset_group(pb::ResetGroupRequest {
                name: name.to_owned(),
                to: Some(to),
            })
            .await?
            .into_inner();
        resp.group
            .ok_or(Error::Malformed("ResetGroupResponse.group"))
    }

    /// Joins `group` as a pull member (creating the group with `create` when missing).
    pub async fn join(
        &self,
        group: &str,
        create: Option<pb::GroupConfig>,
    ) -> Result<pb::JoinResponse, Error> {
        Ok(self
            .consumer
            .clone()
            .join(pb::JoinRequest {
                group: group.to_owned(),
                create,
            })
            .await?
            .into_inner())
    }

    /// Leaves `group`.
    pub async fn leave(&self, group: &str, member: &str) -> Result<(), Error> {
        self.consumer
            .clone()
            .leave(pb::LeaveRequest {
                group: group.to_owned(),
                member_id: member.to_owned(),
            })
            .await?;
        Ok(())
    }

    /// Pulls up to `max` deliveries, waiting up to `max_wait_ms` for the first.
    pub async fn pull(
        &self,
        group: &str,
        member: &str,
        max: u32,
        max_wait_ms: u32,
    ) -> Result<Vec<pb::Delivery>, Error> {
        Ok(self
            .consumer
            .clone()
            .pull(pb::PullRequest {
                group: group.to_owned(),
                member_id: member.to_owned(),
                max_messages: max,
                max_wait_ms,
            })
            .await?
            .into_inner()
            .deliveries)
    }

    /// Acks and nacks deliveries of a pull member.
    pub async fn ack(&self, request: pb::AckRequest) -> Result<(), Error> {
        self.consumer.clone().ack(request).await?;
        Ok(())
    }

    /// Opens a push consumer on `group` (created with `create` when missing). It grants
    /// `window` credits and grants one back per ack or nack, so at most `window` deliveries
    /// are unacked at any time.
    pub async fn subscribe(
        &self,
        group: &str,
        create: Option<pb::GroupConfig>,
        window: u32,
    ) -> Result<GroupConsumer, Error> {
        let (tx, rx) = mpsc::channel(64);
        tx.send(pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Join(pb::JoinRequest {
                group: group.to_owned(),
                create,
            })),
        })
        .await
        .map_err(|_| Error::StreamClosed)?;
        let mut inbound = self
            .consumer
            .clone()
            .subscribe(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let Some(pb::SubscribeResponse {
            response: Some(pb::subscribe_response::Response::Joined(joined)),
        }) = inbound.message().await?
        else {
            return Err(Error::Malformed(
                "the first SubscribeResponse must be joined",
            ));
        };
        let window = window.max(1);
        tx.send(pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Credits(window)),
        })
        .await
        .map_err(|_| Error::StreamClosed)?;
        Ok(GroupConsumer {
            tx,
            inbound,
            buffered: std::collections::VecDeque::new(),
            member_id: joined.member_id,
            partitions: joined.partitions,
            generation: joined.generation,
        })
    }
}

/// A push member of a consumer group: a loop over [`next`](Self::next) with
/// [`ack`](Self::ack) or [`nack`](Self::nack) for each delivery. Credits are granted back one
/// per ack or nack, so unacked deliveries never exceed the window. Dropping it leaves the
/// group (Shared: its unacked deliveries go to the other members at once; Ordered: its
/// partitions are reassigned).
#[derive(Debug)]
pub struct GroupConsumer {
    tx: mpsc::Sender<pb::SubscribeRequest>,
    inbound: Streaming<pb::SubscribeResponse>,
    /// Deliveries received in a batch and not yet returned by `next`.
    buffered: std::collections::VecDeque<pb::Delivery>,
    member_id: String,
    partitions: Vec<u32>,
    generation: u64,
}

/// The offsets of `deliveries` as runs of consecutive offsets per partition (one
/// `DeliveryRange` for a whole in-order batch), in the order first seen.
pub fn ranges(deliveries: &[pb::Delivery]) -> Vec<pb::DeliveryRange> {
    let mut out: Vec<pb::DeliveryRange> = Vec::new();
    for d in deliveries {
        let joined = out
            .iter_mut()
            .rev()
            .find(|r| r.partition == d.partition)
            .is_some_and(|r| {
                if r.last_offset.checked_add(1) == Some(d.offset) {
                    r.last_offset = d.offset;
                    true
                } else {
                    false
                }
            });
        if !joined {
            out.push(pb::DeliveryRange {
                partition: d.partition,
                first_offset: d.offset,
                last_offset: d.offset,
            });
        }
    }
    out
}

impl GroupConsumer {
    /// This member's id.
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// Ordered groups: the partitions this member owns (as of the last assignment seen).
    pub fn partitions(&self) -> &[u32] {
        &self.partitions
    }

    /// Rebalances seen so far (the group's generation).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The next delivery; `None` when the broker ended the stream. An error the broker
    /// reported for an earlier ack or nack is returned here.
    pub async fn next(&mut self) -> Option<Result<pb::Delivery, Error>> {
        loop {
            if let Some(d) = self.buffered.pop_front() {
                return Some(Ok(d));
            }
            if let Err(e) = self.receive().await? {
                return Some(Err(e));
            }
        }
    }

    /// Every delivery received and not yet returned, at least one (waiting for it), in
    /// order: a whole stream message's worth at a time, as Kafka's `poll` returns many
    /// records. `None` when the broker ended the stream; errors as [`GroupConsumer::next`].
    pub async fn next_batch(&mut self) -> Option<Result<Vec<pb::Delivery>, Error>> {
        loop {
            if !self.buffered.is_empty() {
                return Some(Ok(self.buffered.drain(..).collect()));
            }
            if let Err(e) = self.receive().await? {
                return Some(Err(e));
            }
        }
    }

    /// Reads one stream message into `buffered` (or the assignment); `None` at the end of
    /// the stream.
    async fn receive(&mut self) -> Option<Result<(), Error>> {
        {
            let msg = match self.inbound.message().await {
                Ok(Some(m)) => m,
                Ok(None) => return None,
                Err(s) => return Some(Err(Error::Status(s))),
            };
            match msg.response {
                Some(pb::subscribe_response::Response::Delivery(d)) => self.buffered.push_back(d),
                Some(pb::subscribe_response::Response::Deliveries(batch)) => {
                    self.buffered.extend(batch.deliveries);
                }
                Some(pb::subscribe_response::Response::Assignment(a)) => {
                    self.partitions = a.partitions;
                    self.generation = a.generation;
                }
                Some(pb::subscribe_response::Response::Error(e)) => {
                    return Some(Err(Error::Status(Status::new(
                        Code::from(e.code),
                        e.message,
                    ))));
                }
                Some(pb::subscribe_response::Response::Joined(_)) | None => {}
            }
            Some(Ok(()))
        }
    }

    async fn send(&self, request: pb::subscribe_request::Request) -> Result<(), Error> {
        self.tx
            .send(pb::SubscribeRequest {
                request: Some(request),
            })
            .await
            .map_err(|_| Error::StreamClosed)
    }

    /// Acknowledges a delivery and grants one credit.
    pub async fn ack(&self, d: &pb::Delivery) -> Result<(), Error> {
        self.send(pb::subscribe_request::Request::Ack(pb::AckRequest {
            acks: vec![pb::DeliveryRef {
                partition: d.partition,
                offset: d.offset,
            }],
            ..pb::AckRequest::default()
        }))
        .await?;
        self.send(pb::subscribe_request::Request::Credits(1)).await
    }

    /// Acknowledges many deliveries in one request and grants as many credits.
    pub async fn ack_all(&self, deliveries: &[pb::Delivery]) -> Result<(), Error> {
        if deliveries.is_empty() {
            return Ok(());
        }
        self.send(pb::subscribe_request::Request::Ack(pb::AckRequest {
            ack_ranges: ranges(deliveries),
            ..pb::AckRequest::default()
        }))
        .await?;
        self.send(pb::subscribe_request::Request::Credits(
            u32::try_from(deliveries.len()).unwrap_or(u32::MAX),
        ))
        .await
    }

    /// Negatively acknowledges a delivery (redelivered after `delay_ms`, with `error` kept
    /// for the dead-letter headers) and grants one credit.
    pub async fn nack(&self, d: &pb::Delivery, delay_ms: u32, error: &str) -> Result<(), Error> {
        self.send(pb::subscribe_request::Request::Ack(pb::AckRequest {
            nacks: vec![pb::DeliveryRef {
                partition: d.partition,
                offset: d.offset,
            }],
            nack_delay_ms: delay_ms,
            error: error.to_owned(),
            ..pb::AckRequest::default()
        }))
        .await?;
        self.send(pb::subscribe_request::Request::Credits(1)).await
    }

    /// Leaves the group after the broker has applied every ack and nack sent so far: closes
    /// the sending side, then reads the stream to its end (at most `timeout`). Deliveries
    /// that arrive meanwhile are not acked and go back to the group.
    pub async fn close(self, timeout: std::time::Duration) -> Result<(), Error> {
        let Self {
            tx, mut inbound, ..
        } = self;
        drop(tx);
        let drain = async {
            while let Some(msg) = inbound.message().await? {
                if let Some(pb::subscribe_response::Response::Error(e)) = msg.response {
                    return Err(Error::Status(Status::new(Code::from(e.code), e.message)));
                }
            }
            Ok(())
        };
        tokio::time::timeout(timeout, drain).await.unwrap_or(Ok(()))
    }

    /// Grants `n` more credits without acking (for callers that manage flow themselves).
    pub async fn grant(&self, n: u32) -> Result<(), Error> {
        self.send(pb::subscribe_request::Request::Credits(n)).await
    }
}

/// An idempotent producer that retries: each [`send`](Self::send) gets the next sequence of
/// its topic and is retried with the same sequence after transport errors and
/// `UNAVAILABLE`, reconnecting as needed, so a request is stored exactly once even when
/// acks are lost or the broker restarts (Kafka's `enable.idempotence`).
#[derive(Debug)]
pub struct Producer {
    url: String,
    client: Option<Client>,
    id: u64,
    sequences: std::collections::HashMap<String, u64>,
    /// Attempts per request before giving up.
    pub attempts: u32,
    /// Wait between attempts.
    pub backoff: std::time::Duration,
}

impl Producer {
    /// A producer for the broker at `url` with a new random producer id; connects lazily.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            client: None,
            id: new_producer_id(),
            sequences: std::collections::HashMap::new(),
            attempts: 100,
            backoff: std::time::Duration::from_millis(100),
        }
    }

    /// This producer's id.
    pub fn producer_id(&self) -> u64 {
        self.id
    }

    /// Sends one request and returns its acks; retries transport failures with the same
    /// sequence. Errors other than transport and `UNAVAILABLE` are returned at once (the
    /// sequence is then not consumed, except for a full `Reject` topic, which the caller may
    /// retry with the same records).
    pub async fn send(
        &mut self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<Record>,
    ) -> Result<Vec<pb::PartitionAck>, Error> {
        let seq = *self.sequences.entry(topic.to_owned()).or_insert(0);
        let mut last = Error::StreamClosed;
        for _ in 0..self.attempts.max(1) {
            let client = match &self.client {
                Some(c) => c.clone(),
                None => match Client::connect(&self.url).await {
                    Ok(c) => {
                        self.client = Some(c.clone());
                        c
                    }
                    Err(e) => {
                        last = e;
                        tokio::time::sleep(self.backoff).await;
                        continue;
                    }
                },
            };
            match client
                .produce_idempotent(topic, partition, records.clone(), self.id, seq)
                .await
            {
                Ok(acks) => {
                    self.sequences.insert(topic.to_owned(), seq + 1);
                    return Ok(acks);
                }
                Err(e) if retriable(&e) => {
                    self.client = None;
                    last = e;
                    tokio::time::sleep(self.backoff).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }
}

/// Whether a failed produce may have been lost in transit (and is safe to retry with the
/// same sequence).
fn retriable(e: &Error) -> bool {
    match e {
        Error::Connect { .. } | Error::StreamClosed => true,
        Error::Status(s) => matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
        ),
        _ => false,
    }
}

/// Sending half of a produce stream.
#[derive(Debug)]
pub struct ProduceSender {
    tx: mpsc::Sender<pb::ProduceStreamRequest>,
    next_id: u64,
    /// One permit per request that may still be sent; the receiver returns them.
    permits: Arc<Semaphore>,
    /// Idempotent producer id (random) and the next sequence per topic.
    producer_id: u64,
    sequences: std::collections::HashMap<String, u64>,
}

impl ProduceSender {
    /// Queues a produce request; returns its request id. Waits only when the window is full.
    pub async fn send(
        &mut self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<Record>,
    ) -> Result<u64, Error> {
        self.permits
            .acquire()
            .await
            .map_err(|_| Error::StreamClosed)?
            .forget();
        let id = self.next_id;
        self.next_id += 1;
        let sequence = self.sequences.entry(topic.to_owned()).or_insert(0);
        let seq = *sequence;
        *sequence += 1;
        self.tx
            .send(pb::ProduceStreamRequest {
                request_id: id,
                request: Some(pb::ProduceRequest {
                    topic: topic.to_owned(),
                    partition,
                    records,
                    producer_id: self.producer_id,
                    sequence: seq,
                }),
            })
            .await
            .map_err(|_| Error::StreamClosed)?;
        Ok(id)
    }

    /// Sends later requests without producer id and sequence: retries are not deduplicated.
    pub fn disable_idempotence(&mut self) {
        self.producer_id = 0;
    }

    /// The idempotent producer id of this stream (0 when disabled).
    pub fn producer_id(&self) -> u64 {
        self.producer_id
    }
}

/// A random non-zero producer id (random state of the standard library's hasher, mixed with
/// the time and the process id).
pub fn new_producer_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish().max(1)
}

/// Receiving half of a produce stream: responses in request order.
#[derive(Debug)]
pub struct ProduceReceiver {
    inbound: Streaming<pb::ProduceStreamResponse>,
    permits: Arc<Semaphore>,
}

impl Drop for ProduceReceiver {
    fn drop(&mut self) {
        // Nobody reads responses any more: wake a sender waiting for the window.
        self.permits.close();
    }
}

impl ProduceReceiver {
    /// The next response: `(request id, acks)`, or the request's error as
    /// [`Error::Status`]. `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<(u64, Result<Vec<pb::PartitionAck>, Error>)> {
        match self.inbound.message().await {
            Ok(Some(resp)) => {
                self.permits.add_permits(1);
                let id = resp.request_id;
                Some((
                    id,
                    match resp.result {
                        Some(pb::produce_stream_response::Result::Ack(a)) => Ok(a.acks),
                        Some(pb::produce_stream_response::Result::Error(e)) => {
                            Err(Error::Status(Status::new(Code::from(e.code), e.message)))
                        }
                        None => Err(Error::Malformed("ProduceStreamResponse.result")),
                    },
                ))
            }
            Ok(None) => {
                self.permits.close();
                None
            }
            Err(status) => {
                self.permits.close();
                Some((u64::MAX, Err(Error::Status(status))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(partition: u32, offset: u64) -> pb::Delivery {
        pb::Delivery {
            partition,
            offset,
            ..pb::Delivery::default()
        }
    }

    #[test]
    fn ranges_join_consecutive_offsets_per_partition() {
        let got = ranges(&[
            d(0, 5),
            d(1, 9),
            d(0, 6),
            d(0, 7),
            d(1, 10),
            d(0, 9),
            d(2, 0),
        ]);
        let r = |partition, first_offset, last_offset| pb::DeliveryRange {
            partition,
            first_offset,
            last_offset,
        };
        assert_eq!(got, vec![r(0, 5, 7), r(1, 9, 10), r(0, 9, 9), r(2, 0, 0)]);
        assert!(ranges(&[]).is_empty());
    }
}
