//! The Weir broker: a durable log engine on fjall, served over gRPC.
//!
//! # Layout
//!
//! - [`log`]: the log engine. Topics, partitions, record batches with CRC32C, the single
//!   group-commit writer thread, recovery, the on-disk key schema. Synchronous reads,
//!   async writes; knows nothing of gRPC.
//! - [`groups`]: consumer groups: membership, assignment, acks, redelivery, dead letters,
//!   work-queue retention.
//! - [`produce`]: the produce path above the log (validation, routing by key, batching).
//! - [`validate`]: names and settings from users, and their error.
//! - [`error`]: the broker's error over the layers' own ones.
//! - [`jobs`]: every periodic job, what runs how often and why.
//! - [`grpc`]: tonic services of `weir.v1`; the only place that builds `tonic::Status`.
//! - [`metrics`]: Prometheus metrics and the HTTP port.
//! - [`connections`]: bounds on connections and file descriptors.
//! - [`server`]: runs the gRPC and HTTP servers on given listeners, graceful shutdown.
//! - [`config`]: `weir-broker` flags and their `WEIR_*` environment variables.

pub mod cluster;
pub mod config;
pub mod connections;
pub mod error;
pub mod groups;
pub mod grpc;
pub mod jobs;
pub mod log;
pub mod metrics;
pub mod produce;
pub mod replica;
pub mod server;
pub mod validate;

pub use self::error::Error;
