//! `weir.v1.Admin`: topic administration.

use tonic::{Request, Response, Status};
use weir_proto::v1::{self as pb, admin_server::Admin};

use super::{Context, describe, status};
use crate::log::{TopicConfig, topic::validate_name};

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

fn config(name: &str, c: Option<pb::TopicConfig>) -> Result<TopicConfig, Status> {
    let c = c.ok_or_else(|| {
        Status::invalid_argument(format!(
            "topic {name:?}: config is missing; set at least config.partitions (1..=1024)"
        ))
    })?;
    TopicConfig::new(c.partitions, c.max_message_bytes).map_err(|e| status(&e))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_topic(
        &self,
        request: Request<pb::CreateTopicRequest>,
    ) -> Result<Response<pb::CreateTopicResponse>, Status> {
        let req = request.into_inner();
        validate_name(&req.name).map_err(|e| status(&e))?;
        let config = config(&req.name, req.config)?;
        let (topic, created) = self
            .ctx
            .log
            .create_topic(&req.name, config)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::CreateTopicResponse {
            topic: Some(describe(&topic)),
            created,
        }))
    }

    async fn update_topic(
        &self,
        request: Request<pb::UpdateTopicRequest>,
    ) -> Result<Response<pb::UpdateTopicResponse>, Status> {
        let req = request.into_inner();
        let config = config(&req.name, req.config)?;
        let topic = self
            .ctx
            .log
            .update_topic(&req.name, config)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::UpdateTopicResponse {
            topic: Some(describe(&topic)),
        }))
    }

    async fn delete_topic(
        &self,
        request: Request<pb::DeleteTopicRequest>,
    ) -> Result<Response<pb::DeleteTopicResponse>, Status> {
        let req = request.into_inner();
        self.ctx
            .log
            .delete_topic(&req.name)
            .await
            .map_err(|e| status(&e))?;
        Ok(Response::new(pb::DeleteTopicResponse {}))
    }

    async fn describe_topic(
        &self,
        request: Request<pb::DescribeTopicRequest>,
    ) -> Result<Response<pb::DescribeTopicResponse>, Status> {
        let req = request.into_inner();
        let topic = self.ctx.log.topic(&req.name).map_err(|e| status(&e))?;
        Ok(Response::new(pb::DescribeTopicResponse {
            topic: Some(describe(&topic)),
        }))
    }

    async fn list_topics(
        &self,
        _request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        Ok(Response::new(pb::ListTopicsResponse {
            topics: self.ctx.log.topics().iter().map(|t| describe(t)).collect(),
        }))
    }
}
