//! The discrete-event loop: one coordinator and N workers, driven by virtual time.
//!
//! Everything comes from one seed, split per purpose (network, plugin, worker seeds,
//! clocks) so that adding draws for one purpose does not reshuffle the others. Events
//! sit in a `BTreeMap` keyed by (true time in ns, insertion seq): a total order, so a
//! run is a pure function of (scenario, seed, binary).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rollout_coordinator::{
    Coordinator, CoordinatorInput, CoordinatorOutput, CoordinatorSettings, JobSubmission, OperatorReply, TaskSpec,
    TaskState,
};
use rollout_core::history::{HistoryEvent, HistoryRecord};
use rollout_core::protocol::{ToCoordinator, ToWorker};
use rollout_core::rng::SplitMix64;
use rollout_core::time::unix_millis;
use rollout_core::traits::Inventory;
use rollout_core::{Config, ContentId, FencingToken, JobId, Mono, Now, TaskId, WorkerId};
use rollout_storage::{CrashMode, MemDisk, RedbStorage};
use rollout_worker::{TaskOutcome, Worker, WorkerInput, WorkerOutput, WorkerSettings};
use sha2::{Digest, Sha256};

use crate::checker::{Checker, FinalState, Violation};
use crate::scenario::{Direction, FaultKind, NodeRef, Scenario};

const NS_PER_MS: u64 = 1_000_000;
/// True time 0 reads as this wall time on a clock without offset (2023-11-14).
const BASE_WALL_NS: i128 = 1_700_000_000 * 1_000_000_000;
/// How long the operator waits for a job's acknowledgement before re-submitting it
/// (with the same idempotency key, so a re-submit never duplicates a job).
const SUBMIT_RETRY_NS: u64 = 3_000 * NS_PER_MS;
/// How many history records a failure report shows.
const TAIL: usize = 30;

/// A node's clocks as functions of true time. Both advance at `1 + drift` per true
/// second; `wall` adds an offset that clock jumps change. `mono` never goes back.
#[derive(Debug, Clone, Copy)]
struct Clock {
    drift_ppm: i64,
    wall_offset_ns: i128,
}

impl Clock {
    fn mono_ns(&self, t: u64) -> u64 {
        (t as i128 * (1_000_000 + self.drift_ppm as i128) / 1_000_000) as u64
    }

    fn now(&self, t: u64) -> Now {
        let mono = self.mono_ns(t);
        let wall_ns = (BASE_WALL_NS + self.wall_offset_ns + mono as i128).max(0);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_nanos(wall_ns.min(u64::MAX as i128) as u64);
        Now::new(Mono::from_duration(Duration::from_nanos(mono)), wall)
    }

    /// The earliest true time at which this node's monotonic clock reads `mono`.
    fn true_time_of(&self, mono: Mono) -> u64 {
        let m = mono.as_duration().as_nanos().min(u64::MAX as u128 / 2) as i128;
        let rate = 1_000_000 + self.drift_ppm as i128;
        let mut t = ((m * 1_000_000 + rate - 1) / rate).max(0) as u64;
        // Integer rounding may leave us a nanosecond short.
        while (self.mono_ns(t) as i128) < m {
            t += 1;
        }
        t
    }
}

#[derive(Debug)]
enum Ev {
    CoordRun,
    CoordRelease { epoch: u64 },
    CoordTimer { generation: u64 },
    WorkerTimer { w: usize, generation: u64 },
    WorkerStart { w: usize },
    ToCoord { w: usize, conn: u64, msg: ToCoordinator },
    ToWorker { w: usize, conn: u64, msg: ToWorker },
    PluginFinish { w: usize, epoch: u64, task: TaskId, token: FencingToken, run: u64, outcome: TaskOutcome },
    Fault(usize),
    Submit { job: u32 },
    SubmitRetry { job: u32 },
}

struct CoordNode {
    machine: Option<Coordinator>,
    disk: MemDisk,
    clock: Clock,
    inbox: Vec<CoordinatorInput>,
    busy_until: u64,
    run_scheduled: bool,
    /// Bumped on crash: stale releases and timers are ignored.
    epoch: u64,
    timer_generation: u64,
    /// Outputs of committed batches waiting for their commit to finish.
    pending: VecDeque<Vec<CoordinatorOutput>>,
}

struct Run {
    id: u64,
}

struct WorkerNode {
    id: WorkerId,
    machine: Option<Worker>,
    clock: Clock,
    epoch: u64,
    timer_generation: u64,
    /// Plugin runs on this host; an entry lives until its `TaskFinished` is delivered.
    runs: BTreeMap<(TaskId, FencingToken), Run>,
}

/// One coordinator–worker connection: FIFO per direction, like a TCP stream.
#[derive(Default)]
struct Link {
    /// Bumped on reset: messages sent on an older connection are lost.
    conn: u64,
    blocked_up: bool,
    blocked_down: bool,
    last_up: u64,
    last_down: u64,
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// The scenario's name.
    pub scenario: String,
    /// Events processed.
    pub events: u64,
    /// Simulated time reached, in ns.
    pub sim_ns: u64,
    /// SHA-256 over every event and history record, hex.
    pub trace_hash: String,
    /// Jobs acknowledged to the operator.
    pub jobs_acked: usize,
    /// Tasks committed (from the coordinator at the end).
    pub committed: u64,
    /// Tasks dead-lettered.
    pub dead_lettered: u64,
    /// Overlaps seen while `no_overlap` was not strict.
    pub overlaps: u64,
    /// Messages sent / dropped by the network.
    pub messages: (u64, u64),
    /// Coordinator batches and the inputs they carried (group commit).
    pub batches: (u64, u64),
    /// The first violation, if any.
    pub violation: Option<Violation>,
    /// The whole history, with each record's true time in ns.
    pub history: Vec<(u64, HistoryRecord)>,
}

impl RunReport {
    /// The last history records before the end (or the violation), one per line.
    pub fn tail(&self) -> String {
        let mut s = String::new();
        for (t, r) in self.history.iter().rev().take(TAIL).rev() {
            let _ = writeln!(s, "  t={:.6}s {} {:?}", *t as f64 / 1e9, r.node, r.event);
        }
        s
    }
}

/// `fmt::Write` into a hasher, so events are hashed without building strings.
struct HashWriter<'a>(&'a mut Sha256);

impl std::fmt::Write for HashWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.update(s.as_bytes());
        Ok(())
    }
}

struct Sim {
    scenario: Scenario,
    now: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    next_seq: u64,
    rng_net: SplitMix64,
    rng_plugin: SplitMix64,
    rng_worker_seeds: SplitMix64,
    settings: CoordinatorSettings,
    worker_config: Config,
    coord: CoordNode,
    workers: Vec<WorkerNode>,
    worker_index: BTreeMap<WorkerId, usize>,
    links: Vec<Link>,
    next_run: u64,
    next_request: u64,
    requests: BTreeMap<u64, u32>,
    acked: BTreeMap<u32, (JobId, u32)>,
    history: Vec<(u64, HistoryRecord)>,
    checker: Checker,
    hasher: Sha256,
    events: u64,
    messages: (u64, u64),
    batches: (u64, u64),
    violation: Option<Violation>,
}

/// Runs `scenario` with `seed` to its end or its first violation.
pub fn run(scenario: &Scenario, seed: u64) -> RunReport {
    let mut sim = Sim::new(scenario.clone(), seed);
    let end = scenario.duration_s.saturating_mul(1_000 * NS_PER_MS);
    while sim.violation.is_none() {
        let Some(entry) = sim.queue.first_entry() else { break };
        if entry.key().0 > end {
            break;
        }
        let ((t, _), ev) = entry.remove_entry();
        sim.now = t;
        sim.events += 1;
        let _ = writeln!(HashWriter(&mut sim.hasher), "{t} {ev:?}");
        sim.dispatch(ev);
    }
    if sim.violation.is_none() {
        sim.now = sim.now.max(end);
        sim.final_checks();
    }
    sim.report(seed)
}

impl Sim {
    fn new(scenario: Scenario, seed: u64) -> Sim {
        let mut master = SplitMix64::new(seed);
        let rng_net = SplitMix64::new(master.next_u64());
        let rng_plugin = SplitMix64::new(master.next_u64());
        let rng_worker_seeds = SplitMix64::new(master.next_u64());
        let mut rng_clock = SplitMix64::new(master.next_u64());
        let mut rng_start = SplitMix64::new(master.next_u64());
        let draw_clock = |rng: &mut SplitMix64| {
            let off = scenario.clocks.max_offset_ms * NS_PER_MS;
            let drift = scenario.clocks.max_drift_ppm;
            Clock {
                drift_ppm: rng.below(2 * drift + 1) as i64 - drift as i64,
                wall_offset_ns: rng.below(2 * off + 1) as i128 - off as i128,
            }
        };
        let config = Config::default();
        let settings = CoordinatorSettings::from_config(&config);
        let disk = MemDisk::new();
        let coord_clock = draw_clock(&mut rng_clock);
        let mut workers = Vec::new();
        let mut worker_index = BTreeMap::new();
        for i in 0..scenario.cluster.workers as usize {
            // Names w1..wN are always valid worker ids.
            let id = WorkerId::new(format!("w{}", i + 1)).expect("wN is a valid worker id");
            worker_index.insert(id.clone(), i);
            workers.push(WorkerNode {
                id,
                machine: None,
                clock: draw_clock(&mut rng_clock),
                epoch: 0,
                timer_generation: 0,
                runs: BTreeMap::new(),
            });
        }
        let links = (0..workers.len()).map(|_| Link::default()).collect();
        let strict_overlap = scenario.invariants.no_overlap;
        let mut sim = Sim {
            now: 0,
            queue: BTreeMap::new(),
            next_seq: 0,
            rng_net,
            rng_plugin,
            rng_worker_seeds,
            settings,
            worker_config: config,
            coord: CoordNode {
                machine: None,
                disk,
                clock: coord_clock,
                inbox: Vec::new(),
                busy_until: 0,
                run_scheduled: false,
                epoch: 0,
                timer_generation: 0,
                pending: VecDeque::new(),
            },
            workers,
            worker_index,
            links,
            next_run: 0,
            next_request: 0,
            requests: BTreeMap::new(),
            acked: BTreeMap::new(),
            history: Vec::new(),
            checker: Checker::new(strict_overlap),
            hasher: Sha256::new(),
            events: 0,
            messages: (0, 0),
            batches: (0, 0),
            violation: None,
            scenario,
        };
        sim.coord_start();
        for w in 0..sim.workers.len() {
            // Staggered starts, so workers do not register in lockstep.
            let at = rng_start.below(100 * NS_PER_MS);
            sim.push(at, Ev::WorkerStart { w });
        }
        for (i, fault) in sim.scenario.faults.iter().enumerate().map(|(i, f)| (i, f.at_ms)).collect::<Vec<_>>() {
            sim.push(fault * NS_PER_MS, Ev::Fault(i));
        }
        let wl = sim.scenario.workload.clone();
        for job in 0..wl.jobs {
            sim.push((wl.submit_start_ms + u64::from(job) * wl.submit_every_ms) * NS_PER_MS, Ev::Submit { job });
        }
        sim
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.queue.insert((at, self.next_seq), ev);
        self.next_seq += 1;
    }

    fn fail(&mut self, invariant: &'static str, message: String) {
        if self.violation.is_none() {
            self.violation = Some(Violation { invariant, seq: Some(self.history.len() as u64), message });
        }
    }

    fn record(&mut self, node: &str, wall: SystemTime, event: HistoryEvent) {
        let record = HistoryRecord {
            seq: self.history.len() as u64,
            node: node.to_owned(),
            wall_unix_ms: unix_millis(wall),
            event,
        };
        let _ = writeln!(HashWriter(&mut self.hasher), "{record:?}");
        if self.violation.is_none()
            && let Err(v) = self.checker.observe(&record)
        {
            self.violation = Some(v);
        }
        self.history.push((self.now, record));
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::CoordRun => self.coord_run(),
            Ev::CoordRelease { epoch } => self.coord_release(epoch),
            Ev::CoordTimer { generation } => {
                if generation == self.coord.timer_generation && !self.coord.inbox.contains(&CoordinatorInput::Tick) {
                    self.coord_enqueue(CoordinatorInput::Tick);
                }
            }
            Ev::WorkerTimer { w, generation } => {
                if generation == self.workers[w].timer_generation {
                    self.worker_input(w, WorkerInput::Tick);
                }
            }
            Ev::WorkerStart { w } => self.worker_start(w),
            Ev::ToCoord { w, conn, msg } => {
                let link = &self.links[w];
                if link.conn != conn || link.blocked_up {
                    self.messages.1 += 1;
                    return;
                }
                let worker = self.workers[w].id.clone();
                self.coord_enqueue(CoordinatorInput::FromWorker { worker, message: msg });
            }
            Ev::ToWorker { w, conn, msg } => {
                let link = &self.links[w];
                if link.conn != conn || link.blocked_down {
                    self.messages.1 += 1;
                    return;
                }
                self.worker_input(w, WorkerInput::Message(msg));
            }
            Ev::PluginFinish { w, epoch, task, token, run, outcome } => {
                let node = &mut self.workers[w];
                if node.epoch != epoch || node.runs.get(&(task, token)).is_none_or(|r| r.id != run) {
                    return;
                }
                node.runs.remove(&(task, token));
                self.worker_input(w, WorkerInput::TaskFinished { task, token, outcome });
            }
            Ev::Fault(i) => self.fault(i),
            Ev::Submit { job } => self.submit(job),
            Ev::SubmitRetry { job } => {
                if !self.acked.contains_key(&job) {
                    self.submit(job);
                }
            }
        }
    }

    // ---- network ----

    fn latency(&mut self) -> u64 {
        let [lo, hi] = self.scenario.network.latency_us;
        (lo + self.rng_net.below(hi - lo + 1)) * 1_000
    }

    fn send_up(&mut self, w: usize, msg: ToCoordinator) {
        self.messages.0 += 1;
        if self.links[w].blocked_up {
            self.messages.1 += 1;
            return;
        }
        let at = (self.now + self.latency()).max(self.links[w].last_up);
        self.links[w].last_up = at;
        let conn = self.links[w].conn;
        self.push(at, Ev::ToCoord { w, conn, msg });
    }

    fn send_down(&mut self, w: usize, msg: ToWorker) {
        self.messages.0 += 1;
        if self.links[w].blocked_down {
            self.messages.1 += 1;
            return;
        }
        let at = (self.now + self.latency()).max(self.links[w].last_down);
        self.links[w].last_down = at;
        let conn = self.links[w].conn;
        self.push(at, Ev::ToWorker { w, conn, msg });
    }

    // ---- coordinator ----

    fn coord_start(&mut self) {
        let now = self.coord.clock.now(self.now);
        let storage = match RedbStorage::open_in_memory(&self.coord.disk) {
            Ok(s) => Arc::new(s),
            Err(e) => return self.fail("coordinator_recovery", format!("opening storage: {e}")),
        };
        match Coordinator::recover(storage, self.settings.clone(), now) {
            Ok(c) => self.coord.machine = Some(c),
            Err(e) => return self.fail("coordinator_recovery", format!("recover: {e}")),
        }
        self.coord_set_timer();
    }

    fn coord_crash(&mut self) {
        if self.coord.machine.take().is_none() {
            return;
        }
        self.coord.epoch += 1;
        self.coord.timer_generation += 1;
        self.coord.inbox.clear();
        self.coord.pending.clear();
        self.coord.busy_until = 0;
        self.coord.disk.crash(CrashMode::LoseUnsynced);
        // The process is gone, so are its connections.
        for link in &mut self.links {
            link.conn += 1;
        }
    }

    fn coord_enqueue(&mut self, input: CoordinatorInput) {
        if self.coord.machine.is_none() {
            self.messages.1 += 1;
            return;
        }
        self.coord.inbox.push(input);
        if !self.coord.run_scheduled && self.coord.busy_until <= self.now {
            self.coord.run_scheduled = true;
            // Scheduled after everything already queued for this instant: all inputs
            // arriving at the same virtual instant form one batch.
            self.push(self.now, Ev::CoordRun);
        }
    }

    fn coord_run(&mut self) {
        self.coord.run_scheduled = false;
        if self.coord.inbox.is_empty() {
            return;
        }
        let Some(machine) = self.coord.machine.as_mut() else { return };
        let now = self.coord.clock.now(self.now);
        let inputs = std::mem::take(&mut self.coord.inbox);
        self.batches.0 += 1;
        self.batches.1 += inputs.len() as u64;
        let mut out = Vec::new();
        if let Err(e) = machine.handle_batch(now, inputs, &mut out) {
            return self.fail("coordinator_error", format!("handle_batch failed: {e}"));
        }
        let mut release = Vec::new();
        for o in out {
            match o {
                // Events are in the audit log, committed with the batch.
                CoordinatorOutput::Event(e) => self.record("coordinator", now.wall, e),
                other => release.push(other),
            }
        }
        // Messages and replies leave only once the commit (fsync) has finished.
        let done = self.now + self.scenario.coordinator.commit_latency_us * 1_000;
        self.coord.busy_until = done;
        self.coord.pending.push_back(release);
        let epoch = self.coord.epoch;
        self.push(done, Ev::CoordRelease { epoch });
        self.coord_set_timer();
    }

    fn coord_release(&mut self, epoch: u64) {
        if epoch != self.coord.epoch {
            return;
        }
        let Some(outputs) = self.coord.pending.pop_front() else { return };
        for o in outputs {
            match o {
                CoordinatorOutput::Send { to, message } => match self.worker_index.get(&to) {
                    Some(&w) => self.send_down(w, message),
                    None => self.fail("sim", format!("coordinator sent to unknown worker {to}")),
                },
                CoordinatorOutput::Reply { request, reply } => self.operator_reply(request, reply),
                CoordinatorOutput::Event(_) => {}
            }
        }
        if !self.coord.inbox.is_empty() && !self.coord.run_scheduled {
            self.coord.run_scheduled = true;
            self.push(self.now, Ev::CoordRun);
        }
    }

    fn coord_set_timer(&mut self) {
        self.coord.timer_generation += 1;
        let Some(at) = self.coord.machine.as_ref().and_then(|m| m.poll_timeout()) else { return };
        let t = self.coord.clock.true_time_of(at).max(self.now + 1_000);
        let generation = self.coord.timer_generation;
        self.push(t, Ev::CoordTimer { generation });
    }

    // ---- operator ----

    fn submit(&mut self, job: u32) {
        self.next_request += 1;
        let request = self.next_request;
        self.requests.insert(request, job);
        let wl = &self.scenario.workload;
        let tasks = (0..wl.tasks_per_job)
            .map(|k| TaskSpec {
                plugin: "sim".into(),
                method: "run".into(),
                payload: format!("job{job}-task{k}").into_bytes(),
                gpus: 0,
                deadline: None,
            })
            .collect();
        let submission = JobSubmission { name: format!("job{job}"), tasks, idempotency_key: Some(format!("job{job}")) };
        self.coord_enqueue(CoordinatorInput::SubmitJob { request, job: submission });
        self.push(self.now + SUBMIT_RETRY_NS, Ev::SubmitRetry { job });
    }

    fn operator_reply(&mut self, request: u64, reply: OperatorReply) {
        let Some(job) = self.requests.remove(&request) else { return };
        match reply {
            OperatorReply::JobAccepted { job: id, tasks, .. } => {
                self.acked.insert(job, (id, tasks));
            }
            OperatorReply::Rejected(e) => self.fail("sim", format!("job{job} rejected: {e}")),
            other => self.fail("sim", format!("unexpected reply to job{job}: {other:?}")),
        }
    }

    // ---- workers ----

    fn worker_start(&mut self, w: usize) {
        let node = &mut self.workers[w];
        if node.machine.is_some() {
            return;
        }
        let settings = WorkerSettings::from_config(
            node.id.clone(),
            self.scenario.cluster.slots,
            vec!["sim".into()],
            Inventory { cpus: 8, memory_bytes: 16 << 30, gpus: Vec::new() },
            &self.worker_config,
        );
        node.machine = Some(Worker::new(settings, self.rng_worker_seeds.next_u64()));
        self.worker_input(w, WorkerInput::Start);
    }

    fn worker_crash(&mut self, w: usize) {
        let node = &mut self.workers[w];
        if node.machine.take().is_none() {
            return;
        }
        node.epoch += 1;
        node.timer_generation += 1;
        // The plugin host dies with the worker: its runs stop now. The machine cannot
        // say so, so the simulator records the stops on its behalf.
        let stopped: Vec<_> = std::mem::take(&mut node.runs).into_keys().collect();
        let (id, wall) = (node.id.clone(), node.clock.now(self.now).wall);
        for (task, token) in stopped {
            self.record(id.as_str(), wall, HistoryEvent::TaskStopped { task, worker: id.clone(), token });
        }
        self.links[w].conn += 1;
    }

    fn worker_input(&mut self, w: usize, input: WorkerInput) {
        let node = &mut self.workers[w];
        let Some(machine) = node.machine.as_mut() else { return };
        let now = node.clock.now(self.now);
        let before = machine.self_fence_deadline();
        let mut out = Vec::new();
        machine.handle(now, input, &mut out);
        let after = machine.self_fence_deadline();
        let id = node.id.clone();
        let past = |d: Option<Mono>| d.is_some_and(|d| now.mono >= d);
        if past(before) || past(after) {
            // At or past its self-fence deadline a worker must neither submit nor start.
            for o in &out {
                if matches!(o, WorkerOutput::Send(ToCoordinator::Submit(_)) | WorkerOutput::StartTask(_)) {
                    self.fail("self_fence", format!("{id} at mono {:?} past its deadline {before:?}: {o:?}", now.mono));
                }
            }
        }
        for o in out {
            match o {
                WorkerOutput::Send(msg) => self.send_up(w, msg),
                WorkerOutput::StartTask(a) => {
                    let [lo, hi] = self.scenario.workload.task_duration_ms;
                    let dur = (lo + self.rng_plugin.below(hi - lo + 1)) * NS_PER_MS;
                    let outcome = if self.rng_plugin.unit_f64() < self.scenario.workload.failure_probability {
                        TaskOutcome::Failed { message: "simulated failure".into() }
                    } else {
                        let mut bytes = a.payload.clone();
                        bytes.extend_from_slice(a.task.to_string().as_bytes());
                        TaskOutcome::Succeeded { result: ContentId::of(&bytes), size_bytes: bytes.len() as u64 }
                    };
                    self.start_run(w, a.task, a.token, dur, outcome);
                }
                WorkerOutput::CancelTask { task, token } => {
                    // Cancellation is immediate: the run stops and reports at once.
                    if self.workers[w].runs.contains_key(&(task, token)) {
                        self.start_run(w, task, token, 0, TaskOutcome::Cancelled);
                    }
                }
                WorkerOutput::Event(e) => self.record(id.as_str(), now.wall, e),
                WorkerOutput::Fatal(message) => self.fail("worker_fatal", format!("{id}: {message}")),
            }
        }
        self.worker_set_timer(w);
    }

    /// (Re)places the plugin run of `(task, token)`: a new run id makes any earlier
    /// finish event of that run stale.
    fn start_run(&mut self, w: usize, task: TaskId, token: FencingToken, after_ns: u64, outcome: TaskOutcome) {
        self.next_run += 1;
        let run = self.next_run;
        let node = &mut self.workers[w];
        node.runs.insert((task, token), Run { id: run });
        let epoch = node.epoch;
        self.push(self.now + after_ns, Ev::PluginFinish { w, epoch, task, token, run, outcome });
    }

    fn worker_set_timer(&mut self, w: usize) {
        let node = &mut self.workers[w];
        node.timer_generation += 1;
        let Some(at) = node.machine.as_ref().and_then(|m| m.poll_timeout()) else { return };
        let t = node.clock.true_time_of(at).max(self.now + 1_000);
        let generation = node.timer_generation;
        self.push(t, Ev::WorkerTimer { w, generation });
    }

    // ---- faults ----

    fn fault(&mut self, i: usize) {
        let fault = self.scenario.faults[i].clone();
        let node = fault.node.as_deref().and_then(|n| self.scenario.node(n));
        match (fault.kind, node) {
            (FaultKind::Crash, Some(NodeRef::Coordinator)) => self.coord_crash(),
            (FaultKind::Crash, Some(NodeRef::Worker(w))) => self.worker_crash(w),
            (FaultKind::Restart, Some(NodeRef::Coordinator)) if self.coord.machine.is_none() => self.coord_start(),
            (FaultKind::Restart, Some(NodeRef::Worker(w))) => self.worker_start(w),
            (FaultKind::Partition, Some(NodeRef::Worker(w))) => {
                let dir = fault.direction.unwrap_or_default();
                let link = &mut self.links[w];
                link.blocked_up |= matches!(dir, Direction::Both | Direction::ToCoordinator);
                link.blocked_down |= matches!(dir, Direction::Both | Direction::ToWorker);
            }
            (FaultKind::Heal, Some(NodeRef::Worker(w))) => {
                self.links[w].blocked_up = false;
                self.links[w].blocked_down = false;
            }
            (FaultKind::Heal, None) => {
                for link in &mut self.links {
                    link.blocked_up = false;
                    link.blocked_down = false;
                }
            }
            (FaultKind::Reset, Some(NodeRef::Worker(w))) => self.links[w].conn += 1,
            (FaultKind::ClockJump, Some(node)) => {
                let by = i128::from(fault.by_ms.unwrap_or(0)) * NS_PER_MS as i128;
                match node {
                    NodeRef::Coordinator => self.coord.clock.wall_offset_ns += by,
                    NodeRef::Worker(w) => self.workers[w].clock.wall_offset_ns += by,
                }
            }
            // Validation rejects every other combination.
            _ => {}
        }
    }

    // ---- end ----

    fn final_checks(&mut self) {
        let acked: Vec<(JobId, u32)> = self.acked.values().copied().collect();
        let coord = match self.coord.machine.take() {
            Some(c) => Some(c),
            // Down at the end: judge what its disk would recover.
            None => RedbStorage::open_in_memory(&self.coord.disk.fork()).ok().and_then(|s| {
                Coordinator::recover(Arc::new(s), self.settings.clone(), self.coord.clock.now(self.now)).ok()
            }),
        };
        let Some(coord) = coord else {
            return self.fail("coordinator_recovery", "the final state could not be recovered from disk".into());
        };
        let held: Vec<(TaskId, FinalState)> = coord
            .task_states()
            .map(|(t, s)| (t, if s.is_terminal() { FinalState::Terminal } else { FinalState::Pending }))
            .collect();
        let progress = self.scenario.invariants.progress;
        if progress && self.acked.len() < self.scenario.workload.jobs as usize {
            let missing = self.scenario.workload.jobs as usize - self.acked.len();
            return self.fail("progress", format!("{missing} job(s) never acknowledged"));
        }
        if let Err(v) = self.checker.finish(&acked, held, progress) {
            self.violation = Some(v);
        }
        self.coord.machine = Some(coord);
    }

    fn report(mut self, seed: u64) -> RunReport {
        let (mut committed, mut dead_lettered) = (0, 0);
        if let Some(c) = &self.coord.machine {
            for (_, s) in c.task_states() {
                match s {
                    TaskState::Committed { .. } => committed += 1,
                    TaskState::DeadLettered => dead_lettered += 1,
                    _ => {}
                }
            }
        }
        let _ = writeln!(HashWriter(&mut self.hasher), "end {} {:?}", self.now, self.violation);
        let hash = self.hasher.finalize();
        let trace_hash = hash.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
        RunReport {
            seed,
            scenario: self.scenario.name.clone(),
            events: self.events,
            sim_ns: self.now,
            trace_hash,
            jobs_acked: self.acked.len(),
            committed,
            dead_lettered,
            overlaps: self.checker.overlaps,
            messages: self.messages,
            batches: self.batches,
            violation: self.violation,
            history: self.history,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_inverse_is_exact_and_monotonic() {
        for drift_ppm in [-500, 0, 7, 999] {
            let c = Clock { drift_ppm, wall_offset_ns: 0 };
            let mut prev = 0;
            for t in [0u64, 1, 999, 1_000_000, 123_456_789_012] {
                let m = c.mono_ns(t);
                assert!(m >= prev);
                prev = m;
                let back = c.true_time_of(Mono::from_duration(Duration::from_nanos(m)));
                assert!(back <= t && c.mono_ns(back) >= m, "drift {drift_ppm} t {t}");
            }
        }
    }
}
