//! A worker's cache of the blobs its tasks read: each blob fetched once (FetchBlob,
//! streamed and hash-verified into a tmp file, then renamed into place), however many
//! of the worker's tasks name it, kept under a size bound with least-recently-used
//! eviction of blobs no running task holds. Files are named by content id, so the cache
//! survives a worker restart (an upload cut by a crash is only a tmp file, removed at
//! open).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rollout_core::ContentId;
use rollout_core::ids::ContentHasher;
use rollout_proto::transport as pb;
use rollout_proto::transport::coordinator_client::CoordinatorClient;
use tonic::transport::Channel;

use crate::metrics::WorkerMetrics;

const TMP_SUFFIX: &str = ".partial";

#[derive(Debug, Default)]
struct Entry {
    size: u64,
    /// Higher: used more recently.
    last_use: u64,
    /// Running tasks holding it (never evicted while above 0).
    holders: u32,
}

#[derive(Debug, Default)]
struct State {
    entries: BTreeMap<ContentId, Entry>,
    total: u64,
    clock: u64,
    /// One lock per blob being fetched, so tasks that need it at once fetch it once.
    fetching: BTreeMap<ContentId, Arc<tokio::sync::Mutex<()>>>,
}

/// The cache; cheap to share.
#[derive(Debug)]
pub struct BlobCache {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    metrics: Arc<WorkerMetrics>,
}

impl BlobCache {
    /// Opens (creating) the cache in `dir`, keeping at most `max_bytes` of blobs no task
    /// holds. What a previous run left is kept (oldest first to go).
    pub fn open(dir: &Path, max_bytes: u64, metrics: Arc<WorkerMetrics>) -> std::io::Result<BlobCache> {
        std::fs::create_dir_all(dir)?;
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(TMP_SUFFIX) {
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Ok(id) = name.parse::<ContentId>() else { continue };
            let meta = entry.metadata()?;
            found.push((meta.modified().ok(), id, meta.len()));
        }
        found.sort();
        let mut state = State::default();
        for (_, id, size) in found {
            state.clock += 1;
            state.total += size;
            state.entries.insert(id, Entry { size, last_use: state.clock, holders: 0 });
        }
        metrics.set_blob_cache_bytes(state.total);
        Ok(BlobCache { dir: dir.to_path_buf(), max_bytes, state: Mutex::new(state), metrics })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path(&self, id: &ContentId) -> PathBuf {
        self.dir.join(id.to_hex())
    }

    /// The local file of blob `id`, fetched first if it is not here; the caller holds
    /// it (it is not evicted) until [`BlobCache::release`].
    pub async fn hold(&self, id: ContentId, client: &mut CoordinatorClient<Channel>) -> Result<PathBuf, String> {
        let gate = {
            let mut s = self.lock();
            if Self::hold_present(&mut s, &id) {
                return Ok(self.path(&id));
            }
            Arc::clone(s.fetching.entry(id).or_default())
        };
        let _fetching = gate.lock().await;
        // Another task may have fetched it while this one waited.
        if Self::hold_present(&mut self.lock(), &id) {
            return Ok(self.path(&id));
        }
        let size = self.fetch(id, client).await?;
        let mut s = self.lock();
        s.fetching.remove(&id);
        s.clock += 1;
        let clock = s.clock;
        s.total += size;
        s.entries.insert(id, Entry { size, last_use: clock, holders: 1 });
        self.evict(&mut s);
        Ok(self.path(&id))
    }

    /// Holds `id` if it is cached (one more holder, used now); whether it was.
    fn hold_present(s: &mut State, id: &ContentId) -> bool {
        s.clock += 1;
        let clock = s.clock;
        match s.entries.get_mut(id) {
            Some(e) => {
                e.holders += 1;
                e.last_use = clock;
                true
            }
            None => false,
        }
    }

    /// A task is done with blob `id`.
    pub fn release(&self, id: &ContentId) {
        let mut s = self.lock();
        if let Some(e) = s.entries.get_mut(id) {
            e.holders = e.holders.saturating_sub(1);
        }
        self.evict(&mut s);
    }

    /// Deletes least-recently-used blobs nobody holds while over the bound.
    fn evict(&self, s: &mut State) {
        while s.total > self.max_bytes {
            let victim =
                s.entries.iter().filter(|(_, e)| e.holders == 0).min_by_key(|(_, e)| e.last_use).map(|(id, _)| *id);
            let Some(id) = victim else { break };
            if let Some(e) = s.entries.remove(&id) {
                s.total -= e.size;
                let _ = std::fs::remove_file(self.path(&id));
                tracing::info!(channel = "blobs", event = "blob_evicted", content_id = %id, size_bytes = e.size,
                    "blob evicted from the cache (limit {} bytes)", self.max_bytes);
            }
        }
        self.metrics.set_blob_cache_bytes(s.total);
    }

    /// Streams blob `id` into the cache, checking its hash; returns its size.
    async fn fetch(&self, id: ContentId, client: &mut CoordinatorClient<Channel>) -> Result<u64, String> {
        let tmp = self.dir.join(format!("{}{TMP_SUFFIX}", id.to_hex()));
        let mut file =
            std::fs::File::create(&tmp).map_err(|e| format!("input blob {id}: cannot write {}: {e}", tmp.display()))?;
        let request = pb::GetBlobRequest { content_id: id.as_bytes().to_vec() };
        let mut stream = client
            .fetch_blob(request)
            .await
            .map_err(|s| format!("input blob {id}: the coordinator refused it: {}", s.message()))?
            .into_inner();
        let mut hasher = ContentHasher::new();
        let mut size = 0u64;
        let outcome: Result<(), String> = async {
            while let Some(chunk) =
                stream.message().await.map_err(|s| format!("input blob {id}: the download broke: {}", s.message()))?
            {
                hasher.update(&chunk.data);
                size += chunk.data.len() as u64;
                file.write_all(&chunk.data).map_err(|e| format!("input blob {id}: write failed: {e}"))?;
            }
            if hasher.finish() != id {
                return Err(format!("input blob {id}: the bytes received do not hash to it"));
            }
            file.sync_all().map_err(|e| format!("input blob {id}: sync failed: {e}"))?;
            std::fs::rename(&tmp, self.path(&id)).map_err(|e| format!("input blob {id}: rename failed: {e}"))
        }
        .await;
        if let Err(e) = outcome {
            let _ = std::fs::remove_file(&tmp);
            self.lock().fetching.remove(&id);
            return Err(e);
        }
        self.metrics.blob_fetched(size);
        tracing::info!(channel = "blobs", event = "blob_fetched", content_id = %id, size_bytes = size, "input blob fetched");
        Ok(size)
    }
}
