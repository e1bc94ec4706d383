//! Commit pipelining: the coordinator applies its next batch while the last one syncs.
//!
//! The bookkeeping and the release rule are sans-IO, in `rollout_storage::pipeline`
//! (the simulator drives the same [`PipelineState`]); this is its committer: a thread
//! (or, inline, the caller) and back-pressure on the machine.
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

use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use rollout_core::traits::{KeyValue, Storage, StorageTxn};
use rollout_core::{Error, Result};
pub use rollout_storage::pipeline::Durability;
use rollout_storage::pipeline::{
    HandOver, LayeredTxn, PipelineState, WriteSet, Writes, overlay_scan, overlay_scan_page,
};
use tokio::sync::watch;

use crate::node_env::BlockingWork;

pub use rollout_storage::pipeline::WRITE_SETS_IN_FLIGHT_MAX;

/// Told how long each durable commit (apply and fsync) took, in seconds.
pub type CommitObserver = Arc<dyn Fn(f64) + Send + Sync>;

struct Shared {
    inner: Arc<dyn Storage>,
    /// Set once, by the driver that serves metrics.
    observer: std::sync::OnceLock<CommitObserver>,
    state: Mutex<PipelineState>,
    /// Signalled whenever the sets in flight shrink.
    drained: Condvar,
    durable: watch::Sender<Durability>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, PipelineState> {
        // A panic while holding the lock cannot leave the state half-updated (every
        // update is one call on it), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies `sets` (in order) to the inner storage in one transaction and commits.
    fn commit_sets(&self, sets: Vec<Arc<WriteSet>>) {
        // None: built on writes that failed to commit, or from before a reset: dropped.
        let Some(plan) = self.lock().sync_plan(Some(sets)) else { return };
        let started = self.observer.get().map(|_| std::time::Instant::now());
        let result = plan.apply(&*self.inner);
        if let (Some(observe), Some(started)) = (self.observer.get(), started) {
            observe(started.elapsed().as_secs_f64());
        }
        let mut state = self.lock();
        match result {
            Ok(()) => state.synced(&plan),
            Err(e) => {
                let reason = state.sync_failed(&plan, &e);
                tracing::error!(channel = "coordinator", error = %reason, "pipelined commit failed");
            }
        }
        // Published under the lock: whoever sees the sets gone (a drain) sees them durable.
        let durability = state.durability().clone();
        self.durable.send_if_modified(|d| {
            let changed = *d != durability;
            *d = durability;
            changed
        });
        drop(state);
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
        f.debug_struct("CommitPipeline").field("state", &*self.shared.lock()).finish_non_exhaustive()
    }
}

impl CommitPipeline {
    /// Wraps `inner`. With [`BlockingWork::Pool`] a dedicated thread commits; with
    /// [`BlockingWork::Inline`] each `commit` commits before it returns.
    pub fn new(inner: Arc<dyn Storage>, blocking: BlockingWork) -> Result<Self> {
        let (durable, _) = watch::channel(Durability::default());
        let shared = Arc::new(Shared {
            inner,
            observer: std::sync::OnceLock::new(),
            state: Mutex::new(PipelineState::default()),
            drained: Condvar::new(),
            durable,
        });
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
                            for_thread.commit_sets(sets);
                        }
                    })
                    .map_err(|e| Error::internal(format!("starting the commit thread: {e}")))?;
                Committer::Thread { tx: Some(tx), join: Some(join) }
            }
        };
        Ok(CommitPipeline { shared, committer: Mutex::new(committer) })
    }

    /// Has `observe` told the duration of every commit from now on (once; later calls
    /// change nothing).
    pub fn observe_commits(&self, observe: CommitObserver) {
        let _ = self.shared.observer.set(observe);
    }

    /// The sequence number of the last write set handed over (0: none yet). A batch's
    /// outputs may be released once [`CommitPipeline::durable`] reaches it.
    pub fn enqueued(&self) -> u64 {
        self.shared.lock().enqueued()
    }

    /// Follows durability; see [`Durability`].
    pub fn durable(&self) -> watch::Receiver<Durability> {
        self.shared.durable.subscribe()
    }

    /// Blocks until no write set is in flight; returns why the pipeline failed, if it did.
    pub fn drain_blocking(&self) -> Option<String> {
        let mut state = self.shared.lock();
        while state.in_flight() > 0 && state.durability().failed.is_none() {
            state = self.shared.drained.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.durability().failed.clone()
    }

    /// Clears a failure: sets still queued are dropped, and reads see only what the inner
    /// storage committed. Call it before recovering a machine from the inner storage.
    pub fn reset(&self) {
        let mut state = self.shared.lock();
        state.reset();
        // Nothing older than now will ever be reported durable: let waiters past it.
        let durability = state.durability().clone();
        self.shared.durable.send_replace(durability);
        drop(state);
        self.shared.drained.notify_all();
    }

    /// The sets in flight now, oldest first: what a reader lays over the inner storage.
    fn layers(&self) -> Result<Vec<Arc<WriteSet>>> {
        self.shared.lock().layers()
    }
}

impl HandOver for CommitPipeline {
    fn hand_over(&self, writes: Writes) -> Result<()> {
        let mut state = self.shared.lock();
        while state.in_flight() >= WRITE_SETS_IN_FLIGHT_MAX && state.durability().failed.is_none() {
            state = self.shared.drained.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        let set = state.hand_over(writes)?;
        drop(state);
        let mut committer = self.committer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &mut *committer {
            Committer::Inline => {
                drop(committer);
                self.shared.commit_sets(vec![set]);
                match self.shared.lock().durability().failed.clone() {
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

impl Storage for CommitPipeline {
    fn begin_write(&self) -> Result<Box<dyn StorageTxn + '_>> {
        let layers = self.layers()?;
        Ok(Box::new(LayeredTxn::new(&*self.shared.inner, self, layers)))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        // Layers first, then the inner storage: a set that becomes durable in between is
        // in both, with the same value.
        let found = self.shared.lock().lookup(key)?;
        match found {
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
