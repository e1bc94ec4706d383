//! Turns `std::io::Error` into rollout's error model, keeping what was being done to
//! which file in the message.

use std::io;

use rollout_core::{Error, Fatal, Recoverable, RetryHint};

/// Classifies `err`, which happened while doing `what` (e.g. "writing
/// ./data/object-store/tmp/01H...tmp"): a full disk drains, a permission does not
/// change by itself, and everything else is a broken expectation about the host.
pub(crate) fn io_error(what: impl std::fmt::Display, err: &io::Error) -> Error {
    let msg = format!("{what}: {err}");
    match err.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => {
            Error::recoverable(Recoverable::ResourceExhausted(msg), RetryHint::Backoff)
        }
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            Error::transient(msg, RetryHint::Backoff)
        }
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
            Error::Fatal(Fatal::PermissionDenied(msg))
        }
        _ => Error::internal(msg),
    }
}
