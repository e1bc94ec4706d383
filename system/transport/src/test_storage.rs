//! Test storage with faults on demand: commits that wait at a gate (a disk that has not
//! synced yet) and commits that fail.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use rollout_core::traits::{KeyValue, Storage, StorageTxn};
use rollout_core::{Error, Result};
use rollout_storage::{MemDisk, RedbStorage};

/// A gate commits wait at while it is shut; counts the commits waiting.
#[derive(Default)]
pub(crate) struct Gate {
    state: Mutex<(bool, usize)>,
    changed: Condvar,
}

/// Opens the gate when dropped, so a failing assertion cannot leave the commit
/// thread (which the driver joins when it is dropped) waiting forever.
pub(crate) struct OpenOnDrop(pub(crate) Arc<Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.set_shut(false);
    }
}

impl Gate {
    pub(crate) fn set_shut(&self, shut: bool) {
        self.state.lock().expect("gate").0 = shut;
        self.changed.notify_all();
    }
    pub(crate) fn waiting(&self) -> usize {
        self.state.lock().expect("gate").1
    }
    fn pass(&self) {
        let mut state = self.state.lock().expect("gate");
        state.1 += 1;
        while state.0 {
            state = self.changed.wait(state).expect("gate");
        }
        state.1 -= 1;
    }
}

/// Storage whose commits wait at a gate (a disk that has not synced yet), and fail
/// while `fail` is set.
pub(crate) struct GatedStorage {
    inner: RedbStorage,
    gate: Arc<Gate>,
    fail: Arc<AtomicBool>,
}

struct GatedTxn<'a> {
    txn: Box<dyn StorageTxn + 'a>,
    gate: Arc<Gate>,
    fail: bool,
}

impl GatedStorage {
    pub(crate) fn new() -> (Self, Arc<Gate>, Arc<AtomicBool>) {
        let disk = MemDisk::new();
        let gate = Arc::new(Gate::default());
        let fail = Arc::new(AtomicBool::new(false));
        let inner = RedbStorage::open_in_memory(&disk).expect("open");
        (GatedStorage { inner, gate: Arc::clone(&gate), fail: Arc::clone(&fail) }, gate, fail)
    }
}

impl Storage for GatedStorage {
    fn begin_write(&self) -> Result<Box<dyn StorageTxn + '_>> {
        let fail = self.fail.load(Ordering::SeqCst);
        Ok(Box::new(GatedTxn { txn: self.inner.begin_write()?, gate: Arc::clone(&self.gate), fail }))
    }
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.inner.get(key)
    }
    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        self.inner.scan(prefix)
    }
    fn scan_page(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>> {
        self.inner.scan_page(prefix, after, limit)
    }
}

impl StorageTxn for GatedTxn<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.txn.get(key)
    }
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.txn.put(key, value)
    }
    fn delete(&mut self, key: &[u8]) -> Result<bool> {
        self.txn.delete(key)
    }
    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        self.txn.scan(prefix)
    }
    fn commit(self: Box<Self>) -> Result<()> {
        self.gate.pass();
        if self.fail {
            return Err(Error::internal("injected commit failure"));
        }
        self.txn.commit()
    }
}
