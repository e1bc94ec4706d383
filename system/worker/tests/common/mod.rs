//! A hand-driven worker: explicit clocks, one input at a time, outputs inspected.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::time::{Duration, SystemTime};

use rollout_core::config::HealthConfig;
use rollout_core::protocol::{Assignment, Heartbeat, Pull, Register, Submit, ToCoordinator, ToWorker, WorkerTerms};
use rollout_core::traits::Inventory;
use rollout_core::{Attempt, FencingToken, Incarnation, JobId, Mono, Now, TaskId, WorkerId};
use rollout_worker::{Worker, WorkerInput, WorkerOutput, WorkerSettings};

pub const MS: Duration = Duration::from_millis(1);
/// Where the worker's monotonic clock stands at test time 0.
pub const MONO_ORIGIN: Duration = Duration::from_secs(1_000);

pub fn wall_origin() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// The monotonic reading `ms` after test time 0.
pub fn mono_ms(ms: u64) -> Mono {
    Mono::from_duration(MONO_ORIGIN + Duration::from_millis(ms))
}

/// Seed-value health settings (beat 500 ms, self-fence 4 s), backoff 100 ms to 5 s,
/// register timeout 1 s, metrics every second.
pub fn settings(slots: u32) -> WorkerSettings {
    WorkerSettings {
        id: WorkerId::new("w1").expect("valid id"),
        slots,
        plugins: vec!["echo".to_owned()],
        inventory: Inventory { cpus: 8, memory_bytes: 16 << 30, gpus: Vec::new() },
        health: HealthConfig::default(),
        reconnect_backoff_initial: 100 * MS,
        reconnect_backoff_max: 5_000 * MS,
        register_timeout: 1_000 * MS,
        metrics_interval: 1_000 * MS,
        max_error_message_bytes: 4096,
        max_result_bytes: 1 << 20,
        credential: None,
        renew_retry_initial: 5_000 * MS,
        renew_retry_max: 60_000 * MS,
    }
}

/// The terms a coordinator with the settings of [`settings`] sends.
pub fn terms() -> WorkerTerms {
    settings(1).terms()
}

pub fn worker_id() -> WorkerId {
    WorkerId::new("w1").expect("valid id")
}

pub fn task(job: u64, index: u32) -> TaskId {
    TaskId::new(JobId(job), index)
}

pub fn assignment(incarnation: u64, seq: u64, task: TaskId, token: u64) -> Assignment {
    Assignment {
        incarnation: Incarnation(incarnation),
        seq,
        task,
        token: FencingToken(token),
        attempt: Attempt(1),
        plugin: "echo".to_owned(),
        method: "run".to_owned(),
        payload: b"input".to_vec(),
        deadline: Duration::from_secs(60),
        inputs: Vec::new(),
    }
}

/// A worker plus its two clocks. The wall clock normally moves with the monotonic one;
/// [`Harness::jump_wall`] skews it.
pub struct Harness {
    pub worker: Worker,
    pub mono: Mono,
    pub wall: SystemTime,
}

impl Harness {
    pub fn new(slots: u32) -> Self {
        Self::with(settings(slots), 42)
    }

    pub fn with(settings: WorkerSettings, seed: u64) -> Self {
        Harness { worker: Worker::new(settings, seed), mono: mono_ms(0), wall: wall_origin() }
    }

    /// A worker started at 0 ms and registered as `incarnation` at 30 ms (its Register
    /// went out at 0 ms, so its self-fence deadline is 4 000 ms).
    pub fn registered(slots: u32, incarnation: u64) -> Self {
        let mut h = Self::new(slots);
        h.input(WorkerInput::Start);
        h.at(30);
        h.message(ToWorker::Registered { incarnation: Incarnation(incarnation), terms: terms(), assigns_sent: 0 });
        h
    }

    pub fn now(&self) -> Now {
        Now::new(self.mono, self.wall)
    }

    /// Moves both clocks to `ms` after test time 0 (never backwards).
    pub fn at(&mut self, ms: u64) -> &mut Self {
        let target = mono_ms(ms);
        assert!(target >= self.mono, "the monotonic clock never goes back");
        self.wall += target - self.mono;
        self.mono = target;
        self
    }

    /// Moves both clocks to `mono` (never backwards).
    pub fn at_mono(&mut self, mono: Mono) -> &mut Self {
        assert!(mono >= self.mono, "the monotonic clock never goes back");
        self.wall += mono - self.mono;
        self.mono = mono;
        self
    }

    /// The test time in milliseconds.
    pub fn ms(&self) -> u64 {
        (self.mono.as_duration() - MONO_ORIGIN).as_millis() as u64
    }

    /// Steps the wall clock alone, forward (`delta_ms > 0`) or back.
    pub fn jump_wall(&mut self, delta_ms: i64) {
        let delta = Duration::from_millis(delta_ms.unsigned_abs());
        self.wall = if delta_ms >= 0 { self.wall + delta } else { self.wall - delta };
    }

    pub fn input(&mut self, input: WorkerInput) -> Vec<WorkerOutput> {
        let mut out = Vec::new();
        self.worker.handle(self.now(), input, &mut out);
        out
    }

    pub fn tick(&mut self) -> Vec<WorkerOutput> {
        self.input(WorkerInput::Tick)
    }

    pub fn message(&mut self, message: ToWorker) -> Vec<WorkerOutput> {
        self.input(WorkerInput::Message(message))
    }

    /// Advances to the worker's timer and delivers the tick, as a driver would.
    pub fn tick_at_timeout(&mut self) -> Vec<WorkerOutput> {
        let at = self.worker.poll_timeout().expect("a timer is set");
        self.at_mono(at.max(self.mono));
        self.tick()
    }

    /// Ticks at every timer up to and including `ms`, then moves the clocks to `ms`;
    /// returns every output.
    pub fn run_until(&mut self, ms: u64) -> Vec<WorkerOutput> {
        let mut all = Vec::new();
        while let Some(at) = self.worker.poll_timeout() {
            if at > mono_ms(ms) {
                break;
            }
            all.extend(self.tick_at_timeout());
        }
        self.at(ms);
        all
    }
}

pub fn sends(out: &[WorkerOutput]) -> Vec<&ToCoordinator> {
    out.iter()
        .filter_map(|o| match o {
            WorkerOutput::Send(m) => Some(m),
            _ => None,
        })
        .collect()
}

pub fn registers(out: &[WorkerOutput]) -> Vec<&Register> {
    sends(out)
        .into_iter()
        .filter_map(|m| match m {
            ToCoordinator::Register(r) => Some(r),
            _ => None,
        })
        .collect()
}

pub fn beats(out: &[WorkerOutput]) -> Vec<&Heartbeat> {
    sends(out)
        .into_iter()
        .filter_map(|m| match m {
            ToCoordinator::Heartbeat(b) => Some(b),
            _ => None,
        })
        .collect()
}

pub fn pulls(out: &[WorkerOutput]) -> Vec<&Pull> {
    sends(out)
        .into_iter()
        .filter_map(|m| match m {
            ToCoordinator::Pull(p) => Some(p),
            _ => None,
        })
        .collect()
}

pub fn submits(out: &[WorkerOutput]) -> Vec<&Submit> {
    sends(out)
        .into_iter()
        .filter_map(|m| match m {
            ToCoordinator::Submit(s) => Some(s),
            _ => None,
        })
        .collect()
}

pub fn started(out: &[WorkerOutput]) -> Vec<(TaskId, FencingToken)> {
    out.iter()
        .filter_map(|o| match o {
            WorkerOutput::StartTask(a) => Some((a.task, a.token)),
            _ => None,
        })
        .collect()
}

pub fn cancelled(out: &[WorkerOutput]) -> Vec<(TaskId, FencingToken)> {
    out.iter()
        .filter_map(|o| match o {
            WorkerOutput::CancelTask { task, token } => Some((*task, *token)),
            _ => None,
        })
        .collect()
}
