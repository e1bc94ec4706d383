//! [`DurableQueue`]: a bounded FIFO with acknowledgement, written through to a
//! [`Storage`].
//!
//! Every item is stored under `cloudlocal_queue/<ulid>` (the ULID in its 26-character
//! text form, which sorts like the number, i.e. by enqueue time) in its own committed
//! transaction before it enters the in-memory deque, and is deleted only when it is
//! acked. So the deque is a cache of storage in delivery order, and [`DurableQueue::open`]
//! rebuilds it by scanning the prefix.
//!
//! Delivery is at least once: an item popped but not acked when the process stops is
//! delivered again after [`DurableQueue::open`].

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rollout_core::traits::{Queue, QueueItemId, Storage};
use rollout_core::{Error, Recoverable, Result, RetryHint};
use rollout_storage::{decode_value, display_key, encode_value};
use serde::{Deserialize, Serialize};
use ulid::Ulid;

/// The storage key prefix of queued items; the rest of the key is the item's ULID.
pub const QUEUE_KEY_PREFIX: &str = "cloudlocal_queue/";

/// The most unacked items a queue holds unless [`DurableQueue::open_with_max_len`]
/// says otherwise (the largest job, `limits.max_tasks_per_job`).
pub const DEFAULT_MAX_LEN: usize = 1_000_000;

/// The length of a ULID's text form.
const ULID_TEXT_LEN: usize = 26;

/// The stored value. An enum so that postcard writes a variant index first: a later
/// format can be told apart from this one instead of being misread.
#[derive(Debug, Deserialize)]
enum StoredItem {
    V1(Vec<u8>),
}

/// The borrowed twin of [`StoredItem`], so a push does not copy the item to encode it.
/// `&[u8]` and `Vec<u8>` have the same postcard encoding (length, then bytes).
#[derive(Serialize)]
enum StoredItemRef<'a> {
    V1(&'a [u8]),
}

/// A durable, bounded [`Queue`] over a [`Storage`] (see the module docs).
///
/// Items are in one of two states: waiting (in the deque, counted by
/// [`Queue::len`]) or in flight (popped, not yet acked or nacked). Both are in
/// storage; the bound applies to their sum, which is what storage and a restart's
/// replay hold.
pub struct DurableQueue {
    storage: Arc<dyn Storage>,
    waiting: VecDeque<(QueueItemId, Vec<u8>)>,
    in_flight: BTreeSet<QueueItemId>,
    /// The largest id handed out or replayed; every new id is above it, even when the
    /// wall clock is in the same millisecond or went backwards.
    last_id: Ulid,
    max_len: usize,
}

impl fmt::Debug for DurableQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DurableQueue")
            .field("waiting", &self.waiting.len())
            .field("in_flight", &self.in_flight.len())
            .field("last_id", &self.last_id.to_string())
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl DurableQueue {
    /// Opens the queue stored in `storage`, bounded by [`DEFAULT_MAX_LEN`]: every
    /// unacked item is waiting again, in ULID (enqueue) order.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Self> {
        Self::open_with_max_len(storage, DEFAULT_MAX_LEN)
    }

    /// Like [`DurableQueue::open`], holding at most `max_len` unacked items. If storage
    /// already holds more (the limit was lowered), they are all replayed and pushes
    /// are refused until acks bring the count below `max_len`.
    pub fn open_with_max_len(storage: Arc<dyn Storage>, max_len: usize) -> Result<Self> {
        if max_len == 0 {
            return Err(Error::config_invalid("queue.max_len", "must be at least 1"));
        }
        let mut waiting = VecDeque::new();
        let mut last_id = Ulid::nil();
        for (key, value) in storage.scan(QUEUE_KEY_PREFIX.as_bytes())? {
            let id = parse_key(&key)?;
            // Scans are in key order and ULID text sorts like the number; check it,
            // since FIFO order rests on it.
            if !waiting.is_empty() && id <= last_id {
                return Err(Error::internal(format!(
                    "queue storage returned \"{}\" after {last_id}: keys under {QUEUE_KEY_PREFIX} are out of order",
                    display_key(&key)
                )));
            }
            // A value that does not decode exactly is an error naming its key.
            let StoredItem::V1(item) = decode_value(&key, &value)?;
            last_id = id;
            waiting.push_back((QueueItemId(id.0), item));
        }
        Ok(DurableQueue { storage, waiting, in_flight: BTreeSet::new(), last_id, max_len })
    }

    /// The most unacked (waiting + in flight) items this queue holds.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Items popped and neither acked nor nacked.
    pub fn in_flight_len(&self) -> usize {
        self.in_flight.len()
    }

    /// The storage key of `id`: `cloudlocal_queue/<ulid>`.
    pub fn key_of(id: QueueItemId) -> String {
        format!("{QUEUE_KEY_PREFIX}{}", Ulid(id.0))
    }

    /// A ULID above every one seen, so ids (and keys) strictly increase in push order.
    fn next_id(&mut self) -> Result<Ulid> {
        let fresh = Ulid::new();
        let id = if fresh > self.last_id {
            fresh
        } else {
            // Same millisecond with smaller random bits, or the clock went back:
            // continue from the last id instead.
            self.last_id.increment().ok_or_else(|| {
                Error::transient(
                    format!("queue ids exhausted after {}: wait for the clock to pass it", self.last_id),
                    RetryHint::After(Duration::from_millis(1)),
                )
            })?
        };
        self.last_id = id;
        Ok(id)
    }
}

impl Queue for DurableQueue {
    /// Commits the item to storage, then appends it to the deque. Beyond the bound it
    /// is [`Recoverable::ResourceExhausted`]: retry after acks drain the queue.
    fn push(&mut self, item: Vec<u8>) -> Result<QueueItemId> {
        let unacked = self.waiting.len() + self.in_flight.len();
        if unacked >= self.max_len {
            return Err(Error::recoverable(
                Recoverable::ResourceExhausted(format!(
                    "queue holds {unacked} unacked items, its limit (queue.max_len) is {}; \
                     ack items, or open the queue with a larger limit",
                    self.max_len
                )),
                RetryHint::Backoff,
            ));
        }
        let id = QueueItemId(self.next_id()?.0);
        let key = Self::key_of(id);
        let value = encode_value(key.as_bytes(), &StoredItemRef::V1(&item))?;
        let mut txn = self.storage.begin_write()?;
        txn.put(key.as_bytes(), &value)?;
        txn.commit()?;
        self.waiting.push_back((id, item));
        Ok(id)
    }

    fn pop(&mut self) -> Option<(QueueItemId, Vec<u8>)> {
        let (id, item) = self.waiting.pop_front()?;
        self.in_flight.insert(id);
        Some((id, item))
    }

    /// Deletes the item from storage (one committed transaction), then forgets it.
    /// Acking an id that is not stored (acked already) is a no-op, so a caller that
    /// crashed between its ack and its own bookkeeping can simply ack again. Acking a
    /// waiting item (e.g. one replayed after a restart that the caller had already
    /// handled) removes it from the deque too.
    fn ack(&mut self, id: QueueItemId) -> Result<()> {
        let key = Self::key_of(id);
        let mut txn = self.storage.begin_write()?;
        txn.delete(key.as_bytes())?;
        txn.commit()?;
        if !self.in_flight.remove(&id) {
            self.waiting.retain(|(waiting_id, _)| *waiting_id != id);
        }
        Ok(())
    }

    /// Puts an in-flight item back at the front; storage is untouched (it still holds
    /// the original bytes, which is what a restart replays, so pass back what was
    /// popped). A waiting id moves to the front; an id neither in flight nor waiting
    /// (acked, or never issued) is ignored, because it is no longer in storage and
    /// delivering it would break the contract that everything delivered is durable.
    fn nack(&mut self, id: QueueItemId, item: Vec<u8>) {
        if self.in_flight.remove(&id) {
            self.waiting.push_front((id, item));
        } else if let Some(entry) =
            self.waiting.iter().position(|(waiting_id, _)| *waiting_id == id).and_then(|at| self.waiting.remove(at))
        {
            self.waiting.push_front(entry);
        }
    }

    fn len(&self) -> usize {
        self.waiting.len()
    }
}

/// Parses `cloudlocal_queue/<ulid>`, insisting on the canonical text so that the key
/// order and the id order agree.
fn parse_key(key: &[u8]) -> Result<Ulid> {
    let bad = |why: &str| {
        Error::internal(format!(
            "queue storage key \"{}\" is not {QUEUE_KEY_PREFIX}<ulid>: {why}; it was written by another program",
            display_key(key)
        ))
    };
    let text = key
        .strip_prefix(QUEUE_KEY_PREFIX.as_bytes())
        .and_then(|rest| std::str::from_utf8(rest).ok())
        .ok_or_else(|| bad("not UTF-8 after the prefix"))?;
    if text.len() != ULID_TEXT_LEN {
        return Err(bad("the ULID is not 26 characters"));
    }
    let id = Ulid::from_string(text).map_err(|e| bad(&e.to_string()))?;
    if id.to_string() != text {
        return Err(bad("the ULID is not in canonical (upper-case Crockford) form"));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_and_owned_items_encode_alike() {
        let item = vec![0u8, 1, 2, 255, 7];
        let encoded = encode_value(b"k", &StoredItemRef::V1(&item)).expect("encode");
        let StoredItem::V1(decoded) = decode_value(b"k", &encoded).expect("decode");
        assert_eq!(decoded, item);
    }

    #[test]
    fn keys_round_trip_and_reject_non_canonical_text() {
        let id = Ulid::new();
        let key = DurableQueue::key_of(QueueItemId(id.0));
        assert_eq!(parse_key(key.as_bytes()).expect("canonical key"), id);
        let lower = format!("{QUEUE_KEY_PREFIX}{}", id.to_string().to_lowercase());
        let err = parse_key(lower.as_bytes()).expect_err("lower case");
        assert!(err.to_string().contains("canonical"), "{err}");
        assert!(parse_key(b"cloudlocal_queue/short").is_err());
        assert!(parse_key(b"cloudlocal_queue/\xff\xfe").is_err());
    }
}
