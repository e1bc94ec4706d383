//! DurableQueue: FIFO in ULID order, nack to the front, write-through, replay after a
//! restart, the bound; and a model check against a VecDeque.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use common::MemStorage;
use proptest::prelude::*;
use rollout_cloud_local::{DurableQueue, QUEUE_KEY_PREFIX};
use rollout_core::traits::{Queue, QueueItemId, Storage};
use rollout_core::{Error, Recoverable, RetryHint};

fn storage() -> Arc<MemStorage> {
    Arc::new(MemStorage::default())
}

fn open(storage: &Arc<MemStorage>) -> DurableQueue {
    DurableQueue::open(storage.clone()).expect("open queue")
}

fn push(queue: &mut DurableQueue, item: &str) -> QueueItemId {
    queue.push(item.as_bytes().to_vec()).expect("push")
}

fn pop(queue: &mut DurableQueue) -> (QueueItemId, String) {
    let (id, item) = queue.pop().expect("an item is waiting");
    (id, String::from_utf8(item).expect("utf-8 item"))
}

#[test]
fn items_come_out_in_push_order_with_increasing_ids() {
    let storage = storage();
    let mut queue = open(&storage);
    // Many pushes land in the same millisecond: ids must still strictly increase.
    let ids: Vec<QueueItemId> = (0..2000).map(|i| push(&mut queue, &format!("item-{i}"))).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids strictly increase");
    assert_eq!(queue.len(), 2000);

    for (i, id) in ids.iter().enumerate() {
        assert_eq!(pop(&mut queue), (*id, format!("item-{i}")));
    }
    assert!(queue.pop().is_none());
    assert!(queue.is_empty());
}

#[test]
fn push_is_stored_under_its_ulid_before_it_is_visible() {
    let storage = storage();
    let mut queue = open(&storage);
    let id = push(&mut queue, "a");
    let key = DurableQueue::key_of(id);
    assert!(key.starts_with(QUEUE_KEY_PREFIX) && key.len() == QUEUE_KEY_PREFIX.len() + 26, "{key}");
    assert_eq!(storage.keys(QUEUE_KEY_PREFIX), vec![key]);
}

#[test]
fn a_failed_commit_leaves_the_queue_unchanged() {
    let storage = storage();
    let mut queue = open(&storage);
    push(&mut queue, "kept");
    storage.fail_commits(true);
    let err = queue.push(b"lost".to_vec()).expect_err("commit fails");
    assert!(!err.is_fatal(), "{err}");
    assert_eq!(queue.len(), 1, "the failed item never entered the deque");
    assert_eq!(storage.keys(QUEUE_KEY_PREFIX).len(), 1);

    let (id, _) = pop(&mut queue);
    assert!(queue.ack(id).is_err(), "ack's commit fails too");
    assert_eq!(queue.in_flight_len(), 1, "a failed ack keeps the item in flight");
    storage.fail_commits(false);
    queue.ack(id).expect("ack after the storage recovers");
    assert!(storage.keys(QUEUE_KEY_PREFIX).is_empty());
}

#[test]
fn ack_deletes_from_storage_and_is_idempotent() {
    let storage = storage();
    let mut queue = open(&storage);
    let a = push(&mut queue, "a");
    let b = push(&mut queue, "b");
    let (popped, _) = pop(&mut queue);
    assert_eq!(popped, a);
    assert_eq!(storage.keys(QUEUE_KEY_PREFIX).len(), 2, "a popped item stays in storage");

    queue.ack(a).expect("ack");
    assert_eq!(storage.keys(QUEUE_KEY_PREFIX), vec![DurableQueue::key_of(b)]);
    assert_eq!(queue.in_flight_len(), 0);
    queue.ack(a).expect("acking again is a no-op");
    assert_eq!(queue.len(), 1);
}

#[test]
fn nack_puts_the_item_back_in_front_and_keeps_it_in_storage() {
    let storage = storage();
    let mut queue = open(&storage);
    let a = push(&mut queue, "a");
    let b = push(&mut queue, "b");
    let (id, item) = queue.pop().expect("a");
    assert_eq!(id, a);
    let c = push(&mut queue, "c");

    queue.nack(id, item);
    assert_eq!(storage.keys(QUEUE_KEY_PREFIX).len(), 3, "nack does not touch storage");
    assert_eq!(queue.len(), 3);
    assert_eq!(pop(&mut queue), (a, "a".to_owned()));
    let (second, second_item) = queue.pop().expect("b");
    assert_eq!(second, b);

    // A later nack goes in front of everything, including the older `c`.
    queue.nack(second, second_item);
    assert_eq!(pop(&mut queue).0, b);
    assert_eq!(pop(&mut queue).0, c);

    // Nacking an acked id delivers nothing: it is no longer durable.
    queue.ack(a).expect("ack a");
    queue.nack(a, b"a".to_vec());
    assert!(queue.pop().is_none());
}

#[test]
fn a_restart_replays_every_unacked_item_in_ulid_order() {
    let storage = storage();
    let mut queue = open(&storage);
    let a = push(&mut queue, "a");
    let b = push(&mut queue, "b");
    let c = push(&mut queue, "c");
    let d = push(&mut queue, "d");
    let (popped_b, item_b) = {
        assert_eq!(pop(&mut queue).0, a);
        queue.pop().expect("b")
    };
    assert_eq!(popped_b, b);
    queue.nack(b, item_b); // in memory, b is now first
    queue.ack(a).expect("ack a");
    assert_eq!(pop(&mut queue).0, b); // popped, never acked: must come back
    drop(queue);

    let mut queue = open(&storage);
    assert_eq!(queue.len(), 3);
    assert_eq!(queue.in_flight_len(), 0);
    assert_eq!(pop(&mut queue), (b, "b".to_owned()));
    assert_eq!(pop(&mut queue), (c, "c".to_owned()));
    assert_eq!(pop(&mut queue), (d, "d".to_owned()));

    // New ids continue above the replayed ones.
    let e = push(&mut queue, "e");
    assert!(e > d);
}

#[test]
fn acking_a_replayed_item_before_popping_it_removes_it() {
    let storage = storage();
    let mut queue = open(&storage);
    let a = push(&mut queue, "a");
    let b = push(&mut queue, "b");
    drop(queue);

    let mut queue = open(&storage);
    queue.ack(a).expect("ack a, handled before the restart");
    assert_eq!(queue.len(), 1);
    assert_eq!(pop(&mut queue).0, b);
}

#[test]
fn the_bound_counts_waiting_and_in_flight_items() {
    let storage = storage();
    let mut queue = DurableQueue::open_with_max_len(storage.clone(), 2).expect("open");
    push(&mut queue, "a");
    push(&mut queue, "b");
    let (a, _) = pop(&mut queue);

    let err = queue.push(b"c".to_vec()).expect_err("full");
    match &err {
        Error::Recoverable { kind: Recoverable::ResourceExhausted(msg), hint: RetryHint::Backoff } => {
            assert!(msg.contains("queue.max_len") && msg.contains('2'), "{msg}");
        }
        other => panic!("expected ResourceExhausted, got {other:?}"),
    }
    assert_eq!(storage.keys(QUEUE_KEY_PREFIX).len(), 2, "nothing stored beyond the bound");

    queue.ack(a).expect("ack");
    push(&mut queue, "c");

    // Reopening with a lower bound keeps every item; pushes wait for acks.
    drop(queue);
    let mut queue = DurableQueue::open_with_max_len(storage.clone(), 1).expect("reopen");
    assert_eq!(queue.len(), 2);
    assert!(queue.push(b"d".to_vec()).is_err());
    assert!(DurableQueue::open_with_max_len(storage, 0).expect_err("zero").is_fatal());
}

#[test]
fn foreign_data_under_the_prefix_is_a_clear_error() {
    let storage = storage();
    storage.put_raw(b"cloudlocal_queue/not-a-ulid", b"");
    let err = DurableQueue::open(storage.clone()).expect_err("bad key");
    assert!(err.is_fatal() && err.to_string().contains("cloudlocal_queue/not-a-ulid"), "{err}");

    let storage = MemStorage::default();
    storage.put_raw(b"cloudlocal_queue/01ARZ3NDEKTSV4RRFFQ69G5FAV", &[9, 9, 9]);
    let err = DurableQueue::open(Arc::new(storage)).expect_err("bad value");
    assert!(err.is_fatal() && err.to_string().contains("01ARZ3NDEKTSV4RRFFQ69G5FAV"), "{err}");
}

#[test]
fn other_keys_in_the_same_storage_are_left_alone() {
    let storage = storage();
    storage.put_raw(b"coordinator/task/1", b"x");
    let mut queue = open(&storage);
    assert!(queue.is_empty());
    let id = push(&mut queue, "a");
    queue.pop();
    queue.ack(id).expect("ack");
    assert_eq!(storage.get(b"coordinator/task/1").expect("get"), Some(b"x".to_vec()));
}

/// One step of the model check.
#[derive(Debug, Clone)]
enum Op {
    Push(Vec<u8>),
    Pop,
    /// Acks the n-th in-flight item (modulo their number); on none, acks a fresh id.
    Ack(usize),
    /// Nacks the n-th in-flight item (modulo their number).
    Nack(usize),
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..8).prop_map(Op::Push),
        3 => Just(Op::Pop),
        2 => any::<usize>().prop_map(Op::Ack),
        2 => any::<usize>().prop_map(Op::Nack),
        1 => Just(Op::Reopen),
    ]
}

/// What the queue should hold: the deque in delivery order and the in-flight items.
#[derive(Debug, Default)]
struct Model {
    waiting: VecDeque<(QueueItemId, Vec<u8>)>,
    in_flight: BTreeMap<QueueItemId, Vec<u8>>,
}

const MODEL_MAX_LEN: usize = 6;

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn behaves_like_a_deque_that_survives_restarts(ops in proptest::collection::vec(op(), 1..60)) {
        let storage = storage();
        let mut queue = DurableQueue::open_with_max_len(storage.clone(), MODEL_MAX_LEN).expect("open");
        let mut model = Model::default();

        for op in ops {
            match op {
                Op::Push(item) => {
                    let result = queue.push(item.clone());
                    if model.waiting.len() + model.in_flight.len() >= MODEL_MAX_LEN {
                        let refused =
                            matches!(&result, Err(Error::Recoverable { kind: Recoverable::ResourceExhausted(_), .. }));
                        prop_assert!(refused, "push beyond the bound gave {:?}", result);
                    } else {
                        let id = result.expect("push below the bound");
                        let newest = model.waiting.iter().map(|(id, _)| *id).chain(model.in_flight.keys().copied()).max();
                        prop_assert!(newest.is_none_or(|newest| id > newest), "ids increase");
                        model.waiting.push_back((id, item));
                    }
                }
                Op::Pop => {
                    let expected = model.waiting.pop_front();
                    if let Some((id, item)) = &expected {
                        model.in_flight.insert(*id, item.clone());
                    }
                    prop_assert_eq!(queue.pop(), expected);
                }
                Op::Ack(n) => {
                    let id = model.in_flight.keys().nth(n % model.in_flight.len().max(1)).copied();
                    let id = id.unwrap_or(QueueItemId(1)); // never issued: a no-op
                    model.in_flight.remove(&id);
                    queue.ack(id).expect("ack");
                }
                Op::Nack(n) => {
                    if let Some(id) = model.in_flight.keys().nth(n % model.in_flight.len().max(1)).copied() {
                        let item = model.in_flight.remove(&id).expect("in flight");
                        model.waiting.push_front((id, item.clone()));
                        queue.nack(id, item);
                    }
                }
                Op::Reopen => {
                    drop(queue);
                    queue = DurableQueue::open_with_max_len(storage.clone(), MODEL_MAX_LEN).expect("reopen");
                    let mut all: Vec<_> = model.waiting.drain(..).chain(std::mem::take(&mut model.in_flight)).collect();
                    all.sort();
                    model.waiting = all.into();
                }
            }
            prop_assert_eq!(queue.len(), model.waiting.len());
            prop_assert_eq!(queue.in_flight_len(), model.in_flight.len());
            let mut stored: Vec<String> =
                model.waiting.iter().map(|(id, _)| *id).chain(model.in_flight.keys().copied()).map(DurableQueue::key_of).collect();
            stored.sort();
            prop_assert_eq!(storage.keys(QUEUE_KEY_PREFIX), stored);
        }
    }
}
