//! A write-ahead log in front of redb: a commit costs one sequential write and one
//! `fdatasync` of a few hundred bytes, where a durable redb commit writes its B-tree's
//! changed pages (about nine scattered 4 KiB pages for a small coordinator batch) and
//! syncs them.
//!
//! How it works, for [`crate::RedbStorage`]:
//! - A transaction's writes are encoded as they are made. Its commit appends them as one
//!   record to the log, syncs the log, and only then commits to redb with
//!   `Durability::None` (visible to readers, durable through the log).
//! - Every [`CHECKPOINT_COMMITS`] commits, when the next record would not fit in the log's
//!   capacity, or when one transaction's writes exceed [`RECORD_BYTES_MAX`] (or a quarter
//!   of the capacity), the commit is a
//!   durable redb commit instead (a *checkpoint*): it carries every earlier non-durable
//!   commit to the file with it, and the log starts again from its first byte.
//! - Every commit also stores its sequence number in redb (table `wal`), so the database
//!   knows which records it holds, whatever redb made durable.
//! - At open, the records after the database's sequence number are applied in one durable
//!   commit (replay), and the log starts again.
//!
//! The log is a file of preallocated zeros that records overwrite (`rollout.db.wal`
//! beside the database): it grows in [`GROW_STEP`] steps up to its capacity on the first
//! pass and is reused after each checkpoint, so a steady-state sync carries data, not a
//! change of the file's length or extents (on ext4 that halves its cost).
//!
//! Record: `len: u32 | crc32: u32 | seq: u64 | payload (len bytes)`, little endian; the
//! CRC covers the sequence number and the payload. The payload is the transaction's
//! writes in order: `1 | key_len: u32 | key | value_len: u32 | value` for a put, `0 |
//! key_len: u32 | key` for a delete. Replay follows the chain of valid records from the
//! log's start while each one's sequence number is its predecessor's plus one: a torn
//! record (bad CRC), the zeros past the end, or a record of an older pass ends it.
//!
//! A failed write or sync of the log poisons the storage: every later commit fails until
//! the process reopens it (after an fsync error the kernel may have dropped the pages, so
//! nothing about the record is known), and the replay at open decides.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::StorageBackend;
use rollout_core::{Error, Fatal, Result};

/// The default of `storage.wal_bytes`: no log. With it, a small commit is about 1.5x
/// faster (`make bench-storage`), but in `make bench-e2e` at half load the p99 of
/// submit-to-start was 25-73 ms against 9-15 ms without it, for a cause not found yet
/// (checkpointing every 64 commits instead of 4,096 did not mend it), so it is opt-in.
pub const DEFAULT_WAL_BYTES: u64 = 0;
/// A capacity to turn the log on with (what the benchmarks and the docs use).
pub const SUGGESTED_WAL_BYTES: u64 = 64 << 20;
/// The smallest capacity a log may have (a smaller one would checkpoint on every commit).
pub const WAL_BYTES_MIN: u64 = 1 << 20;
/// The largest capacity a log may have (replay reads it whole into memory).
pub const WAL_BYTES_MAX: u64 = 1 << 30;
/// Commits between two checkpoints at most, however small: redb reuses the pages that
/// non-durable commits free only after the next durable one, so this bounds the file's
/// growth between checkpoints too.
pub const CHECKPOINT_COMMITS: u64 = 4096;
/// The largest payload a commit logs; a larger one (a batch of thousands of writes) commits
/// durably to redb instead, a checkpoint: its page writes are already amortized over many
/// keys, and logging it would write its bytes twice (the log now, the pages at the next
/// checkpoint).
pub const RECORD_BYTES_MAX: usize = 64 << 10;
/// The log file grows by this much at a time on its first pass (zeros written and synced).
pub const GROW_STEP: u64 = 1 << 20;

const HEADER_BYTES: usize = 16;
const PUT: u8 = 1;
const DELETE: u8 = 0;

/// Each written key's value in a replayed record, in the order written (`None`: deleted).
pub(crate) type LoggedWrites = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Appends a put to a record's payload.
pub(crate) fn encode_put(payload: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    payload.push(PUT);
    encode_bytes(payload, key);
    encode_bytes(payload, value);
}

/// Appends a delete to a record's payload.
pub(crate) fn encode_delete(payload: &mut Vec<u8>, key: &[u8]) {
    payload.push(DELETE);
    encode_bytes(payload, key);
}

fn encode_bytes(payload: &mut Vec<u8>, bytes: &[u8]) {
    // A key or value is at most redb's 3 GiB, so its length fits a u32.
    payload.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    payload.extend_from_slice(bytes);
}

/// Decodes a record's payload (one that passed its CRC, so an error here is a bug or
/// damage the CRC missed).
fn decode_payload(mut payload: &[u8]) -> std::result::Result<LoggedWrites, String> {
    fn take<'a>(payload: &mut &'a [u8], n: usize) -> std::result::Result<&'a [u8], String> {
        if payload.len() < n {
            return Err(format!("a record's payload ends {} bytes early", n - payload.len()));
        }
        let (head, rest) = payload.split_at(n);
        *payload = rest;
        Ok(head)
    }
    fn bytes(payload: &mut &[u8]) -> std::result::Result<Vec<u8>, String> {
        let len = u32::from_le_bytes(take(payload, 4)?.try_into().expect("4 bytes")) as usize;
        Ok(take(payload, len)?.to_vec())
    }
    let mut writes = Vec::new();
    while let Some((&op, rest)) = payload.split_first() {
        payload = rest;
        let key = bytes(&mut payload)?;
        match op {
            PUT => writes.push((key, Some(bytes(&mut payload)?))),
            DELETE => writes.push((key, None)),
            other => return Err(format!("unknown write kind {other} in a record")),
        }
    }
    Ok(writes)
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// The log's state; the storage holds it under a lock, taken by each commit.
pub(crate) struct Wal {
    backend: Box<dyn StorageBackend>,
    location: PathBuf,
    capacity: u64,
    /// The file's length: zeros or records up to here.
    len: u64,
    /// Where the next record goes.
    tail: u64,
    /// The sequence number the next commit gets.
    next_seq: u64,
    since_checkpoint: u64,
    /// Why the log refuses further commits, once a write or sync of it failed.
    failed: Option<String>,
}

/// What [`Wal::open`] found to replay: records after the database's sequence number, in order.
pub(crate) struct Replay {
    pub records: Vec<(u64, LoggedWrites)>,
    /// The sequence number the database holds once they are applied.
    pub last_seq: u64,
}

impl Wal {
    /// Reads the log at `location` (through `backend`) and finds the records after
    /// `durable_seq`, the sequence number the database holds. The log starts again from
    /// its first byte once the caller has applied them durably ([`Wal::checkpointed`]).
    pub(crate) fn open(
        backend: Box<dyn StorageBackend>,
        location: &Path,
        capacity: u64,
        durable_seq: u64,
    ) -> Result<(Wal, Replay)> {
        let io = |what: &str, err: std::io::Error| {
            Error::internal(format!("{}: cannot {what} the write-ahead log: {err}", location.display()))
        };
        let len = backend.len().map_err(|e| io("read the length of", e))?;
        if len > WAL_BYTES_MAX {
            return Err(Fatal::Corrupt {
                path: location.to_path_buf(),
                reason: format!("the write-ahead log is {len} bytes, more than a log may hold ({WAL_BYTES_MAX})"),
            }
            .into());
        }
        let mut bytes = vec![0; len as usize];
        backend.read(0, &mut bytes).map_err(|e| io("read", e))?;
        let replay =
            replay(&bytes, durable_seq).map_err(|reason| Fatal::Corrupt { path: location.to_path_buf(), reason })?;
        let wal = Wal {
            backend,
            location: location.to_path_buf(),
            capacity,
            len,
            tail: 0,
            next_seq: replay.last_seq + 1,
            since_checkpoint: 0,
            failed: None,
        };
        Ok((wal, replay))
    }

    /// The sequence number the next commit gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The largest payload worth logging (a quarter of the log, at most
    /// [`RECORD_BYTES_MAX`]); a larger transaction commits as a checkpoint.
    pub(crate) fn payload_limit(&self) -> usize {
        usize::try_from(self.capacity / 4).unwrap_or(usize::MAX).min(RECORD_BYTES_MAX)
    }

    /// Fails once a write or sync of the log has failed.
    pub(crate) fn usable(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(why) => Err(Error::internal(format!(
                "{}: the write-ahead log failed earlier ({why}); no commit is taken until the process restarts and \
                 replays it",
                self.location.display()
            ))),
        }
    }

    /// Whether a commit of `payload_len` bytes of writes should be a checkpoint instead of a
    /// record (`None`: its writes were too many to log).
    pub(crate) fn wants_checkpoint(&self, payload_len: Option<usize>) -> bool {
        match payload_len {
            None => true,
            Some(len) => {
                self.since_checkpoint >= CHECKPOINT_COMMITS
                    || len > self.payload_limit()
                    || self.tail + (HEADER_BYTES + len) as u64 > self.capacity
            }
        }
    }

    /// Appends the record of the next commit and syncs it: once this returns `Ok`, the
    /// commit is durable. A failure poisons the log.
    pub(crate) fn append(&mut self, payload: &[u8]) -> Result<()> {
        self.usable()?;
        let seq = self.next_seq;
        let mut record = Vec::with_capacity(HEADER_BYTES + payload.len());
        record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        record.extend_from_slice(&checksum(seq, payload).to_le_bytes());
        record.extend_from_slice(&seq.to_le_bytes());
        record.extend_from_slice(payload);
        let end = self.tail + record.len() as u64;
        let written = self.grow_to(end).and_then(|()| {
            self.backend.write(self.tail, &record)?;
            self.backend.sync_data()
        });
        if let Err(err) = written {
            let why = err.to_string();
            self.failed = Some(why.clone());
            return Err(Error::internal(format!(
                "{}: cannot write the write-ahead log: {why}; the commit is not taken, and no later one is until the \
                 process restarts",
                self.location.display()
            )));
        }
        self.tail = end;
        self.next_seq += 1;
        self.since_checkpoint += 1;
        Ok(())
    }

    /// Extends the file with zeros (in [`GROW_STEP`]s, up to the capacity) until it holds `end`.
    fn grow_to(&mut self, end: u64) -> std::io::Result<()> {
        if end <= self.len {
            return Ok(());
        }
        let target = end.div_ceil(GROW_STEP).saturating_mul(GROW_STEP).min(self.capacity.max(end));
        let zeros = vec![0; (target - self.len).min(GROW_STEP) as usize];
        while self.len < target {
            let n = (target - self.len).min(zeros.len() as u64) as usize;
            self.backend.write(self.len, &zeros[..n])?;
            self.len += n as u64;
        }
        Ok(())
    }

    /// A commit that did not append a record (a checkpoint) is durable in the database at
    /// `seq`: the log starts again from its first byte.
    pub(crate) fn checkpointed(&mut self, seq: u64) {
        self.tail = 0;
        self.since_checkpoint = 0;
        self.next_seq = seq + 1;
    }

    /// A commit whose record is durable but whose redb commit failed: the database and
    /// the log disagree until a replay, so no later commit is taken.
    pub(crate) fn fail(&mut self, why: String) {
        self.failed = Some(why);
    }

    /// Empties the file (the log is turned off and its records are in the database).
    pub(crate) fn truncate(&mut self) -> Result<()> {
        let done = self.backend.set_len(0).and_then(|()| self.backend.sync_data());
        done.map_err(|err| {
            Error::internal(format!("{}: cannot empty the write-ahead log: {}", self.location.display(), err))
        })?;
        self.len = 0;
        self.tail = 0;
        Ok(())
    }
}

/// Follows the chain of valid records from the start of `log` and keeps those after
/// `durable_seq`.
fn replay(log: &[u8], durable_seq: u64) -> std::result::Result<Replay, String> {
    let mut records = Vec::new();
    let mut offset = 0usize;
    let mut previous: Option<u64> = None;
    while offset + HEADER_BYTES <= log.len() {
        let header = &log[offset..offset + HEADER_BYTES];
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let Some(payload) = log.get(offset + HEADER_BYTES..offset + HEADER_BYTES + len) else { break };
        if len == 0 || checksum(seq, payload) != crc || previous.is_some_and(|p| seq != p + 1) {
            break;
        }
        if seq > durable_seq {
            if records.is_empty() && seq != durable_seq + 1 {
                return Err(format!(
                    "the write-ahead log goes on from commit {seq}, but the database holds commits up to {durable_seq} \
                     only: commits in between are lost (was the database file replaced?)"
                ));
            }
            let writes = decode_payload(payload).map_err(|e| format!("record of commit {seq}: {e}"))?;
            records.push((seq, writes));
        }
        previous = Some(seq);
        offset += HEADER_BYTES + len;
    }
    let last_seq = records.last().map_or(durable_seq, |(seq, _)| *seq);
    Ok(Replay { records, last_seq })
}

/// Each key's last value over the replayed records, for one transaction that applies them.
pub(crate) fn merged(records: Vec<(u64, LoggedWrites)>) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
    let mut merged = BTreeMap::new();
    for (_, writes) in records {
        merged.extend(writes);
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, writes: &[(&[u8], Option<&[u8]>)]) -> Vec<u8> {
        let mut payload = Vec::new();
        for (key, value) in writes {
            match value {
                Some(value) => encode_put(&mut payload, key, value),
                None => encode_delete(&mut payload, key),
            }
        }
        let mut out = (payload.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&checksum(seq, &payload).to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    fn seqs(replay: &Replay) -> Vec<u64> {
        replay.records.iter().map(|(seq, _)| *seq).collect()
    }

    #[test]
    fn replay_follows_the_chain_after_the_durable_sequence_number() {
        let mut log = record(5, &[(b"a", Some(b"1"))]);
        log.extend(record(6, &[(b"a", None), (b"b", Some(b"2"))]));
        log.extend(record(7, &[(b"c", Some(b""))]));
        log.extend(vec![0; 64]);
        let all = replay(&log, 4).expect("replay");
        assert_eq!(seqs(&all), vec![5, 6, 7]);
        assert_eq!(all.records[1].1, vec![(b"a".to_vec(), None), (b"b".to_vec(), Some(b"2".to_vec()))]);
        assert_eq!(all.last_seq, 7);
        let tail = replay(&log, 6).expect("replay");
        assert_eq!(seqs(&tail), vec![7]);
        let none = replay(&log, 7).expect("replay");
        assert!(none.records.is_empty() && none.last_seq == 7);
        let merged = merged(all.records);
        assert_eq!(merged.get(b"a".as_slice()), Some(&None));
        assert_eq!(merged.get(b"c".as_slice()), Some(&Some(Vec::new())));
    }

    #[test]
    fn a_torn_record_or_one_of_an_older_pass_ends_the_chain() {
        let mut log = record(10, &[(b"k", Some(b"v10"))]);
        let torn_at = log.len();
        log.extend(record(11, &[(b"k", Some(b"v11"))]));
        let mut torn = log.clone();
        let last = torn.len() - 1;
        torn[last] ^= 0xff;
        assert_eq!(seqs(&replay(&torn, 9).expect("replay")), vec![10]);
        // A record cut short by the end of the file.
        assert_eq!(seqs(&replay(&log[..log.len() - 1], 9).expect("replay")), vec![10]);
        // After record 10 comes an older pass's record 3: the chain ends there.
        let mut older = log[..torn_at].to_vec();
        older.extend(record(3, &[(b"old", Some(b"x"))]));
        assert_eq!(seqs(&replay(&older, 9).expect("replay")), vec![10]);
    }

    #[test]
    fn the_configured_default_is_this_default() {
        assert_eq!(rollout_core::config::StorageConfig::default().wal_bytes, DEFAULT_WAL_BYTES);
    }

    #[test]
    fn a_log_that_skips_past_the_database_is_corrupt_naming_both_numbers() {
        let log = record(12, &[(b"k", Some(b"v"))]);
        let err = replay(&log, 9).err().expect("a gap");
        assert!(err.contains("commit 12") && err.contains("up to 9"), "{err}");
    }
}
