//! `weir.v1.Admin`: topic administration.

use tonic::{Request, Response, Status};
use weir_proto::v1::{self as pb, admin_client::AdminClient, admin_server::Admin};

use super::{
    Context,
    convert::{
        describe, describe_remote, group_config_from_pb, group_to_pb, start_from_pb,
        topic_config_from_pb,
    },
    forward::to_coordinator,
};
use crate::{
    log::TopicConfig,
    validate::{NameKind, validate_name},
};

/// How long a listing or description waits for another leader's figures of its partitions
/// before answering without them: below the client's request timeout (2 s and more), so a
/// paused or unreachable broker does not make every listing time out.
const FIGURES_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves `weir.v1.Admin` over the log.
#[derive(Debug, Clone)]
pub struct AdminService {
    ctx: Context,
}

impl AdminService {
    /// A service over `ctx`.
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }
}

impl AdminService {
    /// `name` as this broker knows it: with live figures when it leads a partition of it,
    /// else its settings from the cluster's metadata.
    fn describe_any(&self, name: &str) -> Result<pb::TopicDescription, Status> {
        if let Ok(topic) = self.ctx.log.topic(name) {
            return Ok(describe(&topic));
        }
        match self.ctx.cluster.state().topics.get(name) {
            Some(t) => Ok(describe_remote(name, &t.config)),
            None => Err(crate::log::Error::TopicNotFound(crate::validate::quote(name)).into()),
        }
    }
}

impl AdminService {
    /// Every other broker that leads a partition of a topic in `topics` (all topics when
    /// `None`), with its address.
    fn other_leaders(&self, topics: Option<&str>) -> Vec<(u64, String)> {
        let state = self.ctx.cluster.state();
        let me = self.ctx.cluster.me();
        let mut ids: Vec<u64> = state
            .topics
            .iter()
            .filter(|(n, _)| topics.is_none_or(|t| t == n.as_str()))
            .flat_map(|(_, t)| t.replicas.iter().filter_map(|r| r.first().copied()))
            .filter(|&l| l != me)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.into_iter()
            .filter_map(|id| state.brokers.get(&id).map(|b| (id, b.address.clone())))
            .collect()
    }

    /// Asks each other leader for its topics' figures (`ListTopics`, one call per broker, all
    /// at once, marked forwarded) and puts the partitions it leads into `descs`. A broker that
    /// does not answer within [`FIGURES_WAIT`] (paused, its packets dropped) leaves its
    /// partitions' figures at zero (logged): the listing is this broker's to give, and the
    /// figures are not worth the caller's deadline.
    async fn merge_remote_figures(
        &self,
        descs: &mut [pb::TopicDescription],
        incoming: &tonic::metadata::MetadataMap,
    ) {
        let only = (descs.len() == 1).then(|| descs[0].name.clone());
        let state = self.ctx.cluster.state();
        let asks =
            self.other_leaders(only.as_deref())
                .into_iter()
                .map(|(leader, address)| async move {
                    let call = async {
                        let channel = self
                            .ctx
                            .cluster
                            .channel_to(&address)
                            .map_err(|e| e.to_string())?;
                        AdminClient::new(channel)
                            .list_topics(super::forward::forwarded(
                                incoming,
                                pb::ListTopicsRequest {},
                            ))
                            .await
                            .map_err(|s| s.to_string())
                    };
                    let answer = match tokio::time::timeout(FIGURES_WAIT, call).await {
                        Ok(answer) => answer,
                        Err(_) => Err(format!("no answer within {FIGURES_WAIT:?}")),
                    };
                    (leader, answer)
                });
        for (leader, answer) in futures::future::join_all(asks).await {
            let remote = match answer {
                Ok(r) => r.into_inner().topics,
                Err(e) => {
                    tracing::warn!(broker = leader, error = %e, "figures of partitions led elsewhere are unavailable");
                    continue;
                }
            };
            for desc in descs.iter_mut() {
                let (Some(t), Some(r)) = (
                    state.topics.get(&desc.name),
                    remote.iter().find(|r| r.name == desc.name),
                ) else {
                    continue;
                };
                for p in &r.partitions {
                    if t.leader(p.partition) == Some(leader)
                        && let Some(slot) = desc.partitions.get_mut(p.partition as usize)
                    {
                        *slot = *p;
                    }
                }
                if desc.created_at_ms == 0 {
                    desc.created_at_ms = r.created_at_ms;
                }
            }
        }
        for desc in descs.iter_mut() {
            desc.messages = desc.partitions.iter().map(|p| p.messages).sum();
            desc.bytes = desc.partitions.iter().map(|p| p.bytes).sum();
        }
    }

    /// `name` with its settings from the cluster's metadata and one entry per partition
    /// (figures of this broker's partitions filled in).
    fn describe_all_partitions(&self, name: &str) -> Result<pb::TopicDescription, Status> {
        let mut desc = self.describe_any(name)?;
        if let Some(t) = self.ctx.cluster.state().topics.get(name) {
            let count = t.replicas.len() as u32;
            let mut parts: Vec<pb::PartitionStats> = (0..count)
                .map(|i| pb::PartitionStats {
                    partition: i,
                    ..Default::default()
                })
                .collect();
            let me = self.ctx.cluster.me();
            for p in &desc.partitions {
                if t.leader(p.partition) == Some(me)
                    && let Some(slot) = parts.get_mut(p.partition as usize)
                {
                    *slot = *p;
                }
            }
            desc.partitions = parts;
            desc.config = Some(super::convert::config_to_pb(&t.config));
        }
        Ok(desc)
    }
}

fn config(name: &str, c: Option<pb::TopicConfig>) -> Result<TopicConfig, Status> {
    topic_config_from_pb(name, c)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let req = request.into_inner();
        validate_name(NameKind::Topic, &req.name)?;
        let config = config(&req.name, req.config)?;
        let created = self.ctx.cluster.create_topic(&req.name, config).await?;
        Ok(Response::new(pb::CreateTopicResponse {
            topic: Some(self.describe_any(&req.name)?),
            created,
        }))
    }

    async fn update_topic(
        &self,
        request: Request<pb::UpdateTopicRequest>,
    ) -> Result<Response<pb::UpdateTopicResponse>, Status> {
        let req = request.into_inner();
        let config = config(&req.name, req.config)?;
        self.ctx.cluster.update_topic(&req.name, config).await?;
        Ok(Response::new(pb::UpdateTopicResponse {
            topic: Some(self.describe_any(&req.name)?),
        }))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let req = request.into_inner();
        self.ctx.cluster.delete_topic(&req.name).await?;
        self.ctx.groups.delete_for_topic(&req.name).await?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn repair_topic(
        &self,
        request: Request<pb::RepairTopicRequest>,
    ) -> Result<Response<pb::RepairTopicResponse>, Status> {
        let req = request.into_inner();
        let lost = self.ctx.log.repair(&req.name, &req.partitions).await?;
        Ok(Response::new(pb::RepairTopicResponse {
            lost: lost
                .into_iter()
                .map(|r| pb::LostRange {
                    partition: r.partition,
                    from_offset: r.from,
                    to_offset: r.to,
                    reason: r.reason.to_owned(),
                })
                .collect(),
        }))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        if super::forward::is_forwarded(&metadata) {
            return Ok(Response::new(pb::DescribeTopicResponse {
                topic: Some(self.describe_any(&req.name)?),
            }));
        }
        let mut descs = [self.describe_all_partitions(&req.name)?];
        self.merge_remote_figures(&mut descs, &metadata).await;
        let [desc] = descs;
        Ok(Response::new(pb::DescribeTopicResponse {
            topic: Some(desc),
        }))
    }

    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        let state = self.ctx.cluster.state();
        if super::forward::is_forwarded(request.metadata()) {
            // Another broker collects figures: this broker's own partitions only.
            return Ok(Response::new(pb::ListTopicsResponse {
                topics: state
                    .topics
                    .keys()
                    .filter_map(|name| self.describe_any(name).ok())
                    .collect(),
            }));
        }
        let mut descs: Vec<pb::TopicDescription> = state
            .topics
            .keys()
            .filter_map(|name| self.describe_all_partitions(name).ok())
            .collect();
        self.merge_remote_figures(&mut descs, request.metadata())
            .await;
        Ok(Response::new(pb::ListTopicsResponse { topics: descs }))
    }

    async fn create_group(
        &self,
        request: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::CreateGroupResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let topic = req.config.as_ref().map(|c| c.topic.clone());
        to_coordinator!(
            &self.ctx,
            metadata,
            req,
            &req.name,
            topic.as_deref(),
            AdminClient,
            create_group
        );
        let config = group_config_from_pb(&req.name, req.config)?;
        let (group, created) = self.ctx.groups.create(&req.name, config).await?;
        Ok(Response::new(pb::CreateGroupResponse {
            group: Some(group_to_pb(&group.info())),
            created,
        }))
    }

    async fn update_group(
        &self,
        request: Request<pb::UpdateGroupRequest>,
    ) -> Result<Response<pb::UpdateGroupResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        to_coordinator!(
            &self.ctx,
            metadata,
            req,
            &req.name,
            None,
            AdminClient,
            update_group
        );
        let config = group_config_from_pb(&req.name, req.config)?;
        let group = self.ctx.groups.update(&req.name, config).await?;
        Ok(Response::new(pb::UpdateGroupResponse {
            group: Some(group_to_pb(&group.info())),
        }))
    }

    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        to_coordinator!(
            &self.ctx,
            metadata,
            req,
            &req.name,
            None,
            AdminClient,
            delete_group
        );
        self.ctx.groups.delete(&req.name).await?;
        Ok(Response::new(pb::DeleteGroupResponse {}))
    }

    async fn describe_group(
        &self,
        request: Request<pb::DescribeGroupRequest>,
    ) -> Result<Response<pb::DescribeGroupResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        to_coordinator!(
            &self.ctx,
            metadata,
            req,
            &req.name,
            None,
            AdminClient,
            describe_group
        );
        let info = self.ctx.groups.get(&req.name)?.info();
        Ok(Response::new(pb::DescribeGroupResponse {
            group: Some(group_to_pb(&info)),
        }))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        let topic = (!req.topic.is_empty()).then_some(req.topic.as_str());
        let mut groups: Vec<pb::GroupDescription> = self
            .ctx
            .groups
            .list(topic)
            .iter()
            .map(|g| group_to_pb(&g.info()))
            .collect();
        if super::forward::is_forwarded(&metadata) {
            return Ok(Response::new(pb::ListGroupsResponse { groups }));
        }
        // Groups coordinated elsewhere: one call per coordinator.
        let state = self.ctx.cluster.state();
        let coordinators: std::collections::BTreeSet<u64> = state
            .groups
            .iter()
            .filter(|(_, g)| topic.is_none_or(|t| g.config.topic == t))
            .filter_map(|(name, _)| state.coordinator(name, None))
            .filter(|c| *c != self.ctx.cluster.me())
            .collect();
        for c in coordinators {
            let address = state
                .brokers
                .get(&c)
                .map(|b| b.address.clone())
                .ok_or_else(|| Status::unavailable(format!("broker {c} has no known address")))?;
            let mut client = AdminClient::new(self.ctx.cluster.channel_to(&address)?)
                .max_decoding_message_size(super::MAX_MESSAGE_BYTES);
            let remote = client
                .list_groups(super::forward::forwarded(&metadata, req.clone()))
                .await
                .map_err(|s| {
                    Status::unavailable(format!(
                        "listing the groups coordinated by broker {c} at {address}: {}",
                        s.message()
                    ))
                })?;
            groups.extend(remote.into_inner().groups);
        }
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        groups.dedup_by(|a, b| a.name == b.name);
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn reset_group(
        &self,
        request: Request<pb::ResetGroupRequest>,
    ) -> Result<Response<pb::ResetGroupResponse>, Status> {
        let metadata = request.metadata().clone();
        let req = request.into_inner();
        to_coordinator!(
            &self.ctx,
            metadata,
            req,
            &req.name,
            None,
            AdminClient,
            reset_group
        );
        // A reset must say where to: a missing target is not "earliest".
        let to = match req.to.as_ref().and_then(|t| t.position) {
            Some(
                pb::start_position::Position::Earliest(true)
                | pb::start_position::Position::Latest(true)
                | pb::start_position::Position::TimestampMs(_),
            ) => start_from_pb(req.to.as_ref()),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "reset of group {:?} has no target; set to.earliest, to.latest or to.timestamp_ms",
                    crate::validate::quote(&req.name)
                )));
            }
        };
        let group = self.ctx.groups.reset(&req.name, to).await?;
        Ok(Response::new(pb::ResetGroupResponse {
            group: Some(group_to_pb(&group.info())),
        }))
    }
}
