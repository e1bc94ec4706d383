//! The discrete-event loop: one coordinator and N workers, driven by virtual time.
//!
//! Everything comes from one seed, split per purpose (network, plugin, worker seeds,
//! clocks) so that adding draws for one purpose does not reshuffle the others. Events
//! sit in a `BTreeMap` keyed by (true time in ns, insertion seq): a total order, so a
//! run is a pure function of (scenario, seed, binary).
//!
//! This file holds the loop and the dispatch of events; the hosts and the world around
//! them live in their own modules: [`clock`] (a node's clocks as functions of true
//! time), [`network`] (links, partitions, resets, keepalives), [`coordinator`] (the
//! coordinator's host, disk and commit loop), [`worker`] (worker hosts and the plugin
//! model), [`faults`] (the schedule played out), [`operator`] (the simulated operator)
//! and [`report`] (the report, timeline logs and final checks).

mod clock;
mod coordinator;
mod coverage;
mod faults;
mod network;
mod operator;
mod report;
mod worker;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::SystemTime;

use rollout_coordinator::{CoordinatorSettings, TaskState};
use rollout_core::history::{HistoryEvent, HistoryRecord};
use rollout_core::rng::SplitMix64;
use rollout_core::time::unix_millis;
use rollout_core::{Config, FencingToken, JobId, TaskId, WorkerId};
use rollout_storage::MemDisk;
use rollout_worker::TaskOutcome;
use sha2::{Digest, Sha256};

use crate::checker::{Checker, Violation};
use crate::liveness::{Bounds, Liveness};
use crate::model_store::ModelStorage;
use crate::scenario::{Fault, Scenario, StorageKind};
use crate::swarm;
use clock::Clock;
use coordinator::{CoordNode, Disk};
pub use coverage::Coverage;
use network::{Link, Wire};
use report::HashWriter;
pub use report::{FaultSpan, MessageRecord, Options, RunReport};
use worker::WorkerNode;

const NS_PER_MS: u64 = 1_000_000;
/// A planted bug of the simulator's model of the transport: Work frames by count.
pub const FRAMES_BY_COUNT: &str = "frames_by_count";
/// A planted bug of the driver's commit loop: outputs released before they are durable.
pub const RELEASE_BEFORE_DURABLE: &str = "release_before_durable";
/// A planted bug of the coordinator's transport: a reset taken for the worker's death
/// (its incarnation ended at once, though the worker may still run).
pub const RESET_ENDS_INCARNATION: &str = "reset_ends_incarnation";
/// The bugs planted outside the coordinator machine (any build).
const SIM_PLANTED_BUGS: [&str; 3] = [FRAMES_BY_COUNT, RELEASE_BEFORE_DURABLE, RESET_ENDS_INCARNATION];

/// Slack on the liveness bounds: clock offsets both ways, the network's worst latency
/// both ways, and a little for drift and scheduling. (Commits are allowed for by the
/// checker itself, from the commit latency in force: see `Liveness::commit_latency`.)
fn slack_ns(scenario: &Scenario) -> u64 {
    2 * scenario.clocks.max_offset_ms * NS_PER_MS + 2 * scenario.network.latency_us[1] * 1_000 + 250 * NS_PER_MS
}

#[derive(Debug)]
enum Ev {
    CoordRun,
    /// The coordinator's sync under way ends (unless it crashed since: `epoch`).
    SyncDone {
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
    /// A message reaches the far end of link `w` (sent on connection `conn`; `rec`:
    /// its index in the message log, if recording).
    Deliver {
        w: usize,
        conn: u64,
        msg: Wire,
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
    /// The answer to worker `w`'s certificate renewal (of process epoch `epoch`):
    /// renewed as `credential`, or failed (`None`).
    Renewal {
        w: usize,
        epoch: u64,
        credential: Option<rollout_worker::Credential>,
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
    SubmitJob {
        job: u32,
    },
    SubmitJobRetry {
        job: u32,
    },
    /// The Work stream of link `w` (connection `conn`) ended on a frame of `bytes` over
    /// the message limit; the worker's transport notices now.
    StreamBroken {
        w: usize,
        conn: u64,
        bytes: usize,
    },
    /// The FIN of worker `w`'s dead process reaches the coordinator's end (sent while
    /// the coordinator ran as `epoch`): its Work stream of `incarnation` closed.
    Fin {
        w: usize,
        epoch: u64,
        incarnation: rollout_core::Incarnation,
    },
    /// The reset the coordinator's kernel answers a message on half-open link `w`
    /// (connection `conn`) with reaches the worker.
    ResetBack {
        w: usize,
        conn: u64,
    },
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
    /// Work frames that could not be sent: over `limits.max_message_bytes`.
    frames_broken: u64,
    /// Write sets applied over a sync that then failed, dropped with it.
    sets_dropped: u64,
    /// What the run exercised.
    coverage: Coverage,
    /// `limits.max_message_bytes`: the transport's frame limit.
    max_message_bytes: usize,
    /// The planted bug `frames_by_count`: a burst of Work messages is one frame.
    frames_by_count: bool,
    /// The planted bug `release_before_durable`: a batch's outputs leave as soon as it
    /// is applied, before its writes are synced.
    release_before_durable: bool,
    /// The planted bug `reset_ends_incarnation`.
    reset_ends_incarnation: bool,
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
        // `frames_by_count` is planted in the simulator's model of the transport's
        // framing; every other bug in the coordinator.
        let frames_by_count = scenario.planted_bug.as_deref() == Some(FRAMES_BY_COUNT);
        let release_before_durable = scenario.planted_bug.as_deref() == Some(RELEASE_BEFORE_DURABLE);
        let reset_ends_incarnation = scenario.planted_bug.as_deref() == Some(RESET_ENDS_INCARNATION);
        if let Some(bug) = scenario.planted_bug.as_deref().filter(|b| !SIM_PLANTED_BUGS.contains(b)) {
            settings.plant_bug(bug).map_err(setup)?;
        }
        let mut faults = scenario.faults.clone();
        faults.extend(swarm::draw(&scenario, &config, &mut rng_swarm));
        let bounds = Bounds::new(&config, slack_ns(&scenario));
        let disk = match scenario.coordinator.storage {
            StorageKind::Redb => Disk::Redb {
                data: MemDisk::new(),
                log: (config.storage.wal_bytes > 0).then(|| (MemDisk::new(), config.storage.wal_bytes)),
            },
            StorageKind::Model => Disk::Model(ModelStorage::new()),
        };
        let coord_clock = draw_clock(&mut rng_clock);
        let mut workers = Vec::new();
        let mut worker_index = BTreeMap::new();
        for i in 0..scenario.cluster.workers as usize {
            // Names w1..wN are always valid worker ids.
            let id = WorkerId::new(format!("w{}", i + 1)).expect("wN is a valid worker id");
            worker_index.insert(id.clone(), i);
            workers.push(WorkerNode::new(id, draw_clock(&mut rng_clock)));
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
        let mut liveness = liveness;
        liveness.commit_latency(commit_latency_ns);
        let mut sim = Sim {
            faults,
            options,
            liveness,
            rng_fault,
            message_log: Vec::new(),
            fault_log: Vec::new(),
            stale_rejected: 0,
            frames_broken: 0,
            sets_dropped: 0,
            coverage: Coverage::default(),
            max_message_bytes: config.limits.max_message_bytes as usize,
            frames_by_count,
            reset_ends_incarnation,
            release_before_durable,
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
            coord: CoordNode::new(disk, coord_clock, commit_latency_ns),
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
            sim.push((wl.submit_start_ms + u64::from(job) * wl.submit_every_ms) * NS_PER_MS, Ev::SubmitJob { job });
        }
        Ok(sim)
    }

    /// Feeds one event into the trace hash: its time, kind and node, not its payload
    /// (the history records, hashed in full, carry what happened).
    fn hash_event(&mut self, t: u64, ev: &Ev) {
        let (tag, a, b): (&str, u64, u64) = match ev {
            Ev::CoordRun => ("coord_run", 0, 0),
            Ev::SyncDone { epoch } => ("sync_done", *epoch, 0),
            Ev::CoordTimer { generation } => ("coord_timer", *generation, 0),
            Ev::WorkerTimer { w, generation } => ("worker_timer", *w as u64, *generation),
            Ev::WorkerStart { w } => ("worker_start", *w as u64, 0),
            Ev::Deliver { w, conn, msg, .. } => (msg.kind(), *w as u64, *conn),
            Ev::PluginFinish { w, run, .. } => ("plugin_finish", *w as u64, *run),
            Ev::Fault(i) => ("fault", *i as u64, 0),
            Ev::Undo(i) => ("undo", *i as u64, 0),
            Ev::Resume { w, epoch } => ("resume", *w as u64, *epoch),
            Ev::Flap { w, cut, .. } => ("flap", *w as u64, u64::from(*cut)),
            Ev::PowerRestore { epoch } => ("power_restore", *epoch, 0),
            Ev::Renewal { w, epoch, .. } => ("renewal", *w as u64, *epoch),
            Ev::Keepalive { w, generation, .. } => ("keepalive", *w as u64, *generation),
            Ev::SubmitJob { job } => ("submit", u64::from(*job), 0),
            Ev::SubmitJobRetry { job } => ("submit_retry", u64::from(*job), 0),
            Ev::StreamBroken { w, conn, .. } => ("stream_broken", *w as u64, *conn),
            Ev::Fin { w, incarnation, .. } => ("fin", *w as u64, incarnation.get()),
            Ev::ResetBack { w, conn } => ("reset_back", *w as u64, *conn),
        };
        self.hasher.update(t.to_le_bytes());
        self.hasher.update(tag.as_bytes());
        self.hasher.update(a.to_le_bytes());
        self.hasher.update(b.to_le_bytes());
    }

    pub(super) fn push(&mut self, at: u64, ev: Ev) {
        self.queue.insert((at, self.next_seq), ev);
        self.next_seq += 1;
    }

    pub(super) fn fail(&mut self, invariant: &'static str, message: String) {
        if self.violation.is_none() {
            self.violation = Some(Violation { invariant, seq: Some(self.history.len() as u64), message });
        }
    }

    pub(super) fn record(&mut self, node: &str, wall: SystemTime, event: HistoryEvent) {
        let record = HistoryRecord {
            seq: self.history.len() as u64,
            node: node.to_owned(),
            wall_unix_ms: unix_millis(wall),
            wall_unix_us: None,
            event,
        };
        let _ = writeln!(HashWriter(&mut self.hasher), "{record:?}");
        if matches!(record.event, HistoryEvent::StaleRejected { .. }) {
            self.stale_rejected += 1;
        }
        self.coverage.observe(&record.event);
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
            Ev::SyncDone { epoch } => self.coord_sync_done(epoch),
            Ev::CoordTimer { generation } => self.coord_timer(generation),
            Ev::WorkerTimer { w, .. }
            | Ev::Deliver { w, msg: Wire::Down(_), .. }
            | Ev::PluginFinish { w, .. }
            | Ev::StreamBroken { w, .. }
            | Ev::Renewal { w, .. }
                if self.workers[w].paused_since.is_some() =>
            {
                // A suspended host reads nothing and runs nothing: it all happens on resume.
                self.workers[w].held.push_back(ev);
            }
            Ev::Resume { w, epoch } => self.resume(w, epoch),
            Ev::WorkerTimer { w, generation } => self.worker_timer(w, generation),
            Ev::WorkerStart { w } => self.worker_start(w),
            Ev::Renewal { w, epoch, credential } => self.worker_renewed(w, epoch, credential),
            Ev::Deliver { w, conn, msg, rec } => self.deliver(w, conn, msg, rec),
            Ev::PluginFinish { w, epoch, task, token, run, outcome } => {
                self.plugin_finish(w, epoch, (task, token), run, outcome)
            }
            Ev::Fault(i) => self.fault(i),
            Ev::Undo(i) => self.undo(i),
            Ev::Flap { w, cut, period, until } => self.flap(w, cut, period, until),
            Ev::Keepalive { w, conn, generation } => self.keepalive(w, conn, generation),
            Ev::PowerRestore { epoch } => {
                if epoch == self.coord.epoch && self.coord.machine.is_none() {
                    self.close_span("coordinator", "power cut");
                    self.coord_start();
                }
            }
            Ev::SubmitJob { job } => self.submit_job(job),
            Ev::SubmitJobRetry { job } => self.submit_retry(job),
            Ev::StreamBroken { w, conn, bytes } => self.stream_broken(w, conn, bytes),
            Ev::Fin { w, epoch, incarnation } => self.fin(w, epoch, incarnation),
            Ev::ResetBack { w, conn } => self.reset_back(w, conn),
        }
    }
}
