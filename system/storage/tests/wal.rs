//! The write-ahead log under crashes: whatever a crash keeps of the log's and the database's
//! unsynced writes (lost, torn, reordered) and wherever power is cut, a reopened storage
//! holds exactly the commits that returned `Ok`, plus at most the one that was in flight.

use std::collections::BTreeMap;

use proptest::prelude::*;
use rollout_core::traits::Storage;
use rollout_storage::{CrashMode, MemDisk, RedbStorage};

/// Small enough that the runs below wrap the log and checkpoint many times.
const LOG_BYTES: u64 = 8 * 1024;

type Model = BTreeMap<Vec<u8>, Vec<u8>>;
type Commit = Vec<(u8, Option<usize>)>;
type Change = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

fn open(disk: &MemDisk, log: &MemDisk) -> RedbStorage {
    RedbStorage::open_in_memory_with_wal(disk, log, LOG_BYTES).expect("open")
}

fn value(key: u8, len: usize, round: usize) -> Vec<u8> {
    format!("{key}:{round}:").into_bytes().into_iter().cycle().take(len).collect()
}

/// Runs one transaction; its outcome and its change (each key's last write; `None`: deleted).
fn commit(storage: &RedbStorage, writes: &Commit, round: usize) -> (Result<(), String>, Change) {
    let mut change = Change::new();
    let outcome = (|| {
        let mut txn = storage.begin_write().map_err(|e| e.to_string())?;
        for (key, len) in writes {
            let k = vec![b'k', *key];
            let v = len.map(|len| value(*key, len, round));
            match &v {
                Some(v) => txn.put(&k, v).map_err(|e| e.to_string())?,
                None => drop(txn.delete(&k).map_err(|e| e.to_string())?),
            }
            change.insert(k, v);
        }
        txn.commit().map_err(|e| e.to_string())
    })();
    (outcome, change)
}

fn apply(model: &Model, change: &Change) -> Model {
    let mut next = model.clone();
    for (k, v) in change {
        match v {
            Some(v) => next.insert(k.clone(), v.clone()),
            None => next.remove(k),
        };
    }
    next
}

fn contents(storage: &RedbStorage) -> Model {
    storage.scan(b"").expect("scan").into_iter().collect()
}

fn crash_mode(choice: u8, a: usize, b: usize, sizes: &[usize]) -> CrashMode {
    match choice % 3 {
        0 => CrashMode::LoseUnsynced,
        1 => CrashMode::TornPrefix { whole_writes: a % (sizes.len() + 1), torn_bytes: b },
        _ => CrashMode::Reordered { kept_writes: (0..sizes.len()).filter(|i| (a >> (i % 16)) & 1 == 1).collect() },
    }
}

fn commit_strategy() -> impl Strategy<Value = Commit> {
    // A few values are over a quarter of the log, so their commits are checkpoints.
    prop::collection::vec(
        (0u8..12, prop::option::weighted(0.8, prop_oneof![9 => 1usize..300, 1 => 2100usize..3000])),
        0..6,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_crash_keeps_exactly_the_acknowledged_commits(
        commits in prop::collection::vec(commit_strategy(), 1..60),
        cut_at in prop::option::of(0usize..60),
        cut_log in any::<bool>(),
        modes in (any::<u8>(), any::<usize>(), 0usize..5000, any::<u8>(), any::<usize>(), 0usize..5000),
    ) {
        let (disk, log) = (MemDisk::new(), MemDisk::new());
        let mut model = Model::new();
        let mut in_flight: Option<Model> = None;
        {
            let storage = open(&disk, &log);
            for (round, writes) in commits.iter().enumerate() {
                if cut_at == Some(round) {
                    if cut_log { log.cut_power_after_syncs(0) } else { disk.cut_power_after_syncs(0) }
                }
                let (outcome, change) = commit(&storage, writes, round);
                match outcome {
                    Ok(()) => model = apply(&model, &change),
                    Err(_) => {
                        in_flight = Some(apply(&model, &change));
                        break;
                    }
                }
            }
            // The storage is dropped with the process: no clean close reaches the disks
            // after a power cut, and without one the crash below discards what was unsynced.
            drop(storage);
        }
        let (disk_sizes, log_sizes) = (disk.unsynced_write_sizes(), log.unsynced_write_sizes());
        disk.crash(crash_mode(modes.0, modes.1, modes.2, &disk_sizes));
        log.crash(crash_mode(modes.3, modes.4, modes.5, &log_sizes));
        let reopened = open(&disk, &log);
        let found = contents(&reopened);
        prop_assert!(
            found == model || in_flight.as_ref() == Some(&found),
            "after the crash the storage holds {} keys; acknowledged {}, in flight {:?}",
            found.len(), model.len(), in_flight.as_ref().map(Model::len)
        );
        // And it goes on: a commit after the replay lands and survives another crash.
        let (outcome, change) = commit(&reopened, &vec![(99, Some(7))], 1000);
        prop_assert!(outcome.is_ok(), "{outcome:?}");
        let expected = apply(&found, &change);
        drop(reopened);
        disk.crash(CrashMode::LoseUnsynced);
        log.crash(CrashMode::LoseUnsynced);
        prop_assert_eq!(contents(&open(&disk, &log)), expected);
    }
}

#[test]
fn a_small_commit_syncs_the_log_once_and_the_database_not_at_all() {
    let (disk, log) = (MemDisk::new(), MemDisk::new());
    let storage = RedbStorage::open_in_memory_with_wal(&disk, &log, 1 << 20).expect("open");
    let put = |i: u32| {
        let mut txn = storage.begin_write().expect("begin");
        txn.put(&i.to_be_bytes(), &[7; 200]).expect("put");
        txn.commit().expect("commit");
    };
    put(0);
    let (disk_syncs, log_syncs) = (disk.syncs_completed(), log.syncs_completed());
    for i in 1..=10 {
        put(i);
    }
    assert_eq!(log.syncs_completed() - log_syncs, 10, "one log sync per commit");
    assert_eq!(disk.syncs_completed() - disk_syncs, 0, "the database is synced at checkpoints only");
    // A crash that loses everything unsynced keeps all eleven.
    drop(storage);
    disk.crash(CrashMode::LoseUnsynced);
    log.crash(CrashMode::LoseUnsynced);
    let reopened = RedbStorage::open_in_memory_with_wal(&disk, &log, 1 << 20).expect("reopen");
    assert_eq!(reopened.scan(b"").expect("scan").len(), 11);
}

#[test]
fn a_failed_log_sync_refuses_every_later_commit_until_a_reopen() {
    let (disk, log) = (MemDisk::new(), MemDisk::new());
    let storage = RedbStorage::open_in_memory_with_wal(&disk, &log, 1 << 20).expect("open");
    log.cut_power_after_syncs(0);
    let mut txn = storage.begin_write().expect("begin");
    txn.put(b"a", b"1").expect("put");
    let err = txn.commit().expect_err("the log's sync fails");
    assert!(err.to_string().contains("write-ahead log"), "{err}");
    let mut txn = storage.begin_write().expect("begin");
    txn.put(b"b", b"2").expect("put");
    let err = txn.commit().expect_err("poisoned");
    assert!(err.to_string().contains("restarts"), "{err}");
    assert_eq!(storage.get(b"a").expect("get"), None, "the failed commit is not visible");
}

#[test]
fn a_database_file_with_its_log_survives_reopening_and_turning_the_log_off() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rollout.db");
    let options =
        rollout_storage::OpenOptions { wal_bytes: rollout_storage::wal::SUGGESTED_WAL_BYTES, ..Default::default() };
    {
        let storage = RedbStorage::open_with(&path, options).expect("open");
        for i in 0..100u32 {
            let mut txn = storage.begin_write().expect("begin");
            txn.put(&i.to_be_bytes(), b"v").expect("put");
            txn.commit().expect("commit");
        }
    }
    let log = rollout_storage::wal_path(&path);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&log).expect("the log").permissions().mode() & 0o777, 0o600);
    let off = rollout_storage::OpenOptions { wal_bytes: 0, ..options };
    let storage = RedbStorage::open_with(&path, off).expect("reopen without the log");
    assert_eq!(storage.scan(b"").expect("scan").len(), 100);
    assert_eq!(std::fs::metadata(&log).expect("the log").len(), 0, "its records are in the database now");
}
