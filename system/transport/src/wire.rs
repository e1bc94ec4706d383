//! Conversions between the machines' protocol messages (`rollout_core::protocol`) and
//! the gRPC messages of `proto/transport.proto`. Everything that comes from the wire
//! is checked: a malformed message is a [`WireError`] naming the field, which the
//! services answer with `INVALID_ARGUMENT`; nothing here panics on input.

use std::time::Duration;

use prost::Message;
use rollout_coordinator::{JobSubmission, TaskSpec};
pub use rollout_core::protocol::NAME_BYTES_MAX;
use rollout_core::protocol::{
    Assignment, Control, GPUS_PER_WORKER_MAX, Heartbeat, MetricDeltas, Pull, Register, SubmitVerdict, ToWorker,
    WorkerTerms,
};
use rollout_core::time::{from_unix_millis, unix_millis};
use rollout_core::{Attempt, ContentId, FencingToken, Incarnation, JobId};
use rollout_proto::transport as pb;
use rollout_proto::{WireError, required_task_id};

/// Most entries of any repeated field in one message (pulls, submits, running tasks,
/// metric series, plugins, tasks). Together with the message size limit this bounds the
/// work one message can cause; the machines apply tighter limits of their own
/// (`limits.max_plugins_per_worker`, `limits.max_metric_series_per_beat`, ...).
pub const REPEATED_MAX: usize = 65_536;

fn bounded<T>(field: &'static str, items: &[T]) -> Result<(), WireError> {
    if items.len() > REPEATED_MAX {
        return Err(WireError { field, reason: format!("{} entries exceed the limit of {REPEATED_MAX}", items.len()) });
    }
    Ok(())
}

fn name(field: &'static str, text: &str) -> Result<(), WireError> {
    if text.len() > NAME_BYTES_MAX {
        return Err(WireError { field, reason: format!("{} bytes exceed the limit of {NAME_BYTES_MAX}", text.len()) });
    }
    Ok(())
}

// ------------------------------------------------------------------ worker -> coordinator

/// A Register from the wire (the worker id is checked by the caller against the certificate).
pub fn register_from_wire(req: &pb::RegisterRequest) -> Result<Register, WireError> {
    bounded("register.plugins", &req.plugins)?;
    for plugin in &req.plugins {
        name("register.plugins", plugin)?;
    }
    let inventory = req.inventory.clone().unwrap_or_default();
    if inventory.gpus.len() > GPUS_PER_WORKER_MAX {
        return Err(WireError {
            field: "register.inventory.gpus",
            reason: format!("{} GPUs exceed the limit of {GPUS_PER_WORKER_MAX}", inventory.gpus.len()),
        });
    }
    for gpu in &inventory.gpus {
        name("register.inventory.gpus.name", &gpu.name)?;
        name("register.inventory.gpus.uuid", &gpu.uuid)?;
    }
    Ok(Register {
        protocol_version: req.protocol_version,
        plugins: req.plugins.clone(),
        slots: req.slots,
        inventory: inventory.into(),
        boot: req.boot,
        adopted: req.adopted.map(Incarnation),
    })
}

/// A Register for the wire.
pub fn register_to_wire(worker: &str, reg: Register) -> pb::RegisterRequest {
    pb::RegisterRequest {
        protocol_version: reg.protocol_version,
        worker_id: worker.to_owned(),
        plugins: reg.plugins,
        slots: reg.slots,
        inventory: Some(reg.inventory.into()),
        boot: reg.boot,
        adopted: reg.adopted.map(Incarnation::get),
    }
}

/// A Heartbeat from the wire.
pub fn heartbeat_from_wire(req: pb::HeartbeatRequest) -> Result<Heartbeat, WireError> {
    bounded("heartbeat.running", &req.running)?;
    let mut running = Vec::with_capacity(req.running.len());
    for r in req.running {
        running.push((required_task_id("heartbeat.running.task", r.task)?, FencingToken(r.token)));
    }
    let metrics = match req.metrics {
        None => None,
        Some(m) => {
            bounded("heartbeat.metrics.counters", &m.counters)?;
            bounded("heartbeat.metrics.histograms", &m.histograms)?;
            Some(MetricDeltas {
                counters: m.counters.into_iter().map(|c| (c.name, c.plugin, c.delta)).collect(),
                histograms: m.histograms.into_iter().map(|h| (h.name, h.plugin, h.hdr_v2)).collect(),
            })
        }
    };
    Ok(Heartbeat {
        incarnation: Incarnation(req.incarnation),
        beat_seq: req.beat_seq,
        due_at: from_unix_millis(req.due_at_unix_ms),
        running,
        assigns_through: req.assigns_through,
        metrics,
    })
}

/// A Heartbeat for the wire.
pub fn heartbeat_to_wire(worker: &str, beat: Heartbeat) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        worker_id: worker.to_owned(),
        incarnation: beat.incarnation.get(),
        beat_seq: beat.beat_seq,
        due_at_unix_ms: unix_millis(beat.due_at),
        running: beat
            .running
            .into_iter()
            .map(|(t, token)| pb::RunningTask { task: Some(t.into()), token: token.get() })
            .collect(),
        metrics: beat.metrics.map(|m| pb::MetricDeltas {
            counters: m
                .counters
                .into_iter()
                .map(|(name, plugin, delta)| pb::CounterDelta { name, plugin, delta })
                .collect(),
            histograms: m
                .histograms
                .into_iter()
                .map(|(name, plugin, hdr_v2)| pb::HistogramDelta { name, plugin, hdr_v2 })
                .collect(),
        }),
        assigns_through: beat.assigns_through,
    }
}

/// A Pull from the wire, for the incarnation named by the stream's hello.
pub fn pull_from_wire(incarnation: Incarnation, pull: &pb::Pull) -> Pull {
    Pull { incarnation, free_slots: pull.free_slots, assigns_through: pull.assigns_through }
}

/// What a submit's outcome carries on the wire, before the result is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireOutcome {
    /// The result bytes.
    Result(Vec<u8>),
    /// The failure message (with its detail appended, if any).
    Failure(String),
}

/// A Submit from the wire: task, token and raw outcome.
pub fn submit_from_wire(s: pb::Submit) -> Result<(rollout_core::TaskId, FencingToken, WireOutcome), WireError> {
    let task = required_task_id("submit.task", s.task)?;
    let outcome = match s.outcome {
        Some(pb::submit::Outcome::Result(bytes)) => WireOutcome::Result(bytes),
        Some(pb::submit::Outcome::Failure(f)) if f.detail.is_empty() => WireOutcome::Failure(f.message),
        Some(pb::submit::Outcome::Failure(f)) => WireOutcome::Failure(format!("{}\n{}", f.message, f.detail)),
        None => return Err(WireError { field: "submit.outcome", reason: "missing".into() }),
    };
    Ok((task, FencingToken(s.token), outcome))
}

// ------------------------------------------------------------------ coordinator -> worker

/// An assignment for the wire.
pub fn assign_to_wire(a: Assignment) -> pb::Assign {
    pb::Assign {
        seq: a.seq,
        task: Some(a.task.into()),
        token: a.token.get(),
        attempt: a.attempt.get(),
        plugin: a.plugin,
        method: a.method,
        payload: a.payload,
        deadline_ms: u64::try_from(a.deadline.as_millis()).unwrap_or(u64::MAX),
        inputs: a.inputs.iter().map(|id| id.as_bytes().to_vec()).collect(),
    }
}

/// Most blobs one task may name as inputs.
pub const INPUTS_PER_TASK_MAX: usize = 64;

/// Content ids from the wire, each 32 bytes, at most [`INPUTS_PER_TASK_MAX`].
pub fn content_ids(field: &'static str, ids: Vec<Vec<u8>>) -> Result<Vec<ContentId>, WireError> {
    if ids.len() > INPUTS_PER_TASK_MAX {
        return Err(WireError {
            field,
            reason: format!("{} inputs exceed the {INPUTS_PER_TASK_MAX} a task may name", ids.len()),
        });
    }
    ids.into_iter()
        .map(|b| {
            let array: [u8; 32] = b
                .as_slice()
                .try_into()
                .map_err(|_| WireError { field, reason: format!("a content id of {} bytes, not 32", b.len()) })?;
            Ok(ContentId::from_digest(array))
        })
        .collect()
}

/// A coordinator's terms for the wire (`RegisterResponse.settings`).
pub fn terms_to_wire(terms: WorkerTerms) -> pb::WorkerSettings {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    pb::WorkerSettings {
        heartbeat_interval_ms: ms(terms.heartbeat_interval),
        worker_self_fence_timeout_ms: ms(terms.worker_self_fence_timeout),
        clock_skew_budget_ms: ms(terms.clock_skew_budget),
        max_result_bytes: u32::try_from(terms.max_result_bytes).unwrap_or(u32::MAX),
        // Not terms of the session: each side's transport enforces its own.
        max_message_bytes: 0,
        max_credits_per_pull: 0,
    }
}

/// A coordinator's terms from the wire. Every term is required: a worker that kept its
/// own schedule could outlive its leases, so an answer without them is refused.
pub fn terms_from_wire(settings: Option<pb::WorkerSettings>) -> Result<WorkerTerms, WireError> {
    let Some(s) = settings else {
        return Err(WireError { field: "register_response.settings", reason: "missing".into() });
    };
    let positive = |field: &'static str, value: u64| {
        if value == 0 { Err(WireError { field, reason: "must be above 0".into() }) } else { Ok(value) }
    };
    let heartbeat_ms = positive("register_response.settings.heartbeat_interval_ms", s.heartbeat_interval_ms)?;
    let fence_ms = positive("register_response.settings.worker_self_fence_timeout_ms", s.worker_self_fence_timeout_ms)?;
    if fence_ms <= heartbeat_ms {
        return Err(WireError {
            field: "register_response.settings.worker_self_fence_timeout_ms",
            reason: format!("{fence_ms} ms is not above heartbeat_interval_ms ({heartbeat_ms} ms)"),
        });
    }
    let max_result_bytes = positive("register_response.settings.max_result_bytes", u64::from(s.max_result_bytes))?;
    Ok(WorkerTerms {
        heartbeat_interval: Duration::from_millis(heartbeat_ms),
        worker_self_fence_timeout: Duration::from_millis(fence_ms),
        clock_skew_budget: Duration::from_millis(s.clock_skew_budget_ms),
        max_result_bytes,
    })
}

/// An assignment from the wire, for the incarnation the stream was opened for.
pub fn assign_from_wire(incarnation: Incarnation, a: pb::Assign) -> Result<Assignment, WireError> {
    name("assign.plugin", &a.plugin)?;
    name("assign.method", &a.method)?;
    Ok(Assignment {
        incarnation,
        seq: a.seq,
        task: required_task_id("assign.task", a.task)?,
        token: FencingToken(a.token),
        attempt: Attempt(a.attempt),
        plugin: a.plugin,
        method: a.method,
        payload: a.payload,
        deadline: Duration::from_millis(a.deadline_ms),
        inputs: content_ids("assign.inputs", a.inputs)?,
    })
}

/// A submit verdict for the wire.
pub fn verdict_to_wire(v: SubmitVerdict) -> pb::SubmitVerdict {
    match v {
        SubmitVerdict::Accepted => pb::SubmitVerdict::Accepted,
        SubmitVerdict::Duplicate => pb::SubmitVerdict::Duplicate,
        SubmitVerdict::Stale => pb::SubmitVerdict::Stale,
        SubmitVerdict::Refused => pb::SubmitVerdict::Refused,
    }
}

/// A submit acknowledgement from the wire.
pub fn submit_ack_from_wire(ack: pb::SubmitAck) -> Result<ToWorker, WireError> {
    let verdict = match pb::SubmitVerdict::try_from(ack.verdict) {
        Ok(pb::SubmitVerdict::Accepted) => SubmitVerdict::Accepted,
        Ok(pb::SubmitVerdict::Duplicate) => SubmitVerdict::Duplicate,
        Ok(pb::SubmitVerdict::Stale) => SubmitVerdict::Stale,
        Ok(pb::SubmitVerdict::Refused) => SubmitVerdict::Refused,
        _ => return Err(WireError { field: "submit_ack.verdict", reason: format!("unknown value {}", ack.verdict) }),
    };
    Ok(ToWorker::SubmitAck {
        task: required_task_id("submit_ack.task", ack.task)?,
        token: FencingToken(ack.token),
        verdict,
    })
}

/// A control command for the wire.
pub fn control_to_wire(c: Control) -> pb::ControlMessage {
    use pb::control_message::Command;
    let command = match c {
        Control::Drain => Command::Drain(pb::Drain {}),
        Control::CancelTask { task, token } => {
            Command::CancelTask(pb::CancelTask { task: Some(task.into()), token: token.get() })
        }
        Control::CancelJob { job } => Command::CancelJob(pb::CancelJob { job: job.get() }),
        Control::Snapshot => Command::Snapshot(pb::Snapshot {}),
    };
    pb::ControlMessage { command: Some(command) }
}

/// A control command from the wire.
pub fn control_from_wire(m: pb::ControlMessage) -> Result<Control, WireError> {
    use pb::control_message::Command;
    match m.command {
        Some(Command::Drain(_)) => Ok(Control::Drain),
        Some(Command::CancelTask(c)) => Ok(Control::CancelTask {
            task: required_task_id("control.cancel_task.task", c.task)?,
            token: FencingToken(c.token),
        }),
        Some(Command::CancelJob(c)) => Ok(Control::CancelJob { job: JobId(c.job) }),
        Some(Command::Snapshot(_)) => Ok(Control::Snapshot),
        None => Err(WireError { field: "control.command", reason: "missing".into() }),
    }
}

// ------------------------------------------------------------------ frames

/// The bytes a message of encoded length `len` adds to its frame as one entry of a
/// repeated field (tag, length prefix, body).
fn entry_len(len: usize) -> usize {
    1 + prost::encoding::encoded_len_varint(len as u64) + len
}

/// One batch's assignments and acks for one worker as Work frames, each within
/// `max_message_bytes` encoded (acks first, then assignments in order).
pub fn coordinator_frames(
    acks: Vec<pb::SubmitAck>,
    assigns: Vec<pb::Assign>,
    max_message_bytes: usize,
) -> Vec<pb::CoordinatorFrame> {
    enum Item {
        Ack(pb::SubmitAck),
        Assign(pb::Assign),
    }
    let items = acks.into_iter().map(Item::Ack).chain(assigns.into_iter().map(Item::Assign));
    let size = |item: &Item| match item {
        Item::Ack(a) => entry_len(a.encoded_len()),
        Item::Assign(a) => entry_len(a.encoded_len()),
    };
    rollout_core::framing::cut_by_size(items, max_message_bytes, size)
        .into_iter()
        .map(|group| {
            let mut frame = pb::CoordinatorFrame::default();
            for item in group {
                match item {
                    Item::Ack(a) => frame.acks.push(a),
                    Item::Assign(a) => frame.assigns.push(a),
                }
            }
            frame
        })
        .collect()
}

/// A worker's submits and pulls of one burst as Work frames, each within
/// `max_message_bytes` encoded; the pulls go with the last frame, after every submit.
pub fn worker_frames(frame: pb::WorkerFrame, max_message_bytes: usize) -> Vec<pb::WorkerFrame> {
    let pb::WorkerFrame { hello, pulls, submits } = frame;
    let pulls_len: usize = pulls.iter().map(|p| entry_len(p.encoded_len())).sum();
    let budget = max_message_bytes.saturating_sub(pulls_len);
    let mut frames: Vec<pb::WorkerFrame> =
        rollout_core::framing::cut_by_size(submits, budget, |s| entry_len(s.encoded_len()))
            .into_iter()
            .map(|submits| pb::WorkerFrame { hello: None, pulls: Vec::new(), submits })
            .collect();
    if frames.is_empty() {
        frames.push(pb::WorkerFrame::default());
    }
    if let Some(last) = frames.last_mut() {
        last.pulls = pulls;
    }
    if let Some(first) = frames.first_mut() {
        first.hello = hello;
    }
    frames
}

// ------------------------------------------------------------------ operator

/// Tasks from the wire (`field` names the repeated field for errors).
pub fn tasks_from_wire(field: &'static str, tasks: Vec<pb::TaskSpec>) -> Result<Vec<TaskSpec>, WireError> {
    if tasks.len() > REPEATED_MAX {
        return Err(WireError {
            field,
            reason: format!(
                "{} tasks exceed the {REPEATED_MAX} one message may carry; submit larger jobs in parts with \
                 OpenJob, AppendTasks and SealJob (`rollout submit` does), up to limits.max_tasks_per_job",
                tasks.len()
            ),
        });
    }
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        name("tasks.plugin", &t.plugin)?;
        name("tasks.method", &t.method)?;
        out.push(TaskSpec {
            plugin: t.plugin,
            method: t.method,
            payload: t.payload,
            gpus: t.gpus,
            deadline: (t.deadline_ms > 0).then(|| Duration::from_millis(t.deadline_ms)),
            inputs: content_ids("tasks.inputs", t.inputs)?,
        });
    }
    Ok(out)
}

/// A job submission from the wire.
pub fn job_from_wire(req: pb::SubmitJobRequest) -> Result<JobSubmission, WireError> {
    name("submit_job.name", &req.name)?;
    name("submit_job.idempotency_key", &req.idempotency_key)?;
    let tasks = tasks_from_wire("submit_job.tasks", req.tasks)?;
    Ok(JobSubmission {
        name: req.name,
        tasks,
        idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
    })
}

/// An optional text field: empty means absent.
pub fn optional_text(field: &'static str, text: String) -> Result<Option<String>, WireError> {
    name(field, &text)?;
    Ok((!text.is_empty()).then_some(text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollout_core::{JobId, TaskId};

    mod wire_size_bounds {
        use super::*;
        use proptest::prelude::*;
        use rollout_core::protocol::{
            Assignment, Outcome, Submit, SubmitVerdict, ToCoordinator, ToWorker, WIRE_SIZE_SLACK,
        };
        use rollout_core::{Attempt, ContentId, FencingToken, Incarnation};

        /// The simulator measures Work-stream messages with `work_entry_bytes`; it must
        /// never undercount what the transport puts on the wire, nor overcount by much.
        fn within_bound(estimate: Option<usize>, exact: usize) -> Result<(), TestCaseError> {
            let estimate = estimate.expect("a Work-stream message has a size");
            prop_assert!(exact <= estimate, "estimate {estimate} below the exact {exact}");
            prop_assert!(estimate - exact <= WIRE_SIZE_SLACK, "estimate {estimate} too far above {exact}");
            Ok(())
        }

        proptest! {
            #[test]
            fn work_entry_bytes_bound_the_encoded_size(
                job in any::<u64>(), index in any::<u32>(), token in any::<u64>(), seq in any::<u64>(),
                attempt in any::<u32>(), plugin in "[a-z]{0,40}", method in "[a-z]{0,40}",
                payload_len in prop_oneof![0usize..300, 100_000usize..140_000], deadline_ms in any::<u64>(),
                failure in ".{0,300}", verdict in 0u8..4,
            ) {
                let task = TaskId::new(JobId(job), index);
                let assign = Assignment {
                    incarnation: Incarnation(1), seq, task, token: FencingToken(token), attempt: Attempt(attempt),
                    plugin, method, payload: vec![7; payload_len], deadline: Duration::from_millis(deadline_ms), inputs: Vec::new(),
                };
                let exact = entry_len(assign_to_wire(assign.clone()).encoded_len());
                within_bound(ToWorker::Assign(assign).work_entry_bytes(), exact)?;

                let verdict = [SubmitVerdict::Accepted, SubmitVerdict::Duplicate, SubmitVerdict::Stale, SubmitVerdict::Refused]
                    [verdict as usize];
                let ack = pb::SubmitAck { task: Some(task.into()), token, verdict: verdict_to_wire(verdict).into() };
                let message = ToWorker::SubmitAck { task, token: FencingToken(token), verdict };
                within_bound(message.work_entry_bytes(), entry_len(ack.encoded_len()))?;

                // A success carries its result's bytes; a failure its message, as the
                // worker driver writes them.
                let submit = |outcome| ToCoordinator::Submit(Submit { incarnation: Incarnation(1), task, token: FencingToken(token), outcome });
                let wire = |outcome| pb::Submit { task: Some(task.into()), token, outcome: Some(outcome) };
                let ok = Outcome::Succeeded { result: ContentId::of(b"r"), size_bytes: payload_len as u64 };
                let exact = entry_len(wire(pb::submit::Outcome::Result(vec![1; payload_len])).encoded_len());
                within_bound(submit(ok).work_entry_bytes(), exact)?;
                let failed = pb::submit::Outcome::Failure(pb::TaskFailure { message: failure.clone(), detail: String::new() });
                let exact = entry_len(wire(failed).encoded_len());
                within_bound(submit(Outcome::Failed { message: failure }).work_entry_bytes(), exact)?;

                let pull = pb::Pull { free_slots: attempt, assigns_through: seq };
                let message = ToCoordinator::Pull(rollout_core::protocol::Pull { incarnation: Incarnation(1), free_slots: attempt, assigns_through: seq });
                within_bound(message.work_entry_bytes(), entry_len(pull.encoded_len()))?;
            }
        }
    }

    #[test]
    fn a_submit_without_task_or_outcome_names_the_field() {
        let err = submit_from_wire(pb::Submit::default()).expect_err("no task");
        assert_eq!(err.field, "submit.task");
        let s = pb::Submit { task: Some(TaskId::new(JobId(1), 0).into()), ..Default::default() };
        assert_eq!(submit_from_wire(s).expect_err("no outcome").field, "submit.outcome");
    }

    #[test]
    fn worker_terms_round_trip_and_unusable_ones_name_the_field() {
        let terms = WorkerTerms {
            heartbeat_interval: Duration::from_millis(100),
            worker_self_fence_timeout: Duration::from_millis(800),
            clock_skew_budget: Duration::from_millis(50),
            max_result_bytes: 1 << 20,
        };
        assert_eq!(terms_from_wire(Some(terms_to_wire(terms))), Ok(terms));
        assert_eq!(terms_from_wire(None).expect_err("missing").field, "register_response.settings");
        let wire = terms_to_wire(terms);
        let zero_beat = pb::WorkerSettings { heartbeat_interval_ms: 0, ..wire };
        assert_eq!(
            terms_from_wire(Some(zero_beat)).expect_err("zero").field,
            "register_response.settings.heartbeat_interval_ms"
        );
        let fence_too_short = pb::WorkerSettings { worker_self_fence_timeout_ms: 100, ..wire };
        let err = terms_from_wire(Some(fence_too_short)).expect_err("fence not above the beat");
        assert_eq!(err.field, "register_response.settings.worker_self_fence_timeout_ms");
        assert!(err.reason.contains("heartbeat_interval_ms (100 ms)"), "{}", err.reason);
        let no_results = pb::WorkerSettings { max_result_bytes: 0, ..wire };
        assert_eq!(
            terms_from_wire(Some(no_results)).expect_err("zero").field,
            "register_response.settings.max_result_bytes"
        );
    }

    #[test]
    fn assignments_round_trip() {
        let a = Assignment {
            incarnation: Incarnation(3),
            seq: 9,
            task: TaskId::new(JobId(2), 7),
            token: FencingToken(11),
            attempt: Attempt(1),
            plugin: "echo".into(),
            method: "run".into(),
            payload: b"hi".to_vec(),
            deadline: Duration::from_millis(1500),
            inputs: Vec::new(),
        };
        assert_eq!(assign_from_wire(Incarnation(3), assign_to_wire(a.clone())), Ok(a));
    }

    #[test]
    fn control_round_trips_and_empty_is_refused() {
        for c in [
            Control::Drain,
            Control::Snapshot,
            Control::CancelJob { job: JobId(4) },
            Control::CancelTask { task: TaskId::new(JobId(4), 1), token: FencingToken(8) },
        ] {
            assert_eq!(control_from_wire(control_to_wire(c.clone())), Ok(c));
        }
        assert_eq!(control_from_wire(pb::ControlMessage::default()).expect_err("empty").field, "control.command");
    }

    fn assign(payload_bytes: usize) -> pb::Assign {
        assign_to_wire(Assignment {
            incarnation: Incarnation(1),
            seq: 1,
            task: TaskId::new(JobId(1), 0),
            token: FencingToken(1),
            attempt: Attempt(1),
            plugin: "p".repeat(NAME_BYTES_MAX),
            method: "m".repeat(NAME_BYTES_MAX),
            payload: vec![7; payload_bytes],
            deadline: Duration::from_secs(1),
            inputs: Vec::new(),
        })
    }

    #[test]
    fn frames_of_large_assignments_fit_the_message_limit_whatever_the_batch() {
        let limit = 4 << 20;
        let acks = vec![pb::SubmitAck { task: Some(TaskId::new(JobId(1), 2).into()), token: 9, verdict: 1 }; 3];
        // The largest payload the config allows next to the message limit.
        let payload = limit - rollout_core::config::FRAME_OVERHEAD_BYTES as usize;
        let assigns = vec![assign(1_000_000); 6].into_iter().chain([assign(payload)]).collect();
        let frames = coordinator_frames(acks, assigns, limit);
        assert!(
            frames.iter().all(|f| f.encoded_len() <= limit),
            "{:?}",
            frames.iter().map(|f| f.encoded_len()).collect::<Vec<_>>()
        );
        assert_eq!(frames.iter().map(|f| f.assigns.len()).sum::<usize>(), 7);
        assert_eq!(frames.iter().map(|f| f.acks.len()).sum::<usize>(), 3);
        assert_eq!(frames.len(), 3, "4 + 2 of a megabyte each, then the maximal one alone");
    }

    #[test]
    fn worker_frames_fit_the_limit_and_pulls_come_last() {
        let limit = 4 << 20;
        let submit = |n: usize| pb::Submit {
            task: Some(TaskId::new(JobId(1), n as u32).into()),
            token: 3,
            outcome: Some(pb::submit::Outcome::Result(vec![1; 1 << 20])),
        };
        let frame = pb::WorkerFrame {
            hello: None,
            pulls: vec![pb::Pull { free_slots: 6, assigns_through: 9 }],
            submits: (0..6).map(submit).collect(),
        };
        let frames = worker_frames(frame, limit);
        assert_eq!(frames.len(), 2);
        assert!(frames.iter().all(|f| f.encoded_len() <= limit));
        assert!(frames[0].pulls.is_empty() && frames[1].pulls.len() == 1);
        assert_eq!(frames.iter().map(|f| f.submits.len()).sum::<usize>(), 6);
    }

    #[test]
    fn a_job_too_large_for_one_message_names_the_way_out() {
        let tasks = vec![pb::TaskSpec::default(); REPEATED_MAX + 1];
        let err = tasks_from_wire("submit_job.tasks", tasks).expect_err("too many");
        assert!(err.reason.contains("AppendTasks") && err.reason.contains("limits.max_tasks_per_job"), "{err}");
    }

    #[test]
    fn oversized_repeated_fields_are_refused() {
        let req =
            pb::HeartbeatRequest { running: vec![pb::RunningTask::default(); REPEATED_MAX + 1], ..Default::default() };
        assert_eq!(heartbeat_from_wire(req).expect_err("too many").field, "heartbeat.running");
    }
}
