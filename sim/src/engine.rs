//! The discrete-event loop: one coordinator and N workers, driven by virtual time.
//!
//! Everything comes from one seed, split per purpose (network, plugin, worker seeds,
//! clocks) so that adding draws for one purpose does not reshuffle the others. Events
//! sit in a `BTreeMap` keyed by (true time in ns, insertion seq): a total order, so a
//! run is a pure function of (scenario, seed, binary).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rollout_coordinator::audit;
use rollout_coordinator::{
    Coordinator, CoordinatorInput, CoordinatorOutput, CoordinatorSettings, JobSubmission, OperatorReply, TaskSpec,
    TaskState, WorkerState, durable_task_states,
};
use rollout_core::history::{HistoryEvent, HistoryRecord};
use rollout_core::protocol::{ToCoordinator, ToWorker};
use rollout_core::rng::SplitMix64;
use rollout_core::time::unix_millis;
use rollout_core::traits::{Inventory, Storage};
use rollout_core::{Config, ContentId, FencingToken, JobId, Mono, Now, TaskId, WorkerId};
use rollout_storage::{CrashMode, MemDisk, RedbStorage};
use rollout_worker::{TaskOutcome, Worker, WorkerInput, WorkerOutput, WorkerSettings};
use sha2::{Digest, Sha256};

use crate::checker::{Checker, FinalState, Violation};
use crate::liveness::{Bounds, CoordEnv, Env, Liveness};
use crate::model_store::ModelStorage;
use crate::scenario::{Direction, Fault, FaultKind, NodeRef, Scenario, StorageKind};
use crate::swarm;

const NS_PER_MS: u64 = 1_000_000;
/// True time 0 reads as this wall time on a clock without offset (2023-11-14).
const BASE_WALL_NS: i128 = 1_700_000_000 * 1_000_000_000;
/// How long the operator waits for a job's acknowledgement before re-submitting it
/// (with the same idempotency key, so a re-submit never duplicates a job).
const SUBMIT_RETRY_NS: u64 = 3_000 * NS_PER_MS;
/// How many history records a failure report shows.
const TAIL: usize = 30;

fn is_unary_up(msg: &ToCoordinator) -> bool {
    matches!(msg, ToCoordinator::Register(_) | ToCoordinator::Heartbeat(_))
}

fn is_unary_down(msg: &ToWorker) -> bool {
    matches!(msg, ToWorker::Registered { .. } | ToWorker::RegisterRejected { .. } | ToWorker::HeartbeatAck { .. })
}

/// Slack on the liveness bounds: clock offsets both ways, the network's worst latency
/// both ways, a commit, and a little for drift and scheduling.
fn slack_ns(scenario: &Scenario) -> u64 {
    2 * scenario.clocks.max_offset_ms * NS_PER_MS
        + 2 * scenario.network.latency_us[1] * 1_000
        + scenario.coordinator.commit_latency_us * 1_000
        + 250 * NS_PER_MS
}

/// A node's clocks as functions of true time. Both advance at `1 + drift` per true
/// second; `wall` adds an offset that clock jumps change. `mono` never goes back; it
/// stands still while the node is suspended (`stalled_ns` of true time so far).
#[derive(Debug, Clone, Copy)]
struct Clock {
    drift_ppm: i64,
    wall_offset_ns: i128,
    stalled_ns: u64,
}

impl Clock {
    fn mono_ns(&self, t: u64) -> u64 {
        let t = t.saturating_sub(self.stalled_ns);
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
        let mut t = ((m * 1_000_000 + rate - 1) / rate).max(0) as u64 + self.stalled_ns;
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
    CoordRelease {
        epoch: u64,
    },
    CoordTimer {
        generation: u64,
    },
    WorkerTimer {
        w: usize,
        generation: u64,
    },
    WorkerStart {
        w: usize,
    },
    ToCoord {
        w: usize,
        conn: u64,
        msg: ToCoordinator,
        rec: Option<u32>,
    },
    ToWorker {
        w: usize,
        conn: u64,
        msg: ToWorker,
        rec: Option<u32>,
    },
    PluginFinish {
        w: usize,
        epoch: u64,
        task: TaskId,
        token: FencingToken,
        run: u64,
        outcome: TaskOutcome,
    },
    Fault(usize),
    /// Undoes fault `i` (restart, heal, restore) at the end of its `for_ms`.
    Undo(usize),
    /// Worker `w` wakes from a pause (of epoch `epoch`).
    Resume {
        w: usize,
        epoch: u64,
    },
    /// Flapping link of worker `w`: cut (`cut`) or heal, until `until`.
    Flap {
        w: usize,
        cut: bool,
        period: u64,
        until: u64,
    },
    /// The coordinator comes back after a power cut.
    PowerRestore {
        epoch: u64,
    },
    /// HTTP/2 keepalive of link `w`: if still blocked since `generation`, the
    /// connection is declared dead and reset.
    Keepalive {
        w: usize,
        conn: u64,
        generation: u64,
    },
    Submit {
        job: u32,
    },
    SubmitRetry {
        job: u32,
    },
}

/// The coordinator's disk: redb on a crash-faithful in-memory disk, or the model.
enum Disk {
    Redb(MemDisk),
    Model(ModelStorage),
}

impl Disk {
    /// Opens the disk's current durable contents as a fresh `Storage` (a restart, or
    /// a look at what a restart would find: `fork` leaves the live disk alone).
    fn open(&self, fork: bool) -> Result<Arc<dyn Storage>, String> {
        match self {
            Disk::Redb(disk) => {
                let disk = if fork {
                    // What a restart now would find: the synced bytes, no armed power cut.
                    let copy = disk.fork();
                    copy.crash(CrashMode::LoseUnsynced);
                    copy
                } else {
                    disk.clone()
                };
                RedbStorage::open_in_memory(&disk).map(|s| Arc::new(s) as Arc<dyn Storage>).map_err(|e| e.to_string())
            }
            Disk::Model(m) => Ok(Arc::new(m.clone())),
        }
    }
}

struct CoordNode {
    machine: Option<Coordinator>,
    disk: Disk,
    clock: Clock,
    inbox: Vec<CoordinatorInput>,
    busy_until: u64,
    run_scheduled: bool,
    /// Bumped on crash: stale releases and timers are ignored.
    epoch: u64,
    timer_generation: u64,
    /// When the pending timer event fires (true ns), if one is pending.
    timer_at: Option<u64>,
    /// Outputs of committed batches waiting for their commit to finish.
    pending: VecDeque<Vec<CoordinatorOutput>>,
    /// How long a commit takes now (a `disk_latency` fault changes it).
    commit_latency_ns: u64,
    /// An armed power cut: the downtime after the commit it breaks.
    power_cut: Option<u64>,
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
    /// When the pending timer event fires (true ns), if one is pending.
    timer_at: Option<u64>,
    /// Plugin runs on this host; an entry lives until its `TaskFinished` is delivered.
    runs: BTreeMap<(TaskId, FencingToken), Run>,
    /// Suspended since then until the `Resume` event: everything aimed at the host
    /// waits for it, in `held`.
    paused_since: Option<u64>,
    held: VecDeque<Ev>,
}

/// One coordinator–worker connection: FIFO per direction, like a TCP stream.
#[derive(Default)]
struct Link {
    /// Bumped on reset: messages sent on an older connection are lost.
    conn: u64,
    blocked_up: bool,
    blocked_down: bool,
    /// Extra one-way latency of a slow link.
    extra_ns: u64,
    last_up: u64,
    last_down: u64,
    /// Stream messages held by a partition (TCP retransmits; nothing is lost unless
    /// the connection resets), delivered in order when it heals.
    held_up: VecDeque<(ToCoordinator, Option<u32>)>,
    held_down: VecDeque<(ToWorker, Option<u32>)>,
    /// Bumped whenever the link becomes blocked: a keepalive check of an older
    /// blocking is void.
    blocked_generation: u64,
}

/// One message, for the timeline.
#[derive(Debug, Clone)]
pub struct MessageRecord {
    /// The worker at one end (index; `w1` is 0).
    pub worker: usize,
    /// Worker → coordinator.
    pub up: bool,
    /// Its kind (`heartbeat`, `assign`, ...).
    pub kind: &'static str,
    /// The task it is about, if any.
    pub task: Option<TaskId>,
    /// True time sent, ns.
    pub sent_ns: u64,
    /// True time delivered, ns; `None`: lost.
    pub delivered_ns: Option<u64>,
}

/// One fault as it happened, for the timeline.
#[derive(Debug, Clone)]
pub struct FaultSpan {
    /// `coordinator` or a worker name.
    pub node: String,
    /// What (`crash`, `partition both`, `slow +800ms`, ...).
    pub what: String,
    /// True time it began, ns.
    pub start_ns: u64,
    /// True time it ended, ns (`None`: still on at the end; equal to start: instant).
    pub end_ns: Option<u64>,
}

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Keep every message and fault for a timeline (costs memory and time).
    pub record: bool,
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
    /// Every message (with [`Options::record`]).
    pub message_log: Vec<MessageRecord>,
    /// Every fault (with [`Options::record`]).
    pub fault_log: Vec<FaultSpan>,
    /// The faults that ran: the schedule plus the swarm's draws, in schedule order.
    pub faults: Vec<Fault>,
    /// Stale submits the coordinator rejected.
    pub stale_rejected: u64,
    /// Audit entries verified at the end.
    pub audit_entries: u64,
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
    /// The schedule plus the swarm's draws.
    faults: Vec<Fault>,
    options: Options,
    now: u64,
    queue: BTreeMap<(u64, u64), Ev>,
    next_seq: u64,
    rng_net: SplitMix64,
    rng_plugin: SplitMix64,
    rng_worker_seeds: SplitMix64,
    rng_fault: SplitMix64,
    settings: CoordinatorSettings,
    worker_config: Config,
    coord: CoordNode,
    workers: Vec<WorkerNode>,
    worker_index: BTreeMap<WorkerId, usize>,
    links: Vec<Link>,
    next_run: u64,
    next_request: u64,
    /// Operator requests in flight: the job index of a submit, `None` for the rest.
    requests: BTreeMap<u64, Option<u32>>,
    acked: BTreeMap<u32, (JobId, u32)>,
    history: Vec<(u64, HistoryRecord)>,
    checker: Checker,
    liveness: Liveness,
    hasher: Sha256,
    events: u64,
    messages: (u64, u64),
    batches: (u64, u64),
    violation: Option<Violation>,
    message_log: Vec<MessageRecord>,
    fault_log: Vec<FaultSpan>,
    stale_rejected: u64,
    audit_entries: u64,
    /// Every task's state on the coordinator's disk at the end.
    final_states: Vec<(TaskId, TaskState)>,
}

/// Runs `scenario` with `seed` to its end or its first violation.
pub fn run(scenario: &Scenario, seed: u64) -> RunReport {
    run_with(scenario, seed, &Options::default())
}

/// [`run`] with options (e.g. recording messages for a timeline).
pub fn run_with(scenario: &Scenario, seed: u64, options: &Options) -> RunReport {
    let mut sim = match Sim::new(scenario.clone(), seed, options.clone()) {
        Ok(sim) => sim,
        Err(v) => return RunReport::setup_failure(scenario, seed, v),
    };
    let end = scenario.duration_s.saturating_mul(1_000 * NS_PER_MS);
    while sim.violation.is_none() {
        let Some(entry) = sim.queue.first_entry() else { break };
        if entry.key().0 > end {
            break;
        }
        let ((t, _), ev) = entry.remove_entry();
        if sim.liveness.next_deadline().is_some_and(|d| d < t) {
            sim.now = sim.liveness.next_deadline().unwrap_or(t);
            if let Err(v) = sim.liveness.tick(t) {
                sim.violation = Some(v);
                break;
            }
        }
        sim.now = t;
        sim.events += 1;
        sim.hash_event(t, &ev);
        sim.dispatch(ev);
    }
    if sim.violation.is_none() {
        sim.now = sim.now.max(end);
        if let Err(v) = sim.liveness.tick(end) {
            sim.violation = Some(v);
        } else {
            sim.final_checks();
        }
    }
    sim.report(seed)
}

impl RunReport {
    fn setup_failure(scenario: &Scenario, seed: u64, violation: Violation) -> RunReport {
        RunReport {
            seed,
            scenario: scenario.name.clone(),
            events: 0,
            sim_ns: 0,
            trace_hash: String::new(),
            jobs_acked: 0,
            committed: 0,
            dead_lettered: 0,
            overlaps: 0,
            messages: (0, 0),
            batches: (0, 0),
            violation: Some(violation),
            history: Vec::new(),
            message_log: Vec::new(),
            fault_log: Vec::new(),
            faults: scenario.faults.clone(),
            stale_rejected: 0,
            audit_entries: 0,
        }
    }
}

impl Sim {
    fn new(scenario: Scenario, seed: u64, options: Options) -> Result<Sim, Violation> {
        let setup = |message: String| Violation { invariant: "sim_setup", seq: None, message };
        let mut master = SplitMix64::new(seed);
        let rng_net = SplitMix64::new(master.next_u64());
        let rng_plugin = SplitMix64::new(master.next_u64());
        let rng_worker_seeds = SplitMix64::new(master.next_u64());
        let mut rng_clock = SplitMix64::new(master.next_u64());
        let mut rng_start = SplitMix64::new(master.next_u64());
        let mut rng_swarm = SplitMix64::new(master.next_u64());
        let rng_fault = SplitMix64::new(master.next_u64());
        let draw_clock = |rng: &mut SplitMix64| {
            let off = scenario.clocks.max_offset_ms * NS_PER_MS;
            let drift = scenario.clocks.max_drift_ppm;
            Clock {
                drift_ppm: rng.below(2 * drift + 1) as i64 - drift as i64,
                wall_offset_ns: rng.below(2 * off + 1) as i128 - off as i128,
                stalled_ns: 0,
            }
        };
        let config = scenario.effective_config().map_err(|e| setup(format!("config: {e}")))?;
        let mut settings = CoordinatorSettings::from_config(&config);
        if let Some(bug) = &scenario.planted_bug {
            settings.plant_bug(bug).map_err(setup)?;
        }
        let mut faults = scenario.faults.clone();
        faults.extend(swarm::draw(&scenario, &config, &mut rng_swarm));
        let bounds = Bounds::new(&config, slack_ns(&scenario));
        let disk = match scenario.coordinator.storage {
            StorageKind::Redb => Disk::Redb(MemDisk::new()),
            StorageKind::Model => Disk::Model(ModelStorage::new()),
        };
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
                timer_at: None,
                runs: BTreeMap::new(),
                paused_since: None,
                held: VecDeque::new(),
            });
        }
        let links = (0..workers.len()).map(|_| Link::default()).collect();
        let strict_overlap = scenario.invariants.no_overlap;
        let liveness = Liveness::new(
            bounds,
            workers.iter().map(|w| w.id.clone()),
            scenario.invariants.no_false_failure,
            scenario.invariants.liveness,
        );
        let commit_latency_ns = scenario.coordinator.commit_latency_us * 1_000;
        let mut sim = Sim {
            faults,
            options,
            liveness,
            rng_fault,
            message_log: Vec::new(),
            fault_log: Vec::new(),
            stale_rejected: 0,
            audit_entries: 0,
            final_states: Vec::new(),
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
                timer_at: None,
                pending: VecDeque::new(),
                commit_latency_ns,
                power_cut: None,
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
        for (i, at_ms) in sim.faults.iter().map(|f| f.at_ms).enumerate().collect::<Vec<_>>() {
            sim.push(at_ms * NS_PER_MS, Ev::Fault(i));
        }
        let wl = sim.scenario.workload.clone();
        for job in 0..wl.jobs {
            sim.push((wl.submit_start_ms + u64::from(job) * wl.submit_every_ms) * NS_PER_MS, Ev::Submit { job });
        }
        Ok(sim)
    }

    /// Feeds one event into the trace hash: its time, kind and node, not its payload
    /// (the history records, hashed in full, carry what happened).
    fn hash_event(&mut self, t: u64, ev: &Ev) {
        let (tag, a, b): (&str, u64, u64) = match ev {
            Ev::CoordRun => ("coord_run", 0, 0),
            Ev::CoordRelease { epoch } => ("coord_release", *epoch, 0),
            Ev::CoordTimer { generation } => ("coord_timer", *generation, 0),
            Ev::WorkerTimer { w, generation } => ("worker_timer", *w as u64, *generation),
            Ev::WorkerStart { w } => ("worker_start", *w as u64, 0),
            Ev::ToCoord { w, conn, msg, .. } => (msg.kind(), *w as u64, *conn),
            Ev::ToWorker { w, conn, msg, .. } => (msg.kind(), *w as u64, *conn),
            Ev::PluginFinish { w, run, .. } => ("plugin_finish", *w as u64, *run),
            Ev::Fault(i) => ("fault", *i as u64, 0),
            Ev::Undo(i) => ("undo", *i as u64, 0),
            Ev::Resume { w, epoch } => ("resume", *w as u64, *epoch),
            Ev::Flap { w, cut, .. } => ("flap", *w as u64, u64::from(*cut)),
            Ev::PowerRestore { epoch } => ("power_restore", *epoch, 0),
            Ev::Keepalive { w, generation, .. } => ("keepalive", *w as u64, *generation),
            Ev::Submit { job } => ("submit", u64::from(*job), 0),
            Ev::SubmitRetry { job } => ("submit_retry", u64::from(*job), 0),
        };
        self.hasher.update(t.to_le_bytes());
        self.hasher.update(tag.as_bytes());
        self.hasher.update(a.to_le_bytes());
        self.hasher.update(b.to_le_bytes());
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
        if matches!(record.event, HistoryEvent::StaleRejected { .. }) {
            self.stale_rejected += 1;
        }
        if self.violation.is_none() {
            if let Err(v) = self.checker.observe(&record) {
                self.violation = Some(v);
            } else if let Err(v) = self.liveness.observe(self.now, &record) {
                self.violation = Some(v);
            }
        }
        self.history.push((self.now, record));
    }

    fn dispatch(&mut self, ev: Ev) {
        match ev {
            Ev::CoordRun => self.coord_run(),
            Ev::CoordRelease { epoch } => self.coord_release(epoch),
            Ev::CoordTimer { generation } => {
                if generation == self.coord.timer_generation {
                    self.coord.timer_at = None;
                    if !self.coord.inbox.contains(&CoordinatorInput::Tick) {
                        self.coord_enqueue(CoordinatorInput::Tick);
                    }
                }
            }
            Ev::WorkerTimer { w, .. } | Ev::ToWorker { w, .. } | Ev::PluginFinish { w, .. }
                if self.workers[w].paused_since.is_some() =>
            {
                // A suspended host reads nothing and runs nothing: it all happens on resume.
                self.workers[w].held.push_back(ev);
            }
            Ev::Resume { w, epoch } => self.resume(w, epoch),
            Ev::WorkerTimer { w, generation } => {
                if generation == self.workers[w].timer_generation {
                    self.workers[w].timer_at = None;
                    self.worker_input(w, WorkerInput::Tick);
                }
            }
            Ev::WorkerStart { w } => self.worker_start(w),
            Ev::ToCoord { w, conn, msg, rec } => {
                let link = &mut self.links[w];
                if link.conn == conn && link.blocked_up && !is_unary_up(&msg) {
                    link.held_up.push_back((msg, rec));
                    return;
                }
                if link.conn != conn || link.blocked_up || self.coord.machine.is_none() {
                    self.lost_in_flight(w, rec);
                    return;
                }
                let worker = self.workers[w].id.clone();
                self.coord_enqueue(CoordinatorInput::FromWorker { worker, message: msg });
            }
            Ev::ToWorker { w, conn, msg, rec } => {
                let link = &mut self.links[w];
                if link.conn == conn && link.blocked_down && !is_unary_down(&msg) {
                    link.held_down.push_back((msg, rec));
                    return;
                }
                if link.conn != conn || link.blocked_down || self.workers[w].machine.is_none() {
                    self.lost_in_flight(w, rec);
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
            Ev::Undo(i) => self.undo(i),
            Ev::Flap { w, cut, period, until } => {
                let link = &mut self.links[w];
                link.blocked_up = cut;
                link.blocked_down = cut;
                self.link_changed(w);
                if self.now < until {
                    self.push((self.now + period).min(until), Ev::Flap { w, cut: !cut, period, until });
                } else if cut {
                    self.push(self.now, Ev::Flap { w, cut: false, period, until });
                }
            }
            Ev::Keepalive { w, conn, generation } => {
                let link = &self.links[w];
                if link.conn == conn && link.blocked_generation == generation && (link.blocked_up || link.blocked_down)
                {
                    self.reset_link(w, "keepalive timeout");
                }
            }
            Ev::PowerRestore { epoch } => {
                if epoch == self.coord.epoch && self.coord.machine.is_none() {
                    self.close_span("coordinator", "power cut");
                    self.coord_start();
                }
            }
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

    /// Logs a message for the timeline; its index.
    fn log_message(
        &mut self,
        w: usize,
        up: bool,
        kind: &'static str,
        task: Option<TaskId>,
        at: Option<u64>,
    ) -> Option<u32> {
        if !self.options.record {
            return None;
        }
        self.message_log.push(MessageRecord { worker: w, up, kind, task, sent_ns: self.now, delivered_ns: at });
        Some((self.message_log.len() - 1) as u32)
    }

    /// A message sent but dropped on arrival (reset, partition, dead receiver).
    fn lost_in_flight(&mut self, w: usize, rec: Option<u32>) {
        self.messages.1 += 1;
        if let Some(r) = rec.and_then(|r| self.message_log.get_mut(r as usize)) {
            r.delivered_ns = None;
        }
        let id = self.workers[w].id.clone();
        self.liveness.worker_env(self.now, &id, Env::Disturbed);
    }

    /// When a message sent now on link `w` arrives: `None` if it is lost at once.
    /// Stream messages keep FIFO order per direction; unary calls (Register, Heartbeat
    /// and their answers) travel on their own HTTP/2 streams, so they may overtake, and
    /// may be lost or duplicated (a client retry after a lost answer).
    fn arrival(&mut self, w: usize, up: bool, unary: bool) -> Vec<u64> {
        let blocked = if up { self.links[w].blocked_up } else { self.links[w].blocked_down };
        if blocked {
            return Vec::new();
        }
        let extra = self.links[w].extra_ns;
        let at = self.now + self.latency() + extra;
        if !unary {
            let last = if up { &mut self.links[w].last_up } else { &mut self.links[w].last_down };
            let at = at.max(*last);
            *last = at;
            return vec![at];
        }
        let net = &self.scenario.network;
        let (loss, dup) = (net.unary_loss, net.unary_duplicate);
        if loss > 0.0 && self.rng_net.unit_f64() < loss {
            return Vec::new();
        }
        if up && dup > 0.0 && self.rng_net.unit_f64() < dup {
            let again = self.now + self.latency() + extra;
            return vec![at, again];
        }
        vec![at]
    }

    fn send_up(&mut self, w: usize, msg: ToCoordinator) {
        self.messages.0 += 1;
        let unary = is_unary_up(&msg);
        let task = match &msg {
            ToCoordinator::Submit(s) => Some(s.task),
            _ => None,
        };
        if self.links[w].blocked_up && !unary {
            let rec = self.log_message(w, true, msg.kind(), task, None);
            self.links[w].held_up.push_back((msg, rec));
            return;
        }
        let arrivals = self.arrival(w, true, unary);
        if arrivals.is_empty() {
            self.messages.1 += 1;
            self.log_message(w, true, msg.kind(), task, None);
            let id = self.workers[w].id.clone();
            self.liveness.worker_env(self.now, &id, Env::Disturbed);
            return;
        }
        let conn = self.links[w].conn;
        for at in arrivals {
            let rec = self.log_message(w, true, msg.kind(), task, Some(at));
            self.push(at, Ev::ToCoord { w, conn, msg: msg.clone(), rec });
        }
    }

    fn send_down(&mut self, w: usize, msg: ToWorker) {
        self.messages.0 += 1;
        let unary = is_unary_down(&msg);
        let task = match &msg {
            ToWorker::Assign(a) => Some(a.task),
            ToWorker::SubmitAck { task, .. } => Some(*task),
            _ => None,
        };
        if self.links[w].blocked_down && !unary {
            let rec = self.log_message(w, false, msg.kind(), task, None);
            self.links[w].held_down.push_back((msg, rec));
            return;
        }
        let arrivals = self.arrival(w, false, unary);
        if arrivals.is_empty() {
            self.messages.1 += 1;
            self.log_message(w, false, msg.kind(), task, None);
            let id = self.workers[w].id.clone();
            self.liveness.worker_env(self.now, &id, Env::Disturbed);
            return;
        }
        let conn = self.links[w].conn;
        for at in arrivals {
            let rec = self.log_message(w, false, msg.kind(), task, Some(at));
            self.push(at, Ev::ToWorker { w, conn, msg: msg.clone(), rec });
        }
    }

    // ---- coordinator ----

    fn coord_start(&mut self) {
        let now = self.coord.clock.now(self.now);
        let storage = match self.coord.disk.open(false) {
            Ok(s) => s,
            Err(e) => return self.fail("coordinator_recovery", format!("opening storage: {e}")),
        };
        match Coordinator::recover(storage, self.settings.clone(), now) {
            Ok(c) => {
                let registered: BTreeSet<WorkerId> =
                    c.workers().into_iter().filter(|w| w.state != WorkerState::Failed).map(|w| w.id).collect();
                self.liveness.recovered(&registered);
                self.coord.machine = Some(c);
            }
            Err(e) => return self.fail("coordinator_recovery", format!("recover: {e}")),
        }
        self.liveness.coord_env(self.now, CoordEnv::Up);
        self.coord_set_timer();
    }

    fn coord_crash(&mut self, mode: CrashMode) {
        if self.coord.machine.take().is_none() {
            return;
        }
        self.coord.epoch += 1;
        self.coord.timer_generation += 1;
        self.coord.timer_at = None;
        self.coord.inbox.clear();
        self.coord.pending.clear();
        self.coord.busy_until = 0;
        self.coord.run_scheduled = false;
        self.coord.power_cut = None;
        if let Disk::Redb(disk) = &self.coord.disk {
            // Also disarms a power cut that no commit has met yet.
            disk.crash(mode);
        }
        self.liveness.coord_env(self.now, CoordEnv::Down);
        // The process is gone, so are its connections: every worker sees them break.
        for w in 0..self.links.len() {
            self.reset_link(w, "reset");
        }
    }

    /// A crash mode for a power cut in the middle of a commit: the unsynced writes are
    /// torn or reordered, as drawn from the seed.
    fn torn_mode(&mut self) -> CrashMode {
        let sizes = match &self.coord.disk {
            Disk::Redb(disk) => disk.unsynced_write_sizes(),
            Disk::Model(_) => Vec::new(),
        };
        let n = sizes.len() as u64;
        if self.rng_fault.below(2) == 0 {
            let whole = self.rng_fault.below(n + 1) as usize;
            let torn = sizes.get(whole).map_or(0, |s| self.rng_fault.below(*s as u64 + 1) as usize);
            CrashMode::TornPrefix { whole_writes: whole, torn_bytes: torn }
        } else {
            let kept = (0..sizes.len()).filter(|_| self.rng_fault.below(2) == 0).collect();
            CrashMode::Reordered { kept_writes: kept }
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
            if let Some(down_ns) = self.coord.power_cut.take() {
                // The commit died with the power: tear the unsynced writes, come back later.
                let mode = self.torn_mode();
                self.open_span("coordinator", format!("power cut ({mode:?})"));
                self.coord_crash(mode);
                let epoch = self.coord.epoch;
                self.push(self.now + down_ns, Ev::PowerRestore { epoch });
                return;
            }
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
        self.coord.pending.push_back(release);
        let epoch = self.coord.epoch;
        let wrote = self.coord.machine.as_ref().is_some_and(Coordinator::last_batch_wrote);
        if wrote {
            // Messages and replies leave only once the commit (fsync) has finished.
            let done = self.now + self.coord.commit_latency_ns;
            self.coord.busy_until = done;
            self.push(done, Ev::CoordRelease { epoch });
        } else {
            // Nothing was written, so nothing waits for the disk.
            self.coord_release(epoch);
        }
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
                CoordinatorOutput::Event(_) | CoordinatorOutput::Notice(_) => {}
            }
        }
        if !self.coord.inbox.is_empty() && !self.coord.run_scheduled {
            self.coord.run_scheduled = true;
            self.push(self.now, Ev::CoordRun);
        }
    }

    fn coord_set_timer(&mut self) {
        let at = self.coord.machine.as_ref().and_then(|m| m.poll_timeout());
        let t = at.map(|at| self.coord.clock.true_time_of(at).max(self.now + 1_000));
        if t.is_some() && t == self.coord.timer_at {
            // Already pending at that time: no second event.
            return;
        }
        self.coord.timer_generation += 1;
        self.coord.timer_at = t;
        let Some(t) = t else { return };
        let generation = self.coord.timer_generation;
        self.push(t, Ev::CoordTimer { generation });
    }

    // ---- operator ----

    fn submit(&mut self, job: u32) {
        self.next_request += 1;
        let request = self.next_request;
        self.requests.insert(request, Some(job));
        let wl = &self.scenario.workload;
        let tasks = (0..wl.tasks_per_job)
            .map(|k| TaskSpec {
                plugin: "sim".into(),
                method: "run".into(),
                payload: format!("job{job}-task{k}").into_bytes(),
                gpus: 0,
                deadline: wl.task_deadline_ms.map(Duration::from_millis),
            })
            .collect();
        let submission = JobSubmission { name: format!("job{job}"), tasks, idempotency_key: Some(format!("job{job}")) };
        self.coord_enqueue(CoordinatorInput::SubmitJob { request, job: submission });
        self.push(self.now + SUBMIT_RETRY_NS, Ev::SubmitRetry { job });
    }

    fn operator_request(&mut self) -> u64 {
        self.next_request += 1;
        self.requests.insert(self.next_request, None);
        self.next_request
    }

    fn operator_reply(&mut self, request: u64, reply: OperatorReply) {
        let Some(job) = self.requests.remove(&request) else { return };
        // Drain and cancel answers need nothing from the operator (the history shows
        // their effect); an unknown job or worker is the scenario's own doing.
        let Some(job) = job else { return };
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
        let id = node.id.clone();
        self.liveness.worker_env(self.now, &id, Env::WorkerUp);
        self.worker_input(w, WorkerInput::Start);
    }

    fn worker_crash(&mut self, w: usize) {
        let node = &mut self.workers[w];
        if node.machine.take().is_none() {
            return;
        }
        // A suspended host that dies stays dead: what it held is gone with it.
        if let Some(since) = node.paused_since.take() {
            node.clock.stalled_ns += self.now - since;
            node.held.clear();
        }
        node.epoch += 1;
        node.timer_generation += 1;
        node.timer_at = None;
        // The plugin host dies with the worker: its runs stop now. The machine cannot
        // say so, so the simulator records the stops on its behalf.
        let stopped: Vec<_> = std::mem::take(&mut node.runs).into_keys().collect();
        let (id, wall) = (node.id.clone(), node.clock.now(self.now).wall);
        for (task, token) in stopped {
            self.record(id.as_str(), wall, HistoryEvent::TaskStopped { task, worker: id.clone(), token });
        }
        let link = &mut self.links[w];
        link.conn += 1;
        link.held_up.clear();
        link.held_down.clear();
        self.liveness.worker_env(self.now, &id, Env::WorkerDown);
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
                    let wl = &self.scenario.workload;
                    let [lo, hi] = wl.task_duration_ms;
                    let (p_fail, p_hang) = (wl.failure_probability, wl.hang_probability);
                    let mut dur = (lo + self.rng_plugin.below(hi - lo + 1)) * NS_PER_MS;
                    let mut outcome = if self.rng_plugin.unit_f64() < p_fail {
                        TaskOutcome::Failed { message: "simulated failure".into() }
                    } else {
                        let mut bytes = a.payload.clone();
                        bytes.extend_from_slice(a.task.to_string().as_bytes());
                        TaskOutcome::Succeeded { result: ContentId::of(&bytes), size_bytes: bytes.len() as u64 }
                    };
                    if p_hang > 0.0 && self.rng_plugin.unit_f64() < p_hang {
                        dur = u64::MAX;
                    }
                    // The plugin host stops a call at its deadline.
                    let deadline = u64::try_from(a.deadline.as_nanos()).unwrap_or(u64::MAX);
                    if dur > deadline {
                        dur = deadline;
                        outcome = TaskOutcome::Failed {
                            message: format!("plugin call exceeded its deadline of {:?}", a.deadline),
                        };
                    }
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
        self.push(self.now.saturating_add(after_ns), Ev::PluginFinish { w, epoch, task, token, run, outcome });
    }

    fn worker_set_timer(&mut self, w: usize) {
        let now = self.now;
        let node = &mut self.workers[w];
        let at = node.machine.as_ref().and_then(|m| m.poll_timeout());
        let t = at.map(|at| node.clock.true_time_of(at).max(now + 1_000));
        if t.is_some() && t == node.timer_at {
            return;
        }
        node.timer_generation += 1;
        node.timer_at = t;
        let Some(t) = t else { return };
        let generation = node.timer_generation;
        self.push(t, Ev::WorkerTimer { w, generation });
    }

    // ---- faults ----

    fn fault(&mut self, i: usize) {
        let fault = self.faults[i].clone();
        let node = fault.node.as_deref().and_then(|n| self.scenario.node(n));
        let name = fault.node.clone().unwrap_or_else(|| "all links".into());
        let undo_at = fault.for_ms.map(|ms| self.now + ms * NS_PER_MS);
        match (fault.kind, node) {
            (FaultKind::Crash, Some(NodeRef::Coordinator)) => {
                self.coord_crash(CrashMode::LoseUnsynced);
                self.open_span(&name, "crash".into());
            }
            (FaultKind::Crash, Some(NodeRef::Worker(w))) => {
                self.worker_crash(w);
                self.open_span(&name, "crash".into());
            }
            (FaultKind::Restart, Some(NodeRef::Coordinator)) => {
                if self.coord.machine.is_none() {
                    self.close_span(&name, "crash");
                    self.coord_start();
                }
            }
            (FaultKind::Restart, Some(NodeRef::Worker(w))) => {
                self.close_span(&name, "crash");
                self.worker_start(w);
            }
            (FaultKind::Partition, Some(NodeRef::Worker(w))) => {
                let dir = fault.direction.unwrap_or_default();
                let link = &mut self.links[w];
                link.blocked_up |= matches!(dir, Direction::Both | Direction::ToCoordinator);
                link.blocked_down |= matches!(dir, Direction::Both | Direction::ToWorker);
                self.link_changed(w);
                let what = match dir {
                    Direction::Both => "partition",
                    Direction::ToCoordinator => "partition to coordinator",
                    Direction::ToWorker => "partition to worker",
                };
                self.open_span(&name, what.into());
            }
            (FaultKind::Heal, Some(NodeRef::Worker(w))) => self.heal(w),
            (FaultKind::Heal, None) => {
                for w in 0..self.links.len() {
                    self.heal(w);
                }
            }
            (FaultKind::Reset, Some(NodeRef::Worker(w))) => {
                self.instant_span(&name, "reset".into());
                self.reset_link(w, "reset");
            }
            (FaultKind::ClockJump, Some(node)) => {
                // A step of any size is no disturbance to the liveness checks: the
                // coordinator keeps deadlines on its own monotonic clock.
                let by_ms = fault.by_ms.unwrap_or(0);
                let by = i128::from(by_ms) * NS_PER_MS as i128;
                match node {
                    NodeRef::Coordinator => self.coord.clock.wall_offset_ns += by,
                    NodeRef::Worker(w) => self.workers[w].clock.wall_offset_ns += by,
                }
                self.instant_span(&name, format!("clock {by_ms:+} ms"));
            }
            (FaultKind::Slow, Some(NodeRef::Worker(w))) => {
                let ms = fault.latency_ms.unwrap_or(0);
                self.links[w].extra_ns = ms * NS_PER_MS;
                let id = self.workers[w].id.clone();
                self.liveness.worker_env(self.now, &id, Env::Disturbed);
                self.open_span(&name, format!("slow +{ms} ms"));
            }
            (FaultKind::Flap, Some(NodeRef::Worker(w))) => {
                let period = fault.period_ms.unwrap_or(1).max(1) * NS_PER_MS;
                let until = undo_at.unwrap_or(self.now);
                self.fault_log_push(&name, format!("flapping every {} ms", period / NS_PER_MS), Some(until));
                self.push(self.now, Ev::Flap { w, cut: true, period, until });
                return;
            }
            (FaultKind::DiskLatency, Some(NodeRef::Coordinator)) => {
                let ms = fault.latency_ms.unwrap_or(0);
                self.coord.commit_latency_ns = ms * NS_PER_MS;
                self.liveness.coord_env(self.now, CoordEnv::Disturbed);
                self.open_span(&name, format!("fsync {ms} ms"));
            }
            (FaultKind::Pause, Some(NodeRef::Worker(w))) => {
                let node = &mut self.workers[w];
                if node.machine.is_none() || node.paused_since.is_some() {
                    return;
                }
                node.paused_since = Some(self.now);
                let (epoch, id) = (node.epoch, node.id.clone());
                // To the coordinator it is as if the link were cut both ways.
                self.liveness.worker_env(self.now, &id, Env::Link { up: false, down: false });
                self.open_span(&name, "paused".into());
                self.push(undo_at.unwrap_or(self.now), Ev::Resume { w, epoch });
                return;
            }
            (FaultKind::Drain, Some(NodeRef::Worker(w))) => {
                let request = self.operator_request();
                let worker = self.workers[w].id.clone();
                self.coord_enqueue(CoordinatorInput::Drain { request, worker });
                self.instant_span(&name, "drain".into());
            }
            (FaultKind::CancelJob | FaultKind::CancelTask, _) => {
                let index = fault.job.unwrap_or(0);
                // Only a job the operator has heard back about has an id to cancel.
                let Some(&(job, _)) = self.acked.get(&index) else { return };
                let request = self.operator_request();
                let (input, what) = match (fault.kind, fault.task) {
                    (FaultKind::CancelTask, Some(t)) => {
                        let task = TaskId::new(job, t);
                        (CoordinatorInput::CancelTask { request, task }, format!("cancel {task}"))
                    }
                    _ => (CoordinatorInput::CancelJob { request, job }, format!("cancel {job}")),
                };
                self.coord_enqueue(input);
                self.instant_span("coordinator", what);
            }
            (FaultKind::PowerCut, Some(NodeRef::Coordinator)) => {
                if self.coord.machine.is_none() {
                    // Already down: no commit to cut.
                    return;
                }
                // The next commit's first or second sync fails; the crash follows it.
                let syncs = self.rng_fault.below(2);
                if let Disk::Redb(disk) = &self.coord.disk {
                    disk.cut_power_after_syncs(syncs);
                }
                self.coord.power_cut = Some(fault.for_ms.unwrap_or(2_000) * NS_PER_MS);
                return;
            }
            // Validation rejects every other combination.
            _ => return,
        }
        if let Some(at) = undo_at {
            self.push(at, Ev::Undo(i));
        }
    }

    /// The end of fault `i`'s `for_ms`.
    fn undo(&mut self, i: usize) {
        let fault = self.faults[i].clone();
        let node = fault.node.as_deref().and_then(|n| self.scenario.node(n));
        let name = fault.node.clone().unwrap_or_default();
        match (fault.kind, node) {
            (FaultKind::Crash, Some(NodeRef::Coordinator)) if self.coord.machine.is_none() => {
                self.close_span(&name, "crash");
                self.coord_start();
            }
            (FaultKind::Crash, Some(NodeRef::Worker(w))) => {
                self.close_span(&name, "crash");
                self.worker_start(w);
            }
            (FaultKind::Partition | FaultKind::Slow, Some(NodeRef::Worker(w))) => self.heal(w),
            (FaultKind::DiskLatency, _) => {
                self.coord.commit_latency_ns = self.scenario.coordinator.commit_latency_us * 1_000;
                self.liveness.coord_env(self.now, CoordEnv::Disturbed);
                self.close_span("coordinator", "fsync");
            }
            _ => {}
        }
    }

    /// The end of a pause: the monotonic clock carries on from where it stood (it lost
    /// the pause), the wall clock is right again (the host's time sync), and what
    /// arrived or fell due meanwhile happens now, in order.
    fn resume(&mut self, w: usize, epoch: u64) {
        let node = &mut self.workers[w];
        if node.epoch != epoch {
            return;
        }
        let Some(since) = node.paused_since.take() else { return };
        let paused = self.now - since;
        node.clock.stalled_ns += paused;
        node.clock.wall_offset_ns += paused as i128;
        let held: Vec<Ev> = node.held.drain(..).collect();
        let id = node.id.clone();
        self.close_span(id.as_str(), "paused");
        let link = &self.links[w];
        let (up, down) = (!link.blocked_up, !link.blocked_down);
        self.liveness.worker_env(self.now, &id, Env::Link { up, down });
        for ev in held {
            self.dispatch(ev);
        }
        // Timers set while it slept were set on a clock that stood still.
        self.worker_set_timer(w);
    }

    fn heal(&mut self, w: usize) {
        let link = &mut self.links[w];
        let was = (link.blocked_up, link.blocked_down, link.extra_ns);
        link.blocked_up = false;
        link.blocked_down = false;
        link.extra_ns = 0;
        if was != (false, false, 0) {
            self.link_changed(w);
            let name = self.workers[w].id.to_string();
            self.close_span(&name, "partition");
            self.close_span(&name, "slow");
        }
    }

    fn link_changed(&mut self, w: usize) {
        let link = &mut self.links[w];
        let change = Env::Link { up: !link.blocked_up, down: !link.blocked_down };
        let blocked = link.blocked_up || link.blocked_down;
        link.blocked_generation += 1;
        let (conn, generation) = (link.conn, link.blocked_generation);
        let id = self.workers[w].id.clone();
        self.liveness.worker_env(self.now, &id, change);
        if blocked {
            // The transport's keepalive notices a dead connection after this long.
            self.push(self.now + self.scenario.network.keepalive_ms * NS_PER_MS, Ev::Keepalive { w, conn, generation });
        }
        // What the partition held goes out now, in order, on the same connection.
        if !self.links[w].blocked_up {
            for (msg, rec) in std::mem::take(&mut self.links[w].held_up) {
                let at = (self.now + self.latency() + self.links[w].extra_ns).max(self.links[w].last_up);
                self.links[w].last_up = at;
                self.set_delivery(rec, Some(at));
                self.push(at, Ev::ToCoord { w, conn, msg, rec });
            }
        }
        if !self.links[w].blocked_down {
            for (msg, rec) in std::mem::take(&mut self.links[w].held_down) {
                let at = (self.now + self.latency() + self.links[w].extra_ns).max(self.links[w].last_down);
                self.links[w].last_down = at;
                self.set_delivery(rec, Some(at));
                self.push(at, Ev::ToWorker { w, conn, msg, rec });
            }
        }
    }

    fn set_delivery(&mut self, rec: Option<u32>, at: Option<u64>) {
        if let Some(r) = rec.and_then(|r| self.message_log.get_mut(r as usize)) {
            r.delivered_ns = at;
        }
    }

    /// The connection of link `w` breaks: whatever was in flight or held is lost, and
    /// the worker's transport tells its machine.
    fn reset_link(&mut self, w: usize, why: &str) {
        let link = &mut self.links[w];
        link.conn += 1;
        let held: Vec<Option<u32>> =
            link.held_up.drain(..).map(|(_, r)| r).chain(link.held_down.drain(..).map(|(_, r)| r)).collect();
        for rec in held {
            self.messages.1 += 1;
            self.set_delivery(rec, None);
        }
        let id = self.workers[w].id.clone();
        self.liveness.worker_env(self.now, &id, Env::Disturbed);
        if why != "reset" {
            self.instant_span(id.as_str(), why.into());
        }
        self.worker_input(w, WorkerInput::Disconnected);
    }

    // ---- fault log (timeline) ----

    fn fault_log_push(&mut self, node: &str, what: String, end_ns: Option<u64>) {
        if self.options.record {
            self.fault_log.push(FaultSpan { node: node.to_owned(), what, start_ns: self.now, end_ns });
        }
    }

    fn open_span(&mut self, node: &str, what: String) {
        self.fault_log_push(node, what, None);
    }

    fn instant_span(&mut self, node: &str, what: String) {
        self.fault_log_push(node, what, Some(self.now));
    }

    /// Ends the open spans of `node` whose description starts with `prefix`.
    fn close_span(&mut self, node: &str, prefix: &str) {
        let now = self.now;
        for span in self.fault_log.iter_mut().filter(|s| s.end_ns.is_none() && s.node == node) {
            if span.what.starts_with(prefix) {
                span.end_ns = Some(now);
            }
        }
    }

    // ---- end ----

    fn final_checks(&mut self) {
        let acked: Vec<(JobId, u32)> = self.acked.values().copied().collect();
        let coord = match self.coord.machine.take() {
            Some(c) => Some(c),
            // Down at the end: judge what its disk would recover.
            None => self
                .coord
                .disk
                .open(true)
                .ok()
                .and_then(|s| Coordinator::recover(s, self.settings.clone(), self.coord.clock.now(self.now)).ok()),
        };
        let Some(coord) = coord else {
            return self.fail("coordinator_recovery", "the final state could not be recovered from disk".into());
        };
        // Judged from what its disk holds, not from the machine's memory.
        let durable = self.coord.disk.open(true).and_then(|s| durable_task_states(&*s).map_err(|e| e.to_string()));
        let states = match durable {
            Ok(states) => states,
            Err(e) => return self.fail("coordinator_recovery", format!("reading the final task states: {e}")),
        };
        let held: Vec<(TaskId, FinalState)> = states
            .iter()
            .map(|(t, s)| (*t, if s.is_terminal() { FinalState::Terminal } else { FinalState::Pending }))
            .collect();
        self.final_states = states;
        let progress = self.scenario.invariants.progress;
        if progress && self.acked.len() < self.scenario.workload.jobs as usize {
            let missing = self.scenario.workload.jobs as usize - self.acked.len();
            return self.fail("progress", format!("{missing} job(s) never acknowledged"));
        }
        if let Err(v) = self.checker.finish(&acked, held, progress) {
            self.violation = Some(v);
        }
        self.coord.machine = Some(coord);
        // audit_chain: the hash chain on disk verifies, entry by entry.
        let audit = self.coord.disk.open(true).and_then(|s| audit::verify(&*s).map_err(|e| e.to_string()));
        match audit {
            Ok(entries) => self.audit_entries = entries,
            Err(e) => self.fail("audit_chain", e),
        }
    }

    fn report(mut self, seed: u64) -> RunReport {
        let (mut committed, mut dead_lettered) = (0, 0);
        for (_, s) in &self.final_states {
            match s {
                TaskState::Committed { .. } => committed += 1,
                TaskState::DeadLettered => dead_lettered += 1,
                _ => {}
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
            message_log: self.message_log,
            fault_log: self.fault_log,
            faults: self.faults,
            stale_rejected: self.stale_rejected,
            audit_entries: self.audit_entries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_inverse_is_exact_and_monotonic() {
        for drift_ppm in [-500, 0, 7, 999] {
            let c = Clock { drift_ppm, wall_offset_ns: 0, stalled_ns: 0 };
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
