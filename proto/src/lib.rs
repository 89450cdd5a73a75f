//! The `weir.v1` gRPC contract, generated from `proto/weir/v1/weir.proto`.
//!
//! This crate owns the wire types, and the one rule of the contract that clients and brokers
//! compute alike ([`partitioner`]: which partition a key goes to); it knows nothing of
//! storage or of how the broker serves them. Byte fields are [`bytes::Bytes`](prost::bytes::Bytes) so records move without
//! copies.

/// Generated code of package `weir.v1`: messages, `*_client` and `*_server` modules.
#[allow(missing_docs, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("weir.v1");

    /// Encoded `FileDescriptorSet` of `weir.v1`, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("weir_v1_descriptor");
}

pub mod partitioner;
