//! `rollout-storage`: rollout's durable state on [redb].
//!
//! - [`RedbStorage`] implements [`rollout_core::traits::Storage`]: one table of byte keys to
//!   opaque byte values, every commit fsynced (`Durability::Immediate`), scans in key order.
//!   It runs over a file ([`RedbStorage::open`], default [`DEFAULT_PATH`]) or over a
//!   [`MemDisk`] ([`RedbStorage::open_in_memory`]).
//! - [`MemDisk`] is the simulator's disk: it keeps durable and unsynced bytes apart, and
//!   [`MemDisk::crash`] loses (or tears, or reorders) what was not synced, deterministically.
//! - [`StorageExt`] and [`StorageTxnExt`] read and write postcard-encoded values; a value
//!   that does not decode is a fatal error naming its key.
//! - With the `watch` feature, [`RedbStorage::watch`] streams committed changes under a prefix
//!   over a tokio broadcast channel.
//!
//! Architecture invariant: without the `watch` feature this crate depends on no async runtime,
//! so the sans-IO machines may depend on it. It reads no clock and draws no random number.

mod mem_disk;
mod redb_storage;
mod values;
pub mod wal;
#[cfg(feature = "watch")]
mod watch;

pub mod pipeline;

pub use mem_disk::{CrashMode, DEFAULT_CAPACITY_BYTES, MemDisk, MemDiskBackend, MemDiskError};
pub use redb_storage::{DEFAULT_PATH, OpenOptions, RedbStorage, wal_path};
pub use values::{StorageExt, StorageTxnExt, decode_value, display_key, encode_value};
#[cfg(feature = "watch")]
pub use watch::{WATCH_CHANNEL_CAPACITY, WatchEvent};
