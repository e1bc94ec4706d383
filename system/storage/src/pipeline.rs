//! Commit pipelining as a sans-IO state machine: the coordinator applies its next
//! batch while the last one syncs.
//!
//! The machine writes through a storage whose transactions do not wait for the disk:
//! a commit hands the transaction's writes (a *write set*) over, and a committer later
//! applies every set that queued up meanwhile to the inner storage in one transaction
//! (one fsync). Reads see the sets still on their way (newest first) over what the inner
//! storage holds, so the machine's view is exactly "everything it committed".
//!
//! [`PipelineState`] is the bookkeeping, with explicit inputs: a write set handed over
//! ([`PipelineState::hand_over`]), a sync begun ([`PipelineState::sync_plan`]), done
//! ([`PipelineState::synced`]) or failed ([`PipelineState::sync_failed`]), and a
//! [`PipelineState::reset`] after a failure. The transport's commit thread and the
//! simulator both drive it; [`PipelinedStorage`] is the storage over it that the
//! simulator uses (the transport's `CommitPipeline` adds a thread and back-pressure).
//!
//! The release rule that makes it safe, for every driver: a batch's outputs (sends,
//! replies, history events) are held under the ticket [`PipelineState::enqueued`] had
//! once the batch was applied, and leave only once [`Durability::seq`] has reached it
//! ([`Releases`]). A batch that wrote nothing gets the ticket of the last one that did,
//! so it waits for exactly the writes its outputs could depend on. A failed sync
//! poisons the pipeline: the sets queued behind it are dropped (they were built on its
//! writes), nothing held is ever released, and the driver recovers its machine from
//! the inner storage.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use rollout_core::traits::{KeyValue, Storage, StorageTxn};
use rollout_core::{Error, Result};

/// Write sets a driver lets queue behind the disk before it waits (back-pressure on
/// the machine).
pub const WRITE_SETS_IN_FLIGHT_MAX: usize = 4;

/// Each written key's latest value (`None`: deleted), in key order.
pub type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// One transaction's writes, handed over to the pipeline.
#[derive(Debug)]
pub struct WriteSet {
    /// Its place in the pipeline, from 1.
    pub seq: u64,
    /// Sets from before the last [`PipelineState::reset`] are dropped, not applied.
    epoch: u64,
    /// The writes.
    pub writes: Writes,
}

/// How far the inner storage has come.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Durability {
    /// Every write set up to this sequence number is durable.
    pub seq: u64,
    /// Why the pipeline is poisoned, if it is.
    pub failed: Option<String>,
}

/// A sync to run: these sets, in order, in one inner transaction.
#[derive(Debug)]
pub struct SyncPlan {
    /// The sets, oldest first.
    pub sets: Vec<Arc<WriteSet>>,
    epoch: u64,
}

impl SyncPlan {
    /// The newest set's sequence number.
    pub fn last(&self) -> u64 {
        self.sets.last().map_or(0, |s| s.seq)
    }

    /// Applies the plan's sets to `inner` in one transaction and commits it (the
    /// fsync); the result goes back as [`PipelineState::synced`] or
    /// [`PipelineState::sync_failed`].
    pub fn apply(&self, inner: &dyn Storage) -> Result<()> {
        let mut txn = inner.begin_write()?;
        for set in &self.sets {
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
    }
}

/// The pipeline's bookkeeping; see the module docs.
#[derive(Debug, Default)]
pub struct PipelineState {
    /// Sets handed over and not yet durable, oldest first.
    in_flight: VecDeque<Arc<WriteSet>>,
    /// The last sequence number given out.
    enqueued: u64,
    epoch: u64,
    /// Sets up to this one are in a sync now (0: none).
    syncing_through: u64,
    durability: Durability,
}

impl PipelineState {
    /// The last sequence number handed out (0: none yet): a batch's ticket.
    pub fn enqueued(&self) -> u64 {
        self.enqueued
    }

    /// Sets handed over and not yet durable.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether a sync is under way.
    pub fn syncing(&self) -> bool {
        self.syncing_through > 0
    }

    /// What is durable, and whether the pipeline failed.
    pub fn durability(&self) -> &Durability {
        &self.durability
    }

    fn refuse_if_failed(&self) -> Result<()> {
        match &self.durability.failed {
            Some(reason) => Err(Error::internal(format!("storage pipeline failed ({reason}); recover from storage"))),
            None => Ok(()),
        }
    }

    /// The sets in flight now, oldest first: what a reader lays over the inner storage.
    pub fn layers(&self) -> Result<Vec<Arc<WriteSet>>> {
        self.refuse_if_failed()?;
        Ok(self.in_flight.iter().cloned().collect())
    }

    /// The value of `key` in the sets in flight (newest wins): `None` if none wrote it,
    /// `Some(None)` if the newest that did deleted it. Refused while poisoned.
    pub fn lookup(&self, key: &[u8]) -> Result<Option<Option<Vec<u8>>>> {
        self.refuse_if_failed()?;
        Ok(self.in_flight.iter().rev().find_map(|set| set.writes.get(key).cloned()))
    }

    /// Input: a transaction's writes are handed over. Refused while poisoned.
    pub fn hand_over(&mut self, writes: Writes) -> Result<Arc<WriteSet>> {
        self.refuse_if_failed()?;
        self.enqueued += 1;
        let set = Arc::new(WriteSet { seq: self.enqueued, epoch: self.epoch, writes });
        self.in_flight.push_back(Arc::clone(&set));
        Ok(set)
    }

    /// Input: a committer is free. Of `offered` (the sets it took, in order; all in
    /// flight and not yet syncing when `None`), the ones to apply now: those of the
    /// current epoch. `None`: nothing to do (poisoned, or nothing live).
    pub fn sync_plan(&mut self, offered: Option<Vec<Arc<WriteSet>>>) -> Option<SyncPlan> {
        if self.durability.failed.is_some() {
            return None;
        }
        let syncing_through = self.syncing_through;
        let offered =
            offered.unwrap_or_else(|| self.in_flight.iter().filter(|s| s.seq > syncing_through).cloned().collect());
        let sets: Vec<Arc<WriteSet>> = offered.into_iter().filter(|s| s.epoch == self.epoch).collect();
        let last = sets.last()?.seq;
        self.syncing_through = last;
        Some(SyncPlan { sets, epoch: self.epoch })
    }

    /// Input: `plan` is durable. Its sets leave the flight (unless a reset came first:
    /// then what it did is the new baseline, and nothing changes).
    pub fn synced(&mut self, plan: &SyncPlan) {
        let last = plan.last();
        if plan.epoch != self.epoch {
            return;
        }
        // Durable first, out of flight second: a reader in between lays sets over
        // storage that already holds them, with the same values.
        self.durability.seq = self.durability.seq.max(last);
        while self.in_flight.front().is_some_and(|set| set.seq <= last) {
            self.in_flight.pop_front();
        }
        if self.syncing_through <= last {
            self.syncing_through = 0;
        }
    }

    /// Input: `plan`'s sync failed. The pipeline is poisoned: everything in flight,
    /// built on the failed writes, is dropped; held outputs are never released.
    pub fn sync_failed(&mut self, plan: &SyncPlan, error: &Error) -> String {
        let reason = format!("committing write set {}: {error}", plan.last());
        if plan.epoch == self.epoch {
            self.durability.failed = Some(reason.clone());
            self.in_flight.clear();
            self.syncing_through = 0;
        }
        reason
    }

    /// Input: the driver recovers. Sets still queued are dropped, reads see only what
    /// the inner storage holds, and every ticket given out so far counts as settled.
    pub fn reset(&mut self) {
        self.epoch += 1;
        self.in_flight.clear();
        self.syncing_through = 0;
        self.durability = Durability { seq: self.enqueued, failed: None };
    }
}

/// Outputs held until their batch's writes are durable: one release rule for every
/// driver.
#[derive(Debug)]
pub struct Releases<T> {
    /// Oldest first; tickets never decrease.
    held: VecDeque<(u64, T)>,
}

impl<T> Default for Releases<T> {
    fn default() -> Self {
        Releases { held: VecDeque::new() }
    }
}

impl<T> Releases<T> {
    /// Holds `outputs` of a batch applied when [`PipelineState::enqueued`] was `ticket`.
    pub fn hold(&mut self, ticket: u64, outputs: T) {
        self.held.push_back((ticket, outputs));
    }

    /// Whether anything is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// What may leave now, in order; `Err` with the reason when the pipeline failed
    /// (nothing leaves: the driver recovers and calls [`Releases::clear`]).
    pub fn release(&mut self, durability: &Durability) -> std::result::Result<Vec<T>, String> {
        if let Some(reason) = &durability.failed {
            return Err(reason.clone());
        }
        let mut out = Vec::new();
        while self.held.front().is_some_and(|(ticket, _)| *ticket <= durability.seq) {
            if let Some((_, outputs)) = self.held.pop_front() {
                out.push(outputs);
            }
        }
        Ok(out)
    }

    /// Forgets everything held (after a failure: none of it may ever leave).
    pub fn clear(&mut self) -> usize {
        let n = self.held.len();
        self.held.clear();
        n
    }
}

/// The value of `key` in `layers` (newest wins), or `None` if no layer wrote it.
pub fn layered(layers: &[Arc<WriteSet>], key: &[u8]) -> Option<Option<Vec<u8>>> {
    layers.iter().rev().find_map(|set| set.writes.get(key).cloned())
}

/// Lays `writes` over `pairs` (all under `prefix`), in key order.
pub fn overlay_scan(pairs: Vec<KeyValue>, overlays: &[&Writes], prefix: &[u8]) -> Vec<KeyValue> {
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
pub fn overlay_scan_page(
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

/// Where a layered transaction's writes go when it commits.
pub trait HandOver {
    /// Takes a committed transaction's writes (never empty).
    fn hand_over(&self, writes: Writes) -> Result<()>;
}

/// A transaction over a pipeline: its writes, over the sets in flight when it began
/// (no other set can start while it is open: the machine is the only writer).
pub struct LayeredTxn<'p> {
    inner: &'p dyn Storage,
    sink: &'p dyn HandOver,
    layers: Vec<Arc<WriteSet>>,
    writes: Writes,
}

impl std::fmt::Debug for LayeredTxn<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayeredTxn").field("layers", &self.layers.len()).field("writes", &self.writes.len()).finish()
    }
}

impl<'p> LayeredTxn<'p> {
    /// A transaction reading `layers` over `inner`, handing its writes to `sink`.
    pub fn new(inner: &'p dyn Storage, sink: &'p dyn HandOver, layers: Vec<Arc<WriteSet>>) -> Self {
        LayeredTxn { inner, sink, layers, writes: Writes::new() }
    }
}

impl StorageTxn for LayeredTxn<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(value) = self.writes.get(key) {
            return Ok(value.clone());
        }
        match layered(&self.layers, key) {
            Some(value) => Ok(value),
            None => self.inner.get(key),
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
        let pairs = self.inner.scan(prefix)?;
        let mut overlays: Vec<&Writes> = self.layers.iter().map(|set| &set.writes).collect();
        overlays.push(&self.writes);
        Ok(overlay_scan(pairs, &overlays, prefix))
    }

    fn commit(self: Box<Self>) -> Result<()> {
        if self.writes.is_empty() {
            return Ok(());
        }
        self.sink.hand_over(self.writes)
    }
}

/// A pipelined [`Storage`] with no committer of its own: the driver asks for a
/// [`SyncPlan`] when its (simulated) disk is free, applies it when the sync is done,
/// and reports back. The simulator's coordinator host runs on it.
pub struct PipelinedStorage {
    inner: Arc<dyn Storage>,
    state: Mutex<PipelineState>,
}

impl std::fmt::Debug for PipelinedStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelinedStorage").field("state", &*self.state()).finish_non_exhaustive()
    }
}

impl PipelinedStorage {
    /// Over `inner`, with nothing in flight.
    pub fn new(inner: Arc<dyn Storage>) -> Self {
        PipelinedStorage { inner, state: Mutex::new(PipelineState::default()) }
    }

    /// The bookkeeping, to drive.
    pub fn state(&self) -> MutexGuard<'_, PipelineState> {
        // Every update is a single call on the state: a panic cannot leave it torn.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The storage the sets are applied to.
    pub fn inner(&self) -> &dyn Storage {
        &*self.inner
    }

    /// Applies `plan` to the inner storage and reports the outcome to the state;
    /// `Err` with the reason when it failed (the pipeline is poisoned then).
    pub fn finish_sync(&self, plan: &SyncPlan) -> std::result::Result<(), String> {
        match plan.apply(&*self.inner) {
            Ok(()) => {
                self.state().synced(plan);
                Ok(())
            }
            Err(e) => Err(self.state().sync_failed(plan, &e)),
        }
    }
}

impl HandOver for PipelinedStorage {
    fn hand_over(&self, writes: Writes) -> Result<()> {
        self.state().hand_over(writes).map(|_| ())
    }
}

impl Storage for PipelinedStorage {
    fn begin_write(&self) -> Result<Box<dyn StorageTxn + '_>> {
        let layers = self.state().layers()?;
        Ok(Box::new(LayeredTxn::new(&*self.inner, self, layers)))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let found = self.state().lookup(key)?;
        match found {
            Some(value) => Ok(value),
            None => self.inner.get(key),
        }
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        let layers = self.state().layers()?;
        let pairs = self.inner.scan(prefix)?;
        let overlays: Vec<&Writes> = layers.iter().map(|set| &set.writes).collect();
        Ok(overlay_scan(pairs, &overlays, prefix))
    }

    fn scan_page(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>> {
        let layers = self.state().layers()?;
        let overlays: Vec<&Writes> = layers.iter().map(|set| &set.writes).collect();
        overlay_scan_page(&*self.inner, &overlays, prefix, after, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CrashMode, MemDisk, RedbStorage};

    fn put(p: &PipelinedStorage, key: &str, value: &str) {
        let mut txn = p.begin_write().expect("begin");
        txn.put(key.as_bytes(), value.as_bytes()).expect("put");
        txn.commit().expect("commit");
    }

    #[test]
    fn batches_overlap_their_syncs_and_outputs_wait_for_their_own_writes() {
        let disk = MemDisk::new();
        let p = PipelinedStorage::new(Arc::new(RedbStorage::open_in_memory(&disk).expect("open")));
        let mut releases = Releases::default();
        put(&p, "a", "1");
        releases.hold(p.state().enqueued(), "batch 1");
        let first = p.state().sync_plan(None).expect("a sync to run");
        // Batch 2 is applied while batch 1 syncs, and reads it.
        assert_eq!(p.get(b"a").expect("get").as_deref(), Some(&b"1"[..]));
        put(&p, "b", "2");
        releases.hold(p.state().enqueued(), "batch 2");
        // A batch that wrote nothing waits for the writes before it.
        releases.hold(p.state().enqueued(), "read-only batch 3");
        assert!(p.state().syncing(), "batch 1 is still syncing");
        assert_eq!(releases.release(p.state().durability()).expect("ok"), Vec::<&str>::new());
        p.finish_sync(&first).expect("syncs");
        assert_eq!(releases.release(p.state().durability()).expect("ok"), ["batch 1"]);
        let second = p.state().sync_plan(None).expect("batch 2's sync");
        assert_eq!(second.sets.iter().map(|s| s.seq).collect::<Vec<_>>(), [2]);
        p.finish_sync(&second).expect("syncs");
        assert_eq!(releases.release(p.state().durability()).expect("ok"), ["batch 2", "read-only batch 3"]);
        disk.crash(CrashMode::LoseUnsynced);
        let back = RedbStorage::open_in_memory(&disk).expect("reopen");
        assert_eq!(back.get(b"b").expect("get").as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn a_failed_sync_drops_what_was_built_on_it_and_releases_nothing_after_it() {
        let disk = MemDisk::new();
        let inner: Arc<dyn Storage> = Arc::new(RedbStorage::open_in_memory(&disk).expect("open"));
        let p = PipelinedStorage::new(Arc::clone(&inner));
        let mut releases = Releases::default();
        put(&p, "a", "1");
        releases.hold(p.state().enqueued(), 1);
        let plan = p.state().sync_plan(None).expect("plan");
        put(&p, "b", "built on a");
        releases.hold(p.state().enqueued(), 2);
        let error = Error::internal("injected: fsync failed");
        let reason = p.state().sync_failed(&plan, &error);
        assert!(reason.contains("write set 1"), "{reason}");
        assert!(p.begin_write().is_err(), "poisoned until reset");
        assert_eq!(releases.release(p.state().durability()), Err(reason));
        assert_eq!(releases.clear(), 2);
        p.state().reset();
        assert_eq!(p.get(b"a").expect("get"), None);
        assert_eq!(p.get(b"b").expect("get"), None);
        assert!(p.state().sync_plan(None).is_none(), "the dropped sets are never applied");
        put(&p, "c", "after reset");
        let plan = p.state().sync_plan(None).expect("plan");
        p.finish_sync(&plan).expect("syncs");
        assert_eq!(inner.get(b"b").expect("get"), None);
        assert_eq!(inner.get(b"c").expect("get").as_deref(), Some(&b"after reset"[..]));
    }
}
