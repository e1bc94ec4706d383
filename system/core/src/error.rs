//! The error model: an error is either [`Fatal`] (retrying the same call cannot help:
//! fix the config, the input or the code) or [`Recoverable`] (the same call may
//! succeed later; the [`RetryHint`] says when). Messages name the field, file, worker
//! or task at fault, so a user can act on them.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// What every fallible rollout library call returns.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A failure, classified by whether retrying can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Retrying the same call will fail the same way.
    #[error(transparent)]
    Fatal(#[from] Fatal),
    /// The same call may succeed later.
    #[error("{kind} ({hint})")]
    Recoverable {
        /// What went wrong.
        kind: Recoverable,
        /// When a retry makes sense.
        hint: RetryHint,
    },
}

/// Failures that retrying cannot fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Fatal {
    /// A configuration value (or combination of values) is not acceptable.
    /// `field` is the dotted config path, e.g. `health.worker_self_fence_timeout`.
    #[error("invalid config: {field}: {reason}")]
    ConfigInvalid {
        /// The offending field (or the source, e.g. a file path, when no field applies).
        field: String,
        /// What is wrong and, where possible, what would be right.
        reason: String,
    },
    /// A file exists but is not what it should be (corrupt, foreign, wrong version).
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// The file at fault.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// Input from outside the process (a message, a request, a file) is malformed
    /// or exceeds a limit.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: ours is {ours}, theirs is {theirs}")]
    ProtocolMismatch {
        /// This side's version.
        ours: u32,
        /// The peer's version.
        theirs: u32,
    },
    /// The caller is not allowed to do this (e.g. a worker speaking for another id).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A broken internal expectation, or a request for something that must exist
    /// but does not (e.g. an object id with no object).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Failures that may go away by themselves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Recoverable {
    /// A passing condition: a network blip, a lock held by someone else, a value not
    /// set yet.
    #[error("transient: {0}")]
    Transient(String),
    /// The peer or service is not reachable or not ready.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bounded resource is full (queue, credits, disk); retry after it drains.
    #[error("resource exhausted: {0}")]
    ResourceExhausted(String),
    /// A deadline passed before the call completed.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(String),
}

/// When a [`Recoverable`] failure is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryHint {
    /// Retry right away.
    Immediately,
    /// Retry after this long.
    After(Duration),
    /// Retry with the caller's own exponential backoff.
    Backoff,
    /// Recoverable in principle (by someone changing the world, e.g. setting an
    /// environment variable), but an automatic retry of the same call will not help.
    Never,
}

impl fmt::Display for RetryHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryHint::Immediately => f.write_str("retry now"),
            RetryHint::After(d) => write!(f, "retry after {d:?}"),
            RetryHint::Backoff => f.write_str("retry with backoff"),
            RetryHint::Never => f.write_str("automatic retry will not help"),
        }
    }
}

impl Error {
    /// A [`Fatal::ConfigInvalid`] naming `field`.
    pub fn config_invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Fatal(Fatal::ConfigInvalid { field: field.into(), reason: reason.into() })
    }

    /// A [`Fatal::Internal`].
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Fatal(Fatal::Internal(msg.into()))
    }

    /// A [`Fatal::InvalidInput`].
    pub fn invalid_input(msg: impl Into<String>) -> Self {
        Error::Fatal(Fatal::InvalidInput(msg.into()))
    }

    /// A [`Recoverable`] error with its hint.
    pub fn recoverable(kind: Recoverable, hint: RetryHint) -> Self {
        Error::Recoverable { kind, hint }
    }

    /// A [`Recoverable::Transient`] error with its hint.
    pub fn transient(msg: impl Into<String>, hint: RetryHint) -> Self {
        Error::Recoverable { kind: Recoverable::Transient(msg.into()), hint }
    }

    /// True for [`Error::Fatal`].
    pub fn is_fatal(&self) -> bool {
        matches!(self, Error::Fatal(_))
    }

    /// The retry hint: `None` for fatal errors.
    pub fn retry_hint(&self) -> Option<RetryHint> {
        match self {
            Error::Fatal(_) => None,
            Error::Recoverable { hint, .. } => Some(*hint),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_what_is_at_fault() {
        let e = Error::config_invalid("health.clock_skew_budget", "must be less than 1s");
        assert_eq!(e.to_string(), "invalid config: health.clock_skew_budget: must be less than 1s");
        assert!(e.is_fatal());
        assert_eq!(e.retry_hint(), None);

        let e = Error::Fatal(Fatal::ProtocolMismatch { ours: 2, theirs: 1 });
        assert_eq!(e.to_string(), "protocol version mismatch: ours is 2, theirs is 1");

        let e = Error::transient("ROLLOUT_SECRET_TOKEN is not set", RetryHint::Never);
        assert_eq!(e.to_string(), "transient: ROLLOUT_SECRET_TOKEN is not set (automatic retry will not help)");
        assert_eq!(e.retry_hint(), Some(RetryHint::Never));
    }
}
