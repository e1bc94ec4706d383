//! The audit log: every history event, appended to a SHA-256 hash chain in the same
//! transaction as the state change it records. Tampering with, dropping or
//! reordering an entry breaks the chain, and [`verify`] names the first bad entry.
//!
//! Storage: the entries of one batch are stored together as blocks of at most
//! [`AUDIT_BLOCK_ENTRIES_MAX`], each under the key of its first entry ([`audit_key`]),
//! so a batch adds a key per few hundred events, and no value is large. The chain runs
//! through every entry, across blocks.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use rollout_core::history::{HistoryEvent, HistoryRecord};
use rollout_core::traits::Storage;
use rollout_core::{Error, Result};

use crate::records::{AUDIT_BASE, AUDIT_PREFIX, decode, for_each_page, load};

/// Most entries stored in one block.
pub const AUDIT_BLOCK_ENTRIES_MAX: usize = 256;

/// One link of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// The coordinator's wall clock when the event was recorded.
    pub wall_unix_ms: u64,
    /// The event, as JSON (the history format).
    pub event_json: String,
    /// The previous entry's hash (zeros for the first).
    pub prev: [u8; 32],
    /// `SHA-256(prev ‖ seq ‖ wall_unix_ms ‖ event_json)`.
    pub hash: [u8; 32],
}

impl AuditEntry {
    /// Builds the entry that follows `prev`.
    pub fn new(seq: u64, wall_unix_ms: u64, event: &HistoryEvent, prev: [u8; 32]) -> Self {
        let event_json = serde_json::to_string(event).expect("history events always encode");
        let hash = chain_hash(&prev, seq, wall_unix_ms, &event_json);
        AuditEntry { seq, wall_unix_ms, event_json, prev, hash }
    }

    /// The event, decoded.
    pub fn event(&self) -> Result<HistoryEvent> {
        serde_json::from_str(&self.event_json)
            .map_err(|e| Error::internal(format!("audit entry {} holds an undecodable event: {e}", self.seq)))
    }
}

fn chain_hash(prev: &[u8; 32], seq: u64, wall_unix_ms: u64, event_json: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(wall_unix_ms.to_be_bytes());
    h.update(event_json.as_bytes());
    h.finalize().into()
}

/// The storage key of the block whose first entry is `seq`.
pub fn audit_key(seq: u64) -> Vec<u8> {
    [AUDIT_PREFIX, &seq.to_be_bytes()].concat()
}

/// Where the kept part of the chain starts: the last entry deleted by the audit
/// retention (`tasks.job_retention`), so the entries after it still verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AuditBase {
    /// The seq of the last deleted entry (0: nothing was deleted).
    pub seq: u64,
    /// Its hash (zeros: nothing was deleted).
    pub hash: [u8; 32],
}

/// The chain's base as stored (the default when nothing was ever deleted).
pub fn base(storage: &dyn Storage) -> Result<AuditBase> {
    Ok(load(storage, AUDIT_BASE)?.unwrap_or_default())
}

/// Calls `f` with every kept entry, in order, a page of blocks at a time (bounded
/// memory however long the chain).
pub fn for_each_entry(storage: &dyn Storage, mut f: impl FnMut(AuditEntry) -> Result<()>) -> Result<()> {
    for_each_page(storage, AUDIT_PREFIX, |page| {
        for (key, bytes) in page {
            let block: Vec<AuditEntry> = decode(&key, &bytes)?;
            match block.first() {
                Some(first) if key == audit_key(first.seq) => {}
                _ => {
                    return Err(Error::internal(format!(
                        "audit chain broken: the block under {:?} is empty or stored under the wrong key",
                        String::from_utf8_lossy(&key)
                    )));
                }
            }
            for entry in block {
                f(entry)?;
            }
        }
        Ok(())
    })
}

/// Walks the whole kept chain from its base; returns the number of entries, or an
/// error naming the first entry that does not verify.
pub fn verify(storage: &dyn Storage) -> Result<u64> {
    let base = base(storage)?;
    let mut prev = base.hash;
    let mut count = 0u64;
    for_each_entry(storage, |entry| {
        let expected_seq = base.seq + count + 1;
        if entry.seq != expected_seq {
            return Err(Error::internal(format!(
                "audit chain broken: expected entry {expected_seq}, found entry {} (an entry is missing or misplaced)",
                entry.seq
            )));
        }
        if entry.prev != prev {
            return Err(Error::internal(format!(
                "audit chain broken at entry {}: it does not link to its predecessor",
                entry.seq
            )));
        }
        if chain_hash(&entry.prev, entry.seq, entry.wall_unix_ms, &entry.event_json) != entry.hash {
            return Err(Error::internal(format!("audit chain broken at entry {}: its content was altered", entry.seq)));
        }
        prev = entry.hash;
        count += 1;
        Ok(())
    })?;
    Ok(count)
}

/// Blocks probed (one lookup each) for the start of the block holding an entry.
const BLOCK_PROBES_MAX: u64 = 1 << 20;

/// Up to `max` kept entries after `after_seq`, in order: what a follower that has seen
/// everything up to `after_seq` reads next. `None` when the entries just after it were
/// deleted by the audit retention (the chain's base is past it).
pub fn entries_after(storage: &dyn Storage, after_seq: u64, max: usize) -> Result<Option<Vec<AuditEntry>>> {
    let base = base(storage)?;
    if after_seq < base.seq {
        return Ok(None);
    }
    // Blocks are stored under the seq of their first entry: the one holding
    // after_seq + 1 starts at the highest stored seq at or below it.
    let mut start = None;
    let lowest = (base.seq + 1).max((after_seq + 1).saturating_sub(BLOCK_PROBES_MAX));
    for k in (lowest..=after_seq + 1).rev() {
        if storage.get(&audit_key(k))?.is_some() {
            start = Some(k);
            break;
        }
    }
    let mut after = start.map(|k| audit_key(k - 1));
    let mut out = Vec::new();
    loop {
        let page = storage.scan_page(AUDIT_PREFIX, after.as_deref(), 64)?;
        let full = page.len() == 64;
        after = page.last().map(|(k, _)| k.clone());
        for (key, bytes) in page {
            let block: Vec<AuditEntry> = decode(&key, &bytes)?;
            for entry in block.into_iter().filter(|e| e.seq > after_seq) {
                out.push(entry);
                if out.len() >= max {
                    return Ok(Some(out));
                }
            }
        }
        if !full {
            return Ok(Some(out));
        }
    }
}

/// Every kept entry, in order (for tests and small chains; see [`for_each_entry`]).
pub fn entries(storage: &dyn Storage) -> Result<Vec<AuditEntry>> {
    let mut all = Vec::new();
    for_each_entry(storage, |entry| {
        all.push(entry);
        Ok(())
    })?;
    Ok(all)
}

/// An entry as a history record (node `coordinator`, the entry's seq and wall time).
pub fn record_of(entry: &AuditEntry) -> Result<HistoryRecord> {
    Ok(HistoryRecord {
        seq: entry.seq,
        node: "coordinator".into(),
        wall_unix_ms: entry.wall_unix_ms,
        wall_unix_us: None,
        event: entry.event()?,
    })
}

/// The coordinator's history from its audit chain, after verifying the chain: one
/// record per kept entry, in order. Complete across crashes, unlike the stream a
/// running coordinator emits after each commit (and complete from the chain's base:
/// entries older than `tasks.job_retention` are deleted).
pub fn history(storage: &dyn Storage) -> Result<Vec<HistoryRecord>> {
    verify(storage)?;
    let mut records = Vec::new();
    for_each_entry(storage, |entry| {
        records.push(record_of(&entry)?);
        Ok(())
    })?;
    Ok(records)
}
