//! Rust client of the Weir message broker.
//!
//! [`Client`] speaks the `weir.v1` services in domain terms: topics with a
//! [`TopicConfig`], [`Record`]s and their [`Ack`]s, fetches by offset, and consumer groups
//! whose members ([`GroupConsumer`] pushed to, [`PullMember`] pulling) ack the
//! [`Delivery`]s they were given. Times are [`Duration`]s; defaults are `None`. A
//! [`Producer`] retries with the same sequence so nothing is stored twice.
//!
//! ```no_run
//! # async fn demo() -> Result<(), weir_client::Error> {
//! use weir_client::{Client, FetchOptions, Record, TopicConfig};
//! let client = Client::connect("127.0.0.1:7070").await?;
//! client.create_topic("orders", &TopicConfig::new(4)).await?;
//! let acks = client
//!     .produce("orders", None, vec![Record::keyed("order-17", "paid")])
//!     .await?;
//! let fetched = client
//!     .fetch("orders", acks[0].partition, acks[0].base_offset, FetchOptions::default())
//!     .await?;
//! assert_eq!(fetched.records[0].record.value, "paid");
//! # Ok(()) }
//! ```
//!
//! Runnable programs are in the workspace's `examples/`: a producer, an Ordered consumer and a
//! Shared worker that nacks and dead-letters.

mod consumer;
mod error;
mod group_types;
mod producer;
mod route;
mod types;

use std::{collections::VecDeque, future::Future, sync::Arc};

use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
/// The `weir.v1` wire types, for tools that build requests this API does not (see
/// [`Client::raw`]).
pub use weir_proto::v1 as pb;
use weir_proto::v1::{
    admin_client::AdminClient, cluster_client::ClusterClient, consumer_client::ConsumerClient,
    producer_client::ProducerClient,
};

pub use self::{
    consumer::{GroupConsumer, PullMember, REJOIN_FOR},
    error::{Error, code_name},
    group_types::{
        Delivery, GroupConfig, GroupInfo, GroupPartitionInfo, GroupType, MemberInfo, StartFrom,
        ranges,
    },
    producer::{
        ProduceReceiver, ProduceSender, Producer, RetryPolicy, StreamAnswer, new_producer_id,
    },
    types::{
        Ack, BrokerInfo, ClusterMetadata, Durability, FetchOptions, Fetched, GroupCoordinator,
        LostRange, Overflow, PartitionInfo, PartitionLeader, Record, Retention, StoredRecord,
        TopicConfig, TopicInfo,
    },
};

/// HTTP/2 receive window per stream: 8 MiB.
pub const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;
/// HTTP/2 receive window per connection: 32 MiB.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 * 1024 * 1024;
/// Largest gRPC message the client sends or accepts: 64 MiB, as the broker.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// How long a call waits for its answer by default before failing with [`Error::Timeout`]
/// (30 s, the default of Kafka's `request.timeout.ms`); a long-poll's wait (`max_wait` of a
/// fetch or pull) comes on top. Opening a stream waits this long for the broker to accept it.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Interval of the HTTP/2 PING the client sends on each connection, idle or not: 10 s. A
/// connection whose PING is not answered within [`KEEPALIVE_TIMEOUT`] is closed, its calls
/// fail, and the next call connects again (to the next broker of a bootstrap list), so a
/// broker that stopped answering without closing its connections (a dead node, a dropped
/// route, a paused process) is left within about 30 s.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How long the client waits for the answer to a keepalive PING: 10 s.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The generated `weir.v1` clients on this client's connection.
#[derive(Debug, Clone)]
pub struct Raw {
    /// `weir.v1.Admin`.
    pub admin: AdminClient<Channel>,
    /// `weir.v1.Producer`.
    pub producer: ProducerClient<Channel>,
    /// `weir.v1.Consumer`.
    pub consumer: ConsumerClient<Channel>,
}

/// A connection to a broker (or a cluster, through one or more bootstrap brokers). Cheap to
/// clone and share.
///
/// In a cluster, produce, fetch and group calls go straight to the broker that leads the
/// partition or coordinates the group, from the cluster's cached `Metadata` (refreshed every
/// 30 s, when a topic or group is missing from it, and from the leader hint a forwarding
/// broker returns); admin calls go to the bootstrap broker. A leader whose advertised address
/// cannot be reached from here is reached through the bootstrap broker, which forwards.
/// [`Client::without_routing`] sends every call to the bootstrap broker.
#[derive(Debug, Clone)]
pub struct Client {
    url: Arc<str>,
    admin: AdminClient<Channel>,
    cluster: ClusterClient<Channel>,
    producer: ProducerClient<Channel>,
    pub(crate) consumer: ConsumerClient<Channel>,
    pub(crate) router: Arc<route::Router>,
    request_timeout: std::time::Duration,
}

/// The URL and tonic endpoint of broker `address` (`HOST:PORT` or a URL), with the client's
/// connection settings.
fn endpoint(address: &str) -> Result<(String, Endpoint), Error> {
    let url = broker_url(address);
    let endpoint = Endpoint::from_shared(url.clone()).map_err(|e| Error::InvalidAddress {
        address: address.to_owned(),
        reason: error::innermost(&e),
    })?;
    Ok((
        url,
        endpoint
            .tcp_nodelay(true)
            .connect_timeout(std::time::Duration::from_secs(5))
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            // Large HTTP/2 windows: batches of deliveries and produce requests are hundreds of
            // KiB; the 64 KiB default costs a window update round trip per 64 KiB.
            .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
            .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES)),
    ))
}

/// `HOST:PORT` of broker `address` (a URL's scheme dropped).
fn host_port(address: &str) -> String {
    let a = address.split_once("://").map_or(address, |(_, rest)| rest);
    a.trim_end_matches('/').to_owned()
}

/// A connector over the brokers at `addresses` (`HOST:PORT`): each connection goes to the
/// first that accepts a TCP connection, starting at `first`, then, for each later connection,
/// at the one after the broker of the last (as a NATS client moves the server it lost to the
/// back of its list). A channel reconnects through it when its connection breaks, so a client
/// given a bootstrap list moves to another broker when its broker goes down or stops
/// answering its keepalive PINGs (a paused broker's kernel still accepts TCP connections, so
/// starting again at it would find it again); calls in flight on the broken connection fail
/// (their outcome is unknown), later ones go to the new broker.
fn failover_connector(
    addresses: Vec<String>,
    first: usize,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>,
    Error = std::io::Error,
    Future = impl Future<Output = std::io::Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>>>
             + Send,
> + Send
+ 'static {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(first));
    let addresses = std::sync::Arc::new(addresses);
    tower::service_fn(move |_: tonic::transport::Uri| {
        let (addresses, next) = (
            std::sync::Arc::clone(&addresses),
            std::sync::Arc::clone(&next),
        );
        async move {
            let start = next.load(std::sync::atomic::Ordering::Relaxed);
            let mut last = None;
            for i in 0..addresses.len() {
                let k = (start + i) % addresses.len();
                let attempt = tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    tokio::net::TcpStream::connect(addresses[k].as_str()),
                );
                match attempt.await {
                    Ok(Ok(stream)) => {
                        stream.set_nodelay(true)?;
                        next.store(
                            (k + 1) % addresses.len(),
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        return Ok(hyper_util::rt::TokioIo::new(stream));
                    }
                    Ok(Err(e)) => last = Some(e),
                    Err(_) => {
                        last = Some(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("connecting to {} timed out after 5 s", addresses[k]),
                        ));
                    }
                }
            }
            Err(last.unwrap_or_else(|| std::io::Error::other("no broker address")))
        }
    })
}

/// The `weir.v1.Producer` client over `channel`, with the client's message limits.
pub(crate) fn producer_client(channel: Channel) -> ProducerClient<Channel> {
    ProducerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The `weir.v1.Consumer` client over `channel`, with the client's message limits.
pub(crate) fn consumer_client(channel: Channel) -> ConsumerClient<Channel> {
    ConsumerClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// `address` as a URL: `HOST:PORT` gets `http://` in front; a URL is kept.
pub fn broker_url(address: &str) -> String {
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

impl Client {
    /// Connects to the broker at `address`: `HOST:PORT` (`127.0.0.1:7070`,
    /// `weir.shop.svc:7070`) or a URL (`http://127.0.0.1:7070`); or to the first that
    /// answers of a comma-separated list (`a:7070,b:7070,c:7070`, like Kafka's
    /// `bootstrap.servers`: in a cluster every broker serves every call). With a list, when
    /// the broker goes down the client reconnects to the next of the list that answers:
    /// calls in flight then fail, later ones go to the new broker; a stream ends with its
    /// broker and is opened again by the caller.
    ///
    /// Errors: [`Error::InvalidAddress`] for an address that does not parse,
    /// [`Error::Connect`] (with the innermost cause, e.g. `Connection refused`) when nothing
    /// answers (the last address's cause for a list).
    pub async fn connect(address: &str) -> Result<Self, Error> {
        let addresses: Vec<&str> = address
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        let endpoints = addresses
            .iter()
            .map(|a| endpoint(a))
            .collect::<Result<Vec<(String, Endpoint)>, Error>>()?;
        let mut last = None;
        for (i, (url, endpoint)) in endpoints.iter().enumerate() {
            match endpoint.connect().await {
                Ok(channel) if endpoints.len() == 1 => return Ok(Self::from_channel(url, channel)),
                // The channel's connection then goes to this broker, and when it breaks,
                // reconnects to the next of the list that accepts.
                Ok(_) => {
                    let addresses = addresses.iter().map(|a| host_port(a)).collect();
                    let channel = endpoint
                        .connect_with_connector(failover_connector(addresses, i))
                        .await
                        .map_err(|e| Error::Connect {
                            url: url.clone(),
                            reason: error::innermost(&e),
                        })?;
                    return Ok(Self::from_channel(url, channel));
                }
                Err(e) => {
                    last = Some(Error::Connect {
                        url: url.clone(),
                        reason: error::innermost(&e),
                    });
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::InvalidAddress {
            address: address.to_owned(),
            reason: "no address given; use HOST:PORT, e.g. 127.0.0.1:7070".into(),
        }))
    }

    /// A client over an existing channel to `url` (routing calls as [`Client`] says).
    pub fn from_channel(url: &str, channel: Channel) -> Self {
        Self {
            url: url.into(),
            router: Arc::new(route::Router::new(
                channel.clone(),
                Some(host_port(url)),
                true,
            )),
            admin: AdminClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            cluster: ClusterClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            producer: ProducerClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            consumer: ConsumerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            request_timeout: REQUEST_TIMEOUT,
        }
    }

    /// This client with calls failing with [`Error::Timeout`] when no answer came within
    /// `timeout` ([`REQUEST_TIMEOUT`] by default; a long-poll's wait comes on top). Like
    /// Kafka's `request.timeout.ms`: it bounds a call to a broker that stopped answering
    /// without closing its connection (a paused process, packets dropped).
    #[must_use]
    pub fn with_request_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The time a call waits for its answer, its long-poll `wait` excluded.
    pub fn request_timeout(&self) -> std::time::Duration {
        self.request_timeout
    }

    /// This client with every call sent to its bootstrap broker, which forwards calls for
    /// partitions and groups served elsewhere (one hop more per call, and one connection):
    /// for networks where only that address is reachable, and to measure forwarding.
    #[must_use]
    pub fn without_routing(mut self) -> Self {
        self.router = Arc::new(route::Router::new(
            self.router.bootstrap_channel(),
            None,
            false,
        ));
        self
    }

    /// The broker's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs a unary call about `target` on the channel the router chooses (its leader or
    /// coordinator when known and reachable), learning from the answer's leader hint. A
    /// transport failure of a call sent straight to a broker makes the next call fetch the
    /// metadata again (the call itself is not retried: its outcome is unknown).
    pub(crate) async fn routed<T, F, Fut>(
        &self,
        target: route::Target<'_>,
        call: F,
    ) -> Result<T, Error>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.routed_waiting(target, std::time::Duration::ZERO, call)
            .await
    }

    /// [`Client::routed`] for a long-poll that may wait up to `wait` for its answer (on top
    /// of the request timeout).
    pub(crate) async fn routed_waiting<T, F, Fut>(
        &self,
        target: route::Target<'_>,
        wait: std::time::Duration,
        call: F,
    ) -> Result<T, Error>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.request_timeout.saturating_add(wait);
        let timeout = |url: &str| self.timeout(url, wait);
        let Ok(chosen) = tokio::time::timeout_at(deadline, self.router.channel(target)).await
        else {
            return Err(timeout(&self.url));
        };
        let url = chosen
            .direct
            .as_deref()
            .map_or_else(|| self.url.to_string(), broker_url);
        let Ok(answer) = tokio::time::timeout_at(deadline, call(chosen.channel)).await else {
            if let Some(address) = &chosen.direct {
                self.router.forget(target, address);
            }
            return Err(timeout(&url));
        };
        match answer {
            Ok(r) => {
                self.router
                    .learn(target, r.metadata(), chosen.direct.as_deref());
                Ok(r.into_inner())
            }
            Err(status) => {
                self.router.learn(target, status.metadata(), None);
                let e = Error::from_call(&url, status);
                if let Some(address) = &chosen.direct
                    && e.is_retriable()
                {
                    self.router.forget(target, address);
                }
                Err(e)
            }
        }
    }

    /// [`Error::Timeout`] of a call to `url` that waited the request timeout plus `wait`.
    fn timeout(&self, url: &str, wait: std::time::Duration) -> Error {
        let waited = self.request_timeout.saturating_add(wait);
        Error::Timeout {
            url: url.to_owned(),
            after_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// The generated clients, for requests this API does not build (tests of the broker's
    /// validation, tools). Their errors are raw `tonic::Status`es.
    pub fn raw(&self) -> Raw {
        Raw {
            admin: self.admin.clone(),
            producer: self.producer.clone(),
            consumer: self.consumer.clone(),
        }
    }

    /// Runs one unary call: its response, or its status as an [`Error`] that tells a
    /// refusal from an unreachable broker or a server that is not a broker.
    pub(crate) async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        tokio::time::timeout(self.request_timeout, call)
            .await
            .map_err(|_| self.timeout(&self.url, std::time::Duration::ZERO))?
            .map(tonic::Response::into_inner)
            .map_err(|s| Error::from_call(&self.url, s))
    }

    /// Creates topic `name`. Idempotent with identical settings; other settings fail with
    /// `ALREADY_EXISTS`.
    pub async fn create_topic(&self, name: &str, config: &TopicConfig) -> Result<TopicInfo, Error> {
        let resp = self
            .call(self.admin.clone().create_topic(pb::CreateTopicRequest {
                name: name.to_owned(),
                config: Some(config.into()),
            }))
            .await?;
        resp.topic
            .ok_or(Error::Malformed("CreateTopicResponse.topic"))?
            .try_into()
    }

    /// Replaces the settings of topic `name`; partitions only grow.
    pub async fn update_topic(&self, name: &str, config: &TopicConfig) -> Result<TopicInfo, Error> {
        let resp = self
            .call(self.admin.clone().update_topic(pb::UpdateTopicRequest {
                name: name.to_owned(),
                config: Some(config.into()),
            }))
            .await?;
        resp.topic
            .ok_or(Error::Malformed("UpdateTopicResponse.topic"))?
            .try_into()
    }

    /// Deletes topic `name` and its records.
    pub async fn delete_topic(&self, name: &str) -> Result<(), Error> {
        self.call(self.admin.clone().delete_topic(pb::DeleteTopicRequest {
            name: name.to_owned(),
        }))
        .await?;
        Ok(())
    }

    /// The cluster as the broker sees it: its brokers, the metadata leader (controller) and
    /// each partition's leader and replicas (Kafka's `Metadata` request).
    ///
    /// # Errors
    ///
    /// Transport errors.
    pub async fn metadata(&self) -> Result<ClusterMetadata, Error> {
        let m = self
            .call(self.cluster.clone().metadata(pb::MetadataRequest {}))
            .await?;
        Ok(ClusterMetadata::from(m))
    }

    /// Removes broker `id` from the cluster (scale-down). Refused with
    /// `FAILED_PRECONDITION` while it holds a partition or is the only voter of the metadata
    /// group, `NOT_FOUND` for a broker not in the cluster.
    pub async fn remove_broker(&self, id: u64) -> Result<(), Error> {
        self.call(
            self.cluster
                .clone()
                .remove_broker(pb::RemoveBrokerRequest { id }),
        )
        .await?;
        Ok(())
    }

    /// Accepts the loss of records of `name` that can no longer be read back (reads of them
    /// answer DATA_LOSS): the broker deletes damaged batches and records the lost ranges,
    /// and reads step over them from then on. `partitions` empty means all. Returns the
    /// ranges accepted by this call.
    ///
    /// # Errors
    ///
    /// `NOT_FOUND` for an unknown topic or partition; `INTERNAL` when a partition cannot be
    /// scanned.
    pub async fn repair_topic(
        &self,
        name: &str,
        partitions: &[u32],
    ) -> Result<Vec<LostRange>, Error> {
        let resp = self
            .call(self.admin.clone().repair_topic(pb::RepairTopicRequest {
                name: name.to_owned(),
                partitions: partitions.to_vec(),
            }))
            .await?;
        Ok(resp
            .lost
            .into_iter()
            .map(|r| LostRange {
                partition: r.partition,
                from: r.from_offset,
                to: r.to_offset,
                reason: r.reason,
            })
            .collect())
    }

    /// Settings and live figures of topic `name`.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo, Error> {
        let resp = self
            .call(self.admin.clone().describe_topic(pb::DescribeTopicRequest {
                name: name.to_owned(),
            }))
            .await?;
        resp.topic
            .ok_or(Error::Malformed("DescribeTopicResponse.topic"))?
            .try_into()
    }

    /// Every topic, sorted by name.
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>, Error> {
        self.call(self.admin.clone().list_topics(pb::ListTopicsRequest {}))
            .await?
            .topics
            .into_iter()
            .map(TryInto::try_into)
            .collect()
    }

    /// Produces `records` to `topic` (to `partition` when given, else by key, else one
    /// partition round robin) and returns one ack per partition once durable. Sent to the
    /// partition's leader when the records go to one partition (`partition`, or keys of one
    /// partition); otherwise the broker splits them and a request whose keys span leaders
    /// is refused (`FAILED_PRECONDITION`). Not idempotent: use a [`Producer`] to retry
    /// safely.
    pub async fn produce(
        &self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<Record>,
    ) -> Result<Vec<Ack>, Error> {
        let wire: Vec<pb::Record> = records.into_iter().map(Into::into).collect();
        let target = match partition {
            Some(p) => Some(p),
            None => self.partition_of_keys(topic, &wire).await,
        };
        self.produce_request(
            pb::ProduceRequest {
                topic: topic.to_owned(),
                partition,
                records: wire,
                ..pb::ProduceRequest::default()
            },
            target,
        )
        .await
    }

    /// The one partition every record of `records` goes to by its key (Kafka's default
    /// partitioner over the topic's partitions in the metadata); `None` when a record has no
    /// key, the keys span partitions, or the topic is not in the metadata.
    pub(crate) async fn partition_of_keys(
        &self,
        topic: &str,
        records: &[pb::Record],
    ) -> Option<u32> {
        if !self.router.is_direct() {
            return None;
        }
        let count = self.router.partitions(topic).await?;
        let mut one = None;
        for r in records {
            let p = weir_proto::partitioner::partition_for_key(r.key.as_deref()?, count);
            match one {
                None => one = Some(p),
                Some(q) if q == p => {}
                Some(_) => return None,
            }
        }
        one
    }

    /// Sends `request`, straight to the leader of `partition` when given and known.
    pub(crate) async fn produce_request(
        &self,
        request: pb::ProduceRequest,
        partition: Option<u32>,
    ) -> Result<Vec<Ack>, Error> {
        let resp = match partition {
            Some(p) => {
                let topic = request.topic.clone();
                self.routed(route::Target::Partition(&topic, p), |channel| async move {
                    producer_client(channel).produce(request).await
                })
                .await?
            }
            None => self.call(self.producer.clone().produce(request)).await?,
        };
        Ok(resp.acks.into_iter().map(Ack::from).collect())
    }

    /// An idempotent [`Producer`] over this client, with a new producer id.
    pub fn producer(&self, retry: RetryPolicy) -> Producer {
        Producer::with_client(self.clone(), retry)
    }

    /// Opens a pipelined produce stream (idempotent: a random producer id, sequences per
    /// partition): send requests with [`ProduceSender::send`] without waiting, and read one
    /// answer per request, in order, from [`ProduceReceiver::next`]. Each request goes to its
    /// partition's leader over a stream to that broker (opened on first use) when the
    /// client routes, else through the bootstrap broker, which forwards it. At most
    /// `window` messages are in flight (sent and not yet answered); `send` waits past that.
    pub async fn produce_stream(
        &self,
        window: usize,
    ) -> Result<(ProduceSender, ProduceReceiver), Error> {
        let window = window.max(1);
        let (tx, rx) = mpsc::channel(window);
        let permits = Arc::new(Semaphore::new(window));
        let (announce, announced) = mpsc::unbounded_channel();
        let inbound = self
            .call(
                self.producer
                    .clone()
                    .produce_stream(ReceiverStream::new(rx)),
            )
            .await?;
        Ok((
            ProduceSender {
                streams: vec![tx],
                by_address: std::collections::HashMap::new(),
                by_partition: std::collections::HashMap::new(),
                window,
                client: self.clone(),
                next_id: 0,
                next_wire_id: 0,
                permits: Arc::clone(&permits),
                sequences: Some(producer::Sequences::new()),
                announce,
            },
            ProduceReceiver {
                inbounds: vec![inbound],
                permits,
                announced,
            },
        ))
    }

    /// Reads records of `topic`/`partition` from `offset`.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        options: FetchOptions,
    ) -> Result<Fetched, Error> {
        let request = pb::FetchRequest {
            topic: topic.to_owned(),
            partition,
            offset,
            max_bytes: options.max_bytes.unwrap_or(0),
            max_records: options.max_records.unwrap_or(0),
            max_wait_ms: types::millis_u32(options.max_wait),
        };
        let resp = self
            .routed_waiting(
                route::Target::Partition(topic, partition),
                options.max_wait,
                |channel| async move { consumer_client(channel).fetch(request).await },
            )
            .await?;
        Ok(resp.into())
    }
}

/// Consumer groups: administration and members.
impl Client {
    /// Creates group `name`. Idempotent with identical settings.
    pub async fn create_group(&self, name: &str, config: &GroupConfig) -> Result<GroupInfo, Error> {
        let resp = self
            .call(self.admin.clone().create_group(pb::CreateGroupRequest {
                name: name.to_owned(),
                config: Some(config.into()),
            }))
            .await?;
        resp.group
            .ok_or(Error::Malformed("CreateGroupResponse.group"))?
            .try_into()
    }

    /// Changes the mutable settings of group `name` (ack wait, max deliveries, dead-letter
    /// topic, session timeout); topic and type are immutable.
    pub async fn update_group(&self, name: &str, config: &GroupConfig) -> Result<GroupInfo, Error> {
        let resp = self
            .call(self.admin.clone().update_group(pb::UpdateGroupRequest {
                name: name.to_owned(),
                config: Some(config.into()),
            }))
            .await?;
        resp.group
            .ok_or(Error::Malformed("UpdateGroupResponse.group"))?
            .try_into()
    }

    /// Deletes group `name` and its state.
    pub async fn delete_group(&self, name: &str) -> Result<(), Error> {
        self.call(self.admin.clone().delete_group(pb::DeleteGroupRequest {
            name: name.to_owned(),
        }))
        .await?;
        Ok(())
    }

    /// Members, committed offsets, lag, pending and dead-lettered count of group `name`.
    pub async fn describe_group(&self, name: &str) -> Result<GroupInfo, Error> {
        let resp = self
            .call(self.admin.clone().describe_group(pb::DescribeGroupRequest {
                name: name.to_owned(),
            }))
            .await?;
        resp.group
            .ok_or(Error::Malformed("DescribeGroupResponse.group"))?
            .try_into()
    }

    /// Every group, or those of `topic`, sorted by name.
    pub async fn list_groups(&self, topic: Option<&str>) -> Result<Vec<GroupInfo>, Error> {
        self.call(self.admin.clone().list_groups(pb::ListGroupsRequest {
            topic: topic.map(str::to_owned).unwrap_or_default(),
        }))
        .await?
        .groups
        .into_iter()
        .map(TryInto::try_into)
        .collect()
    }

    /// Moves group `name` to `to`, forgetting its pending deliveries.
    pub async fn reset_group(&self, name: &str, to: StartFrom) -> Result<GroupInfo, Error> {
        let resp = self
            .call(self.admin.clone().reset_group(pb::ResetGroupRequest {
                name: name.to_owned(),
                to: Some(to.into()),
            }))
            .await?;
        resp.group
            .ok_or(Error::Malformed("ResetGroupResponse.group"))?
            .try_into()
    }

    /// Joins `group` as a pull member, creating the group with `create` when it does not
    /// exist (joining with another topic or type than the group has fails). A join a
    /// broker refuses with `UNAVAILABLE` (the group's coordinator partition has no leader
    /// yet, as right after its topic was created, or an election is under way) is tried
    /// again, backing off from 100 ms to 1 s, for up to
    /// [`REJOIN_FOR`], as Kafka's consumers retry `COORDINATOR_NOT_AVAILABLE`.
    pub async fn join(
        &self,
        group: &str,
        create: Option<&GroupConfig>,
    ) -> Result<PullMember, Error> {
        let request = pb::JoinRequest {
            group: group.to_owned(),
            create: create.map(Into::into),
        };
        let topic = create.map(|c| c.topic.as_str());
        let joined = while_retriable(|| {
            let request = request.clone();
            self.routed(route::Target::Group(group, topic), |c| async move {
                consumer_client(c).join(request).await
            })
        })
        .await?;
        Ok(PullMember {
            client: self.clone(),
            group: group.to_owned(),
            member_id: joined.member_id,
            partitions: joined.partitions,
            generation: joined.generation,
        })
    }

    /// Joins `group` as a push member (creating the group with `create` when missing). It
    /// grants `window` credits and one back per ack or nack, so at most `window`
    /// deliveries are unacked at any time. A join refused with `UNAVAILABLE` is tried
    /// again as by [`Client::join`].
    pub async fn subscribe(
        &self,
        group: &str,
        create: Option<&GroupConfig>,
        window: u32,
    ) -> Result<GroupConsumer, Error> {
        let joined = while_retriable(|| self.join_stream(group, create, window)).await?;
        Ok(GroupConsumer {
            tx: joined.tx,
            inbound: joined.inbound,
            buffered: VecDeque::new(),
            member_id: joined.member_id,
            partitions: joined.partitions,
            generation: joined.generation,
            rejoin: consumer::Rejoin {
                client: self.clone(),
                group: group.to_owned(),
                create: create.cloned(),
                window,
            },
            session: 1,
            rejoining: None,
        })
    }

    /// Opens a subscribe stream, joins `group` on it and grants `window` credits.
    pub(crate) async fn join_stream(
        &self,
        group: &str,
        create: Option<&GroupConfig>,
        window: u32,
    ) -> Result<consumer::Stream, Error> {
        let (tx, rx) = mpsc::channel(64);
        let join = pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Join(pb::JoinRequest {
                group: group.to_owned(),
                create: create.map(Into::into),
            })),
        };
        tx.send(join).await.map_err(|_| Error::StreamClosed)?;
        let topic = create.map(|c| c.topic.as_str());
        let target = route::Target::Group(group, topic);
        let url = self.url.clone();
        let mut inbound = self
            .routed(target, |c| async move {
                consumer_client(c).subscribe(ReceiverStream::new(rx)).await
            })
            .await?;
        let first = inbound
            .message()
            .await
            .map_err(|s| Error::from_call(&url, s))?;
        let Some(pb::SubscribeResponse {
            response: Some(pb::subscribe_response::Response::Joined(joined)),
        }) = first
        else {
            return Err(Error::Malformed(
                "the first SubscribeResponse must be joined",
            ));
        };
        let credits = pb::SubscribeRequest {
            request: Some(pb::subscribe_request::Request::Credits(window.max(1))),
        };
        tx.send(credits).await.map_err(|_| Error::StreamClosed)?;
        Ok(consumer::Stream {
            tx,
            inbound,
            member_id: joined.member_id,
            partitions: joined.partitions,
            generation: joined.generation,
        })
    }
}

/// Runs `attempt` while a broker refuses it with `UNAVAILABLE`, backing off from 100 ms
/// to 1 s between attempts, for up to [`REJOIN_FOR`]; then the last error. For calls
/// that change nothing when refused (a join: a group whose coordinator partition has no
/// leader yet creates nothing). Other errors end it at once: a broker that cannot be
/// reached is reported to the caller (a wrong address says so without a wait), and a
/// timed-out call's outcome is unknown.
async fn while_retriable<T, F, Fut>(mut attempt: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    let deadline = tokio::time::Instant::now() + REJOIN_FOR;
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match attempt().await {
            Err(e)
                if e.code() == Some(tonic::Code::Unavailable)
                    && tokio::time::Instant::now() + backoff < deadline =>
            {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
            }
            done => return done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_without_a_scheme_get_http() {
        assert_eq!(broker_url("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(
            broker_url("weir.shop.svc:7070"),
            "http://weir.shop.svc:7070"
        );
        assert_eq!(broker_url("https://b:443"), "https://b:443");
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_cause_once() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let err = Client::connect(&addr.to_string())
            .await
            .expect_err("nothing listens");
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("cannot connect to the broker at http://{addr}")),
            "{text}"
        );
        assert!(text.to_lowercase().contains("connection refused"), "{text}");
        assert_eq!(text.matches("connect error").count(), 0, "{text}");
        assert!(err.is_retriable());
    }
}
