//! A crash-faithful in-memory disk for the simulator.
//!
//! [`MemDisk`] keeps two images of one file: the bytes a completed `sync_data` made durable, and
//! the live bytes including every write since. A crash ([`MemDisk::crash`]) throws the live image
//! away and keeps the durable one, optionally with some of the unsynced writes having reached the
//! disk (in order, the last one torn, or out of order), as a real disk may leave it after power
//! loss. Nothing here reads a clock or draws a random number: every choice comes from the caller,
//! so a simulator replays a crash bit for bit from its seed.

use std::fmt;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// How much a [`MemDisk`] holds unless [`MemDisk::with_capacity`] says otherwise: large enough
/// for any simulated node, small enough that a runaway writer fails instead of exhausting memory.
pub const DEFAULT_CAPACITY_BYTES: u64 = 4 << 30;

/// What survives of the writes issued since the last completed sync when a [`MemDisk`] crashes.
///
/// The positions and sizes refer to [`MemDisk::unsynced_write_sizes`], read before the crash.
/// Positions past the end are ignored, so any caller-drawn numbers are valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CrashMode {
    /// Every unsynced write is lost: the disk holds exactly what the last sync made durable.
    LoseUnsynced,
    /// The disk persisted the unsynced writes in the order they were issued and lost power part
    /// way: the first `whole_writes` survive whole, the next one survives only for its first
    /// `torn_bytes` bytes (a torn write), and the rest are lost.
    TornPrefix {
        /// Unsynced writes that reached the disk whole.
        whole_writes: usize,
        /// Bytes of the write after them that reached the disk.
        torn_bytes: usize,
    },
    /// The disk reordered the unsynced writes: exactly those at `kept_writes` (positions in issue
    /// order) survive whole, applied in issue order; all others are lost.
    Reordered {
        /// Positions of the unsynced writes that reached the disk.
        kept_writes: Vec<usize>,
    },
}

/// Why an operation on a [`MemDisk`] failed. redb sees these as [`std::io::Error`]s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemDiskError {
    /// Another backend is attached and has not been closed (two databases on one disk).
    #[error("the in-memory disk is already attached to an open database")]
    AlreadyAttached,
    /// The disk crashed (or another backend attached after one) since this backend attached;
    /// this backend belongs to a process that no longer exists.
    #[error("this backend was disconnected from the in-memory disk by a crash")]
    Disconnected,
    /// Power was cut (see [`MemDisk::cut_power_after_syncs`]); nothing works until the crash.
    #[error("the in-memory disk lost power")]
    PowerLost,
    /// A read reached past the end of the disk.
    #[error("read of bytes {start}..{end} past the end of the in-memory disk ({len} bytes)")]
    ReadPastEnd {
        /// First byte asked for.
        start: u64,
        /// One past the last byte asked for.
        end: u64,
        /// The disk's length.
        len: u64,
    },
    /// A write or resize would grow the disk past its capacity.
    #[error("the in-memory disk is full: {requested_bytes} bytes requested, capacity is {capacity_bytes}")]
    Full {
        /// The length the operation needed.
        requested_bytes: u64,
        /// The disk's capacity.
        capacity_bytes: u64,
    },
}

impl MemDiskError {
    fn into_io(self) -> io::Error {
        let kind = match self {
            MemDiskError::ReadPastEnd { .. } => io::ErrorKind::UnexpectedEof,
            MemDiskError::Full { .. } => io::ErrorKind::StorageFull,
            MemDiskError::AlreadyAttached => io::ErrorKind::ResourceBusy,
            MemDiskError::Disconnected | MemDiskError::PowerLost => io::ErrorKind::BrokenPipe,
        };
        io::Error::new(kind, self)
    }
}

/// A write issued since the last completed sync, in issue order.
#[derive(Clone)]
enum UnsyncedWrite {
    Bytes { offset: usize, data: Vec<u8> },
    SetLen(usize),
}

impl UnsyncedWrite {
    /// The bytes it carries; a length change carries none (it is all or nothing).
    fn size(&self) -> usize {
        match self {
            UnsyncedWrite::Bytes { data, .. } => data.len(),
            UnsyncedWrite::SetLen(_) => 0,
        }
    }

    /// Applies the first `keep_bytes` bytes of this write to `image`.
    fn apply_prefix(&self, image: &mut Vec<u8>, keep_bytes: usize) {
        match self {
            UnsyncedWrite::Bytes { offset, data } => write_into(image, *offset, &data[..keep_bytes.min(data.len())]),
            // A torn length change did not happen: metadata updates are atomic on real file systems.
            UnsyncedWrite::SetLen(len) if keep_bytes > 0 => image.resize(*len, 0),
            UnsyncedWrite::SetLen(_) => {}
        }
    }

    fn apply(&self, image: &mut Vec<u8>) {
        match self {
            UnsyncedWrite::Bytes { offset, data } => write_into(image, *offset, data),
            UnsyncedWrite::SetLen(len) => image.resize(*len, 0),
        }
    }
}

/// Writes `data` at `offset`, growing `image` with zeros as a file grows when written past its
/// end (the length change that would have grown it may have been lost in a crash).
fn write_into(image: &mut Vec<u8>, offset: usize, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let end = offset + data.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[offset..end].copy_from_slice(data);
}

#[derive(Clone)]
struct DiskState {
    /// What survives a crash that loses every unsynced write.
    durable: Vec<u8>,
    /// What reads see: `durable` with `unsynced` applied.
    live: Vec<u8>,
    unsynced: Vec<UnsyncedWrite>,
    capacity_bytes: u64,
    /// The backend allowed to use the disk; `None` after a crash or a close.
    attached_backend: Option<u64>,
    next_backend_id: u64,
    /// Successful syncs left before the armed power cut; `None` when none is armed.
    syncs_before_power_cut: Option<u64>,
    powered_off: bool,
    syncs_completed: u64,
}

impl DiskState {
    fn new(capacity_bytes: u64) -> Self {
        DiskState {
            durable: Vec::new(),
            live: Vec::new(),
            unsynced: Vec::new(),
            capacity_bytes,
            attached_backend: None,
            next_backend_id: 0,
            syncs_before_power_cut: None,
            powered_off: false,
            syncs_completed: 0,
        }
    }

    fn check_usable(&self, backend_id: u64) -> Result<(), MemDiskError> {
        if self.attached_backend != Some(backend_id) {
            return Err(MemDiskError::Disconnected);
        }
        if self.powered_off {
            return Err(MemDiskError::PowerLost);
        }
        Ok(())
    }

    fn check_capacity(&self, requested_bytes: u64) -> Result<usize, MemDiskError> {
        let full = MemDiskError::Full { requested_bytes, capacity_bytes: self.capacity_bytes };
        if requested_bytes > self.capacity_bytes {
            return Err(full);
        }
        usize::try_from(requested_bytes).map_err(|_| full)
    }

    fn byte_range(&self, offset: u64, len: usize) -> Result<Range<usize>, MemDiskError> {
        let end = offset.saturating_add(len as u64);
        let past_end = MemDiskError::ReadPastEnd { start: offset, end, len: self.live.len() as u64 };
        if end > self.live.len() as u64 {
            return Err(past_end);
        }
        // Both fit in usize: they are at most the live image's length.
        Ok(offset as usize..end as usize)
    }

    fn crashed_image(&self, mode: &CrashMode) -> Vec<u8> {
        let mut image = self.durable.clone();
        match mode {
            CrashMode::LoseUnsynced => {}
            CrashMode::TornPrefix { whole_writes, torn_bytes } => {
                for write in self.unsynced.iter().take(*whole_writes) {
                    write.apply(&mut image);
                }
                if let Some(torn) = self.unsynced.get(*whole_writes) {
                    torn.apply_prefix(&mut image, *torn_bytes);
                }
            }
            CrashMode::Reordered { kept_writes } => {
                for (position, write) in self.unsynced.iter().enumerate() {
                    if kept_writes.contains(&position) {
                        write.apply(&mut image);
                    }
                }
            }
        }
        image
    }
}

/// An in-memory disk holding one redb file, that loses unsynced writes when it crashes.
///
/// Cloning is cheap and every clone is the same disk (keep one per simulated node and hand a
/// clone to [`crate::RedbStorage::open_in_memory`] on every restart).
///
/// A caller may rely on:
/// - `sync_data` makes every write issued before it durable; nothing else does.
/// - After [`MemDisk::crash`], the disk holds the durable bytes plus exactly the unsynced writes
///   the [`CrashMode`] keeps, and the database that used it before is disconnected: its further
///   reads and writes fail instead of touching the disk (a dead process writes nothing).
/// - At most one database is attached at a time; a second open fails until the first is
///   dropped or the disk crashes.
/// - Behaviour depends only on the calls made: no clock, no randomness.
#[derive(Clone)]
pub struct MemDisk {
    state: Arc<Mutex<DiskState>>,
}

impl Default for MemDisk {
    fn default() -> Self {
        MemDisk::new()
    }
}

impl fmt::Debug for MemDisk {
    // The bytes would drown any log; lengths and the unsynced count say what matters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.lock();
        f.debug_struct("MemDisk")
            .field("durable_len", &state.durable.len())
            .field("live_len", &state.live.len())
            .field("unsynced_writes", &state.unsynced.len())
            .field("syncs_completed", &state.syncs_completed)
            .field("powered_off", &state.powered_off)
            .finish()
    }
}

impl MemDisk {
    /// An empty disk of [`DEFAULT_CAPACITY_BYTES`].
    pub fn new() -> Self {
        MemDisk::with_capacity(DEFAULT_CAPACITY_BYTES)
    }

    /// An empty disk that refuses to grow past `capacity_bytes` (writes then fail with
    /// [`MemDiskError::Full`], as a full disk does).
    pub fn with_capacity(capacity_bytes: u64) -> Self {
        MemDisk { state: Arc::new(Mutex::new(DiskState::new(capacity_bytes))) }
    }

    // A panic while the lock is held cannot leave the state half-updated in a way that matters
    // (each update is one assignment or one push), so a poisoned lock is read through.
    fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connects a redb backend to this disk. Fails with [`MemDiskError::AlreadyAttached`] while
    /// another attached backend is open (not yet closed by redb, and no crash since).
    pub fn attach(&self) -> Result<MemDiskBackend, MemDiskError> {
        let mut state = self.lock();
        if state.attached_backend.is_some() {
            return Err(MemDiskError::AlreadyAttached);
        }
        let backend_id = state.next_backend_id;
        state.next_backend_id += 1;
        state.attached_backend = Some(backend_id);
        Ok(MemDiskBackend { disk: self.clone(), backend_id })
    }

    /// Crashes the disk (power loss and reboot): the unsynced writes `mode` does not keep are
    /// lost, what remains becomes the durable image, the attached backend (if any) is
    /// disconnected, and any armed power cut is disarmed. The disk is then ready to be opened again.
    pub fn crash(&self, mode: CrashMode) {
        let mut state = self.lock();
        let image = state.crashed_image(&mode);
        state.live = image.clone();
        state.durable = image;
        state.unsynced.clear();
        state.attached_backend = None;
        state.syncs_before_power_cut = None;
        state.powered_off = false;
    }

    /// Arms a power cut: the next `syncs` syncs complete, the one after fails with
    /// [`MemDiskError::PowerLost`] without making anything durable, and from then on every
    /// operation fails until [`MemDisk::crash`]. This is how a test crashes in the middle of a
    /// commit: the commit returns an error and its writes stay unsynced, ready to be torn.
    pub fn cut_power_after_syncs(&self, syncs: u64) {
        self.lock().syncs_before_power_cut = Some(syncs);
    }

    /// The sizes in bytes of the writes issued since the last completed sync, in issue order (a
    /// length change counts as a write of size 0). Use it to choose a [`CrashMode`].
    pub fn unsynced_write_sizes(&self) -> Vec<usize> {
        self.lock().unsynced.iter().map(UnsyncedWrite::size).collect()
    }

    /// How many syncs have completed on this disk since it was created.
    pub fn syncs_completed(&self) -> u64 {
        self.lock().syncs_completed
    }

    /// The durable length in bytes (what a crash losing every unsynced write would leave).
    pub fn durable_len(&self) -> u64 {
        self.lock().durable.len() as u64
    }

    /// An independent copy of this disk as it is now (durable and unsynced bytes, capacity, armed
    /// power cut), with no backend attached: e.g. to try many crash modes on one pre-crash state.
    pub fn fork(&self) -> MemDisk {
        let mut copy = self.lock().clone();
        copy.attached_backend = None;
        MemDisk { state: Arc::new(Mutex::new(copy)) }
    }

    /// An independent copy of what this disk would hold after a crash that loses every
    /// unsynced write (`fork` then `crash(LoseUnsynced)`, copying only the durable bytes):
    /// what a restart now would find, the live disk left alone.
    pub fn durable_fork(&self) -> MemDisk {
        let state = self.lock();
        let copy = DiskState {
            durable: state.durable.clone(),
            live: state.durable.clone(),
            unsynced: Vec::new(),
            capacity_bytes: state.capacity_bytes,
            attached_backend: None,
            next_backend_id: state.next_backend_id,
            syncs_before_power_cut: None,
            powered_off: false,
            syncs_completed: state.syncs_completed,
        };
        MemDisk { state: Arc::new(Mutex::new(copy)) }
    }

    /// Replaces the durable contents with `bytes` (nothing unsynced): e.g. to load a corrupt image.
    /// Disconnects the attached backend, as replacing a disk under a running process would.
    pub fn overwrite(&self, bytes: Vec<u8>) {
        let mut state = self.lock();
        state.live = bytes.clone();
        state.durable = bytes;
        state.unsynced.clear();
        state.attached_backend = None;
    }
}

/// One redb database's connection to a [`MemDisk`] (see [`MemDisk::attach`]). It implements
/// [`redb::StorageBackend`]; once the disk crashes every call fails with
/// [`MemDiskError::Disconnected`].
pub struct MemDiskBackend {
    disk: MemDisk,
    backend_id: u64,
}

impl fmt::Debug for MemDiskBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemDiskBackend").field("backend_id", &self.backend_id).field("disk", &self.disk).finish()
    }
}

impl MemDiskBackend {
    fn usable_state(&self) -> io::Result<MutexGuard<'_, DiskState>> {
        let state = self.disk.lock();
        state.check_usable(self.backend_id).map_err(MemDiskError::into_io)?;
        Ok(state)
    }

    fn detach(&self) {
        let mut state = self.disk.lock();
        // A disconnected backend going away must not detach the one that replaced it.
        if state.attached_backend == Some(self.backend_id) {
            state.attached_backend = None;
        }
    }
}

impl redb::StorageBackend for MemDiskBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.usable_state()?.live.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let state = self.usable_state()?;
        let range = state.byte_range(offset, out.len()).map_err(MemDiskError::into_io)?;
        out.copy_from_slice(&state.live[range]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.usable_state()?;
        let len = state.check_capacity(len).map_err(MemDiskError::into_io)?;
        state.live.resize(len, 0);
        state.unsynced.push(UnsyncedWrite::SetLen(len));
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.usable_state()?;
        match state.syncs_before_power_cut {
            Some(0) => {
                state.powered_off = true;
                return Err(MemDiskError::PowerLost.into_io());
            }
            Some(left) => state.syncs_before_power_cut = Some(left - 1),
            None => {}
        }
        // Replaying the log costs what was written since the last sync, not the disk's size.
        let state = &mut *state;
        for write in state.unsynced.drain(..) {
            write.apply(&mut state.durable);
        }
        state.syncs_completed += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.usable_state()?;
        let end = state.check_capacity(offset.saturating_add(data.len() as u64)).map_err(MemDiskError::into_io)?;
        // `end` fits in usize, so `offset` does too.
        let offset = end - data.len();
        write_into(&mut state.live, offset, data);
        state.unsynced.push(UnsyncedWrite::Bytes { offset, data: data.to_vec() });
        Ok(())
    }

    fn close(&self) -> io::Result<()> {
        self.detach();
        Ok(())
    }
}

impl Drop for MemDiskBackend {
    // redb closes its backend on every ordinary path; this covers the others (a panic while
    // opening, a backend attached and never handed to redb), which would otherwise leave the
    // disk attached forever.
    fn drop(&mut self) {
        self.detach();
    }
}

#[cfg(test)]
mod tests {
    use redb::StorageBackend;

    use super::*;

    fn read_all(backend: &MemDiskBackend) -> Vec<u8> {
        let mut out = vec![0; backend.len().expect("len") as usize];
        backend.read(0, &mut out).expect("read");
        out
    }

    #[test]
    fn synced_writes_survive_a_crash_and_unsynced_ones_do_not() {
        let disk = MemDisk::new();
        let backend = disk.attach().expect("attach");
        backend.write(0, b"durable").expect("write");
        backend.sync_data().expect("sync");
        backend.write(0, b"DURA").expect("write");
        backend.write(7, b"+tail").expect("write");
        assert_eq!(read_all(&backend), b"DURAble+tail");
        assert_eq!(disk.unsynced_write_sizes(), vec![4, 5]);

        disk.crash(CrashMode::LoseUnsynced);
        let backend = disk.attach().expect("attach after crash");
        assert_eq!(read_all(&backend), b"durable");
        assert!(disk.unsynced_write_sizes().is_empty());
    }

    #[test]
    fn a_torn_prefix_keeps_whole_writes_and_part_of_the_next() {
        let disk = MemDisk::new();
        let backend = disk.attach().expect("attach");
        backend.write(0, b"aaaa").expect("write");
        backend.write(4, b"bbbb").expect("write");
        backend.write(8, b"cccc").expect("write");
        disk.crash(CrashMode::TornPrefix { whole_writes: 1, torn_bytes: 2 });
        assert_eq!(read_all(&disk.attach().expect("attach")), b"aaaabb");
    }

    #[test]
    fn a_reordered_crash_keeps_exactly_the_chosen_writes() {
        let disk = MemDisk::new();
        let backend = disk.attach().expect("attach");
        backend.set_len(6).expect("set_len");
        backend.write(0, b"aa").expect("write");
        backend.write(2, b"bb").expect("write");
        backend.write(4, b"cc").expect("write");
        disk.crash(CrashMode::Reordered { kept_writes: vec![3, 99] });
        // The length change was lost, so the kept write grows the file past a hole of zeros.
        assert_eq!(read_all(&disk.attach().expect("attach")), b"\0\0\0\0cc");
    }

    #[test]
    fn a_crash_disconnects_the_old_backend() {
        let disk = MemDisk::new();
        let old = disk.attach().expect("attach");
        assert_eq!(disk.attach().err(), Some(MemDiskError::AlreadyAttached));
        disk.crash(CrashMode::LoseUnsynced);
        let new = disk.attach().expect("attach after crash");
        assert!(old.write(0, b"zombie").is_err());
        assert!(old.sync_data().is_err());
        old.close().expect("closing a dead backend is harmless");
        assert_eq!(disk.attach().err(), Some(MemDiskError::AlreadyAttached), "the new backend stays attached");
        new.close().expect("close");
        assert!(disk.attach().is_ok());
    }

    #[test]
    fn a_power_cut_fails_the_sync_and_everything_after_it() {
        let disk = MemDisk::new();
        let backend = disk.attach().expect("attach");
        disk.cut_power_after_syncs(1);
        backend.write(0, b"one").expect("write");
        backend.sync_data().expect("first sync completes");
        backend.write(0, b"two").expect("write");
        assert!(backend.sync_data().is_err());
        assert!(backend.read(0, &mut [0; 3]).is_err());
        assert_eq!(disk.unsynced_write_sizes(), vec![3]);
        disk.crash(CrashMode::LoseUnsynced);
        assert_eq!(read_all(&disk.attach().expect("attach")), b"one");
    }

    #[test]
    fn growing_past_capacity_is_a_full_disk() {
        let disk = MemDisk::with_capacity(8);
        let backend = disk.attach().expect("attach");
        let err = backend.write(4, b"too long").expect_err("full");
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        assert!(backend.set_len(9).is_err());
        assert!(backend.read(0, &mut [0; 1]).is_err(), "nothing was written");
    }

    #[test]
    fn a_fork_is_independent() {
        let disk = MemDisk::new();
        let backend = disk.attach().expect("attach");
        backend.write(0, b"base").expect("write");
        backend.sync_data().expect("sync");
        backend.write(0, b"next").expect("write");
        let fork = disk.fork();
        fork.crash(CrashMode::TornPrefix { whole_writes: 1, torn_bytes: 0 });
        assert_eq!(read_all(&fork.attach().expect("attach fork")), b"next");
        assert_eq!(read_all(&backend), b"next", "the original still has its unsynced write");
        disk.crash(CrashMode::LoseUnsynced);
        assert_eq!(read_all(&disk.attach().expect("attach")), b"base");
    }
}
