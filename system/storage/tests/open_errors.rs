//! Opening something that is not our database, or one someone else holds, is a clear `Fatal`
//! error naming the file, never a panic.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use rollout_core::error::{Error, Fatal};
use rollout_core::traits::Storage;
use rollout_storage::{CrashMode, MemDisk, RedbStorage};

fn open_error(path: &Path) -> Error {
    RedbStorage::open(path).expect_err("opening must fail")
}

fn assert_corrupt_naming(err: &Error, path: &Path) {
    match err {
        Error::Fatal(Fatal::Corrupt { path: named, .. }) => assert_eq!(named, path),
        other => panic!("expected Fatal::Corrupt for {}, got {other:?}", path.display()),
    }
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

/// A deterministic stand-in for random bytes (no RNG in this crate's tests either).
fn noise(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

#[test]
fn a_text_file_is_reported_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "these are my notes, not a database\n").expect("write");
    let err = open_error(&path);
    assert_corrupt_naming(&err, &path);
    assert!(err.to_string().contains("not a rollout database"), "{err}");
    // The file is left as it was.
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "these are my notes, not a database\n");
}

#[test]
fn a_file_of_random_bytes_is_reported_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("random.db");
    std::fs::write(&path, noise(64 * 1024)).expect("write");
    assert_corrupt_naming(&open_error(&path), &path);
}

#[test]
fn a_tiny_file_is_reported_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.db");
    std::fs::write(&path, b"x").expect("write");
    assert_corrupt_naming(&open_error(&path), &path);
}

#[test]
fn a_database_with_its_body_overwritten_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("damaged.db");
    {
        let storage = RedbStorage::open(&path).expect("create");
        let mut txn = storage.begin_write().expect("begin");
        for index in 0..2000u32 {
            txn.put(&index.to_be_bytes(), &[1; 64]).expect("put");
        }
        txn.commit().expect("commit");
    }
    // Keep redb's header (magic number, commit slots) and scribble over everything after it.
    let mut bytes = std::fs::read(&path).expect("read");
    let header_len = 4096.min(bytes.len());
    let body_len = bytes.len() - header_len;
    bytes[header_len..].copy_from_slice(&noise(body_len));
    std::fs::write(&path, &bytes).expect("write");

    // Without the integrity check on open, redb trusts a cleanly closed file and panics here.
    assert_corrupt_naming(&open_error(&path), &path);
}

#[test]
fn a_directory_in_place_of_the_file_is_a_config_error_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = open_error(dir.path());
    assert!(matches!(err, Error::Fatal(Fatal::ConfigInvalid { .. })), "{err:?}");
    assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
}

#[test]
fn a_file_open_in_another_handle_is_refused_until_it_closes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rollout.db");
    let first = RedbStorage::open(&path).expect("first open");
    let err = open_error(&path);
    assert!(matches!(err, Error::Fatal(Fatal::ConfigInvalid { .. })), "{err:?}");
    assert!(err.to_string().contains("already open"), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    drop(first);
    RedbStorage::open(&path).expect("open after the first handle closed");
}

#[test]
fn a_memdisk_open_in_another_handle_is_refused_until_it_closes_or_crashes() {
    let disk = MemDisk::new();
    let first = RedbStorage::open_in_memory(&disk).expect("first open");
    let err = RedbStorage::open_in_memory(&disk).expect_err("second open");
    assert!(err.to_string().contains("already open"), "{err}");
    drop(first);
    let second = RedbStorage::open_in_memory(&disk).expect("open after close");
    disk.crash(CrashMode::LoseUnsynced);
    let _third = RedbStorage::open_in_memory(&disk).expect("open after a crash");
    drop(second);
}

#[test]
fn a_memdisk_holding_garbage_is_reported_corrupt() {
    let disk = MemDisk::new();
    disk.overwrite(noise(16 * 1024));
    let err = RedbStorage::open_in_memory(&disk).expect_err("garbage");
    assert!(matches!(err, Error::Fatal(Fatal::Corrupt { .. })), "{err:?}");
}

/// The environment variable that turns the test below into the process holding the lock.
const LOCK_HOLDER_ENV: &str = "ROLLOUT_STORAGE_TEST_LOCK_HOLDER";

/// Run as a child by the test below: opens the database, says so, and holds it until its
/// stdin closes. Does nothing when run as an ordinary test.
#[test]
fn lock_holder_child() {
    let Some(path) = std::env::var_os(LOCK_HOLDER_ENV) else { return };
    let _storage = RedbStorage::open(&path).expect("child opens the database");
    println!("holding");
    std::io::stdout().flush().expect("flush");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
}

#[test]
fn a_file_open_in_another_process_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rollout.db");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "lock_holder_child", "--nocapture", "--test-threads=1"])
        .env(LOCK_HOLDER_ENV, &path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the lock holder");
    let mut child_output = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
    let held = child_output.by_ref().map_while(Result::ok).any(|line| line.contains("holding"));
    assert!(held, "the child never opened the database");

    let err = open_error(&path);
    assert!(err.to_string().contains("already open"), "{err}");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");

    // Closing its stdin lets the child finish; its remaining output is drained so it can exit.
    drop(child.stdin.take());
    child_output.for_each(drop);
    assert!(child.wait().expect("wait for the child").success());
    RedbStorage::open(&path).expect("open once the other process exited");
}
