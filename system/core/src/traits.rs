//! The seams between rollout's logic and the outside world. The machines and the
//! drivers depend on these traits; implementations live in `rollout-storage`,
//! `rollout-cloud-local`, `rollout-plugin-host` and `rollout-transport`, and the
//! simulator supplies its own.

use std::fmt;
use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::history::HistoryRecord;
use crate::ids::ContentId;

/// A key/value pair as returned by scans: owned, in key order.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Durable, transactional key/value storage. Keys order lexicographically by bytes;
/// values are opaque (callers encode with postcard).
///
/// Contract: a transaction's writes become visible to readers, and survive a crash,
/// exactly when [`StorageTxn::commit`] returns `Ok`; never partially.
pub trait Storage: Send + Sync {
    /// Starts a write transaction. At most one is open at a time; a second caller waits.
    fn begin_write(&self) -> Result<Box<dyn StorageTxn + '_>>;
    /// Reads one committed value.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Every committed pair whose key starts with `prefix`, in key order.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>>;
    /// One page of [`Storage::scan`]: at most `limit` committed pairs under `prefix`
    /// whose keys sort after `after` (from the first when `None`), in key order. Fewer
    /// than `limit` pairs means the prefix holds no more. Callers page through a prefix
    /// of any size in bounded memory.
    fn scan_page(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>>;
}

/// An open write transaction. Reads see the transaction's own writes. Dropping it
/// without [`StorageTxn::commit`] discards every write.
pub trait StorageTxn {
    /// Reads one value, including this transaction's uncommitted writes.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Inserts or replaces a value.
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()>;
    /// Removes a value; returns whether it existed.
    fn delete(&mut self, key: &[u8]) -> Result<bool>;
    /// Every pair under `prefix`, in key order, including uncommitted writes.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>>;
    /// Makes every write durable (one fsync) and visible, atomically.
    fn commit(self: Box<Self>) -> Result<()>;
}

/// Content-addressed blob storage: an object's id is the SHA-256 of its bytes, so
/// putting the same bytes twice is a no-op.
pub trait ObjectStore: Send + Sync {
    /// Stores `bytes`; returns their id.
    fn put(&self, bytes: &[u8]) -> Result<ContentId>;
    /// Stores everything `reader` yields, in bounded memory; returns the id.
    fn put_stream(&self, reader: &mut dyn Read) -> Result<ContentId>;
    /// The bytes of `id`. A missing id is `Fatal::Internal("object not found: ..")`.
    fn get(&self, id: &ContentId) -> Result<Vec<u8>>;
    /// Writes the bytes of `id` to `writer` in bounded memory; returns the length.
    fn get_stream(&self, id: &ContentId, writer: &mut dyn Write) -> Result<u64>;
    /// Whether `id` is stored.
    fn exists(&self, id: &ContentId) -> Result<bool>;
}

/// The id of a queued item: a ULID, so ids order by enqueue time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct QueueItemId(pub u128);

/// A durable FIFO queue with explicit acknowledgement.
///
/// Contract: an item pushed (push returned `Ok`) is delivered again after a restart
/// until it is acked.
pub trait Queue: Send {
    /// Appends an item durably.
    fn push(&mut self, item: Vec<u8>) -> Result<QueueItemId>;
    /// Takes the next item; it stays durable until [`Queue::ack`].
    fn pop(&mut self) -> Option<(QueueItemId, Vec<u8>)>;
    /// Finishes an item: it is deleted from storage.
    fn ack(&mut self, id: QueueItemId) -> Result<()>;
    /// Gives an item back: it is delivered next, before everything else.
    fn nack(&mut self, id: QueueItemId, item: Vec<u8>);
    /// Items waiting to be popped.
    fn len(&self) -> usize;
    /// Whether nothing waits to be popped.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A secret value. Its `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value; do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Named secrets (API keys, tokens) for plugins.
pub trait SecretStore: Send + Sync {
    /// The secret `name`.
    fn get(&self, name: &str) -> Result<Secret>;
    /// Stores a secret (read-only stores refuse with `Fatal::ConfigInvalid`).
    fn put(&self, name: &str, value: Secret) -> Result<()>;
}

/// One GPU as the worker reports it at Register.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Gpu {
    /// Device index on the host.
    pub index: u32,
    /// Product name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Stable device UUID.
    pub uuid: String,
    /// Total device memory.
    pub memory_bytes: u64,
}

/// What a host offers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Inventory {
    /// Logical CPUs.
    pub cpus: u32,
    /// Total memory.
    pub memory_bytes: u64,
    /// GPUs (empty when none, or when GPU discovery is not built in).
    pub gpus: Vec<Gpu>,
}

/// Notice that the host is about to be taken away (spot preemption, maintenance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreemptionNotice {
    /// How long until the host goes, if known.
    pub in_at_most: Option<Duration>,
    /// Where the notice came from.
    pub source: String,
}

/// Discovers the host's compute inventory.
pub trait ComputeHint: Send + Sync {
    /// CPUs, memory and GPUs. GPU discovery failing is not an error: the list is empty.
    fn inventory(&self) -> Result<Inventory>;
    /// A pending preemption of this host, if one was announced.
    fn preemption_signal(&self) -> Option<PreemptionNotice>;
}

/// A cooperative cancellation flag shared between a driver and a running call.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not yet cancelled.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks the call to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }
    /// Whether the call was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// One invocation of user code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginCall {
    /// The plugin, as named in the worker's config.
    pub plugin: String,
    /// The method within the plugin.
    pub method: String,
    /// Opaque input bytes.
    pub payload: Vec<u8>,
    /// How long the call may take before it is cancelled.
    pub deadline: Duration,
    /// Local files of the blobs the task reads, in the order the task names them.
    pub inputs: Vec<std::path::PathBuf>,
}

/// Why a plugin call produced no result. Each costs one task attempt, never the worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PluginError {
    /// The user code reported an error (exception, `Err`), with whatever detail it gave.
    #[error("plugin failed: {message}")]
    Failed {
        /// The error message.
        message: String,
        /// A traceback or backtrace, when there is one.
        detail: Option<String>,
    },
    /// The call ran past its deadline and was stopped.
    #[error("plugin call exceeded its deadline of {0:?}")]
    DeadlineExceeded(Duration),
    /// The call was cancelled through its [`CancelToken`].
    #[error("plugin call cancelled")]
    Cancelled,
    /// The plugin process or library crashed (it is restarted for the next call).
    #[error("plugin crashed: {0}")]
    Crashed(String),
    /// No plugin of that name is loaded.
    #[error("no plugin named {0:?} is loaded")]
    NotFound(String),
    /// The plugin was built against another ABI or protocol version.
    #[error("plugin {plugin:?} speaks ABI version {theirs}, the host speaks {ours}")]
    AbiMismatch {
        /// The plugin's name.
        plugin: String,
        /// The host's version.
        ours: u32,
        /// The plugin's version.
        theirs: u32,
    },
}

/// Runs user code. Implementations isolate failures: a crash, hang or panic in a
/// plugin becomes a [`PluginError`] for that call.
pub trait PluginHost: Send + Sync {
    /// The plugins this host can run (advertised at Register).
    fn plugins(&self) -> Vec<String>;
    /// Runs one call to completion, error, deadline or cancellation. Blocking.
    fn call(&self, call: &PluginCall, cancel: &CancelToken) -> Result<Vec<u8>, PluginError>;
    /// Whether every call to `plugin` returns at once without blocking (a built-in like
    /// `echo`), so a driver may run it in place instead of handing it to a thread of
    /// its own. Such a call cannot be stopped at its deadline. Default: `false`.
    fn runs_in_place(&self, plugin: &str) -> bool {
        let _ = plugin;
        false
    }
    /// How many times each plugin's process has been started again since the host
    /// began (a sidecar after a crash, or after a kill of a call that would not stop),
    /// cumulative, for plugins that have any. Cheap and non-blocking: the worker's
    /// driver reads it every beat. Default: none.
    fn restarts(&self) -> Vec<(String, u64)> {
        Vec::new()
    }
}

/// Receives history events (registered, leased, committed, ...) for logs, the audit
/// trail and the invariant checker.
pub trait EventEmitter: Send + Sync {
    /// Records one event. Must not block for long; must not fail the caller.
    fn emit(&self, record: &HistoryRecord);

    /// Records several events, in order (a batch's: one write instead of one per event,
    /// where the emitter writes).
    fn emit_all(&self, records: &[HistoryRecord]) {
        for record in records {
            self.emit(record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn cancel_token_is_shared() {
        let a = CancelToken::new();
        let b = a.clone();
        assert!(!b.is_cancelled());
        a.cancel();
        assert!(b.is_cancelled());
    }
}
