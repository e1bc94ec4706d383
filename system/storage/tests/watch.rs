//! Commit notifications (run with `cargo test -p rollout-storage --features watch`).
#![cfg(feature = "watch")]

use rollout_core::traits::Storage;
use rollout_storage::{MemDisk, RedbStorage, WATCH_CHANNEL_CAPACITY, WatchEvent};
use tokio::sync::broadcast::error::TryRecvError;

fn event(key: &[u8], value: Option<&[u8]>) -> WatchEvent {
    WatchEvent { key: key.to_vec(), value: value.map(<[u8]>::to_vec) }
}

fn drain(receiver: &mut tokio::sync::broadcast::Receiver<WatchEvent>) -> Vec<WatchEvent> {
    let mut events = Vec::new();
    loop {
        match receiver.try_recv() {
            Ok(event) => events.push(event),
            Err(TryRecvError::Empty) => return events,
            Err(other) => panic!("unexpected receive error: {other:?}"),
        }
    }
}

#[test]
fn a_watcher_sees_committed_writes_under_its_prefix_in_key_order() {
    let storage = RedbStorage::open_in_memory(&MemDisk::new()).expect("open");
    let mut tasks = storage.watch(b"task/");
    let mut everything = storage.watch(b"");

    let mut txn = storage.begin_write().expect("begin");
    txn.put(b"task/b", b"queued").expect("put");
    txn.put(b"worker/1", b"up").expect("put");
    txn.put(b"task/a", b"leased").expect("put");
    txn.put(b"task/b", b"leased").expect("overwrite in the same transaction");
    assert!(drain(&mut tasks).is_empty(), "nothing is sent before the commit");
    txn.commit().expect("commit");

    assert_eq!(drain(&mut tasks), vec![event(b"task/a", Some(b"leased")), event(b"task/b", Some(b"leased"))]);
    assert_eq!(drain(&mut everything).len(), 3);

    let mut txn = storage.begin_write().expect("begin");
    txn.delete(b"task/a").expect("delete");
    txn.delete(b"task/never-existed").expect("delete of an absent key");
    txn.commit().expect("commit");
    assert_eq!(drain(&mut tasks), vec![event(b"task/a", None)]);
}

#[test]
fn an_aborted_transaction_sends_nothing() {
    let storage = RedbStorage::open_in_memory(&MemDisk::new()).expect("open");
    let mut receiver = storage.watch(b"");
    {
        let mut txn = storage.begin_write().expect("begin");
        txn.put(b"k", b"v").expect("put");
    }
    assert!(drain(&mut receiver).is_empty());
}

#[test]
fn a_failed_commit_sends_nothing() {
    let disk = MemDisk::new();
    let storage = RedbStorage::open_in_memory(&disk).expect("open");
    let mut receiver = storage.watch(b"");
    disk.cut_power_after_syncs(0);
    let mut txn = storage.begin_write().expect("begin");
    txn.put(b"k", b"v").expect("put");
    assert!(txn.commit().is_err());
    assert!(drain(&mut receiver).is_empty());
}

#[test]
fn transactions_arrive_in_commit_order_across_threads() {
    let storage = RedbStorage::open_in_memory(&MemDisk::new()).expect("open");
    let mut receiver = storage.watch(b"counter");
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..25 {
                    let mut txn = storage.begin_write().expect("begin");
                    let next = txn.get(b"counter").expect("get").map_or(0, |bytes| bytes[0] + 1);
                    txn.put(b"counter", &[next]).expect("put");
                    txn.commit().expect("commit");
                }
            });
        }
    });
    let values: Vec<u8> = drain(&mut receiver).into_iter().map(|event| event.value.expect("a put")[0]).collect();
    assert_eq!(values, (0..100).collect::<Vec<u8>>());
}

#[test]
fn a_slow_watcher_learns_that_it_lagged() {
    let storage = RedbStorage::open_in_memory(&MemDisk::new()).expect("open");
    let mut receiver = storage.watch(b"");
    let mut txn = storage.begin_write().expect("begin");
    for index in 0..(WATCH_CHANNEL_CAPACITY as u32 + 10) {
        txn.put(&index.to_be_bytes(), b"").expect("put");
    }
    txn.commit().expect("commit");
    assert!(matches!(receiver.try_recv(), Err(TryRecvError::Lagged(10))));
}

#[test]
fn dropped_watchers_are_forgotten() {
    let storage = RedbStorage::open_in_memory(&MemDisk::new()).expect("open");
    drop(storage.watch(b""));
    let mut kept = storage.watch(b"");
    let mut txn = storage.begin_write().expect("begin");
    txn.put(b"k", b"v").expect("put");
    txn.commit().expect("commit");
    assert_eq!(drain(&mut kept), vec![event(b"k", Some(b"v"))]);
}
