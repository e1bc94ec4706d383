//! Crash recovery on the in-memory disk: crash for real, reopen, and check that exactly the
//! committed transactions survive, whole.

use std::collections::BTreeMap;

use rollout_core::traits::Storage;
use rollout_storage::{CrashMode, MemDisk, RedbStorage};

type State = BTreeMap<Vec<u8>, Vec<u8>>;

fn contents(storage: &RedbStorage) -> State {
    storage.scan(b"").expect("scan").into_iter().collect()
}

fn reopen_contents(disk: &MemDisk) -> State {
    contents(&RedbStorage::open_in_memory(disk).expect("reopen after the crash"))
}

/// Writes `changes` (`None`: delete) in one transaction and commits it.
fn commit(storage: &RedbStorage, changes: &[(Vec<u8>, Option<Vec<u8>>)]) -> rollout_core::Result<()> {
    let mut txn = storage.begin_write()?;
    for (key, value) in changes {
        match value {
            Some(value) => txn.put(key, value)?,
            None => txn.delete(key).map(drop)?,
        }
    }
    txn.commit()
}

fn apply(state: &State, changes: &[(Vec<u8>, Option<Vec<u8>>)]) -> State {
    let mut next = state.clone();
    for (key, value) in changes {
        match value {
            Some(value) => next.insert(key.clone(), value.clone()),
            None => next.remove(key),
        };
    }
    next
}

fn key(group: &str, index: u32) -> Vec<u8> {
    format!("{group}/{index:05}").into_bytes()
}

#[test]
fn a_transaction_committed_before_the_crash_survives_it() {
    let disk = MemDisk::new();
    let storage = RedbStorage::open_in_memory(&disk).expect("open");
    commit(&storage, &[(b"lease/1".to_vec(), Some(b"token 7".to_vec()))]).expect("commit");

    disk.crash(CrashMode::LoseUnsynced);
    drop(storage);

    assert_eq!(reopen_contents(&disk), State::from([(b"lease/1".to_vec(), b"token 7".to_vec())]));
}

#[test]
fn a_transaction_open_at_the_crash_is_lost() {
    let disk = MemDisk::new();
    let storage = RedbStorage::open_in_memory(&disk).expect("open");
    commit(&storage, &[(b"kept".to_vec(), Some(b"1".to_vec()))]).expect("commit");

    let mut txn = storage.begin_write().expect("begin");
    // Enough data that redb spills some of it to the disk before the commit.
    for index in 0..4000 {
        txn.put(&key("lost", index), &[9; 800]).expect("put");
    }
    txn.delete(b"kept").expect("delete");
    assert!(!disk.unsynced_write_sizes().is_empty(), "the transaction should have spilled pages");
    disk.crash(CrashMode::LoseUnsynced);
    // The dead process's transaction and database go away without touching the disk.
    assert!(txn.commit().is_err(), "a commit after the crash must fail");
    drop(storage);

    assert_eq!(reopen_contents(&disk), State::from([(b"kept".to_vec(), b"1".to_vec())]));
}

#[test]
fn a_database_used_after_the_crash_cannot_change_the_disk() {
    let disk = MemDisk::new();
    let zombie = RedbStorage::open_in_memory(&disk).expect("open");
    commit(&zombie, &[(b"a".to_vec(), Some(b"1".to_vec()))]).expect("commit");
    disk.crash(CrashMode::LoseUnsynced);
    let restarted = RedbStorage::open_in_memory(&disk).expect("restart");

    assert!(commit(&zombie, &[(b"a".to_vec(), Some(b"zombie".to_vec()))]).is_err());
    drop(zombie);
    commit(&restarted, &[(b"b".to_vec(), Some(b"2".to_vec()))]).expect("the restarted node writes");
    drop(restarted);

    let expected = State::from([(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"2".to_vec())]);
    assert_eq!(reopen_contents(&disk), expected);
}

#[test]
fn crashes_in_a_row_keep_every_committed_transaction() {
    let disk = MemDisk::new();
    let mut expected = State::new();
    for round in 0..5u32 {
        let storage = RedbStorage::open_in_memory(&disk).expect("open");
        assert_eq!(contents(&storage), expected, "after crash {round}");
        let changes: Vec<_> =
            (0..50).map(|index| (key("round", round * 50 + index), Some(vec![round as u8; 64]))).collect();
        commit(&storage, &changes).expect("commit");
        expected = apply(&expected, &changes);
        disk.crash(CrashMode::LoseUnsynced);
    }
    assert_eq!(reopen_contents(&disk), expected);
}

/// The crash modes tried on one interrupted commit: every prefix of its unsynced writes, each
/// write torn at its start, middle and end, and reorderings that keep or drop single writes.
fn crash_modes(write_sizes: &[usize]) -> Vec<CrashMode> {
    let count = write_sizes.len();
    let mut modes = vec![CrashMode::LoseUnsynced];
    for (position, size) in write_sizes.iter().enumerate() {
        for torn_bytes in [0, 1, size / 2, size.saturating_sub(1), *size] {
            modes.push(CrashMode::TornPrefix { whole_writes: position, torn_bytes });
        }
    }
    for position in 0..count {
        modes.push(CrashMode::Reordered { kept_writes: vec![position] });
        modes.push(CrashMode::Reordered { kept_writes: (0..count).filter(|&kept| kept != position).collect() });
    }
    modes.push(CrashMode::Reordered { kept_writes: (0..count).step_by(2).collect() });
    modes.push(CrashMode::Reordered { kept_writes: (1..count).step_by(2).collect() });
    modes
}

/// Cuts the power at each sync of a large commit in turn, tears the commit's unsynced writes in
/// every way [`crash_modes`] lists, and checks that the reopened database holds the state before
/// the transaction or after it, never a mix; and that it keeps working afterwards.
#[test]
fn a_commit_torn_anywhere_is_applied_whole_or_not_at_all() {
    let before_changes: Vec<_> = (0..300).map(|index| (key("base", index), Some(vec![1; 100]))).collect();
    let mut txn_changes: Vec<_> = (0..400).map(|index| (key("new", index), Some(vec![2; 150]))).collect();
    txn_changes.extend((0..300).step_by(3).map(|index| (key("base", index), Some(vec![3; 40]))));
    txn_changes.extend((1..300).step_by(3).map(|index| (key("base", index), None)));
    let before = apply(&State::new(), &before_changes);
    let after = apply(&before, &txn_changes);

    let mut crashes_tried = 0;
    let mut saw_before = false;
    let mut saw_after = false;
    for syncs_before_cut in 0.. {
        let disk = MemDisk::new();
        let storage = RedbStorage::open_in_memory(&disk).expect("open");
        commit(&storage, &before_changes).expect("baseline commit");
        disk.cut_power_after_syncs(syncs_before_cut);
        if commit(&storage, &txn_changes).is_ok() {
            // The cut came after the commit's last sync: it is durable whatever is lost now.
            disk.crash(CrashMode::LoseUnsynced);
            assert_eq!(reopen_contents(&disk), after);
            break;
        }
        let write_sizes = disk.unsynced_write_sizes();
        for mode in crash_modes(&write_sizes) {
            let crashed = disk.fork();
            crashed.crash(mode.clone());
            let recovered = RedbStorage::open_in_memory(&crashed).expect("a torn disk must reopen");
            let state = contents(&recovered);
            if state == before {
                saw_before = true;
            } else if state == after {
                saw_after = true;
            } else {
                panic!(
                    "cut after {syncs_before_cut} syncs, {mode:?} of {} unsynced writes left a half-applied \
                     transaction ({} keys)",
                    write_sizes.len(),
                    state.len()
                );
            }
            // The recovered database takes new commits and keeps them through another crash.
            commit(&recovered, &[(b"after-recovery".to_vec(), Some(b"ok".to_vec()))]).expect("commit");
            crashed.crash(CrashMode::LoseUnsynced);
            drop(recovered);
            assert_eq!(reopen_contents(&crashed).get(b"after-recovery".as_slice()), Some(&b"ok".to_vec()));
            crashes_tried += 1;
        }
        assert!(syncs_before_cut < 16, "the commit never completed");
    }
    assert!(crashes_tried > 20, "only {crashes_tried} crash points were tried");
    assert!(saw_before, "no crash lost the transaction: the cut never landed inside the commit");
    assert!(saw_after, "no torn crash kept the transaction: the tear points missed the commit record");
}

#[test]
fn a_durable_fork_is_a_fork_that_lost_its_unsynced_writes() {
    use redb::StorageBackend;
    let disk = MemDisk::new();
    let backend = disk.attach().expect("attach");
    backend.write(0, b"synced--").expect("write");
    backend.sync_data().expect("sync");
    backend.write(4, b"LOST").expect("unsynced write");
    backend.write(8, b"grown").expect("unsynced growth");
    let image = |d: &MemDisk| {
        let b = d.attach().expect("attach the copy");
        let mut bytes = vec![0; b.len().expect("len") as usize];
        b.read(0, &mut bytes).expect("read");
        bytes
    };
    let crashed = disk.fork();
    crashed.crash(CrashMode::LoseUnsynced);
    let durable = disk.durable_fork();
    assert_eq!(image(&durable), b"synced--".to_vec());
    assert_eq!(image(&durable), image(&crashed));
    // The live disk is untouched: its backend still reads the unsynced bytes.
    let mut live = [0; 13];
    backend.read(0, &mut live).expect("live read");
    assert_eq!(&live, b"syncLOSTgrown");
}
