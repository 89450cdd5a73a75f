//! Group members: [`GroupConsumer`], pushed to over a stream with credits, and
//! [`PullMember`], which asks for deliveries. Both ack what they were given with
//! [`Delivery`]s, never raw offsets.

use std::{collections::VecDeque, time::Duration};

use tokio::sync::mpsc;
use tonic::{Code, Status, Streaming};

use crate::{
    Client, Delivery, Error, consumer_client, pb, ranges, route::Target, types::millis_u32,
};

/// An ack request for `deliveries`.
fn ack_request(deliveries: &[Delivery]) -> pb::AckRequest {
    pb::AckRequest {
        ack_ranges: ranges(deliveries),
        ..pb::AckRequest::default()
    }
}

/// A nack request for `d`: redelivered after `delay` (Shared groups; Ordered rewinds to
/// it), `error` kept for the dead-letter headers.
fn nack_request(d: &Delivery, delay: Duration, error: &str) -> pb::AckRequest {
    pb::AckRequest {
        nacks: vec![pb::DeliveryRef {
            partition: d.partition,
            offset: d.offset,
        }],
        nack_delay_ms: millis_u32(delay),
        error: error.to_owned(),
        ..pb::AckRequest::default()
    }
}

/// A push member of a consumer group: a loop over [`next`](Self::next) with
/// [`ack`](Self::ack) or [`nack`](Self::nack) for each delivery. Credits are granted back one
/// per ack or nack, so unacked deliveries never exceed the window. Dropping it leaves the
/// group (Shared: its unacked deliveries go to the other members at once; Ordered: its
/// partitions are reassigned).
#[derive(Debug)]
pub struct GroupConsumer {
    pub(crate) tx: mpsc::Sender<pb::SubscribeRequest>,
    pub(crate) inbound: Streaming<pb::SubscribeResponse>,
    /// Deliveries received in a batch and not yet returned by `next`.
    pub(crate) buffered: VecDeque<Delivery>,
    pub(crate) member_id: String,
    pub(crate) partitions: Vec<u32>,
    pub(crate) generation: u64,
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
    pub async fn next(&mut self) -> Option<Result<Delivery, Error>> {
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
    pub async fn next_batch(&mut self) -> Option<Result<Vec<Delivery>, Error>> {
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
        let msg = match self.inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return None,
            Err(s) => return Some(Err(Error::Status(s))),
        };
        match msg.response {
            Some(pb::subscribe_response::Response::Delivery(d)) => {
                self.buffered.push_back(d.into());
            }
            Some(pb::subscribe_response::Response::Deliveries(batch)) => {
                self.buffered
                    .extend(batch.deliveries.into_iter().map(Delivery::from));
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

    async fn send(&self, request: pb::subscribe_request::Request) -> Result<(), Error> {
        self.tx
            .send(pb::SubscribeRequest {
                request: Some(request),
            })
            .await
            .map_err(|_| Error::StreamClosed)
    }

    /// Acknowledges a delivery and grants one credit.
    pub async fn ack(&self, d: &Delivery) -> Result<(), Error> {
        self.ack_all(std::slice::from_ref(d)).await
    }

    /// Acknowledges many deliveries in one request and grants as many credits.
    pub async fn ack_all(&self, deliveries: &[Delivery]) -> Result<(), Error> {
        if deliveries.is_empty() {
            return Ok(());
        }
        self.send(pb::subscribe_request::Request::Ack(ack_request(deliveries)))
            .await?;
        self.grant(u32::try_from(deliveries.len()).unwrap_or(u32::MAX))
            .await
    }

    /// Negatively acknowledges a delivery (redelivered after `delay`, with `error` kept for
    /// the dead-letter headers) and grants one credit.
    pub async fn nack(&self, d: &Delivery, delay: Duration, error: &str) -> Result<(), Error> {
        self.send(pb::subscribe_request::Request::Ack(nack_request(
            d, delay, error,
        )))
        .await?;
        self.grant(1).await
    }

    /// Leaves the group after the broker has applied every ack and nack sent so far: closes
    /// the sending side, then reads the stream to its end (at most `timeout`). Deliveries
    /// that arrive meanwhile are not acked and go back to the group.
    pub async fn close(self, timeout: Duration) -> Result<(), Error> {
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

/// A pull member of a consumer group: [`pull`](Self::pull) deliveries, then
/// [`ack`](Self::ack) or [`nack`](Self::nack) them. A pull member that neither pulls nor
/// [`heartbeat`](Self::heartbeat)s within the group's session timeout is removed.
#[derive(Debug, Clone)]
pub struct PullMember {
    pub(crate) client: Client,
    pub(crate) group: String,
    pub(crate) member_id: String,
    pub(crate) partitions: Vec<u32>,
    pub(crate) generation: u64,
}

impl PullMember {
    /// This member's id.
    pub fn member_id(&self) -> &str {
        &self.member_id
    }

    /// Ordered groups: the partitions this member owned at the last join or heartbeat.
    pub fn partitions(&self) -> &[u32] {
        &self.partitions
    }

    /// The group's generation at the last join or heartbeat.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Up to `max` deliveries, waiting up to `wait` (at most 60 s) for the first.
    pub async fn pull(&self, max: u32, wait: Duration) -> Result<Vec<Delivery>, Error> {
        let request = pb::PullRequest {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            max_messages: max,
            max_wait_ms: millis_u32(wait),
        };
        let resp = self
            .client
            .routed(Target::Group(&self.group, None), |c| async move {
                consumer_client(c).pull(request).await
            })
            .await?;
        Ok(resp.deliveries.into_iter().map(Delivery::from).collect())
    }

    /// Acknowledges `deliveries`, all or none (a refused ack changes nothing).
    pub async fn ack(&self, deliveries: &[Delivery]) -> Result<(), Error> {
        self.send(ack_request(deliveries)).await
    }

    /// Negatively acknowledges `d`: redelivered after `delay` (Shared; an Ordered group
    /// rewinds its partition to it), with `error` kept for the dead-letter headers.
    pub async fn nack(&self, d: &Delivery, delay: Duration, error: &str) -> Result<(), Error> {
        self.send(nack_request(d, delay, error)).await
    }

    /// Sends an ack request as built here, with this member's group and id.
    async fn send(&self, mut request: pb::AckRequest) -> Result<(), Error> {
        request.group.clone_from(&self.group);
        request.member_id.clone_from(&self.member_id);
        self.client
            .routed(Target::Group(&self.group, None), |c| async move {
                consumer_client(c).ack(request).await
            })
            .await?;
        Ok(())
    }

    /// Tells the group this member is alive; refreshes its generation and partitions.
    pub async fn heartbeat(&mut self) -> Result<(), Error> {
        let request = pb::HeartbeatRequest {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
        };
        let resp = self
            .client
            .routed(Target::Group(&self.group, None), |c| async move {
                consumer_client(c).heartbeat(request).await
            })
            .await?;
        self.generation = resp.generation;
        self.partitions = resp.partitions;
        Ok(())
    }

    /// Leaves the group at once: unacked deliveries go back to the other members.
    pub async fn leave(self) -> Result<(), Error> {
        let request = pb::LeaveRequest {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
        };
        self.client
            .routed(Target::Group(&self.group, None), |c| async move {
                consumer_client(c).leave(request).await
            })
            .await?;
        Ok(())
    }
}
