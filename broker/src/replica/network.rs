//! Replica groups' Raft messages between brokers: `weir.v1.Raft/Partition` on the brokers'
//! gRPC port, one pooled HTTP/2 channel per peer shared by every group (openraft's
//! `multi-raft-kv` example routes by group the same way), bodies in postcard (record
//! batches travel as bytes, not as JSON arrays). A group's AppendEntries go on one gRPC
//! stream per follower (`weir.v1.Raft/PartitionAppends`, openraft's `stream_append`), so
//! that a leader keeps sending while earlier requests are being flushed; a follower that
//! does not serve the stream (an older broker during a rolling upgrade) is sent one
//! request at a time on `weir.v1.Raft/Partition`.
//!
//! On a stream, an AppendEntries without entries (openraft sends one to carry a newer commit
//! index whenever the commit moves and no entry is waiting: about one per entry under a
//! steady load, half of the messages) is held back for up to [`COMMIT_HOLD`] and folded
//! into the next request of the stream, which has the same leader and `prev_log_id` and a
//! commit index at least as new; its answer is derived from that request's (see
//! [`coalesce`]). Only while the follower's answers say that no reader waits on its
//! replica (`commits_may_wait`): a reader there (a long-polling fetch, a group coordinator
//! reading the partition from its own replica) sees a record once its follower learns it
//! is committed, and then gets commits at once.

use std::{
    collections::VecDeque,
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt};

use openraft::{
    BasicNode, OptionalSend,
    alias::{LogIdOf, SnapshotOf, VoteOf},
    base::{BoxFuture, BoxStream},
    errors::{
        Fatal, NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
    },
    network::{RPCOption, RaftNetworkFactory, stream_append_sequential, v2::RaftNetworkV2},
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
        TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use weir_proto::v1::{PartitionRaftMessage, raft_client::RaftClient};

use super::{Channels, ReplicaTypes};
use crate::log::keys::GroupKey;

type C = ReplicaTypes;

/// Which call a [`PartitionRaftMessage`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// AppendEntries (heartbeats included).
    Append = 1,
    /// Vote.
    Vote = 2,
    /// PreVote.
    PreVote = 3,
    /// A full snapshot.
    Snapshot = 4,
    /// The leader hands its leadership to the receiver.
    TransferLeader = 5,
}

impl Kind {
    /// The kind numbered `n`.
    pub fn from_number(n: u32) -> Option<Self> {
        match n {
            1 => Some(Kind::Append),
            2 => Some(Kind::Vote),
            3 => Some(Kind::PreVote),
            4 => Some(Kind::Snapshot),
            5 => Some(Kind::TransferLeader),
            _ => None,
        }
    }
}

/// Encodes a message body.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(value)
}

/// Decodes a message body.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// The AppendEntries request a [`PartitionRaftMessage`] of a `PartitionAppends` stream
/// carries for `group`.
///
/// # Errors
///
/// The message names another group or call, or its body does not decode.
pub fn decode_append(
    group: GroupKey,
    message: &PartitionRaftMessage,
) -> Result<AppendEntriesRequest<C>, String> {
    if message.group.as_ref() != group.as_slice() {
        return Err("a message names another group than the stream's first".into());
    }
    if Kind::from_number(message.kind) != Some(Kind::Append) {
        return Err(format!(
            "a stream of appends carries kind 1 (AppendEntries), not {}",
            message.kind
        ));
    }
    decode(&message.body).map_err(|e| format!("undecodable AppendEntries: {e}"))
}

/// The error a failed call to a peer stands for: UNAVAILABLE and NOT_FOUND (no replica
/// there yet) as unreachable, others as network errors.
fn rpc_error(status: &tonic::Status) -> RPCError<C> {
    if matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::NotFound
    ) {
        RPCError::Unreachable(Unreachable::new(status))
    } else {
        RPCError::Network(NetworkError::new(status))
    }
}

/// Opens a [`Peer`] per target broker for one group.
#[derive(Clone)]
pub struct Network {
    pub(super) group: GroupKey,
    pub(super) channels: Channels,
    /// How long a follower may take to answer the oldest AppendEntries outstanding on its
    /// stream before the stream is given up: the election timeout (see
    /// [`Peer::stream_append`]).
    pub(super) answer_deadline: std::time::Duration,
    /// The broker's replica counters (messages sent, commits folded).
    pub(super) stats: Arc<super::ReplicaStats>,
}

impl RaftNetworkFactory<C> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        Peer {
            target,
            group: self.group,
            address: node.addr.clone(),
            channels: self.channels.clone(),
            unary_appends: false,
            answer_deadline: self.answer_deadline,
            stats: Arc::clone(&self.stats),
        }
    }
}

/// One group's connection to one peer (over the shared channel to that peer).
pub struct Peer {
    target: u64,
    group: GroupKey,
    address: String,
    channels: Channels,
    /// The peer does not serve `PartitionAppends` (it answered UNIMPLEMENTED): appends go
    /// one at a time as unary calls.
    unary_appends: bool,
    /// [`Network::answer_deadline`].
    answer_deadline: std::time::Duration,
    /// [`Network::stats`].
    stats: Arc<super::ReplicaStats>,
}

impl Peer {
    /// The pooled channel to this peer (unreachable when its address is malformed).
    fn channel(&self) -> Result<tonic::transport::Channel, RPCError<C>> {
        self.channels
            .get(&self.address)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e))))
    }

    async fn call<Req, Resp>(
        &mut self,
        kind: Kind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<C>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let channel = self.channel()?;
        let body = encode(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(PartitionRaftMessage {
            group: self.group.to_vec().into(),
            kind: kind as u32,
            body: body.into(),
            commits_may_wait: false,
        });
        request.set_timeout(option.hard_ttl());
        let answer = RaftClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
            .partition(request)
            .await
            .map_err(|status| rpc_error(&status))?;
        let result: Result<Resp, RaftError<C>> = decode(&answer.into_inner().body)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            tracing::debug!(target_broker = self.target, error = %e, "replica raft call refused");
            RPCError::Unreachable(Unreachable::new(&e))
        })
    }
}

impl RaftNetworkV2<C> for Peer {
    type SnapshotData = Vec<u8>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        self.call(Kind::Append, &rpc, &option).await
    }

    /// The group's AppendEntries on one `PartitionAppends` stream: requests are sent as
    /// openraft produces them, answers read in order. While requests are outstanding an
    /// answer must arrive within [`Network::answer_deadline`] (the election timeout), not
    /// `option`'s TTL (the heartbeat interval, 100 ms): a follower whose fsync or threads
    /// stall for a moment on a loaded machine is alive, and a stream given up costs
    /// openraft's replication backoff (200 ms, then longer) before the next, which turned
    /// a 100 ms stall of every broker into half a second without commits. A follower gone
    /// silent is found within the same time as by its missed heartbeats; a closed
    /// connection ends the stream at once. An idle stream has no deadline. A peer that
    /// answers UNIMPLEMENTED is sent one request at a time from then on.
    fn stream_append<S>(
        &mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'_, Result<BoxStream<'_, Result<StreamAppendResult<C>, RPCError<C>>>, RPCError<C>>>
    where
        S: Stream<Item = AppendEntriesRequest<C>> + OptionalSend + Unpin + 'static,
    {
        if self.unary_appends {
            return stream_append_sequential(self, input, option);
        }
        Box::pin(async move {
            let channel = self.channel()?;
            let outstanding = Arc::new(Outstanding::default());
            let requests = append_messages(
                self.group,
                input,
                Arc::clone(&outstanding),
                Arc::clone(&self.stats),
            );
            let answer = RaftClient::new(channel)
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX)
                .partition_appends(tonic::Request::new(requests))
                .await;
            let inbound = match answer {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    if status.code() == tonic::Code::Unimplemented {
                        tracing::info!(
                            target_broker = self.target,
                            "peer does not serve streams of appends; sending them one at a time"
                        );
                        self.unary_appends = true;
                    }
                    return Err(rpc_error(&status));
                }
            };
            Ok(append_answers(
                inbound,
                outstanding,
                self.answer_deadline.max(option.hard_ttl()),
            ))
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        self.call(Kind::Vote, &rpc, &option).await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        self.call(Kind::PreVote, &rpc, &option).await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        self.call(Kind::TransferLeader, &req, &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, Vec<u8>>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let req = (vote, snapshot.meta, snapshot.snapshot);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            answer = self.call(Kind::Snapshot, &req, &option) => Ok(answer?),
        }
    }
}

/// How long an AppendEntries without entries is held back on a stream of appends for the
/// next request to fold it into (ms scale: under a steady load the next entry of the
/// partition follows within a few ms). A follower learns a commit index up to this much
/// later when no entry follows; Raft asks nothing of when a follower learns it (the leader
/// alone answers writes), and Kafka's followers learn the high watermark only with their
/// next fetch.
pub const COMMIT_HOLD: Duration = Duration::from_millis(20);

/// A follower's replica asks for commits at once while a reader began waiting on it within
/// this long (ms).
pub const READER_WINDOW_MS: i64 = 1000;

/// A message sent on a `PartitionAppends` stream and not answered yet: it stands for
/// `absorbed` entry-less requests before its own, each with the same vote and
/// `prev_log_id` (`prev`).
#[derive(Debug)]
struct Sent {
    absorbed: u32,
    prev: Option<LogIdOf<C>>,
}

/// Messages sent on a `PartitionAppends` stream and not answered yet, in order, and a
/// wake-up for the reader of the answers when one is sent.
#[derive(Default)]
struct Outstanding {
    sent: Mutex<VecDeque<Sent>>,
    notify: tokio::sync::Notify,
    /// The follower's last answer said no reader waits on its replica (commit-only
    /// requests may be folded); false until it says so.
    commits_may_wait: AtomicBool,
}

impl Outstanding {
    fn push(&self, sent: Sent) {
        self.sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_back(sent);
        self.notify.notify_one();
    }

    fn pop(&self) -> Option<Sent> {
        self.sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front()
    }

    fn is_empty(&self) -> bool {
        self.sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }
}

/// An entry-less request held back by [`coalesce`], with the earlier ones it absorbed.
struct Held {
    request: AppendEntriesRequest<C>,
    absorbed: u32,
    until: tokio::time::Instant,
}

/// openraft's requests as they go on the wire: each with the number of entry-less requests
/// before it that it stands for.
///
/// While `may_hold` says so, a request without entries is held for up to `hold_for`; a
/// next request with the same vote and `prev_log_id` (openraft's next request on a stream
/// starts where the last one ended, and one without entries ends where it starts) absorbs
/// it, so that one message goes where two went. The follower would have answered the
/// absorbed request with its `prev_log_id` as matching when it answers the absorbing one
/// with success (the log matching property: it holds `prev_log_id`), and with the same
/// conflict or higher vote otherwise (both are checked against the same `prev_log_id` and
/// vote), so its answer is derived from the absorbing one's ([`append_answers`]). The
/// leader's lease stays safe: openraft dates an answer by when it made the request, and
/// the follower answered after that. A held request goes on its own when `hold_for`
/// passes, when the next request does not continue it, or when openraft ends the stream
/// (a probe is a stream of one request: never held).
fn coalesce<S, F>(
    input: S,
    hold_for: Duration,
    may_hold: F,
) -> impl Stream<Item = (AppendEntriesRequest<C>, u32)> + Send + 'static
where
    S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 'static,
    F: Fn() -> bool + Send + Sync + 'static,
{
    struct State<S> {
        input: S,
        held: Option<Held>,
        /// A request read while one was held that did not continue it: sent next.
        queued: Option<AppendEntriesRequest<C>>,
        ended: bool,
    }
    let state = State {
        input,
        held: None,
        queued: None,
        ended: false,
    };
    let may_hold = Arc::new(may_hold);
    futures::stream::unfold(state, move |mut st| {
        let may_hold = Arc::clone(&may_hold);
        async move {
            loop {
                let Some(held) = st.held.take() else {
                    let request = match st.queued.take() {
                        Some(r) => r,
                        None if st.ended => return None,
                        None => st.input.next().await?,
                    };
                    if request.entries.is_empty() && may_hold() {
                        st.held = Some(Held {
                            request,
                            absorbed: 0,
                            until: tokio::time::Instant::now() + hold_for,
                        });
                        continue;
                    }
                    return Some(((request, 0), st));
                };
                tokio::select! {
                    next = st.input.next() => match next {
                        None => {
                            st.ended = true;
                            return Some(((held.request, held.absorbed), st));
                        }
                        Some(request)
                            if request.vote == held.request.vote
                                && request.prev_log_id == held.request.prev_log_id =>
                        {
                            let absorbed = held.absorbed + 1;
                            if request.entries.is_empty() {
                                st.held = Some(Held { request, absorbed, until: held.until });
                                continue;
                            }
                            return Some(((request, absorbed), st));
                        }
                        Some(request) => {
                            st.queued = Some(request);
                            return Some(((held.request, held.absorbed), st));
                        }
                    },
                    () = tokio::time::sleep_until(held.until) => {
                        return Some(((held.request, held.absorbed), st));
                    }
                }
            }
        }
    })
}

/// openraft's requests as `PartitionAppends` messages for `group` ([`coalesce`]d), noted in
/// `outstanding`. A request that cannot be encoded ends the stream (logged): the follower
/// answers what came before, and openraft sends the rest on a new stream.
fn append_messages<S>(
    group: GroupKey,
    input: S,
    outstanding: Arc<Outstanding>,
    stats: Arc<super::ReplicaStats>,
) -> impl Stream<Item = PartitionRaftMessage> + Send + 'static
where
    S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 'static,
{
    let group = bytes::Bytes::copy_from_slice(&group);
    let fold = Arc::clone(&outstanding);
    coalesce(input, COMMIT_HOLD, move || {
        fold.commits_may_wait.load(Ordering::Relaxed)
    })
    .map(move |(req, absorbed)| match encode(&req) {
            Ok(body) => {
                stats.append_messages.fetch_add(1, Ordering::Relaxed);
                stats
                    .commits_folded
                    .fetch_add(u64::from(absorbed), Ordering::Relaxed);
                outstanding.push(Sent {
                    absorbed,
                    prev: req.prev_log_id,
                });
                Some(PartitionRaftMessage {
                    group: group.clone(),
                    kind: Kind::Append as u32,
                    body: body.into(),
                    commits_may_wait: false,
                })
            }
            Err(e) => {
                tracing::error!(error = %e, "encoding an AppendEntries request failed; the stream of appends ends");
                None
            }
        })
        .take_while(|m| std::future::ready(m.is_some()))
        .filter_map(std::future::ready)
}

/// The answers of a `PartitionAppends` stream: each request's result in request order (a
/// message that absorbed entry-less requests answers for them first, see [`coalesce`]); an
/// error (and the end) when the stream fails, the follower's Raft node stopped, or no
/// answer came within `ttl` while messages were outstanding.
fn append_answers(
    inbound: tonic::Streaming<PartitionRaftMessage>,
    outstanding: Arc<Outstanding>,
    ttl: Duration,
) -> BoxStream<'static, Result<StreamAppendResult<C>, RPCError<C>>> {
    type Answer = Result<StreamAppendResult<C>, RPCError<C>>;
    let state = (Some(inbound), VecDeque::<Answer>::new());
    let answers = futures::stream::unfold(state, move |(inbound, mut ready)| {
        let outstanding = Arc::clone(&outstanding);
        async move {
            if let Some(answer) = ready.pop_front() {
                return Some((answer, (inbound, ready)));
            }
            let mut inbound = inbound?;
            let next = loop {
                if outstanding.is_empty() {
                    tokio::select! {
                        m = inbound.message() => break m,
                        () = outstanding.notify.notified() => {}
                    }
                } else {
                    if let Ok(m) = tokio::time::timeout(ttl, inbound.message()).await {
                        break m;
                    }
                    let e = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer to an AppendEntries within {ttl:?}"),
                    );
                    return Some((
                        Err(RPCError::Unreachable(Unreachable::new(&e))),
                        (None, ready),
                    ));
                }
            };
            let answer = match next {
                Ok(Some(m)) => {
                    let sent = outstanding.pop();
                    outstanding
                        .commits_may_wait
                        .store(m.commits_may_wait, Ordering::Relaxed);
                    match decode::<Result<StreamAppendResult<C>, Fatal<C>>>(&m.body) {
                        Ok(Ok(Ok(matching))) => {
                            // The absorbed requests ended at `prev_log_id`, which the
                            // follower holds: it accepted a request starting there.
                            match sent.filter(|s| s.absorbed > 0) {
                                Some(sent) => {
                                    ready.extend((1..sent.absorbed).map(|_| Ok(Ok(sent.prev))));
                                    ready.push_back(Ok(Ok(matching)));
                                    Ok(Ok(sent.prev))
                                }
                                None => Ok(Ok(matching)),
                            }
                        }
                        // A conflict or a higher vote is the first absorbed request's answer
                        // too; openraft ends the stream with it.
                        Ok(Ok(Err(refused))) => Ok(Err(refused)),
                        Ok(Err(fatal)) => Err(RPCError::Unreachable(Unreachable::new(&fatal))),
                        Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
                    }
                }
                Ok(None) => return None,
                Err(status) => Err(rpc_error(&status)),
            };
            let next_state = answer.is_ok().then_some(inbound);
            Some((answer, (next_state, ready)))
        }
    });
    Box::pin(answers)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use openraft::{alias::LogIdOf, vote::RaftLeaderId, vote::RaftVote};
    use tonic::{Request, Response, Status};
    use weir_proto::v1::{self as pb, raft_server};

    use super::*;

    /// A leader replicating to a broker that does not serve `PartitionAppends` (a rolling
    /// upgrade) sends its appends one at a time on `Partition` once the stream was refused:
    /// the first stream fails (openraft opens another), the second is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_go_one_at_a_time_to_a_peer_without_the_stream() {
        let (address, mut network) = serve(Follower {
            messages: Arc::default(),
            last: 5,
            reader: false,
            streams: false,
        })
        .await;
        let mut peer = network.new_client(1, &BasicNode::new(address)).await;
        let request = || AppendEntriesRequest::<C> {
            vote: VoteOf::<C>::from_leader_id(
                openraft::impls::leader_id_std::LeaderId::new(1, 0),
                true,
            ),
            prev_log_id: Some(LogIdOf::<C>::new_term_index(1, 5)),
            leader_commit: None,
            entries: Vec::new(),
        };
        let option = RPCOption::new(Duration::from_secs(5));
        let refused = match peer
            .stream_append(futures::stream::iter([request()]), option.clone())
            .await
        {
            Ok(_) => None,
            Err(e) => Some(e.to_string()),
        };
        let refused = refused.expect("the stream should be refused by an older broker");
        assert!(refused.contains("not implemented"), "{refused}");
        let answers: Vec<_> = peer
            .stream_append(futures::stream::iter([request()]), option)
            .await
            .expect("sent one at a time")
            .collect()
            .await;
        assert_eq!(answers.len(), 1, "{answers:?}");
        let answer = answers.into_iter().next().expect("one").expect("answered");
        assert_eq!(answer, Ok(Some(LogIdOf::<C>::new_term_index(1, 5))));
    }

    /// A request of `entries` entries after `prev` (term 1), carrying commit index `commit`.
    fn append(prev: u64, entries: u64, commit: u64) -> AppendEntriesRequest<C> {
        use openraft::entry::RaftEntry;
        AppendEntriesRequest::<C> {
            vote: VoteOf::<C>::from_leader_id(
                openraft::impls::leader_id_std::LeaderId::new(1, 0),
                true,
            ),
            prev_log_id: Some(LogIdOf::<C>::new_term_index(1, prev)),
            leader_commit: Some(LogIdOf::<C>::new_term_index(1, commit)),
            entries: (prev + 1..=prev + entries)
                .map(|i| {
                    <C as openraft::RaftTypeConfig>::Entry::new_blank(LogIdOf::<C>::new_term_index(
                        1, i,
                    ))
                })
                .collect(),
        }
    }

    /// (prev_log_id index, entries, commit index, absorbed) of a coalesced request.
    fn shape(item: &(AppendEntriesRequest<C>, u32)) -> (u64, usize, u64, u32) {
        let (r, absorbed) = item;
        (
            r.prev_log_id.map_or(0, |l| l.index),
            r.entries.len(),
            r.leader_commit.map_or(0, |l| l.index),
            *absorbed,
        )
    }

    /// Commit-only requests are folded into the next request that continues them; one that
    /// nothing follows goes alone once the hold passes, one that the next request does not
    /// continue goes at once, one goes at once while the follower has a reader waiting, and
    /// the last one goes when openraft ends the stream.
    #[tokio::test]
    async fn requests_without_entries_are_folded_into_the_next() {
        let hold = Duration::from_millis(50);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let may_hold = Arc::new(AtomicBool::new(true));
        let mut wire = Box::pin(coalesce(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            hold,
            {
                let may_hold = Arc::clone(&may_hold);
                move || may_hold.load(Ordering::Relaxed)
            },
        ));
        let send = |r| tx.send(r).expect("coalesce reads");
        send(append(4, 1, 4));
        send(append(5, 0, 5));
        send(append(5, 0, 5));
        send(append(5, 2, 5));
        assert_eq!(shape(&wire.next().await.expect("sent")), (4, 1, 4, 0));
        assert_eq!(shape(&wire.next().await.expect("sent")), (5, 2, 5, 2));
        // Nothing follows: sent alone after the hold.
        send(append(7, 0, 7));
        let started = tokio::time::Instant::now();
        assert_eq!(shape(&wire.next().await.expect("sent")), (7, 0, 7, 0));
        let waited = started.elapsed();
        assert!(
            waited >= hold && waited < hold * 10,
            "sent after {waited:?}"
        );
        // Followed by a request of another prev_log_id (not openraft's order): both go.
        send(append(7, 0, 7));
        send(append(9, 1, 7));
        assert_eq!(shape(&wire.next().await.expect("sent")), (7, 0, 7, 0));
        assert_eq!(shape(&wire.next().await.expect("sent")), (9, 1, 7, 0));
        // While a reader waits on the follower's replica: nothing is held.
        may_hold.store(false, Ordering::Relaxed);
        send(append(10, 0, 10));
        send(append(10, 1, 10));
        assert_eq!(shape(&wire.next().await.expect("sent")), (10, 0, 10, 0));
        assert_eq!(shape(&wire.next().await.expect("sent")), (10, 1, 10, 0));
        may_hold.store(true, Ordering::Relaxed);
        send(append(11, 0, 11));
        drop(tx);
        assert_eq!(shape(&wire.next().await.expect("sent")), (11, 0, 11, 0));
        assert!(wire.next().await.is_none());
    }

    /// A follower that answers each AppendEntries as openraft does (success with the last
    /// log id, or a conflict on a `prev_log_id` beyond `last`) and counts the messages of
    /// its `PartitionAppends` streams.
    struct Follower {
        messages: Arc<std::sync::atomic::AtomicU64>,
        last: u64,
        /// A reader waits on the follower's replica: answers ask for commits at once.
        reader: bool,
        /// Serves `PartitionAppends`; without it, a broker of an older version that
        /// answers AppendEntries on `Partition` alone.
        streams: bool,
    }

    /// Serves `follower` on a free port of 127.0.0.1: its address, and a group's network
    /// to reach it.
    async fn serve(follower: Follower) -> (String, Network) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let address = listener.local_addr().expect("address").to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(raft_server::RaftServer::new(follower))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let network = Network {
            group: [7; 12],
            channels: Channels::default(),
            answer_deadline: Duration::from_millis(500),
            stats: Arc::default(),
        };
        (address, network)
    }

    impl Follower {
        /// The answer to `req`, moving `last` on success.
        fn answer(last: &mut u64, req: &AppendEntriesRequest<C>) -> StreamAppendResult<C> {
            let prev = req.prev_log_id.map_or(0, |l| l.index);
            if prev > *last {
                return Err(openraft::raft::StreamAppendError::Conflict(
                    LogIdOf::<C>::new_term_index(1, prev),
                ));
            }
            let end = req.entries.last().map(|e| e.log_id).or(req.prev_log_id);
            *last = end.map_or(0, |l| l.index);
            Ok(end)
        }
    }

    #[tonic::async_trait]
    impl raft_server::Raft for Follower {
        type PartitionAppendsStream =
            futures::stream::BoxStream<'static, Result<PartitionRaftMessage, Status>>;

        async fn append_entries(
            &self,
            _: Request<pb::RaftMessage>,
        ) -> Result<Response<pb::RaftMessage>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn vote(
            &self,
            _: Request<pb::RaftMessage>,
        ) -> Result<Response<pb::RaftMessage>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn snapshot(
            &self,
            _: Request<pb::RaftMessage>,
        ) -> Result<Response<pb::RaftMessage>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn forward(
            &self,
            _: Request<pb::RaftMessage>,
        ) -> Result<Response<pb::RaftMessage>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn peer(
            &self,
            _: Request<pb::RaftMessage>,
        ) -> Result<Response<pb::RaftMessage>, Status> {
            Err(Status::unimplemented("test"))
        }
        async fn partition(
            &self,
            request: Request<PartitionRaftMessage>,
        ) -> Result<Response<PartitionRaftMessage>, Status> {
            let message = request.into_inner();
            let req: AppendEntriesRequest<C> =
                decode(&message.body).map_err(|e| Status::invalid_argument(e.to_string()))?;
            let answer: Result<AppendEntriesResponse<C>, RaftError<C>> =
                match Self::answer(&mut self.last.clone(), &req) {
                    Ok(_) => Ok(AppendEntriesResponse::Success),
                    Err(_) => Ok(AppendEntriesResponse::Conflict),
                };
            Ok(Response::new(PartitionRaftMessage {
                body: encode(&answer).expect("encodes").into(),
                ..message
            }))
        }
        async fn partition_appends(
            &self,
            request: Request<tonic::Streaming<PartitionRaftMessage>>,
        ) -> Result<Response<Self::PartitionAppendsStream>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("weir.v1.Raft/PartitionAppends"));
            }
            let messages = Arc::clone(&self.messages);
            let mut last = self.last;
            let commits_may_wait = !self.reader;
            let answers = request.into_inner().map(move |m| {
                let m = m?;
                messages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let req: AppendEntriesRequest<C> =
                    decode(&m.body).map_err(|e| Status::invalid_argument(e.to_string()))?;
                let answer: Result<StreamAppendResult<C>, Fatal<C>> =
                    Ok(Self::answer(&mut last, &req));
                Ok(PartitionRaftMessage {
                    body: encode(&answer).expect("encodes").into(),
                    commits_may_wait,
                    ..m
                })
            });
            Ok(Response::new(Box::pin(answers)))
        }
    }

    /// Over a real stream, every request gets its answer in order, those of absorbed
    /// requests their `prev_log_id` as matching; with fewer messages on the wire than
    /// requests once the follower said no reader waits (its first answer), every request on
    /// the wire while one does; a conflict ends the answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn absorbed_requests_are_answered_in_order() {
        for (reader, on_the_wire) in [(false, 4), (true, 7)] {
            let messages = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let (address, mut network) = serve(Follower {
                messages: Arc::clone(&messages),
                last: 4,
                reader,
                streams: true,
            })
            .await;
            let mut peer = network.new_client(1, &BasicNode::new(address)).await;
            // The first request goes alone and is answered before the rest are sent (the
            // answer says whether commits may wait).
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let mut answers = peer
                .stream_append(
                    tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
                    RPCOption::new(Duration::from_secs(5)),
                )
                .await
                .expect("stream opens");
            let at = |i| Some(LogIdOf::<C>::new_term_index(1, i));
            tx.send(append(4, 1, 4)).expect("sent");
            assert_eq!(
                answers.next().await.expect("answered").expect("ok"),
                Ok(at(5))
            );
            for r in [
                append(5, 0, 5),
                append(5, 0, 5),
                append(5, 2, 5),
                append(7, 0, 7),
                append(7, 1, 7),
                append(20, 1, 7),
            ] {
                tx.send(r).expect("sent");
            }
            drop(tx);
            let rest: Vec<_> = answers.map(|a| a.expect("answered")).collect().await;
            assert_eq!(
                rest,
                vec![
                    Ok(at(5)),
                    Ok(at(5)),
                    Ok(at(7)),
                    Ok(at(7)),
                    Ok(at(8)),
                    Err(openraft::raft::StreamAppendError::Conflict(
                        LogIdOf::<C>::new_term_index(1, 20)
                    )),
                ],
                "reader {reader}"
            );
            assert_eq!(
                messages.load(std::sync::atomic::Ordering::Relaxed),
                on_the_wire,
                "reader {reader}"
            );
            assert_eq!(
                network.stats.append_messages.load(Ordering::Relaxed),
                on_the_wire
            );
            assert_eq!(
                network.stats.commits_folded.load(Ordering::Relaxed),
                7 - on_the_wire,
                "reader {reader}"
            );
        }
    }
}
