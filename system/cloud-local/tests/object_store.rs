//! FsObjectStore: round trips, the on-disk layout, the sidecar, idempotency, missing
//! and damaged objects, and streamed puts and gets of blobs larger than a chunk.

use std::fs;
use std::io::{self, Read};
use std::path::Path;

use rollout_cloud_local::{CHUNK_BYTES, FsObjectStore, ObjectMeta};
use rollout_core::traits::ObjectStore;
use rollout_core::{ContentId, Error, Fatal};
use tempfile::TempDir;

fn store() -> (TempDir, FsObjectStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FsObjectStore::open(dir.path().join("object-store")).expect("open store");
    (dir, store)
}

/// Deterministic, non-repeating-looking bytes (so a misplaced chunk changes the hash).
fn blob(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).expect("under dir").to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn put_then_get_returns_the_same_bytes_under_their_sha256() {
    let (_dir, store) = store();
    let id = store.put(b"hello").expect("put");
    assert_eq!(id, ContentId::of(b"hello"));
    assert_eq!(store.get(&id).expect("get"), b"hello");

    let empty = store.put(b"").expect("put empty");
    assert_eq!(empty.to_hex(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_eq!(store.get(&empty).expect("get empty"), b"");
}

#[test]
fn objects_are_sharded_by_the_first_two_bytes_with_a_sidecar() {
    let (_dir, store) = store();
    let id = store.put(b"layout").expect("put");
    let hex = id.to_hex();
    let (ab, cd) = (&hex[0..2], &hex[2..4]);

    assert_eq!(store.object_path(&id), store.root().join(ab).join(cd).join(&hex));
    assert_eq!(store.meta_path(&id), store.root().join(ab).join(cd).join(format!("{hex}.meta.json")));
    assert_eq!(fs::read(store.object_path(&id)).expect("object file"), b"layout");
    // Only the object and its sidecar; the upload's tmp files are gone.
    assert_eq!(files_under(store.root()), vec![format!("{ab}/{cd}/{hex}"), format!("{ab}/{cd}/{hex}.meta.json")]);
}

#[test]
fn the_sidecar_records_id_and_size() {
    let (_dir, store) = store();
    let id = store.put(b"twelve bytes").expect("put");
    let json: serde_json::Value =
        serde_json::from_slice(&fs::read(store.meta_path(&id)).expect("sidecar")).expect("sidecar is JSON");
    assert_eq!(json["content_id"], id.to_hex());
    assert_eq!(json["size_bytes"], 12);
    assert!(json["created_unix_ms"].as_u64().is_some_and(|ms| ms > 1_600_000_000_000), "{json}");

    let meta: ObjectMeta = store.meta(&id).expect("meta");
    assert_eq!((meta.content_id, meta.size_bytes), (id, 12));

    fs::write(store.meta_path(&id), "{not json").expect("damage sidecar");
    let err = store.meta(&id).expect_err("damaged sidecar");
    assert!(matches!(&err, Error::Fatal(Fatal::Corrupt { path, .. }) if *path == store.meta_path(&id)), "{err}");
}

#[test]
fn exists_tracks_puts() {
    let (_dir, store) = store();
    let id = ContentId::of(b"later");
    assert!(!store.exists(&id).expect("exists"));
    store.put(b"later").expect("put");
    assert!(store.exists(&id).expect("exists"));
}

#[test]
fn putting_the_same_bytes_again_is_a_no_op() {
    let (_dir, store) = store();
    let id = store.put(b"same").expect("first put");
    let meta_before = fs::read(store.meta_path(&id)).expect("sidecar");
    let modified_before = fs::metadata(store.object_path(&id)).and_then(|m| m.modified()).expect("mtime");

    assert_eq!(store.put(b"same").expect("second put"), id);
    assert_eq!(store.put_stream(&mut &b"same"[..]).expect("streamed put"), id);

    assert_eq!(fs::read(store.meta_path(&id)).expect("sidecar"), meta_before, "sidecar not rewritten");
    let modified_after = fs::metadata(store.object_path(&id)).and_then(|m| m.modified()).expect("mtime");
    assert_eq!(modified_after, modified_before, "object not rewritten");
    assert_eq!(files_under(store.root()).len(), 2, "no leftover tmp files");
}

#[test]
fn a_missing_object_is_fatal_internal_naming_id_and_path() {
    let (_dir, store) = store();
    let id = ContentId::of(b"never stored");
    let expected = format!("object not found: {id} (looked in {})", store.object_path(&id).display());

    for err in [
        store.get(&id).expect_err("get"),
        store.get_stream(&id, &mut io::sink()).expect_err("get_stream"),
        store.verify(&id).expect_err("verify"),
        store.meta(&id).expect_err("meta"),
    ] {
        assert_eq!(err, Error::Fatal(Fatal::Internal(expected.clone())));
    }
}

#[test]
fn a_streamed_multi_mib_blob_round_trips_in_chunks() {
    let (_dir, store) = store();
    let bytes = blob(5 * 1024 * 1024 + 123); // not a multiple of the chunk size

    // A reader that hands out little at a time, as a socket would.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(CHUNK_BYTES / 3 + 1);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    let id = store.put_stream(&mut Trickle(&bytes)).expect("put_stream");
    assert_eq!(id, ContentId::of(&bytes));
    assert_eq!(store.meta(&id).expect("meta").size_bytes, bytes.len() as u64);

    let mut out = Vec::new();
    assert_eq!(store.get_stream(&id, &mut out).expect("get_stream"), bytes.len() as u64);
    assert!(out == bytes, "streamed bytes differ");
    assert!(store.get(&id).expect("get") == bytes, "whole get differs");
}

#[test]
fn a_damaged_object_is_detected_not_returned() {
    let (_dir, store) = store();
    let id = store.put(&blob(3 * CHUNK_BYTES)).expect("put");
    let path = store.object_path(&id);
    let mut bytes = fs::read(&path).expect("object");
    bytes[CHUNK_BYTES + 7] ^= 0x01; // one flipped bit in the middle chunk
    fs::write(&path, &bytes).expect("damage object");

    let expect_corrupt = |err: Error| match err {
        Error::Fatal(Fatal::Corrupt { path: at, reason }) => {
            assert_eq!(at, path);
            assert!(reason.contains(&id.to_hex()), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    };
    expect_corrupt(store.get(&id).expect_err("get"));
    expect_corrupt(store.get_stream(&id, &mut io::sink()).expect_err("get_stream"));
    expect_corrupt(store.verify(&id).expect_err("verify"));

    // A truncated file is damage too.
    fs::write(&path, &bytes[..10]).expect("truncate object");
    expect_corrupt(store.verify(&id).expect_err("verify truncated"));
}

#[test]
fn a_failing_stream_or_an_oversized_object_leaves_nothing_behind() {
    let (_dir, store) = store();

    struct Broken(usize);
    impl Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0 == 0 {
                return Err(io::Error::new(io::ErrorKind::ConnectionReset, "peer went away"));
            }
            let n = buf.len().min(self.0);
            buf[..n].fill(7);
            self.0 -= n;
            Ok(n)
        }
    }
    let err = store.put_stream(&mut Broken(CHUNK_BYTES * 2)).expect_err("reader fails");
    assert!(err.to_string().contains("peer went away"), "{err}");

    let limited = store.clone().with_max_object_bytes(1000);
    let err = limited.put(&[0u8; 1001]).expect_err("too big");
    assert!(matches!(err, Error::Fatal(Fatal::InvalidInput(_))), "{err}");
    let err = limited.put_stream(&mut &[0u8; 5000][..]).expect_err("too big, streamed");
    assert!(matches!(err, Error::Fatal(Fatal::InvalidInput(_))), "{err}");

    assert!(files_under(store.root()).is_empty(), "{:?}", files_under(store.root()));
}

#[test]
fn stale_tmp_files_are_swept_on_request() {
    let (_dir, store) = store();
    fs::write(store.root().join("tmp").join("abandoned.tmp"), b"half an upload").expect("plant tmp file");
    assert_eq!(store.remove_stale_tmp(std::time::Duration::from_secs(3600)).expect("sweep"), 0, "too young");
    assert_eq!(store.remove_stale_tmp(std::time::Duration::ZERO).expect("sweep"), 1);
    assert!(files_under(store.root()).is_empty());
}

#[test]
fn reopening_finds_earlier_objects() {
    let (dir, store) = store();
    let id = store.put(b"durable").expect("put");
    drop(store);
    let store = FsObjectStore::open(dir.path().join("object-store")).expect("reopen");
    assert_eq!(store.get(&id).expect("get"), b"durable");
}
