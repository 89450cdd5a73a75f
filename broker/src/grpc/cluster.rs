//! `weir.v1.Cluster` (the cluster's metadata for clients) and `weir.v1.Raft` (the metadata
//! group's messages between brokers).

use std::sync::Arc;

use openraft::errors::RaftError;
use tonic::{Request, Response, Status};
use weir_proto::v1::{
    self as pb, cluster_server::Cluster as ClusterRpc, raft_server::Raft as RaftRpc,
};

use crate::cluster::{AdminOp, Cluster, Forwarded, RemoteError, TypeConfig, state::BrokerState};

/// Serves `weir.v1.Cluster`.
#[derive(Debug, Clone)]
pub struct ClusterService {
    cluster: Arc<Cluster>,
}

impl ClusterService {
    /// A service over `cluster`.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }
}

#[tonic::async_trait]
impl ClusterRpc for ClusterService {
    async fn metadata(
        &self,
        _request: Request<pb::MetadataRequest>,
    ) -> Result<Response<pb::MetadataResponse>, Status> {
        let state = self.cluster.state();
        let brokers = state
            .brokers
            .values()
            .map(|b| pb::BrokerMetadata {
                id: b.id,
                address: b.address.clone(),
                state: match b.state {
                    BrokerState::Alive => "Alive".into(),
                },
            })
            .collect();
        let cluster = &self.cluster;
        let partitions = state
            .topics
            .iter()
            .flat_map(|(name, t)| {
                t.replicas.iter().enumerate().map(move |(i, replicas)| {
                    let leader = cluster
                        .partition_leader(t, name, i as u32)
                        .unwrap_or_default();
                    pb::PartitionMetadata {
                        topic: name.clone(),
                        partition: i as u32,
                        leader,
                        replicas: replicas.clone(),
                        in_sync: t.in_sync(i as u32),
                    }
                })
            })
            .collect();
        let groups = state
            .groups
            .iter()
            .map(|(name, g)| pb::GroupMetadata {
                group: name.clone(),
                topic: g.config.topic.clone(),
                coordinator: state.coordinator(name, None).unwrap_or(g.coordinator),
            })
            .collect();
        Ok(Response::new(pb::MetadataResponse {
            metadata_leader: self.cluster.metadata_leader(),
            brokers,
            partitions,
            answered_by: self.cluster.me(),
            groups,
        }))
    }

    async fn remove_broker(
        &self,
        request: Request<pb::RemoveBrokerRequest>,
    ) -> Result<Response<pb::RemoveBrokerResponse>, Status> {
        let id = request.into_inner().id;
        self.cluster.remove_broker(id).await?;
        tracing::info!(broker = id, "broker removed from the cluster");
        Ok(Response::new(pb::RemoveBrokerResponse {}))
    }
}

/// Serves `weir.v1.Raft`: hands openraft's messages to this broker's metadata node.
#[derive(Debug, Clone)]
pub struct RaftService {
    cluster: Arc<Cluster>,
}

impl RaftService {
    /// A service over `cluster`'s node.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }
}

fn decode<T: for<'de> serde::Deserialize<'de>>(m: &pb::RaftMessage) -> Result<T, Status> {
    serde_json::from_slice(&m.json)
        .map_err(|e| Status::invalid_argument(format!("undecodable raft message: {e}")))
}

/// A call's result as the calling broker receives it: the answer, or the status code and
/// message this broker would have answered a client with.
fn remote_answer<T>(result: Result<T, crate::cluster::Error>) -> Result<T, RemoteError> {
    result.map_err(|e| {
        let status = Status::from(e);
        RemoteError {
            code: status.code() as i32,
            message: status.message().to_owned(),
        }
    })
}

fn encode<T: serde::Serialize>(answer: &T) -> Result<Response<pb::RaftMessage>, Status> {
    serde_json::to_vec(answer)
        .map(|json| Response::new(pb::RaftMessage { json: json.into() }))
        .map_err(|e| Status::internal(format!("encoding a raft answer: {e}")))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn append_entries(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let req = decode(request.get_ref())?;
        encode(&self.cluster.raft().append_entries(req).await)
    }

    async fn vote(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        if self.cluster.is_repairing() {
            // As if down: a candidate gets no vote from a broker that forgot entries.
            return Err(Status::unavailable(
                "this broker's metadata log is being repaired from the leader after damage to its storage; it does not vote until it has every entry it lost",
            ));
        }
        let req = decode(request.get_ref())?;
        encode(&self.cluster.raft().vote(req).await)
    }

    async fn forward(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let op: AdminOp = decode(request.get_ref())?;
        // A broker that asks to join knows only its --peers, which need not lead: relayed.
        let result = match op {
            AdminOp::AddBroker { .. } => self.cluster.relay(op).await,
            _ => self.cluster.admin_here(&op).await,
        };
        encode(&remote_answer::<Forwarded>(result))
    }

    async fn peer(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        // A call about a topic the caller knows: answered once this broker has applied the
        // metadata as far as the caller had (a topic created a moment ago).
        super::forward::catch_up(&self.cluster, request.metadata()).await?;
        let call: crate::cluster::remote::PeerCall = decode(request.get_ref())?;
        encode(&remote_answer::<crate::cluster::remote::PeerAnswer>(
            self.cluster.peer_here(call).await,
        ))
    }

    type PartitionAppendsStream = crate::replica::AppendAnswers;

    async fn partition_appends(
        &self,
        request: Request<tonic::Streaming<pb::PartitionRaftMessage>>,
    ) -> Result<Response<Self::PartitionAppendsStream>, Status> {
        self.cluster
            .replicas()
            .serve_appends(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn partition(
        &self,
        request: Request<pb::PartitionRaftMessage>,
    ) -> Result<Response<pb::PartitionRaftMessage>, Status> {
        self.cluster
            .replicas()
            .serve(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn snapshot(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let (vote, meta, data): (
            openraft::alias::VoteOf<TypeConfig>,
            openraft::alias::SnapshotMetaOf<TypeConfig>,
            Vec<u8>,
        ) = decode(request.get_ref())?;
        let snapshot = openraft::alias::SnapshotOf::<TypeConfig, Vec<u8>> {
            meta,
            snapshot: data,
        };
        let answer: Result<_, RaftError<TypeConfig>> = self
            .cluster
            .raft()
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(RaftError::Fatal);
        encode(&answer)
    }
}
