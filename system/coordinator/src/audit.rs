//! The audit log: every history event, appended to a SHA-256 hash chain in the same
//! transaction as the state change it records. Tampering with, dropping or
//! reordering an entry breaks the chain, and [`verify`] names the first bad entry.
//!
//! Storage: the entries of one batch are stored together as one block under the key
//! of the block's first entry ([`audit_key`]), so a batch adds one key however many
//! events it records. The chain runs through every entry, across blocks.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use rollout_core::history::{HistoryEvent, HistoryRecord};
use rollout_core::traits::Storage;
use rollout_core::{Error, Result};

use crate::records::{AUDIT_PREFIX, decode};

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

/// Walks the whole chain; returns the number of entries, or an error naming the first
/// entry that does not verify.
pub fn verify(storage: &dyn Storage) -> Result<u64> {
    let mut prev = [0u8; 32];
    let mut count = 0u64;
    for (key, bytes) in storage.scan(AUDIT_PREFIX)? {
        let block: Vec<AuditEntry> = decode(&key, &bytes)?;
        let first = block.first().map(|e| e.seq);
        if first.is_none() || key != audit_key(first.unwrap_or_default()) {
            return Err(Error::internal(format!(
                "audit chain broken after entry {count}: a block is empty or stored under the wrong key"
            )));
        }
        for entry in block {
            let expected_seq = count + 1;
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
                return Err(Error::internal(format!(
                    "audit chain broken at entry {}: its content was altered",
                    entry.seq
                )));
            }
            prev = entry.hash;
            count += 1;
        }
    }
    Ok(count)
}

/// Every entry, in order (for `rollout audit` and the checker).
pub fn entries(storage: &dyn Storage) -> Result<Vec<AuditEntry>> {
    let mut all = Vec::new();
    for (key, bytes) in storage.scan(AUDIT_PREFIX)? {
        let block: Vec<AuditEntry> = decode(&key, &bytes)?;
        all.extend(block);
    }
    Ok(all)
}

/// The coordinator's complete history from its audit chain, after verifying the chain:
/// one record per entry (node `coordinator`, the entry's seq and wall time), in order.
/// Complete across crashes, unlike the stream a running coordinator emits after each
/// commit.
pub fn history(storage: &dyn Storage) -> Result<Vec<HistoryRecord>> {
    verify(storage)?;
    entries(storage)?
        .into_iter()
        .map(|entry| {
            Ok(HistoryRecord {
                seq: entry.seq,
                node: "coordinator".into(),
                wall_unix_ms: entry.wall_unix_ms,
                event: entry.event()?,
            })
        })
        .collect()
}
