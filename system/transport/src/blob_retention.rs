//! Blob retention: a blob no held task names is deleted once it has gone unused for
//! `tasks.job_retention` (counted from its upload, or from the last submit that named
//! it), so the store follows the jobs that use it instead of only growing. A blob a
//! queued, running or finished-but-kept job names is never deleted: the sweep reads
//! every held task's inputs (`c/ti/`) from storage first.

use std::time::{Duration, SystemTime};

use rollout_cloud_local::FsObjectStore;
use rollout_core::Result;
use rollout_core::traits::Storage;

/// What a sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Blobs kept (named by a held task, or used within the retention).
    pub kept: usize,
    /// Blobs deleted.
    pub removed: usize,
    /// Their bytes.
    pub removed_bytes: u64,
}

/// How often the coordinator sweeps.
pub const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// Deletes the blobs of `store` that no task in `storage` names and that nobody used for
/// `keep_for` before `now`.
pub fn sweep(store: &FsObjectStore, storage: &dyn Storage, keep_for: Duration, now: SystemTime) -> Result<Sweep> {
    let referenced = rollout_coordinator::referenced_blobs(storage)?;
    let mut report = Sweep::default();
    for meta in store.list()? {
        let id = meta.content_id;
        let used = store.last_used(&id).unwrap_or(now);
        let idle = now.duration_since(used).unwrap_or_default();
        if referenced.contains(&id) || idle < keep_for {
            report.kept += 1;
            continue;
        }
        if store.remove(&id)? {
            report.removed += 1;
            report.removed_bytes += meta.size_bytes;
            tracing::info!(channel = "blobs", event = "blob_deleted", content_id = %id, size_bytes = meta.size_bytes,
                idle_s = idle.as_secs(), "blob deleted: no held task names it, unused for tasks.job_retention");
        }
    }
    Ok(report)
}
