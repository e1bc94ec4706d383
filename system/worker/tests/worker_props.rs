//! Random input sequences against the worker's safety properties:
//! - `self_fence`: no Submit (and no StartTask) at or after the self-fence deadline, as
//!   rebuilt by `SelfFenceOracle` from the messages (not the machine's own deadline);
//! - never more than `slots` runs on the plugin host at once;
//! - the timer never lies in the past, and no input makes the machine panic.

mod common;

use std::collections::BTreeSet;

use common::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use rollout_core::history::HistoryEvent;
use rollout_core::oracle::SelfFenceOracle;
use rollout_core::protocol::{Channel, Control, SubmitVerdict, ToCoordinator, ToWorker};
use rollout_core::{ContentId, FencingToken, Incarnation, JobId, TaskId};
use rollout_worker::{TaskOutcome, WorkerInput, WorkerOutput};

#[derive(Debug, Clone)]
enum Op {
    /// Both clocks move forward by this many ms, then a tick.
    Advance(u64),
    /// The driver wakes at the timer.
    TickAtTimeout,
    /// The wall clock alone steps, by ms.
    WallJump(i64),
    /// Acknowledge the `back`-th most recent beat (possibly of an old incarnation).
    AckBeat { back: usize, reregister: bool },
    /// A registration answer; `bump` 0 repeats the last incarnation (stale); `sent`: the
    /// assignments it says went out before it.
    Registered { bump: u64, sent: u64 },
    /// An assignment; `seq_bump` 0 repeats a seq, `wrong_incarnation` misaddresses it.
    Assign { seq_bump: u64, job: u64, index: u32, wrong_incarnation: bool },
    /// A run on the host ends.
    Finish { pick: usize, outcome: u8 },
    /// A TaskFinished for a run that never started.
    FinishUnknown { job: u64, index: u32, token: u64 },
    /// A verdict on one of the submits seen so far.
    SubmitAck { pick: usize },
    /// A control command.
    Control { kind: u8, pick: usize },
    /// A rejection (ends the run when it lands while unregistered).
    Rejected,
    /// A stream breaks: 0 Work, 1 Control, 2 the connection.
    StreamBroken(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        60 => (0u64..1_500).prop_map(Op::Advance),
        60 => Just(Op::TickAtTimeout),
        10 => (-5_000i64..5_000).prop_map(Op::WallJump),
        60 => (0usize..4, prop::bool::weighted(0.05)).prop_map(|(back, reregister)| Op::AckBeat { back, reregister }),
        20 => (0u64..3, prop_oneof![3 => Just(0u64), 1 => 1u64..4]).prop_map(|(bump, sent)| Op::Registered { bump, sent }),
        60 => (0u64..3, 0u64..3, 0u32..4, prop::bool::weighted(0.1)).prop_map(|(seq_bump, job, index, wrong_incarnation)| {
            Op::Assign { seq_bump, job, index, wrong_incarnation }
        }),
        50 => (any::<usize>(), 0u8..3).prop_map(|(pick, outcome)| Op::Finish { pick, outcome }),
        10 => (0u64..3, 0u32..4, 0u64..50).prop_map(|(job, index, token)| Op::FinishUnknown { job, index, token }),
        30 => any::<usize>().prop_map(|pick| Op::SubmitAck { pick }),
        10 => (0u8..4, any::<usize>()).prop_map(|(kind, pick)| Op::Control { kind, pick }),
        1 => Just(Op::Rejected),
        5 => (0u8..3).prop_map(Op::StreamBroken),
    ]
}

/// What the test knows from the outputs alone, as a driver would.
#[derive(Default)]
struct Model {
    /// Runs started on the host and not yet reported finished.
    host_running: BTreeSet<(TaskId, FencingToken)>,
    /// Beats seen, oldest first.
    beats: Vec<(Incarnation, u64)>,
    /// Submits seen.
    submits: Vec<(TaskId, FencingToken)>,
    highest_incarnation: u64,
    seq: u64,
    next_token: u64,
    /// The answer last sent: its incarnation and `assigns_sent`.
    answered: (u64, u64),
    /// The incarnation adopted (its first beat seen) and the `assigns_sent` it came with.
    adopted: Option<(Incarnation, u64)>,
    /// The self-fence rule rebuilt from the messages in and out.
    fence: SelfFenceOracle,
}

fn input_for(op: &Op, h: &mut Harness, model: &mut Model) -> Option<WorkerInput> {
    let incarnation = h.worker.incarnation().map_or(model.highest_incarnation, |i| i.get());
    Some(match op {
        Op::Advance(ms) => {
            let to = h.mono + std::time::Duration::from_millis(*ms);
            h.at_mono(to);
            WorkerInput::Tick
        }
        Op::TickAtTimeout => {
            let at = h.worker.poll_timeout()?;
            h.at_mono(at.max(h.mono));
            WorkerInput::Tick
        }
        Op::WallJump(ms) => {
            h.jump_wall(*ms);
            return None;
        }
        Op::AckBeat { back, reregister } => {
            let (incarnation, beat_seq) = *model.beats.iter().rev().nth(*back)?;
            WorkerInput::Message(ToWorker::HeartbeatAck { incarnation, beat_seq, reregister: *reregister })
        }
        Op::Registered { bump, sent } => {
            model.highest_incarnation += bump;
            model.seq = *sent;
            model.answered = (model.highest_incarnation, *sent);
            WorkerInput::Message(ToWorker::Registered {
                incarnation: Incarnation(model.highest_incarnation),
                terms: terms(),
                assigns_sent: *sent,
            })
        }
        Op::Assign { seq_bump, job, index, wrong_incarnation } => {
            model.seq += seq_bump;
            model.next_token += 1;
            let target = if *wrong_incarnation { incarnation + 1 } else { incarnation };
            let a = assignment(target, model.seq, TaskId::new(JobId(*job), *index), model.next_token);
            WorkerInput::Message(ToWorker::Assign(a))
        }
        Op::Finish { pick, outcome } => {
            if model.host_running.is_empty() {
                return None;
            }
            let (task, token) = *model.host_running.iter().nth(pick % model.host_running.len())?;
            let outcome = match outcome {
                0 => TaskOutcome::Succeeded { result: ContentId::of(b"r"), size_bytes: 1 },
                1 => TaskOutcome::Failed { message: "boom".into() },
                _ => TaskOutcome::Cancelled,
            };
            WorkerInput::TaskFinished { task, token, outcome }
        }
        Op::FinishUnknown { job, index, token } => WorkerInput::TaskFinished {
            task: TaskId::new(JobId(*job), *index),
            token: FencingToken(1_000 + token),
            outcome: TaskOutcome::Cancelled,
        },
        Op::SubmitAck { pick } => {
            if model.submits.is_empty() {
                return None;
            }
            let (task, token) = model.submits[pick % model.submits.len()];
            WorkerInput::Message(ToWorker::SubmitAck { task, token, verdict: SubmitVerdict::Duplicate })
        }
        Op::Control { kind, pick } => {
            let running: Vec<_> = model.host_running.iter().copied().collect();
            let some_run = running.get(pick % running.len().max(1)).copied();
            let control = match (kind, some_run) {
                (0, _) => Control::Drain,
                (1, _) => Control::Snapshot,
                (2, Some((task, token))) => Control::CancelTask { task, token },
                (_, Some((task, _))) => Control::CancelJob { job: task.job },
                (_, None) => Control::CancelJob { job: JobId(0) },
            };
            WorkerInput::Message(ToWorker::Control(control))
        }
        Op::Rejected => WorkerInput::Message(ToWorker::RegisterRejected { reason: "no".into() }),
        Op::StreamBroken(which) => {
            WorkerInput::StreamBroken([Channel::Work, Channel::Control, Channel::Unary][usize::from(*which)])
        }
    })
}

/// How much of the machine a run reached, so that the property is known not to be vacuous.
#[derive(Debug, Default)]
struct Coverage {
    submits: usize,
    starts: usize,
    self_fences: usize,
    full_hosts: usize,
    registrations: usize,
}

fn run(slots: u32, seed: u64, ops: &[Op]) -> Result<Coverage, TestCaseError> {
    let mut coverage = Coverage::default();
    let mut h = Harness::with(settings(slots), seed);
    let mut model = Model::default();
    // Inputs are built lazily so that they can depend on what the worker did so far.
    let mut ops = ops.iter();
    let mut next = Some(WorkerInput::Start);
    loop {
        if let Some(input) = next.take() {
            if let WorkerInput::TaskFinished { task, token, .. } = &input {
                model.host_running.remove(&(*task, *token));
            }
            let now = h.now();
            if let WorkerInput::Message(message) = &input {
                model.fence.received(message);
            }
            let out = h.input(input.clone());
            for output in &out {
                // self_fence, judged by the oracle from the messages alone, not by the
                // machine's own deadline.
                if let Err(why) = output.judge_self_fence(&mut model.fence, now.mono) {
                    prop_assert!(false, "self_fence: {why}: {output:?} after {input:?}");
                }
                match output {
                    WorkerOutput::Send(ToCoordinator::Submit(s)) => {
                        model.submits.push((s.task, s.token));
                        coverage.submits += 1;
                    }
                    WorkerOutput::StartTask(a) => {
                        if let Some((incarnation, sent)) = model.adopted {
                            prop_assert!(
                                a.incarnation != incarnation || a.seq > sent,
                                "started {a:?}, sent before the answer adopted ({sent})"
                            );
                        }
                        prop_assert!(model.host_running.insert((a.task, a.token)), "started twice: {a:?}");
                        coverage.starts += 1;
                    }
                    WorkerOutput::Send(ToCoordinator::Heartbeat(b)) => {
                        model.beats.push((b.incarnation, b.beat_seq));
                        if b.beat_seq == 1 && matches!(input, WorkerInput::Message(ToWorker::Registered { .. })) {
                            prop_assert_eq!(b.incarnation.get(), model.answered.0);
                            prop_assert_eq!(
                                b.assigns_through,
                                model.answered.1,
                                "the answer's assigns_sent counts as received"
                            );
                            model.adopted = Some((b.incarnation, model.answered.1));
                        }
                        coverage.registrations += usize::from(b.beat_seq == 1);
                    }
                    WorkerOutput::Event(HistoryEvent::SelfFenced { .. }) => coverage.self_fences += 1,
                    _ => {}
                }
            }
            coverage.full_hosts += usize::from(model.host_running.len() == slots as usize);
            prop_assert!(
                model.host_running.len() <= slots as usize,
                "{} runs on a {slots}-slot host",
                model.host_running.len()
            );
            if let Some(d) = h.worker.self_fence_deadline() {
                prop_assert!(now.mono < d, "registered past its own deadline");
            }
            if let Some(at) = h.worker.poll_timeout() {
                prop_assert!(at > now.mono, "timer {at:?} not after now {:?}", now.mono);
            }
        }
        let Some(op) = ops.next() else { break };
        next = input_for(op, &mut h, &mut model);
    }
    Ok(coverage)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn never_submits_past_the_deadline_nor_runs_more_than_slots(
        slots in 1u32..4,
        seed in any::<u64>(),
        ops in prop::collection::vec(op(), 1..250),
    ) {
        run(slots, seed, &ops)?;
    }
}

/// Guards the property above against vacuity: the random runs do register, start
/// tasks up to the slot limit, submit, and self-fence.
#[test]
fn random_runs_reach_every_interesting_state() {
    let mut runner = TestRunner::deterministic();
    let strategy = prop::collection::vec(op(), 100..250);
    let mut total = Coverage::default();
    for seed in 0..200u64 {
        let ops = strategy.new_tree(&mut runner).expect("strategy generates").current();
        let coverage = run(2, seed, &ops).expect("the properties hold");
        total.submits += coverage.submits;
        total.starts += coverage.starts;
        total.self_fences += coverage.self_fences;
        total.full_hosts += coverage.full_hosts;
        total.registrations += coverage.registrations;
    }
    assert!(
        total.submits > 500
            && total.starts > 300
            && total.self_fences > 100
            && total.full_hosts > 300
            && total.registrations > 300,
        "{total:?}"
    );
}

/// Any message, with any field values, at any phase: handled without a panic, and the
/// timer stays in the future.
fn any_message() -> impl Strategy<Value = ToWorker> {
    let inc = any::<u64>().prop_map(Incarnation);
    let task = (any::<u64>(), any::<u32>()).prop_map(|(job, index)| TaskId::new(JobId(job), index));
    prop_oneof![
        (inc.clone(), any::<u64>()).prop_map(|(incarnation, assigns_sent)| ToWorker::Registered {
            incarnation,
            terms: terms(),
            assigns_sent
        }),
        ".{0,64}".prop_map(|reason| ToWorker::RegisterRejected { reason }),
        (inc.clone(), any::<u64>(), any::<bool>()).prop_map(|(incarnation, beat_seq, reregister)| {
            ToWorker::HeartbeatAck { incarnation, beat_seq, reregister }
        }),
        (any::<u64>(), any::<u64>(), task.clone(), any::<u64>())
            .prop_map(|(incarnation, seq, task, token)| ToWorker::Assign(assignment(incarnation, seq, task, token))),
        (task.clone(), any::<u64>()).prop_map(|(task, token)| ToWorker::SubmitAck {
            task,
            token: FencingToken(token),
            verdict: SubmitVerdict::Accepted
        }),
        (task, any::<u64>(), any::<u64>(), 0u8..4).prop_map(|(task, token, job, kind)| ToWorker::Control(match kind {
            0 => Control::Drain,
            1 => Control::Snapshot,
            2 => Control::CancelTask { task, token: FencingToken(token) },
            _ => Control::CancelJob { job: JobId(job) },
        })),
    ]
}

proptest! {
    #[test]
    fn arbitrary_messages_never_panic(
        messages in prop::collection::vec((0u64..3_000, any_message()), 1..60),
        register_first in any::<bool>(),
    ) {
        let mut h = if register_first { Harness::registered(2, 1) } else { Harness::new(2) };
        if !register_first {
            h.input(WorkerInput::Start);
        }
        for (advance_ms, message) in messages {
            let to = h.mono + std::time::Duration::from_millis(advance_ms);
            h.at_mono(to);
            h.message(message);
            if let Some(at) = h.worker.poll_timeout() {
                prop_assert!(at > h.mono);
            }
        }
    }
}
