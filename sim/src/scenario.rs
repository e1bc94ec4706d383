//! Scenario files (`scenarios/*.toml`): the cluster, the workload, the network and
//! clocks, the fault schedule, and which invariants are strict.
//!
//! Every table rejects unknown keys (serde's `deny_unknown_fields`), so a typo is an
//! error naming the key rather than a silently ignored setting.

use std::path::{Path, PathBuf};

use serde::Deserialize;

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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, shown in reports (defaults to the file stem).
    #[serde(default)]
    pub name: String,
    /// What the scenario exercises, for humans.
    #[serde(default)]
    pub description: String,
    /// Simulated run length, in seconds.
    pub duration_s: u64,
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
}

/// The cluster: one coordinator and `workers` workers named `w1..wN`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Number of workers.
    pub workers: u32,
    /// Slots per worker.
    pub slots: u32,
}

/// The operator's workload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
}

fn default_submit_start_ms() -> u64 {
    1_000
}
fn default_submit_every_ms() -> u64 {
    1_000
}

/// Network timing: one-way latency uniform in `[min, max]` microseconds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// `[min, max]` one-way latency in µs.
    pub latency_us: [u64; 2],
}

impl Default for Network {
    fn default() -> Self {
        Network { latency_us: [200, 2_000] }
    }
}

/// Clocks: every node draws a wall offset uniform in `±max_offset_ms` and a drift
/// uniform in `±max_drift_ppm` (the drift applies to both its clocks).
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSim {
    /// How long a batch's commit (fsync) takes; inputs arriving meanwhile form the
    /// next batch (group commit).
    pub commit_latency_us: u64,
}

impl Default for CoordinatorSim {
    fn default() -> Self {
        CoordinatorSim { commit_latency_us: 500 }
    }
}

/// Which invariants fail the run. The core safety invariants (`single_commit`,
/// `fenced_commit`, `self_fence`, `no_lost_task`) are always strict.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strictness {
    /// `no_overlap` fails the run (set false when clocks leave the skew budget).
    #[serde(default = "yes")]
    pub no_overlap: bool,
    /// `progress` is checked at the end (set false when faults do not heal).
    #[serde(default = "yes")]
    pub progress: bool,
}

fn yes() -> bool {
    true
}

impl Default for Strictness {
    fn default() -> Self {
        Strictness { no_overlap: true, progress: true }
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// When, in simulated ms since the start.
    pub at_ms: u64,
    /// What.
    pub kind: FaultKind,
    /// `coordinator` or a worker `wN`; for `partition`, `heal` and `reset` the worker
    /// whose link to the coordinator is affected (`heal` without a node heals all).
    #[serde(default)]
    pub node: Option<String>,
    /// For `partition`: `both` (default), `to_coordinator` or `to_worker`.
    #[serde(default)]
    pub direction: Option<Direction>,
    /// For `clock_jump`: the wall-clock step in ms (negative: backwards).
    #[serde(default)]
    pub by_ms: Option<i64>,
}

/// Fault kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The node's process dies (coordinator: its unsynced disk writes are lost).
    Crash,
    /// The node's process starts again.
    Restart,
    /// Messages on the coordinator–worker link are dropped.
    Partition,
    /// The link (or every link) works again.
    Heal,
    /// The link's connection resets: messages in flight are lost.
    Reset,
    /// The node's wall clock steps by `by_ms`.
    ClockJump,
}

/// Which way a partition drops messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Both ways.
    #[default]
    Both,
    /// Worker → coordinator only.
    ToCoordinator,
    /// Coordinator → worker only.
    ToWorker,
}

/// Which node a fault names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRef {
    /// The coordinator.
    Coordinator,
    /// Worker index (0-based; `w1` is 0).
    Worker(usize),
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
        let text =
            std::fs::read_to_string(&path).map_err(|source| ScenarioError::Read { path: path.clone(), source })?;
        Scenario::parse(&text, &path)
    }

    /// Resolves a node name (`coordinator`, `w1`..`wN`).
    pub fn node(&self, name: &str) -> Option<NodeRef> {
        if name == "coordinator" {
            return Some(NodeRef::Coordinator);
        }
        let n: u32 = name.strip_prefix('w')?.parse().ok()?;
        (1..=self.cluster.workers).contains(&n).then(|| NodeRef::Worker(n as usize - 1))
    }

    fn validate(&self, path: &Path) -> Result<(), ScenarioError> {
        let bad = |key: String, message: &str| ScenarioError::Invalid {
            path: path.to_owned(),
            key,
            message: message.to_owned(),
        };
        if self.cluster.workers == 0 || self.cluster.workers > 1_000 {
            return Err(bad("cluster.workers".into(), "must be in 1..=1000"));
        }
        if self.duration_s == 0 {
            return Err(bad("duration_s".into(), "must be positive"));
        }
        let [lo, hi] = self.workload.task_duration_ms;
        if lo > hi || hi == 0 {
            return Err(bad("workload.task_duration_ms".into(), "must be [min, max] with 0 <= min <= max, max > 0"));
        }
        if !(0.0..=1.0).contains(&self.workload.failure_probability) {
            return Err(bad("workload.failure_probability".into(), "must be in [0, 1]"));
        }
        let [lo, hi] = self.network.latency_us;
        if lo > hi {
            return Err(bad("network.latency_us".into(), "must be [min, max] with min <= max"));
        }
        if self.clocks.max_drift_ppm >= 100_000 {
            return Err(bad("clocks.max_drift_ppm".into(), "must be below 100000"));
        }
        for (i, fault) in self.faults.iter().enumerate() {
            let node = match &fault.node {
                Some(name) => Some(
                    self.node(name)
                        .ok_or_else(|| bad(format!("faults[{i}].node"), "no such node (coordinator or w1..wN)"))?,
                ),
                None => None,
            };
            let needs_worker = matches!(fault.kind, FaultKind::Partition | FaultKind::Reset);
            match (fault.kind, node) {
                (FaultKind::Heal, None | Some(NodeRef::Worker(_))) => {}
                (_, None) => return Err(bad(format!("faults[{i}].node"), "required for this kind")),
                (_, Some(NodeRef::Coordinator)) if needs_worker || fault.kind == FaultKind::Heal => {
                    return Err(bad(format!("faults[{i}].node"), "names a link: must be a worker"));
                }
                _ => {}
            }
            if fault.direction.is_some() && fault.kind != FaultKind::Partition {
                return Err(bad(format!("faults[{i}].direction"), "only for kind = \"partition\""));
            }
            match (fault.kind, fault.by_ms) {
                (FaultKind::ClockJump, None) => {
                    return Err(bad(format!("faults[{i}].by_ms"), "required for clock_jump"));
                }
                (FaultKind::ClockJump, Some(_)) | (_, None) => {}
                (_, Some(_)) => return Err(bad(format!("faults[{i}].by_ms"), "only for kind = \"clock_jump\"")),
            }
        }
        Ok(())
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

    #[test]
    fn bad_fault_node_is_named() {
        let text = format!("{MINIMAL}\n[[faults]]\nat_ms = 5\nkind = \"crash\"\nnode = \"w9\"\n");
        let err = Scenario::parse(&text, Path::new("f.toml")).expect_err("rejects").to_string();
        assert!(err.contains("faults[0].node"), "{err}");
    }
}
