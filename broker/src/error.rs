//! The broker's error: one type over the layers' own errors, converted to a gRPC status
//! once, at the edge ([`crate::grpc`]).

use crate::{cluster, groups, log, validate::InvalidConfig};

/// Any error a broker call can end with. Each layer keeps its own type; this one only says
/// which layer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The log engine failed or refused.
    #[error(transparent)]
    Log(#[from] log::Error),
    /// Consumer groups refused.
    #[error(transparent)]
    Group(#[from] groups::Error),
    /// A name or setting broke a rule.
    #[error(transparent)]
    InvalidConfig(#[from] InvalidConfig),
    /// The cluster's metadata group failed or has no leader.
    #[error(transparent)]
    Cluster(#[from] cluster::Error),
}
