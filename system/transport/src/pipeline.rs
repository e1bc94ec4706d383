//! Commit pipelining: the coordinator applies its next batch while the last one syncs.
//!
//! [`CommitPipeline`] is a [`Storage`] that the coordinator machine writes through. A
//! transaction's [`StorageTxn::commit`] does not wait for the disk: it hands the
//! transaction's writes (a *write set*) to a committer, which applies them to the inner
//! storage and commits there (one fsync for every set that queued up meanwhile), and
//! returns. Reads, in the next transaction and through [`Storage::get`], see the sets
//! still on their way (newest first) over what the inner storage has committed, so the
//! machine's view is exactly "everything it committed".
//!
//! What makes this safe is the driver's side of the contract: a batch's outputs (sends,
//! replies, history events) are released only once [`CommitPipeline::durable`] has
//! passed the batch's [`CommitPipeline::enqueued`] sequence number. Nothing the outside
//! world sees can depend on a write that is not on disk; a crash loses only writes whose
//! effects nobody saw, as without the pipeline.
//!
//! A failed commit poisons the pipeline: later transactions are refused until
//! [`CommitPipeline::reset`], and sets queued behind the failed one are dropped (they
//! were built on its writes). The driver then recovers its machine from the inner
//! storage, as after any failed batch.
//!
//! With [`BlockingWork::Inline`] (a simulation) the committer runs inside `commit`, so a
//! run stays a function of its seed; the driver's release logic is the same.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rollout_core::traits::{KeyValue, Storage, StorageTxn};
use rollout_core::{Error, Result};
use tokio::sync::watch;

use crate::node_env::BlockingWork;

/// Write sets queued behind the disk before `commit` waits (back-pressure on the machine).
pub const WRITE_SETS_IN_FLIGHT_MAX: usize = 4;

/// Each written key's latest value (`None`: deleted), in key order.
type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// One committed-to-the-pipeline transaction.
#[derive(Debug)]
struct WriteSet {
    seq: u64,
    /// Sets from before the last [`CommitPipeline::reset`] are dropped, not applied.
    epoch: u64,
    writes: Writes,
}

/// How far the inner storage has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durability {
    /// Every write set up to this sequence number is durable.
    pub seq: u64,
    /// Why the pipeline is poisoned, if it is.
    pub failed: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    /// Sets handed over but not yet durable, oldest first.
    in_flight: VecDeque<Arc<WriteSet>>,
    /// The last sequence number given out.
    enqueued: u64,
    epoch: u64,
    failed: Option<String>,
}

struct Shared {
    inner: Arc<dyn Storage>,
    state: Mutex<State>,
    /// Signalled whenever `in_flight` shrinks.
    drained: Condvar,
    durable: watch::Sender<Durability>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave `State` half-updated (every update
        // is a single push, pop or assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies `sets` (in order) to the inner storage in one transaction and commits.
    fn commit_sets(&self, sets: &[Arc<WriteSet>]) {
        let Some(last) = sets.last().map(|set| set.seq) else { return };
        let current_epoch = {
            let state = self.lock();
            if state.failed.is_some() {
                // Built on writes that failed to commit: dropped.
                return;
            }
            state.epoch
        };
        let live: Vec<&Arc<WriteSet>> = sets.iter().filter(|set| set.epoch == current_epoch).collect();
        if live.is_empty() {
            return;
        }
        let result = (|| -> Result<()> {
            let mut txn = self.inner.begin_write()?;
            for set in &live {
                for (key, value) in &set.writes {
                    match value {
                        Some(value) => txn.put(key, value)?,
                        None => {
                            txn.delete(key)?;
                        }
                    }
                }
            }
            txn.commit()
        })();
        if result.is_ok() {
            // Durable first, out of flight second: whoever sees the sets gone (a drain)
            // also sees them durable. A reader in between lays sets over storage that
            // already holds them: the same values.
            self.durable.send_modify(|d| d.seq = d.seq.max(last));
        }
        let mut state = self.lock();
        if state.epoch != current_epoch {
            // Reset while we were committing: whatever we did is the new baseline.
            return;
        }
        match result {
            Ok(()) => {
                while state.in_flight.front().is_some_and(|set| set.seq <= last) {
                    state.in_flight.pop_front();
                }
                drop(state);
            }
            Err(e) => {
                let reason = format!("committing write set {last}: {e}");
                tracing::error!(channel = "coordinator", error = %e, seq = last, "pipelined commit failed");
                state.failed = Some(reason.clone());
                state.in_flight.clear();
                drop(state);
                self.durable.send_modify(|d| d.failed = Some(reason));
            }
        }
        self.drained.notify_all();
    }
}

enum Committer {
    Thread { tx: Option<mpsc::Sender<Arc<WriteSet>>>, join: Option<JoinHandle<()>> },
    Inline,
}

/// A [`Storage`] whose commits return before they are durable; see the module docs.
pub struct CommitPipeline {
    shared: Arc<Shared>,
    committer: Mutex<Committer>,
}

impl std::fmt::Debug for CommitPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("CommitPipeline")
            .field("in_flight", &state.in_flight.len())
            .field("enqueued", &state.enqueued)
            .field("failed", &state.failed)
            .finish_non_exhaustive()
    }
}

impl CommitPipeline {
    /// Wraps `inner`. With [`BlockingWork::Pool`] a dedicated thread commits; with
    /// [`BlockingWork::Inline`] each `commit` commits before it returns.
    pub fn new(inner: Arc<dyn Storage>, blocking: BlockingWork) -> Result<Self> {
        let (durable, _) = watch::channel(Durability { seq: 0, failed: None });
        let shared = Arc::new(Shared { inner, state: Mutex::new(State::default()), drained: Condvar::new(), durable });
        let committer = match blocking {
            BlockingWork::Inline => Committer::Inline,
            BlockingWork::Pool => {
                let (tx, rx) = mpsc::channel::<Arc<WriteSet>>();
                let for_thread = Arc::clone(&shared);
                let join = std::thread::Builder::new()
                    .name("rollout-commit".into())
                    .spawn(move || {
                        while let Ok(first) = rx.recv() {
                            // Everything that queued up while the last commit synced goes
                            // into this one: one fsync for all of it.
                            let mut sets = vec![first];
                            sets.extend(rx.try_iter());
                            for_thread.commit_sets(&sets);
                        }
                    })
                    .map_err(|e| Error::internal(format!("starting the commit thread: {e}")))?;
                Committer::Thread { tx: Some(tx), join: Some(join) }
            }
        };
        Ok(CommitPipeline { shared, committer: Mutex::new(committer) })
    }

    /// The sequence number of the last write set handed over (0: none yet). A batch's
    /// outputs may be released once [`CommitPipeline::durable`] reaches it.
    pub fn enqueued(&self) -> u64 {
        self.shared.lock().enqueued
    }

    /// Follows durability; see [`Durability`].
    pub fn durable(&self) -> watch::Receiver<Durability> {
        self.shared.durable.subscribe()
    }

    /// Blocks until no write set is in flight; returns why the pipeline failed, if it did.
    pub fn drain_blocking(&self) -> Option<String> {
        let mut state = self.shared.lock();
        while !state.in_flight.is_empty() && state.failed.is_none() {
            state = self.shared.drained.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.failed.clone()
    }

    /// Clears a failure: sets still queued are dropped, and reads see only what the inner
    /// storage committed. Call it before recovering a machine from the inner storage.
    pub fn reset(&self) {
        let mut state = self.shared.lock();
        state.epoch += 1;
        state.in_flight.clear();
        state.failed = None;
        let enqueued = state.enqueued;
        drop(state);
        // Nothing older than now will ever be reported durable: let waiters past it.
        self.shared.durable.send_modify(|d| {
            d.seq = enqueued;
            d.failed = None;
        });
        self.shared.drained.notify_all();
    }

    /// The sets in flight now, oldest first: what a reader lays over the inner storage.
    fn layers(&self) -> Result<Vec<Arc<WriteSet>>> {
        let state = self.shared.lock();
        if let Some(reason) = &state.failed {
            return Err(Error::internal(format!("storage pipeline failed ({reason}); recover from storage")));
        }
        Ok(state.in_flight.iter().cloned().collect())
    }

    fn hand_over(&self, writes: Writes) -> Result<()> {
        let mut state = self.shared.lock();
        while state.in_flight.len() >= WRITE_SETS_IN_FLIGHT_MAX && state.failed.is_none() {
            state = self.shared.drained.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if let Some(reason) = &state.failed {
            return Err(Error::internal(format!("storage pipeline failed ({reason}); recover from storage")));
        }
        state.enqueued += 1;
        let set = Arc::new(WriteSet { seq: state.enqueued, epoch: state.epoch, writes });
        state.in_flight.push_back(Arc::clone(&set));
        drop(state);
        let mut committer = self.committer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &mut *committer {
            Committer::Inline => {
                drop(committer);
                self.shared.commit_sets(&[set]);
                match self.shared.lock().failed.clone() {
                    Some(reason) => Err(Error::internal(reason)),
                    None => Ok(()),
                }
            }
            Committer::Thread { tx: Some(tx), .. } => {
                tx.send(set).map_err(|_| Error::internal("the commit thread stopped"))
            }
            Committer::Thread { tx: None, .. } => Err(Error::internal("the storage pipeline is shut down")),
        }
    }
}

impl Drop for CommitPipeline {
    fn drop(&mut self) {
        let committer = self.committer.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Committer::Thread { tx, join } = committer {
            // Closing the channel ends the thread once it has committed what it holds, so
            // the inner storage is released (and durable) when this returns.
            drop(tx.take());
            if let Some(join) = join.take() {
                let _ = join.join();
            }
        }
    }
}

/// The value of `key` in `layers` (newest wins), or `None` if no layer wrote it.
fn layered(layers: &[Arc<WriteSet>], key: &[u8]) -> Option<Option<Vec<u8>>> {
    layers.iter().rev().find_map(|set| set.writes.get(key).cloned())
}

/// Lays `writes` over `pairs` (all under `prefix`), in key order.
fn overlay_scan(pairs: Vec<KeyValue>, overlays: &[&Writes], prefix: &[u8]) -> Vec<KeyValue> {
    if overlays.iter().all(|w| w.is_empty()) {
        return pairs;
    }
    let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = pairs.into_iter().collect();
    for writes in overlays {
        let from = Bound::Included(prefix.to_vec());
        for (key, value) in writes.range::<Vec<u8>, _>((from, Bound::Unbounded)) {
            if !key.starts_with(prefix) {
                break;
            }
            match value {
                Some(value) => merged.insert(key.clone(), value.clone()),
                None => merged.remove(key),
            };
        }
    }
    merged.into_iter().collect()
}

/// One page of the inner storage under `prefix` after `after`, with the overlays laid
/// over it. Overlay deletes can empty an inner page, so the inner storage is read
/// window by window until `limit` pairs are found or it has no more; each window's
/// overlay keys are exactly those between the window's bounds.
fn overlay_scan_page(
    inner: &dyn Storage,
    overlays: &[&Writes],
    prefix: &[u8],
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<KeyValue>> {
    if overlays.iter().all(|w| w.is_empty()) {
        return inner.scan_page(prefix, after, limit);
    }
    let mut found: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut cursor: Option<Vec<u8>> = after.map(<[u8]>::to_vec);
    loop {
        let page = inner.scan_page(prefix, cursor.as_deref(), limit)?;
        let full = limit > 0 && page.len() == limit;
        let upper = if full { page.last().map(|(k, _)| k.clone()) } else { None };
        let mut window: BTreeMap<Vec<u8>, Vec<u8>> = page.into_iter().collect();
        let lower = match &cursor {
            Some(c) if c.as_slice() >= prefix => Bound::Excluded(c.clone()),
            _ => Bound::Included(prefix.to_vec()),
        };
        let high = match &upper {
            Some(u) => Bound::Included(u.clone()),
            None => Bound::Unbounded,
        };
        for writes in overlays {
            for (key, value) in writes.range::<Vec<u8>, _>((lower.clone(), high.clone())) {
                if !key.starts_with(prefix) {
                    break;
                }
                match value {
                    Some(value) => window.insert(key.clone(), value.clone()),
                    None => window.remove(key),
                };
            }
        }
        found.extend(window);
        if found.len() >= limit || upper.is_none() {
            break;
        }
        cursor = upper;
    }
    Ok(found.into_iter().take(limit).collect())
}

impl Storage for CommitPipeline {
    fn begin_write(&self) -> Result<Box<dyn StorageTxn + '_>> {
        let layers = self.layers()?;
        Ok(Box::new(PipelineTxn { pipeline: self, layers, writes: Writes::new() }))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        // Layers first, then the inner storage: a set that becomes durable in between is
        // in both, with the same value.
        let layers = self.layers()?;
        match layered(&layers, key) {
            Some(value) => Ok(value),
            None => self.shared.inner.get(key),
        }
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        let layers = self.layers()?;
        let pairs = self.shared.inner.scan(prefix)?;
        let overlays: Vec<&Writes> = layers.iter().map(|set| &set.writes).collect();
        Ok(overlay_scan(pairs, &overlays, prefix))
    }

    fn scan_page(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>> {
        let layers = self.layers()?;
        let overlays: Vec<&Writes> = layers.iter().map(|set| &set.writes).collect();
        overlay_scan_page(&*self.shared.inner, &overlays, prefix, after, limit)
    }
}

/// A transaction over a [`CommitPipeline`]: its writes, over the sets in flight when it
/// began (no other set can start while it is open: the machine is the only writer).
struct PipelineTxn<'p> {
    pipeline: &'p CommitPipeline,
    layers: Vec<Arc<WriteSet>>,
    writes: Writes,
}

impl StorageTxn for PipelineTxn<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(value) = self.writes.get(key) {
            return Ok(value.clone());
        }
        match layered(&self.layers, key) {
            Some(value) => Ok(value),
            None => self.pipeline.shared.inner.get(key),
        }
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.writes.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<bool> {
        let existed = self.get(key)?.is_some();
        if existed {
            self.writes.insert(key.to_vec(), None);
        }
        Ok(existed)
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        let pairs = self.pipeline.shared.inner.scan(prefix)?;
        let mut overlays: Vec<&Writes> = self.layers.iter().map(|set| &set.writes).collect();
        overlays.push(&self.writes);
        Ok(overlay_scan(pairs, &overlays, prefix))
    }

    fn commit(self: Box<Self>) -> Result<()> {
        if self.writes.is_empty() {
            return Ok(());
        }
        self.pipeline.hand_over(self.writes)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use rollout_storage::{MemDisk, RedbStorage};

    use super::*;
    use crate::test_storage::{GatedStorage, OpenOnDrop};

    fn pipeline(blocking: BlockingWork) -> (MemDisk, CommitPipeline) {
        let disk = MemDisk::new();
        let inner: Arc<dyn Storage> = Arc::new(RedbStorage::open_in_memory(&disk).expect("open"));
        (disk, CommitPipeline::new(inner, blocking).expect("pipeline"))
    }

    fn commit(p: &CommitPipeline, writes: &[(&str, Option<&str>)]) {
        let mut txn = p.begin_write().expect("begin");
        for (key, value) in writes {
            match value {
                Some(v) => txn.put(key.as_bytes(), v.as_bytes()).expect("put"),
                None => {
                    txn.delete(key.as_bytes()).expect("delete");
                }
            }
        }
        txn.commit().expect("commit");
    }

    fn text(pairs: Vec<KeyValue>) -> Vec<(String, String)> {
        pairs
            .into_iter()
            .map(|(k, v)| (String::from_utf8(k).expect("utf8"), String::from_utf8(v).expect("utf8")))
            .collect()
    }

    #[test]
    fn reads_see_every_commit_and_the_inner_storage_gets_them_all() {
        for blocking in [BlockingWork::Pool, BlockingWork::Inline] {
            let (disk, p) = pipeline(blocking);
            commit(&p, &[("a/1", Some("one")), ("a/2", Some("two")), ("b/1", Some("x"))]);
            commit(&p, &[("a/2", None), ("a/3", Some("three"))]);
            // Whether or not the sets are durable yet, reads see both.
            assert_eq!(p.get(b"a/2").expect("get"), None, "{blocking:?}");
            assert_eq!(p.get(b"a/3").expect("get").as_deref(), Some(&b"three"[..]));
            let txn = p.begin_write().expect("begin");
            assert_eq!(
                text(txn.scan(b"a/").expect("scan")),
                [("a/1".into(), "one".into()), ("a/3".into(), "three".into())]
            );
            drop(txn);
            assert_eq!(p.enqueued(), 2);
            assert_eq!(p.drain_blocking(), None);
            assert_eq!(p.durable().borrow().seq, 2);
            drop(p);
            // Everything reached the disk, and survives a crash.
            disk.crash(rollout_storage::CrashMode::LoseUnsynced);
            let reopened = RedbStorage::open_in_memory(&disk).expect("reopen");
            assert_eq!(
                text(reopened.scan(b"").expect("scan")),
                [("a/1".into(), "one".into()), ("a/3".into(), "three".into()), ("b/1".into(), "x".into())]
            );
        }
    }

    #[test]
    fn a_transaction_dropped_without_commit_hands_nothing_over() {
        let (_disk, p) = pipeline(BlockingWork::Pool);
        let mut txn = p.begin_write().expect("begin");
        txn.put(b"k", b"v").expect("put");
        drop(txn);
        assert_eq!(p.enqueued(), 0);
        assert_eq!(p.get(b"k").expect("get"), None);
    }

    #[test]
    fn sets_queued_behind_a_failed_commit_are_never_applied() {
        let (storage, gate, fail) = GatedStorage::new();
        let storage = Arc::new(storage);
        let p = CommitPipeline::new(Arc::clone(&storage) as Arc<dyn Storage>, BlockingWork::Pool).expect("pipeline");
        let _open_at_the_end = OpenOnDrop(Arc::clone(&gate));
        gate.set_shut(true);
        fail.store(true, Ordering::SeqCst);
        commit(&p, &[("a", Some("fails"))]);
        while gate.waiting() == 0 {
            std::thread::yield_now();
        }
        // Queued while the first set is still syncing, and built on it.
        commit(&p, &[("b", Some("built on a"))]);
        gate.set_shut(false);
        assert!(p.drain_blocking().is_some(), "the failure is reported");
        fail.store(false, Ordering::SeqCst);
        p.reset();
        commit(&p, &[("c", Some("after reset"))]);
        assert_eq!(p.drain_blocking(), None);
        // The commit thread took the sets in order, so "b" was dropped before "c" landed.
        assert_eq!(storage.get(b"a").expect("get"), None);
        assert_eq!(storage.get(b"b").expect("get"), None, "a set built on a failed one was applied");
        assert_eq!(storage.get(b"c").expect("get").as_deref(), Some(&b"after reset"[..]));
        assert_eq!(p.get(b"b").expect("get"), None);
    }

    #[test]
    fn a_failed_commit_poisons_until_reset_and_drops_what_was_built_on_it() {
        for blocking in [BlockingWork::Pool, BlockingWork::Inline] {
            let (storage, _gate, fail) = GatedStorage::new();
            let storage = Arc::new(storage);
            let p = CommitPipeline::new(Arc::clone(&storage) as Arc<dyn Storage>, blocking).expect("pipeline");
            commit(&p, &[("k", Some("durable"))]);
            assert_eq!(p.drain_blocking(), None);
            fail.store(true, Ordering::SeqCst);
            let mut txn = p.begin_write().expect("begin");
            txn.put(b"k", b"lost").expect("put");
            let _ = txn.commit(); // Inline reports the failure here; Pool in `durable`.
            let reason = p.drain_blocking().expect("the failure is reported");
            assert!(reason.contains("injected commit failure"), "{blocking:?}: {reason}");
            assert!(p.durable().borrow().failed.is_some());
            let refused = p.begin_write().err().expect("a poisoned pipeline refuses transactions");
            assert!(refused.to_string().contains("recover from storage"), "{refused}");
            fail.store(false, Ordering::SeqCst);
            p.reset();
            assert_eq!(p.durable().borrow().failed, None);
            assert_eq!(p.get(b"k").expect("get").as_deref(), Some(&b"durable"[..]), "{blocking:?}");
            commit(&p, &[("k", Some("after reset"))]);
            assert_eq!(p.drain_blocking(), None);
            assert_eq!(storage.get(b"k").expect("get").as_deref(), Some(&b"after reset"[..]));
        }
    }
}
