//! Random histories of transactions and crashes against a model: a `BTreeMap` of the committed
//! state. After every step, and after every crash and reopen, the storage must equal the model.

use std::collections::BTreeMap;

use proptest::prelude::*;
use rollout_core::traits::{Storage, StorageTxn};
use rollout_storage::{CrashMode, MemDisk, RedbStorage};

type State = BTreeMap<Vec<u8>, Vec<u8>>;

#[derive(Debug, Clone)]
enum Write {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
}

/// How a transaction ends.
#[derive(Debug, Clone)]
enum Ending {
    Commit,
    /// Dropped without commit.
    Abort,
    /// The node crashes while the transaction is open.
    CrashBeforeCommit(CrashMode),
    /// Power fails at a sync during (or after) the commit, then the node crashes.
    PowerCutInCommit {
        syncs_before_cut: u64,
        crash: CrashMode,
    },
}

#[derive(Debug, Clone)]
enum Step {
    Transaction {
        writes: Vec<Write>,
        ending: Ending,
    },
    /// A crash between transactions: nothing is in flight, so nothing may be lost.
    Crash(CrashMode),
}

fn key_strategy() -> impl Strategy<Value = Vec<u8>> {
    // Few distinct keys, so that histories overwrite and delete what they wrote; two groups, so
    // that prefix scans have neighbours to exclude.
    (prop_oneof![Just(b"a/".to_vec()), Just(b"b/".to_vec())], 0u8..12).prop_map(|(mut key, index)| {
        key.push(index);
        key
    })
}

fn value_strategy() -> impl Strategy<Value = Vec<u8>> {
    // Mostly small values; some span pages, so that commits write many pages to tear.
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..40),
        1 => (1usize..6000, any::<u8>()).prop_map(|(len, byte)| vec![byte; len]),
    ]
}

fn write_strategy() -> impl Strategy<Value = Write> {
    prop_oneof![
        3 => (key_strategy(), value_strategy()).prop_map(|(key, value)| Write::Put { key, value }),
        1 => key_strategy().prop_map(|key| Write::Delete { key }),
    ]
}

fn crash_strategy() -> impl Strategy<Value = CrashMode> {
    prop_oneof![
        Just(CrashMode::LoseUnsynced),
        (0usize..40, 0usize..5000)
            .prop_map(|(whole_writes, torn_bytes)| CrashMode::TornPrefix { whole_writes, torn_bytes }),
        proptest::collection::vec(0usize..40, 0..20).prop_map(|kept_writes| CrashMode::Reordered { kept_writes }),
    ]
}

fn ending_strategy() -> impl Strategy<Value = Ending> {
    prop_oneof![
        6 => Just(Ending::Commit),
        1 => Just(Ending::Abort),
        1 => crash_strategy().prop_map(Ending::CrashBeforeCommit),
        2 => (0u64..4, crash_strategy())
            .prop_map(|(syncs_before_cut, crash)| Ending::PowerCutInCommit { syncs_before_cut, crash }),
    ]
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (proptest::collection::vec(write_strategy(), 0..12), ending_strategy())
            .prop_map(|(writes, ending)| Step::Transaction { writes, ending }),
        1 => crash_strategy().prop_map(Step::Crash),
    ]
}

fn contents(storage: &dyn Storage) -> State {
    storage.scan(b"").expect("scan").into_iter().collect()
}

fn apply(state: &mut State, write: &Write) {
    match write {
        Write::Put { key, value } => state.insert(key.clone(), value.clone()),
        Write::Delete { key } => state.remove(key),
    };
}

/// Applies `writes` to the transaction and to `pending`, checking the transaction's own view.
fn write_all(txn: &mut dyn StorageTxn, pending: &mut State, writes: &[Write]) -> Result<(), TestCaseError> {
    for write in writes {
        match write {
            Write::Put { key, value } => txn.put(key, value).expect("put"),
            Write::Delete { key } => {
                let existed = txn.delete(key).expect("delete");
                prop_assert_eq!(existed, pending.contains_key(key));
            }
        }
        apply(pending, write);
    }
    let seen: State = txn.scan(b"").expect("txn scan").into_iter().collect();
    prop_assert_eq!(&seen, &*pending, "the transaction must see its own writes");
    let group: Vec<_> = txn.scan(b"a/").expect("txn prefix scan");
    let expected: Vec<_> = pending.range(b"a/".to_vec()..b"a0".to_vec()).map(|(k, v)| (k.clone(), v.clone())).collect();
    prop_assert_eq!(group, expected);
    Ok(())
}

fn run_history(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let disk = MemDisk::new();
    let mut storage = RedbStorage::open_in_memory(&disk).expect("open");
    let mut committed = State::new();

    for step in steps {
        match step {
            Step::Crash(mode) => {
                disk.crash(mode);
                drop(storage);
                storage = RedbStorage::open_in_memory(&disk).expect("reopen");
            }
            Step::Transaction { writes, ending } => {
                let mut pending = committed.clone();
                let mut txn = storage.begin_write().expect("begin");
                write_all(txn.as_mut(), &mut pending, &writes)?;
                match ending {
                    Ending::Commit => {
                        txn.commit().expect("commit");
                        committed = pending;
                    }
                    Ending::Abort => drop(txn),
                    Ending::CrashBeforeCommit(mode) => {
                        disk.crash(mode);
                        drop(txn);
                        drop(storage);
                        storage = RedbStorage::open_in_memory(&disk).expect("reopen");
                    }
                    Ending::PowerCutInCommit { syncs_before_cut, crash } => {
                        disk.cut_power_after_syncs(syncs_before_cut);
                        let committed_ok = txn.commit().is_ok();
                        let lose_everything_unsynced = crash == CrashMode::LoseUnsynced;
                        disk.crash(crash);
                        drop(storage);
                        storage = RedbStorage::open_in_memory(&disk).expect("reopen after a torn commit");
                        let recovered = contents(&storage);
                        if committed_ok {
                            prop_assert_eq!(&recovered, &pending, "a commit that returned Ok was lost");
                        } else if lose_everything_unsynced {
                            prop_assert_eq!(
                                &recovered,
                                &committed,
                                "a failed commit survived losing every unsynced write"
                            );
                        } else {
                            // A commit whose sync failed may or may not have reached the disk; it
                            // must not have reached it in part.
                            prop_assert!(
                                recovered == committed || recovered == pending,
                                "a torn commit left a mix of before and after"
                            );
                        }
                        committed = recovered;
                    }
                }
            }
        }
        prop_assert_eq!(&contents(&storage), &committed);
    }

    disk.crash(CrashMode::LoseUnsynced);
    drop(storage);
    prop_assert_eq!(&contents(&RedbStorage::open_in_memory(&disk).expect("final reopen")), &committed);
    Ok(())
}

proptest! {
    // Each case reopens the database a few times (every open verifies the whole file), so the
    // case count is what keeps this test within a few seconds of debug-build time.
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn storage_equals_the_model_of_committed_state_across_crashes(
        steps in proptest::collection::vec(step_strategy(), 1..25)
    ) {
        run_history(steps)?;
    }
}
