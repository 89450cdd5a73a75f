//! `weir.v1.Consumer`: fetch by partition and offset, with long polling.

use std::time::Duration;

use tonic::{Request, Response, Status};
use weir_proto::v1::{self as pb, consumer_server::Consumer};

use super::{Context, record_to_pb, status};
use crate::log::{Error, MAX_FETCH_WAIT};

/// `max_bytes` used when a fetch leaves it at 0: 1 MiB.
pub const DEFAULT_FETCH_BYTES: usize = 1024 * 1024;

/// Serves `weir.v1.Consumer` over the log.
#[derive(Debug, Clone)]
pub struct ConsumerService {
    ctx: Context,
}

impl ConsumerService {
    /// A service over `ctx`.
    pub fn new(ctx: Context) -> Self {
        Self { ctx }
    }
}

#[tonic::async_trait]
impl Consumer for ConsumerService {
    async fn fetch(
        &self,
        request: Request<pb::FetchRequest>,
    ) -> Result<Response<pb::FetchResponse>, Status> {
        let req = request.into_inner();
        let wait = Duration::from_millis(u64::from(req.max_wait_ms));
        if wait > MAX_FETCH_WAIT {
            return Err(Status::invalid_argument(format!(
                "max_wait_ms is {}; it must be at most {}",
                req.max_wait_ms,
                MAX_FETCH_WAIT.as_millis()
            )));
        }
        let topic = self.ctx.log.topic(&req.topic).map_err(|e| status(&e))?;
        let partition = topic.partition(req.partition).map_err(|e| status(&e))?;
        let earliest = partition.earliest_offset();
        let next = partition.next_offset();
        if req.offset < earliest || req.offset > next {
            return Err(status(&Error::OffsetOutOfRange {
                topic: topic.name.clone(),
                partition: partition.index,
                offset: req.offset,
                earliest,
                next,
            }));
        }
        if req.offset == next && !wait.is_zero() {
            let mut durable = partition.subscribe();
            let mut shutdown = self.ctx.shutdown.clone();
            tokio::select! {
                _ = tokio::time::timeout(wait, durable.wait_for(|n| *n > req.offset)) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
        }
        let max_bytes = if req.max_bytes == 0 {
            DEFAULT_FETCH_BYTES
        } else {
            req.max_bytes as usize
        };
        let max_records = if req.max_records == 0 {
            usize::MAX
        } else {
            req.max_records as usize
        };
        let log = self.ctx.log.clone();
        let part = partition.clone();
        let records = tokio::task::spawn_blocking(move || {
            log.read(&part, req.offset, max_bytes, max_records)
        })
        .await
        .map_err(|e| Status::internal(format!("fetch task failed: {e}")))?
        .map_err(|e| status(&e))?;
        self.ctx.metrics.observe_fetch(records.len());
        Ok(Response::new(pb::FetchResponse {
            records: records
                .into_iter()
                .map(|r| pb::StoredRecord {
                    offset: r.offset,
                    record: Some(record_to_pb(r.record)),
                })
                .collect(),
            next_offset: partition.next_offset(),
            earliest_offset: partition.earliest_offset(),
        }))
    }
}
