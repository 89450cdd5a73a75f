//! Idempotent producing: a [`Producer`] that numbers its requests and retries them with the
//! same sequence (Kafka's `enable.idempotence`, KIP-98), and a pipelined produce stream
//! ([`ProduceSender`], [`ProduceReceiver`]) that numbers its requests the same way.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status, Streaming};

use weir_proto::partitioner;

use crate::{Ack, Client, Error, Record, pb};

/// A producer id and the next sequence per partition: the one sequence logic of the
/// client. The broker stores a request with `(producer id, partition, sequence)` once,
/// however often it is retried, and refuses a gap (Kafka's KIP-98).
#[derive(Debug, Clone)]
pub(crate) struct Sequences {
    producer_id: u64,
    next: HashMap<(String, u32), u64>,
    /// Per topic, the partition the next request of unkeyed records goes to (round robin,
    /// one partition per request: Kafka's sticky partitioner).
    unkeyed: HashMap<String, u32>,
}

impl Sequences {
    pub fn new() -> Self {
        Self {
            producer_id: new_producer_id(),
            next: HashMap::new(),
            unkeyed: HashMap::new(),
        }
    }

    pub fn producer_id(&self) -> u64 {
        self.producer_id
    }

    /// The sequence the next request to `topic`/`partition` carries.
    pub fn peek(&self, topic: &str, partition: u32) -> u64 {
        self.next
            .get(&(topic.to_owned(), partition))
            .copied()
            .unwrap_or(0)
    }

    /// Moves past the sequence [`peek`](Self::peek) returned (the request was stored, or
    /// is on its way in a stream that keeps order).
    pub fn advance(&mut self, topic: &str, partition: u32) {
        *self.next.entry((topic.to_owned(), partition)).or_insert(0) += 1;
    }

    /// Splits `records` of a topic with `count` partitions by the partition each goes to:
    /// all to `partition` when given; else keyed records to `murmur2(key) mod count` and
    /// unkeyed ones to this request's round-robin partition. Partitions ascending; records
    /// of one partition keep their order.
    pub fn split(
        &mut self,
        topic: &str,
        partition: Option<u32>,
        count: u32,
        records: Vec<pb::Record>,
    ) -> Vec<(u32, Vec<pb::Record>)> {
        if let Some(p) = partition {
            return vec![(p, records)];
        }
        let count = count.max(1);
        if !records.is_empty() && records.iter().all(|r| r.key.is_none()) {
            // The common case: one partition, the request's records as they are.
            return vec![(self.next_unkeyed(topic, count), records)];
        }
        let mut unkeyed = None;
        let mut parts: Vec<(u32, Vec<pb::Record>)> = Vec::new();
        for r in records {
            let p = match r.key.as_deref() {
                Some(k) => partitioner::partition_for_key(k, count),
                None => *unkeyed.get_or_insert_with(|| self.next_unkeyed(topic, count)),
            };
            match parts.iter_mut().find(|(q, _)| *q == p) {
                Some((_, v)) => v.push(r),
                None => parts.push((p, vec![r])),
            }
        }
        parts.sort_by_key(|(p, _)| *p);
        parts
    }

    /// The partition of `count` that this request's unkeyed records of `topic` go to, and
    /// the turn moved on to the next (round robin per request).
    fn next_unkeyed(&mut self, topic: &str, count: u32) -> u32 {
        let turn = match self.unkeyed.get_mut(topic) {
            Some(turn) => turn,
            None => self.unkeyed.entry(topic.to_owned()).or_insert(0),
        };
        let p = *turn % count;
        *turn = turn.wrapping_add(1);
        p
    }
}

/// Partitions of `topic`: from the client's cached metadata, else asked of the broker
/// (`NOT_FOUND` for an unknown topic).
pub(crate) async fn partition_count(client: &Client, topic: &str) -> Result<u32, Error> {
    match client.router.partitions(topic).await {
        Some(n) => Ok(n),
        None => Ok(client.describe_topic(topic).await?.config.partitions),
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

/// Retries of a [`Producer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts per request before giving up (at least 1).
    pub attempts: u32,
    /// Wait between attempts.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    /// 100 attempts, 100 ms apart: a broker restart (seconds) is ridden out.
    fn default() -> Self {
        Self {
            attempts: 100,
            backoff: Duration::from_millis(100),
        }
    }
}

/// An idempotent producer that retries: each [`send`](Self::send) gets the next sequence of
/// each partition it writes to and is retried with the same sequence after transport errors
/// and `UNAVAILABLE`, reconnecting as needed, so a request is stored exactly once even when
/// acks are lost or the broker restarts. Requests go straight to the partition's leader in a
/// cluster ([`Client`]'s routing).
#[derive(Debug)]
pub struct Producer {
    address: String,
    client: Option<Client>,
    sequences: Sequences,
    retry: RetryPolicy,
}

impl Producer {
    /// A producer for the broker (or comma-separated bootstrap brokers) at `address` with a
    /// new random producer id; connects lazily.
    pub fn new(address: &str, retry: RetryPolicy) -> Self {
        Self {
            address: address.to_owned(),
            client: None,
            sequences: Sequences::new(),
            retry,
        }
    }

    /// A producer over `client`'s connections (and cached metadata), with a new random
    /// producer id.
    pub fn with_client(client: Client, retry: RetryPolicy) -> Self {
        Self {
            address: client.url().to_owned(),
            client: Some(client),
            sequences: Sequences::new(),
            retry,
        }
    }

    /// This producer's id.
    pub fn producer_id(&self) -> u64 {
        self.sequences.producer_id()
    }

    /// The client, connected on first use (transport failures are retried).
    async fn client(&mut self) -> Result<Client, Error> {
        let mut last = Error::StreamClosed;
        for _ in 0..self.retry.attempts.max(1) {
            if let Some(c) = &self.client {
                return Ok(c.clone());
            }
            match Client::connect(&self.address).await {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    last = e;
                    tokio::time::sleep(self.retry.backoff).await;
                }
            }
        }
        Err(last)
    }

    /// Sends `records` to `topic` (to `partition`, else by key, else one partition round
    /// robin) and returns one ack per partition written, in ascending partition order.
    ///
    /// Sequences count per partition (Kafka's KIP-98), so records for several partitions
    /// go as one request per partition, each with that partition's next sequence, one after
    /// another in ascending partition order; each is retried after transport failures with
    /// the same sequence. Other errors are returned at once and that partition's sequence is
    /// not used up (the caller may send the same records again, e.g. after
    /// `RESOURCE_EXHAUSTED` from a full topic); the requests of lower partitions were then
    /// stored (a retry of the whole call stores them again under new sequences).
    pub async fn send(
        &mut self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<Record>,
    ) -> Result<Vec<Ack>, Error> {
        let wire: Vec<pb::Record> = records.into_iter().map(Into::into).collect();
        let parts = if let Some(p) = partition {
            vec![(p, wire)]
        } else {
            let client = self.client().await?;
            let count = partition_count(&client, topic).await?;
            self.sequences.split(topic, None, count, wire)
        };
        let mut acks = Vec::with_capacity(parts.len());
        for (p, records) in parts {
            acks.extend(self.send_to(topic, p, records).await?);
        }
        Ok(acks)
    }

    /// Sends one request to `topic`/`partition` with the partition's next sequence,
    /// retrying transport failures with the same sequence.
    async fn send_to(
        &mut self,
        topic: &str,
        partition: u32,
        records: Vec<pb::Record>,
    ) -> Result<Vec<Ack>, Error> {
        let sequence = self.sequences.peek(topic, partition);
        let mut last = Error::StreamClosed;
        for _ in 0..self.retry.attempts.max(1) {
            let client = match self.client().await {
                Ok(c) => c,
                Err(e) => return Err(e),
            };
            let request = pb::ProduceRequest {
                topic: topic.to_owned(),
                partition: Some(partition),
                records: records.clone(),
                producer_id: self.sequences.producer_id(),
                sequence,
            };
            match client.produce_request(request, Some(partition)).await {
                Ok(acks) => {
                    self.sequences.advance(topic, partition);
                    return Ok(acks);
                }
                Err(e) if e.is_retriable() => {
                    last = e;
                    tokio::time::sleep(self.retry.backoff).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }
}

/// Sending half of a produce stream.
#[derive(Debug)]
pub struct ProduceSender {
    /// Streams of this produce stream, by index: 0 to the bootstrap broker, then one per
    /// partition leader reached directly, opened on first use.
    pub(crate) streams: Vec<mpsc::Sender<pb::ProduceStreamRequest>>,
    /// Index of the stream to each leader's address.
    pub(crate) by_address: HashMap<String, usize>,
    /// The stream each partition's messages go on, chosen at its first message and kept:
    /// messages of one partition on one stream keep their order (an idempotent producer's
    /// sequences must arrive in order).
    pub(crate) by_partition: HashMap<(String, u32), usize>,
    /// Most messages in flight (also each stream's queue).
    pub(crate) window: usize,
    /// The client the stream was opened on (its metadata gives partition counts and leaders).
    pub(crate) client: Client,
    /// Id of the next request [`send`](Self::send) returns.
    pub(crate) next_id: u64,
    /// Id of the next message on the wire (a request may need one per partition).
    pub(crate) next_wire_id: u64,
    /// One permit per message that may still be sent; the receiver returns them.
    pub(crate) permits: Arc<Semaphore>,
    /// `None` once idempotence is disabled.
    pub(crate) sequences: Option<Sequences>,
    /// What the receiver must know, in order.
    pub(crate) announce: mpsc::UnboundedSender<Announce>,
}

/// What the sending half tells the receiving half, in order.
#[derive(Debug)]
pub(crate) enum Announce {
    /// A stream to a leader was opened: the next index.
    Stream(Streaming<pb::ProduceStreamResponse>),
    /// A request: its id and the stream of each of its wire messages, or the error it is
    /// answered with without going out (its topic's partitions could not be known).
    Request {
        id: u64,
        streams: Vec<usize>,
        refused: Option<Error>,
    },
}

impl ProduceSender {
    /// Queues a produce request; returns its request id (0, 1, 2, … in sending order).
    /// Waits only when the window is full.
    ///
    /// Idempotent (the default), the request's records go as one message per partition
    /// they land on (sequences count per partition; unkeyed records without `partition`
    /// go to one partition chosen round robin per request), and its answer combines theirs.
    /// A message for a partition goes straight to its leader when the client routes (a
    /// stream per leader, opened on first use), else through the broker the stream was
    /// opened on, which forwards it.
    pub async fn send(
        &mut self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<Record>,
    ) -> Result<u64, Error> {
        let id = self.next_id;
        self.next_id += 1;
        let messages = match self.messages(topic, partition, records).await {
            Ok(m) => m,
            // Answered in its turn, like a refusal by the broker: the stream goes on.
            Err(e) => {
                self.announce
                    .send(Announce::Request {
                        id,
                        streams: Vec::new(),
                        refused: Some(e),
                    })
                    .map_err(|_| Error::StreamClosed)?;
                return Ok(id);
            }
        };
        let mut streams = Vec::with_capacity(messages.len());
        for m in &messages {
            let k = match m.partition {
                Some(p) => {
                    if let Some(k) = self.by_partition.get(&(topic.to_owned(), p)) {
                        *k
                    } else {
                        let k = self.stream_to(topic, p).await;
                        self.by_partition.insert((topic.to_owned(), p), k);
                        k
                    }
                }
                None => 0,
            };
            streams.push(k);
        }
        // Announced before its messages, so the receiver knows where every answer comes from.
        self.announce
            .send(Announce::Request {
                id,
                streams: streams.clone(),
                refused: None,
            })
            .map_err(|_| Error::StreamClosed)?;
        for (request, k) in messages.into_iter().zip(streams) {
            self.permits
                .acquire()
                .await
                .map_err(|_| Error::StreamClosed)?
                .forget();
            let request_id = self.next_wire_id;
            self.next_wire_id += 1;
            self.streams
                .get(k)
                .ok_or(Error::StreamClosed)?
                .send(pb::ProduceStreamRequest {
                    request_id,
                    request: Some(request),
                })
                .await
                .map_err(|_| Error::StreamClosed)?;
        }
        Ok(id)
    }

    /// The wire messages of a request: one per partition when idempotent, numbered.
    async fn messages(
        &mut self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<Record>,
    ) -> Result<Vec<pb::ProduceRequest>, Error> {
        let wire: Vec<pb::Record> = records.into_iter().map(Into::into).collect();
        if self.sequences.is_none() {
            return Ok(vec![pb::ProduceRequest {
                topic: topic.to_owned(),
                partition,
                records: wire,
                ..pb::ProduceRequest::default()
            }]);
        }
        let count = match partition {
            Some(_) => 1,
            None => partition_count(&self.client, topic).await?,
        };
        let Some(s) = &mut self.sequences else {
            return Err(Error::StreamClosed);
        };
        Ok(s.split(topic, partition, count, wire)
            .into_iter()
            .map(|(p, records)| {
                let sequence = s.peek(topic, p);
                s.advance(topic, p);
                pb::ProduceRequest {
                    topic: topic.to_owned(),
                    partition: Some(p),
                    records,
                    producer_id: s.producer_id(),
                    sequence,
                }
            })
            .collect())
    }

    /// The index of the stream to the leader of `topic`/`partition`, opened (and announced)
    /// on first use; 0 (the bootstrap broker's) when the leader is not known, not reachable,
    /// or the bootstrap broker itself, or a stream to it cannot be opened.
    async fn stream_to(&mut self, topic: &str, partition: u32) -> usize {
        let chosen = self
            .client
            .router
            .channel(crate::route::Target::Partition(topic, partition))
            .await;
        let Some(address) = chosen.direct.filter(|_| !chosen.bootstrap) else {
            return 0;
        };
        if let Some(k) = self.by_address.get(&address) {
            return *k;
        }
        let (tx, rx) = mpsc::channel(self.window);
        let Ok(inbound) = crate::producer_client(chosen.channel)
            .produce_stream(ReceiverStream::new(rx))
            .await
        else {
            return 0;
        };
        if self
            .announce
            .send(Announce::Stream(inbound.into_inner()))
            .is_err()
        {
            return 0;
        }
        self.streams.push(tx);
        let k = self.streams.len() - 1;
        self.by_address.insert(address, k);
        k
    }

    /// Sends later requests without producer id and sequence: retries are not deduplicated.
    pub fn disable_idempotence(&mut self) {
        self.sequences = None;
    }

    /// The idempotent producer id of this stream; `None` when disabled.
    pub fn producer_id(&self) -> Option<u64> {
        self.sequences.as_ref().map(Sequences::producer_id)
    }
}

/// The broker's answer to one request of a produce stream.
#[derive(Debug)]
pub struct StreamAnswer {
    /// The id [`ProduceSender::send`] returned for the request.
    pub request_id: u64,
    /// Its acks, or why the broker refused it.
    pub result: Result<Vec<Ack>, Error>,
}

/// Receiving half of a produce stream: answers in request order.
#[derive(Debug)]
pub struct ProduceReceiver {
    /// The streams' answers, by the sender's stream index.
    pub(crate) inbounds: Vec<Streaming<pb::ProduceStreamResponse>>,
    pub(crate) permits: Arc<Semaphore>,
    /// What the sender announced, in order.
    pub(crate) announced: mpsc::UnboundedReceiver<Announce>,
}

impl Drop for ProduceReceiver {
    fn drop(&mut self) {
        // Nobody reads answers any more: wake a sender waiting for the window.
        self.permits.close();
    }
}

impl ProduceReceiver {
    /// The next answer; `None` once the sending half is dropped and every request it sent
    /// is answered; `Some(Err)` when a stream itself failed (the requests without an answer
    /// may or may not be stored). A request sent as several messages (one per partition) is
    /// answered once, with the acks of all (ascending partition) or the first error among
    /// them.
    pub async fn next(&mut self) -> Option<Result<StreamAnswer, Error>> {
        let (id, streams) = loop {
            match self.announced.recv().await? {
                Announce::Stream(s) => self.inbounds.push(s),
                Announce::Request {
                    id,
                    refused: Some(e),
                    ..
                } => {
                    return Some(Ok(StreamAnswer {
                        request_id: id,
                        result: Err(e),
                    }));
                }
                Announce::Request { id, streams, .. } => break (id, streams),
            }
        };
        let mut acks = Vec::new();
        let mut failed = None;
        for k in streams {
            let Some(inbound) = self.inbounds.get_mut(k) else {
                return Some(Err(Error::Malformed("an answer on no stream")));
            };
            let answer = match inbound.message().await {
                Ok(Some(resp)) => {
                    self.permits.add_permits(1);
                    resp
                }
                Ok(None) => {
                    self.permits.close();
                    return Some(Err(Error::StreamClosed));
                }
                Err(status) => {
                    self.permits.close();
                    return Some(Err(Error::Status(status)));
                }
            };
            match answer.result {
                Some(pb::produce_stream_response::Result::Ack(a)) => {
                    acks.extend(a.acks.into_iter().map(Ack::from));
                }
                Some(pb::produce_stream_response::Result::Error(e)) => {
                    failed.get_or_insert(Error::Status(Status::new(Code::from(e.code), e.message)));
                }
                None => {
                    failed.get_or_insert(Error::Malformed("ProduceStreamResponse.result"));
                }
            }
        }
        acks.sort_by_key(|a| a.partition);
        Some(Ok(StreamAnswer {
            request_id: id,
            result: match failed {
                Some(e) => Err(e),
                None => Ok(acks),
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_count_per_partition_from_zero() {
        let mut s = Sequences::new();
        assert_ne!(s.producer_id(), 0);
        assert_eq!(s.peek("a", 0), 0);
        s.advance("a", 0);
        s.advance("a", 0);
        assert_eq!(s.peek("a", 0), 2);
        assert_eq!(s.peek("a", 1), 0, "each partition has its own sequence");
        assert_eq!(s.peek("b", 0), 0, "each topic has its own sequences");
    }

    fn keyed(key: &str) -> pb::Record {
        pb::Record {
            key: Some(bytes::Bytes::copy_from_slice(key.as_bytes())),
            ..pb::Record::default()
        }
    }

    #[test]
    fn records_split_by_the_brokers_partitioner_and_keep_their_order() {
        let mut s = Sequences::new();
        let keys = ["a", "b", "c", "a", "d", "b"];
        let parts = s.split("t", None, 4, keys.iter().map(|k| keyed(k)).collect());
        let mut seen = 0;
        for (p, records) in &parts {
            for r in records {
                let k = r.key.as_deref().expect("keyed");
                assert_eq!(partitioner::partition_for_key(k, 4), *p);
            }
            seen += records.len();
        }
        assert_eq!(seen, keys.len());
        assert!(parts.windows(2).all(|w| w[0].0 < w[1].0), "ascending");
        let a = parts
            .iter()
            .find(|(p, _)| *p == partitioner::partition_for_key(b"a", 4))
            .expect("a's partition");
        let order: Vec<&[u8]> = a.1.iter().filter_map(|r| r.key.as_deref()).collect();
        assert_eq!(order.first(), Some(&b"a".as_slice()), "order kept");
    }

    #[test]
    fn unkeyed_requests_go_round_robin_one_partition_each() {
        let mut s = Sequences::new();
        let unkeyed = || vec![pb::Record::default(), pb::Record::default()];
        let first: Vec<u32> = (0..6)
            .map(|_| {
                let parts = s.split("t", None, 3, unkeyed());
                assert_eq!(parts.len(), 1, "one partition per request");
                parts[0].0
            })
            .collect();
        assert_eq!(first, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(s.split("t", Some(2), 3, unkeyed())[0].0, 2);
    }
}
