//! The coordinator state machine: its types, its batches and its recovery. The rules
//! live in the sibling modules (`workers`, `jobs`, `dispatch`, `submits`, `status`),
//! each an `impl Coordinator` block over the state defined here.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rollout_core::config::{Config, HealthConfig, LimitsConfig, TasksConfig};
use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{Submit, ToCoordinator, ToWorker, WorkerTerms};
use rollout_core::time::unix_millis;
use rollout_core::traits::{Storage, StorageTxn};
use rollout_core::{Error, Incarnation, JobId, Mono, Now, Result, TaskId, WorkerId};
use serde::Serialize;

use crate::audit::{AUDIT_BLOCK_ENTRIES_MAX, AuditEntry, audit_key};
use crate::metrics::ClusterMetrics;
use crate::records::*;

/// Operator requests are matched to their replies by this id (chosen by the driver).
pub type RequestId = u64;

/// The coordinator's settings, taken from the effective [`Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorSettings {
    /// Heartbeats and failure detection.
    pub health: HealthConfig,
    /// Retries and retention.
    pub tasks: TasksConfig,
    /// Bounds.
    pub limits: LimitsConfig,
    /// An attempt's deadline when its task names none.
    pub default_task_deadline: Duration,
    /// Error messages longer than this are truncated before they are stored.
    pub max_error_message_bytes: usize,
    /// Deliberately planted bugs (test builds only; see [`CoordinatorSettings::plant_bug`]).
    #[cfg(feature = "planted-bugs")]
    pub planted: PlantedBugs,
}

/// Bugs a test may plant to prove that the simulator finds and shrinks them.
#[cfg(feature = "planted-bugs")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlantedBugs {
    /// `skip_fencing_check`: a submit for a leased task is accepted whatever its token
    /// and sender, so a stale lease holder can commit.
    pub skip_fencing_check: bool,
}

/// The names [`CoordinatorSettings::plant_bug`] knows.
pub const PLANTED_BUGS: &[&str] = &["skip_fencing_check"];

/// Payload bytes of the assignments one batch may hand out. The rest of the workers'
/// credits are served by the next batch (the machine asks for a tick at once), so a
/// batch's outputs stay bounded whatever the credits and payload sizes.
pub const ASSIGN_BYTES_PER_BATCH_MAX: u64 = 64 << 20;
/// Tasks of expired or abandoned jobs deleted per batch (so a huge job's deletion never
/// stalls the commit path for long).
pub const DELETIONS_PER_BATCH_MAX: u32 = 4096;
/// Audit blocks deleted per batch by the audit retention.
pub const AUDIT_BLOCKS_PRUNED_PER_BATCH: usize = 64;
/// A worker is told about the same trouble (clock offset, refused metrics) at most this
/// often.
pub const NOTICE_INTERVAL: Duration = Duration::from_secs(60);

impl CoordinatorSettings {
    /// The settings of a validated config.
    pub fn from_config(config: &Config) -> Self {
        CoordinatorSettings {
            health: config.health,
            tasks: config.tasks,
            limits: config.limits,
            default_task_deadline: Duration::from_secs(600),
            max_error_message_bytes: 4096,
            #[cfg(feature = "planted-bugs")]
            planted: PlantedBugs::default(),
        }
    }

    /// What this coordinator requires of its workers (sent with every registration).
    pub fn worker_terms(&self) -> WorkerTerms {
        WorkerTerms::new(&self.health, u64::from(self.limits.max_result_bytes))
    }

    /// Switches on the planted bug `name` (one of [`PLANTED_BUGS`]). Only a build with
    /// the `planted-bugs` feature has them; any other build answers with an error that
    /// says so, so no shipped binary can run a planted bug.
    pub fn plant_bug(&mut self, name: &str) -> std::result::Result<(), String> {
        if !PLANTED_BUGS.contains(&name) {
            return Err(format!("unknown planted bug {name:?} (known: {})", PLANTED_BUGS.join(", ")));
        }
        #[cfg(feature = "planted-bugs")]
        {
            self.planted.skip_fencing_check = true;
            Ok(())
        }
        #[cfg(not(feature = "planted-bugs"))]
        Err(format!(
            "planted bug {name:?} needs a build with the `planted-bugs` feature of rollout-coordinator \
             (e.g. cargo run -p sim --features planted-bugs)"
        ))
    }
}

/// A job as an operator submits it in one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSubmission {
    /// A label for humans.
    pub name: String,
    /// The tasks, in index order.
    pub tasks: Vec<TaskSpec>,
    /// Resubmitting with the same key returns the existing job.
    pub idempotency_key: Option<String>,
}

/// Everything that can happen to a coordinator, besides time passing (which
/// [`Coordinator::handle_timeout`] and every batch take care of).
///
/// Words: a *Submit* is always a worker's report of one task's outcome; an operator's
/// job always says *job* ([`CoordinatorInput::SubmitJob`], [`JobSubmission`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorInput {
    /// A message from a worker whose identity the transport has authenticated. A
    /// [`ToCoordinator::Submit`] given this way is a [`CoordinatorInput::Submit`]
    /// without inline bytes (see [`CoordinatorInput::from_worker`]).
    FromWorker {
        /// The sender (its certificate's name).
        worker: WorkerId,
        /// What it sent.
        message: ToCoordinator,
    },
    /// A worker's report of one task's outcome, judged by the fencing rule. With
    /// `inline_result`, the bytes of a successful result as the wire carried them: they
    /// are written in the batch's transaction if (and only if) this submit commits the
    /// result, so a committed result is durable exactly when its commit is (one fsync
    /// for both), and nothing is stored for a submit that is stale or over the limit.
    /// Bytes that are not the outcome's content id are not stored (the transport
    /// computes the id from the bytes). Without them (a simulation, which carries ids
    /// only) the commit names the result and stores no bytes.
    Submit {
        /// The sender (its certificate's name).
        worker: WorkerId,
        /// The report.
        submit: Submit,
        /// The result's bytes, for a success that carried them.
        inline_result: Option<Vec<u8>>,
    },
    /// Operator: submit a whole job at once. Acknowledged only after it is durable.
    SubmitJob {
        /// Matches the reply.
        request: RequestId,
        /// The job.
        job: JobSubmission,
    },
    /// Operator: open a job for streamed submission (answered [`OperatorReply::JobOpened`]).
    /// With an idempotency key an existing job of that key is answered instead, with
    /// how many tasks it has, so an interrupted submission resumes where it stopped.
    OpenJob {
        /// Matches the reply.
        request: RequestId,
        /// A label for humans.
        name: String,
        /// The job's key (e.g. a hash of the input).
        idempotency_key: Option<String>,
    },
    /// Operator: append tasks to an open job, from index `first_index`. Tasks the job
    /// already has (a repeated append) are skipped, so appends are idempotent; a gap
    /// is refused.
    AppendTasks {
        /// Matches the reply.
        request: RequestId,
        /// The open job.
        job: JobId,
        /// Index of the first task given.
        first_index: u32,
        /// The tasks.
        tasks: Vec<TaskSpec>,
    },
    /// Operator: seal an open job holding exactly `tasks` tasks; from then on its tasks
    /// run. Answered [`OperatorReply::JobAccepted`] (also when it was sealed already).
    SealJob {
        /// Matches the reply.
        request: RequestId,
        /// The open job.
        job: JobId,
        /// How many tasks the operator appended in all.
        tasks: u32,
    },
    /// Operator: cancel every unfinished task of a job.
    CancelJob {
        /// Matches the reply.
        request: RequestId,
        /// The job.
        job: JobId,
    },
    /// Operator: cancel one task.
    CancelTask {
        /// Matches the reply.
        request: RequestId,
        /// The task.
        task: TaskId,
    },
    /// Operator: drain a worker.
    Drain {
        /// Matches the reply.
        request: RequestId,
        /// The worker.
        worker: WorkerId,
    },
    /// The transport saw the Work stream of `incarnation` closed from the worker's end:
    /// its process ended the stream (which a worker does only once the incarnation's
    /// runs stopped), or its kernel closed the connection (FIN: the process is gone).
    /// Either way that incarnation runs nothing more, so it ends now and its tasks are
    /// leased again at once. A connection that was reset (RST: a middlebox may have
    /// sent it while the worker still runs) or went silent is not this input; the
    /// deadline rule covers it.
    WorkClosed {
        /// The worker (its certificate's name).
        worker: WorkerId,
        /// The incarnation the stream was opened for.
        incarnation: Incarnation,
    },
}

impl CoordinatorInput {
    /// A worker's message as the machine takes it: a Submit (without inline bytes) as
    /// [`CoordinatorInput::Submit`], anything else as [`CoordinatorInput::FromWorker`].
    pub fn from_worker(worker: WorkerId, message: ToCoordinator) -> Self {
        match message {
            ToCoordinator::Submit(submit) => CoordinatorInput::Submit { worker, submit, inline_result: None },
            message => CoordinatorInput::FromWorker { worker, message },
        }
    }
}

/// What the coordinator asks its driver to do. Released only after the batch that
/// produced them is committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorOutput {
    /// Deliver a message to a worker.
    Send {
        /// The recipient.
        to: WorkerId,
        /// The message.
        message: ToWorker,
    },
    /// Answer an operator request.
    Reply {
        /// The request answered.
        request: RequestId,
        /// The answer.
        reply: OperatorReply,
    },
    /// A history event (already in the audit log); the driver stamps node, seq and time.
    Event(HistoryEvent),
    /// Something an operator should hear about (the driver logs it); changes nothing.
    Notice(Notice),
}

/// What the coordinator tells its operators through the logs: misconfigured or hostile
/// peers, and data it deleted. Each kind is rate-limited per worker
/// ([`NOTICE_INTERVAL`]), so a peer cannot flood the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A worker's wall clock is off the coordinator's by more than `clock_skew_budget`
    /// (as its beat's `due_at` shows); the deadline kept for it moved by the budget only.
    ClockOffset {
        /// The worker.
        worker: WorkerId,
        /// Its clock minus the coordinator's, in ms.
        offset_ms: i64,
        /// `health.clock_skew_budget`, in ms.
        budget_ms: u64,
    },
    /// Some of a beat's metric deltas were dropped.
    MetricsRefused {
        /// The worker.
        worker: WorkerId,
        /// Series dropped from this beat.
        dropped: u32,
        /// Why (the first reason seen).
        reason: String,
    },
    /// A beat reported more tasks than its worker's slots allow; only the first were
    /// looked at.
    BeatTruncated {
        /// The worker.
        worker: WorkerId,
        /// Tasks the beat reported.
        reported: usize,
        /// Tasks looked at.
        kept: usize,
    },
    /// An open job was not sealed within `tasks.open_job_timeout`; it was deleted.
    JobAbandoned {
        /// The job.
        job: JobId,
        /// Tasks it had.
        tasks: u32,
    },
    /// A failed worker's record was deleted after `health.failed_worker_retention`.
    WorkerForgotten {
        /// The worker.
        worker: WorkerId,
    },
}

/// The answer to an operator request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorReply {
    /// The job is durably queued.
    JobAccepted {
        /// Its id.
        job: JobId,
        /// Its task count.
        tasks: u32,
        /// True when the idempotency key matched an earlier job (nothing new was queued).
        existing: bool,
    },
    /// A job is open for appends.
    JobOpened {
        /// Its id.
        job: JobId,
        /// Tasks it holds so far (0 for a new job).
        tasks: u32,
        /// Whether it was sealed already (an earlier submission under the same key finished).
        sealed: bool,
        /// True when the idempotency key matched an earlier job.
        existing: bool,
    },
    /// Tasks were appended.
    TasksAppended {
        /// The job.
        job: JobId,
        /// Tasks it holds now.
        tasks: u32,
    },
    /// Tasks cancelled by the request.
    Cancelled {
        /// How many changed state.
        tasks: u32,
    },
    /// The worker was told to drain.
    Draining,
    /// The request was refused; nothing changed.
    Rejected(Error),
}

#[derive(Debug)]
pub(crate) struct WorkerEntry {
    pub record: WorkerRecord,
    /// The deadline kept for it, on the coordinator's monotonic clock.
    pub deadline: Mono,
    /// The same deadline on the coordinator's wall clock (as of its last beat).
    pub due_at: SystemTime,
    pub last_beat: Option<SystemTime>,
    /// Its clock minus the coordinator's, from its last beat (ms).
    pub clock_offset_ms: Option<i64>,
    pub clock_noticed_at: Option<Mono>,
    pub metrics_merged_at: Option<Mono>,
    pub metrics_noticed_at: Option<Mono>,
    pub leases: BTreeSet<TaskId>,
    pub credits: u32,
    pub gpus_in_use: u32,
    /// The `boot` of the process that registered this incarnation (memory only: after a
    /// restart every Register is a new registration).
    pub boot: Option<u64>,
}

impl WorkerEntry {
    /// A worker as `record` says, with a deadline (monotonic, and on the wall clock),
    /// nothing leased and no credits.
    pub(crate) fn new(record: WorkerRecord, deadline: Mono, due_at: SystemTime, last_beat: Option<SystemTime>) -> Self {
        WorkerEntry {
            record,
            deadline,
            due_at,
            last_beat,
            clock_offset_ms: None,
            clock_noticed_at: None,
            metrics_merged_at: None,
            metrics_noticed_at: None,
            leases: BTreeSet::new(),
            credits: 0,
            gpus_in_use: 0,
            boot: None,
        }
    }

    pub(crate) fn offers(&self, plugin: &str) -> bool {
        self.record.plugins.binary_search_by(|p| p.as_str().cmp(plugin)).is_ok()
    }
}

/// A job in memory: its record, and the shapes of its tasks (run-length: the shape of
/// task `i` is that of the first run whose end is above `i`).
#[derive(Debug)]
pub(crate) struct JobEntry {
    pub record: JobRecord,
    pub shapes: Vec<(u32, Arc<TaskShape>)>,
    /// When it was opened (or recovered), for `tasks.open_job_timeout`.
    pub opened_at: Mono,
    /// Whether any of its tasks names blob inputs (then a lease reads `c/ti/`).
    pub has_inputs: bool,
}

impl JobEntry {
    pub(crate) fn shape(&self, index: u32) -> Option<&Arc<TaskShape>> {
        let at = self.shapes.partition_point(|(end, _)| *end <= index);
        self.shapes.get(at).map(|(_, shape)| shape)
    }

    /// Appends the shapes of tasks `self.record.tasks ..` (the caller then raises the count).
    pub(crate) fn extend_shapes(&mut self, runs: ShapeRuns) {
        let mut end = self.record.tasks;
        for (count, shape) in runs {
            end += count;
            match self.shapes.last_mut() {
                Some((last_end, last)) if **last == shape => *last_end = end,
                _ => self.shapes.push((end, Arc::new(shape))),
            }
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.record.sealed && self.record.counts.live() == 0
    }
}

/// Ready tasks are grouped by what they need, so matching a worker looks at a few
/// queues rather than every task.
pub(crate) type ReadyKey = (String, u32);

/// A job whose tasks are being deleted (expired or abandoned), batch by batch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deletion {
    pub job: JobId,
    /// Tasks it has.
    pub tasks: u32,
    /// Tasks below this index are gone.
    pub next_index: u32,
    /// Expired after finishing (recorded as `job_expired`), or abandoned open.
    pub expired: bool,
}

/// The coordinator: registry, health, job queue, leases, fencing, audit, metrics.
///
/// Contract for drivers:
/// - Construct with [`Coordinator::recover`] at every start (it is also the restart).
/// - Feed inputs with [`Coordinator::handle_batch`] (or [`Coordinator::handle`]); the
///   batch's durable changes are committed in one storage transaction before the
///   call returns, and only then are its outputs appended to `out`.
/// - Call [`Coordinator::handle_timeout`] at or after [`Coordinator::poll_timeout`]
///   (quinn-style; early or extra calls are harmless). A batch given at or after that
///   time runs the due timers too, after its inputs, so a busy driver need not.
/// - If a batch returns an error, the in-memory state may be ahead of storage: the
///   machine refuses further input, and the driver must recover a new one.
///
/// Memory holds what is live: workers (failed ones for `health.failed_worker_retention`),
/// jobs within `tasks.job_retention` (a record each), and the queued and leased tasks
/// of unfinished jobs (a never-leased queued task costs a map entry, not a record);
/// payloads stay in storage until their task is leased, results until they are read.
pub struct Coordinator {
    pub(crate) storage: Arc<dyn Storage>,
    pub(crate) settings: CoordinatorSettings,
    pub(crate) counters: Counters,
    /// The last incarnation handed out before this coordinator was recovered: workers
    /// up to it registered with an earlier run.
    pub(crate) incarnations_before_recovery: Incarnation,
    pub(crate) workers: BTreeMap<WorkerId, WorkerEntry>,
    /// Workers with credits, by each plugin they offer (dispatch looks only here).
    pub(crate) hungry: BTreeMap<String, BTreeSet<WorkerId>>,
    pub(crate) jobs: BTreeMap<JobId, JobEntry>,
    /// Sealed jobs with tasks that may still run.
    pub(crate) active_jobs: BTreeSet<JobId>,
    /// Jobs open for appends, by when they were opened.
    pub(crate) open_jobs: BTreeSet<(Mono, JobId)>,
    /// Finished jobs by finish time (wall ms), oldest first.
    pub(crate) finished_jobs: BTreeSet<(u64, JobId)>,
    /// Counts over every job in memory.
    pub(crate) totals: TaskCounts,
    /// The queued and leased tasks of sealed jobs. `None`: queued and never leased
    /// (its record is [`TaskRecord::fresh`]).
    pub(crate) tasks: BTreeMap<TaskId, Option<Box<TaskRecord>>>,
    pub(crate) ready: BTreeMap<ReadyKey, VecDeque<(u64, TaskId)>>,
    pub(crate) ready_seq: u64,
    pub(crate) delayed: BTreeSet<(Mono, TaskId)>,
    pub(crate) next_scan: Mono,
    pub(crate) metrics: ClusterMetrics,
    /// Jobs being deleted, oldest first.
    pub(crate) deletions: VecDeque<Deletion>,
    pub(crate) dirty_workers: BTreeSet<WorkerId>,
    pub(crate) dirty_tasks: BTreeSet<TaskId>,
    pub(crate) dirty_jobs: BTreeSet<JobId>,
    /// The audit entries the current batch recorded (stored as one block).
    pub(crate) audit_block: Vec<AuditEntry>,
    /// Payload bytes of the assignments of the current batch.
    pub(crate) batch_assign_bytes: u64,
    /// Tasks became ready (or capacity appeared) in the current input: dispatch.
    pub(crate) ready_changed: bool,
    /// Work left for the next tick: dispatch cut short by [`ASSIGN_BYTES_PER_BATCH_MAX`],
    /// or a deletion in progress.
    pub(crate) more_work: bool,
    pub(crate) counters_dirty: bool,
    /// No `c/format` yet (a new database): written with the first batch that writes.
    pub(crate) format_unwritten: bool,
    pub(crate) poisoned: Option<String>,
    pub(crate) last_mono: Mono,
    /// The wall clock of the batch being applied (ms), for the records it stamps.
    pub(crate) now_wall_ms: u64,
    /// When the oldest kept audit block is due for deletion (wall ms); `None`: look.
    pub(crate) audit_prune_at: Option<u64>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("workers", &self.workers.len())
            .field("jobs", &self.jobs.len())
            .field("live_tasks", &self.tasks.len())
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// Writes of one batch, and its outputs held back until commit.
pub(crate) struct Batch<'s> {
    storage: &'s dyn Storage,
    txn: Option<Box<dyn StorageTxn + 's>>,
    pub outputs: Vec<CoordinatorOutput>,
    pub wall_unix_ms: u64,
}

impl<'s> Batch<'s> {
    pub(crate) fn new(storage: &'s dyn Storage, now: Now) -> Self {
        Batch { storage, txn: None, outputs: Vec::new(), wall_unix_ms: unix_millis(now.wall) }
    }

    pub(crate) fn txn(&mut self) -> Result<&mut (dyn StorageTxn + 's)> {
        if self.txn.is_none() {
            self.txn = Some(self.storage.begin_write()?);
        }
        Ok(self.txn.as_deref_mut().expect("just opened"))
    }

    pub(crate) fn put<T: Serialize>(&mut self, key: &[u8], value: &T) -> Result<()> {
        let bytes = encode(value);
        self.txn()?.put(key, &bytes)
    }

    pub(crate) fn delete(&mut self, key: &[u8]) -> Result<bool> {
        self.txn()?.delete(key)
    }

    /// Stores `bytes` under `base` in chunks of [`CHUNK_BYTES`].
    pub(crate) fn put_chunked(&mut self, base: &[u8], bytes: &[u8]) -> Result<()> {
        let txn = self.txn()?;
        if bytes.is_empty() {
            return txn.put(&chunk_key(base, 0), &[]);
        }
        for (n, chunk) in bytes.chunks(CHUNK_BYTES).enumerate() {
            txn.put(&chunk_key(base, n as u32), chunk)?;
        }
        Ok(())
    }

    /// The value stored under `base` by [`Batch::put_chunked`], if any.
    pub(crate) fn get_chunked(&self, base: &[u8]) -> Result<Option<Vec<u8>>> {
        // Every chunk but the last is full, and chunked values are written once: a
        // short first chunk is the whole value, found with one lookup instead of a
        // range scan (every lease reads its task's payload, most of them small).
        let first = chunk_key(base, 0);
        let chunk0 = match &self.txn {
            Some(txn) => txn.get(&first)?,
            None => self.storage.get(&first)?,
        };
        match chunk0 {
            None => return Ok(None),
            Some(bytes) if bytes.len() < CHUNK_BYTES => return Ok(Some(bytes)),
            Some(_) => {}
        }
        let chunks = match &self.txn {
            Some(txn) => txn.scan(base)?,
            None => self.storage.scan(base)?,
        };
        join_chunks(base, chunks)
    }

    /// Deletes every chunk stored under `base`.
    pub(crate) fn delete_chunked(&mut self, base: &[u8]) -> Result<()> {
        let txn = self.txn()?;
        for (key, _) in txn.scan(base)? {
            txn.delete(&key)?;
        }
        Ok(())
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match &self.txn {
            Some(txn) => txn.get(key),
            None => self.storage.get(key),
        }
    }

    pub(crate) fn load<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>> {
        self.get(key)?.map(|bytes| decode(key, &bytes)).transpose()
    }

    pub(crate) fn send(&mut self, to: &WorkerId, message: ToWorker) {
        self.outputs.push(CoordinatorOutput::Send { to: to.clone(), message });
    }

    pub(crate) fn reply(&mut self, request: RequestId, reply: OperatorReply) {
        self.outputs.push(CoordinatorOutput::Reply { request, reply });
    }

    pub(crate) fn notice(&mut self, notice: Notice) {
        self.outputs.push(CoordinatorOutput::Notice(notice));
    }

    /// Commits (when anything was written) and hands back the outputs, and whether
    /// there was a commit.
    fn commit(self) -> Result<Vec<CoordinatorOutput>> {
        if let Some(txn) = self.txn {
            txn.commit()?;
        }
        Ok(self.outputs)
    }
}

impl Coordinator {
    /// Builds the coordinator from what `storage` holds (empty storage: a new cluster).
    ///
    /// Every registered worker gets a fresh deadline (now), so none is declared failed
    /// before `max(coordinator_failure_timeout, clock_skew_budget)` has passed on this
    /// coordinator: workers need time to notice the restart. Queued tasks are ready at
    /// once (retry backoffs are not persisted). Only unfinished jobs' tasks are read,
    /// page by page, and no payload is: recovery costs what is live, not what is kept.
    pub fn recover(storage: Arc<dyn Storage>, settings: CoordinatorSettings, now: Now) -> Result<Self> {
        let format: Option<u32> = load(&*storage, FORMAT)?;
        let counters: Option<Counters> = load(&*storage, COUNTERS)?;
        match (format, &counters) {
            (Some(v), _) if (FORMAT_VERSION_OLDEST..=FORMAT_VERSION).contains(&v) => {}
            (None, None) => {}
            (found, _) => {
                return Err(Error::internal(format!(
                    "the database holds coordinator records of format {} and this rollout reads formats \
                     {FORMAT_VERSION_OLDEST} to {FORMAT_VERSION}; start it on a new storage.data_dir (or run the \
                     rollout that wrote it)",
                    found.unwrap_or(1)
                )));
            }
        }
        let counters = counters.unwrap_or_default();
        let mut coordinator = Coordinator {
            storage: Arc::clone(&storage),
            settings,
            incarnations_before_recovery: counters.last_incarnation,
            counters,
            workers: BTreeMap::new(),
            hungry: BTreeMap::new(),
            jobs: BTreeMap::new(),
            active_jobs: BTreeSet::new(),
            open_jobs: BTreeSet::new(),
            finished_jobs: BTreeSet::new(),
            totals: TaskCounts::default(),
            tasks: BTreeMap::new(),
            ready: BTreeMap::new(),
            ready_seq: 0,
            delayed: BTreeSet::new(),
            next_scan: now.mono,
            metrics: ClusterMetrics::default(),
            deletions: VecDeque::new(),
            dirty_workers: BTreeSet::new(),
            dirty_tasks: BTreeSet::new(),
            dirty_jobs: BTreeSet::new(),
            batch_assign_bytes: 0,
            audit_block: Vec::new(),
            ready_changed: false,
            more_work: false,
            counters_dirty: false,
            // A new database, or an older layout (read as it is): the first write marks it.
            format_unwritten: format != Some(FORMAT_VERSION),
            poisoned: None,
            last_mono: now.mono,
            now_wall_ms: unix_millis(now.wall),
            audit_prune_at: None,
        };
        for (key, bytes) in scan_all(&*storage, WORKER_PREFIX)? {
            let record: WorkerRecord = decode(&key, &bytes)?;
            if key != worker_key(&record.id) {
                return Err(damaged_key(&key, &format!("worker {}", record.id)));
            }
            let entry = WorkerEntry::new(record, now.mono, now.wall, None);
            coordinator.workers.insert(entry.record.id.clone(), entry);
        }
        let mut orphans = Vec::new();
        let mut jobs = Vec::new();
        for_each_page(&*storage, JOB_PREFIX, |page| {
            for (key, bytes) in page {
                let record = decode::<JobRecord>(&key, &bytes)?;
                // A record under another job's key would be recovered twice.
                if key != job_key(record.id) {
                    return Err(damaged_key(&key, &record.id.to_string()));
                }
                jobs.push(record);
            }
            Ok(())
        })?;
        for record in jobs {
            coordinator.recover_job(record, now, &mut orphans)?;
        }
        if !orphans.is_empty() {
            // A lease whose worker incarnation is gone cannot be running under a valid
            // token any more; only a bug could leave one behind. Re-queue, durably.
            let mut batch = Batch::new(&*storage, now);
            for task in orphans {
                coordinator.end_lease(
                    now,
                    task,
                    "lease found without its worker at recovery".into(),
                    crate::submits::LeaseEnd::Uncharged,
                    &mut batch,
                )?;
            }
            coordinator.finish_batch(&mut batch)?;
            batch.commit()?;
        }
        Ok(coordinator)
    }

    /// One job from storage: finished jobs are a record; unfinished ones get their
    /// shapes and live tasks back, checked against the counts stored with the job.
    fn recover_job(&mut self, record: JobRecord, now: Now, orphans: &mut Vec<TaskId>) -> Result<()> {
        let id = record.id;
        let has_inputs = !self.storage.scan_page(&job_inputs_prefix(id), None, 1)?.is_empty();
        let mut entry = JobEntry { record, shapes: Vec::new(), opened_at: now.mono, has_inputs };
        if entry.is_finished() {
            self.totals.add(&entry.record.counts);
            self.finished_jobs.insert((entry.record.finished_at_unix_ms.unwrap_or(0), id));
            self.jobs.insert(id, entry);
            return Ok(());
        }
        let tasks = entry.record.tasks;
        entry.record.tasks = 0;
        for_each_page(&*self.storage, &job_shapes_prefix(id), |page| {
            for (key, bytes) in page {
                let first = task_from_key(SHAPES_PREFIX, &key)?.index;
                if first != entry.record.tasks {
                    return Err(Error::internal(format!(
                        "{id}: shape records out of step (one starts at task {first}, expected {})",
                        entry.record.tasks
                    )));
                }
                let runs: ShapeRuns = decode(&key, &bytes)?;
                let total = runs.iter().try_fold(entry.record.tasks, |sum, (n, _)| sum.checked_add(*n));
                let Some(total) = total.filter(|t| *t <= tasks) else {
                    return Err(Error::internal(format!(
                        "{id}: its shape records describe more than the {tasks} tasks its record says"
                    )));
                };
                entry.extend_shapes(runs);
                entry.record.tasks = total;
            }
            Ok(())
        })?;
        if entry.record.tasks != tasks {
            return Err(Error::internal(format!(
                "{id}: its record says {tasks} tasks, its shape records describe {}",
                entry.record.tasks
            )));
        }
        if !entry.record.sealed {
            self.open_jobs.insert((now.mono, id));
            self.jobs.insert(id, entry);
            return Ok(());
        }
        // Sealed, unfinished: every task without a record is queued and never leased.
        let mut counts = TaskCounts::default();
        let mut next = 0u32;
        let mut live: Vec<(TaskId, Option<Box<TaskRecord>>)> = Vec::new();
        for_each_page(&*self.storage, &job_tasks_prefix(id), |page| {
            for (key, bytes) in page {
                let task = task_from_key(TASK_PREFIX, &key)?;
                if task.index >= tasks {
                    return Err(Error::internal(format!(
                        "{id}: a task record for {task}, beyond the job's {tasks} tasks"
                    )));
                }
                let record: TaskRecord = decode(&key, &bytes)?;
                for index in next..task.index {
                    live.push((TaskId::new(id, index), None));
                    counts.queued += 1;
                }
                next = task.index + 1;
                *counts.slot(record.state.kind()) += 1;
                if !record.state.is_terminal() {
                    live.push((task, Some(Box::new(record))));
                }
            }
            Ok(())
        })?;
        for index in next..tasks {
            live.push((TaskId::new(id, index), None));
            counts.queued += 1;
        }
        if counts != entry.record.counts {
            return Err(Error::internal(format!(
                "{id}: its stored counts {:?} disagree with its task records {counts:?}",
                entry.record.counts
            )));
        }
        self.totals.add(&counts);
        self.active_jobs.insert(id);
        let shapes = entry.shapes.clone();
        self.jobs.insert(id, entry);
        for (task, record) in live {
            let gpus = shape_in(&shapes, task.index).map_or(0, |s| s.gpus);
            if let Some(TaskState::Leased { worker, incarnation, .. }) = record.as_deref().map(|r| &r.state) {
                match self.workers.get_mut(worker) {
                    Some(w) if w.record.incarnation == *incarnation && w.record.state != WorkerState::Failed => {
                        w.leases.insert(task);
                        w.gpus_in_use += gpus;
                    }
                    _ => orphans.push(task),
                }
            }
            let queued = record.as_deref().is_none_or(|r| r.state == TaskState::Queued);
            self.tasks.insert(task, record);
            if queued {
                self.push_ready(task);
            }
        }
        Ok(())
    }

    /// Applies one input as a batch of one.
    pub fn handle(&mut self, now: Now, input: CoordinatorInput, out: &mut Vec<CoordinatorOutput>) -> Result<()> {
        self.handle_batch(now, [input], out)
    }

    /// Time passed: runs the timers (retries whose backoff ended, the failure scan when
    /// due, expired jobs, dispatch held back) in a batch of their own. The driver calls
    /// it at or after [`Coordinator::poll_timeout`]; an early call changes nothing that
    /// is not due.
    pub fn handle_timeout(&mut self, now: Now, out: &mut Vec<CoordinatorOutput>) -> Result<()> {
        self.run_batch(now, [], true, out)
    }

    /// Applies inputs in order, then the timers if `now` is at or past
    /// [`Coordinator::poll_timeout`], commits their durable changes in one transaction
    /// (one fsync), then appends their outputs to `out`. On error nothing is appended
    /// and the machine is poisoned (see the type's contract).
    pub fn handle_batch<I>(&mut self, now: Now, inputs: I, out: &mut Vec<CoordinatorOutput>) -> Result<()>
    where
        I: IntoIterator<Item = CoordinatorInput>,
    {
        let due = now.mono >= self.poll_timeout();
        self.run_batch(now, inputs, due, out)
    }

    fn run_batch<I>(&mut self, now: Now, inputs: I, timers: bool, out: &mut Vec<CoordinatorOutput>) -> Result<()>
    where
        I: IntoIterator<Item = CoordinatorInput>,
    {
        if let Some(reason) = &self.poisoned {
            return Err(Error::internal(format!(
                "coordinator refuses input after a failed batch ({reason}); recover a new one from storage"
            )));
        }
        self.last_mono = self.last_mono.max(now.mono);
        self.now_wall_ms = unix_millis(now.wall);
        let storage = Arc::clone(&self.storage);
        let mut batch = Batch::new(&*storage, now);
        let applied = self.apply_all(now, inputs, timers, &mut batch);
        match applied.and_then(|()| batch.commit()) {
            Ok(outputs) => {
                out.extend(outputs);
                Ok(())
            }
            Err(e) => {
                self.poisoned = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn apply_all<I>(&mut self, now: Now, inputs: I, timers: bool, batch: &mut Batch<'_>) -> Result<()>
    where
        I: IntoIterator<Item = CoordinatorInput>,
    {
        self.batch_assign_bytes = 0;
        self.more_work = false;
        for input in inputs {
            self.apply(now, input, batch)?;
            if std::mem::take(&mut self.ready_changed) {
                self.dispatch_all(batch)?;
            }
        }
        if timers {
            self.on_timeout(now, batch)?;
            if std::mem::take(&mut self.ready_changed) {
                self.dispatch_all(batch)?;
            }
        }
        self.finish_batch(batch)
    }

    /// When the driver must call [`Coordinator::handle_timeout`]: the next
    /// failure scan or retry, or at once when the last batch left work for the next
    /// (dispatch cut short by [`ASSIGN_BYTES_PER_BATCH_MAX`], a deletion in progress).
    /// There is always a next failure scan, so always a time.
    pub fn poll_timeout(&self) -> Mono {
        if self.more_work {
            return self.last_mono;
        }
        let first_delayed = self.delayed.first().map(|(at, _)| *at);
        first_delayed.map_or(self.next_scan, |d| d.min(self.next_scan))
    }

    fn apply(&mut self, now: Now, input: CoordinatorInput, batch: &mut Batch<'_>) -> Result<()> {
        match input {
            CoordinatorInput::FromWorker { worker, message } => match message {
                ToCoordinator::Register(r) => self.on_register(now, worker, r, batch),
                ToCoordinator::Heartbeat(h) => self.on_heartbeat(now, &worker, h, batch),
                ToCoordinator::Pull(p) => self.on_pull(&worker, p, batch),
                ToCoordinator::Submit(submit) => self.on_submit(now, &worker, submit, None, batch),
            },
            CoordinatorInput::Submit { worker, submit, inline_result } => {
                self.on_submit(now, &worker, submit, inline_result, batch)
            }
            CoordinatorInput::SubmitJob { request, job } => self.on_submit_job(now, request, job, batch),
            CoordinatorInput::OpenJob { request, name, idempotency_key } => {
                self.on_open_job(now, request, name, idempotency_key, batch)
            }
            CoordinatorInput::AppendTasks { request, job, first_index, tasks } => {
                self.on_append_tasks(request, job, first_index, tasks, batch)
            }
            CoordinatorInput::SealJob { request, job, tasks } => self.on_seal_job(request, job, tasks, batch),
            CoordinatorInput::CancelJob { request, job } => self.on_cancel_job(request, job, batch),
            CoordinatorInput::CancelTask { request, task } => self.on_cancel_task(request, task, batch),
            CoordinatorInput::Drain { request, worker } => self.on_drain(request, &worker, batch),
            CoordinatorInput::WorkClosed { worker, incarnation } => {
                self.on_work_closed(now, &worker, incarnation, batch)
            }
        }
    }

    fn on_timeout(&mut self, now: Now, batch: &mut Batch<'_>) -> Result<()> {
        while let Some(&(at, task)) = self.delayed.first() {
            if at > now.mono {
                break;
            }
            self.delayed.pop_first();
            if self.is_queued(task) {
                self.push_ready(task);
            }
        }
        if now.mono >= self.next_scan {
            self.next_scan = now.mono + self.settings.health.failure_scan_interval;
            self.scan_failures(now, batch)?;
            self.forget_failed_workers(now, batch)?;
            self.abandon_stale_open_jobs(now, batch)?;
            self.prune_audit(now, batch)?;
        }
        self.delete_expired(now, batch)?;
        // Whatever was held back (or became ready) gets its chance.
        self.ready_changed = true;
        Ok(())
    }

    /// Deletes audit blocks whose every entry is older than `tasks.job_retention`
    /// (at most [`AUDIT_BLOCKS_PRUNED_PER_BATCH`] per batch), moving the chain's base
    /// so what is kept still verifies. Reads storage only when the oldest kept block
    /// may be due.
    fn prune_audit(&mut self, now: Now, batch: &mut Batch<'_>) -> Result<()> {
        let now_ms = unix_millis(now.wall);
        if self.audit_prune_at.is_some_and(|at| now_ms < at) {
            return Ok(());
        }
        let retention = u64::try_from(self.settings.tasks.job_retention.as_millis()).unwrap_or(u64::MAX);
        let blocks = self.storage.scan_page(AUDIT_PREFIX, None, AUDIT_BLOCKS_PRUNED_PER_BATCH)?;
        let full = blocks.len() == AUDIT_BLOCKS_PRUNED_PER_BATCH;
        let mut base: Option<crate::audit::AuditBase> = None;
        self.audit_prune_at = None;
        for (key, bytes) in blocks {
            let block: Vec<AuditEntry> = decode(&key, &bytes)?;
            let Some(last) = block.last() else { continue };
            let due = last.wall_unix_ms.saturating_add(retention);
            if now_ms < due {
                self.audit_prune_at = Some(due);
                break;
            }
            batch.delete(&key)?;
            base = Some(crate::audit::AuditBase { seq: last.seq, hash: last.hash });
        }
        if let Some(base) = base {
            batch.put(AUDIT_BASE, &base)?;
            if full && self.audit_prune_at.is_none() {
                self.more_work = true;
            }
        } else if self.audit_prune_at.is_none() {
            // Nothing kept yet (or nothing due): look again in a retention's time.
            self.audit_prune_at = Some(now_ms.saturating_add(retention));
        }
        Ok(())
    }

    // ------------------------------------------------------------------ durability

    /// Appends an event to the audit chain (in this batch) and to the outputs.
    pub(crate) fn record(&mut self, event: HistoryEvent, batch: &mut Batch<'_>) {
        self.counters.audit_seq += 1;
        let entry = AuditEntry::new(self.counters.audit_seq, batch.wall_unix_ms, &event, self.counters.audit_head);
        self.counters.audit_head = entry.hash;
        self.counters_dirty = true;
        self.audit_block.push(entry);
        batch.outputs.push(CoordinatorOutput::Event(event));
    }

    /// Writes every record the batch changed.
    pub(crate) fn finish_batch(&mut self, batch: &mut Batch<'_>) -> Result<()> {
        for id in std::mem::take(&mut self.dirty_workers) {
            if let Some(w) = self.workers.get(&id) {
                batch.put(&worker_key(&id), &w.record)?;
            }
        }
        for task in std::mem::take(&mut self.dirty_tasks) {
            if let Some(Some(record)) = self.tasks.get(&task) {
                batch.put(&task_key(task), &**record)?;
            }
        }
        for job in std::mem::take(&mut self.dirty_jobs) {
            if let Some(j) = self.jobs.get(&job) {
                batch.put(&job_key(job), &j.record)?;
            }
        }
        // Blocks of a bounded size, however many events the batch recorded (cancelling
        // a million tasks records a million).
        let block = std::mem::take(&mut self.audit_block);
        for part in block.chunks(AUDIT_BLOCK_ENTRIES_MAX) {
            batch.put(&audit_key(part[0].seq), &part)?;
        }
        if std::mem::take(&mut self.counters_dirty) {
            batch.put(COUNTERS, &self.counters)?;
        }
        if self.format_unwritten && batch.txn.is_some() {
            batch.put(FORMAT, &FORMAT_VERSION)?;
            self.format_unwritten = false;
        }
        Ok(())
    }

    pub(crate) fn truncate(&self, message: &str) -> String {
        rollout_core::text::truncate_at_char_boundary(message.to_owned(), self.settings.max_error_message_bytes)
    }

    /// The settings in force.
    pub fn settings(&self) -> &CoordinatorSettings {
        &self.settings
    }
}

/// The shape of task `index` in run-length `shapes`.
pub(crate) fn shape_in(shapes: &[(u32, Arc<TaskShape>)], index: u32) -> Option<&Arc<TaskShape>> {
    let at = shapes.partition_point(|(end, _)| *end <= index);
    shapes.get(at).map(|(_, shape)| shape)
}

/// A record stored under a key that is not its own: a damaged database.
fn damaged_key(key: &[u8], names: &str) -> Error {
    Error::internal(format!(
        "damaged database: the record under key {:?} names {names}, whose key is another",
        String::from_utf8_lossy(key)
    ))
}
