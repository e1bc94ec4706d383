//! `rollout-proto`: the wire schema, generated at build time from
//! `transport.proto` and `plugin.proto` by protox + tonic-prost-build (no `protoc`),
//! and the checked conversions between wire messages and `rollout-core` types.
//!
//! Architecture invariant: wire types stop here. Everything past the transport works
//! with `rollout-core` types; conversions from the wire validate and name the field
//! that is missing or malformed.

#![allow(missing_debug_implementations)]

/// `rollout.transport.v1`: coordinator, enrollment and operator services.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
/// The encoded `FileDescriptorSet` of transport.proto and plugin.proto (for gRPC server
/// reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/rollout_descriptor.bin"));

pub mod transport {
    tonic::include_proto!("rollout.transport.v1");
}

/// `rollout.plugin.v1`: the Python sidecar service.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod plugin {
    tonic::include_proto!("rollout.plugin.v1");
}

mod convert;

pub use convert::{WireError, required_task_id, worker_id};
