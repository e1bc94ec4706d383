//! Typed values on top of the byte-oriented [`Storage`] and [`StorageTxn`]: postcard encoding,
//! with a value that does not decode reported as a fatal error naming its key.

use rollout_core::error::{Error, Result};
use rollout_core::traits::{Storage, StorageTxn};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Longest key rendering put in an error message; longer keys are cut and marked with `...`.
const KEY_DISPLAY_LEN_MAX: usize = 200;

/// A key as error messages show it: printable ASCII as is, other bytes as `\xNN` escapes, so
/// keys like `tasks/` followed by a binary id stay readable.
pub fn display_key(key: &[u8]) -> String {
    let mut shown = key.escape_ascii().to_string();
    if shown.len() > KEY_DISPLAY_LEN_MAX {
        // The escape output is ASCII, so any byte index is a char boundary.
        shown.truncate(KEY_DISPLAY_LEN_MAX);
        shown.push_str("...");
    }
    shown
}

/// Encodes `value` with postcard, as stored under `key` (the key only names the value in errors).
///
/// Fails with `Fatal::Internal` when the type cannot be encoded by postcard (e.g. a sequence of
/// unknown length).
pub fn encode_value<T: Serialize + ?Sized>(key: &[u8], value: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|err| {
        Error::internal(format!(
            "cannot encode the value for key \"{}\" as {}: {err}",
            display_key(key),
            std::any::type_name::<T>()
        ))
    })
}

/// Decodes the postcard bytes stored under `key`.
///
/// The bytes must be exactly one encoded `T`: trailing bytes mean the value was written as some
/// other type, and fail like any other mismatch. Fails with `Fatal::Internal` naming the key and
/// the type; never panics.
pub fn decode_value<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    let mismatch = |reason: String| {
        Error::internal(format!(
            "the stored value for key \"{}\" ({} bytes) does not decode as {}: {reason}",
            display_key(key),
            bytes.len(),
            std::any::type_name::<T>()
        ))
    };
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|err| mismatch(err.to_string()))?;
    if !rest.is_empty() {
        return Err(mismatch(format!("{} bytes left over after the value", rest.len())));
    }
    Ok(value)
}

fn decode_pairs<T: DeserializeOwned>(pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Result<Vec<(Vec<u8>, T)>> {
    pairs
        .into_iter()
        .map(|(key, bytes)| {
            let value = decode_value(&key, &bytes)?;
            Ok((key, value))
        })
        .collect()
}

/// Typed reads of committed values, for any [`Storage`] (`storage.get_value::<T>(key)`).
pub trait StorageExt: Storage {
    /// The committed value under `key`, decoded; `None` when there is none.
    fn get_value<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        self.get(key)?.map(|bytes| decode_value(key, &bytes)).transpose()
    }

    /// Every committed pair under `prefix`, in key order, decoded. Fails on the first value
    /// that does not decode.
    fn scan_values<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, T)>> {
        decode_pairs(self.scan(prefix)?)
    }
}

impl<S: Storage + ?Sized> StorageExt for S {}

/// Typed reads and writes inside a transaction, for any [`StorageTxn`]
/// (`txn.put_value(key, &value)`, `txn.get_value::<T>(key)`).
pub trait StorageTxnExt: StorageTxn {
    /// The value under `key` as this transaction sees it, decoded; `None` when there is none.
    fn get_value<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        self.get(key)?.map(|bytes| decode_value(key, &bytes)).transpose()
    }

    /// Every pair under `prefix` as this transaction sees it, in key order, decoded.
    fn scan_values<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, T)>> {
        decode_pairs(self.scan(prefix)?)
    }

    /// Encodes `value` with postcard and puts it under `key`.
    fn put_value<T: Serialize + ?Sized>(&mut self, key: &[u8], value: &T) -> Result<()> {
        let bytes = encode_value(key, value)?;
        self.put(key, &bytes)
    }
}

impl<X: StorageTxn + ?Sized> StorageTxnExt for X {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_display_readably() {
        assert_eq!(display_key(b"tasks/\x00\x01\xff"), "tasks/\\x00\\x01\\xff");
        let long = vec![b'k'; 500];
        assert_eq!(display_key(&long).len(), KEY_DISPLAY_LEN_MAX + 3);
    }

    #[test]
    fn values_round_trip_and_mismatches_name_the_key() {
        let bytes = encode_value(b"workers/7", &(7u32, "seven".to_string())).expect("encode");
        let back: (u32, String) = decode_value(b"workers/7", &bytes).expect("decode");
        assert_eq!(back, (7, "seven".to_string()));

        let err = decode_value::<String>(b"workers/7", &[0xff, 0xff]).expect_err("garbage");
        assert!(err.is_fatal());
        assert!(err.to_string().contains("workers/7"), "{err}");

        let err = decode_value::<u8>(b"workers/8", &bytes).expect_err("trailing bytes");
        assert!(err.to_string().contains("left over"), "{err}");
    }
}
