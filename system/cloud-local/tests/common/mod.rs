//! A minimal in-memory [`Storage`] for the queue tests: committed state in a
//! `BTreeMap`, one writer at a time, and a switch that makes commits fail so tests can
//! check that a failed push leaves nothing behind.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use rollout_core::traits::{KeyValue, Storage, StorageTxn};
use rollout_core::{Error, Result, RetryHint};

/// Committed pairs, shared by every queue opened on it (a "restart" reopens on the
/// same `MemStorage`).
#[derive(Debug, Default)]
pub struct MemStorage {
    committed: Mutex<BTreeMap<Vec<u8>, Vec<u8>>>,
    writer: Mutex<()>,
    fail_commits: AtomicBool,
}

impl MemStorage {
    /// From now on, every commit fails (and writes nothing) while `fail` is true.
    pub fn fail_commits(&self, fail: bool) {
        self.fail_commits.store(fail, Ordering::SeqCst);
    }

    /// Committed keys under `prefix`, as text.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.scan(prefix.as_bytes())
            .expect("scan")
            .into_iter()
            .map(|(k, _)| String::from_utf8(k).expect("utf-8 key"))
            .collect()
    }

    /// Writes a raw pair, bypassing any queue (to plant foreign data).
    pub fn put_raw(&self, key: &[u8], value: &[u8]) {
        self.lock().insert(key.to_vec(), value.to_vec());
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Vec<u8>, Vec<u8>>> {
        self.committed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Storage for MemStorage {
    fn begin_write(&self) -> Result<Box<dyn StorageTxn + '_>> {
        let writer = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(Box::new(MemTxn { storage: self, _writer: writer, pending: BTreeMap::new() }))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().get(key).cloned())
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        Ok(self.lock().iter().filter(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    fn scan_page(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>> {
        let mut page = self.scan(prefix)?;
        page.retain(|(k, _)| after.is_none_or(|a| k.as_slice() > a));
        page.truncate(limit);
        Ok(page)
    }
}

struct MemTxn<'a> {
    storage: &'a MemStorage,
    _writer: MutexGuard<'a, ()>,
    /// `None` marks a delete.
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl StorageTxn for MemTxn<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.pending.get(key) {
            Some(value) => Ok(value.clone()),
            None => self.storage.get(key),
        }
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.pending.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<bool> {
        let existed = self.get(key)?.is_some();
        self.pending.insert(key.to_vec(), None);
        Ok(existed)
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self.storage.scan(prefix)?.into_iter().collect();
        for (k, v) in self.pending.iter().filter(|(k, _)| k.starts_with(prefix)) {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }

    fn commit(self: Box<Self>) -> Result<()> {
        if self.storage.fail_commits.load(Ordering::SeqCst) {
            return Err(Error::transient("injected commit failure", RetryHint::Backoff));
        }
        let mut committed = self.storage.lock();
        for (k, v) in self.pending {
            match v {
                Some(v) => committed.insert(k, v),
                None => committed.remove(&k),
            };
        }
        Ok(())
    }
}
