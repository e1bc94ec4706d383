//! DurableQueue on the real storage: redb on a file across a process-style restart, and
//! redb on the crash-faithful MemDisk, crashing for real (unsynced writes lost, a commit
//! cut off by a power loss) and reopening.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use proptest::prelude::*;
use rollout_cloud_local::DurableQueue;
use rollout_core::traits::{Queue, QueueItemId};
use rollout_storage::{CrashMode, MemDisk, RedbStorage};

fn reopen(disk: &MemDisk) -> DurableQueue {
    DurableQueue::open(Arc::new(RedbStorage::open_in_memory(disk).expect("open storage"))).expect("open queue")
}

fn drain(queue: &mut DurableQueue) -> Vec<(QueueItemId, Vec<u8>)> {
    std::iter::from_fn(|| queue.pop()).collect()
}

#[test]
fn a_file_database_replays_the_queue_after_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("rollout.db");
    let open = || DurableQueue::open(Arc::new(RedbStorage::open(&path).expect("open db"))).expect("open queue");

    let mut queue = open();
    let a = queue.push(b"a".to_vec()).expect("push a");
    let b = queue.push(b"b".to_vec()).expect("push b");
    let (popped, _) = queue.pop().expect("pop a");
    queue.ack(popped).expect("ack a");
    assert_eq!(popped, a);
    queue.pop().expect("pop b, never acked");
    drop(queue); // closes the database, as a stopping process does

    let mut queue = open();
    assert_eq!(drain(&mut queue), vec![(b, b"b".to_vec())]);
}

#[test]
fn a_crash_keeps_every_pushed_item_and_forgets_every_acked_one() {
    let disk = MemDisk::new();
    let mut queue = reopen(&disk);
    let ids: Vec<_> = (0u8..5).map(|i| queue.push(vec![i]).expect("push")).collect();
    let (first, _) = queue.pop().expect("pop");
    queue.ack(first).expect("ack");
    queue.pop().expect("popped, not acked");

    disk.crash(CrashMode::LoseUnsynced);
    drop(queue);
    let mut queue = reopen(&disk);
    let replayed: Vec<_> = drain(&mut queue).into_iter().map(|(id, _)| id).collect();
    assert_eq!(replayed, ids[1..]);
}

/// A commit whose fsync fails has an unknown outcome: its writes may or may not have
/// reached the disk before the power went (a real disk behaves the same). What must hold:
/// every push that returned `Ok` is replayed, and the failed one is either absent or
/// intact and in its place, never garbage.
#[test]
fn a_push_cut_off_by_power_loss_never_costs_an_earlier_item() {
    for torn_bytes in [0, 1, 100, 4096] {
        let disk = MemDisk::new();
        let mut queue = reopen(&disk);
        let kept = queue.push(b"kept".to_vec()).expect("push before the power cut");

        disk.cut_power_after_syncs(0);
        assert!(queue.push(b"maybe".to_vec()).is_err(), "the commit's fsync fails");
        assert_eq!(queue.len(), 1, "a failed push never enters the deque");

        let whole_writes = disk.unsynced_write_sizes().len().saturating_sub(1);
        disk.crash(CrashMode::TornPrefix { whole_writes, torn_bytes });
        drop(queue);
        let mut queue = reopen(&disk);
        let replayed = drain(&mut queue);
        assert_eq!(replayed.first(), Some(&(kept, b"kept".to_vec())), "torn_bytes {torn_bytes}");
        match replayed.get(1..) {
            Some([]) | None => {}
            Some([(id, item)]) => assert!(*id > kept && item == b"maybe", "torn_bytes {torn_bytes}: {replayed:?}"),
            Some(more) => panic!("torn_bytes {torn_bytes}: unexpected items {more:?}"),
        }
        let next = queue.push(b"after".to_vec()).expect("push after the crash");
        assert!(replayed.iter().all(|(id, _)| *id < next), "new ids stay above replayed ones");
    }
}

#[derive(Debug, Clone)]
enum Op {
    Push(u8),
    Pop,
    Ack(usize),
    Nack(usize),
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Push),
        3 => Just(Op::Pop),
        2 => any::<usize>().prop_map(Op::Ack),
        1 => any::<usize>().prop_map(Op::Nack),
        1 => Just(Op::Crash),
    ]
}

proptest! {
    // redb commits are slower than the in-memory model's; fewer, shorter cases.
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Whatever happens, a crash leaves exactly the pushed-and-not-acked items, in ULID
    /// order; between crashes the queue behaves like a deque with nack-to-front.
    #[test]
    fn crashes_lose_nothing_that_was_pushed_and_revive_nothing_acked(ops in proptest::collection::vec(op(), 1..40)) {
        let disk = MemDisk::new();
        let mut queue = reopen(&disk);
        let mut waiting: VecDeque<(QueueItemId, Vec<u8>)> = VecDeque::new();
        let mut in_flight: BTreeMap<QueueItemId, Vec<u8>> = BTreeMap::new();

        for op in ops {
            match op {
                Op::Push(byte) => waiting.push_back((queue.push(vec![byte]).expect("push"), vec![byte])),
                Op::Pop => {
                    let expected = waiting.pop_front();
                    if let Some((id, item)) = &expected {
                        in_flight.insert(*id, item.clone());
                    }
                    prop_assert_eq!(queue.pop(), expected);
                }
                Op::Ack(n) => {
                    if let Some(id) = in_flight.keys().nth(n % in_flight.len().max(1)).copied() {
                        in_flight.remove(&id);
                        queue.ack(id).expect("ack");
                    }
                }
                Op::Nack(n) => {
                    if let Some(id) = in_flight.keys().nth(n % in_flight.len().max(1)).copied() {
                        let item = in_flight.remove(&id).expect("in flight");
                        waiting.push_front((id, item.clone()));
                        queue.nack(id, item);
                    }
                }
                Op::Crash => {
                    disk.crash(CrashMode::LoseUnsynced);
                    drop(queue);
                    queue = reopen(&disk);
                    let mut all: Vec<_> = waiting.drain(..).chain(std::mem::take(&mut in_flight)).collect();
                    all.sort();
                    waiting = all.into();
                }
            }
            prop_assert_eq!(queue.len(), waiting.len());
        }
    }
}
