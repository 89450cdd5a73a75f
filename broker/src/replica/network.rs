//! Replica groups' Raft messages between brokers: `weir.v1.Raft/Partition` on the brokers'
//! gRPC port, one pooled HTTP/2 channel per peer shared by every group (openraft's
//! `multi-raft-kv` example routes by group the same way), bodies in postcard (record
//! batches travel as bytes, not as JSON arrays). A group's AppendEntries go on one gRPC
//! stream per follower (`weir.v1.Raft/PartitionAppends`, openraft's `stream_append`), so
//! that a leader keeps sending while earlier requests are being flushed; a follower that
//! does not serve the stream (an older broker during a rolling upgrade) is sent one
//! request at a time on `weir.v1.Raft/Partition`.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::{Stream, StreamExt};

use openraft::{
    BasicNode, OptionalSend,
    alias::{SnapshotOf, VoteOf},
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
            let requests = append_messages(self.group, input, Arc::clone(&outstanding));
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

/// Requests sent on a `PartitionAppends` stream and not answered yet, and a wake-up for
/// the reader of the answers when one is sent.
#[derive(Default)]
struct Outstanding {
    count: AtomicU64,
    sent: tokio::sync::Notify,
}

/// openraft's requests as `PartitionAppends` messages for `group`, counted in
/// `outstanding`. A request that cannot be encoded ends the stream (logged): the follower
/// answers what came before, and openraft sends the rest on a new stream.
fn append_messages<S>(
    group: GroupKey,
    input: S,
    outstanding: Arc<Outstanding>,
) -> impl Stream<Item = PartitionRaftMessage> + Send + 'static
where
    S: Stream<Item = AppendEntriesRequest<C>> + Send + Unpin + 'static,
{
    let group = bytes::Bytes::copy_from_slice(&group);
    input
        .map(move |req| match encode(&req) {
            Ok(body) => {
                outstanding.count.fetch_add(1, Ordering::AcqRel);
                outstanding.sent.notify_one();
                Some(PartitionRaftMessage {
                    group: group.clone(),
                    kind: Kind::Append as u32,
                    body: body.into(),
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

/// The answers of a `PartitionAppends` stream: each follower's result in request order; an
/// error (and the end) when the stream fails, the follower's Raft node stopped, or no
/// answer came within `ttl` while requests were outstanding.
fn append_answers(
    inbound: tonic::Streaming<PartitionRaftMessage>,
    outstanding: Arc<Outstanding>,
    ttl: std::time::Duration,
) -> BoxStream<'static, Result<StreamAppendResult<C>, RPCError<C>>> {
    let answers = futures::stream::unfold(Some(inbound), move |state| {
        let outstanding = Arc::clone(&outstanding);
        async move {
            let mut inbound = state?;
            let next = loop {
                if outstanding.count.load(Ordering::Acquire) == 0 {
                    tokio::select! {
                        m = inbound.message() => break m,
                        () = outstanding.sent.notified() => {}
                    }
                } else {
                    if let Ok(m) = tokio::time::timeout(ttl, inbound.message()).await {
                        break m;
                    }
                    let e = std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer to an AppendEntries within {ttl:?}"),
                    );
                    return Some((Err(RPCError::Unreachable(Unreachable::new(&e))), None));
                }
            };
            let item = match next {
                Ok(Some(m)) => {
                    outstanding.count.fetch_sub(1, Ordering::AcqRel);
                    match decode::<Result<StreamAppendResult<C>, Fatal<C>>>(&m.body) {
                        Ok(Ok(result)) => Ok(result),
                        Ok(Err(fatal)) => Err(RPCError::Unreachable(Unreachable::new(&fatal))),
                        Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
                    }
                }
                Ok(None) => return None,
                Err(status) => Err(rpc_error(&status)),
            };
            let next_state = item.is_ok().then_some(inbound);
            Some((item, next_state))
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

    /// A broker of an older version: it serves `Partition` (answering every AppendEntries
    /// with success) but not `PartitionAppends`.
    struct OlderBroker;

    #[tonic::async_trait]
    impl raft_server::Raft for OlderBroker {
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
            let answer: Result<AppendEntriesResponse<C>, RaftError<C>> =
                Ok(AppendEntriesResponse::Success);
            Ok(Response::new(PartitionRaftMessage {
                body: encode(&answer).expect("encodes").into(),
                ..message
            }))
        }
        async fn partition_appends(
            &self,
            _: Request<tonic::Streaming<PartitionRaftMessage>>,
        ) -> Result<Response<Self::PartitionAppendsStream>, Status> {
            Err(Status::unimplemented("weir.v1.Raft/PartitionAppends"))
        }
    }

    /// A leader replicating to a broker that does not serve `PartitionAppends` (a rolling
    /// upgrade) sends its appends one at a time on `Partition` once the stream was refused:
    /// the first stream fails (openraft opens another), the second is answered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_go_one_at_a_time_to_a_peer_without_the_stream() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let address = listener.local_addr().expect("address").to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(raft_server::RaftServer::new(OlderBroker))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let mut network = Network {
            group: [7; 12],
            channels: Channels::default(),
            answer_deadline: Duration::from_millis(500),
        };
        let mut peer = network
            .new_client(1, &BasicNode::new(address.clone()))
            .await;
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
}
