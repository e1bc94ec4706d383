//! `rollout-core`: the vocabulary every other rollout crate speaks.
//!
//! - [`ids`]: typed identifiers (workers, jobs, tasks, fencing tokens, content ids).
//! - [`time`]: [`Now`], the only way a state machine learns the time.
//! - [`config`]: the effective configuration, its TOML/env loading and validation.
//! - [`error`]: the error model, [`Error::Fatal`] vs [`Error::Recoverable`] with a retry hint.
//! - [`framing`]: cutting batches of messages into frames by bytes.
//! - [`health`]: the heartbeat deadline formulas shared by coordinator, worker and checker.
//! - [`traits`]: the seams to the outside world (storage, objects, queue, secrets,
//!   compute inventory, plugins, events), implemented in later crates.
//! - [`protocol`]: the messages the coordinator and worker machines exchange.
//! - [`rng`]: the seeded generator machines draw jitter from.
//! - [`history`]: the events that make up a run's history, judged by the invariant checker.
//!
//! Architecture invariant: this crate performs no I/O of its own except reading a
//! config file in [`config::Config::load`], and depends on no async runtime.

pub mod config;
pub mod error;
pub mod framing;
pub mod health;
pub mod history;
pub mod ids;
pub mod oracle;
pub mod protocol;
pub mod rng;
pub mod text;
pub mod time;
pub mod traits;

pub use config::Config;
pub use error::{Error, Fatal, Recoverable, Result, RetryHint};
pub use ids::{Attempt, ContentId, FencingToken, Incarnation, JobId, TaskId, WorkerId};
pub use time::{Mono, Now};

/// The wire protocol version, checked at Register. Bump it on any incompatible
/// change to proto/transport.proto or to the meaning of a field.
pub const PROTOCOL_VERSION: u32 = 1;
