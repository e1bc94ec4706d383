//! A model of a durable key-value store: a `BTreeMap` whose commits are atomic and
//! durable the moment they return. It is what redb on a crash-faithful disk looks like
//! to the coordinator when no power cut tears a commit, at a fraction of the cost, so
//! long or large runs (the speed benchmark, soak sweeps) can choose it with
//! `[coordinator] storage = "model"`. Torn and reordered writes need the real thing:
//! scenarios with `power_cut` faults must keep `storage = "redb"`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rollout_core::Result;
use rollout_core::traits::{KeyValue, Storage, StorageTxn};

type Map = BTreeMap<Vec<u8>, Vec<u8>>;

/// The committed contents; clones share them (the "disk" outlives the process).
#[derive(Debug, Clone, Default)]
pub struct ModelStorage {
    committed: Arc<Mutex<Map>>,
}

impl ModelStorage {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Map> {
        // A panic while holding the lock leaves a map that is still a valid map.
        self.committed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many keys are committed.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is committed.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

fn scan_map(map: &Map, prefix: &[u8]) -> Vec<KeyValue> {
    map.range(prefix.to_vec()..)
        .take_while(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

impl Storage for ModelStorage {
    fn begin_write(&self) -> Result<Box<dyn StorageTxn + '_>> {
        Ok(Box::new(ModelTxn { store: self, writes: BTreeMap::new() }))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().get(key).cloned())
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        Ok(scan_map(&self.lock(), prefix))
    }

    fn scan_page(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>> {
        use std::ops::Bound;
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after.to_vec()),
            _ => Bound::Included(prefix.to_vec()),
        };
        Ok(self
            .lock()
            .range((start, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

/// Writes staged over the committed map: `None` is a delete.
struct ModelTxn<'s> {
    store: &'s ModelStorage,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl StorageTxn for ModelTxn<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.writes.get(key) {
            Some(staged) => Ok(staged.clone()),
            None => Ok(self.store.lock().get(key).cloned()),
        }
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.writes.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<bool> {
        let existed = self.get(key)?.is_some();
        self.writes.insert(key.to_vec(), None);
        Ok(existed)
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        let mut merged: Map = scan_map(&self.store.lock(), prefix).into_iter().collect();
        for (k, v) in self.writes.range(prefix.to_vec()..).take_while(|(k, _)| k.starts_with(prefix)) {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged.into_iter().collect())
    }

    fn commit(self: Box<Self>) -> Result<()> {
        let mut map = self.store.lock();
        for (k, v) in self.writes {
            match v {
                Some(v) => map.insert(k, v),
                None => map.remove(&k),
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_are_atomic_and_visible_and_drops_discard() {
        let store = ModelStorage::new();
        let mut txn = store.begin_write().expect("txn");
        txn.put(b"a/1", b"x").expect("put");
        txn.put(b"a/2", b"y").expect("put");
        txn.put(b"b/1", b"z").expect("put");
        assert_eq!(txn.get(b"a/1").expect("get"), Some(b"x".to_vec()));
        assert_eq!(store.get(b"a/1").expect("get"), None, "uncommitted writes are invisible outside");
        txn.commit().expect("commit");
        assert_eq!(store.scan(b"a/").expect("scan").len(), 2);
        let mut txn = store.begin_write().expect("txn");
        assert!(txn.delete(b"a/1").expect("delete"));
        txn.put(b"a/3", b"w").expect("put");
        let keys: Vec<_> = txn.scan(b"a/").expect("scan").into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![b"a/2".to_vec(), b"a/3".to_vec()]);
        drop(txn);
        assert_eq!(store.scan(b"a/").expect("scan").len(), 2, "a dropped txn changes nothing");
        let copy = store.clone();
        assert_eq!(copy.len(), 3, "clones share the committed map, like a disk outliving its process");
    }
}
