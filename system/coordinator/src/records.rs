//! What the coordinator keeps durably, and where. Values are postcard-encoded (payloads
//! and result bytes are stored as they are).
//!
//! Key layout (all under `c/`, big-endian numbers so keys sort numerically):
//!
//! | key | value |
//! |---|---|
//! | `c/format` | [`FORMAT_VERSION`] of this layout (u32) |
//! | `c/counters` | [`Counters`] |
//! | `c/w/<worker id>` | [`WorkerRecord`] |
//! | `c/j/<job u64>` | [`JobRecord`], with the job's task counts by state |
//! | `c/idem/<key>` | [`JobId`] of the job submitted with that idempotency key |
//! | `c/js/<job u64><first index u32>` | [`ShapeRuns`] of the tasks appended from that index (one record per append) |
//! | `c/tp/<job u64><index u32><chunk u32>` | a task's payload, in chunks of [`CHUNK_BYTES`] (written once) |
//! | `c/ti/<job u64><index u32>` | the content ids of the blobs a task reads (`Vec<ContentId>`), only for tasks that name any (additive: no format change) |
//! | `c/t/<job u64><index u32>` | [`TaskRecord`] (written at the first state change after queued, then at every one); a result of at most [`INLINE_RESULT_BYTES_MAX`] lives here ([`TaskState::CommittedInline`]) |
//! | `c/audit/<first seq u64>` | a block of [`crate::audit::AuditEntry`]: (part of) one batch's events |
//! | `c/audit_base` | [`crate::audit::AuditBase`]: the last entry deleted by the audit retention |
//! | `c/r/<content id, 32 bytes><chunk u32>` | a committed result, in chunks of [`CHUNK_BYTES`] (see [`stored_result`]) |
//! | `c/rc/<content id, 32 bytes>` | [`ResultRefs`]: how many committed tasks name that result, and its size; the bytes go with the last |
//!
//! Payloads and results are cut into chunks so that no value in the B-tree is large: a
//! leaf holding a megabyte would be copied whole whenever a key beside it changes.
//! Small results stay in their task's record instead: content ids are random keys, and
//! a random key costs a copied B-tree page per task per commit (storing 200,000 small
//! results content-addressed took 60% of the coordinator's CPU in `make bench-compare`),
//! where a task record's key sorts beside its job's other tasks.
//!
//! Recovery reads the job records, and only for unfinished jobs their shape runs and
//! task records, in bounded pages; payloads are read when a task is leased.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use rollout_core::traits::{Inventory, KeyValue, Storage};
use rollout_core::{Attempt, ContentId, Error, FencingToken, Incarnation, JobId, Result, TaskId, WorkerId};

/// The version of this key layout; a database written with another is refused at
/// recovery, naming both. Version 3 added [`TaskState::CommittedInline`]; a version 2
/// database is read as it is and marked 3 by its first write.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest layout this rollout reads.
pub const FORMAT_VERSION_OLDEST: u32 = 2;

/// Results of at most this many bytes are kept in their task's record
/// ([`TaskState::CommittedInline`]), not content-addressed under `c/r/`.
pub const INLINE_RESULT_BYTES_MAX: usize = 1024;

pub(crate) const FORMAT: &[u8] = b"c/format";
pub(crate) const COUNTERS: &[u8] = b"c/counters";
pub(crate) const WORKER_PREFIX: &[u8] = b"c/w/";
pub(crate) const JOB_PREFIX: &[u8] = b"c/j/";
pub(crate) const IDEMPOTENCY_PREFIX: &[u8] = b"c/idem/";
pub(crate) const SHAPES_PREFIX: &[u8] = b"c/js/";
pub(crate) const PAYLOAD_PREFIX: &[u8] = b"c/tp/";
/// A task's blob inputs (only for tasks that name any).
pub(crate) const INPUTS_PREFIX: &[u8] = b"c/ti/";
pub(crate) const TASK_PREFIX: &[u8] = b"c/t/";
pub(crate) const AUDIT_PREFIX: &[u8] = b"c/audit/";
pub(crate) const AUDIT_BASE: &[u8] = b"c/audit_base";
pub(crate) const RESULT_PREFIX: &[u8] = b"c/r/";
pub(crate) const RESULT_REFS_PREFIX: &[u8] = b"c/rc/";

/// Pairs read per storage call when recovery or a report walks a prefix.
pub(crate) const SCAN_PAGE: usize = 4096;
/// Payloads and results are stored in chunks of at most this many bytes.
pub const CHUNK_BYTES: usize = 32 * 1024;

/// What the coordinator keeps about a stored result besides its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ResultRefs {
    /// Committed tasks that name it.
    pub refs: u64,
    /// Its length (0 chunks and size 0 for a result whose bytes were never given, as
    /// in the simulator).
    pub size_bytes: u64,
    /// Whether its bytes are stored.
    pub stored: bool,
}

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
    /// Sorted, without duplicates.
    pub plugins: Vec<String>,
    pub slots: u32,
    pub inventory: Inventory,
    pub state: WorkerState,
    /// Assignments sent to this incarnation (the last `seq` used).
    pub assigns_sent: u64,
    /// When it was declared failed (coordinator wall clock), for its retention.
    pub failed_at_unix_ms: Option<u64>,
}

/// How many of a job's tasks are in each state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounts {
    /// Waiting for a worker.
    pub queued: u32,
    /// Running somewhere.
    pub leased: u32,
    /// Done.
    pub committed: u32,
    /// Out of attempts.
    pub dead_lettered: u32,
    /// Cancelled.
    pub cancelled: u32,
}

impl TaskCounts {
    /// Tasks that may still run.
    pub fn live(&self) -> u32 {
        self.queued + self.leased
    }

    /// Every task counted.
    pub fn total(&self) -> u32 {
        self.queued + self.leased + self.committed + self.dead_lettered + self.cancelled
    }

    pub(crate) fn slot(&mut self, kind: StateKind) -> &mut u32 {
        match kind {
            StateKind::Queued => &mut self.queued,
            StateKind::Leased => &mut self.leased,
            StateKind::Committed => &mut self.committed,
            StateKind::DeadLettered => &mut self.dead_lettered,
            StateKind::Cancelled => &mut self.cancelled,
        }
    }

    pub(crate) fn add(&mut self, other: &TaskCounts) {
        self.queued += other.queued;
        self.leased += other.leased;
        self.committed += other.committed;
        self.dead_lettered += other.dead_lettered;
        self.cancelled += other.cancelled;
    }

    pub(crate) fn subtract(&mut self, other: &TaskCounts) {
        self.queued -= other.queued;
        self.leased -= other.leased;
        self.committed -= other.committed;
        self.dead_lettered -= other.dead_lettered;
        self.cancelled -= other.cancelled;
    }
}

/// A submitted job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct JobRecord {
    pub id: JobId,
    pub name: String,
    /// Tasks appended so far (all of them once sealed).
    pub tasks: u32,
    pub idempotency_key: Option<String>,
    /// Sealed jobs run; open ones take appends and run nothing yet.
    pub sealed: bool,
    /// Counts by state (all zero while open).
    pub counts: TaskCounts,
    /// When the last task reached a terminal state (coordinator wall clock).
    pub finished_at_unix_ms: Option<u64>,
}

/// What a task needs to be matched and assigned; its payload is stored apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskShape {
    /// The plugin to run it with.
    pub plugin: String,
    /// The method within the plugin.
    pub method: String,
    /// GPUs it needs on one host.
    pub gpus: u32,
    /// How long one attempt may run (`None`: the coordinator's default).
    pub deadline: Option<Duration>,
}

/// The shapes of consecutive tasks, run-length encoded: `(count, shape)` pairs in index
/// order. A job whose tasks all look alike costs one entry.
pub(crate) type ShapeRuns = Vec<(u32, TaskShape)>;

/// What a task asks for, as an operator submits it.
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
    /// Blobs it reads (stored under `c/ti/<task>` when there are any).
    pub inputs: Vec<ContentId>,
}

impl TaskSpec {
    pub(crate) fn shape(&self) -> TaskShape {
        TaskShape { plugin: self.plugin.clone(), method: self.method.clone(), gpus: self.gpus, deadline: self.deadline }
    }

    fn has_shape(&self, shape: &TaskShape) -> bool {
        self.plugin == shape.plugin
            && self.method == shape.method
            && self.gpus == shape.gpus
            && self.deadline == shape.deadline
    }
}

/// The run-length encoded shapes of `specs`.
pub(crate) fn shape_runs(specs: &[TaskSpec]) -> ShapeRuns {
    let mut runs: ShapeRuns = Vec::new();
    for spec in specs {
        match runs.last_mut() {
            Some((count, shape)) if spec.has_shape(shape) => *count += 1,
            _ => runs.push((1, spec.shape())),
        }
    }
    runs
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
    /// Done; the result is stored under its content id.
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
    /// Done, with a result of at most [`INLINE_RESULT_BYTES_MAX`] bytes kept here rather
    /// than under its content id (which is still the task's result). Last, so that
    /// records of layout 2 decode unchanged.
    CommittedInline {
        /// The result's content id.
        result: ContentId,
        /// The result.
        bytes: Vec<u8>,
    },
}

/// A [`TaskState`] without its data, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateKind {
    Queued,
    Leased,
    Committed,
    DeadLettered,
    Cancelled,
}

impl TaskState {
    pub(crate) fn kind(&self) -> StateKind {
        match self {
            TaskState::Queued => StateKind::Queued,
            TaskState::Leased { .. } => StateKind::Leased,
            TaskState::Committed { .. } | TaskState::CommittedInline { .. } => StateKind::Committed,
            TaskState::DeadLettered => StateKind::DeadLettered,
            TaskState::Cancelled => StateKind::Cancelled,
        }
    }

    /// Whether the task will never run again.
    pub fn is_terminal(&self) -> bool {
        self.committed_result().is_some() || matches!(self, TaskState::DeadLettered | TaskState::Cancelled)
    }

    /// The content id of the committed result, if the task is committed (either way).
    pub fn committed_result(&self) -> Option<ContentId> {
        match self {
            TaskState::Committed { result, .. } | TaskState::CommittedInline { result, .. } => Some(*result),
            _ => None,
        }
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

/// One task's state, attempts and error history, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskReport {
    /// The task.
    pub task: TaskId,
    /// Its state.
    pub state: TaskState,
    /// Leases so far.
    pub attempts: Attempt,
    /// Failed attempts' errors, oldest first.
    pub errors: Vec<String>,
}

/// A job as stored, for readers outside the machine (results, reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredJob {
    /// Its id.
    pub job: JobId,
    /// Its name.
    pub name: String,
    /// Tasks appended (all of them once sealed).
    pub tasks: u32,
    /// Whether it was sealed (runs) or is still open for appends.
    pub sealed: bool,
    /// Counts by state.
    pub counts: TaskCounts,
    /// When it finished.
    pub finished_at_unix_ms: Option<u64>,
}

/// What storage says about a job id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobLookup {
    /// The job is there.
    Found(StoredJob),
    /// It existed and was deleted: finished and past `tasks.job_retention`, or opened
    /// and never sealed within `tasks.open_job_timeout`.
    Gone,
    /// No job ever had this id.
    Unknown,
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

pub(crate) fn shapes_key(job: JobId, first: u32) -> Vec<u8> {
    [SHAPES_PREFIX, &task_suffix(TaskId::new(job, first))].concat()
}

pub(crate) fn job_shapes_prefix(job: JobId) -> Vec<u8> {
    [SHAPES_PREFIX, &job.get().to_be_bytes()].concat()
}

/// The prefix of a task's payload chunks.
pub(crate) fn payload_key(task: TaskId) -> Vec<u8> {
    [PAYLOAD_PREFIX, &task_suffix(task)].concat()
}

/// Where a task's blob inputs are (a `Vec<ContentId>`; absent when it names none).
pub(crate) fn inputs_key(task: TaskId) -> Vec<u8> {
    [INPUTS_PREFIX, &task_suffix(task)].concat()
}

/// Every blob a held task names as an input (open, active or finished jobs not yet
/// deleted): what a blob retention sweep must keep. Read a page at a time.
pub fn referenced_blobs(storage: &dyn Storage) -> Result<std::collections::BTreeSet<ContentId>> {
    let mut out = std::collections::BTreeSet::new();
    for_each_page(storage, INPUTS_PREFIX, |page| {
        for (key, bytes) in page {
            let ids: Vec<ContentId> = decode(&key, &bytes)?;
            out.extend(ids);
        }
        Ok(())
    })?;
    Ok(out)
}

/// The prefix of every inputs record of `job`.
pub(crate) fn job_inputs_prefix(job: JobId) -> Vec<u8> {
    [INPUTS_PREFIX, &job.get().to_be_bytes()].concat()
}

/// The key of chunk `n` of the value stored under `base`.
pub(crate) fn chunk_key(base: &[u8], n: u32) -> Vec<u8> {
    [base, &n.to_be_bytes()].concat()
}

/// How many chunks a value of `len` bytes takes (at least one).
pub(crate) fn chunks_of(len: usize) -> usize {
    len.div_ceil(CHUNK_BYTES).max(1)
}

/// Reassembles a chunked value from its chunk pairs (in key order), checking that the
/// chunks are numbered 0, 1, 2, ... under `base`.
pub(crate) fn join_chunks(base: &[u8], chunks: Vec<KeyValue>) -> Result<Option<Vec<u8>>> {
    if chunks.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(chunks.iter().map(|(_, v)| v.len()).sum());
    for (n, (key, bytes)) in chunks.into_iter().enumerate() {
        if key != chunk_key(base, n as u32) {
            return Err(bad_key(&key));
        }
        out.extend_from_slice(&bytes);
    }
    Ok(Some(out))
}

pub(crate) fn task_key(task: TaskId) -> Vec<u8> {
    [TASK_PREFIX, &task_suffix(task)].concat()
}

pub(crate) fn job_tasks_prefix(job: JobId) -> Vec<u8> {
    [TASK_PREFIX, &job.get().to_be_bytes()].concat()
}

/// The prefix of a result's chunks.
pub(crate) fn result_key(id: &ContentId) -> Vec<u8> {
    [RESULT_PREFIX, id.as_bytes()].concat()
}

pub(crate) fn result_refs_key(id: &ContentId) -> Vec<u8> {
    [RESULT_REFS_PREFIX, id.as_bytes()].concat()
}

/// The bytes of a committed result (given to the machine by
/// [`crate::CoordinatorInput::ResultBytes`] and stored with its commit); `None` if
/// no committed task names it (never committed, or deleted with its job). The bytes
/// read back are checked against their content id.
pub fn stored_result(storage: &dyn Storage, id: &ContentId) -> Result<Option<Vec<u8>>> {
    let Some(refs) = load::<ResultRefs>(storage, &result_refs_key(id))? else { return Ok(None) };
    if !refs.stored {
        return Ok(None);
    }
    let base = result_key(id);
    let chunks = storage.scan_page(&base, None, chunks_of(refs.size_bytes as usize))?;
    let bytes = join_chunks(&base, chunks)?.unwrap_or_default();
    if bytes.len() as u64 != refs.size_bytes || ContentId::of(&bytes) != *id {
        return Err(Error::internal(format!(
            "the stored result {} does not match its content id ({} of {} bytes read)",
            id.to_hex(),
            bytes.len(),
            refs.size_bytes
        )));
    }
    Ok(Some(bytes))
}

/// A job's record as stored, or whether the id is one that was deleted.
pub fn stored_job(storage: &dyn Storage, job: JobId) -> Result<JobLookup> {
    if let Some(record) = load::<JobRecord>(storage, &job_key(job))? {
        return Ok(JobLookup::Found(StoredJob {
            job: record.id,
            name: record.name,
            tasks: record.tasks,
            sealed: record.sealed,
            counts: record.counts,
            finished_at_unix_ms: record.finished_at_unix_ms,
        }));
    }
    let counters: Counters = load(storage, COUNTERS)?.unwrap_or_default();
    Ok(if job.get() < counters.next_job { JobLookup::Gone } else { JobLookup::Unknown })
}

/// Up to `limit` task reports of `job` from index `from` on, in index order, as
/// stored (a task without a state record is queued and was never leased). Reads
/// `limit` records at most, so a caller can page through a job of any size.
pub fn stored_task_reports(storage: &dyn Storage, job: &StoredJob, from: u32, limit: usize) -> Result<Vec<TaskReport>> {
    let end = job.tasks.min(from.saturating_add(u32::try_from(limit).unwrap_or(u32::MAX)));
    if from >= end {
        return Ok(Vec::new());
    }
    let prefix = job_tasks_prefix(job.job);
    let after = (from > 0).then(|| task_key(TaskId::new(job.job, from - 1)));
    let records = storage.scan_page(&prefix, after.as_deref(), (end - from) as usize)?;
    let mut stored = std::collections::BTreeMap::new();
    for (key, bytes) in records {
        let task = task_from_key(TASK_PREFIX, &key)?;
        if task.index < end {
            stored.insert(task.index, decode::<TaskRecord>(&key, &bytes)?);
        }
    }
    Ok((from..end)
        .map(|index| {
            let task = TaskId::new(job.job, index);
            let record = stored.remove(&index).unwrap_or_else(TaskRecord::fresh);
            TaskReport { task, state: record.state, attempts: record.attempt, errors: record.errors }
        })
        .collect())
}

/// Every task of every sealed job in storage with its state, in task order: the
/// durable truth that recovery starts from (for checkers that must not trust the
/// machine's memory). Reads in pages; meant for tests and the simulator.
pub fn durable_task_states(storage: &dyn Storage) -> Result<Vec<(TaskId, TaskState)>> {
    let mut out = Vec::new();
    for (key, bytes) in scan_all(storage, JOB_PREFIX)? {
        let job: JobRecord = decode(&key, &bytes)?;
        if !job.sealed {
            continue;
        }
        // The count a job record claims is checked against its shape records before it
        // is used (a damaged record could claim four billion tasks).
        let mut described = 0u64;
        for_each_page(storage, &job_shapes_prefix(job.id), |page| {
            for (key, bytes) in page {
                let runs: ShapeRuns = decode(&key, &bytes)?;
                described += runs.iter().map(|(n, _)| u64::from(*n)).sum::<u64>();
            }
            Ok(())
        })?;
        if described != u64::from(job.tasks) {
            return Err(Error::internal(format!(
                "{}: its record says {} tasks, its shape records describe {described}",
                job.id, job.tasks
            )));
        }
        let stored = StoredJob {
            job: job.id,
            name: job.name,
            tasks: job.tasks,
            sealed: true,
            counts: job.counts,
            finished_at_unix_ms: job.finished_at_unix_ms,
        };
        let mut from = 0;
        while from < stored.tasks {
            let page = stored_task_reports(storage, &stored, from, SCAN_PAGE)?;
            from += page.len() as u32;
            out.extend(page.into_iter().map(|r| (r.task, r.state)));
        }
    }
    Ok(out)
}

/// Every pair under `prefix`, read in pages of [`SCAN_PAGE`].
pub(crate) fn scan_all(storage: &dyn Storage, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut all = Vec::new();
    for_each_page(storage, prefix, |page| {
        all.extend(page);
        Ok(())
    })?;
    Ok(all)
}

/// Calls `f` with each page of at most [`SCAN_PAGE`] pairs under `prefix`, in key
/// order, so a caller that keeps little of each page runs in bounded memory.
pub(crate) fn for_each_page(
    storage: &dyn Storage,
    prefix: &[u8],
    mut f: impl FnMut(Vec<(Vec<u8>, Vec<u8>)>) -> Result<()>,
) -> Result<()> {
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = storage.scan_page(prefix, after.as_deref(), SCAN_PAGE)?;
        let full = page.len() == SCAN_PAGE;
        after = page.last().map(|(k, _)| k.clone());
        f(page)?;
        if !full {
            return Ok(());
        }
    }
}

/// Decodes the task id at the end of a `c/t/`, `c/tp/` or `c/js/` key.
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
