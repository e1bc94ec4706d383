//! Cutting a stream of messages into frames by bytes. Both directions of the Work
//! stream carry batches (assignments and acks down, pulls and submits up); a batch is
//! cut into frames whose encoded size stays within `limits.max_message_bytes`, so a
//! task whose payload and result are within their limits always gets through, however
//! much else is in flight. The transport measures its wire encoding exactly; the
//! simulator uses [`frames_down`] and [`frames_up`], which put the messages in the same
//! order and measure them with the protocol's upper bounds
//! ([`ToWorker::work_entry_bytes`], whose slack the transport's tests bound); both cut
//! with [`cut_by_size`].

use crate::protocol::{ToCoordinator, ToWorker};

/// The size of a message in a frame: its Work-stream entry bound (0 for a message of
/// another channel, which no caller should pass).
fn down_size(m: &ToWorker) -> usize {
    m.work_entry_bytes().unwrap_or(0)
}

fn up_size(m: &ToCoordinator) -> usize {
    m.work_entry_bytes().unwrap_or(0)
}

/// One burst of Work-stream messages to a worker (what one batch released for it) as
/// frames within `limit`: acks first, then assignments, each in their order (the
/// coordinator driver's `coordinator_frames`).
pub fn frames_down(messages: Vec<ToWorker>, limit: usize) -> Vec<Vec<ToWorker>> {
    let (acks, rest): (Vec<ToWorker>, Vec<ToWorker>) =
        messages.into_iter().partition(|m| matches!(m, ToWorker::SubmitAck { .. }));
    cut_by_size(acks.into_iter().chain(rest), limit, down_size)
}

/// One burst of a worker's Work-stream messages as frames within `limit`: the submits
/// cut into frames, the pulls in the last one, after every submit (the worker driver's
/// `worker_frames`).
pub fn frames_up(messages: Vec<ToCoordinator>, limit: usize) -> Vec<Vec<ToCoordinator>> {
    let (pulls, submits): (Vec<ToCoordinator>, Vec<ToCoordinator>) =
        messages.into_iter().partition(|m| matches!(m, ToCoordinator::Pull(_)));
    let pulls_len: usize = pulls.iter().map(up_size).sum();
    let mut frames = cut_by_size(submits, limit.saturating_sub(pulls_len), up_size);
    match frames.last_mut() {
        Some(last) => last.extend(pulls),
        None if !pulls.is_empty() => frames.push(pulls),
        None => {}
    }
    frames
}

/// Cuts `items` into consecutive groups, in order, each of whose summed `size` is at
/// most `limit`. An item larger than `limit` forms a group of its own (config
/// validation keeps payloads and results, plus framing, within the message limit, so
/// such an item means the caller measured wrong).
pub fn cut_by_size<T>(items: impl IntoIterator<Item = T>, limit: usize, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut frames: Vec<Vec<T>> = Vec::new();
    let mut current: Vec<T> = Vec::new();
    let mut used = 0usize;
    for item in items {
        let n = size(&item);
        if !current.is_empty() && used.saturating_add(n) > limit {
            frames.push(std::mem::take(&mut current));
            used = 0;
        }
        used = used.saturating_add(n);
        current.push(item);
    }
    if !current.is_empty() {
        frames.push(current);
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn six_megabyte_items_in_a_four_megabyte_limit_go_one_by_one() {
        let frames = cut_by_size(vec![1_000_000usize; 6], 4 << 20, |n| *n + 600);
        assert_eq!(frames.iter().map(Vec::len).collect::<Vec<_>>(), [4, 2]);
        let frames = cut_by_size(vec![3_000_000usize; 3], 4 << 20, |n| *n);
        assert_eq!(frames.len(), 3);
    }

    use crate::protocol::{Assignment, Outcome, Pull, Submit, SubmitVerdict};
    use crate::{Attempt, ContentId, FencingToken, Incarnation, JobId, TaskId};
    use std::time::Duration;

    fn assign(index: u32, payload: usize) -> ToWorker {
        ToWorker::Assign(Assignment {
            incarnation: Incarnation(1),
            seq: u64::from(index) + 1,
            task: TaskId::new(JobId(1), index),
            token: FencingToken(9),
            attempt: Attempt(1),
            plugin: "p".into(),
            method: "m".into(),
            payload: vec![0; payload],
            deadline: Duration::from_secs(1),
            inputs: Vec::new(),
        })
    }

    #[test]
    fn a_burst_down_sends_acks_first_and_cuts_assignments_by_bytes() {
        let ack = |index| ToWorker::SubmitAck {
            task: TaskId::new(JobId(1), index),
            token: FencingToken(3),
            verdict: SubmitVerdict::Accepted,
        };
        let burst = vec![assign(0, 60_000), ack(7), assign(1, 60_000), assign(2, 60_000), ack(8)];
        let frames = frames_down(burst, 128 * 1024);
        let kinds: Vec<Vec<&str>> = frames.iter().map(|f| f.iter().map(ToWorker::kind).collect()).collect();
        assert_eq!(kinds, [vec!["submit_ack", "submit_ack", "assign", "assign"], vec!["assign"]]);
        for frame in &frames {
            assert!(frame.iter().filter_map(ToWorker::work_entry_bytes).sum::<usize>() <= 128 * 1024);
        }
    }

    #[test]
    fn a_burst_up_cuts_submits_and_sends_the_pulls_last() {
        let submit = |index| {
            ToCoordinator::Submit(Submit {
                incarnation: Incarnation(1),
                task: TaskId::new(JobId(1), index),
                token: FencingToken(3),
                outcome: Outcome::Succeeded { result: ContentId::of(b"x"), size_bytes: 70_000 },
            })
        };
        let pull = ToCoordinator::Pull(Pull { incarnation: Incarnation(1), free_slots: 3, assigns_through: 4 });
        let frames = frames_up(vec![pull.clone(), submit(0), submit(1), submit(2)], 128 * 1024);
        let kinds: Vec<Vec<&str>> = frames.iter().map(|f| f.iter().map(ToCoordinator::kind).collect()).collect();
        assert_eq!(kinds, [vec!["submit"], vec!["submit"], vec!["submit", "pull"]]);
        assert_eq!(frames_up(vec![pull], 1_000).len(), 1, "a pull alone is a frame");
        assert!(frames_up(Vec::new(), 1_000).is_empty());
    }

    proptest! {
        #[test]
        fn frames_keep_every_item_in_order_and_stay_within_the_limit(
            sizes in proptest::collection::vec(0usize..5_000, 0..200), limit in 1usize..20_000,
        ) {
            let frames = cut_by_size(sizes.iter().copied().enumerate(), limit, |(_, n)| *n);
            let flat: Vec<(usize, usize)> = frames.iter().flatten().copied().collect();
            prop_assert_eq!(flat, sizes.iter().copied().enumerate().collect::<Vec<_>>());
            for frame in &frames {
                prop_assert!(!frame.is_empty());
                let total: usize = frame.iter().map(|(_, n)| n).sum();
                prop_assert!(total <= limit || frame.len() == 1, "{frame:?} over {limit}");
            }
            // Greedy: no two neighbours could have shared a frame.
            for pair in frames.windows(2) {
                let first: usize = pair[0].iter().map(|(_, n)| n).sum();
                prop_assert!(first + pair[1][0].1 > limit);
            }
        }
    }
}
