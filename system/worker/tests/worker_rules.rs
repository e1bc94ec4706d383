//! One story per rule of the worker machine, driven by hand with explicit clocks.

mod common;

use std::time::Duration;

use common::*;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::Deserializer;
use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{
    Channel, Control, Outcome, Pull, Register, SubmitVerdict, ToCoordinator, ToWorker, WorkerTerms,
};
use rollout_core::{ContentId, FencingToken, Incarnation, JobId, PROTOCOL_VERSION};
use rollout_worker::{
    CANCELLED_BY_HOST_MESSAGE, Phase, TaskOutcome, UNACKED_SUBMITS_PER_SLOT, WorkerInput, WorkerOutput,
    metrics::{PLUGIN_RESTARTS, TASK_LATENCY_US, TASKS_CANCELLED, TASKS_FAILED, TASKS_STARTED, TASKS_SUCCEEDED},
};

fn succeeded(bytes: &[u8]) -> TaskOutcome {
    TaskOutcome::Succeeded { result: ContentId::of(bytes), size_bytes: bytes.len() as u64 }
}

fn finish(h: &mut Harness, task: rollout_core::TaskId, token: u64, outcome: TaskOutcome) -> Vec<WorkerOutput> {
    h.input(WorkerInput::TaskFinished { task, token: FencingToken(token), outcome })
}

fn ack(incarnation: u64, beat_seq: u64) -> ToWorker {
    ToWorker::HeartbeatAck { incarnation: Incarnation(incarnation), beat_seq, reregister: false }
}

// ---------------------------------------------------------------- registration

#[test]
fn nothing_happens_before_start_and_start_registers_at_once() {
    let mut h = Harness::new(2);
    assert_eq!(h.worker.phase(), Phase::NotStarted);
    assert!(h.tick().is_empty());
    assert!(
        h.message(ToWorker::Registered { incarnation: Incarnation(1), terms: terms(), assigns_sent: 0 }).is_empty()
    );
    assert_eq!(h.worker.poll_timeout(), None);

    let out = h.input(WorkerInput::Start);
    assert_eq!(
        out,
        [WorkerOutput::Send(ToCoordinator::Register(Register {
            protocol_version: PROTOCOL_VERSION,
            plugins: vec!["echo".to_owned()],
            slots: 2,
            inventory: settings(2).inventory,
            boot: h.worker.boot(),
            adopted: None,
        }))]
    );
    assert_eq!(h.worker.phase(), Phase::Unregistered);
    assert_eq!(h.worker.poll_timeout(), Some(mono_ms(1_000)), "the register timeout");
    assert!(h.input(WorkerInput::Start).is_empty(), "a second Start is ignored");
}

/// The delays between a Register's timeout and its retry, for `attempts` retries.
fn retry_delays(seed: u64, attempts: usize) -> Vec<Duration> {
    let mut h = Harness::with(settings(1), seed);
    h.input(WorkerInput::Start);
    let mut delays = Vec::new();
    for _ in 0..attempts {
        let timeout_at = h.worker.poll_timeout().expect("register timeout set");
        assert!(h.tick_at_timeout().is_empty(), "a timeout alone sends nothing");
        let retry_at = h.worker.poll_timeout().expect("retry scheduled");
        delays.push(retry_at - timeout_at);
        let out = h.tick_at_timeout();
        assert_eq!(registers(&out).len(), 1, "the retry is one Register");
    }
    delays
}

#[test]
fn registration_retries_back_off_exponentially_capped_and_jittered_per_seed() {
    let delays = retry_delays(7, 12);
    for (n, delay) in delays.iter().enumerate() {
        let ceiling = (100 * MS * (1u32 << n.min(20))).min(5_000 * MS);
        assert!(
            *delay >= ceiling / 2 && *delay <= ceiling,
            "retry {n}: {delay:?} outside equal-jitter range [{:?}, {ceiling:?}]",
            ceiling / 2
        );
    }
    assert!(delays[0] <= 100 * MS && delays[5] >= 1_600 * MS, "grows: {delays:?}");
    assert!(delays.iter().all(|d| *d <= 5_000 * MS), "capped at reconnect_backoff_max");
    assert!(delays[6..].iter().all(|d| *d >= 2_500 * MS), "stays at the cap once reached");

    assert_eq!(retry_delays(7, 12), delays, "same seed, same delays");
    assert_ne!(retry_delays(8, 12), delays, "another seed, other jitter");
    let distinct: std::collections::BTreeSet<_> = delays[6..].iter().collect();
    assert!(distinct.len() > 1, "capped delays are still jittered: {delays:?}");
}

#[test]
fn rejected_registration_is_fatal_and_final() {
    let mut h = Harness::new(2);
    h.input(WorkerInput::Start);
    h.at(20);
    let out = h.message(ToWorker::RegisterRejected { reason: "protocol version 1, coordinator speaks 2".into() });
    assert_eq!(out.len(), 1);
    let WorkerOutput::Fatal(message) = &out[0] else { panic!("expected Fatal, got {out:?}") };
    assert!(message.contains("protocol version 1, coordinator speaks 2"), "{message}");
    assert_eq!(h.worker.phase(), Phase::Stopped);
    assert_eq!(h.worker.poll_timeout(), None, "no retries");
    h.at(60_000);
    assert!(h.tick().is_empty());
    assert!(
        h.message(ToWorker::Registered { incarnation: Incarnation(3), terms: terms(), assigns_sent: 0 }).is_empty()
    );
}

#[test]
fn registration_beats_and_pulls_at_once_and_starts_the_fence_clock_at_the_register() {
    let mut h = Harness::new(2);
    h.input(WorkerInput::Start);
    h.at(30);
    let wall = h.wall;
    let out = h.message(ToWorker::Registered { incarnation: Incarnation(7), terms: terms(), assigns_sent: 0 });
    assert_eq!(h.worker.phase(), Phase::Registered);
    assert_eq!(h.worker.incarnation(), Some(Incarnation(7)));
    assert_eq!(out.len(), 2, "{out:?}");
    let beat = beats(&out)[0];
    assert_eq!((beat.incarnation, beat.beat_seq), (Incarnation(7), 1));
    assert_eq!(beat.due_at, wall + 1_000 * MS, "due_at = wall_now + 2 × heartbeat_interval");
    assert!(beat.running.is_empty() && beat.metrics.is_none());
    assert_eq!(pulls(&out), [&Pull { incarnation: Incarnation(7), free_slots: 2, assigns_through: 0 }]);
    assert_eq!(h.worker.self_fence_deadline(), Some(mono_ms(4_000)), "clock starts at the Register sent at 0 ms");
    assert_eq!(h.worker.poll_timeout(), Some(mono_ms(530)), "next beat");
}

#[test]
fn the_coordinators_terms_set_the_beat_schedule_and_the_self_fence_deadline() {
    // Configured: beat 500 ms, self-fence 4 s. The coordinator: beat 200 ms, fence 900 ms.
    let coordinators = WorkerTerms {
        heartbeat_interval: 200 * MS,
        worker_self_fence_timeout: 900 * MS,
        clock_skew_budget: 100 * MS,
        max_result_bytes: 1 << 20,
    };
    let mut h = Harness::new(1);
    assert_eq!(h.worker.terms(), terms(), "the config's terms until a coordinator answers");
    h.input(WorkerInput::Start);
    h.at(30);
    let wall = h.wall;
    let out = h.message(ToWorker::Registered { incarnation: Incarnation(1), terms: coordinators, assigns_sent: 0 });
    assert_eq!(h.worker.terms(), coordinators);
    assert_eq!(beats(&out)[0].due_at, wall + 400 * MS, "due_at = wall_now + 2 × the coordinator's interval");
    assert_eq!(h.worker.poll_timeout(), Some(mono_ms(230)), "next beat on the coordinator's interval");
    assert_eq!(h.worker.self_fence_deadline(), Some(mono_ms(900)), "fence clock from the Register sent at 0 ms");
    // No beat is acknowledged: the worker fences at 900 ms, not at 4 s.
    let out = h.run_until(900);
    assert!(out.iter().any(|o| matches!(o, WorkerOutput::Event(HistoryEvent::SelfFenced { .. }))), "{out:?}");
    assert!(h.worker.is_self_fenced());
    assert_eq!(h.worker.terms(), coordinators, "kept until the next coordinator answers");
}

#[test]
fn stale_or_late_registration_answers_are_ignored() {
    let mut h = Harness::registered(1, 5);
    assert!(
        h.message(ToWorker::Registered { incarnation: Incarnation(6), terms: terms(), assigns_sent: 0 }).is_empty(),
        "already registered"
    );
    assert!(h.message(ToWorker::RegisterRejected { reason: "late".into() }).is_empty());
    assert_eq!(h.worker.incarnation(), Some(Incarnation(5)));

    // Fenced by the coordinator, then an old incarnation's answer shows up: stale.
    h.message(ToWorker::HeartbeatAck { incarnation: Incarnation(5), beat_seq: 1, reregister: true });
    let out = h.tick_at_timeout();
    assert_eq!(registers(&out).len(), 1);
    assert!(
        h.message(ToWorker::Registered { incarnation: Incarnation(5), terms: terms(), assigns_sent: 0 }).is_empty()
    );
    assert_eq!(h.worker.phase(), Phase::Unregistered);
    assert_eq!(
        beats(&h.message(ToWorker::Registered { incarnation: Incarnation(9), terms: terms(), assigns_sent: 0 })).len(),
        1
    );
}

#[test]
fn a_register_names_its_process_and_the_incarnation_it_leaves() {
    let mut h = Harness::registered(2, 1);
    let boot = h.worker.boot();
    assert_ne!(Harness::with(settings(2), 43).worker.boot(), boot, "another process, another boot");
    h.message(ToWorker::HeartbeatAck { incarnation: Incarnation(1), beat_seq: 1, reregister: true });
    let out = h.tick_at_timeout();
    let register = registers(&out)[0];
    assert_eq!((register.boot, register.adopted), (boot, Some(Incarnation(1))));

    // The answer came to an earlier retry of this round, after three assignments had
    // gone out for the incarnation: they count as received, so one arriving late is
    // not run (the coordinator re-queues it on the first beat) and a new one is.
    let out = h.message(ToWorker::Registered { incarnation: Incarnation(2), terms: terms(), assigns_sent: 3 });
    assert_eq!(pulls(&out)[0].assigns_through, 3);
    assert!(started(&h.message(ToWorker::Assign(assignment(2, 2, task(1, 0), 10)))).is_empty());
    let out = h.message(ToWorker::Assign(assignment(2, 4, task(1, 1), 11)));
    assert_eq!(started(&out), [(task(1, 1), FencingToken(11))]);
}

#[test]
fn an_answer_to_a_register_older_than_the_fence_timeout_is_ignored() {
    let mut h = Harness::with(rollout_worker::WorkerSettings { register_timeout: 10_000 * MS, ..settings(1) }, 1);
    h.input(WorkerInput::Start);
    h.at(4_000);
    assert!(
        h.message(ToWorker::Registered { incarnation: Incarnation(1), terms: terms(), assigns_sent: 0 }).is_empty(),
        "registered from a Register sent 4 s ago, the worker would have to fence at once"
    );
    assert_eq!(h.worker.phase(), Phase::Unregistered);
}

// ---------------------------------------------------------------- heartbeats

#[test]
fn heartbeats_follow_the_monotonic_schedule_and_announce_due_at_on_the_wall_clock() {
    let mut h = Harness::registered(2, 1);
    h.at(529);
    assert!(h.tick().is_empty(), "not due yet");

    h.jump_wall(-3_600_000); // the wall clock steps back an hour: the schedule does not care
    let out = h.tick_at_timeout();
    assert_eq!(h.ms(), 530);
    let beat = beats(&out)[0];
    assert_eq!(beat.beat_seq, 2);
    assert_eq!(beat.due_at, h.wall + 1_000 * MS);

    h.jump_wall(86_400_000);
    let out = h.tick_at_timeout();
    assert_eq!((h.ms(), beats(&out)[0].beat_seq, beats(&out)[0].due_at), (1_030, 3, h.wall + 1_000 * MS));

    // A driver that wakes late gets one beat, and the schedule resumes from then.
    h.at(2_900);
    let out = h.tick();
    assert_eq!(beats(&out).len(), 1);
    assert_eq!(h.worker.poll_timeout(), Some(mono_ms(3_400)));
}

#[test]
fn heartbeats_report_running_and_unacknowledged_runs_and_assigns_through() {
    let mut h = Harness::registered(2, 1);
    h.message(ack(1, 1));
    h.at(100);
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    h.message(ToWorker::Assign(assignment(1, 2, task(1, 1), 11)));
    h.at(200);
    finish(&mut h, task(1, 0), 10, succeeded(b"r"));
    let out = h.tick_at_timeout();
    let beat = beats(&out)[0];
    assert_eq!(
        beat.running,
        [(task(1, 0), FencingToken(10)), (task(1, 1), FencingToken(11))],
        "the finished-but-unacknowledged run is still reported, with its token"
    );
    assert_eq!(beat.assigns_through, 2);
}

#[test]
fn acks_move_the_fence_clock_to_the_send_time_of_the_acked_beat() {
    let mut h = Harness::registered(1, 3);
    h.run_until(1_030); // beats 1 (30 ms), 2 (530 ms), 3 (1 030 ms)
    h.at(1_500);
    h.message(ack(3, 2));
    assert_eq!(h.worker.self_fence_deadline(), Some(mono_ms(4_530)));
    h.message(ack(3, 1));
    assert_eq!(h.worker.self_fence_deadline(), Some(mono_ms(4_530)), "a late ack of an older beat changes nothing");
    h.message(ack(2, 3));
    assert_eq!(h.worker.self_fence_deadline(), Some(mono_ms(4_530)), "another incarnation's ack is ignored");
    h.message(ack(3, 99));
    assert_eq!(h.worker.self_fence_deadline(), Some(mono_ms(4_530)), "an ack of a beat never sent is ignored");
    h.message(ack(3, 3));
    assert_eq!(h.worker.self_fence_deadline(), Some(mono_ms(5_030)));
}

// ---------------------------------------------------------------- self-fence

#[test]
fn self_fence_fires_exactly_at_the_deadline_on_the_monotonic_clock_whatever_the_wall_clock_does() {
    let mut h = Harness::new(1);
    h.input(WorkerInput::Start);
    h.at(130);
    h.message(ToWorker::Registered { incarnation: Incarnation(4), terms: terms(), assigns_sent: 0 });
    assert_eq!(h.worker.self_fence_deadline(), Some(mono_ms(4_000)));
    let mut fenced_at = None;
    while fenced_at.is_none() {
        match h.ms() {
            1_130 => h.jump_wall(86_400_000),      // a day forward
            2_130 => h.jump_wall(-2 * 86_400_000), // two days back
            _ => {}
        }
        let out = h.tick_at_timeout();
        if out.iter().any(|o| matches!(o, WorkerOutput::Event(HistoryEvent::SelfFenced { .. }))) {
            fenced_at = Some(h.mono);
            assert_eq!(
                out[0],
                WorkerOutput::Event(HistoryEvent::SelfFenced { worker: worker_id(), incarnation: Incarnation(4) })
            );
        } else {
            assert!(h.mono < mono_ms(4_000), "not fenced at the deadline");
        }
    }
    assert_eq!(fenced_at, Some(mono_ms(4_000)), "the driver is woken exactly at the deadline");
    assert_eq!(h.worker.phase(), Phase::Unregistered);
    assert!(h.worker.is_self_fenced());
}

#[test]
fn the_deadline_is_checked_on_every_input_not_only_ticks() {
    let mut h = Harness::registered(1, 2);
    h.at(100);
    h.message(ToWorker::Assign(assignment(2, 1, task(1, 0), 10)));
    h.at(3_999);
    h.tick();
    // The driver overslept the deadline; the task's end is the first thing it delivers.
    h.at(4_200);
    let out = finish(&mut h, task(1, 0), 10, succeeded(b"r"));
    assert_eq!(
        out,
        [
            WorkerOutput::Event(HistoryEvent::SelfFenced { worker: worker_id(), incarnation: Incarnation(2) }),
            WorkerOutput::CancelTask { task: task(1, 0), token: FencingToken(10) },
            WorkerOutput::Event(HistoryEvent::TaskStopped {
                task: task(1, 0),
                worker: worker_id(),
                token: FencingToken(10)
            }),
        ],
        "fenced first; the result is withheld"
    );
}

#[test]
fn self_fence_cancels_every_run_withholds_every_result_and_re_registers() {
    let mut h = Harness::registered(2, 1);
    h.at(100);
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    h.message(ToWorker::Assign(assignment(1, 2, task(1, 1), 11)));
    h.at(1_000);
    assert_eq!(submits(&finish(&mut h, task(1, 0), 10, succeeded(b"a"))).len(), 1);

    // No beat is ever acknowledged: the Register went out at 0 ms, so the deadline is 4 s.
    let out = h.run_until(4_000);
    let fence_at = out.iter().position(|o| matches!(o, WorkerOutput::Event(HistoryEvent::SelfFenced { .. })));
    let fence_at = fence_at.expect("fenced");
    assert_eq!(cancelled(&out[fence_at..]), [(task(1, 1), FencingToken(11))]);
    assert!(submits(&out[fence_at..]).is_empty());
    assert_eq!(h.worker.unacknowledged_submits().count(), 0, "the unacknowledged submit is withheld");
    assert_eq!(h.worker.stopping_tasks().collect::<Vec<_>>(), [(task(1, 1), FencingToken(11))]);
    let retry_at = h.worker.poll_timeout().expect("re-registration scheduled");
    assert!(retry_at >= mono_ms(4_050) && retry_at <= mono_ms(4_100), "first backoff delay: {retry_at:?}");

    // The cancelled run reports success anyway: stopped, but nothing is submitted.
    h.at(4_010);
    let out = finish(&mut h, task(1, 1), 11, succeeded(b"b"));
    assert_eq!(
        out,
        [WorkerOutput::Event(HistoryEvent::TaskStopped {
            task: task(1, 1),
            worker: worker_id(),
            token: FencingToken(11)
        })]
    );
    assert!(
        h.message(ToWorker::SubmitAck { task: task(1, 0), token: FencingToken(10), verdict: SubmitVerdict::Accepted })
            .is_empty()
    );

    let out = h.tick_at_timeout();
    assert_eq!(registers(&out).len(), 1);
    let out = h.message(ToWorker::Registered { incarnation: Incarnation(2), terms: terms(), assigns_sent: 0 });
    assert!(!h.worker.is_self_fenced());
    assert_eq!((beats(&out)[0].incarnation, beats(&out)[0].beat_seq), (Incarnation(2), 1), "beats restart at 1");
    assert_eq!(pulls(&out)[0].free_slots, 2);
    assert!(beats(&out)[0].running.is_empty());
}

#[test]
fn a_run_still_being_cancelled_keeps_its_slot_after_re_registration() {
    let mut h = Harness::registered(2, 1);
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    h.run_until(4_000);
    h.tick_at_timeout();
    let out = h.message(ToWorker::Registered { incarnation: Incarnation(2), terms: terms(), assigns_sent: 0 });
    assert_eq!(pulls(&out)[0].free_slots, 1, "the plugin host still runs the cancelled task");
    let out = finish(&mut h, task(1, 0), 10, TaskOutcome::Cancelled);
    assert!(submits(&out).is_empty());
    assert_eq!(pulls(&out)[0].free_slots, 2, "its end frees the slot");
}

#[test]
fn reregister_ack_cancels_and_withholds_at_once_without_a_fenced_event() {
    let mut h = Harness::registered(2, 1);
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    h.message(ToWorker::Assign(assignment(1, 2, task(1, 1), 11)));
    finish(&mut h, task(1, 0), 10, succeeded(b"a"));
    h.at(300);

    let ignored = h.message(ToWorker::HeartbeatAck { incarnation: Incarnation(0), beat_seq: 1, reregister: true });
    assert!(ignored.is_empty(), "another incarnation's reregister is not for us");

    let out = h.message(ToWorker::HeartbeatAck { incarnation: Incarnation(1), beat_seq: 1, reregister: true });
    assert_eq!(out, [WorkerOutput::CancelTask { task: task(1, 1), token: FencingToken(11) }]);
    assert_eq!(h.worker.phase(), Phase::Unregistered);
    assert_eq!(h.worker.unacknowledged_submits().count(), 0);
    let retry_at = h.worker.poll_timeout().expect("re-registration scheduled");
    assert!(retry_at >= mono_ms(350) && retry_at <= mono_ms(400));
    let out = finish(&mut h, task(1, 1), 11, succeeded(b"b"));
    assert!(submits(&out).is_empty(), "withheld");
}

// ---------------------------------------------------------------- pulls and assignments

#[test]
fn pulls_go_out_with_every_beat_while_a_slot_is_free_and_whenever_one_frees() {
    let mut h = Harness::registered(1, 1);
    let out = h.tick_at_timeout();
    assert_eq!(pulls(&out), [&Pull { incarnation: Incarnation(1), free_slots: 1, assigns_through: 0 }], "re-sent");

    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    let out = h.tick_at_timeout();
    assert!(pulls(&out).is_empty(), "no free slot, no pull");

    h.at(1_100);
    let out = finish(&mut h, task(1, 0), 10, succeeded(b"a"));
    assert_eq!(
        pulls(&out),
        [&Pull { incarnation: Incarnation(1), free_slots: 1, assigns_through: 1 }],
        "a finished but unacknowledged task does not hold its slot"
    );
    let out = h.tick_at_timeout();
    assert_eq!(pulls(&out).len(), 1);
}

#[test]
fn assignments_for_another_incarnation_are_ignored() {
    let mut h = Harness::registered(2, 5);
    assert!(h.message(ToWorker::Assign(assignment(4, 1, task(1, 0), 10))).is_empty());
    assert!(h.message(ToWorker::Assign(assignment(6, 1, task(1, 0), 10))).is_empty());
    assert_eq!(h.worker.assigns_through(), 0);
    assert_eq!(h.worker.running_tasks().count(), 0);
}

#[test]
fn assignments_start_with_an_event_and_are_reported_through_assigns_through_even_when_not_started() {
    let mut h = Harness::registered(1, 1);
    let out = h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    assert_eq!(
        out,
        [
            WorkerOutput::StartTask(assignment(1, 1, task(1, 0), 10)),
            WorkerOutput::Event(HistoryEvent::TaskStarted {
                task: task(1, 0),
                worker: worker_id(),
                token: FencingToken(10)
            }),
        ]
    );
    assert!(h.message(ToWorker::Assign(assignment(1, 2, task(1, 1), 11))).is_empty(), "no free slot");
    assert!(h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10))).is_empty(), "a duplicate");
    assert_eq!(h.worker.assigns_through(), 2);
    let beat = beats(&h.tick_at_timeout())[0].clone();
    assert_eq!(beat.assigns_through, 2);
    assert_eq!(beat.running, [(task(1, 0), FencingToken(10))], "the refused one is not running: re-queued");

    finish(&mut h, task(1, 0), 10, succeeded(b"a"));
    assert!(
        h.message(ToWorker::Assign(assignment(1, 2, task(1, 1), 11))).is_empty(),
        "seq 2 was already counted as received; the coordinator re-queues it"
    );
}

// ---------------------------------------------------------------- submits

#[test]
fn submits_are_re_sent_every_two_beats_until_acknowledged() {
    let mut h = Harness::registered(1, 1);
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    h.at(200);
    let out = finish(&mut h, task(1, 0), 10, succeeded(b"result"));
    let submit = submits(&out)[0].clone();
    assert_eq!(submit.incarnation, Incarnation(1));
    assert_eq!(submit.outcome, Outcome::Succeeded { result: ContentId::of(b"result"), size_bytes: 6 });

    h.message(ack(1, 1));
    let out = h.run_until(1_199);
    assert!(submits(&out).is_empty(), "not yet 2 × heartbeat_interval");
    assert_eq!(h.worker.poll_timeout(), Some(mono_ms(1_200)), "the resend is a timer of its own");
    let out = h.tick_at_timeout();
    assert_eq!(submits(&out), [&submit]);
    h.message(ack(1, 3));
    let out = h.run_until(2_199);
    assert!(submits(&out).is_empty());
    assert_eq!(submits(&h.tick_at_timeout()), [&submit]);

    h.message(ToWorker::SubmitAck { task: task(1, 0), token: FencingToken(10), verdict: SubmitVerdict::Stale });
    assert_eq!(h.worker.unacknowledged_submits().count(), 0, "any verdict ends the submit");
    h.message(ack(1, 5));
    let out = h.run_until(3_500);
    assert!(submits(&out).is_empty());
    assert!(beats(&out).iter().all(|b| b.running.is_empty()));
}

#[test]
fn failure_messages_are_truncated_and_a_cancellation_by_the_host_is_a_failure() {
    let mut h = Harness::with(rollout_worker::WorkerSettings { max_error_message_bytes: 9, ..settings(2) }, 1);
    h.input(WorkerInput::Start);
    h.message(ToWorker::Registered { incarnation: Incarnation(1), terms: terms(), assigns_sent: 0 });
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    h.message(ToWorker::Assign(assignment(1, 2, task(1, 1), 11)));
    let out = finish(&mut h, task(1, 0), 10, TaskOutcome::Failed { message: "ééééé!".into() });
    assert_eq!(submits(&out)[0].outcome, Outcome::Failed { message: "éééé".into() }, "8 bytes, not half an é");
    let out = finish(&mut h, task(1, 1), 11, TaskOutcome::Cancelled);
    assert_eq!(submits(&out)[0].outcome, Outcome::Failed { message: CANCELLED_BY_HOST_MESSAGE[..9].to_owned() });
}

#[test]
fn unacknowledged_submits_are_bounded_by_backpressure() {
    let mut h = Harness::registered(1, 1);
    let backlog = UNACKED_SUBMITS_PER_SLOT as u64;
    for seq in 1..=backlog {
        let token = 10 + seq;
        h.message(ToWorker::Assign(assignment(1, seq, task(1, seq as u32), token)));
        let out = finish(&mut h, task(1, seq as u32), token, succeeded(b"x"));
        assert_eq!(pulls(&out).is_empty(), seq == backlog, "after submit {seq}");
    }
    assert_eq!(h.worker.free_slots(), 0);
    assert!(h.message(ToWorker::Assign(assignment(1, 99, task(2, 0), 99))).is_empty(), "not started");
    let out =
        h.message(ToWorker::SubmitAck { task: task(1, 1), token: FencingToken(11), verdict: SubmitVerdict::Accepted });
    assert_eq!(pulls(&out)[0].free_slots, 1, "an ack makes room again");
}

// ---------------------------------------------------------------- control

#[test]
fn drain_stops_pulling_and_lets_running_tasks_finish() {
    let mut h = Harness::registered(2, 1);
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    assert!(h.message(ToWorker::Control(Control::Drain)).is_empty());
    assert!(h.worker.is_draining());
    let out = h.tick_at_timeout();
    assert_eq!(beats(&out).len(), 1);
    assert!(pulls(&out).is_empty(), "draining: no pulls");
    assert!(h.message(ToWorker::Assign(assignment(1, 2, task(1, 1), 11))).is_empty(), "no new tasks");
    let out = finish(&mut h, task(1, 0), 10, succeeded(b"a"));
    assert_eq!(submits(&out).len(), 1, "the running task finishes and submits");
    assert!(pulls(&out).is_empty());
}

#[test]
fn cancel_task_stops_only_the_named_run_and_withholds_its_result() {
    let mut h = Harness::registered(2, 1);
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    let wrong_token = Control::CancelTask { task: task(1, 0), token: FencingToken(9) };
    assert!(h.message(ToWorker::Control(wrong_token)).is_empty(), "another lease of the task");
    let out = h.message(ToWorker::Control(Control::CancelTask { task: task(1, 0), token: FencingToken(10) }));
    assert_eq!(out, [WorkerOutput::CancelTask { task: task(1, 0), token: FencingToken(10) }]);
    assert_eq!(h.worker.running_tasks().count(), 0);
    let out = finish(&mut h, task(1, 0), 10, succeeded(b"a"));
    assert!(submits(&out).is_empty(), "withheld");
    assert!(matches!(out[0], WorkerOutput::Event(HistoryEvent::TaskStopped { .. })));
    assert_eq!(pulls(&out)[0].free_slots, 2, "its slot is free again");
}

#[test]
fn cancel_job_stops_every_run_of_that_job() {
    let mut h = Harness::registered(3, 1);
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    h.message(ToWorker::Assign(assignment(1, 2, task(2, 0), 11)));
    h.message(ToWorker::Assign(assignment(1, 3, task(1, 1), 12)));
    let out = h.message(ToWorker::Control(Control::CancelJob { job: JobId(1) }));
    assert_eq!(cancelled(&out), [(task(1, 0), FencingToken(10)), (task(1, 1), FencingToken(12))]);
    assert_eq!(h.worker.running_tasks().collect::<Vec<_>>(), [(task(2, 0), FencingToken(11))]);
}

#[test]
fn snapshot_beats_at_once_without_moving_the_schedule() {
    let mut h = Harness::registered(1, 1);
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    h.at(200);
    let out = h.message(ToWorker::Control(Control::Snapshot));
    let beat = beats(&out)[0];
    assert_eq!((beat.beat_seq, beat.running.as_slice()), (2, &[(task(1, 0), FencingToken(10))][..]));
    assert_eq!(h.worker.poll_timeout(), Some(mono_ms(530)));
}

#[test]
fn control_is_ignored_while_unregistered() {
    let mut h = Harness::new(1);
    h.input(WorkerInput::Start);
    for control in [Control::Drain, Control::Snapshot, Control::CancelJob { job: JobId(1) }] {
        assert!(h.message(ToWorker::Control(control)).is_empty());
    }
}

// ---------------------------------------------------------------- metrics

fn counter(beat: &rollout_core::protocol::Heartbeat, name: &str) -> Option<u64> {
    let metrics = beat.metrics.as_ref()?;
    metrics.counters.iter().find(|(n, p, _)| n == name && p == "echo").map(|(_, _, v)| *v)
}

#[test]
fn metrics_ship_at_most_once_per_interval_and_decode_with_hdrhistogram() {
    let mut h = Harness::registered(2, 1);
    h.at(100);
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    h.message(ToWorker::Assign(assignment(1, 2, task(1, 1), 11)));
    h.message(ToWorker::Assign(assignment(1, 3, task(1, 2), 12)));
    h.at(350);
    finish(&mut h, task(1, 0), 10, succeeded(b"a"));
    h.message(ToWorker::Control(Control::CancelTask { task: task(1, 1), token: FencingToken(11) }));
    finish(&mut h, task(1, 1), 11, TaskOutcome::Cancelled);
    h.message(ack(1, 1));

    let out = h.tick_at_timeout();
    assert_eq!(h.ms(), 530);
    assert!(beats(&out)[0].metrics.is_none(), "less than metrics_interval since start");

    let out = h.tick_at_timeout();
    assert_eq!(h.ms(), 1_030);
    let beat = beats(&out)[0];
    assert_eq!(counter(beat, TASKS_STARTED), Some(2), "the third assignment found no free slot");
    assert_eq!(counter(beat, TASKS_SUCCEEDED), Some(1));
    assert_eq!(counter(beat, TASKS_CANCELLED), Some(1));
    assert_eq!(counter(beat, TASKS_FAILED), None);
    let metrics = beat.metrics.as_ref().expect("shipped");
    let names: Vec<_> = metrics.counters.iter().map(|(n, _, _)| n.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "deterministic order");
    let (name, plugin, bytes) = &metrics.histograms[0];
    assert_eq!((name.as_str(), plugin.as_str()), (TASK_LATENCY_US, "echo"));
    let latency: Histogram<u64> = Deserializer::new().deserialize(&mut bytes.as_slice()).expect("V2 decodes");
    assert_eq!(latency.len(), 1);
    assert!(latency.equivalent(latency.max(), 250_000), "250 ms in µs, got {}", latency.max());

    let out = h.run_until(1_530);
    assert_eq!(beats(&out).len(), 1);
    assert!(beats(&out)[0].metrics.is_none(), "reset after shipping; nothing new");
    h.at(1_550);
    h.message(ToWorker::Assign(assignment(1, 4, task(1, 2), 12)));
    h.at(1_600);
    finish(&mut h, task(1, 2), 12, succeeded(b"c"));
    h.message(ack(1, 3));
    let out = h.tick_at_timeout();
    assert_eq!(h.ms(), 2_030);
    let beat = beats(&out)[0];
    assert_eq!(
        (counter(beat, TASKS_STARTED), counter(beat, TASKS_SUCCEEDED)),
        (Some(1), Some(1)),
        "only the new delta"
    );
    assert_eq!(counter(beat, TASKS_CANCELLED), None);
}

#[test]
fn plugin_restarts_ship_with_the_next_metrics_and_name_only_offered_plugins() {
    let mut h = Harness::registered(2, 1);
    h.at(100);
    h.input(WorkerInput::PluginRestarted { plugin: "echo".into(), count: 2 });
    h.input(WorkerInput::PluginRestarted { plugin: "echo".into(), count: 1 });
    h.input(WorkerInput::PluginRestarted { plugin: "not-offered".into(), count: 4 });
    h.input(WorkerInput::PluginRestarted { plugin: "echo".into(), count: 0 });
    h.tick_at_timeout();
    let out = h.tick_at_timeout();
    let beat = beats(&out)[0];
    assert_eq!(counter(beat, PLUGIN_RESTARTS), Some(3));
    let metrics = beat.metrics.as_ref().expect("shipped");
    assert!(
        metrics.counters.iter().any(|(n, p, v)| n == PLUGIN_RESTARTS && p == "_unknown" && *v == 4),
        "a plugin the worker does not offer is filed under _unknown: {metrics:?}"
    );
    assert!(!metrics.counters.iter().any(|(_, p, _)| p == "not-offered"));
}

// ---------------------------------------------------------------- certificate renewal

fn credential(from_ms: u64, to_ms: u64) -> rollout_worker::Credential {
    rollout_worker::Credential {
        not_before: wall_origin() + Duration::from_millis(from_ms),
        not_after: wall_origin() + Duration::from_millis(to_ms),
    }
}

fn renewals(out: &[WorkerOutput]) -> usize {
    out.iter().filter(|o| matches!(o, WorkerOutput::RenewCertificate)).count()
}

/// Ticks at every timer until an output is a renewal request; the test time then.
fn until_renewal_asked(h: &mut Harness, by_ms: u64) -> u64 {
    while h.ms() <= by_ms {
        if renewals(&h.tick_at_timeout()) > 0 {
            return h.ms();
        }
    }
    panic!("no renewal asked for by {by_ms} ms");
}

#[test]
fn the_certificate_is_renewed_at_two_thirds_of_its_life_once_at_a_time_and_again_after_renewal() {
    let cred = credential(0, 60_000);
    let settings = rollout_worker::WorkerSettings { credential: Some(cred), ..settings(1) };
    let mut h = Harness::with(settings, 7);
    h.input(WorkerInput::Start);
    let due = rollout_worker::Worker::first_renewal_at(cred, 7);
    let due_ms = due.duration_since(wall_origin()).expect("after origin").as_millis() as u64;
    assert!((35_000..=40_000).contains(&due_ms), "2/3 of 60 s, less up to 1/12: {due_ms}");
    assert_eq!(until_renewal_asked(&mut h, 41_000), due_ms, "asked exactly when due (a timer, not a later tick)");
    let out = h.run_until(due_ms + 10_000);
    assert_eq!(renewals(&out), 0, "one renewal outstanding at a time");
    // Renewed at 50 s for another minute: the next falls 35–40 s later.
    h.input(WorkerInput::CertificateRenewed(credential(50_000, 110_000)));
    assert_eq!(h.worker.credential(), Some(credential(50_000, 110_000)));
    let next = until_renewal_asked(&mut h, 91_000);
    assert!((85_000..=90_000).contains(&next), "{next}");
}

#[test]
fn a_failed_renewal_is_retried_after_a_backoff_and_a_late_failure_report_is_ignored() {
    let cred = credential(0, 600_000);
    let settings = rollout_worker::WorkerSettings { credential: Some(cred), ..settings(1) };
    let mut h = Harness::with(settings, 3);
    h.input(WorkerInput::RenewalFailed);
    h.input(WorkerInput::Start);
    let first = until_renewal_asked(&mut h, 401_000);
    h.at(first + 100);
    assert_eq!(renewals(&h.input(WorkerInput::RenewalFailed)), 0, "not at once");
    let second = until_renewal_asked(&mut h, first + 120_000);
    assert!(second >= first + 100 + 2_500, "a backoff of about 5 s (jittered) at least halves: {second} vs {first}");
    h.input(WorkerInput::CertificateRenewed(credential(second, second + 600_000)));
    assert_eq!(renewals(&h.input(WorkerInput::RenewalFailed)), 0);
    let out = h.run_until(second + 300_000);
    assert_eq!(renewals(&out), 0, "a failure reported when none is out changes nothing");
}

#[test]
fn a_certificate_that_expires_unrenewed_stops_the_worker_and_withholds_its_results() {
    let settings = rollout_worker::WorkerSettings { credential: Some(credential(0, 3_000)), ..settings(2) };
    let mut h = Harness::with(settings, 1);
    h.input(WorkerInput::Start);
    h.at(30);
    h.message(ToWorker::Registered { incarnation: Incarnation(1), terms: terms(), assigns_sent: 0 });
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    h.message(ToWorker::Assign(assignment(1, 2, task(1, 1), 11)));
    h.at(500);
    finish(&mut h, task(1, 0), 10, succeeded(b"a"));
    let asked = until_renewal_asked(&mut h, 2_500);
    h.at(asked + 10);
    h.input(WorkerInput::RenewalFailed);
    let mut out = Vec::new();
    while h.ms() < 3_000 {
        out.extend(h.tick_at_timeout());
    }
    assert_eq!(h.ms(), 3_000, "stopped exactly at the expiry");
    let at = out.iter().position(|o| matches!(o, WorkerOutput::CertificateExpired { .. })).expect("expired: {out:?}");
    assert!(
        out[..at].iter().any(|o| matches!(o, WorkerOutput::CancelTask { task: t, .. } if *t == task(1, 1))),
        "the running task is stopped first: {out:?}"
    );
    assert_eq!(h.worker.phase(), Phase::Stopped);
    assert_eq!(h.worker.poll_timeout(), None);
    let after = finish(&mut h, task(1, 1), 11, succeeded(b"b"));
    assert!(sends(&after).is_empty(), "nothing is sent after expiry: {after:?}");
    assert!(sends(&h.message(ack(1, 1))).is_empty());
}

#[test]
fn a_worker_started_with_an_expired_certificate_stops_at_once() {
    let settings = rollout_worker::WorkerSettings { credential: Some(credential(0, 1_000)), ..settings(1) };
    let mut h = Harness::with(settings, 1);
    h.at(1_000);
    let out = h.input(WorkerInput::Start);
    assert!(matches!(out.as_slice(), [WorkerOutput::CertificateExpired { .. }]), "{out:?}");
    assert_eq!(h.worker.phase(), Phase::Stopped);
}

// ---------------------------------------------------------------- determinism

fn scripted_run(seed: u64) -> Vec<String> {
    let mut h = Harness::with(settings(2), seed);
    let mut log = Vec::new();
    let mut record = |h: &mut Harness, input: WorkerInput| {
        let out = h.input(input);
        log.push(format!("{:?} {:?} -> {out:?} next {:?}", h.mono, h.wall, h.worker.poll_timeout()));
    };
    record(&mut h, WorkerInput::Start);
    for _ in 0..3 {
        let at = h.worker.poll_timeout().expect("timer");
        h.at_mono(at);
        record(&mut h, WorkerInput::Tick);
    }
    let registered_at = h.ms() + 100;
    h.at(registered_at);
    record(
        &mut h,
        WorkerInput::Message(ToWorker::Registered { incarnation: Incarnation(1), terms: terms(), assigns_sent: 0 }),
    );
    record(&mut h, WorkerInput::Message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10))));
    record(&mut h, WorkerInput::Message(ack(1, 1)));
    h.at(registered_at + 700);
    record(&mut h, WorkerInput::TaskFinished { task: task(1, 0), token: FencingToken(10), outcome: succeeded(b"x") });
    for _ in 0..20 {
        let at = h.worker.poll_timeout().expect("timer");
        h.at_mono(at);
        record(&mut h, WorkerInput::Tick);
    }
    log
}

#[test]
fn the_same_inputs_give_the_same_outputs() {
    assert_eq!(scripted_run(3), scripted_run(3));
    assert_ne!(scripted_run(3), scripted_run(4), "the seed drives the jitter");
}

#[test]
fn a_broken_connection_ends_the_incarnation_like_a_self_fence() {
    let mut h = Harness::registered(2, 1);
    h.at(100);
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    h.at(200);
    let out = h.input(WorkerInput::StreamBroken(Channel::Work));
    assert!(out.iter().any(|o| matches!(o, WorkerOutput::Event(HistoryEvent::SelfFenced { .. }))), "{out:?}");
    assert_eq!(cancelled(&out), [(task(1, 0), FencingToken(10))], "assignments in flight may be lost: start over");
    assert!(h.worker.is_self_fenced());
    // An assignment of the old incarnation arriving late is not started.
    let out = h.message(ToWorker::Assign(assignment(1, 2, task(1, 1), 11)));
    assert!(!out.iter().any(|o| matches!(o, WorkerOutput::StartTask(_))), "{out:?}");
    let out = h.tick_at_timeout();
    assert_eq!(registers(&out).len(), 1, "registers again after its backoff");
    // A broken stream while unregistered changes nothing.
    assert!(h.input(WorkerInput::StreamBroken(Channel::Work)).is_empty());
    assert!(h.input(WorkerInput::StreamBroken(Channel::Control)).is_empty());
}

#[test]
fn a_broken_control_stream_alone_is_reopened_after_a_backoff_and_nothing_else_changes() {
    let mut h = Harness::registered(2, 1);
    h.at(100);
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    let incarnation = h.worker.incarnation().expect("registered");
    h.at(200);
    let out = h.input(WorkerInput::StreamBroken(Channel::Control));
    assert!(out.is_empty(), "the run goes on, nothing is cancelled: {out:?}");
    assert!(!h.worker.is_self_fenced());
    // A second report before the re-open changes nothing either (one re-open).
    assert!(h.input(WorkerInput::StreamBroken(Channel::Control)).is_empty());
    let mut reopened = Vec::new();
    for _ in 0..20 {
        let out = h.tick_at_timeout();
        reopened.extend(out.into_iter().filter(|o| matches!(o, WorkerOutput::OpenControl { .. })));
        if !reopened.is_empty() {
            break;
        }
    }
    assert_eq!(reopened, [WorkerOutput::OpenControl { incarnation }]);
    let settings = h.worker.settings();
    let waited = h.mono.saturating_since(mono_ms(200));
    assert!(
        waited >= settings.reconnect_backoff_initial / 2 && waited <= settings.reconnect_backoff_initial,
        "re-opened {waited:?} after the break, within the first backoff step (equal jitter)"
    );
    assert_eq!(h.worker.incarnation(), Some(incarnation), "same incarnation");
}

#[test]
fn a_result_above_the_coordinators_limit_is_submitted_as_a_failure_naming_the_limit() {
    // The worker's config allows 1 MiB; the coordinator's terms say 4 bytes, and win.
    let mut h = Harness::new(1);
    h.input(WorkerInput::Start);
    h.at(30);
    h.message(ToWorker::Registered {
        incarnation: Incarnation(1),
        terms: WorkerTerms { max_result_bytes: 4, ..terms() },
        assigns_sent: 0,
    });
    h.message(ToWorker::Assign(assignment(1, 1, task(1, 0), 10)));
    let out = finish(&mut h, task(1, 0), 10, succeeded(b"12345"));
    let sent = submits(&out);
    assert_eq!(sent.len(), 1);
    match &sent[0].outcome {
        rollout_core::protocol::Outcome::Failed { message } => {
            assert!(message.contains("5 bytes") && message.contains("limits.max_result_bytes (4)"), "{message}")
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    // At the limit it is a success.
    h.message(ToWorker::Assign(assignment(1, 2, task(1, 1), 11)));
    let out = finish(&mut h, task(1, 1), 11, succeeded(b"1234"));
    assert!(matches!(submits(&out)[0].outcome, rollout_core::protocol::Outcome::Succeeded { .. }));
}
