//! [`FsObjectStore`]: content-addressed blobs on the local filesystem.
//!
//! Layout under the root (default `./data/object-store`):
//!
//! ```text
//! ab/cd/abcd…ef              the object's bytes; its name is the SHA-256 in hex
//! ab/cd/abcd…ef.meta.json    ObjectMeta: content id, size, creation time
//! tmp/<ulid>.tmp             uploads in progress (renamed into place when complete)
//! ```
//!
//! Two levels of two hex digits keep every directory small (65,536 leaf directories)
//! however many objects there are.
//!
//! Write order, so that a crash at any point leaves either the complete object or
//! none: the bytes go to a tmp file which is fsynced; the sidecar goes to its own tmp
//! file, is fsynced, renamed into place and the directory fsynced; then the object is
//! renamed into place and the directory fsynced. The object file appearing is the
//! commit point, so an object on disk always has its sidecar. A crash leaves at most
//! an orphan tmp file (see [`FsObjectStore::remove_stale_tmp`]) or a sidecar with no
//! object, which the next put of the same bytes replaces.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rollout_core::ids::ContentHasher;
use rollout_core::traits::ObjectStore;
use rollout_core::{ContentId, Error, Fatal, Result};
use serde::{Deserialize, Serialize};

use crate::io_error::io_error;

/// Where the object store lives unless told otherwise (relative to the working
/// directory, next to the default `./data/rollout.db`).
pub const DEFAULT_ROOT: &str = "./data/object-store";

/// The unit of streamed reads and writes: a streamed put or get holds one chunk of
/// this size in memory, whatever the object's size.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// The largest object accepted unless [`FsObjectStore::with_max_object_bytes`] says
/// otherwise. A bound so that a runaway stream fails instead of filling the disk.
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// Uploads in progress live here; two hex digits never collide with it.
const TMP_DIR: &str = "tmp";
const TMP_SUFFIX: &str = ".tmp";
const META_SUFFIX: &str = ".meta.json";
/// How often a tmp name is redrawn when it already exists (it never should: names are
/// ULIDs with 80 random bits).
const TMP_NAME_ATTEMPTS: u32 = 8;

/// The `<hex>.meta.json` sidecar of an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObjectMeta {
    /// The object's id (its SHA-256, 64 hex digits in the JSON).
    pub content_id: ContentId,
    /// The object's length.
    pub size_bytes: u64,
    /// When this copy was first written, in milliseconds since the Unix epoch
    /// (informational: nothing depends on it).
    pub created_unix_ms: u64,
}

/// An [`ObjectStore`] in a directory tree; see the module docs for the layout.
///
/// Safe to share between threads and between processes on the same directory:
/// every write goes through a uniquely named tmp file and an atomic rename, and two
/// writers of the same id write the same bytes.
#[derive(Debug, Clone)]
pub struct FsObjectStore {
    root: PathBuf,
    tmp_dir: PathBuf,
    max_object_bytes: u64,
}

impl FsObjectStore {
    /// Opens (creating it if needed) the store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let tmp_dir = root.join(TMP_DIR);
        fs::create_dir_all(&tmp_dir)
            .map_err(|e| io_error(format_args!("creating object store directory {}", tmp_dir.display()), &e))?;
        Ok(FsObjectStore { root, tmp_dir, max_object_bytes: DEFAULT_MAX_OBJECT_BYTES })
    }

    /// Opens the store at [`DEFAULT_ROOT`].
    pub fn open_default() -> Result<Self> {
        Self::open(DEFAULT_ROOT)
    }

    /// Opens the store at `<data_dir>/object-store`, where `data_dir` is the
    /// configured `storage.data_dir`.
    pub fn open_in_data_dir(data_dir: &Path) -> Result<Self> {
        Self::open(data_dir.join("object-store"))
    }

    /// Refuses objects longer than `max_object_bytes` (with [`Fatal::InvalidInput`])
    /// instead of [`DEFAULT_MAX_OBJECT_BYTES`].
    pub fn with_max_object_bytes(mut self, max_object_bytes: u64) -> Self {
        self.max_object_bytes = max_object_bytes;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the bytes of `id` are (or would be): `root/ab/cd/<hex>`.
    pub fn object_path(&self, id: &ContentId) -> PathBuf {
        let hex = id.to_hex();
        self.shard_dir(&hex).join(hex)
    }

    /// Where the sidecar of `id` is (or would be): `root/ab/cd/<hex>.meta.json`.
    pub fn meta_path(&self, id: &ContentId) -> PathBuf {
        let hex = id.to_hex();
        self.shard_dir(&hex).join(format!("{hex}{META_SUFFIX}"))
    }

    /// Reads and checks the sidecar of `id`. A missing object is
    /// [`Fatal::Internal`] like [`ObjectStore::get`]; an unreadable sidecar, or one
    /// describing another object, is [`Fatal::Corrupt`] naming the sidecar.
    pub fn meta(&self, id: &ContentId) -> Result<ObjectMeta> {
        if !self.exists(id)? {
            return Err(self.not_found(id));
        }
        let path = self.meta_path(id);
        let text = fs::read_to_string(&path).map_err(|e| io_error(format_args!("reading {}", path.display()), &e))?;
        let meta: ObjectMeta = serde_json::from_str(&text)
            .map_err(|e| corrupt(&path, format!("not an object sidecar ({e}); put the object again to rewrite it")))?;
        if meta.content_id != *id {
            return Err(corrupt(&path, format!("describes object {}, expected {id}", meta.content_id)));
        }
        Ok(meta)
    }

    /// Every stored object's sidecar, in content-id order (objects whose sidecar is
    /// missing or unreadable are left out: a crash between the two renames).
    pub fn list(&self) -> Result<Vec<ObjectMeta>> {
        let listing = |dir: &Path, e: &io::Error| io_error(format_args!("listing {}", dir.display()), e);
        let mut out = Vec::new();
        let mut outers: Vec<PathBuf> = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(|e| listing(&self.root, &e))? {
            let path = entry.map_err(|e| listing(&self.root, &e))?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.len() == 2 && name.bytes().all(|b| b.is_ascii_hexdigit()) && path.is_dir() {
                outers.push(path);
            }
        }
        outers.sort();
        for outer in outers {
            let mut inners: Vec<PathBuf> = fs::read_dir(&outer)
                .map_err(|e| listing(&outer, &e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect();
            inners.sort();
            for inner in inners {
                let mut metas: Vec<PathBuf> = fs::read_dir(&inner)
                    .map_err(|e| listing(&inner, &e))?
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.to_str().is_some_and(|s| s.ends_with(META_SUFFIX)))
                    .collect();
                metas.sort();
                for meta in metas {
                    let Some(meta) = fs::read(&meta).ok().and_then(|b| serde_json::from_slice::<ObjectMeta>(&b).ok())
                    else {
                        continue;
                    };
                    if self.exists(&meta.content_id)? {
                        out.push(meta);
                    }
                }
            }
        }
        Ok(out)
    }

    /// When `id` was last stored or used ([`FsObjectStore::touch`]): its file's
    /// modification time.
    pub fn last_used(&self, id: &ContentId) -> Result<SystemTime> {
        let path = self.object_path(id);
        fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(|e| io_error(format_args!("reading the age of {}", path.display()), &e))
    }

    /// Marks `id` used now (its file's modification time), so a retention sweep counts
    /// its age from here.
    pub fn touch(&self, id: &ContentId) -> Result<()> {
        let path = self.object_path(id);
        let file = File::options()
            .write(true)
            .open(&path)
            .map_err(|e| io_error(format_args!("opening {}", path.display()), &e))?;
        file.set_modified(SystemTime::now()).map_err(|e| io_error(format_args!("touching {}", path.display()), &e))
    }

    /// Deletes `id` (its bytes, then its sidecar); true if it was there.
    pub fn remove(&self, id: &ContentId) -> Result<bool> {
        let path = self.object_path(id);
        let removed = match fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_error(format_args!("removing {}", path.display()), &e)),
        };
        match fs::remove_file(self.meta_path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(format_args!("removing the sidecar of {id}"), &e)),
        }
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(removed)
    }

    /// Re-reads the object `id` and checks that its bytes still hash to `id`;
    /// returns its length. Damage is [`Fatal::Corrupt`] naming the object's file.
    pub fn verify(&self, id: &ContentId) -> Result<u64> {
        self.get_stream(id, &mut io::sink())
    }

    /// Deletes files in the tmp directory last modified more than `older_than` ago:
    /// uploads abandoned by a crashed writer. Returns how many were removed.
    ///
    /// Not done implicitly at open, because another process may be writing into the
    /// same store; pick `older_than` well above the longest upload.
    pub fn remove_stale_tmp(&self, older_than: Duration) -> Result<usize> {
        let listing = |e: &io::Error| io_error(format_args!("listing {}", self.tmp_dir.display()), e);
        let cutoff = SystemTime::now().checked_sub(older_than).unwrap_or(UNIX_EPOCH);
        let mut removed = 0;
        for entry in fs::read_dir(&self.tmp_dir).map_err(|e| listing(&e))? {
            let entry = entry.map_err(|e| listing(&e))?;
            let path = entry.path();
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .map_err(|e| io_error(format_args!("reading the age of {}", path.display()), &e))?;
            if modified <= cutoff {
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    // Another sweeper got there first.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_error(format_args!("removing {}", path.display()), &e)),
                }
            }
        }
        Ok(removed)
    }

    fn shard_dir(&self, hex: &str) -> PathBuf {
        // A ContentId's hex is always 64 ASCII digits, so these slices are in bounds.
        self.root.join(&hex[0..2]).join(&hex[2..4])
    }

    fn not_found(&self, id: &ContentId) -> Error {
        Error::Fatal(Fatal::Internal(format!("object not found: {id} (looked in {})", self.object_path(id).display())))
    }

    fn check_size(&self, size_bytes: u64) -> Result<()> {
        if size_bytes > self.max_object_bytes {
            return Err(Error::invalid_input(format!(
                "object of at least {size_bytes} bytes exceeds the object store's limit of {} bytes \
                 (FsObjectStore::with_max_object_bytes)",
                self.max_object_bytes
            )));
        }
        Ok(())
    }

    /// Creates `root/ab/cd` if needed, fsyncing each parent that gained an entry so
    /// the new directories survive a crash along with the object.
    fn ensure_shard_dir(&self, id: &ContentId) -> Result<PathBuf> {
        let hex = id.to_hex();
        let outer = self.root.join(&hex[0..2]);
        let inner = outer.join(&hex[2..4]);
        for (dir, parent) in [(&outer, &self.root), (&inner, &outer)] {
            match fs::create_dir(dir) {
                Ok(()) => sync_dir(parent)?,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error(format_args!("creating {}", dir.display()), &e)),
            }
        }
        Ok(inner)
    }

    /// Moves a complete, fsynced upload into place (see the module docs for the order).
    fn commit(&self, upload: TmpFile, id: &ContentId, size_bytes: u64) -> Result<()> {
        let dir = self.ensure_shard_dir(id)?;
        let created_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let meta = ObjectMeta { content_id: *id, size_bytes, created_unix_ms };
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| Error::internal(format!("encoding the sidecar of {id}: {e}")))?;
        let mut meta_upload = TmpFile::create(&self.tmp_dir)?;
        meta_upload.write_all(&json)?;
        meta_upload.sync()?;
        meta_upload.persist(&self.meta_path(id))?;
        sync_dir(&dir)?;
        upload.persist(&self.object_path(id))?;
        sync_dir(&dir)
    }

    fn open_object(&self, id: &ContentId) -> Result<(File, PathBuf)> {
        let path = self.object_path(id);
        match File::open(&path) {
            Ok(file) => Ok((file, path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(self.not_found(id)),
            Err(e) => Err(io_error(format_args!("opening object {}", path.display()), &e)),
        }
    }
}

impl ObjectStore for FsObjectStore {
    fn put(&self, bytes: &[u8]) -> Result<ContentId> {
        self.check_size(bytes.len() as u64)?;
        let id = ContentId::of(bytes);
        if self.exists(&id)? {
            return Ok(id);
        }
        let mut upload = TmpFile::create(&self.tmp_dir)?;
        upload.write_all(bytes)?;
        upload.sync()?;
        self.commit(upload, &id, bytes.len() as u64)?;
        Ok(id)
    }

    fn put_stream(&self, reader: &mut dyn Read) -> Result<ContentId> {
        let mut upload = TmpFile::create(&self.tmp_dir)?;
        let mut hasher = ContentHasher::new();
        let mut chunk = vec![0u8; CHUNK_BYTES];
        let mut size_bytes: u64 = 0;
        loop {
            let n = match reader.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(io_error(format_args!("reading the object stream after {size_bytes} bytes"), &e));
                }
            };
            size_bytes += n as u64;
            self.check_size(size_bytes)?;
            hasher.update(&chunk[..n]);
            upload.write_all(&chunk[..n])?;
        }
        let id = hasher.finish();
        if self.exists(&id)? {
            // Same bytes already stored: dropping the upload deletes it.
            return Ok(id);
        }
        upload.sync()?;
        self.commit(upload, &id, size_bytes)?;
        Ok(id)
    }

    fn get(&self, id: &ContentId) -> Result<Vec<u8>> {
        let (mut file, path) = self.open_object(id)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(|e| io_error(format_args!("reading object {}", path.display()), &e))?;
        check_digest(&path, id, ContentId::of(&bytes))?;
        Ok(bytes)
    }

    /// Streams the object, hashing as it goes. The check against `id` can only
    /// happen at the end: on [`Fatal::Corrupt`] the caller must discard what was
    /// written.
    fn get_stream(&self, id: &ContentId, writer: &mut dyn Write) -> Result<u64> {
        let (mut file, path) = self.open_object(id)?;
        let mut hasher = ContentHasher::new();
        let mut chunk = vec![0u8; CHUNK_BYTES];
        let mut size_bytes: u64 = 0;
        loop {
            let n = match file.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_error(format_args!("reading object {}", path.display()), &e)),
            };
            hasher.update(&chunk[..n]);
            writer
                .write_all(&chunk[..n])
                .map_err(|e| io_error(format_args!("writing object {id} to the caller's stream"), &e))?;
            size_bytes += n as u64;
        }
        check_digest(&path, id, hasher.finish())?;
        Ok(size_bytes)
    }

    fn exists(&self, id: &ContentId) -> Result<bool> {
        let path = self.object_path(id);
        path.try_exists().map_err(|e| io_error(format_args!("checking for object {}", path.display()), &e))
    }
}

fn corrupt(path: &Path, reason: String) -> Error {
    Error::Fatal(Fatal::Corrupt { path: path.to_path_buf(), reason })
}

fn check_digest(path: &Path, expected: &ContentId, actual: ContentId) -> Result<()> {
    if actual != *expected {
        return Err(corrupt(
            path,
            format!(
                "object is damaged: its bytes hash to {actual}, its name says {expected}; \
                 delete the file and put the object again"
            ),
        ));
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error(format_args!("syncing directory {}", dir.display()), &e))
}

/// A file in the tmp directory that is deleted when dropped unless it was
/// [`TmpFile::persist`]ed, so that failed uploads clean up after themselves.
#[derive(Debug)]
struct TmpFile {
    path: PathBuf,
    file: File,
    persisted: bool,
}

impl TmpFile {
    fn create(tmp_dir: &Path) -> Result<Self> {
        let mut last_err = None;
        for _ in 0..TMP_NAME_ATTEMPTS {
            let path = tmp_dir.join(format!("{}{TMP_SUFFIX}", ulid::Ulid::new()));
            match std::os::unix::fs::OpenOptionsExt::mode(OpenOptions::new().write(true).create_new(true), 0o600)
                .open(&path)
            {
                Ok(file) => return Ok(TmpFile { path, file, persisted: false }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some((path, e)),
                Err(e) => return Err(io_error(format_args!("creating {}", path.display()), &e)),
            }
        }
        let (path, err) = last_err.unwrap_or_else(|| (tmp_dir.to_path_buf(), io::Error::other("no attempt was made")));
        Err(io_error(format_args!("creating a tmp file like {}", path.display()), &err))
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes).map_err(|e| io_error(format_args!("writing {}", self.path.display()), &e))
    }

    fn sync(&mut self) -> Result<()> {
        self.file.sync_all().map_err(|e| io_error(format_args!("syncing {}", self.path.display()), &e))
    }

    fn persist(mut self, to: &Path) -> Result<()> {
        fs::rename(&self.path, to)
            .map_err(|e| io_error(format_args!("renaming {} to {}", self.path.display(), to.display()), &e))?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if !self.persisted {
            // Best effort: a leftover is harmless and remove_stale_tmp sweeps it.
            let _ = fs::remove_file(&self.path);
        }
    }
}
