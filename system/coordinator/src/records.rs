//! What the coordinator keeps durably, and where. Values are postcard-encoded.
//!
//! Key layout (all under `c/`, big-endian numbers so keys sort numerically):
//!
//! | key | value |
//! |---|---|
//! | `c/counters` | [`Counters`] |
//! | `c/w/<worker id>` | [`WorkerRecord`] |
//! | `c/j/<job u64>` | [`JobRecord`] |
//! | `c/idem/<key>` | [`JobId`] of the job submitted with that idempotency key |
//! | `c/ts/<job u64><index u32>` | [`TaskSpec`] (written once) |
//! | `c/t/<job u64><index u32>` | [`TaskRecord`] (written at the first state change after queued, then at every one) |
//! | `c/audit/<first seq u64>` | a block of [`crate::audit::AuditEntry`]: one batch's events |
//! | `c/r/<content id, 32 bytes>` | the bytes of a small committed result (see [`stored_result`]) |

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use rollout_core::traits::{Inventory, Storage};
use rollout_core::{Attempt, ContentId, Error, FencingToken, Incarnation, JobId, Result, TaskId, WorkerId};

pub(crate) const COUNTERS: &[u8] = b"c/counters";
pub(crate) const WORKER_PREFIX: &[u8] = b"c/w/";
pub(crate) const JOB_PREFIX: &[u8] = b"c/j/";
pub(crate) const IDEMPOTENCY_PREFIX: &[u8] = b"c/idem/";
pub(crate) const TASK_SPEC_PREFIX: &[u8] = b"c/ts/";
pub(crate) const TASK_PREFIX: &[u8] = b"c/t/";
pub(crate) const AUDIT_PREFIX: &[u8] = b"c/audit/";
pub(crate) const RESULT_PREFIX: &[u8] = b"c/r/";

/// The coordinator-wide counters. Every id they hand out is never handed out again,
/// across restarts, because the counter is committed with the record that uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Counters {
    pub next_job: u64,
    pub last_token: FencingToken,
    pub last_incarnation: Incarnation,
    pub audit_seq: u64,
    pub audit_head: [u8; 32],
}

/// A worker's standing, as of its latest registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    /// Takes work.
    Active,
    /// Finishes what it runs, takes nothing new.
    Draining,
    /// Declared failed; must register again.
    Failed,
}

/// A registered worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WorkerRecord {
    pub id: WorkerId,
    pub incarnation: Incarnation,
    pub plugins: Vec<String>,
    pub slots: u32,
    pub inventory: Inventory,
    pub state: WorkerState,
    /// Assignments sent to this incarnation (the last `seq` used).
    pub assigns_sent: u64,
}

/// A submitted job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    pub id: JobId,
    pub name: String,
    pub tasks: u32,
    pub idempotency_key: Option<String>,
}

/// What a task asks for. Written once when its job is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The plugin to run it with.
    pub plugin: String,
    /// The method within the plugin.
    pub method: String,
    /// Input bytes.
    pub payload: Vec<u8>,
    /// GPUs it needs on one host.
    pub gpus: u32,
    /// How long one attempt may run (`None`: the coordinator's default).
    pub deadline: Option<Duration>,
}

/// Where a task is in its life. Every accepted task is in exactly one state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Waiting for a worker (possibly after a retry backoff).
    Queued,
    /// Leased to a worker under the task's current token.
    Leased {
        /// The lessee.
        worker: WorkerId,
        /// Its incarnation when leased.
        incarnation: Incarnation,
        /// The assignment's sequence number within that incarnation.
        seq: u64,
    },
    /// Done; the result is in the object store.
    Committed {
        /// The result's content id.
        result: ContentId,
        /// Its length.
        size_bytes: u64,
    },
    /// Out of attempts.
    DeadLettered,
    /// Cancelled by an operator.
    Cancelled,
}

impl TaskState {
    /// Whether the task will never run again.
    pub fn is_terminal(&self) -> bool {
        matches!(self, TaskState::Committed { .. } | TaskState::DeadLettered | TaskState::Cancelled)
    }
}

/// A task's mutable record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TaskRecord {
    pub state: TaskState,
    /// Leases so far.
    pub attempt: Attempt,
    /// The token of the latest lease; submits must carry it.
    pub token: Option<FencingToken>,
    /// One entry per failed attempt, oldest first.
    pub errors: Vec<String>,
}

impl TaskRecord {
    /// A task as its job's acceptance leaves it: queued, never leased.
    pub(crate) fn fresh() -> Self {
        TaskRecord { state: TaskState::Queued, attempt: Attempt(0), token: None, errors: Vec::new() }
    }
}

pub(crate) fn worker_key(id: &WorkerId) -> Vec<u8> {
    [WORKER_PREFIX, id.as_str().as_bytes()].concat()
}

pub(crate) fn job_key(job: JobId) -> Vec<u8> {
    [JOB_PREFIX, &job.get().to_be_bytes()].concat()
}

pub(crate) fn idempotency_key(key: &str) -> Vec<u8> {
    [IDEMPOTENCY_PREFIX, key.as_bytes()].concat()
}

fn task_suffix(task: TaskId) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..8].copy_from_slice(&task.job.get().to_be_bytes());
    out[8..].copy_from_slice(&task.index.to_be_bytes());
    out
}

pub(crate) fn task_spec_key(task: TaskId) -> Vec<u8> {
    [TASK_SPEC_PREFIX, &task_suffix(task)].concat()
}

pub(crate) fn task_key(task: TaskId) -> Vec<u8> {
    [TASK_PREFIX, &task_suffix(task)].concat()
}

pub(crate) fn result_key(id: &ContentId) -> Vec<u8> {
    [RESULT_PREFIX, id.as_bytes()].concat()
}

/// The bytes of a committed result stored with its commit (given to the machine by
/// [`crate::CoordinatorInput::ResultBytes`]); `None` if the result was not stored
/// there (a large one lives in the object store).
pub fn stored_result(storage: &dyn Storage, id: &ContentId) -> Result<Option<Vec<u8>>> {
    storage.get(&result_key(id))
}

/// Decodes the task id at the end of a `c/t/` or `c/ts/` key.
pub(crate) fn task_from_key(prefix: &[u8], key: &[u8]) -> Result<TaskId> {
    let suffix = key.strip_prefix(prefix).filter(|s| s.len() == 12).ok_or_else(|| bad_key(key))?;
    let job = u64::from_be_bytes(suffix[..8].try_into().map_err(|_| bad_key(key))?);
    let index = u32::from_be_bytes(suffix[8..].try_into().map_err(|_| bad_key(key))?);
    Ok(TaskId::new(JobId(job), index))
}

fn bad_key(key: &[u8]) -> Error {
    Error::internal(format!("malformed coordinator storage key {:?}", String::from_utf8_lossy(key)))
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("coordinator records always encode")
}

pub(crate) fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| {
        Error::internal(format!("cannot decode coordinator record {:?}: {e}", String::from_utf8_lossy(key)))
    })
}

pub(crate) fn load<T: DeserializeOwned>(storage: &dyn Storage, key: &[u8]) -> Result<Option<T>> {
    storage.get(key)?.map(|bytes| decode(key, &bytes)).transpose()
}
