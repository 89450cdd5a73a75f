//! Idempotent producing: a [`Producer`] that numbers its requests and retries them with the
//! same sequence (Kafka's `enable.idempotence`, KIP-98), and a pipelined produce stream
//! ([`ProduceSender`], [`ProduceReceiver`]) that numbers its requests the same way.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::sync::{Semaphore, mpsc};
use tonic::{Code, Status, Streaming};

use crate::{Ack, Client, Error, Record, pb};

/// A producer id and the next sequence per topic: the one sequence logic of the client.
/// The broker stores a request with `(producer id, sequence)` once, however often it is
/// retried, and refuses a gap.
#[derive(Debug, Clone)]
pub(crate) struct Sequences {
    producer_id: u64,
    next: HashMap<String, u64>,
}

impl Sequences {
    pub fn new() -> Self {
        Self {
            producer_id: new_producer_id(),
            next: HashMap::new(),
        }
    }

    pub fn producer_id(&self) -> u64 {
        self.producer_id
    }

    /// The sequence the next request to `topic` carries.
    pub fn peek(&self, topic: &str) -> u64 {
        self.next.get(topic).copied().unwrap_or(0)
    }

    /// Moves past the sequence [`peek`](Self::peek) returned (the request was stored, or
    /// is on its way in a stream that keeps order).
    pub fn advance(&mut self, topic: &str) {
        *self.next.entry(topic.to_owned()).or_insert(0) += 1;
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
/// its topic and is retried with the same sequence after transport errors and
/// `UNAVAILABLE`, reconnecting as needed, so a request is stored exactly once even when
/// acks are lost or the broker restarts.
#[derive(Debug)]
pub struct Producer {
    address: String,
    client: Option<Client>,
    sequences: Sequences,
    retry: RetryPolicy,
}

impl Producer {
    /// A producer for the broker at `address` with a new random producer id; connects
    /// lazily.
    pub fn new(address: &str, retry: RetryPolicy) -> Self {
        Self {
            address: address.to_owned(),
            client: None,
            sequences: Sequences::new(),
            retry,
        }
    }

    /// This producer's id.
    pub fn producer_id(&self) -> u64 {
        self.sequences.producer_id()
    }

    /// Sends `records` to `topic` (to `partition`, else by key or round robin) and returns
    /// one ack per partition; retries transport failures with the same sequence. Other
    /// errors are returned at once and the sequence is not used up (so the caller may send
    /// the same records again, e.g. after `RESOURCE_EXHAUSTED` from a full topic).
    pub async fn send(
        &mut self,
        topic: &str,
        partition: Option<u32>,
        records: Vec<Record>,
    ) -> Result<Vec<Ack>, Error> {
        let sequence = self.sequences.peek(topic);
        let wire: Vec<pb::Record> = records.into_iter().map(Into::into).collect();
        let mut last = Error::StreamClosed;
        for _ in 0..self.retry.attempts.max(1) {
            let client = match &self.client {
                Some(c) => c.clone(),
                None => match Client::connect(&self.address).await {
                    Ok(c) => {
                        self.client = Some(c.clone());
                        c
                    }
                    Err(e) => {
                        last = e;
                        tokio::time::sleep(self.retry.backoff).await;
                        continue;
                    }
                },
            };
            let request = pb::ProduceRequest {
                topic: topic.to_owned(),
                partition,
                records: wire.clone(),
                producer_id: self.sequences.producer_id(),
                sequence,
            };
            match client.produce_request(request).await {
                Ok(acks) => {
                    self.sequences.advance(topic);
                    return Ok(acks);
                }
                Err(e) if e.is_retriable() => {
                    self.client = None;
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
    pub(crate) tx: mpsc::Sender<pb::ProduceStreamRequest>,
    pub(crate) next_id: u64,
    /// One permit per request that may still be sent; the receiver returns them.
    pub(crate) permits: Arc<Semaphore>,
    /// `None` once idempotence is disabled.
    pub(crate) sequences: Option<Sequences>,
}

impl ProduceSender {
    /// Queues a produce request; returns its request id (0, 1, 2, … in sending order).
    /// Waits only when the window is full.
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
        let (producer_id, sequence) = match &mut self.sequences {
            Some(s) => {
                let sequence = s.peek(topic);
                s.advance(topic);
                (s.producer_id(), sequence)
            }
            None => (0, 0),
        };
        self.tx
            .send(pb::ProduceStreamRequest {
                request_id: id,
                request: Some(pb::ProduceRequest {
                    topic: topic.to_owned(),
                    partition,
                    records: records.into_iter().map(Into::into).collect(),
                    producer_id,
                    sequence,
                }),
            })
            .await
            .map_err(|_| Error::StreamClosed)?;
        Ok(id)
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
    pub(crate) inbound: Streaming<pb::ProduceStreamResponse>,
    pub(crate) permits: Arc<Semaphore>,
}

impl Drop for ProduceReceiver {
    fn drop(&mut self) {
        // Nobody reads answers any more: wake a sender waiting for the window.
        self.permits.close();
    }
}

impl ProduceReceiver {
    /// The next answer; `None` once the stream has ended, `Some(Err)` when the stream
    /// itself failed (the requests without an answer may or may not be stored).
    pub async fn next(&mut self) -> Option<Result<StreamAnswer, Error>> {
        match self.inbound.message().await {
            Ok(Some(resp)) => {
                self.permits.add_permits(1);
                let result = match resp.result {
                    Some(pb::produce_stream_response::Result::Ack(a)) => {
                        Ok(a.acks.into_iter().map(Ack::from).collect())
                    }
                    Some(pb::produce_stream_response::Result::Error(e)) => {
                        Err(Error::Status(Status::new(Code::from(e.code), e.message)))
                    }
                    None => Err(Error::Malformed("ProduceStreamResponse.result")),
                };
                Some(Ok(StreamAnswer {
                    request_id: resp.request_id,
                    result,
                }))
            }
            Ok(None) => {
                self.permits.close();
                None
            }
            Err(status) => {
                self.permits.close();
                Some(Err(Error::Status(status)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_count_per_topic_from_zero() {
        let mut s = Sequences::new();
        assert_ne!(s.producer_id(), 0);
        assert_eq!(s.peek("a"), 0);
        s.advance("a");
        s.advance("a");
        assert_eq!(s.peek("a"), 2);
        assert_eq!(s.peek("b"), 0, "each topic has its own sequence");
    }
}
