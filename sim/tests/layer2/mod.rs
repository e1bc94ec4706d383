//! Layer 2's cluster: the real runtime (rollout-transport's coordinator and worker
//! drivers, tonic, h2 and rustls mutual TLS) on turmoil hosts, over turmoil's simulated
//! TCP, with simulated time and per-host wall clocks.
//!
//! - `coordinator`: redb on a [`MemDisk`] that lives outside the host, so a crash
//!   (turmoil drops the host's runtime, the disk loses its unsynced writes) and a
//!   bounce (the host's software starts again and recovers from the disk) behave as a
//!   power cut and a restart do. Result bytes go to an in-memory object store that
//!   outlives the host too.
//! - `w1`, `w2`, ...: workers with the built-in plugins. The tests run `echo`: plugin
//!   calls run inline and take no simulated time (the built-in `sleep` would block the
//!   host in real time), so a task's lease lasts the network round trips around it.
//! - `operator-N`: short-lived clients that submit a job with an idempotency key,
//!   retrying until the coordinator accepts it.
//!
//! Every driver runs with [`BlockingWork::Inline`] (no blocking-pool threads, which
//! run in real time) and a [`HostWallClock`]: turmoil's logical time from a fixed
//! epoch plus the host's own offset, which a test may step. Histories go to one
//! [`Recorder`] per node and are judged by `sim::checker`, as `rollout check` judges
//! a real cluster's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use rollout_core::history::{HistoryEvent, HistoryRecord};
use rollout_core::time::unix_millis;
use rollout_core::traits::EventEmitter;
use rollout_core::{Config, TaskId, WorkerId};
use rollout_proto::transport as pb;
use rollout_proto::transport::operator_client::OperatorClient;
use rollout_storage::{CrashMode, MemDisk};
use rollout_transport::PluginTime;
use rollout_transport::net::{TlsConnector, lazy_channel};
use rollout_transport::tls::{self, CertFiles};
use rollout_transport::tls::{ensure_ca_at, issue_client_cert_at, issue_operator_cert_at, issue_server_cert_at};
use sim::checker::{RecordedVerdict, check_recorded, merge_histories};

pub mod histories;
mod nodes;
pub mod scenario;
mod tap;

pub use histories::{Kind, committers, count, fingerprint, held_by, position_from};
use nodes::{CoordinatorNode, HostWallClock, Recorder, TurmoilDialer, WorkerNode};
use tap::Tap;

/// The coordinator's host name (and the name in its server certificate).
pub const COORDINATOR: &str = "coordinator";
/// The port it serves on.
const PORT: u16 = 7000;
/// Tasks each worker runs at once in the stories (as in most layer-1 scenarios).
const SLOTS: u32 = 2;
/// Where simulated wall clocks start: fixed, so every stamp is a function of the seed.
const EPOCH_UNIX_S: u64 = 1_700_000_000;
/// When the stories' certificates are issued and how long they last: from a day before
/// the simulated wall clocks start to a year past this process's clock. rustls checks
/// them against the simulated clock where the process's clocks are pinned to turmoil's
/// (`layer2_bytes`), and against the real one otherwise; both lie inside.
fn cert_dates() -> (SystemTime, Duration) {
    let issued_at = SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH_UNIX_S - 86_400);
    let until_now = SystemTime::now().duration_since(issued_at).unwrap_or_default();
    // Whole days, so the dates are a function of the day the test runs on, not the instant.
    let days = until_now.as_secs() / 86_400 + 365;
    (issued_at, Duration::from_secs(days * 86_400))
}
/// How often `run_until` looks at the histories (a step is one simulated millisecond),
/// so how late it may notice what it waits for.
const STEPS_PER_CHECK: u32 = 10;
/// [`STEPS_PER_CHECK`] as simulated time.
pub const CHECK_EVERY: Duration = Duration::from_millis(STEPS_PER_CHECK as u64);

/// [`Config::fast_failure_detection`] (the transport's recovery tests use it too), checked.
pub fn fast_config() -> Config {
    let config = Config::fast_failure_detection();
    config.validate().expect("a valid fast config");
    config
}

// ------------------------------------------------------------------ the cluster

/// What a cluster is made of.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// The workers' names.
    pub workers: Vec<String>,
    /// Tasks each worker runs at once.
    pub slots: u32,
    /// Every node's config.
    pub config: Config,
    /// Each segment's latency is drawn from this range.
    pub latency: (Duration, Duration),
    /// Each host's wall clock starts this far (ms) from turmoil's (absent: 0).
    pub wall_offsets_ms: BTreeMap<String, i64>,
    /// How long a task runs, in simulated ms, drawn per task from this range; `None`:
    /// no time at all (calls run inline).
    pub task_duration_ms: Option<[u64; 2]>,
}

/// A task's simulated run time: drawn from `[lo, hi]` ms by the seed and the task's
/// payload (unique per task), so every attempt of a task takes as long.
fn task_time(seed: u64, [lo, hi]: [u64; 2]) -> PluginTime {
    PluginTime(Arc::new(move |call: &rollout_core::traits::PluginCall| {
        let mut h = seed ^ 0x7a5c_d0e5;
        for chunk in call.payload.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            h = rollout_core::rng::SplitMix64::new(h ^ u64::from_le_bytes(word)).next_u64();
        }
        let span = hi.saturating_sub(lo) + 1;
        Duration::from_millis(lo + rollout_core::rng::SplitMix64::new(h).below(span))
    }))
}

impl ClusterSpec {
    /// The stories' cluster: `workers` with [`SLOTS`] slots, [`fast_config`], 1–25 ms
    /// segments, clocks in step.
    pub fn stories(workers: &[&str]) -> ClusterSpec {
        ClusterSpec {
            workers: workers.iter().map(|w| (*w).to_owned()).collect(),
            slots: SLOTS,
            config: fast_config(),
            latency: (Duration::from_millis(1), Duration::from_millis(25)),
            wall_offsets_ms: BTreeMap::new(),
            task_duration_ms: None,
        }
    }
}

/// One seeded turmoil simulation of a coordinator and workers.
pub struct Cluster {
    sim: turmoil::Sim<'static>,
    /// The seed of this run (turmoil's network and the workers' jitter).
    pub seed: u64,
    tls_dir: tempfile::TempDir,
    disk: MemDisk,
    log_disk: MemDisk,
    coordinator: Arc<Recorder>,
    workers: BTreeMap<String, Arc<Recorder>>,
    clocks: BTreeMap<String, HostWallClock>,
    /// The size of each job submitted so far, in order.
    submitted: Vec<u32>,
    /// Every host and client, in the order they were added.
    hosts: Vec<String>,
    /// What every host wrote to the network.
    tap: Tap,
}

impl Cluster {
    /// Certificates, a coordinator and `workers`, all started (nothing has run yet).
    pub fn start(seed: u64, workers: &[&str]) -> Cluster {
        Cluster::start_with(seed, &ClusterSpec::stories(workers))
    }

    /// A cluster as `spec` says, all started (nothing has run yet).
    pub fn start_with(seed: u64, spec: &ClusterSpec) -> Cluster {
        let config = spec.config.clone();
        let tls_dir = tempfile::tempdir().expect("tempdir");
        let dir = tls_dir.path();
        // Certificates are checked against the hosts' simulated wall clocks, which start
        // at EPOCH_UNIX_S: issue them a day before it, valid well past any run.
        let (issued_at, lifetime) = cert_dates();
        ensure_ca_at(dir, issued_at, lifetime).expect("CA");
        issue_server_cert_at(dir, &[COORDINATOR.to_owned()], issued_at, lifetime).expect("server certificate");
        issue_operator_cert_at(dir, "ops", issued_at, lifetime).expect("operator certificate");
        let ca = CertFiles::ca(dir).cert;

        let mut sim = turmoil::Builder::new()
            .rng_seed(seed)
            .epoch(SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH_UNIX_S))
            .simulation_duration(Duration::from_secs(600))
            .min_message_latency(spec.latency.0)
            .max_message_latency(spec.latency.1)
            // A cut link holds segments until it heals; room for them all on delivery.
            .tcp_capacity(16_384)
            .build();

        let coordinator = Arc::new(Recorder::default());
        let (disk, log_disk) = (MemDisk::new(), MemDisk::new());
        let mut clocks: BTreeMap<String, HostWallClock> = BTreeMap::new();
        let mut clock_of = |name: &str| {
            let clock = HostWallClock::default();
            clock.step(spec.wall_offsets_ms.get(name).copied().unwrap_or(0));
            clocks.insert(name.to_owned(), clock.clone());
            clock
        };
        let tap = Tap::default();
        let node = CoordinatorNode {
            config: config.clone(),
            tap: tap.clone(),
            disk: disk.clone(),
            log_disk: log_disk.clone(),
            history: Arc::clone(&coordinator),
            wall: clock_of(COORDINATOR),
            tls: tls::server_config(&ca, &CertFiles::coordinator(dir)).expect("server TLS"),
        };
        sim.host(COORDINATOR, move || node.clone().run());

        let mut recorders = BTreeMap::new();
        for (i, name) in spec.workers.iter().enumerate() {
            let id = WorkerId::new(name).expect("worker id");
            let files = issue_client_cert_at(dir, &id, issued_at, lifetime).expect("worker certificate");
            let history = Arc::new(Recorder::default());
            recorders.insert(name.clone(), Arc::clone(&history));
            let node = WorkerNode {
                config: config.clone(),
                tap: tap.clone(),
                id,
                slots: spec.slots,
                plugin_time: spec.task_duration_ms.map(|range| task_time(seed, range)),
                rng_seed: rollout_core::rng::SplitMix64::new(seed ^ (i as u64 + 1)).next_u64(),
                starts: Arc::new(AtomicU64::new(0)),
                history,
                wall: clock_of(name),
                tls: tls::client_config(&ca, &files).expect("worker TLS"),
            };
            sim.host(name.as_str(), move || node.clone().run());
        }
        Cluster {
            sim,
            seed,
            tls_dir,
            disk,
            log_disk,
            coordinator,
            workers: recorders,
            clocks,
            submitted: Vec::new(),
            hosts: std::iter::once(COORDINATOR.to_owned()).chain(spec.workers.iter().cloned()).collect(),
            tap,
        }
    }

    // -------------------------------------------------------------- time

    fn step(&mut self) {
        if let Err(e) = self.sim.step() {
            panic!("seed {}: a host failed: {e}", self.seed);
        }
    }

    /// Runs `span` of simulated time.
    pub fn run_for(&mut self, span: Duration) {
        let until = self.sim.elapsed() + span;
        while self.sim.elapsed() < until {
            self.step();
        }
    }

    /// Runs until `done` holds (looked at every few simulated milliseconds); panics
    /// naming `what` and the seed if it does not within `within` of simulated time.
    pub fn run_until(&mut self, what: &str, within: Duration, done: impl Fn(&Cluster) -> bool) {
        let deadline = self.sim.elapsed() + within;
        loop {
            for _ in 0..STEPS_PER_CHECK {
                self.step();
            }
            if done(self) {
                return;
            }
            assert!(
                self.sim.elapsed() < deadline,
                "seed {}: {what} did not happen within {within:?} (at {:?} of simulated time)",
                self.seed,
                self.sim.elapsed()
            );
        }
    }

    /// Simulated time since the start.
    pub fn elapsed(&self) -> Duration {
        self.sim.elapsed()
    }

    // -------------------------------------------------------------- work

    /// Submits a job of `tasks` echo tasks from a fresh operator host, which retries
    /// (same idempotency key) until the coordinator accepts it.
    pub fn submit(&mut self, tasks: u32) {
        self.submit_sized(tasks, 0);
    }

    /// [`Cluster::submit`] with each payload padded to `payload_bytes`.
    pub fn submit_sized(&mut self, tasks: u32, payload_bytes: usize) {
        let n = self.submitted.len() + 1;
        let name = format!("job-{n}");
        let dir = self.tls_dir.path();
        let tls = tls::client_config(&CertFiles::ca(dir).cert, &CertFiles::operator(dir, "ops")).expect("operator TLS");
        let request = pb::SubmitJobRequest {
            name: name.clone(),
            tasks: (0..tasks)
                .map(|i| pb::TaskSpec {
                    plugin: "echo".into(),
                    method: "run".into(),
                    payload: {
                        let mut payload = format!("{name}/{i}").into_bytes();
                        payload.resize(payload.len().max(payload_bytes), b'.');
                        payload
                    },
                    gpus: 0,
                    deadline_ms: 30_000,
                    inputs: Vec::new(),
                })
                .collect(),
            idempotency_key: name.clone(),
        };
        self.submitted.push(tasks);
        let host = format!("operator-{n}");
        self.hosts.push(host.clone());
        let dialer = TurmoilDialer { host: host.clone(), tap: self.tap.clone() };
        self.sim.client(host, async move {
            let connector = TlsConnector::new(dialer, tls, tls::server_name_of(COORDINATOR)?);
            let mut operator = OperatorClient::new(lazy_channel(connector));
            loop {
                let mut call = tonic::Request::new(request.clone());
                call.set_timeout(Duration::from_secs(1));
                if operator.submit_job(call).await.is_ok() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    /// Whether every submitted job was accepted and all its tasks committed.
    pub fn all_committed(&self) -> bool {
        let total: u32 = self.submitted.iter().sum();
        self.coordinator.with(|h| {
            let accepted = h.iter().filter(|r| matches!(r.event, HistoryEvent::JobAccepted { .. })).count();
            let commits = h.iter().filter(|r| matches!(r.event, HistoryEvent::Committed { .. })).count();
            accepted >= self.submitted.len() && commits >= total as usize
        })
    }

    /// Every host's digest of the bytes it wrote to the network, with their count.
    pub fn wire_digests(&self) -> BTreeMap<String, (String, u64)> {
        self.tap.digests()
    }

    /// Commits so far.
    pub fn commits(&self) -> usize {
        self.coordinator(|h| h.iter().filter(|r| matches!(r.event, HistoryEvent::Committed { .. })).count())
    }

    // -------------------------------------------------------------- histories

    /// Runs `f` over the coordinator's history.
    pub fn coordinator<R>(&self, f: impl FnOnce(&[HistoryRecord]) -> R) -> R {
        self.coordinator.with(f)
    }

    /// Runs `f` over a worker's history.
    pub fn worker<R>(&self, id: &str, f: impl FnOnce(&[HistoryRecord]) -> R) -> R {
        self.workers.get(id).unwrap_or_else(|| panic!("no worker {id}")).with(f)
    }

    /// Every node's history, merged as `rollout check` merges recorded files.
    pub fn merged(&self) -> Vec<HistoryRecord> {
        let mut files = vec![self.coordinator.snapshot()];
        files.extend(self.workers.values().map(|r| r.snapshot()));
        merge_histories(files)
    }

    /// Judges the merged history with every invariant strict (`no_overlap` included:
    /// clocks stay within the skew budget) and `progress` required, then checks that
    /// the workload completed: every submitted job accepted once, and every task of it
    /// committed exactly once. Returns the merged history.
    pub fn assert_clean_and_complete(&self) -> Vec<HistoryRecord> {
        let merged = self.merged();
        let verdict: RecordedVerdict = check_recorded(&merged, true, true).unwrap_or_else(|v| {
            let end = v.seq.map_or(merged.len(), |at| at as usize + 1).min(merged.len());
            let leading: Vec<String> = merged[end.saturating_sub(16)..end]
                .iter()
                .map(|r| serde_json::to_string(r).unwrap_or_default())
                .collect();
            panic!("seed {}: {v}\nthe records leading to it:\n{}", self.seed, leading.join("\n"))
        });
        let total: u32 = self.submitted.iter().sum();
        let jobs: BTreeMap<_, _> = self.coordinator(|h| {
            h.iter()
                .filter_map(|r| match r.event {
                    HistoryEvent::JobAccepted { job, tasks } => Some((job, tasks)),
                    _ => None,
                })
                .collect()
        });
        assert_eq!(jobs.len(), self.submitted.len(), "seed {}: jobs accepted {jobs:?}", self.seed);
        let mut commits: BTreeMap<TaskId, u32> = BTreeMap::new();
        self.coordinator(|h| {
            for r in h {
                if let HistoryEvent::Committed { task, .. } = r.event {
                    *commits.entry(task).or_default() += 1;
                }
            }
        });
        for (job, tasks) in &jobs {
            for i in 0..*tasks {
                let task = TaskId::new(*job, i);
                assert_eq!(commits.get(&task), Some(&1), "seed {}: {task} not committed exactly once", self.seed);
            }
        }
        assert_eq!(commits.len(), total as usize, "seed {}: commits of unknown tasks", self.seed);
        assert_eq!(verdict.tasks, total as usize);
        assert_eq!(verdict.terminal, total as usize);
        merged
    }

    // -------------------------------------------------------------- faults

    /// Cuts the link between `node` and the coordinator, both ways. Segments are held,
    /// not dropped, and arrive when the link heals: real TCP retransmits across a
    /// partition shorter than its timeouts (turmoil's drop would lose them for good,
    /// which TCP never does without resetting the connection).
    pub fn cut(&mut self, node: &str) {
        self.sim.hold(node, COORDINATOR);
    }

    /// Heals a cut link.
    pub fn heal(&mut self, node: &str) {
        self.sim.release(node, COORDINATOR);
    }

    /// Crashes a host like a power cut: its runtime, tasks and sockets are gone, and
    /// nothing leaves it any more, not even segments already on the wire or the FIN
    /// and RST its dropped sockets would send; a peer learns of the crash from its own
    /// timeouts, or from the RST its next segment draws once the host is back. (A
    /// process crash, where the kernel sends those FINs, cannot be simulated
    /// reproducibly: tokio drops a runtime's tasks in an order that depends on
    /// process-global task ids, and that order would pick every latency drawn after.)
    ///
    /// The coordinator's disk loses every unsynced write. A crashed worker's plugin
    /// runs stop with it; the runtime cannot say so, so (as layer 1 does) the test
    /// records their stops on its behalf.
    pub fn crash(&mut self, node: &str) {
        let peers: Vec<String> = self.hosts.iter().filter(|h| *h != node).cloned().collect();
        for peer in &peers {
            self.sim.partition_oneway(node, peer.as_str());
        }
        self.sim.crash(node);
        for peer in &peers {
            self.sim.repair_oneway(node, peer.as_str());
        }
        if node == COORDINATOR {
            self.disk.crash(CrashMode::LoseUnsynced);
            self.log_disk.crash(CrashMode::LoseUnsynced);
            return;
        }
        let history = self.workers.get(node).unwrap_or_else(|| panic!("no worker {node}"));
        let open = history.with(open_runs);
        let wall = unix_millis(self.clocks[node].at(self.sim.since_epoch()));
        for (task, token) in open {
            let seq = history.with(|h| h.last().map_or(1, |r| r.seq + 1));
            let worker = WorkerId::new(node).expect("worker id");
            history.emit(&HistoryRecord {
                seq,
                node: node.to_owned(),
                wall_unix_ms: wall,
                wall_unix_us: None,
                event: HistoryEvent::TaskStopped { task, worker, token },
            });
        }
    }

    /// Starts a crashed host's software again.
    pub fn restart(&mut self, node: &str) {
        self.sim.bounce(node);
    }

    /// Steps `node`'s wall clock by `by_ms` (negative: back), as NTP might.
    pub fn step_wall_clock(&mut self, node: &str, by_ms: i64) {
        self.clocks[node].step(by_ms);
    }
}

// ------------------------------------------------------------------ reading histories

/// Runs a node started and has not stopped.
fn open_runs(history: &[HistoryRecord]) -> BTreeSet<(TaskId, rollout_core::FencingToken)> {
    let mut open = BTreeSet::new();
    for r in history {
        match &r.event {
            HistoryEvent::TaskStarted { task, token, .. } => {
                open.insert((*task, *token));
            }
            HistoryEvent::TaskStopped { task, token, .. } => {
                open.remove(&(*task, *token));
            }
            _ => {}
        }
    }
    open
}
