//! [`RedbStorage`]: the [`Storage`] implementation on redb, over a file or a [`MemDisk`].

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableError, WriteTransaction};
use rollout_core::error::{Error, Fatal, Result};
use rollout_core::traits::{KeyValue, Storage, StorageTxn};

use crate::mem_disk::{MemDisk, MemDiskError};
use crate::wal::{self, Wal};
#[cfg(feature = "watch")]
use crate::watch::{WatchEvent, Watchers};

/// Where the coordinator and workers keep their database unless configured otherwise.
pub const DEFAULT_PATH: &str = "./data/rollout.db";

/// How errors name a database that lives on a [`MemDisk`].
const IN_MEMORY_LOCATION: &str = "<in-memory disk>";

/// redb's page cache over a [`MemDisk`]. The disk already is memory, so a large cache would only
/// multiply a simulated node's footprint; a small one also makes large transactions spill pages
/// to the disk before their commit, so crashes exercise that path too.
const IN_MEMORY_CACHE_BYTES: usize = 4 << 20;

/// The one table: byte keys to opaque byte values. The name is part of the file format.
const KV_TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("rollout_kv");

/// The write-ahead log's bookkeeping in the database: `seq` is the sequence number of the
/// last commit the database holds (see [`crate::wal`]).
const WAL_TABLE: TableDefinition<&str, u64> = TableDefinition::new("rollout_wal");
const WAL_SEQ_KEY: &str = "seq";

/// The write-ahead log of a database file `rollout.db` is `rollout.db.wal` beside it.
pub fn wal_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".wal");
    PathBuf::from(name)
}

/// Durable key/value storage on redb.
///
/// A caller may rely on the [`Storage`] contract: a transaction's writes become visible and
/// durable exactly when its commit returns `Ok`, all of them or none. Every commit fsyncs, once
/// however many writes it holds (redb adds one when the file has to grow), so batching writes in
/// one transaction is how to write fast. Values are opaque
/// bytes; [`crate::StorageExt`] and [`crate::StorageTxnExt`] add postcard-typed access.
///
/// Errors are `Fatal` and name the file: a corrupt or foreign file is `Fatal::Corrupt`, a file
/// another process or handle holds is `Fatal::ConfigInvalid`, and an I/O error while running is
/// `Fatal::Internal` (redb refuses every later call, so the process must reopen the database).
pub struct RedbStorage {
    db: Database,
    location: PathBuf,
    /// The write-ahead log, when commits go through one (see [`crate::wal`]).
    wal: Option<Mutex<Wal>>,
    #[cfg(feature = "watch")]
    watchers: Watchers,
}

impl fmt::Debug for RedbStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStorage").field("location", &self.location).finish_non_exhaustive()
    }
}

/// How a database file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Bytes of pages redb keeps in memory (its read and write cache): the bound of the
    /// process's memory for storage, whatever the database's size.
    pub cache_bytes: usize,
    /// Verify every page of the file when opening it (a read of the whole file: it
    /// finds a damaged file at start rather than at the first read of the damage).
    pub check_integrity_on_open: bool,
    /// The capacity of the write-ahead log in bytes ([`crate::wal`]; 0: every commit is a
    /// durable redb commit, after replaying a log left from a run that had one).
    pub wal_bytes: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { cache_bytes: 64 << 20, check_integrity_on_open: true, wal_bytes: wal::DEFAULT_WAL_BYTES }
    }
}

impl RedbStorage {
    /// Opens the database file at `path` with the default [`OpenOptions`], creating it
    /// (and its parent directories) when absent.
    ///
    /// Fails with `Fatal::Corrupt` naming the path when the file is not a redb database (e.g.
    /// text, random bytes) or is damaged beyond redb's repair, and with `Fatal::ConfigInvalid`
    /// naming the path when another process or handle has it open.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, OpenOptions::default())
    }

    /// [`RedbStorage::open`] with `options`.
    pub fn open_with(path: impl AsRef<Path>, options: OpenOptions) -> Result<Self> {
        let path = path.as_ref();
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|err| {
                Error::config_invalid(
                    path.display().to_string(),
                    format!("cannot create the directory {}: {err}", parent.display()),
                )
            })?;
        }
        let mut builder = Database::builder();
        builder.set_check_integrity_on_open(options.check_integrity_on_open).set_cache_size(options.cache_bytes);
        // Created for this user alone (results, payloads and the audit log are in it),
        // before redb opens it; an existing file is narrowed to the same.
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
                Error::config_invalid(path.display().to_string(), format!("cannot create the database: {e}"))
            })?;
        }
        let db = builder.create(path).map_err(|err| open_error(path, err))?;
        let mut storage = RedbStorage::from_database(db, path.to_path_buf())?;
        // After redb holds its lock: a second process never touches the log.
        let log = wal_path(path);
        if options.wal_bytes > 0 || log.exists() {
            storage.attach_wal(open_log_file(&log)?, &log, options.wal_bytes)?;
        }
        Ok(storage)
    }

    /// [`RedbStorage::open_in_memory`] with a write-ahead log of `wal_bytes` on `wal_disk`,
    /// as a simulated node that runs like the real coordinator does.
    pub fn open_in_memory_with_wal(disk: &MemDisk, wal_disk: &MemDisk, wal_bytes: u64) -> Result<Self> {
        let mut storage = RedbStorage::open_in_memory(disk)?;
        let location = PathBuf::from(format!("{IN_MEMORY_LOCATION}.wal"));
        let backend = wal_disk.attach().map_err(|err| match err {
            MemDiskError::AlreadyAttached => already_open(&location),
            other => Error::internal(format!("{}: {other}", location.display())),
        })?;
        storage.attach_wal(Box::new(backend), &location, wal_bytes)?;
        Ok(storage)
    }

    /// Replays the log into the database (one durable commit) and, unless `wal_bytes` is 0,
    /// routes every later commit through it.
    fn attach_wal(&mut self, backend: Box<dyn redb::StorageBackend>, location: &Path, wal_bytes: u64) -> Result<()> {
        let durable_seq = self.wal_seq()?;
        let (mut log, replay) = Wal::open(backend, location, wal_bytes, durable_seq)?;
        if !replay.records.is_empty() {
            let mut txn = self.db.begin_write().map_err(|err| self.error(err))?;
            txn.set_durability(Durability::Immediate).map_err(|err| self.error(err))?;
            {
                let mut table = txn.open_table(KV_TABLE).map_err(|err| self.error(err))?;
                for (key, value) in wal::merged(replay.records) {
                    match value {
                        Some(value) => table.insert(key.as_slice(), value.as_slice()).map(drop),
                        None => table.remove(key.as_slice()).map(drop),
                    }
                    .map_err(|err| self.error(err))?;
                }
            }
            set_wal_seq(&txn, replay.last_seq).map_err(|err| self.error(err))?;
            txn.commit().map_err(|err| self.error(err))?;
        }
        log.checkpointed(replay.last_seq);
        if wal_bytes == 0 {
            log.truncate()?;
        } else {
            self.wal = Some(Mutex::new(log));
        }
        Ok(())
    }

    /// The sequence number of the last commit the database holds (0 before any log).
    fn wal_seq(&self) -> Result<u64> {
        let read = self.db.begin_read().map_err(|err| self.error(err))?;
        match read.open_table(WAL_TABLE) {
            Ok(table) => Ok(table.get(WAL_SEQ_KEY).map_err(|err| self.error(err))?.map_or(0, |v| v.value())),
            Err(TableError::TableDoesNotExist(_)) => Ok(0),
            Err(err) => Err(self.error(err)),
        }
    }

    fn wal(&self) -> Option<MutexGuard<'_, Wal>> {
        self.wal.as_ref().map(|log| log.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Opens (or creates) a database on `disk`, as a simulated node does at every start.
    ///
    /// After [`MemDisk::crash`], this sees exactly the transactions whose commit returned `Ok`
    /// before the crash. Fails with `Fatal::ConfigInvalid` while another database is open on the
    /// same disk (drop it, or crash the disk, first).
    pub fn open_in_memory(disk: &MemDisk) -> Result<Self> {
        let location = PathBuf::from(IN_MEMORY_LOCATION);
        let backend = disk.attach().map_err(|err| match err {
            MemDiskError::AlreadyAttached => already_open(&location),
            other => Error::internal(format!("{}: {other}", location.display())),
        })?;
        let db = database_builder()
            .set_cache_size(IN_MEMORY_CACHE_BYTES)
            .create_with_backend(backend)
            .map_err(|err| open_error(&location, err))?;
        RedbStorage::from_database(db, location)
    }

    fn from_database(db: Database, location: PathBuf) -> Result<Self> {
        let storage = RedbStorage {
            db,
            location,
            wal: None,
            #[cfg(feature = "watch")]
            watchers: Watchers::default(),
        };
        storage.create_table_if_absent()?;
        Ok(storage)
    }

    /// Creates the table once, so that every later read finds it (a fresh database has none).
    fn create_table_if_absent(&self) -> Result<()> {
        let read = self.db.begin_read().map_err(|err| self.error(err))?;
        match read.open_table(KV_TABLE) {
            Ok(_) => return Ok(()),
            Err(TableError::TableDoesNotExist(_)) => {}
            Err(err) => return Err(self.error(err)),
        }
        drop(read);
        let txn = self.db.begin_write().map_err(|err| self.error(err))?;
        txn.open_table(KV_TABLE).map_err(|err| self.error(err))?;
        txn.commit().map_err(|err| self.error(err))
    }

    /// The file this storage lives in (`<in-memory disk>` for a [`MemDisk`]), as errors name it.
    pub fn location(&self) -> &Path {
        &self.location
    }

    /// Subscribes to the keys under `prefix` (all keys for an empty prefix).
    ///
    /// After a transaction commits, the receiver gets one [`WatchEvent`] for each key under
    /// `prefix` the transaction wrote, carrying its committed value (`None`: deleted), in key
    /// order; transactions arrive in commit order, and only committed ones. A key written and
    /// restored within one transaction may yield an event that repeats the previous state.
    ///
    /// To follow a prefix without missing changes, subscribe first and then scan. A receiver
    /// more than [`crate::WATCH_CHANNEL_CAPACITY`] events behind gets `RecvError::Lagged` and
    /// should scan again.
    #[cfg(feature = "watch")]
    pub fn watch(&self, prefix: &[u8]) -> tokio::sync::broadcast::Receiver<WatchEvent> {
        self.watchers.subscribe(prefix)
    }

    fn error(&self, err: impl Into<redb::Error>) -> Error {
        storage_error(&self.location, err.into())
    }
}

/// redb trusts a cleanly closed file and may panic reading one damaged outside it; the check on
/// open verifies every page's checksum first, turning damage into `Corrupted`. It costs one walk
/// of the file per open, which for rollout's state (megabytes) is milliseconds.
fn database_builder() -> redb::Builder {
    let mut builder = Database::builder();
    builder.set_check_integrity_on_open(true);
    builder
}

fn set_wal_seq(txn: &WriteTransaction, seq: u64) -> std::result::Result<(), redb::Error> {
    txn.open_table(WAL_TABLE)?.insert(WAL_SEQ_KEY, seq)?;
    Ok(())
}

/// Opens (or creates, 0600, its directory synced) the log file of a database.
fn open_log_file(path: &Path) -> Result<Box<dyn redb::StorageBackend>> {
    use std::os::unix::fs::OpenOptionsExt;
    let place = path.display().to_string();
    let created = !path.exists();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::config_invalid(place.clone(), format!("cannot open the write-ahead log: {e}")))?;
    if created {
        // The file holds acknowledged commits from its first record on: its name must survive a power cut.
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(|e| Error::internal(format!("{}: cannot sync the directory: {e}", parent.display())))?;
    }
    let backend = redb::backends::FileBackend::new(file).map_err(|err| open_error(path, err))?;
    Ok(Box::new(backend))
}

fn already_open(location: &Path) -> Error {
    Error::config_invalid(
        location.display().to_string(),
        "the database is already open in another process or handle; stop that process or give this one its own \
         data directory",
    )
}

/// Classifies an error opening the database: an I/O error there (a directory where the file
/// should be, a missing mount) is a wrong path, not a runtime failure.
fn open_error(location: &Path, err: redb::DatabaseError) -> Error {
    match redb::Error::from(err) {
        redb::Error::Io(io) if !matches!(io.kind(), io::ErrorKind::InvalidData | io::ErrorKind::PermissionDenied) => {
            Error::config_invalid(location.display().to_string(), format!("cannot open the database file: {io}"))
        }
        other => storage_error(location, other),
    }
}

fn storage_error(location: &Path, err: redb::Error) -> Error {
    let path = location.to_path_buf();
    let place = location.display();
    match err {
        redb::Error::DatabaseAlreadyOpen => already_open(location),
        redb::Error::Corrupted(reason) => Fatal::Corrupt { path, reason }.into(),
        // redb reports a file without its magic number (not a database at all) as InvalidData.
        redb::Error::Io(io) if io.kind() == io::ErrorKind::InvalidData => {
            Fatal::Corrupt { path, reason: format!("not a rollout database ({io})") }.into()
        }
        redb::Error::UpgradeRequired(version) => Fatal::Corrupt {
            path,
            reason: format!("written in redb file format {version}, which this build cannot read"),
        }
        .into(),
        redb::Error::Io(io) if io.kind() == io::ErrorKind::PermissionDenied => {
            Fatal::PermissionDenied(format!("{place}: {io}")).into()
        }
        redb::Error::Io(io) => Error::internal(format!(
            "{place}: I/O error: {io}; the database refuses further use until it is reopened (restart the process \
             once the cause is fixed)"
        )),
        redb::Error::PreviousIo => Error::internal(format!(
            "{place}: an earlier I/O error left the database unusable until it is reopened (restart the process)"
        )),
        redb::Error::ValueTooLarge(len) => {
            Error::invalid_input(format!("{place}: a value of {len} bytes exceeds redb's limit of 3 GiB"))
        }
        other => Error::internal(format!("{place}: redb: {other}")),
    }
}

fn scan_table(
    location: &Path,
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
) -> Result<Vec<KeyValue>> {
    let error = |err: redb::StorageError| storage_error(location, err.into());
    let mut pairs = Vec::new();
    // Keys sort by bytes, so the keys under `prefix` are one contiguous run starting at it.
    for entry in table.range::<&[u8]>(prefix..).map_err(error)? {
        let (key, value) = entry.map_err(error)?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        pairs.push((key.to_vec(), value.value().to_vec()));
    }
    Ok(pairs)
}

fn scan_table_page(
    location: &Path,
    table: &impl ReadableTable<&'static [u8], &'static [u8]>,
    prefix: &[u8],
    after: Option<&[u8]>,
    limit: usize,
) -> Result<Vec<KeyValue>> {
    use std::ops::Bound;
    let error = |err: redb::StorageError| storage_error(location, err.into());
    let start = match after {
        Some(after) if after >= prefix => Bound::Excluded(after),
        _ => Bound::Included(prefix),
    };
    let mut pairs = Vec::new();
    if limit == 0 {
        return Ok(pairs);
    }
    for entry in table.range::<&[u8]>((start, Bound::Unbounded)).map_err(error)? {
        let (key, value) = entry.map_err(error)?;
        let key = key.value();
        if !key.starts_with(prefix) {
            break;
        }
        pairs.push((key.to_vec(), value.value().to_vec()));
        if pairs.len() == limit {
            break;
        }
    }
    Ok(pairs)
}

impl Storage for RedbStorage {
    fn begin_write(&self) -> Result<Box<dyn StorageTxn + '_>> {
        let mut txn = self.db.begin_write().map_err(|err| self.error(err))?;
        // Immediate is redb's default; saying it keeps the contract visible here.
        txn.set_durability(Durability::Immediate).map_err(|err| self.error(err))?;
        let log_limit = self.wal().map(|log| log.payload_limit());
        Ok(Box::new(RedbTxn {
            txn,
            storage: self,
            buffer: BTreeMap::new(),
            buffered_bytes: 0,
            log: log_limit.map(|_| Vec::new()),
            log_limit: log_limit.unwrap_or(0),
            #[cfg(feature = "watch")]
            changes: BTreeMap::new(),
        }))
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let read = self.db.begin_read().map_err(|err| self.error(err))?;
        let table = read.open_table(KV_TABLE).map_err(|err| self.error(err))?;
        let value = table.get(key).map_err(|err| self.error(err))?;
        Ok(value.map(|guard| guard.value().to_vec()))
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        let read = self.db.begin_read().map_err(|err| self.error(err))?;
        let table = read.open_table(KV_TABLE).map_err(|err| self.error(err))?;
        scan_table(&self.location, &table, prefix)
    }

    fn scan_page(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>> {
        let read = self.db.begin_read().map_err(|err| self.error(err))?;
        let table = read.open_table(KV_TABLE).map_err(|err| self.error(err))?;
        scan_table_page(&self.location, &table, prefix, after, limit)
    }
}

/// Writes a transaction buffers before it applies them to redb's table (see [`RedbTxn`]).
const BUFFERED_WRITES_MAX: usize = 16 * 1024;
/// Bytes of keys and values a transaction buffers before it applies them.
const BUFFERED_BYTES_MAX: usize = 1 << 20;

/// A write transaction of a [`RedbStorage`]. Dropping it aborts it (redb discards its pages).
///
/// Writes are buffered and applied through one open table at commit, or whenever the
/// buffer outgrows [`BUFFERED_WRITES_MAX`] / [`BUFFERED_BYTES_MAX`]: opening redb's table
/// costs about as much as an insert, and a coordinator batch writes thousands of keys
/// (often one key more than once). Reads inside the transaction see the buffer first.
struct RedbTxn<'s> {
    txn: WriteTransaction,
    storage: &'s RedbStorage,
    /// Each buffered key's latest value (`None`: deleted).
    buffer: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    buffered_bytes: usize,
    /// The record of this transaction's writes for the write-ahead log, when there is one
    /// (`None` too once the writes outgrew `log_limit`: the commit is then a checkpoint).
    log: Option<Vec<u8>>,
    log_limit: usize,
    /// Each written key's latest value, sent to watchers once the commit succeeds.
    #[cfg(feature = "watch")]
    changes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl RedbTxn<'_> {
    fn error(&self, err: impl Into<redb::Error>) -> Error {
        self.storage.error(err)
    }

    /// The value of `key` in this transaction's table (without the buffer).
    fn table_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let table = self.txn.open_table(KV_TABLE).map_err(|err| self.error(err))?;
        let value = table.get(key).map_err(|err| self.error(err))?;
        Ok(value.map(|guard| guard.value().to_vec()))
    }

    fn buffer(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        self.buffered_bytes += key.len() + value.map_or(0, <[u8]>::len);
        if let Some(log) = &mut self.log {
            match value {
                Some(value) => wal::encode_put(log, key, value),
                None => wal::encode_delete(log, key),
            }
            if log.len() > self.log_limit {
                self.log = None;
            }
        }
        #[cfg(feature = "watch")]
        self.changes.insert(key.to_vec(), value.map(<[u8]>::to_vec));
        self.buffer.insert(key.to_vec(), value.map(<[u8]>::to_vec));
        if self.buffer.len() >= BUFFERED_WRITES_MAX || self.buffered_bytes >= BUFFERED_BYTES_MAX {
            self.apply_buffer()?;
        }
        Ok(())
    }

    /// Applies the buffered writes to the table (redb may spill pages to the file).
    fn apply_buffer(&mut self) -> Result<()> {
        let buffer = std::mem::take(&mut self.buffer);
        self.buffered_bytes = 0;
        let mut table = self.txn.open_table(KV_TABLE).map_err(|err| self.storage.error(err))?;
        for (key, change) in &buffer {
            match change {
                Some(value) => table.insert(key.as_slice(), value.as_slice()).map(drop),
                None => table.remove(key.as_slice()).map(drop),
            }
            .map_err(|err| self.storage.error(err))?;
        }
        Ok(())
    }
}

impl StorageTxn for RedbTxn<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.buffer.get(key) {
            Some(change) => Ok(change.clone()),
            None => self.table_get(key),
        }
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.buffer(key, Some(value))
    }

    fn delete(&mut self, key: &[u8]) -> Result<bool> {
        let existed = match self.buffer.get(key) {
            Some(change) => change.is_some(),
            None => self.table_get(key)?.is_some(),
        };
        if existed {
            self.buffer(key, None)?;
        }
        Ok(existed)
    }

    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>> {
        let table = self.txn.open_table(KV_TABLE).map_err(|err| self.error(err))?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> =
            scan_table(&self.storage.location, &table, prefix)?.into_iter().collect();
        for (key, change) in
            self.buffer.range::<[u8], _>((std::ops::Bound::Included(prefix), std::ops::Bound::Unbounded))
        {
            if !key.starts_with(prefix) {
                break;
            }
            match change {
                Some(value) => merged.insert(key.clone(), value.clone()),
                None => merged.remove(key),
            };
        }
        Ok(merged.into_iter().collect())
    }

    fn commit(mut self: Box<Self>) -> Result<()> {
        self.apply_buffer()?;
        let RedbTxn {
            txn,
            storage,
            log,
            #[cfg(feature = "watch")]
            changes,
            ..
        } = *self;
        #[cfg(feature = "watch")]
        let _commit_order = storage.watchers.order_commit();
        match storage.wal() {
            None => txn.commit().map_err(|err| storage.error(err))?,
            Some(mut wal) => commit_logged(storage, &mut wal, txn, log)?,
        }
        #[cfg(feature = "watch")]
        storage.watchers.publish(changes);
        Ok(())
    }
}

/// Commits `txn` through the write-ahead log: its record appended and synced, then a
/// non-durable redb commit; or a durable redb commit (a checkpoint) when the log wants one
/// or the writes were too many to log. The database holds the commit's sequence number
/// either way.
fn commit_logged(storage: &RedbStorage, wal: &mut Wal, mut txn: WriteTransaction, log: Option<Vec<u8>>) -> Result<()> {
    wal.usable()?;
    let error = |err: redb::Error| storage.error(err);
    let seq = wal.next_seq();
    if log.as_ref().is_some_and(Vec::is_empty) {
        // Nothing written: nothing to make durable, and no number used.
        txn.set_durability(Durability::None).map_err(|e| error(e.into()))?;
        return txn.commit().map_err(|e| error(e.into()));
    }
    set_wal_seq(&txn, seq).map_err(error)?;
    match log {
        Some(record) if !wal.wants_checkpoint(Some(record.len())) => {
            wal.append(&record)?;
            txn.set_durability(Durability::None).map_err(|e| error(e.into()))?;
            txn.commit().map_err(|e| {
                let err = error(e.into());
                wal.fail(format!("the database refused a commit whose record is logged: {err}"));
                err
            })
        }
        _ => {
            txn.set_durability(Durability::Immediate).map_err(|e| error(e.into()))?;
            txn.commit().map_err(|e| error(e.into()))?;
            wal.checkpointed(seq);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{StorageExt, StorageTxnExt};

    fn put_all(storage: &RedbStorage, pairs: &[(&[u8], &[u8])]) {
        let mut txn = storage.begin_write().expect("begin");
        for (key, value) in pairs {
            txn.put(key, value).expect("put");
        }
        txn.commit().expect("commit");
    }

    #[test]
    fn a_committed_value_round_trips_through_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested/dirs/rollout.db");
        {
            let storage = RedbStorage::open(&path).expect("open creates parent directories");
            assert_eq!(storage.location(), path);
            put_all(&storage, &[(b"k", b"v")]);
            assert_eq!(storage.get(b"k").expect("get"), Some(b"v".to_vec()));
            assert_eq!(storage.get(b"absent").expect("get"), None);
        }
        let reopened = RedbStorage::open(&path).expect("reopen");
        assert_eq!(reopened.get(b"k").expect("get"), Some(b"v".to_vec()));
    }

    #[test]
    fn scan_returns_exactly_the_prefix_in_key_order() {
        let storage = RedbStorage::open_in_memory(&MemDisk::new()).expect("open");
        put_all(
            &storage,
            &[
                (b"task/\xff", b"4"),
                (b"task/b", b"2"),
                (b"task", b"before the prefix"),
                (b"task/a", b"1"),
                (b"task0", b"after the prefix"),
                (b"task/", b"0"),
                (b"tas", b"shorter"),
                (b"worker/a", b"other prefix"),
            ],
        );
        let keys: Vec<Vec<u8>> = storage.scan(b"task/").expect("scan").into_iter().map(|(key, _)| key).collect();
        assert_eq!(keys, vec![b"task/".to_vec(), b"task/a".to_vec(), b"task/b".to_vec(), b"task/\xff".to_vec()]);
        assert_eq!(storage.scan(b"").expect("scan all").len(), 8);
        assert!(storage.scan(b"zzz").expect("scan past the end").is_empty());
        assert_eq!(storage.scan(b"\xff").expect("scan from the top byte"), Vec::<KeyValue>::new());
    }

    #[test]
    fn delete_removes_and_reports_whether_the_key_existed() {
        let storage = RedbStorage::open_in_memory(&MemDisk::new()).expect("open");
        put_all(&storage, &[(b"a", b"1"), (b"b", b"2")]);
        let mut txn = storage.begin_write().expect("begin");
        assert!(txn.delete(b"a").expect("delete"));
        assert!(!txn.delete(b"a").expect("delete twice"));
        assert!(!txn.delete(b"never").expect("delete absent"));
        txn.commit().expect("commit");
        assert_eq!(storage.get(b"a").expect("get"), None);
        assert_eq!(storage.scan(b"").expect("scan"), vec![(b"b".to_vec(), b"2".to_vec())]);
    }

    #[test]
    fn a_transaction_sees_its_own_writes_and_others_see_them_only_after_commit() {
        let storage = RedbStorage::open_in_memory(&MemDisk::new()).expect("open");
        put_all(&storage, &[(b"x/1", b"old"), (b"x/2", b"doomed")]);
        let mut txn = storage.begin_write().expect("begin");
        txn.put(b"x/1", b"new").expect("put");
        txn.put(b"x/3", b"added").expect("put");
        txn.delete(b"x/2").expect("delete");
        assert_eq!(txn.get(b"x/1").expect("get"), Some(b"new".to_vec()));
        assert_eq!(txn.get(b"x/2").expect("get"), None);
        assert_eq!(
            txn.scan(b"x/").expect("scan"),
            vec![(b"x/1".to_vec(), b"new".to_vec()), (b"x/3".to_vec(), b"added".to_vec())]
        );
        // Readers see the last commit until this one lands.
        assert_eq!(storage.get(b"x/1").expect("get"), Some(b"old".to_vec()));
        assert_eq!(storage.scan(b"x/").expect("scan").len(), 2);
        txn.commit().expect("commit");
        assert_eq!(storage.get(b"x/1").expect("get"), Some(b"new".to_vec()));
        assert_eq!(storage.get(b"x/2").expect("get"), None);
    }

    #[test]
    fn writes_past_the_buffer_limit_are_read_back_merged_with_the_buffer() {
        let disk = MemDisk::new();
        let storage = RedbStorage::open_in_memory(&disk).expect("open");
        put_all(&storage, &[(b"y/00000", b"committed")]);
        let mut txn = storage.begin_write().expect("begin");
        let n = BUFFERED_WRITES_MAX + 10;
        for i in 0..n {
            txn.put(format!("y/{i:05}").as_bytes(), format!("v{i:01024}").as_bytes()).expect("put");
        }
        // Part of this is in redb's table now (spilled towards the disk), the rest in the buffer.
        assert!(!disk.unsynced_write_sizes().is_empty(), "the buffer should have been applied");
        txn.delete(b"y/00001").expect("delete (applied part)");
        txn.delete(format!("y/{:05}", n - 1).as_bytes()).expect("delete (buffered part)");
        assert_eq!(txn.get(b"y/00000").expect("get"), Some(format!("v{:01024}", 0).into_bytes()));
        assert_eq!(txn.get(b"y/00001").expect("get"), None);
        let scanned = txn.scan(b"y/").expect("scan");
        assert_eq!(scanned.len(), n - 2);
        assert!(scanned.windows(2).all(|w| w[0].0 < w[1].0), "scan is in key order");
        txn.commit().expect("commit");
        assert_eq!(storage.scan(b"y/").expect("scan").len(), n - 2);
        assert_eq!(
            storage.get(format!("y/{:05}", n - 2).as_bytes()).expect("get"),
            Some(format!("v{:01024}", n - 2).into_bytes())
        );
    }

    #[test]
    fn a_dropped_transaction_discards_its_writes() {
        let storage = RedbStorage::open_in_memory(&MemDisk::new()).expect("open");
        put_all(&storage, &[(b"kept", b"1")]);
        {
            let mut txn = storage.begin_write().expect("begin");
            txn.put(b"discarded", b"2").expect("put");
            txn.delete(b"kept").expect("delete");
        }
        assert_eq!(storage.scan(b"").expect("scan"), vec![(b"kept".to_vec(), b"1".to_vec())]);
        // The next transaction starts from the committed state, not the dropped one.
        let txn = storage.begin_write().expect("begin");
        assert_eq!(txn.get(b"discarded").expect("get"), None);
    }

    #[test]
    fn a_new_database_file_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rollout.db");
        let storage = RedbStorage::open(&path).expect("open");
        drop(storage);
        let mode = std::fs::metadata(&path).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the database file is {mode:o}");
    }

    #[test]
    fn many_puts_in_one_transaction_cost_one_sync() {
        let disk = MemDisk::new();
        let storage = RedbStorage::open_in_memory(&disk).expect("open");
        let write_batch = |fill: u8| {
            let mut txn = storage.begin_write().expect("begin");
            for index in 0..500u32 {
                txn.put(&index.to_be_bytes(), &[fill; 100]).expect("put");
            }
            txn.commit().expect("commit");
        };
        // The first batches grow the file, and redb syncs each growth; later ones reuse its pages.
        for fill in 0..3 {
            write_batch(fill);
        }
        let syncs_before = disk.syncs_completed();
        write_batch(9);
        assert_eq!(disk.syncs_completed() - syncs_before, 1);
    }

    #[test]
    fn typed_values_round_trip_and_bad_bytes_are_fatal_errors_naming_the_key() {
        let storage = RedbStorage::open_in_memory(&MemDisk::new()).expect("open");
        let mut txn = storage.begin_write().expect("begin");
        txn.put_value(b"jobs/1", &("train".to_string(), 3u64)).expect("put_value");
        txn.put(b"jobs/2", &[0xff; 3]).expect("put raw");
        assert_eq!(txn.get_value::<(String, u64)>(b"jobs/1").expect("get_value"), Some(("train".to_string(), 3)));
        txn.commit().expect("commit");

        assert_eq!(storage.get_value::<(String, u64)>(b"jobs/1").expect("get_value"), Some(("train".to_string(), 3)));
        assert_eq!(storage.get_value::<u64>(b"jobs/none").expect("get_value"), None);
        let err = storage.get_value::<(String, u64)>(b"jobs/2").expect_err("undecodable");
        assert!(err.is_fatal());
        assert!(err.to_string().contains("jobs/2"), "{err}");
        let err = storage.scan_values::<(String, u64)>(b"jobs/").expect_err("one value is undecodable");
        assert!(err.to_string().contains("jobs/2"), "{err}");
    }
}
