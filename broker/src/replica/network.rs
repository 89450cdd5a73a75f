//! Replica groups' Raft messages between brokers: `weir.v1.Raft/Partition` on the brokers'
//! gRPC port, one pooled HTTP/2 channel per peer shared by every group (openraft's
//! `multi-raft-kv` example routes by group the same way), bodies in postcard (record
//! batches travel as bytes, not as JSON arrays).

use std::future::Future;

use openraft::{
    BasicNode, OptionalSend,
    alias::{SnapshotOf, VoteOf},
    errors::{NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable},
    network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2},
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
        TransferLeaderResponse, VoteRequest, VoteResponse,
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

/// Opens a [`Peer`] per target broker for one group.
#[derive(Clone)]
pub struct Network {
    pub(super) group: GroupKey,
    pub(super) channels: Channels,
}

impl RaftNetworkFactory<C> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Self::Network {
        Peer {
            target,
            group: self.group,
            address: node.addr.clone(),
            channels: self.channels.clone(),
        }
    }
}

/// One group's connection to one peer (over the shared channel to that peer).
pub struct Peer {
    target: u64,
    group: GroupKey,
    address: String,
    channels: Channels,
}

impl Peer {
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
        let channel = self
            .channels
            .get(&self.address)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e))))?;
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
            .map_err(|status| {
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::NotFound
                ) {
                    RPCError::Unreachable(Unreachable::new(&status))
                } else {
                    RPCError::Network(NetworkError::new(&status))
                }
            })?;
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
