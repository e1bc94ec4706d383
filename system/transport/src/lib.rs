//! `rollout-transport`: the real runtime around the sans-IO machines.
//!
//! - [`tls`]: the development CA and certificates (rcgen), rustls configurations for
//!   mutual TLS (ring provider; no OpenSSL), and peer roles read from certificates.
//! - [`net`]: TLS over any byte stream: a verified-connection stream for tonic's
//!   `serve_with_incoming` (with the peer's role as connect info) and a connector for
//!   `Endpoint::connect_with_connector_lazy`, both generic so a simulated network can
//!   stand in for TCP.
//! - [`service`]: the `Coordinator` and `Operator` gRPC services (identity binding,
//!   message checks, size limits).
//! - [`enroll`]: bootstrap tokens, the `Enrollment` service (a token and a CSR for a
//!   worker certificate) and the worker's side of `--join` (CA pinned by the token).
//! - [`coordinator`]: the coordinator driver (group commit, timers, routing).
//! - [`worker`]: the worker driver (registration, beats, streams, reconnects, tasks).
//! - [`pipeline`]: commit pipelining, so the coordinator applies a batch while the last
//!   one syncs.
//! - [`plugins`]: the built-in `echo` and `sleep` plugins, and [`PluginRouter`], which
//!   serves several plugin hosts as one.
//! - [`history`]: JSON-lines history emitters.
//! - [`limiter`]: per-source counting and log rate limits (failed enrollments, refusals).
//! - [`node_env`]: what a driver takes from its host (wall clock, where blocking work
//!   runs); the default is production's, a simulation supplies its own.
//! - [`server`]: starting a coordinator or a worker from the effective config.
//!
//! Architecture invariant: all I/O, clocks and spawning of the system live here (and
//! in the binaries); decisions stay in the machines. The drivers only translate, batch
//! and route.

pub mod blob_cache;
pub mod blob_retention;
pub mod coordinator;
pub mod dashboard;
pub mod enroll;
pub mod history;
pub mod limiter;
pub mod metrics;
pub mod net;
pub mod node_env;
pub mod pipeline;
pub mod plugins;
pub mod renewal;
pub mod revocation;
pub mod rotation;
pub mod server;
pub mod service;
#[cfg(test)]
mod test_storage;
pub mod tls;
pub mod trust;
pub mod wire;
pub mod worker;

pub use coordinator::{CoordinatorHandle, NodeClock, OperatorRequest};
pub use history::{FileJsonEmitter, MemoryEmitter, NullEmitter, StdoutJsonEmitter};
pub use net::ConnectionLimits;
pub use node_env::{BlockingWork, NodeEnv, PluginTime, SystemWallClock, WallClock};
pub use plugins::{BuiltinPlugins, PluginRouter};
pub use server::{
    CoordinatorOptions, RunningCoordinator, ServeLimits, ServerTls, WorkerOptions, connect, operator_client,
    run_worker_process, serve_coordinator, serve_coordinator_with_enrollment, start_coordinator,
};
pub use service::{CoordinatorApi, ResultStore};
pub use tls::{CertFiles, PeerRole, ensure_dev_ca, issue_client_cert, issue_operator_cert, issue_server_cert};
