//! The coordinator's rules, one test each, driven by hand with explicit time.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{
    Assignment, Control, Heartbeat, Outcome, Pull, Register, Submit, SubmitVerdict, ToCoordinator, ToWorker,
};
use rollout_core::traits::{Gpu, Inventory, Storage};
use rollout_core::{
    Config, ContentId, Error, FencingToken, Incarnation, JobId, Mono, Now, PROTOCOL_VERSION, TaskId, WorkerId,
};
use rollout_storage::{CrashMode, MemDisk, RedbStorage};

use crate::records::CHUNK_BYTES;
use crate::*;

pub(crate) struct Harness {
    pub disk: MemDisk,
    pub coord: Option<Coordinator>,
    pub now: Now,
    pub settings: CoordinatorSettings,
    pub outputs: Vec<CoordinatorOutput>,
    next_request: u64,
    /// Each [`Harness::register_with`] is a fresh worker process, with its own boot.
    next_boot: u64,
}

pub(crate) fn w(name: &str) -> WorkerId {
    WorkerId::new(name).expect("valid test worker id")
}

pub(crate) fn spec(plugin: &str, gpus: u32) -> TaskSpec {
    TaskSpec {
        plugin: plugin.into(),
        method: "handle".into(),
        payload: b"in".to_vec(),
        gpus,
        deadline: None,
        inputs: Vec::new(),
    }
}

impl Harness {
    pub fn new() -> Self {
        Self::with_config(Config::default())
    }

    pub fn with_config(config: Config) -> Self {
        let disk = MemDisk::new();
        let now = Now::new(Mono::ZERO, SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let settings = CoordinatorSettings::from_config(&config);
        let storage = Arc::new(RedbStorage::open_in_memory(&disk).expect("open in-memory storage"));
        let coord = Coordinator::recover(storage, settings.clone(), now).expect("recover empty");
        Harness { disk, coord: Some(coord), now, settings, outputs: Vec::new(), next_request: 0, next_boot: 0 }
    }

    pub fn coord(&self) -> &Coordinator {
        self.coord.as_ref().expect("running")
    }

    /// Feeds one input; returns its outputs.
    pub fn input(&mut self, input: CoordinatorInput) -> Vec<CoordinatorOutput> {
        let mut out = Vec::new();
        let now = self.now;
        self.coord.as_mut().expect("running").handle(now, input, &mut out).expect("batch commits");
        self.outputs.extend(out.iter().cloned());
        out
    }

    /// Feeds several inputs as one batch; returns its outputs.
    pub fn input_batch(&mut self, inputs: Vec<CoordinatorInput>) -> Vec<CoordinatorOutput> {
        let mut out = Vec::new();
        let now = self.now;
        self.coord.as_mut().expect("running").handle_batch(now, inputs, &mut out).expect("batch commits");
        self.outputs.extend(out.iter().cloned());
        out
    }

    /// A fresh operator request id.
    pub fn next_request(&mut self) -> u64 {
        self.next_request += 1;
        self.next_request
    }

    /// The running machine's storage.
    pub fn storage(&self) -> Arc<dyn Storage> {
        Arc::clone(&self.coord().storage)
    }

    pub fn advance(&mut self, by: Duration) {
        self.now = self.now.advanced(by);
    }

    pub fn tick(&mut self) -> Vec<CoordinatorOutput> {
        let mut out = Vec::new();
        let now = self.now;
        self.coord.as_mut().expect("running").handle_timeout(now, &mut out).expect("batch commits");
        self.outputs.extend(out.iter().cloned());
        out
    }

    pub fn from(&mut self, worker: &str, message: ToCoordinator) -> Vec<CoordinatorOutput> {
        self.input(CoordinatorInput::FromWorker { worker: w(worker), message })
    }

    pub fn register_with(&mut self, worker: &str, plugins: &[&str], slots: u32, gpus: u32) -> Incarnation {
        let inventory = Inventory {
            cpus: 8,
            memory_bytes: 1 << 34,
            gpus: (0..gpus)
                .map(|i| Gpu { index: i, name: "H100".into(), uuid: format!("GPU-{i}"), memory_bytes: 80 << 30 })
                .collect(),
        };
        self.next_boot += 1;
        let out = self.from(
            worker,
            ToCoordinator::Register(Register {
                protocol_version: PROTOCOL_VERSION,
                plugins: plugins.iter().map(|p| p.to_string()).collect(),
                slots,
                inventory,
                boot: self.next_boot,
                adopted: None,
            }),
        );
        out.iter()
            .find_map(|o| match o {
                CoordinatorOutput::Send { message: ToWorker::Registered { incarnation, .. }, .. } => Some(*incarnation),
                _ => None,
            })
            .expect("registered")
    }

    pub fn register(&mut self, worker: &str) -> Incarnation {
        self.register_with(worker, &["echo"], 4, 0)
    }

    pub fn submit_job(&mut self, tasks: Vec<TaskSpec>) -> (JobId, Vec<CoordinatorOutput>) {
        self.next_request += 1;
        let request = self.next_request;
        let out = self.input(CoordinatorInput::SubmitJob {
            request,
            job: JobSubmission { name: "test".into(), tasks, idempotency_key: None },
        });
        let job = out
            .iter()
            .find_map(|o| match o {
                CoordinatorOutput::Reply { request: r, reply: OperatorReply::JobAccepted { job, .. } }
                    if *r == request =>
                {
                    Some(*job)
                }
                _ => None,
            })
            .expect("job accepted");
        (job, out)
    }

    pub fn pull(&mut self, worker: &str, incarnation: Incarnation, free_slots: u32, through: u64) -> Vec<Assignment> {
        let out = self.from(worker, ToCoordinator::Pull(Pull { incarnation, free_slots, assigns_through: through }));
        assigns(&out)
    }

    pub fn beat(
        &mut self,
        worker: &str,
        incarnation: Incarnation,
        running: Vec<(TaskId, FencingToken)>,
        through: u64,
    ) -> Vec<CoordinatorOutput> {
        let due_at = rollout_core::health::next_due_at(self.now.wall, self.settings.health.heartbeat_interval);
        self.from(
            worker,
            ToCoordinator::Heartbeat(Heartbeat {
                incarnation,
                beat_seq: 1,
                due_at,
                running,
                assigns_through: through,
                metrics: None,
            }),
        )
    }

    pub fn submit(&mut self, worker: &str, a: &Assignment, outcome: Outcome) -> SubmitVerdict {
        let out = self.from(
            worker,
            ToCoordinator::Submit(Submit { incarnation: a.incarnation, task: a.task, token: a.token, outcome }),
        );
        out.iter()
            .find_map(|o| match o {
                CoordinatorOutput::Send { message: ToWorker::SubmitAck { verdict, .. }, .. } => Some(*verdict),
                _ => None,
            })
            .expect("every submit is acknowledged")
    }

    /// Crashes the node (unsynced writes lost) and recovers a new coordinator.
    pub fn crash_and_restart(&mut self) {
        self.coord = None;
        self.disk.crash(CrashMode::LoseUnsynced);
        let storage = Arc::new(RedbStorage::open_in_memory(&self.disk).expect("reopen"));
        self.coord = Some(Coordinator::recover(storage, self.settings.clone(), self.now).expect("recover"));
    }

    pub fn state(&self, task: TaskId) -> TaskState {
        self.coord().task_state(task).expect("known task").0
    }

    /// Every task report of `job`, read from the machine's storage.
    pub fn reports(&self, job: JobId) -> Vec<crate::TaskReport> {
        self.coord().task_reports(job, 0, usize::MAX).expect("storage reads").expect("known job")
    }

    pub fn events(&self) -> Vec<HistoryEvent> {
        self.outputs
            .iter()
            .filter_map(|o| match o {
                CoordinatorOutput::Event(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }
}

pub(crate) fn assigns(out: &[CoordinatorOutput]) -> Vec<Assignment> {
    out.iter()
        .filter_map(|o| match o {
            CoordinatorOutput::Send { message: ToWorker::Assign(a), .. } => Some(a.clone()),
            _ => None,
        })
        .collect()
}

fn success(bytes: &[u8]) -> Outcome {
    Outcome::Succeeded { result: ContentId::of(bytes), size_bytes: bytes.len() as u64 }
}

fn failure(msg: &str) -> Outcome {
    Outcome::Failed { message: msg.into() }
}

// ---------------------------------------------------------------- register

#[test]
fn each_registration_gets_a_new_incarnation_that_survives_restart() {
    let mut h = Harness::new();
    let a = h.register("w1");
    let b = h.register("w2");
    let c = h.register("w1");
    assert!(a < b && b < c, "{a} {b} {c}");
    h.crash_and_restart();
    let d = h.register("w3");
    assert!(d > c, "incarnations never repeat across restarts: {d} after {c}");
}

#[test]
fn protocol_mismatch_is_refused_naming_both_versions() {
    let mut h = Harness::new();
    let out = h.from(
        "w1",
        ToCoordinator::Register(Register {
            protocol_version: PROTOCOL_VERSION + 1,
            plugins: vec!["echo".into()],
            slots: 1,
            inventory: Inventory::default(),
            boot: 1,
            adopted: None,
        }),
    );
    let reason = out
        .iter()
        .find_map(|o| match o {
            CoordinatorOutput::Send { message: ToWorker::RegisterRejected { reason }, .. } => Some(reason.clone()),
            _ => None,
        })
        .expect("rejected");
    assert!(reason.contains(&PROTOCOL_VERSION.to_string()) && reason.contains(&(PROTOCOL_VERSION + 1).to_string()));
    assert!(h.coord().workers().is_empty());
}

#[test]
fn registration_limits_name_the_field() {
    let mut h = Harness::new();
    for (slots, plugins, field) in [(0, vec!["echo"], "slots"), (2000, vec!["echo"], "slots"), (1, vec![], "plugins")] {
        let out = h.from(
            "w1",
            ToCoordinator::Register(Register {
                protocol_version: PROTOCOL_VERSION,
                plugins: plugins.into_iter().map(String::from).collect(),
                slots,
                inventory: Inventory::default(),
                boot: 1,
                adopted: None,
            }),
        );
        assert!(
            matches!(&out[..], [CoordinatorOutput::Send { message: ToWorker::RegisterRejected { reason }, .. }] if reason.starts_with(field)),
            "{out:?}"
        );
    }
}

// ---------------------------------------------------------------- health

#[test]
fn a_worker_200ms_behind_is_not_declared_failed() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    for _ in 0..100 {
        h.advance(Duration::from_millis(500));
        // Its wall clock reads 200 ms less than the coordinator's.
        let due_at = rollout_core::health::next_due_at(
            h.now.wall - Duration::from_millis(200),
            h.settings.health.heartbeat_interval,
        );
        h.from(
            "w1",
            ToCoordinator::Heartbeat(Heartbeat {
                incarnation: inc,
                beat_seq: 1,
                due_at,
                running: vec![],
                assigns_through: 0,
                metrics: None,
            }),
        );
        h.tick();
    }
    assert!(!h.events().iter().any(|e| matches!(e, HistoryEvent::DeclaredFailed { .. })));
}

#[test]
fn a_silent_worker_is_declared_failed_within_the_bound_and_its_leases_requeued() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    let (job, _) = h.submit_job(vec![spec("echo", 0)]);
    let a = h.pull("w1", inc, 4, 0).remove(0);
    let due_at = h.coord().workers()[0].due_at;
    // Silent from now on. The bound: due_at + max(failure_timeout, skew_budget) + one scan tick.
    let bound = due_at + Duration::from_secs(5) + h.settings.health.failure_scan_interval;
    let mut declared_at = None;
    while h.now.wall <= bound + Duration::from_secs(1) {
        h.advance(Duration::from_millis(50));
        if h.coord().poll_timeout() <= h.now.mono {
            let out = h.tick();
            if declared_at.is_none()
                && out.iter().any(|o| matches!(o, CoordinatorOutput::Event(HistoryEvent::DeclaredFailed { .. })))
            {
                declared_at = Some(h.now.wall);
            }
        }
    }
    let declared_at = declared_at.expect("declared failed");
    assert!(declared_at > due_at + Duration::from_secs(5), "not before the failure timeout");
    assert!(declared_at <= bound, "within the bound: {:?} late", declared_at.duration_since(bound));
    assert_eq!(h.state(a.task), TaskState::Queued);
    assert_eq!(h.reports(job)[0].errors.len(), 1, "the revoked attempt counts");
    // Its heartbeat now asks it to register again.
    let out = h.beat("w1", inc, vec![], 1);
    assert!(out.iter().any(|o| matches!(
        o,
        CoordinatorOutput::Send { message: ToWorker::HeartbeatAck { reregister: true, .. }, .. }
    )));
}

#[test]
fn a_closed_work_stream_ends_its_incarnation_at_once_and_its_tasks_go_elsewhere() {
    let mut h = Harness::new();
    let inc1 = h.register("w1");
    let inc2 = h.register("w2");
    h.submit_job(vec![spec("echo", 0)]);
    let a = h.pull("w1", inc1, 4, 0).remove(0);
    // A close of an older incarnation changes nothing (the worker registered again).
    let out = h.input(CoordinatorInput::WorkClosed { worker: w("w1"), incarnation: Incarnation(inc1.get() + 100) });
    assert!(out.is_empty(), "{out:?}");
    assert!(matches!(h.state(a.task), TaskState::Leased { .. }));
    // No time passes: the close alone ends w1's incarnation, and the task is leased to
    // w2 without a backoff, charged as an attempt (w1 may have run part of it).
    let out = h.input(CoordinatorInput::WorkClosed { worker: w("w1"), incarnation: inc1 });
    assert!(
        out.iter().any(|o| matches!(o, CoordinatorOutput::Event(HistoryEvent::DeclaredFailed { worker, incarnation })
        if *worker == w("w1") && *incarnation == inc1))
    );
    assert_eq!(h.state(a.task), TaskState::Queued);
    assert_eq!(h.reports(a.task.job)[0].errors.len(), 1, "the attempt counts");
    let again = h.pull("w2", inc2, 4, 0);
    assert_eq!(again.iter().map(|a| a.task).collect::<Vec<_>>(), vec![a.task]);
    assert!(again[0].token > a.token);
    // w1's late submit is stale; a second close changes nothing.
    assert_eq!(h.submit("w1", &a, success(b"late")), SubmitVerdict::Stale);
    let out = h.input(CoordinatorInput::WorkClosed { worker: w("w1"), incarnation: inc1 });
    assert!(out.is_empty(), "{out:?}");
}

// ---------------------------------------------------------------- jobs, leases, fencing

#[test]
fn job_is_durable_before_it_is_acknowledged() {
    let mut h = Harness::new();
    let (job, out) = h.submit_job(vec![spec("echo", 0), spec("echo", 0)]);
    assert!(out.iter().any(|o| matches!(o, CoordinatorOutput::Reply { .. })));
    // The acknowledgement was released, so a crash right now must keep the job.
    h.crash_and_restart();
    assert_eq!(h.coord().job(job).expect("job survives").queued, 2);
}

#[test]
fn assignments_match_plugins_gpus_and_free_slots() {
    let mut h = Harness::new();
    let cpu = h.register_with("cpu", &["echo"], 2, 0);
    let gpu = h.register_with("gpu", &["train", "echo"], 4, 2);
    h.submit_job(vec![spec("train", 2), spec("train", 1), spec("echo", 0), spec("echo", 0), spec("echo", 0)]);
    let got = h.pull("cpu", cpu, 2, 0);
    assert_eq!(got.len(), 2, "two free slots");
    assert!(got.iter().all(|a| a.plugin == "echo"));
    let got = h.pull("gpu", gpu, 4, 0);
    let plugins: Vec<&str> = got.iter().map(|a| a.plugin.as_str()).collect();
    // 2 GPUs: the 2-GPU task fits, then the 1-GPU one does not; the last echo task does.
    assert_eq!(plugins, ["train", "echo"], "{got:?}");
    assert_eq!(got[0].seq, 1);
    assert_eq!(got[1].seq, 2);
}

#[test]
fn a_task_goes_only_to_a_worker_that_advertised_its_plugin_even_after_a_failover() {
    let mut h = Harness::new();
    let both = h.register_with("both", &["echo-rs", "echo-py"], 4, 0);
    let rs_only = h.register_with("rs-only", &["echo-rs"], 4, 0);
    h.submit_job(vec![spec("echo-py", 0), spec("echo-py", 0)]);
    assert!(h.pull("rs-only", rs_only, 4, 0).is_empty(), "rs-only never offered echo-py");
    let held = h.pull("both", both, 4, 0);
    assert_eq!(held.len(), 2);
    // `both` goes silent and is declared failed; its echo-py tasks are queued again,
    // and the only live worker still cannot run them.
    for _ in 0..30 {
        h.advance(Duration::from_millis(250));
        h.beat("rs-only", rs_only, vec![], 0);
        h.tick();
    }
    assert!(
        h.events().iter().any(|e| matches!(e, HistoryEvent::DeclaredFailed { worker, .. } if *worker == w("both")))
    );
    h.advance(Duration::from_secs(1)); // past the retry backoff
    h.tick();
    assert!(held.iter().all(|a| h.state(a.task) == TaskState::Queued));
    assert!(h.pull("rs-only", rs_only, 4, 0).is_empty(), "still no echo-py on rs-only");
    // A worker offering echo-py picks them up.
    let py = h.register_with("py", &["echo-py"], 4, 0);
    let got = h.pull("py", py, 4, 0);
    assert_eq!(got.len(), 2);
    assert!(got.iter().all(|a| a.plugin == "echo-py"));
}

#[test]
fn credits_subtract_assignments_in_flight_and_pulls_are_idempotent() {
    let mut h = Harness::new();
    let inc = h.register_with("w1", &["echo"], 3, 0);
    h.submit_job((0..10).map(|_| spec("echo", 0)).collect());
    assert_eq!(h.pull("w1", inc, 3, 0).len(), 3);
    // The same pull again (a re-send) while those 3 are in flight asks for nothing new.
    assert_eq!(h.pull("w1", inc, 3, 0).len(), 0);
    // The worker received them and finished none: no free slots.
    assert_eq!(h.pull("w1", inc, 0, 3).len(), 0);
}

#[test]
fn a_submit_of_another_incarnation_is_stale_whatever_its_token() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    h.submit_job(vec![spec("echo", 0)]);
    let a = h.pull("w1", inc, 1, 0).remove(0);
    let other = Assignment { incarnation: Incarnation(inc.get() + 1), ..a.clone() };
    assert_eq!(h.submit("w1", &other, success(b"r")), SubmitVerdict::Stale, "the current token, another incarnation");
    assert!(matches!(h.state(a.task), TaskState::Leased { .. }), "nothing changed");
    assert_eq!(h.submit("w2", &a, success(b"r")), SubmitVerdict::Stale, "another (unregistered) worker");
    assert_eq!(h.submit("w1", &a, success(b"r")), SubmitVerdict::Accepted);
}

#[test]
fn commit_duplicate_and_stale_submits() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    let (_, _) = h.submit_job(vec![spec("echo", 0)]);
    let a = h.pull("w1", inc, 1, 0).remove(0);
    assert_eq!(h.submit("w1", &a, success(b"r")), SubmitVerdict::Accepted);
    assert!(matches!(h.state(a.task), TaskState::Committed { result, .. } if result == ContentId::of(b"r")));
    assert_eq!(h.submit("w1", &a, success(b"r")), SubmitVerdict::Duplicate, "identical re-submit");
    assert_eq!(h.submit("w1", &a, success(b"other")), SubmitVerdict::Stale, "a different result never replaces");
    assert!(matches!(h.state(a.task), TaskState::Committed { result, .. } if result == ContentId::of(b"r")));
}

#[test]
fn stale_submit_after_release_is_rejected_and_leaves_the_commit_untouched() {
    let mut h = Harness::new();
    let inc1 = h.register("w1");
    let inc2 = h.register("w2");
    h.submit_job(vec![spec("echo", 0)]);
    let old = h.pull("w1", inc1, 1, 0).remove(0);
    // w1 goes silent and is declared failed; the task is leased again, to w2.
    for _ in 0..30 {
        h.advance(Duration::from_millis(250));
        h.beat("w2", inc2, vec![], 0);
        h.tick();
    }
    assert_eq!(h.state(old.task), TaskState::Queued);
    h.advance(Duration::from_secs(1)); // past the retry backoff
    h.tick();
    let new = h.pull("w2", inc2, 1, 0).remove(0);
    assert!(new.token > old.token, "tokens strictly increase");
    assert_eq!(h.submit("w2", &new, success(b"new")), SubmitVerdict::Accepted);
    // The zombie finally reports, with the old token.
    assert_eq!(h.submit("w1", &old, success(b"old")), SubmitVerdict::Stale);
    assert!(matches!(h.state(old.task), TaskState::Committed { result, .. } if result == ContentId::of(b"new")));
}

#[test]
fn failures_retry_with_backoff_then_dead_letter_with_history() {
    let mut config = Config::default();
    config.tasks.max_attempts = 3;
    let mut h = Harness::with_config(config);
    let inc = h.register("w1");
    let (job, _) = h.submit_job(vec![spec("echo", 0)]);
    let mut through = 0;
    let mut pushed = Vec::new();
    for attempt in 1..=3u32 {
        // Leased on the pull, or pushed on the tick that ends the backoff (the pull's credit waited).
        let a = pushed.pop().or_else(|| h.pull("w1", inc, 1, through).pop()).expect("leased");
        through = a.seq;
        assert_eq!(a.attempt.get(), attempt);
        assert_eq!(h.submit("w1", &a, failure(&format!("boom {attempt}"))), SubmitVerdict::Accepted);
        if attempt < 3 {
            let backoff = Duration::from_millis(200) * 2u32.pow(attempt - 1);
            h.advance(backoff - Duration::from_millis(1));
            h.tick();
            assert!(h.pull("w1", inc, 1, through).is_empty(), "waits out the {backoff:?} backoff");
            h.advance(Duration::from_millis(1));
            pushed = assigns(&h.tick());
            assert_eq!(pushed.len(), 1, "the retry goes to the waiting credit");
        }
    }
    let report = &h.reports(job)[0];
    assert_eq!(report.state, TaskState::DeadLettered);
    assert_eq!(report.errors, ["boom 1", "boom 2", "boom 3"]);
    assert!(h.coord().job(job).expect("job").is_finished());
}

#[test]
fn lost_assignments_are_requeued_without_penalty() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    let (job, _) = h.submit_job(vec![spec("echo", 0), spec("echo", 0)]);
    let got = h.pull("w1", inc, 2, 0);
    // The worker received through seq 2 but runs only the second: the first was lost.
    h.beat("w1", inc, vec![(got[1].task, got[1].token)], 2);
    assert_eq!(h.state(got[0].task), TaskState::Queued);
    assert!(matches!(h.state(got[1].task), TaskState::Leased { .. }));
    assert!(h.reports(job)[0].errors.is_empty(), "not held against the task");
}

#[test]
fn a_worker_running_a_task_it_does_not_hold_is_told_to_stop() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    h.submit_job(vec![spec("echo", 0)]);
    let a = h.pull("w1", inc, 1, 0).remove(0);
    let out = h.beat("w1", inc, vec![(a.task, a.token), (TaskId::new(JobId(99), 0), FencingToken(77))], 1);
    let cancels: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            CoordinatorOutput::Send { message: ToWorker::Control(Control::CancelTask { task, .. }), .. } => Some(*task),
            _ => None,
        })
        .collect();
    assert_eq!(cancels, [TaskId::new(JobId(99), 0)]);
}

// ---------------------------------------------------------------- control

#[test]
fn drained_worker_gets_no_new_work() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    h.submit_job(vec![spec("echo", 0), spec("echo", 0)]);
    let a = h.pull("w1", inc, 1, 0).remove(0);
    let out = h.input(CoordinatorInput::Drain { request: 1, worker: w("w1") });
    assert!(
        out.iter().any(|o| matches!(o, CoordinatorOutput::Send { message: ToWorker::Control(Control::Drain), .. }))
    );
    assert!(h.pull("w1", inc, 4, 1).is_empty());
    assert_eq!(h.submit("w1", &a, success(b"x")), SubmitVerdict::Accepted, "running work still finishes");
    let out = h.input(CoordinatorInput::Drain { request: 2, worker: w("nobody") });
    assert!(matches!(&out[..], [CoordinatorOutput::Reply { reply: OperatorReply::Rejected(_), .. }]));
}

#[test]
fn cancel_job_stops_running_copies_and_dequeues_the_rest() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    let (job, _) = h.submit_job(vec![spec("echo", 0), spec("echo", 0), spec("echo", 0)]);
    let a = h.pull("w1", inc, 1, 0).remove(0);
    let out = h.input(CoordinatorInput::CancelJob { request: 1, job });
    assert!(out.iter().any(|o| matches!(o,
        CoordinatorOutput::Send { message: ToWorker::Control(Control::CancelTask { task, token }), .. }
        if *task == a.task && *token == a.token)));
    assert!(
        out.iter().any(|o| matches!(o, CoordinatorOutput::Reply { reply: OperatorReply::Cancelled { tasks: 3 }, .. }))
    );
    assert_eq!(h.coord().job(job).expect("job").cancelled, 3);
    assert_eq!(h.submit("w1", &a, success(b"late")), SubmitVerdict::Stale);
    assert!(h.pull("w1", inc, 4, 1).is_empty(), "cancelled tasks are never leased");
}

#[test]
fn job_limits_are_enforced_naming_the_task() {
    let mut config = Config::default();
    config.limits.max_payload_bytes = 4;
    let mut h = Harness::with_config(config);
    let mut big = spec("echo", 0);
    big.payload = vec![0; 5];
    let out = h.input(CoordinatorInput::SubmitJob {
        request: 1,
        job: JobSubmission { name: "j".into(), tasks: vec![spec("echo", 0), big], idempotency_key: None },
    });
    match &out[..] {
        [CoordinatorOutput::Reply { reply: OperatorReply::Rejected(Error::Fatal(e)), .. }] => {
            assert!(e.to_string().contains("tasks[1].payload"), "{e}")
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert!(h.coord().jobs().is_empty());
}

#[test]
fn idempotency_key_returns_the_existing_job() {
    let mut h = Harness::new();
    let submission =
        JobSubmission { name: "j".into(), tasks: vec![spec("echo", 0)], idempotency_key: Some("batch-7".into()) };
    let first = h.input(CoordinatorInput::SubmitJob { request: 1, job: submission.clone() });
    h.crash_and_restart();
    let second = h.input(CoordinatorInput::SubmitJob { request: 2, job: submission });
    let job = |out: &[CoordinatorOutput]| {
        out.iter().find_map(|o| match o {
            CoordinatorOutput::Reply { reply: OperatorReply::JobAccepted { job, existing, .. }, .. } => {
                Some((*job, *existing))
            }
            _ => None,
        })
    };
    let (a, existing_a) = job(&first).expect("accepted");
    let (b, existing_b) = job(&second).expect("accepted");
    assert_eq!(a, b);
    assert!(!existing_a && existing_b);
    assert_eq!(h.coord().jobs().len(), 1);
}

// ---------------------------------------------------------------- recovery and audit

#[test]
fn re_registering_after_a_coordinator_restart_costs_no_attempt() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    let (job, _) = h.submit_job(vec![spec("echo", 0), spec("echo", 0)]);
    h.pull("w1", inc, 2, 0);
    h.crash_and_restart();
    // The worker lost its stream to the old coordinator and registers again.
    let inc2 = h.register("w1");
    let reports = h.reports(job);
    for r in &reports {
        assert_eq!(r.state, TaskState::Queued, "{r:?}");
        assert!(r.errors.is_empty(), "a restart charges no attempt: {r:?}");
    }
    // Ready at once (no retry backoff), under the new incarnation.
    assert_eq!(h.pull("w1", inc2, 2, 0).len(), 2);
    // Without a restart in between, registering again ends the leases as failures.
    let inc3 = h.register("w1");
    let reports = h.reports(job);
    assert!(reports.iter().all(|r| r.errors.len() == 1 && r.errors[0].contains("registered again")), "{reports:?}");
    let _ = inc3;
}

/// Registers `worker` as process `boot` that last adopted `adopted`; the answer's
/// incarnation and `assigns_sent`, and the outputs.
fn register_as(
    h: &mut Harness,
    worker: &str,
    boot: u64,
    adopted: Option<Incarnation>,
) -> (Incarnation, u64, Vec<CoordinatorOutput>) {
    let reg = Register {
        protocol_version: PROTOCOL_VERSION,
        plugins: vec!["echo".into()],
        slots: 4,
        inventory: Inventory::default(),
        boot,
        adopted,
    };
    let out = h.from(worker, ToCoordinator::Register(reg));
    let (incarnation, assigns_sent) = out
        .iter()
        .find_map(|o| match o {
            CoordinatorOutput::Send { message: ToWorker::Registered { incarnation, assigns_sent, .. }, .. } => {
                Some((*incarnation, *assigns_sent))
            }
            _ => None,
        })
        .expect("registered");
    (incarnation, assigns_sent, out)
}

#[test]
fn a_register_sent_before_the_current_incarnation_was_adopted_ends_nothing() {
    let mut h = Harness::new();
    let (inc, sent, _) = register_as(&mut h, "w1", 7, None);
    assert_eq!(sent, 0, "a new incarnation has sent nothing");
    let (job, _) = h.submit_job(vec![spec("echo", 0), spec("echo", 0)]);
    let got = h.pull("w1", inc, 2, 0);
    assert_eq!(got.len(), 2);

    // The same process's Register arrives again (a retry whose answer was slow, or a
    // duplicate): the same answer, naming the assignments already sent; nothing ends,
    // but the deadline moves as a registration's would.
    let due_at = h.coord().workers()[0].due_at;
    h.advance(Duration::from_millis(800));
    let (again, sent, out) = register_as(&mut h, "w1", 7, None);
    assert_eq!((again, sent), (inc, 2));
    assert_eq!(h.coord().workers()[0].due_at, due_at + Duration::from_millis(800));
    assert!(!out.iter().any(|o| matches!(o, CoordinatorOutput::Event(_))), "no event, no commit: {out:?}");
    for r in h.reports(job) {
        assert!(matches!(r.state, TaskState::Leased { .. }) && r.errors.is_empty(), "{r:?}");
    }
    assert_eq!(h.submit("w1", &got[0], success(b"done")), SubmitVerdict::Accepted);

    // The process gave up that incarnation (it names it as adopted): a new one, and
    // the old one's leases end.
    let (inc2, sent, _) = register_as(&mut h, "w1", 7, Some(inc));
    assert!(inc2 > inc && sent == 0);
    assert_eq!(h.state(got[1].task), TaskState::Queued);
    assert!(h.reports(job)[1].errors[0].contains("registered again"), "{:?}", h.reports(job));

    // A restarted process (another boot) knows nothing of the old incarnation. (The
    // re-queued task waits out its retry backoff; a fresh one is ready.)
    h.submit_job(vec![spec("echo", 0)]);
    let got = h.pull("w1", inc2, 1, 0);
    assert_eq!(got.len(), 1);
    let (inc3, _, _) = register_as(&mut h, "w1", 8, None);
    assert!(inc3 > inc2);
    assert_eq!(h.state(got[0].task), TaskState::Queued);

    // A worker declared failed registers anew, whatever its Register says.
    let mut failed = false;
    for _ in 0..400 {
        h.advance(Duration::from_millis(50));
        failed |= h.tick().iter().any(|o| matches!(o, CoordinatorOutput::Event(HistoryEvent::DeclaredFailed { .. })));
    }
    assert!(failed, "w1 went silent and was declared failed");
    let (inc4, _, _) = register_as(&mut h, "w1", 8, None);
    assert!(inc4 > inc3);
}

#[test]
fn restart_keeps_every_task_and_gives_workers_a_fresh_deadline() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    let (job, _) = h.submit_job((0..5).map(|_| spec("echo", 0)).collect());
    let got = h.pull("w1", inc, 2, 0);
    assert_eq!(h.submit("w1", &got[0], success(b"done")), SubmitVerdict::Accepted);
    // The coordinator is down for a minute: w1's due_at is long past on restart.
    h.advance(Duration::from_secs(60));
    h.crash_and_restart();
    let s = h.coord().job(job).expect("job");
    assert_eq!((s.queued, s.leased, s.committed), (3, 1, 1));
    h.tick();
    h.advance(Duration::from_secs(4));
    h.tick();
    assert!(!h.events().iter().any(|e| matches!(e, HistoryEvent::DeclaredFailed { .. })), "fresh deadline");
    // Same incarnation keeps working across the restart.
    assert_eq!(h.submit("w1", &got[1], success(b"done too")), SubmitVerdict::Accepted);
    h.advance(Duration::from_secs(2));
    let out = h.tick();
    assert!(
        out.iter().any(|o| matches!(o, CoordinatorOutput::Event(HistoryEvent::DeclaredFailed { .. }))),
        "but not forever"
    );
}

#[test]
fn result_bytes_are_stored_with_their_commit_and_only_then() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    h.submit_job(vec![spec("echo", 0), spec("echo", 0)]);
    let mut assigned = h.pull("w1", inc, 2, 0);
    let (a, b) = (assigned.remove(0), assigned.remove(0));
    let batch = |h: &mut Harness, a: &Assignment, bytes: &[u8]| {
        let submit = Submit { incarnation: a.incarnation, task: a.task, token: a.token, outcome: success(bytes) };
        let inputs = [CoordinatorInput::Submit { worker: w("w1"), submit, inline_result: Some(bytes.to_vec()) }];
        let mut out = Vec::new();
        let now = h.now;
        h.coord.as_mut().expect("running").handle_batch(now, inputs, &mut out).expect("batch commits");
        out
    };
    // Over the inline bound: stored content-addressed, in the commit's transaction.
    let first = vec![b'f'; INLINE_RESULT_BYTES_MAX + 1];
    batch(&mut h, &a, &first);
    // A submit with a stale token: its bytes must not be stored.
    let stale = Assignment { token: FencingToken(b.token.get() + 100), ..b.clone() };
    let never = vec![b'n'; INLINE_RESULT_BYTES_MAX + 1];
    batch(&mut h, &stale, &never);
    h.coord = None;
    let storage = RedbStorage::open_in_memory(&h.disk).expect("reopen");
    assert_eq!(stored_result(&storage, &ContentId::of(&first)).expect("read"), Some(first.clone()));
    assert_eq!(stored_result(&storage, &ContentId::of(&never)).expect("read"), None);
}

#[test]
fn a_small_result_stays_in_its_task_record_and_writes_no_content_addressed_key() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    h.submit_job(vec![spec("echo", 0), spec("echo", 0)]);
    let got = h.pull("w1", inc, 2, 0);
    let small = vec![b's'; INLINE_RESULT_BYTES_MAX];
    for a in &got {
        let submit = Submit { incarnation: a.incarnation, task: a.task, token: a.token, outcome: success(&small) };
        let inputs = vec![CoordinatorInput::Submit { worker: w("w1"), submit, inline_result: Some(small.clone()) }];
        h.input_batch(inputs);
    }
    let expected = TaskState::CommittedInline { result: ContentId::of(&small), bytes: small.clone() };
    assert_eq!(h.state(got[0].task), expected);
    assert_eq!(h.state(got[1].task).committed_result(), Some(ContentId::of(&small)));
    let storage = h.storage();
    assert!(storage.scan(b"c/r/").expect("scan").is_empty(), "no chunks");
    assert!(storage.scan(b"c/rc/").expect("scan").is_empty(), "no reference counts");
    // A duplicate of a committed inline result is recognised as such.
    assert_eq!(h.submit("w1", &got[0], success(&small)), SubmitVerdict::Duplicate);
    // After a restart the record still holds the bytes.
    h.crash_and_restart();
    assert_eq!(h.state(got[0].task), expected);
}

#[test]
fn a_tasks_inputs_survive_a_restart_and_travel_with_its_lease() {
    let mut h = Harness::new();
    let weights = ContentId::of(b"weights");
    let mut with_inputs = spec("echo", 0);
    with_inputs.inputs = vec![weights, ContentId::of(b"vocab")];
    h.submit_job(vec![spec("echo", 0), with_inputs.clone()]);
    h.crash_and_restart();
    let inc = h.register("w1");
    let mut got = h.pull("w1", inc, 4, 0);
    got.sort_by_key(|a| a.task.index);
    assert_eq!(got.len(), 2);
    assert!(got[0].inputs.is_empty(), "a task without inputs leases without them");
    assert_eq!(got[1].inputs, with_inputs.inputs);
    // More than the limit is refused naming the field.
    let mut too_many = spec("echo", 0);
    too_many.inputs = vec![weights; 65];
    let request = h.next_request();
    let out = h.input(CoordinatorInput::SubmitJob {
        request,
        job: JobSubmission { name: "t".into(), tasks: vec![too_many], idempotency_key: None },
    });
    assert!(
        out.iter().any(|o| matches!(o, CoordinatorOutput::Reply { reply: OperatorReply::Rejected(e), .. }
            if e.to_string().contains("tasks[0].inputs"))),
        "{out:?}"
    );
}

#[test]
fn entries_after_any_seq_are_exactly_the_rest_of_the_chain() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    // Batches of several events (a job of 5 leased at once) and of one.
    h.submit_job((0..5).map(|_| spec("echo", 0)).collect());
    let leased = h.pull("w1", inc, 5, 0);
    for a in &leased {
        h.submit("w1", a, success(b"r"));
    }
    h.coord = None;
    let storage = RedbStorage::open_in_memory(&h.disk).expect("reopen");
    let all: Vec<u64> = audit::entries(&storage).expect("read").iter().map(|e| e.seq).collect();
    assert!(all.len() >= 8, "{all:?}");
    for after in 0..=all.len() as u64 + 2 {
        let got: Vec<u64> = audit::entries_after(&storage, after, usize::MAX)
            .expect("reads")
            .expect("nothing pruned")
            .iter()
            .map(|e| e.seq)
            .collect();
        let want: Vec<u64> = all.iter().copied().filter(|s| *s > after).collect();
        assert_eq!(got, want, "after {after}");
        let first: Vec<u64> =
            audit::entries_after(&storage, after, 2).expect("reads").expect("kept").iter().map(|e| e.seq).collect();
        assert_eq!(first, want.iter().copied().take(2).collect::<Vec<_>>(), "the first two after {after}");
    }
}

#[test]
fn audit_chain_verifies_and_detects_tampering() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    h.submit_job(vec![spec("echo", 0)]);
    let a = h.pull("w1", inc, 1, 0).remove(0);
    h.submit("w1", &a, success(b"r"));
    h.coord = None;
    let storage = RedbStorage::open_in_memory(&h.disk).expect("reopen");
    let n = audit::verify(&storage).expect("verifies");
    assert_eq!(n, 4, "registered, job_accepted, leased, committed");
    let events: Vec<HistoryEvent> =
        audit::entries(&storage).expect("read").iter().map(|e| e.event().expect("decodes")).collect();
    assert!(matches!(events[3], HistoryEvent::Committed { .. }));

    // Alter entry 2's event text and put it back (each batch stored one block; the
    // job's was the second).
    let key = audit::audit_key(2);
    let mut block: Vec<audit::AuditEntry> =
        postcard::from_bytes(&storage.get(&key).expect("get").expect("present")).expect("decode");
    assert_eq!(block.len(), 1, "one event in the job's batch");
    block[0].event_json = block[0].event_json.replace("\"tasks\":1", "\"tasks\":2");
    let mut txn = storage.begin_write().expect("txn");
    txn.put(&key, &postcard::to_allocvec(&block).expect("encode")).expect("put");
    txn.commit().expect("commit");
    let err = audit::verify(&storage).expect_err("tampered");
    assert!(err.to_string().contains("entry 2"), "{err}");
}

#[test]
fn metrics_from_beats_are_merged() {
    use hdrhistogram::Histogram;
    use hdrhistogram::serialization::{Serializer, V2Serializer};
    let mut h = Harness::new();
    let inc = h.register("w1");
    let mut hist = Histogram::<u64>::new(3).expect("hist");
    hist.record(1500).expect("record");
    let mut bytes = Vec::new();
    V2Serializer::new().serialize(&hist, &mut bytes).expect("serialize");
    let deltas = rollout_core::protocol::MetricDeltas {
        counters: vec![("tasks_succeeded".into(), "echo".into(), 3)],
        histograms: vec![("task_latency_us".into(), "echo".into(), bytes)],
    };
    let beat = |h: &mut Harness, deltas: &rollout_core::protocol::MetricDeltas| {
        h.from(
            "w1",
            ToCoordinator::Heartbeat(Heartbeat {
                incarnation: inc,
                beat_seq: 1,
                due_at: h.now.wall,
                running: vec![],
                assigns_through: 0,
                metrics: Some(deltas.clone()),
            }),
        )
    };
    for _ in 0..2 {
        h.advance(h.settings.health.heartbeat_interval);
        beat(&mut h, &deltas);
    }
    assert_eq!(h.coord().metrics().counter("tasks_succeeded", "echo"), 6);
    assert_eq!(h.coord().latencies()[0].count, 2);
    // Shipped again at once: dropped, and said so.
    let out = beat(&mut h, &deltas);
    assert_eq!(h.coord().metrics().counter("tasks_succeeded", "echo"), 6);
    assert!(
        out.iter().any(|o| matches!(o, CoordinatorOutput::Notice(Notice::MetricsRefused { dropped: 2, .. }))),
        "{out:?}"
    );
    // A plugin the worker does not offer is not a series it may create.
    h.advance(h.settings.health.heartbeat_interval);
    let foreign = rollout_core::protocol::MetricDeltas {
        counters: vec![("tasks_succeeded".into(), "someone-else".into(), 3)],
        histograms: vec![],
    };
    beat(&mut h, &foreign);
    assert_eq!(h.coord().metrics().counter("tasks_succeeded", "someone-else"), 0);
    // Sidecar restarts are a counter like the others, and the status page lists them.
    assert!(h.coord().status(&StatusQuery::default()).plugin_restarts.is_empty());
    h.advance(h.settings.health.heartbeat_interval);
    let restarts = rollout_core::protocol::MetricDeltas {
        counters: vec![("plugin_restarts".into(), "echo".into(), 2)],
        histograms: vec![],
    };
    beat(&mut h, &restarts);
    assert_eq!(h.coord().status(&StatusQuery::default()).plugin_restarts, [("echo".to_owned(), 2)]);
}

#[test]
fn a_failed_commit_poisons_the_machine() {
    let mut h = Harness::new();
    h.register("w1");
    h.disk.cut_power_after_syncs(0);
    let mut out = Vec::new();
    let now = h.now;
    let coord = h.coord.as_mut().expect("running");
    let err = coord
        .handle(
            now,
            CoordinatorInput::SubmitJob {
                request: 1,
                job: JobSubmission { name: "j".into(), tasks: vec![spec("echo", 0)], idempotency_key: None },
            },
            &mut out,
        )
        .expect_err("the disk lost power");
    assert!(out.is_empty(), "no output leaves before its commit: {err}");
    assert!(coord.handle_timeout(now, &mut out).is_err(), "poisoned");
}

#[test]
fn payloads_of_every_size_around_a_chunk_come_back_whole_at_lease() {
    let mut h = Harness::new();
    let inc = h.register_with("w1", &["echo"], 8, 0);
    let sizes = [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES];
    let payload = |n: usize| (0..n).map(|i| (i % 251) as u8).collect::<Vec<u8>>();
    let specs = sizes.iter().map(|&n| TaskSpec { payload: payload(n), ..spec("echo", 0) }).collect();
    h.submit_job(specs);
    let mut got = h.pull("w1", inc, sizes.len() as u32, 0);
    got.sort_by_key(|a| a.task.index);
    let lens: Vec<usize> = got.iter().map(|a| a.payload.len()).collect();
    assert_eq!(lens, sizes);
    for (a, n) in got.iter().zip(sizes) {
        assert_eq!(a.payload, payload(n), "task {} of {n} bytes", a.task);
    }
}
