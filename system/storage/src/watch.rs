//! Commit notifications (feature `watch`): subscribers to a key prefix receive the committed
//! value of every key under it that a transaction wrote, after that transaction committed.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::broadcast;

/// Events a subscriber may fall behind by before it misses some: it then receives
/// [`broadcast::error::RecvError::Lagged`] and should re-read what it watches with a scan.
pub const WATCH_CHANNEL_CAPACITY: usize = 1024;

/// One key's committed state after a transaction that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The key written.
    pub key: Vec<u8>,
    /// Its committed value after the transaction; `None` when it was deleted.
    pub value: Option<Vec<u8>>,
}

/// The subscriptions of one storage, and the lock that keeps their events in commit order.
#[derive(Debug, Default)]
pub(crate) struct Watchers {
    /// Held from the database commit until its events are sent, so that the next transaction's
    /// events cannot overtake them.
    commit_order: Mutex<()>,
    subscriptions: Mutex<Vec<(Vec<u8>, broadcast::Sender<WatchEvent>)>>,
}

// Neither lock guards an invariant a panic could break half-way, so poisoning is read through.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Watchers {
    pub(crate) fn subscribe(&self, prefix: &[u8]) -> broadcast::Receiver<WatchEvent> {
        let (sender, receiver) = broadcast::channel(WATCH_CHANNEL_CAPACITY);
        lock(&self.subscriptions).push((prefix.to_vec(), sender));
        receiver
    }

    /// Holds back other commits' events until the guard is dropped.
    pub(crate) fn order_commit(&self) -> MutexGuard<'_, ()> {
        lock(&self.commit_order)
    }

    /// Sends one committed transaction's final writes, in key order.
    pub(crate) fn publish(&self, changes: BTreeMap<Vec<u8>, Option<Vec<u8>>>) {
        let mut subscriptions = lock(&self.subscriptions);
        subscriptions.retain(|(_, sender)| sender.receiver_count() > 0);
        if subscriptions.is_empty() {
            return;
        }
        for (key, value) in changes {
            for (prefix, sender) in subscriptions.iter() {
                if key.starts_with(prefix) {
                    // A receiver dropped since the retain above is not an error.
                    let _ = sender.send(WatchEvent { key: key.clone(), value: value.clone() });
                }
            }
        }
    }
}
