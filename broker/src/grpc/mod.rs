//! The gRPC edge: tonic services of `weir.v1`, and the one place that knows `tonic::Status`.
//!
//! Each service converts wire types to domain types ([`convert`]), makes one call into the
//! log, the produce path or the groups, and turns their errors into a status once
//! ([`status`]: `impl From<crate::Error> for Status`), so handlers use `?`.

mod admin;
mod cluster;
mod consumer;
pub(crate) mod convert;
mod forward;
pub(crate) use forward::with_metadata_index;
mod producer;
pub mod status;

use std::sync::Arc;

pub use self::{
    admin::AdminService,
    cluster::{ClusterService, RaftService},
    consumer::ConsumerService,
    producer::ProducerService,
};
use crate::{groups::Groups, log::Log};

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
    /// Consumer groups.
    pub groups: Arc<Groups>,
    /// The cluster's metadata group.
    pub cluster: Arc<crate::cluster::Cluster>,
}
