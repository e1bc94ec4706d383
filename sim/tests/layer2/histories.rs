//! Reading the histories a layer-2 run recorded: what the hand-written stories look for.

use std::collections::{BTreeMap, BTreeSet};

use rollout_core::TaskId;
use rollout_core::history::{HistoryEvent, HistoryRecord};

/// Whether `event` concerns `worker` and matches `kind`.
pub fn is(event: &HistoryEvent, worker: &str, kind: Kind) -> bool {
    match (kind, event) {
        (Kind::Registered, HistoryEvent::Registered { worker: w, .. })
        | (Kind::DeclaredFailed, HistoryEvent::DeclaredFailed { worker: w, .. })
        | (Kind::SelfFenced, HistoryEvent::SelfFenced { worker: w, .. })
        | (Kind::Committed, HistoryEvent::Committed { worker: w, .. }) => w.as_str() == worker,
        _ => false,
    }
}

/// The kinds of event the tests look for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Registered,
    DeclaredFailed,
    SelfFenced,
    Committed,
}

/// How many events of `kind` concern `worker`.
pub fn count(history: &[HistoryRecord], worker: &str, kind: Kind) -> usize {
    history.iter().filter(|r| is(&r.event, worker, kind)).count()
}

/// The position of the first event of `kind` for `worker` at or after `from`.
pub fn position_from(history: &[HistoryRecord], from: usize, worker: &str, kind: Kind) -> Option<usize> {
    history.iter().skip(from).position(|r| is(&r.event, worker, kind)).map(|p| p + from)
}

/// The tasks `worker` held (its latest lease, uncommitted) in `history[..end]`.
pub fn held_by(history: &[HistoryRecord], end: usize, worker: &str) -> BTreeSet<TaskId> {
    let mut holder: BTreeMap<TaskId, &str> = BTreeMap::new();
    for r in &history[..end] {
        match &r.event {
            HistoryEvent::Leased { task, worker: w, .. } => {
                holder.insert(*task, w.as_str());
            }
            HistoryEvent::Committed { task, .. } | HistoryEvent::Requeued { task, .. } => {
                holder.remove(task);
            }
            _ => {}
        }
    }
    holder.into_iter().filter(|(_, w)| *w == worker).map(|(t, _)| t).collect()
}

/// Who committed each task.
pub fn committers(history: &[HistoryRecord]) -> BTreeMap<TaskId, String> {
    history
        .iter()
        .filter_map(|r| match &r.event {
            HistoryEvent::Committed { task, worker, .. } => Some((*task, worker.to_string())),
            _ => None,
        })
        .collect()
}

/// A fingerprint of a merged history: SHA-256 over every record's JSON line (node,
/// position, wall stamp and event).
pub fn fingerprint(merged: &[HistoryRecord]) -> String {
    let mut lines = Vec::new();
    for r in merged {
        lines.extend(serde_json::to_vec(r).expect("a record encodes"));
        lines.push(b'\n');
    }
    sha256_hex(&lines)
}

/// SHA-256 of `bytes`, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}
