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

/// How long a [`GroupConsumer`] keeps trying to join again after its stream failed with a
/// retriable error (its coordinator moved, was restarted or is unreachable) before it
/// returns the error; and how long [`crate::Client::join`] and
/// [`crate::Client::subscribe`] try a first join refused with `UNAVAILABLE`.
pub const REJOIN_FOR: Duration = Duration::from_secs(30);

/// A push member of a consumer group: a loop over [`next`](Self::next) with
/// [`ack`](Self::ack) or [`nack`](Self::nack) for each delivery. Credits are granted back one
/// per ack or nack, so unacked deliveries never exceed the window. Dropping it leaves the
/// group (Shared: its unacked deliveries go to the other members at once; Ordered: its
/// partitions are reassigned).
///
/// When its stream fails with a retriable error (the group's coordinator moved to another
/// broker with its coordinator partition's leadership, or stopped, or cannot be reached)
/// it joins the group again as a new member, for up to [`REJOIN_FOR`], as a Kafka consumer
/// rejoins after a coordinator change. Deliveries received before are then given to the
/// group's members again (acks of them, and acks sent while the stream was down, are
/// dropped), so the application may see a message a second time (at-least-once,
/// `docs/replication.md`).
#[derive(Debug)]
pub struct GroupConsumer {
    pub(crate) tx: mpsc::Sender<pb::SubscribeRequest>,
    pub(crate) inbound: Streaming<pb::SubscribeResponse>,
    /// Deliveries received in a batch and not yet returned by `next`.
    pub(crate) buffered: VecDeque<Delivery>,
    pub(crate) member_id: String,
    pub(crate) partitions: Vec<u32>,
    pub(crate) generation: u64,
    /// What joining again takes.
    pub(crate) rejoin: Rejoin,
    /// Joins so far; deliveries carry the one they came with.
    pub(crate) session: u64,
    /// Set while the member joins again after its stream failed.
    pub(crate) rejoining: Option<Rejoining>,
}

/// Progress of a [`GroupConsumer`] joining its group again.
#[derive(Debug)]
pub(crate) struct Rejoining {
    /// The error of the last attempt (or of the stream).
    last: Option<Error>,
    /// When it gives up.
    deadline: tokio::time::Instant,
    /// When it tries next.
    next_attempt: tokio::time::Instant,
    /// The wait before the attempt after next.
    backoff: Duration,
}

/// What a [`GroupConsumer`] needs to join its group again.
#[derive(Debug)]
pub(crate) struct Rejoin {
    pub client: Client,
    pub group: String,
    pub create: Option<crate::GroupConfig>,
    pub window: u32,
}

/// A joined subscribe stream.
pub(crate) struct Stream {
    pub tx: mpsc::Sender<pb::SubscribeRequest>,
    pub inbound: Streaming<pb::SubscribeResponse>,
    pub member_id: String,
    pub partitions: Vec<u32>,
    pub generation: u64,
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
    /// the stream. A retriable failure joins the group again ([`GroupConsumer`]).
    async fn receive(&mut self) -> Option<Result<(), Error>> {
        if self.rejoining.is_some() {
            return Some(self.rejoin().await);
        }
        let msg = match self.inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return None,
            Err(s) => return Some(self.rejoin_after(Error::Status(s)).await),
        };
        let session = self.session;
        let tagged = |d: pb::Delivery| Delivery {
            session,
            ..Delivery::from(d)
        };
        match msg.response {
            Some(pb::subscribe_response::Response::Delivery(d)) => {
                self.buffered.push_back(tagged(d));
            }
            Some(pb::subscribe_response::Response::Deliveries(batch)) => {
                self.buffered
                    .extend(batch.deliveries.into_iter().map(tagged));
            }
            Some(pb::subscribe_response::Response::Assignment(a)) => {
                self.partitions = a.partitions;
                self.generation = a.generation;
            }
            Some(pb::subscribe_response::Response::Error(e)) => {
                let error = Error::Status(Status::new(Code::from(e.code), e.message));
                return Some(self.rejoin_after(error).await);
            }
            Some(pb::subscribe_response::Response::Joined(_)) | None => {}
        }
        Some(Ok(()))
    }

    /// After `error` ended the stream: joins the group again when it is retriable
    /// ([`GroupConsumer::rejoin`]); else returns the error.
    async fn rejoin_after(&mut self, error: Error) -> Result<(), Error> {
        if !error.is_retriable() {
            return Err(error);
        }
        let now = tokio::time::Instant::now();
        self.rejoining = Some(Rejoining {
            last: Some(error),
            deadline: now + REJOIN_FOR,
            next_attempt: now + Duration::from_millis(100),
            backoff: Duration::from_millis(100),
        });
        self.rejoin().await
    }

    /// Joins the group again (backing off from 100 ms to 1 s, for up to [`REJOIN_FOR`]),
    /// dropping the deliveries not yet returned (the group hands them out again); returns
    /// the last error when every attempt failed or one was not retriable. Cancel-safe: a
    /// caller that gives up waiting (a timeout around [`GroupConsumer::next`]) resumes
    /// where it stopped with its next call.
    async fn rejoin(&mut self) -> Result<(), Error> {
        loop {
            let Some(r) = self.rejoining.as_mut() else {
                return Ok(());
            };
            if tokio::time::Instant::now() >= r.deadline {
                let last = self.rejoining.take().and_then(|r| r.last);
                return Err(last.unwrap_or(Error::StreamClosed));
            }
            tokio::time::sleep_until(r.next_attempt.min(r.deadline)).await;
            r.backoff = (r.backoff * 2).min(Duration::from_secs(1));
            r.next_attempt = tokio::time::Instant::now() + r.backoff;
            let j = &self.rejoin;
            match j
                .client
                .join_stream(&j.group, j.create.as_ref(), j.window)
                .await
            {
                Ok(joined) => {
                    self.tx = joined.tx;
                    self.inbound = joined.inbound;
                    self.member_id = joined.member_id;
                    self.partitions = joined.partitions;
                    self.generation = joined.generation;
                    self.buffered.clear();
                    self.session += 1;
                    self.rejoining = None;
                    return Ok(());
                }
                Err(e) if e.is_retriable() => {
                    if let Some(r) = self.rejoining.as_mut() {
                        r.last = Some(e);
                    }
                }
                Err(e) => {
                    self.rejoining = None;
                    return Err(e);
                }
            }
        }
    }

    /// Sends `request` on the stream. A stream that ended drops it: the next
    /// [`GroupConsumer::next`] finds out why and joins again, and the group delivers what
    /// the dropped request acked again.
    async fn send(&self, request: pb::subscribe_request::Request) -> Result<(), Error> {
        // Err only when the stream ended.
        let _ = self
            .tx
            .send(pb::SubscribeRequest {
                request: Some(request),
            })
            .await;
        Ok(())
    }

    /// Acknowledges a delivery and grants one credit.
    pub async fn ack(&self, d: &Delivery) -> Result<(), Error> {
        self.ack_all(std::slice::from_ref(d)).await
    }

    /// Acknowledges many deliveries in one request and grants as many credits. Deliveries
    /// received before the member joined again are skipped (the group delivers them again).
    pub async fn ack_all(&self, deliveries: &[Delivery]) -> Result<(), Error> {
        let current: Vec<Delivery>;
        let deliveries = if deliveries.iter().all(|d| d.session == self.session) {
            deliveries
        } else {
            current = deliveries
                .iter()
                .filter(|d| d.session == self.session)
                .cloned()
                .collect();
            &current
        };
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
        if d.session != self.session {
            // Received before the member joined again: the group delivers it again.
            return Ok(());
        }
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
            .routed_waiting(Target::Group(&self.group, None), wait, |c| async move {
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
