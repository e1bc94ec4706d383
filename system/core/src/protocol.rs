//! The messages the coordinator and worker state machines exchange, independent of
//! how they travel. `rollout-transport` maps them to and from the gRPC messages of
//! `proto/transport.proto`; the simulator carries them as they are.
//!
//! Identity is not part of a message: the sender's [`WorkerId`] comes from the
//! channel (its certificate in the real transport), so a worker cannot speak for
//! another.
//!
//! Loss tolerance: every message may be lost when a connection resets. The protocol
//! recovers without timeouts on individual messages:
//! - Assignments carry a per-incarnation sequence number `seq`; heartbeats and pulls
//!   report `assigns_through` (the highest `seq` received). A lease whose assignment
//!   is at or below it but which the worker does not report as running was lost, and
//!   the coordinator re-queues the task.
//! - Pulls carry the worker's absolute number of free slots; the coordinator
//!   subtracts the assignments still in flight (`seq > assigns_through`). Re-sending a
//!   pull is harmless.
//! - Submits are re-sent until acknowledged; the coordinator answers a repeat
//!   `Duplicate` and an outdated one `Stale`.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::HealthConfig;
use crate::ids::{Attempt, ContentId, FencingToken, Incarnation, JobId, TaskId};
use crate::traits::Inventory;

/// Longest plugin, method or metric name, and longest GPU name or uuid, accepted from a
/// peer. Names are identifiers, not documents.
pub const NAME_BYTES_MAX: usize = 256;
/// Most GPUs one worker may declare.
pub const GPUS_PER_WORKER_MAX: usize = 256;
/// Finished-but-unacknowledged submits a worker may hold per slot. When its backlog
/// reaches `slots ×` this, it reports no free slots until acks arrive.
pub const UNACKED_SUBMITS_PER_SLOT: usize = 4;
/// Most tasks a heartbeat may report per slot of its worker: the runs, plus the
/// finished-but-unacknowledged ones. A beat reporting more is answered, and only this
/// many of its tasks are looked at.
pub const RUNNING_PER_SLOT_MAX: usize = 1 + UNACKED_SUBMITS_PER_SLOT;

/// The metrics workers ship (the coordinator accepts these names and no others).
pub mod metric {
    /// Counter: tasks started (one per `StartTask` output).
    pub const TASKS_STARTED: &str = "tasks_started";
    /// Counter: tasks whose outcome was a success, submitted to the coordinator.
    pub const TASKS_SUCCEEDED: &str = "tasks_succeeded";
    /// Counter: tasks that failed (including ones the plugin host cancelled on its own).
    pub const TASKS_FAILED: &str = "tasks_failed";
    /// Counter: tasks the worker cancelled (control channel or fencing) that have stopped.
    pub const TASKS_CANCELLED: &str = "tasks_cancelled";
    /// Counter: sidecar processes started again (after a crash, or a kill of a call that
    /// would not stop), as the plugin host counts them.
    pub const PLUGIN_RESTARTS: &str = "plugin_restarts";
    /// Histogram: task latency from `StartTask` to `TaskFinished`, in microseconds, of
    /// tasks that succeeded or failed, in HdrHistogram V2 encoding (not deflated).
    pub const TASK_LATENCY_US: &str = "task_latency_us";
    /// The plugin name metrics are filed under when an assignment names a plugin the
    /// worker did not advertise.
    pub const UNKNOWN_PLUGIN: &str = "_unknown";
    /// Every counter name.
    pub const COUNTERS: [&str; 5] = [TASKS_STARTED, TASKS_SUCCEEDED, TASKS_FAILED, TASKS_CANCELLED, PLUGIN_RESTARTS];
    /// Every histogram name.
    pub const HISTOGRAMS: [&str; 1] = [TASK_LATENCY_US];
    /// Significant digits of every shipped histogram (0.1% relative error).
    pub const HISTOGRAM_SIGNIFICANT_DIGITS: u8 = 3;
    /// The largest value a shipped histogram tracks (24 h in microseconds); longer
    /// latencies are recorded as this.
    pub const HISTOGRAM_VALUE_MAX: u64 = 24 * 60 * 60 * 1_000_000;
}

/// What a coordinator requires of its workers, sent with every [`ToWorker::Registered`].
///
/// Its failure detection is sound only if its workers beat and self-fence on its
/// schedule (`worker_self_fence_timeout < coordinator_failure_timeout`, checked where
/// the coordinator's config is validated), so a worker adopts these for the session,
/// whatever its own config says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerTerms {
    /// How often to beat; `due_at = wall_now + 2 × heartbeat_interval`.
    pub heartbeat_interval: Duration,
    /// Self-fence after this long without an acknowledged beat (monotonic clock).
    pub worker_self_fence_timeout: Duration,
    /// The wall-clock disagreement the coordinator tolerates (for the worker's logs).
    pub clock_skew_budget: Duration,
    /// A larger result is submitted as a failure naming the limit.
    pub max_result_bytes: u64,
}

impl WorkerTerms {
    /// The terms of `health` and a result limit.
    pub fn new(health: &HealthConfig, max_result_bytes: u64) -> Self {
        WorkerTerms {
            heartbeat_interval: health.heartbeat_interval,
            worker_self_fence_timeout: health.worker_self_fence_timeout,
            clock_skew_budget: health.clock_skew_budget,
            max_result_bytes,
        }
    }
}

/// What a worker sends the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToCoordinator {
    /// Announces the worker; answered with [`ToWorker::Registered`] or [`ToWorker::RegisterRejected`].
    Register(Register),
    /// Proves liveness and announces the next deadline.
    Heartbeat(Heartbeat),
    /// Asks for work.
    Pull(Pull),
    /// Reports a task's outcome under its lease's fencing token.
    Submit(Submit),
}

impl ToCoordinator {
    /// The message's kind in snake case (`register`, `heartbeat`, `pull`, `submit`),
    /// for logs, traces and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ToCoordinator::Register(_) => "register",
            ToCoordinator::Heartbeat(_) => "heartbeat",
            ToCoordinator::Pull(_) => "pull",
            ToCoordinator::Submit(_) => "submit",
        }
    }

    /// Which of the worker's channels carries it.
    pub fn channel(&self) -> Channel {
        match self {
            ToCoordinator::Register(_) | ToCoordinator::Heartbeat(_) => Channel::Unary,
            ToCoordinator::Pull(_) | ToCoordinator::Submit(_) => Channel::Work,
        }
    }

    /// For a Work-stream message, an upper bound on the bytes it adds to a Work frame
    /// (its protobuf entry: tag, length and body, with every varint at its widest and
    /// a result of `size_bytes`), at most [`WIRE_SIZE_SLACK`] above the exact size; the
    /// transport's tests hold the estimate to both. `None` for unary calls.
    pub fn work_entry_bytes(&self) -> Option<usize> {
        match self {
            ToCoordinator::Pull(_) => Some(24),
            ToCoordinator::Submit(s) => Some(match &s.outcome {
                Outcome::Succeeded { size_bytes, .. } => 48 + usize::try_from(*size_bytes).unwrap_or(usize::MAX),
                Outcome::Failed { message } => 64 + message.len(),
            }),
            ToCoordinator::Register(_) | ToCoordinator::Heartbeat(_) => None,
        }
    }
}

/// How far [`ToCoordinator::work_entry_bytes`] and [`ToWorker::work_entry_bytes`] may
/// overestimate a message's encoded size.
pub const WIRE_SIZE_SLACK: usize = 96;

/// The channel a message travels on between a worker and the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Its own call (Register, Heartbeat and their answers): may overtake stream
    /// messages, and may be lost or retried on its own.
    Unary,
    /// The Work stream, in order: pulls and submits up; assignments and submit acks
    /// down, in frames of at most `limits.max_message_bytes`.
    Work,
    /// The Control stream, in order: commands down.
    Control,
}

/// A worker's registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// The worker's protocol version; must equal the coordinator's.
    pub protocol_version: u32,
    /// Plugins the worker can run, by name.
    pub plugins: Vec<String>,
    /// How many tasks it runs at once.
    pub slots: u32,
    /// Its CPUs, memory and GPUs.
    pub inventory: Inventory,
    /// Drawn once per worker process: a Register from the same process as the worker's
    /// current incarnation is told apart from one by a restarted process.
    pub boot: u64,
    /// The highest incarnation this process has adopted (`None` before its first). A
    /// Register naming an incarnation older than the worker's current one was sent
    /// before the process adopted it: a retry or a late duplicate, answered with the
    /// current incarnation, ending nothing.
    pub adopted: Option<Incarnation>,
}

/// One heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The incarnation the worker believes it is.
    pub incarnation: Incarnation,
    /// Per-incarnation sequence number, echoed in the acknowledgement.
    pub beat_seq: u64,
    /// `wall_now + 2 × heartbeat_interval` on the worker's clock.
    pub due_at: SystemTime,
    /// Tasks the worker runs, or has finished but not had acknowledged.
    pub running: Vec<(TaskId, FencingToken)>,
    /// The highest assignment `seq` received in this incarnation (0: none).
    pub assigns_through: u64,
    /// Metric deltas since the last shipment, if any are due.
    pub metrics: Option<MetricDeltas>,
}

/// A request for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pull {
    /// The incarnation the worker believes it is.
    pub incarnation: Incarnation,
    /// Free slots right now, counting every assignment received.
    pub free_slots: u32,
    /// The highest assignment `seq` received in this incarnation.
    pub assigns_through: u64,
}

/// A task's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submit {
    /// The incarnation the worker acted under (the transport takes it from the Work
    /// stream the submit came on). The coordinator refuses a submit of an incarnation
    /// that is not the worker's current one as stale, whatever its token.
    pub incarnation: Incarnation,
    /// The task.
    pub task: TaskId,
    /// The fencing token of the lease the task ran under.
    pub token: FencingToken,
    /// What happened.
    pub outcome: Outcome,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The task produced a result, already stored in the object store under `result`.
    Succeeded {
        /// The result's content id.
        result: ContentId,
        /// Its length.
        size_bytes: u64,
    },
    /// The attempt failed; the task may be retried.
    Failed {
        /// What went wrong (bounded by the sender).
        message: String,
    },
}

/// Counter and histogram deltas of one worker, per plugin.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MetricDeltas {
    /// `(counter name, plugin, delta)`.
    pub counters: Vec<(String, String, u64)>,
    /// `(histogram name, plugin, HdrHistogram V2 bytes)`.
    pub histograms: Vec<(String, String, Vec<u8>)>,
}

/// What the coordinator sends a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Registration accepted.
    Registered {
        /// The worker's new incarnation.
        incarnation: Incarnation,
        /// The coordinator's terms, which the worker follows from now on.
        terms: WorkerTerms,
        /// The highest assignment `seq` of this incarnation sent before this answer (0
        /// for a new one). A worker adopting the answer counts them as received: one
        /// that has not arrived is lost, and the worker's first beat says so.
        assigns_sent: u64,
    },
    /// Registration refused; retrying the same registration will not help.
    RegisterRejected {
        /// Why, naming the field or versions at fault.
        reason: String,
    },
    /// A heartbeat was recorded (or, with `reregister`, not).
    HeartbeatAck {
        /// The incarnation the beat named.
        incarnation: Incarnation,
        /// The beat acknowledged.
        beat_seq: u64,
        /// The coordinator no longer knows that incarnation: stop everything and register again.
        reregister: bool,
    },
    /// A task to run.
    Assign(Assignment),
    /// The verdict on a submit.
    SubmitAck {
        /// The task.
        task: TaskId,
        /// The token submitted.
        token: FencingToken,
        /// Accepted, duplicate or stale.
        verdict: SubmitVerdict,
    },
    /// A command from the control channel.
    Control(Control),
}

impl ToWorker {
    /// The message's kind in snake case (`registered`, `heartbeat_ack`, `assign`, ...),
    /// for logs, traces and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            ToWorker::Registered { .. } => "registered",
            ToWorker::RegisterRejected { .. } => "register_rejected",
            ToWorker::HeartbeatAck { .. } => "heartbeat_ack",
            ToWorker::Assign(_) => "assign",
            ToWorker::SubmitAck { .. } => "submit_ack",
            ToWorker::Control(_) => "control",
        }
    }

    /// Which of the worker's channels carries it.
    pub fn channel(&self) -> Channel {
        match self {
            ToWorker::Registered { .. } | ToWorker::RegisterRejected { .. } | ToWorker::HeartbeatAck { .. } => {
                Channel::Unary
            }
            ToWorker::Assign(_) | ToWorker::SubmitAck { .. } => Channel::Work,
            ToWorker::Control(_) => Channel::Control,
        }
    }

    /// For a Work-stream message, an upper bound on the bytes it adds to a Work frame,
    /// at most [`WIRE_SIZE_SLACK`] above the exact size (see
    /// [`ToCoordinator::work_entry_bytes`]). `None` for the other channels.
    pub fn work_entry_bytes(&self) -> Option<usize> {
        match self {
            ToWorker::Assign(a) => Some(96 + a.plugin.len() + a.method.len() + a.payload.len() + 34 * a.inputs.len()),
            ToWorker::SubmitAck { .. } => Some(48),
            _ => None,
        }
    }
}

/// A lease handed to a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The incarnation this assignment is for.
    pub incarnation: Incarnation,
    /// Per-incarnation sequence number, from 1.
    pub seq: u64,
    /// The task.
    pub task: TaskId,
    /// The lease's fencing token.
    pub token: FencingToken,
    /// Which lease of the task this is.
    pub attempt: Attempt,
    /// Plugin to run.
    pub plugin: String,
    /// Method within the plugin.
    pub method: String,
    /// Input bytes.
    pub payload: Vec<u8>,
    /// How long the attempt may run.
    pub deadline: Duration,
    /// Blobs the task reads, by content id (the worker fetches them before the call).
    #[serde(default)]
    pub inputs: Vec<crate::ContentId>,
}

/// The coordinator's verdict on a submit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubmitVerdict {
    /// Recorded under the task's current token.
    Accepted,
    /// Already recorded; nothing changed.
    Duplicate,
    /// Not the task's current token (or no such lease); nothing changed.
    Stale,
    /// The lease is over, but the outcome broke a limit (a result over
    /// `limits.max_result_bytes`): it was recorded as a failed attempt (counted against
    /// `tasks.max_attempts`), not as the task's result.
    Refused,
}

/// Control-channel commands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// Finish running tasks, take no new ones.
    Drain,
    /// Stop one task (only the run under this token).
    CancelTask {
        /// The task.
        task: TaskId,
        /// The lease to stop.
        token: FencingToken,
    },
    /// Stop every task of a job.
    CancelJob {
        /// The job.
        job: JobId,
    },
    /// Beat now, reporting everything that runs.
    Snapshot,
}
