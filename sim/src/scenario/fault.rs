//! The fault schedule's types: one variant per fault kind, each with exactly the
//! fields it uses (TOML: `kind = "partition"` next to `at_ms` and those fields), and
//! node names parsed once into [`NodeRef`] or [`WorkerRef`]. A field a kind does not
//! use, a missing one, or a node of the wrong sort is a parse error naming the field;
//! what needs the rest of the scenario (is there a `w5`? a job 3?) is checked by
//! `Scenario::validate`.

use std::fmt;
use std::num::NonZeroU64;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One scheduled fault: when, and what.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Fault {
    /// When, in simulated ms since the start.
    pub at_ms: u64,
    /// What, with the fields of its kind.
    #[serde(flatten)]
    pub action: FaultAction,
}

/// What a fault does. `for_ms`: undo it (restart, heal, restore) this long after it
/// began.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FaultAction {
    /// The node's process dies (coordinator: its unsynced disk writes are lost, and its
    /// kernel resets every connection).
    Crash {
        /// The coordinator or a worker.
        node: NodeRef,
        /// Restart it this long after.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        for_ms: Option<u64>,
    },
    /// The node's process starts again.
    Restart {
        /// The coordinator or a worker.
        node: NodeRef,
    },
    /// Messages on the coordinator–worker link are dropped (stream messages are held
    /// until the link heals or its keepalive resets the connection).
    Partition {
        /// The worker whose link is cut.
        node: WorkerRef,
        /// Which way (default both).
        #[serde(default)]
        direction: Direction,
        /// Heal it this long after.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        for_ms: Option<u64>,
    },
    /// The link (or, without `node`, every link) works again.
    Heal {
        /// The worker whose link heals; every link without it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<WorkerRef>,
    },
    /// The link's connection resets: messages in flight are lost.
    Reset {
        /// The worker whose link resets.
        node: WorkerRef,
        /// Which end learns of it at once (default both). A reset the coordinator's
        /// end sees alone (a middlebox's RST) leaves the worker running until its next
        /// message is answered with a reset; the coordinator must not take it for the
        /// worker's death.
        #[serde(default, skip_serializing_if = "SeenBy::is_both")]
        seen_by: SeenBy,
    },
    /// The node's wall clock steps (its monotonic clock does not).
    ClockJump {
        /// The coordinator or a worker.
        node: NodeRef,
        /// The step in ms (negative: backwards).
        by_ms: i64,
    },
    /// The link's latency grows by `latency_ms` each way (a slow link).
    Slow {
        /// The worker whose link slows.
        node: WorkerRef,
        /// Extra one-way latency.
        latency_ms: u64,
        /// Restore it this long after.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        for_ms: Option<u64>,
    },
    /// The link is cut and healed every `period_ms`, for `for_ms`.
    Flap {
        /// The worker whose link flaps.
        node: WorkerRef,
        /// Between toggles.
        period_ms: NonZeroU64,
        /// How long it flaps.
        for_ms: u64,
    },
    /// The coordinator's commits (fsync) take `latency_ms`.
    DiskLatency {
        /// Always the coordinator (may be left out).
        #[serde(default)]
        node: OnCoordinator,
        /// The commit latency.
        latency_ms: u64,
        /// Restore the scenario's latency this long after.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        for_ms: Option<u64>,
    },
    /// The coordinator loses power during its next commit: the commit fails, the
    /// unsynced writes are torn or reordered (drawn from the seed) before it restarts,
    /// and its connections go silent (no reset: workers notice by keepalive, or by the
    /// reset the restarted coordinator answers their next message with).
    PowerCut {
        /// Always the coordinator (may be left out).
        #[serde(default)]
        node: OnCoordinator,
        /// Downtime after the commit it breaks (default `POWER_CUT_DOWNTIME_MS`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        for_ms: Option<u64>,
    },
    /// The coordinator's next sync (fsync) reports an error while the disk survives:
    /// the commit pipeline is poisoned, the batches applied over the failed one are
    /// dropped with what they would have sent, and the driver recovers its machine from
    /// the disk.
    SyncFailure {
        /// Always the coordinator (may be left out).
        #[serde(default)]
        node: OnCoordinator,
    },
    /// The operator drains worker `node`: it finishes what it runs and takes nothing new.
    Drain {
        /// The worker.
        node: WorkerRef,
    },
    /// The operator cancels workload job number `job` (if acknowledged by then).
    CancelJob {
        /// The workload's job number (0-based).
        job: u32,
    },
    /// The operator cancels task `task` of workload job number `job`.
    CancelTask {
        /// The workload's job number (0-based).
        job: u32,
        /// The task's index within the job.
        task: u32,
    },
    /// The worker's whole host is suspended for `for_ms` (a VM pause, SIGSTOP): it
    /// handles nothing and sends nothing, its plugin runs stand still, and its
    /// monotonic clock does not advance, so on resume it believes almost no time has
    /// passed and carries on. The classic split brain fencing tokens exist for.
    Pause {
        /// The worker.
        node: WorkerRef,
        /// How long.
        for_ms: u64,
    },
}

/// Fault kinds without their fields (`[swarm] kinds`, coverage, reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// [`FaultAction::Crash`].
    Crash,
    /// [`FaultAction::Restart`].
    Restart,
    /// [`FaultAction::Partition`].
    Partition,
    /// [`FaultAction::Heal`].
    Heal,
    /// [`FaultAction::Reset`].
    Reset,
    /// [`FaultAction::ClockJump`].
    ClockJump,
    /// [`FaultAction::Slow`].
    Slow,
    /// [`FaultAction::Flap`].
    Flap,
    /// [`FaultAction::DiskLatency`].
    DiskLatency,
    /// [`FaultAction::PowerCut`].
    PowerCut,
    /// [`FaultAction::SyncFailure`].
    SyncFailure,
    /// [`FaultAction::Drain`].
    Drain,
    /// [`FaultAction::CancelJob`].
    CancelJob,
    /// [`FaultAction::CancelTask`].
    CancelTask,
    /// [`FaultAction::Pause`].
    Pause,
}

impl Fault {
    /// The fault's kind.
    pub fn kind(&self) -> FaultKind {
        match &self.action {
            FaultAction::Crash { .. } => FaultKind::Crash,
            FaultAction::Restart { .. } => FaultKind::Restart,
            FaultAction::Partition { .. } => FaultKind::Partition,
            FaultAction::Heal { .. } => FaultKind::Heal,
            FaultAction::Reset { .. } => FaultKind::Reset,
            FaultAction::ClockJump { .. } => FaultKind::ClockJump,
            FaultAction::Slow { .. } => FaultKind::Slow,
            FaultAction::Flap { .. } => FaultKind::Flap,
            FaultAction::DiskLatency { .. } => FaultKind::DiskLatency,
            FaultAction::PowerCut { .. } => FaultKind::PowerCut,
            FaultAction::SyncFailure { .. } => FaultKind::SyncFailure,
            FaultAction::Drain { .. } => FaultKind::Drain,
            FaultAction::CancelJob { .. } => FaultKind::CancelJob,
            FaultAction::CancelTask { .. } => FaultKind::CancelTask,
            FaultAction::Pause { .. } => FaultKind::Pause,
        }
    }

    /// The node it names, if any (`heal` of every link and the cancels name none).
    pub fn node(&self) -> Option<NodeRef> {
        match &self.action {
            FaultAction::Crash { node, .. } | FaultAction::Restart { node } | FaultAction::ClockJump { node, .. } => {
                Some(*node)
            }
            FaultAction::Partition { node, .. }
            | FaultAction::Reset { node, .. }
            | FaultAction::Slow { node, .. }
            | FaultAction::Flap { node, .. }
            | FaultAction::Drain { node }
            | FaultAction::Pause { node, .. } => Some(node.into()),
            FaultAction::Heal { node } => node.map(NodeRef::from),
            FaultAction::DiskLatency { .. } | FaultAction::PowerCut { .. } | FaultAction::SyncFailure { .. } => {
                Some(NodeRef::Coordinator)
            }
            FaultAction::CancelJob { .. } | FaultAction::CancelTask { .. } => None,
        }
    }

    /// When its undoing comes, in ms after it began, for the kinds undone that way.
    pub fn for_ms(&self) -> Option<u64> {
        match &self.action {
            FaultAction::Crash { for_ms, .. }
            | FaultAction::Partition { for_ms, .. }
            | FaultAction::Slow { for_ms, .. }
            | FaultAction::DiskLatency { for_ms, .. }
            | FaultAction::PowerCut { for_ms, .. } => *for_ms,
            FaultAction::Flap { for_ms, .. } | FaultAction::Pause { for_ms, .. } => Some(*for_ms),
            _ => None,
        }
    }
}

/// Which way a partition drops messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
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

/// Which end of a connection sees its reset at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SeenBy {
    /// Both ends.
    #[default]
    Both,
    /// The worker's end only (the coordinator's learns when it next sends).
    Worker,
    /// The coordinator's end only (the worker's learns when it next sends).
    Coordinator,
}

impl SeenBy {
    fn is_both(&self) -> bool {
        *self == SeenBy::Both
    }
}

/// Which node a fault names: `coordinator` or `w1`..`wN` in files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodeRef {
    /// The coordinator.
    Coordinator,
    /// Worker index (0-based; `w1` is 0).
    Worker(usize),
}

/// A worker, for the faults that name a worker's link or host: `w1`..`wN` in files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct WorkerRef(pub usize);

/// The coordinator, for the faults only it can have: `coordinator` in files (or left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OnCoordinator;

impl From<WorkerRef> for NodeRef {
    fn from(w: WorkerRef) -> Self {
        NodeRef::Worker(w.0)
    }
}

impl From<&WorkerRef> for NodeRef {
    fn from(w: &WorkerRef) -> Self {
        NodeRef::Worker(w.0)
    }
}

impl NodeRef {
    /// Parses `coordinator` or `wN` (N from 1); how many workers there are is the
    /// scenario's to check.
    pub fn parse(name: &str) -> Option<NodeRef> {
        if name == "coordinator" {
            return Some(NodeRef::Coordinator);
        }
        let digits = name.strip_prefix('w')?;
        if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: usize = digits.parse().ok()?;
        Some(NodeRef::Worker(n - 1))
    }
}

impl fmt::Display for NodeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeRef::Coordinator => f.write_str("coordinator"),
            NodeRef::Worker(w) => write!(f, "w{}", w + 1),
        }
    }
}

impl fmt::Display for WorkerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0 + 1)
    }
}

impl Serialize for NodeRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        NodeRef::parse(&name).ok_or_else(|| D::Error::custom(format!("node {name:?}: not \"coordinator\" or w1..wN")))
    }
}

impl Serialize for WorkerRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WorkerRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        match NodeRef::parse(&name) {
            Some(NodeRef::Worker(w)) => Ok(WorkerRef(w)),
            Some(NodeRef::Coordinator) => {
                Err(D::Error::custom("node \"coordinator\": this kind names a worker (its link or host): w1..wN"))
            }
            None => Err(D::Error::custom(format!("node {name:?}: not a worker w1..wN"))),
        }
    }
}

impl Serialize for OnCoordinator {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("coordinator")
    }
}

impl<'de> Deserialize<'de> for OnCoordinator {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        if name == "coordinator" {
            Ok(OnCoordinator)
        } else {
            Err(D::Error::custom(format!("node {name:?}: this kind happens to the coordinator only")))
        }
    }
}
