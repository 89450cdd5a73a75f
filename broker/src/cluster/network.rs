//! The metadata group's messages between brokers: openraft's requests and answers as JSON
//! inside the `weir.v1.Raft` gRPC service (after openraft's `network-v2-http` example, on
//! the brokers' own gRPC port). One tonic channel per peer, opened lazily and reused.

use std::future::Future;

use openraft::{
    BasicNode, OptionalSend,
    alias::{SnapshotOf, VoteOf},
    errors::{NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable},
    network::{RPCOption, RaftNetworkFactory, v2::RaftNetworkV2},
    raft::{
        AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use weir_proto::v1::{RaftMessage, raft_client::RaftClient};

use super::{BrokerId, TypeConfig};

type C = TypeConfig;

/// Opens a [`Peer`] per target broker.
#[derive(Debug, Clone, Default)]
pub struct Network;

impl RaftNetworkFactory<C> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: BrokerId, node: &BasicNode) -> Self::Network {
        Peer {
            target,
            address: node.addr.clone(),
            client: None,
        }
    }
}

/// The connection to one peer.
pub struct Peer {
    target: BrokerId,
    address: String,
    client: Option<RaftClient<tonic::transport::Channel>>,
}

/// Which call of `weir.v1.Raft`.
#[derive(Clone, Copy)]
enum Call {
    Append,
    Vote,
    Snapshot,
}

impl Peer {
    async fn call<Req, Resp>(
        &mut self,
        call: Call,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<C>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        if self.client.is_none() {
            let endpoint =
                tonic::transport::Endpoint::from_shared(format!("http://{}", self.address))
                    .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?
                    .connect_timeout(std::time::Duration::from_secs(1));
            self.client = Some(RaftClient::new(endpoint.connect_lazy()));
        }
        let Some(client) = self.client.as_mut() else {
            return Err(RPCError::Network(NetworkError::from_string(
                "no connection",
            )));
        };
        let json = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let mut request = tonic::Request::new(RaftMessage { json: json.into() });
        request.set_timeout(option.hard_ttl());
        let answer = match call {
            Call::Append => client.append_entries(request).await,
            Call::Vote => client.vote(request).await,
            Call::Snapshot => client.snapshot(request).await,
        };
        let answer = answer.map_err(|status| {
            if status.code() == tonic::Code::Unavailable {
                RPCError::Unreachable(Unreachable::new(&status))
            } else {
                RPCError::Network(NetworkError::new(&status))
            }
        })?;
        let result: Result<Resp, RaftError<C>> = serde_json::from_slice(&answer.into_inner().json)
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            tracing::debug!(target_broker = self.target, error = %e, "raft call refused");
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
        self.call(Call::Append, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        self.call(Call::Vote, &rpc, &option).await
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
            answer = self.call(Call::Snapshot, &req, &option) => Ok(answer?),
        }
    }
}
