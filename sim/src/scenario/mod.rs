//! Scenario files (`scenarios/*.toml`): the cluster, the workload, the network and
//! clocks, the fault schedule, and which invariants are strict.
//!
//! Every table rejects unknown keys (serde's `deny_unknown_fields`), so a typo is an
//! error naming the key rather than a silently ignored setting.

use std::path::{Path, PathBuf};

use rollout_core::Config;
use serde::{Deserialize, Serialize};

mod fault;
mod validate;

pub use fault::{Direction, Fault, FaultAction, FaultKind, NodeRef, OnCoordinator, SeenBy, WorkerRef};

/// Why a scenario could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("scenario {path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML did not parse, or a key is unknown or has the wrong type.
    #[error("scenario {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, which names the key and its line.
        message: String,
    },
    /// The values parsed but do not make sense together.
    #[error("scenario {path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key at fault, e.g. `faults[2].node`.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Neither `scenarios/<name>.toml` nor a file at that path exists.
    #[error("scenario {0:?} not found (looked for scenarios/{0}.toml and a file at that path)")]
    NotFound(String),
}

/// A whole scenario.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, shown in reports (defaults to the file stem).
    #[serde(default)]
    pub name: String,
    /// What the scenario exercises, for humans.
    #[serde(default)]
    pub description: String,
    /// The seeds `cargo test -p sim` runs (regressions name the seed that failed);
    /// empty: the test's fixed set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<u64>,
    /// Simulated run length, in seconds.
    pub duration_s: u64,
    /// A deliberately planted bug: in the coordinator (test builds with the
    /// `planted-bugs` feature only), e.g. `skip_fencing_check`; `frames_by_count`, in
    /// the simulator's model of the transport (a burst of Work messages goes as one
    /// frame, whatever its size: the framing before it was cut by bytes); or
    /// `release_before_durable`, in the commit loop (a batch's outputs leave before its
    /// writes are synced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planted_bug: Option<String>,
    /// Overrides of the effective rollout config, in the config file's shape, e.g.
    /// `[config.tasks] retry_backoff_initial = "1ms"`. Validated like a config file.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub config: toml::Table,
    /// Nodes.
    pub cluster: Cluster,
    /// Jobs submitted by the simulated operator.
    pub workload: Workload,
    /// Message latency.
    #[serde(default)]
    pub network: Network,
    /// Per-node clock offsets and drift.
    #[serde(default)]
    pub clocks: Clocks,
    /// Coordinator disk timing.
    #[serde(default)]
    pub coordinator: CoordinatorSim,
    /// Which invariants fail the run.
    #[serde(default)]
    pub invariants: Strictness,
    /// The fault schedule, in any order.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// Random faults drawn per seed on top of the schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swarm: Option<Swarm>,
    /// What the scenario exists for: coverage names (`sim::Coverage::NAMES`, e.g.
    /// `stale_rejected`, `torn_recovered`) its test seeds must reach; `cargo test -p
    /// sim` fails when they no longer do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exercises: Vec<String>,
}

/// A per-seed random fault mix: `faults` faults of the listed kinds at random times in
/// `[0, heal_by_ms)`, each healing itself within `max_for_ms`, on random nodes.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Swarm {
    /// How many faults at most (each seed draws 0..=faults).
    pub faults: u32,
    /// The kinds to draw from (default: crash, power_cut, partition, slow, reset,
    /// flap, clock_jump within the skew budget, disk_latency).
    #[serde(default = "default_swarm_kinds")]
    pub kinds: Vec<FaultKind>,
    /// Every drawn fault has begun and ended by then (ms).
    pub heal_by_ms: u64,
    /// Longest drawn outage (crash, partition, slow link), ms.
    #[serde(default = "default_max_for_ms")]
    pub max_for_ms: u64,
}

impl Swarm {
    /// The default kinds, up to 10 faults in the first 45 s, outages up to 15 s (as
    /// `scenarios/swarm.toml`).
    pub fn standard() -> Swarm {
        Swarm { faults: 10, kinds: default_swarm_kinds(), heal_by_ms: 45_000, max_for_ms: 15_000 }
    }
}

fn default_swarm_kinds() -> Vec<FaultKind> {
    vec![
        FaultKind::Crash,
        FaultKind::PowerCut,
        FaultKind::Partition,
        FaultKind::Slow,
        FaultKind::Reset,
        FaultKind::Flap,
        FaultKind::ClockJump,
        FaultKind::DiskLatency,
    ]
}

fn default_max_for_ms() -> u64 {
    15_000
}

/// The cluster: one coordinator and `workers` workers named `w1..wN`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Number of workers.
    pub workers: u32,
    /// Slots per worker.
    pub slots: u32,
}

/// The operator's workload.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Number of jobs.
    pub jobs: u32,
    /// Tasks per job.
    pub tasks_per_job: u32,
    /// When the first job is submitted (simulated ms).
    #[serde(default = "default_submit_start_ms")]
    pub submit_start_ms: u64,
    /// Gap between job submissions (ms).
    #[serde(default = "default_submit_every_ms")]
    pub submit_every_ms: u64,
    /// Task run time, uniform in `[min, max]` ms.
    pub task_duration_ms: [u64; 2],
    /// Chance that an attempt fails, in `[0, 1]`.
    #[serde(default)]
    pub failure_probability: f64,
    /// Chance that an attempt hangs (never returns by itself), in `[0, 1]`; the plugin
    /// host stops it at its deadline.
    #[serde(default)]
    pub hang_probability: f64,
    /// Each task's deadline (ms); none: the coordinator's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_deadline_ms: Option<u64>,
    /// Each task's payload size in bytes (at most `limits.max_payload_bytes`); 0: a
    /// short name. Messages are measured on the wire, so large payloads fill frames.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub payload_bytes: u32,
    /// Each successful attempt's result size in bytes (at most
    /// `limits.max_result_bytes`); 0: the payload plus the task id.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub result_bytes: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn default_submit_start_ms() -> u64 {
    1_000
}
fn default_submit_every_ms() -> u64 {
    1_000
}

/// Network timing: one-way latency uniform in `[min, max]` microseconds.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// `[min, max]` one-way latency in µs.
    pub latency_us: [u64; 2],
    /// Chance that a unary call (Register, Heartbeat) or its answer is lost, in `[0, 1]`.
    /// Stream messages (Pull, Submit, Assign, acks, control) are lost only by resets.
    #[serde(default)]
    pub unary_loss: f64,
    /// Chance that a unary call is delivered twice (a client retry after a lost
    /// answer), in `[0, 1]`.
    #[serde(default)]
    pub unary_duplicate: f64,
    /// How long a connection may be blocked before the transport's keepalive declares
    /// it dead and resets it (ms). Until then a partition holds stream messages back
    /// (TCP retransmits) rather than losing them.
    #[serde(default = "default_keepalive_ms")]
    pub keepalive_ms: u64,
}

fn default_keepalive_ms() -> u64 {
    2_000
}

impl Default for Network {
    fn default() -> Self {
        Network {
            latency_us: [200, 2_000],
            unary_loss: 0.0,
            unary_duplicate: 0.0,
            keepalive_ms: default_keepalive_ms(),
        }
    }
}

/// Clocks: every node draws a wall offset uniform in `±max_offset_ms` and a drift
/// uniform in `±max_drift_ppm` (the drift applies to both its clocks).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Clocks {
    /// Largest wall-clock offset from true time, in ms.
    #[serde(default)]
    pub max_offset_ms: u64,
    /// Largest drift, in parts per million.
    #[serde(default)]
    pub max_drift_ppm: u64,
}

/// Coordinator disk timing.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSim {
    /// How long a batch's commit (fsync) takes; inputs arriving meanwhile form the
    /// next batch (group commit).
    #[serde(default = "default_commit_latency_us")]
    pub commit_latency_us: u64,
    /// `redb` (default: the real store on a crash-faithful disk) or `model` (an atomic
    /// in-memory map: much faster, but no torn writes, so no `power_cut`).
    #[serde(default)]
    pub storage: StorageKind,
}

fn default_commit_latency_us() -> u64 {
    500
}

/// The coordinator's storage in the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// redb on `MemDisk`.
    #[default]
    Redb,
    /// [`crate::model_store::ModelStorage`].
    Model,
}

impl Default for CoordinatorSim {
    fn default() -> Self {
        CoordinatorSim { commit_latency_us: default_commit_latency_us(), storage: StorageKind::Redb }
    }
}

/// Which invariants fail the run. The core safety invariants (`single_commit`,
/// `fenced_commit`, `self_fence`, `no_lost_task`) are always strict.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Strictness {
    /// `no_overlap` fails the run (set false when clocks leave the skew budget).
    #[serde(default = "yes")]
    pub no_overlap: bool,
    /// `progress` is checked at the end (set false when faults do not heal).
    #[serde(default = "yes")]
    pub progress: bool,
    /// `no_false_failure` fails the run (set false when clocks leave the skew budget).
    #[serde(default = "yes")]
    pub no_false_failure: bool,
    /// `detect` and `rejoin` (the liveness bounds of DESIGN.md) fail the run.
    #[serde(default = "yes")]
    pub liveness: bool,
    /// `all_committed`: at the end every task of every job is committed, none
    /// dead-lettered or pending (for workloads whose plugins never fail, hang or get
    /// cancelled: then only the system itself can lose an attempt's work).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all_committed: bool,
}

fn yes() -> bool {
    true
}

impl Default for Strictness {
    fn default() -> Self {
        Strictness { no_overlap: true, progress: true, no_false_failure: true, liveness: true, all_committed: false }
    }
}

impl Scenario {
    /// Parses scenario text; `path` only labels errors.
    pub fn parse(text: &str, path: &Path) -> Result<Scenario, ScenarioError> {
        let mut scenario: Scenario =
            toml::from_str(text).map_err(|e| ScenarioError::Parse { path: path.to_owned(), message: e.to_string() })?;
        if scenario.name.is_empty() {
            scenario.name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        }
        scenario.validate(path)?;
        Ok(scenario)
    }

    /// Loads `name` as `<scenarios_dir>/<name>.toml`, or else as a path.
    pub fn load(name_or_path: &str, scenarios_dir: &Path) -> Result<Scenario, ScenarioError> {
        let named = scenarios_dir.join(format!("{name_or_path}.toml"));
        let path = if named.is_file() {
            named
        } else if Path::new(name_or_path).is_file() {
            PathBuf::from(name_or_path)
        } else {
            return Err(ScenarioError::NotFound(name_or_path.to_owned()));
        };
        let text = rollout_core::text::read_text_bounded(&path, rollout_core::text::CONFIG_FILE_BYTES_MAX)
            .map_err(|source| ScenarioError::Read { path: path.clone(), source })?;
        Scenario::parse(&text, &path)
    }

    /// The effective rollout config: defaults plus `[config]`, validated.
    pub fn effective_config(&self) -> Result<Config, String> {
        let text = toml::to_string(&self.config).map_err(|e| e.to_string())?;
        let config = Config::from_toml_str(&text).map_err(|e| e.to_string())?;
        config.validate_cross_fields().map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// The scenario as TOML (what the shrinker writes).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot serialize scenario: {e}\n"))
    }

    /// Resolves a node name (`coordinator`, `w1`..`wN`) of this scenario's cluster.
    pub fn node(&self, name: &str) -> Option<NodeRef> {
        NodeRef::parse(name).filter(|n| self.has(*n))
    }

    /// Whether the cluster has this node.
    pub fn has(&self, node: NodeRef) -> bool {
        match node {
            NodeRef::Coordinator => true,
            NodeRef::Worker(w) => w < self.cluster.workers as usize,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
duration_s = 10
[cluster]
workers = 2
slots = 1
[workload]
jobs = 1
tasks_per_job = 2
task_duration_ms = [10, 20]
"#;

    #[test]
    fn minimal_parses_with_defaults() {
        let s = Scenario::parse(MINIMAL, Path::new("x/min.toml")).expect("parses");
        assert_eq!(s.name, "min");
        assert!(s.invariants.no_overlap);
        assert_eq!(s.node("w2"), Some(NodeRef::Worker(1)));
        assert_eq!(s.node("w3"), None);
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL.replace("slots = 1", "slots = 1\nslotz = 2");
        let err = Scenario::parse(&text, Path::new("bad.toml")).expect_err("rejects").to_string();
        assert!(err.contains("bad.toml") && err.contains("slotz"), "{err}");
    }

    fn fault_error(fault: &str) -> String {
        let text = format!("{MINIMAL}\n[[faults]]\nat_ms = 5\n{fault}\n");
        Scenario::parse(&text, Path::new("f.toml")).expect_err("rejects").to_string()
    }

    #[test]
    fn each_fault_kind_takes_its_own_fields_and_errors_name_the_field() {
        let err = fault_error("kind = \"crash\"\nnode = \"w1\"\nlatency_ms = 5");
        assert!(err.contains("latency_ms"), "a field crash does not use: {err}");
        let err = fault_error("kind = \"slow\"\nnode = \"w1\"");
        assert!(err.contains("latency_ms"), "a field slow needs: {err}");
        let err = fault_error("kind = \"partition\"\nnode = \"coordinator\"");
        assert!(err.contains("names a worker"), "a link needs a worker: {err}");
        let err = fault_error("kind = \"disk_latency\"\nnode = \"w2\"\nlatency_ms = 5");
        assert!(err.contains("coordinator only"), "{err}");
        let err = fault_error("kind = \"flap\"\nnode = \"w1\"\nperiod_ms = 0\nfor_ms = 10");
        assert!(err.contains("period_ms") || err.contains("zero"), "{err}");
        let err = fault_error("kind = \"cancel_task\"\njob = 0\ntask = 7");
        assert!(err.contains("faults[0].task"), "{err}");
        let err = fault_error("kind = \"teleport\"\nnode = \"w1\"");
        assert!(err.contains("teleport"), "{err}");
        let err = fault_error("kind = \"crash\"\nnode = \"w01\"");
        assert!(err.contains("w01"), "{err}");
    }

    #[test]
    fn a_fault_schedule_survives_writing_out_and_reading_back() {
        let faults = r#"
[[faults]]
at_ms = 5
kind = "partition"
node = "w2"
direction = "to_worker"
for_ms = 100
[[faults]]
at_ms = 6
kind = "heal"
[[faults]]
at_ms = 7
kind = "power_cut"
[[faults]]
at_ms = 8
kind = "clock_jump"
node = "coordinator"
by_ms = -40
"#;
        let s = Scenario::parse(&format!("{MINIMAL}{faults}"), Path::new("x/rt.toml")).expect("parses");
        assert_eq!(s.faults[0].node(), Some(NodeRef::Worker(1)));
        assert_eq!(s.faults[1].node(), None, "heal without a node heals every link");
        assert_eq!(s.faults[2].node(), Some(NodeRef::Coordinator));
        let again = Scenario::parse(&s.to_toml(), Path::new("x/rt.toml")).expect("reads back");
        assert_eq!(again.faults, s.faults);
    }

    #[test]
    fn bad_fault_node_is_named() {
        let text = format!("{MINIMAL}\n[[faults]]\nat_ms = 5\nkind = \"crash\"\nnode = \"w9\"\n");
        let err = Scenario::parse(&text, Path::new("f.toml")).expect_err("rejects").to_string();
        assert!(err.contains("faults[0].node"), "{err}");
    }
}
