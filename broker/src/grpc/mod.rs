//! The gRPC edge: tonic services of `weir.v1`, and the one place that knows `tonic::Status`.
//!
//! Each service converts wire types to domain types, calls the log or the produce path, and
//! maps [`log::Error`](crate::log::Error) to a status code once, here.

mod admin;
mod consumer;
mod producer;

use std::sync::Arc;

use tonic::{Code, Status};
use weir_proto::v1 as pb;

pub use self::{admin::AdminService, consumer::ConsumerService, producer::ProducerService};
use crate::log::{self, Error, Log};

/// Largest gRPC message the broker accepts or sends: 64 MiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// State shared by the services.
#[derive(Debug, Clone)]
pub struct Context {
    /// The log engine.
    pub log: Arc<Log>,
    /// Becomes `true` when the broker starts shutting down; streams end at that point.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Request counters for the metrics endpoint.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Maps a log error to the status code the contract names for it.
pub fn status(err: &Error) -> Status {
    let code = match err {
        Error::TopicNotFound(_) | Error::PartitionNotFound { .. } => Code::NotFound,
        Error::TopicExists { .. } => Code::AlreadyExists,
        Error::InvalidArgument(_) => Code::InvalidArgument,
        Error::OffsetOutOfRange { .. } => Code::OutOfRange,
        Error::Corrupt { .. } => Code::DataLoss,
        Error::ShuttingDown => Code::Unavailable,
        _ => Code::Internal,
    };
    Status::new(code, err.to_string())
}

pub(crate) fn record_from_pb(r: pb::Record) -> log::Record {
    log::Record {
        key: r.key,
        value: r.value,
        headers: r.headers.into_iter().map(|h| (h.key, h.value)).collect(),
        timestamp_ms: r.timestamp_ms,
    }
}

pub(crate) fn record_to_pb(r: log::Record) -> pb::Record {
    pb::Record {
        key: r.key,
        value: r.value,
        headers: r
            .headers
            .into_iter()
            .map(|(key, value)| pb::Header { key, value })
            .collect(),
        timestamp_ms: r.timestamp_ms,
    }
}

pub(crate) fn describe(topic: &log::Topic) -> pb::TopicDescription {
    let config = topic.config();
    let partitions: Vec<pb::PartitionStats> = topic
        .partitions()
        .iter()
        .map(|p| pb::PartitionStats {
            partition: p.index,
            earliest_offset: p.earliest_offset(),
            next_offset: p.next_offset(),
            messages: log::partition_messages(p),
            bytes: p.bytes(),
        })
        .collect();
    pb::TopicDescription {
        name: topic.name.clone(),
        config: Some(pb::TopicConfig {
            partitions: config.partitions,
            max_message_bytes: config.max_message_bytes,
        }),
        messages: partitions.iter().map(|p| p.messages).sum(),
        bytes: partitions.iter().map(|p| p.bytes).sum(),
        partitions,
        created_at_ms: topic.created_at_ms,
    }
}
