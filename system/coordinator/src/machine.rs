//! The coordinator state machine.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rollout_core::config::{Config, HealthConfig, LimitsConfig, TasksConfig};
use rollout_core::health;
use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{
    Assignment, Control, Heartbeat, Outcome, Pull, Register, Submit, SubmitVerdict, ToCoordinator, ToWorker,
    WorkerTerms,
};
use rollout_core::time::unix_millis;
use rollout_core::traits::{Inventory, Storage, StorageTxn};
use rollout_core::{
    Attempt, ContentId, Error, FencingToken, Incarnation, JobId, Mono, Now, PROTOCOL_VERSION, Result, TaskId, WorkerId,
};
use serde::Serialize;

use crate::audit::{AuditEntry, audit_key};
use crate::metrics::{ClusterMetrics, LatencySummary};
use crate::records::*;

/// Operator requests are matched to their replies by this id (chosen by the driver).
pub type RequestId = u64;

/// The coordinator's settings, taken from the effective [`Config`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorSettings {
    /// Heartbeats and failure detection.
    pub health: HealthConfig,
    /// Retries.
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

/// A job as an operator submits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobSubmission {
    /// A label for humans.
    pub name: String,
    /// The tasks, in index order.
    pub tasks: Vec<TaskSpec>,
    /// Resubmitting with the same key returns the existing job.
    pub idempotency_key: Option<String>,
}

/// Everything that can happen to a coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CoordinatorInput {
    /// A message from a worker whose identity the transport has authenticated.
    FromWorker {
        /// The sender (its certificate's name).
        worker: WorkerId,
        /// What it sent.
        message: ToCoordinator,
    },
    /// Operator: submit a job. Acknowledged only after it is durable.
    SubmitJob {
        /// Matches the reply.
        request: RequestId,
        /// The job.
        job: JobSubmission,
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
    /// The bytes of a result that a Submit later in the same batch names. They are
    /// written in the batch's transaction if (and only if) that submit commits the
    /// result, so a committed small result is durable exactly when its commit is: one
    /// fsync for both. Bytes no submit of the batch commits are dropped at its end.
    /// `result` must be the bytes' content id (the transport computes it).
    ResultBytes {
        /// The bytes' content id.
        result: ContentId,
        /// The result itself.
        bytes: Vec<u8>,
    },
    /// The timer from [`Coordinator::poll_timeout`] fired (early or extra ticks are harmless).
    Tick,
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

/// A worker as the coordinator sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Its id.
    pub id: WorkerId,
    /// Its current incarnation.
    pub incarnation: Incarnation,
    /// Active, draining or failed.
    pub state: WorkerState,
    /// Its latest announced deadline (or the fresh one given at recovery).
    pub due_at: SystemTime,
    /// When its latest beat arrived (coordinator wall clock).
    pub last_beat: Option<SystemTime>,
    /// Its slots.
    pub slots: u32,
    /// Leases it holds.
    pub leased: u32,
    /// Its plugins.
    pub plugins: Vec<String>,
    /// Its inventory.
    pub inventory: Inventory,
}

/// A job's progress.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobStatus {
    /// Its id.
    pub job: JobId,
    /// Its name.
    pub name: String,
    /// Tasks in all.
    pub tasks: u32,
    /// Waiting.
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

impl JobStatus {
    /// Whether every task is in a terminal state.
    pub fn is_finished(&self) -> bool {
        self.queued == 0 && self.leased == 0
    }
}

/// One task's state, attempts and error history.
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

#[derive(Debug)]
struct WorkerEntry {
    record: WorkerRecord,
    due_at: SystemTime,
    last_beat: Option<SystemTime>,
    leases: BTreeSet<TaskId>,
    credits: u32,
    gpus_in_use: u32,
}

/// The parts of a spec needed to match and assign a task; the payload stays in storage.
#[derive(Debug)]
struct TaskShape {
    plugin: String,
    method: String,
    gpus: u32,
    deadline: Option<Duration>,
}

#[derive(Debug)]
struct TaskEntry {
    record: TaskRecord,
    shape: TaskShape,
}

/// Ready tasks are grouped by what they need, so matching a worker looks at a few
/// queues rather than every task.
type ReadyKey = (String, u32);

/// The coordinator: registry, health, job queue, leases, fencing, audit, metrics.
///
/// Contract for drivers:
/// - Construct with [`Coordinator::recover`] at every start (it is also the restart).
/// - Feed inputs with [`Coordinator::handle_batch`] (or [`Coordinator::handle`]); the
///   batch's durable changes are committed in one storage transaction before the
///   call returns, and only then are its outputs appended to `out`.
/// - Deliver [`CoordinatorInput::Tick`] at or after [`Coordinator::poll_timeout`].
/// - If a batch returns an error, the in-memory state may be ahead of storage: the
///   machine refuses further input, and the driver must recover a new one.
pub struct Coordinator {
    storage: Arc<dyn Storage>,
    settings: CoordinatorSettings,
    counters: Counters,
    /// The last incarnation handed out before this coordinator was recovered: workers
    /// up to it registered with an earlier run.
    incarnations_before_recovery: Incarnation,
    workers: BTreeMap<WorkerId, WorkerEntry>,
    jobs: BTreeMap<JobId, JobRecord>,
    tasks: BTreeMap<TaskId, TaskEntry>,
    ready: BTreeMap<ReadyKey, VecDeque<(u64, TaskId)>>,
    ready_seq: u64,
    delayed: BTreeSet<(Mono, TaskId)>,
    next_scan: Mono,
    metrics: ClusterMetrics,
    dirty_workers: BTreeSet<WorkerId>,
    dirty_tasks: BTreeSet<TaskId>,
    /// The audit entries the current batch recorded (stored as one block).
    audit_block: Vec<AuditEntry>,
    /// Result bytes given by [`CoordinatorInput::ResultBytes`] in the current batch.
    batch_results: BTreeMap<ContentId, Vec<u8>>,
    counters_dirty: bool,
    poisoned: Option<String>,
    /// Whether the last batch wrote (and so committed and synced) anything.
    last_batch_wrote: bool,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("workers", &self.workers.len())
            .field("jobs", &self.jobs.len())
            .field("tasks", &self.tasks.len())
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

/// Writes of one batch, and its outputs held back until commit.
struct Batch<'s> {
    storage: &'s dyn Storage,
    txn: Option<Box<dyn StorageTxn + 's>>,
    outputs: Vec<CoordinatorOutput>,
    wall_unix_ms: u64,
}

impl<'s> Batch<'s> {
    fn new(storage: &'s dyn Storage, now: Now) -> Self {
        Batch { storage, txn: None, outputs: Vec::new(), wall_unix_ms: unix_millis(now.wall) }
    }

    fn txn(&mut self) -> Result<&mut (dyn StorageTxn + 's)> {
        if self.txn.is_none() {
            self.txn = Some(self.storage.begin_write()?);
        }
        Ok(self.txn.as_deref_mut().expect("just opened"))
    }

    fn put<T: Serialize>(&mut self, key: &[u8], value: &T) -> Result<()> {
        let bytes = encode(value);
        self.txn()?.put(key, &bytes)
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match &self.txn {
            Some(txn) => txn.get(key),
            None => self.storage.get(key),
        }
    }

    fn send(&mut self, to: &WorkerId, message: ToWorker) {
        self.outputs.push(CoordinatorOutput::Send { to: to.clone(), message });
    }

    fn reply(&mut self, request: RequestId, reply: OperatorReply) {
        self.outputs.push(CoordinatorOutput::Reply { request, reply });
    }

    /// Commits (when anything was written) and hands back the outputs, and whether
    /// there was a commit.
    fn commit(self) -> Result<(Vec<CoordinatorOutput>, bool)> {
        let wrote = self.txn.is_some();
        if let Some(txn) = self.txn {
            txn.commit()?;
        }
        Ok((self.outputs, wrote))
    }
}

impl Coordinator {
    /// Builds the coordinator from what `storage` holds (empty storage: a new cluster).
    ///
    /// Every registered worker gets a fresh deadline, `due_at = now.wall`, so none is
    /// declared failed before `max(coordinator_failure_timeout, clock_skew_budget)`
    /// has passed on this coordinator: workers need time to notice the restart.
    /// Queued tasks are ready at once (retry backoffs are not persisted).
    pub fn recover(storage: Arc<dyn Storage>, settings: CoordinatorSettings, now: Now) -> Result<Self> {
        let counters: Counters = load(&*storage, COUNTERS)?.unwrap_or_default();
        let mut workers = BTreeMap::new();
        for (key, bytes) in storage.scan(WORKER_PREFIX)? {
            let record: WorkerRecord = decode(&key, &bytes)?;
            let entry = WorkerEntry {
                record,
                due_at: now.wall,
                last_beat: None,
                leases: BTreeSet::new(),
                credits: 0,
                gpus_in_use: 0,
            };
            workers.insert(entry.record.id.clone(), entry);
        }
        let mut jobs = BTreeMap::new();
        for (key, bytes) in storage.scan(JOB_PREFIX)? {
            let job: JobRecord = decode(&key, &bytes)?;
            jobs.insert(job.id, job);
        }
        let mut shapes = BTreeMap::new();
        for (key, bytes) in storage.scan(TASK_SPEC_PREFIX)? {
            let spec: TaskSpec = decode(&key, &bytes)?;
            shapes.insert(
                task_from_key(TASK_SPEC_PREFIX, &key)?,
                TaskShape { plugin: spec.plugin, method: spec.method, gpus: spec.gpus, deadline: spec.deadline },
            );
        }
        let mut coordinator = Coordinator {
            storage: Arc::clone(&storage),
            settings,
            incarnations_before_recovery: counters.last_incarnation,
            counters,
            workers,
            jobs,
            tasks: BTreeMap::new(),
            ready: BTreeMap::new(),
            ready_seq: 0,
            delayed: BTreeSet::new(),
            next_scan: now.mono + Duration::ZERO,
            metrics: ClusterMetrics::default(),
            dirty_workers: BTreeSet::new(),
            dirty_tasks: BTreeSet::new(),
            batch_results: BTreeMap::new(),
            audit_block: Vec::new(),
            counters_dirty: false,
            poisoned: None,
            last_batch_wrote: false,
        };
        let mut records = BTreeMap::new();
        for (key, bytes) in storage.scan(TASK_PREFIX)? {
            let task = task_from_key(TASK_PREFIX, &key)?;
            let record: TaskRecord = decode(&key, &bytes)?;
            if !shapes.contains_key(&task) {
                return Err(Error::internal(format!("task {task} has a state record but no spec")));
            }
            records.insert(task, record);
        }
        let mut orphans = Vec::new();
        // In task order, so the ready queue is too. A task whose state was never written
        // has been queued since its job was accepted.
        for (task, shape) in shapes {
            let record = records.remove(&task).unwrap_or_else(TaskRecord::fresh);
            if let TaskState::Leased { worker, incarnation, .. } = &record.state {
                match coordinator.workers.get_mut(worker) {
                    Some(w) if w.record.incarnation == *incarnation && w.record.state != WorkerState::Failed => {
                        w.leases.insert(task);
                        w.gpus_in_use += shape.gpus;
                    }
                    _ => orphans.push(task),
                }
            }
            let queued = record.state == TaskState::Queued;
            coordinator.tasks.insert(task, TaskEntry { record, shape });
            if queued {
                coordinator.push_ready(task);
            }
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
                    false,
                    &mut batch,
                )?;
            }
            coordinator.finish_batch(&mut batch)?;
            batch.commit()?;
        }
        Ok(coordinator)
    }

    /// Applies one input as a batch of one.
    pub fn handle(&mut self, now: Now, input: CoordinatorInput, out: &mut Vec<CoordinatorOutput>) -> Result<()> {
        self.handle_batch(now, [input], out)
    }

    /// Applies inputs in order, commits their durable changes in one transaction
    /// (one fsync), then appends their outputs to `out`. On error nothing is appended
    /// and the machine is poisoned (see the type's contract).
    pub fn handle_batch<I>(&mut self, now: Now, inputs: I, out: &mut Vec<CoordinatorOutput>) -> Result<()>
    where
        I: IntoIterator<Item = CoordinatorInput>,
    {
        if let Some(reason) = &self.poisoned {
            return Err(Error::internal(format!(
                "coordinator refuses input after a failed batch ({reason}); recover a new one from storage"
            )));
        }
        let storage = Arc::clone(&self.storage);
        let mut batch = Batch::new(&*storage, now);
        let applied = self.apply_all(now, inputs, &mut batch);
        match applied.and_then(|()| batch.commit()) {
            Ok((outputs, wrote)) => {
                self.last_batch_wrote = wrote;
                out.extend(outputs);
                Ok(())
            }
            Err(e) => {
                self.poisoned = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn apply_all<I>(&mut self, now: Now, inputs: I, batch: &mut Batch<'_>) -> Result<()>
    where
        I: IntoIterator<Item = CoordinatorInput>,
    {
        for input in inputs {
            self.apply(now, input, batch)?;
        }
        self.batch_results.clear();
        self.finish_batch(batch)
    }

    /// Whether the last successful batch wrote anything. A batch that wrote nothing
    /// (heartbeats only, say) did not commit or sync, so a driver may release its
    /// outputs at once instead of after a disk flush.
    pub fn last_batch_wrote(&self) -> bool {
        self.last_batch_wrote
    }

    /// When the driver must deliver the next [`CoordinatorInput::Tick`].
    pub fn poll_timeout(&self) -> Option<Mono> {
        let first_delayed = self.delayed.first().map(|(at, _)| *at);
        Some(first_delayed.map_or(self.next_scan, |d| d.min(self.next_scan)))
    }

    fn apply(&mut self, now: Now, input: CoordinatorInput, batch: &mut Batch<'_>) -> Result<()> {
        match input {
            CoordinatorInput::FromWorker { worker, message } => match message {
                ToCoordinator::Register(r) => self.on_register(now, worker, r, batch),
                ToCoordinator::Heartbeat(h) => self.on_heartbeat(now, &worker, h, batch),
                ToCoordinator::Pull(p) => self.on_pull(&worker, p, batch),
                ToCoordinator::Submit(s) => self.on_submit(now, &worker, s, batch),
            },
            CoordinatorInput::SubmitJob { request, job } => self.on_submit_job(request, job, batch),
            CoordinatorInput::CancelJob { request, job } => {
                let tasks: Vec<TaskId> = self.job_tasks(job).collect();
                if !self.jobs.contains_key(&job) {
                    batch.reply(request, OperatorReply::Rejected(Error::invalid_input(format!("no job {job}"))));
                    return Ok(());
                }
                let mut cancelled = 0;
                for task in tasks {
                    cancelled += u32::from(self.cancel_task(task, batch)?);
                }
                batch.reply(request, OperatorReply::Cancelled { tasks: cancelled });
                Ok(())
            }
            CoordinatorInput::CancelTask { request, task } => {
                if !self.tasks.contains_key(&task) {
                    batch.reply(request, OperatorReply::Rejected(Error::invalid_input(format!("no task {task}"))));
                    return Ok(());
                }
                let cancelled = self.cancel_task(task, batch)?;
                batch.reply(request, OperatorReply::Cancelled { tasks: u32::from(cancelled) });
                Ok(())
            }
            CoordinatorInput::Drain { request, worker } => self.on_drain(request, &worker, batch),
            CoordinatorInput::ResultBytes { result, bytes } => {
                self.batch_results.insert(result, bytes);
                Ok(())
            }
            CoordinatorInput::Tick => self.on_tick(now, batch),
        }
    }

    // ------------------------------------------------------------------ workers

    fn on_register(&mut self, now: Now, id: WorkerId, reg: Register, batch: &mut Batch<'_>) -> Result<()> {
        if let Some(reason) = self.register_refusal(&id, &reg) {
            batch.send(&id, ToWorker::RegisterRejected { reason });
            return Ok(());
        }
        let was_draining = self.workers.get(&id).is_some_and(|w| w.record.state == WorkerState::Draining);
        if let Some(old) = self.workers.get(&id) {
            // A worker that lost its connection to a restarted coordinator re-registers
            // and its runs were stopped: that costs the tasks a re-run, not an attempt.
            // (Its leases were granted by an earlier run exactly when its incarnation is
            // one this run did not hand out.)
            let charged = old.record.incarnation > self.incarnations_before_recovery;
            let reason = if charged {
                format!("worker {id} registered again; incarnation {} ended", old.record.incarnation)
            } else {
                format!(
                    "worker {id} registered again after a coordinator restart; incarnation {} ended (no attempt charged)",
                    old.record.incarnation
                )
            };
            let leases: Vec<TaskId> = old.leases.iter().copied().collect();
            for task in leases {
                self.end_lease(now, task, reason.clone(), charged, batch)?;
            }
        }
        self.counters.last_incarnation = self.counters.last_incarnation.next();
        self.counters_dirty = true;
        let incarnation = self.counters.last_incarnation;
        let record = WorkerRecord {
            id: id.clone(),
            incarnation,
            plugins: reg.plugins,
            slots: reg.slots,
            inventory: reg.inventory,
            state: if was_draining { WorkerState::Draining } else { WorkerState::Active },
            assigns_sent: 0,
        };
        let due_at = health::next_due_at(now.wall, self.settings.health.heartbeat_interval);
        self.workers.insert(
            id.clone(),
            WorkerEntry {
                record,
                due_at,
                last_beat: Some(now.wall),
                leases: BTreeSet::new(),
                credits: 0,
                gpus_in_use: 0,
            },
        );
        self.dirty_workers.insert(id.clone());
        self.record(HistoryEvent::Registered { worker: id.clone(), incarnation }, batch)?;
        batch.send(&id, ToWorker::Registered { incarnation, terms: self.settings.worker_terms() });
        if was_draining {
            batch.send(&id, ToWorker::Control(Control::Drain));
        }
        Ok(())
    }

    fn register_refusal(&self, id: &WorkerId, reg: &Register) -> Option<String> {
        let limits = &self.settings.limits;
        if reg.protocol_version != PROTOCOL_VERSION {
            return Some(format!(
                "protocol version mismatch: coordinator speaks {PROTOCOL_VERSION}, worker {id} speaks {}",
                reg.protocol_version
            ));
        }
        if reg.slots == 0 || reg.slots > limits.max_slots_per_worker {
            return Some(format!(
                "slots: worker {id} declares {} slots; the coordinator accepts 1 to {} (limits.max_slots_per_worker)",
                reg.slots, limits.max_slots_per_worker
            ));
        }
        if reg.plugins.is_empty() {
            return Some(format!("plugins: worker {id} offers no plugins, so no task could ever match it"));
        }
        let live = self.workers.values().filter(|w| w.record.state != WorkerState::Failed).count();
        if !self.workers.contains_key(id) && live >= limits.max_workers as usize {
            return Some(format!("the coordinator already has {live} workers (limits.max_workers)"));
        }
        None
    }

    fn current_worker(&self, id: &WorkerId, incarnation: Incarnation) -> bool {
        self.workers
            .get(id)
            .is_some_and(|w| w.record.incarnation == incarnation && w.record.state != WorkerState::Failed)
    }

    fn on_heartbeat(&mut self, now: Now, id: &WorkerId, beat: Heartbeat, batch: &mut Batch<'_>) -> Result<()> {
        if !self.current_worker(id, beat.incarnation) {
            batch.send(
                id,
                ToWorker::HeartbeatAck { incarnation: beat.incarnation, beat_seq: beat.beat_seq, reregister: true },
            );
            return Ok(());
        }
        if let Some(deltas) = &beat.metrics {
            self.metrics.merge(deltas);
        }
        let worker = self.workers.get_mut(id).expect("checked by current_worker");
        worker.due_at = beat.due_at;
        // The heartbeat ledger lives in memory only: a beat costs no write and no
        // fsync, and a restarted coordinator gives every worker a fresh deadline anyway.
        worker.last_beat = Some(now.wall);

        // Leases whose assignment the worker has had time to receive (seq at or below
        // what it reports) but which it does not run were lost in transit.
        let reported: BTreeSet<(TaskId, FencingToken)> = beat.running.iter().copied().collect();
        let lost: Vec<TaskId> = worker
            .leases
            .iter()
            .copied()
            .filter(|task| {
                let entry = &self.tasks[task];
                match (&entry.record.state, entry.record.token) {
                    (TaskState::Leased { seq, .. }, Some(token)) => {
                        *seq <= beat.assigns_through && !reported.contains(&(*task, token))
                    }
                    _ => false,
                }
            })
            .collect();
        // Tasks the worker runs without holding their lease (cancelled, revoked): stop them.
        let zombies: Vec<(TaskId, FencingToken)> =
            beat.running.iter().copied().filter(|(task, token)| !self.holds_lease(id, *task, *token)).collect();
        for task in lost {
            self.end_lease(now, task, String::new(), false, batch)?;
        }
        for (task, token) in zombies {
            batch.send(id, ToWorker::Control(Control::CancelTask { task, token }));
        }
        batch.send(
            id,
            ToWorker::HeartbeatAck { incarnation: beat.incarnation, beat_seq: beat.beat_seq, reregister: false },
        );
        Ok(())
    }

    fn holds_lease(&self, id: &WorkerId, task: TaskId, token: FencingToken) -> bool {
        self.tasks.get(&task).is_some_and(|t| {
            t.record.token == Some(token) && matches!(&t.record.state, TaskState::Leased { worker, .. } if worker == id)
        })
    }

    fn on_pull(&mut self, id: &WorkerId, pull: Pull, batch: &mut Batch<'_>) -> Result<()> {
        if !self.current_worker(id, pull.incarnation) {
            return Ok(());
        }
        let max_credits = self.settings.limits.max_credits_per_pull;
        let worker = self.workers.get_mut(id).expect("checked by current_worker");
        if worker.record.state != WorkerState::Active {
            return Ok(());
        }
        let in_flight = worker.record.assigns_sent.saturating_sub(pull.assigns_through);
        let in_flight = u32::try_from(in_flight).unwrap_or(u32::MAX);
        let unleased = worker.record.slots.saturating_sub(worker.leases.len() as u32);
        worker.credits = pull.free_slots.saturating_sub(in_flight).min(unleased).min(max_credits);
        self.dispatch_to(id, batch)
    }

    fn on_drain(&mut self, request: RequestId, id: &WorkerId, batch: &mut Batch<'_>) -> Result<()> {
        let Some(worker) = self.workers.get_mut(id) else {
            batch.reply(request, OperatorReply::Rejected(Error::invalid_input(format!("no worker named {id}"))));
            return Ok(());
        };
        if worker.record.state == WorkerState::Failed {
            batch.reply(
                request,
                OperatorReply::Rejected(Error::invalid_input(format!("worker {id} is failed; nothing to drain"))),
            );
            return Ok(());
        }
        worker.record.state = WorkerState::Draining;
        worker.credits = 0;
        self.dirty_workers.insert(id.clone());
        self.record(HistoryEvent::Drained { worker: id.clone() }, batch)?;
        batch.send(id, ToWorker::Control(Control::Drain));
        batch.reply(request, OperatorReply::Draining);
        Ok(())
    }

    fn on_tick(&mut self, now: Now, batch: &mut Batch<'_>) -> Result<()> {
        let mut promoted = false;
        while let Some(&(at, task)) = self.delayed.first() {
            if at > now.mono {
                break;
            }
            self.delayed.pop_first();
            if self.tasks.get(&task).is_some_and(|t| t.record.state == TaskState::Queued) {
                self.push_ready(task);
                promoted = true;
            }
        }
        if now.mono >= self.next_scan {
            self.next_scan = now.mono + self.settings.health.failure_scan_interval;
            let failed: Vec<WorkerId> = self
                .workers
                .values()
                .filter(|w| w.record.state != WorkerState::Failed)
                .filter(|w| health::is_failed(now.wall, w.due_at, &self.settings.health))
                .map(|w| w.record.id.clone())
                .collect();
            for id in failed {
                self.declare_failed(now, &id, batch)?;
            }
        }
        if promoted {
            self.dispatch_all(batch)?;
        }
        Ok(())
    }

    /// Marks a worker failed and re-queues (or dead-letters) everything it held.
    fn declare_failed(&mut self, now: Now, id: &WorkerId, batch: &mut Batch<'_>) -> Result<()> {
        let Some(worker) = self.workers.get_mut(id) else { return Ok(()) };
        worker.record.state = WorkerState::Failed;
        worker.credits = 0;
        let incarnation = worker.record.incarnation;
        let leases: Vec<TaskId> = worker.leases.iter().copied().collect();
        self.dirty_workers.insert(id.clone());
        self.record(HistoryEvent::DeclaredFailed { worker: id.clone(), incarnation }, batch)?;
        let reason = format!("worker {id} (incarnation {incarnation}) was declared failed");
        for task in leases {
            self.end_lease(now, task, reason.clone(), true, batch)?;
        }
        self.dispatch_all(batch)
    }

    // ------------------------------------------------------------------ jobs and tasks

    fn on_submit_job(&mut self, request: RequestId, job: JobSubmission, batch: &mut Batch<'_>) -> Result<()> {
        if let Some(key) = &job.idempotency_key
            && let Some(bytes) = batch.get(&idempotency_key(key))?
        {
            let existing: JobId = decode(&idempotency_key(key), &bytes)?;
            let tasks = self.jobs.get(&existing).map_or(0, |j| j.tasks);
            batch.reply(request, OperatorReply::JobAccepted { job: existing, tasks, existing: true });
            return Ok(());
        }
        if let Err(e) = self.validate_job(&job) {
            batch.reply(request, OperatorReply::Rejected(e));
            return Ok(());
        }
        let id = JobId(self.counters.next_job);
        self.counters.next_job += 1;
        self.counters_dirty = true;
        let count = job.tasks.len() as u32;
        let record = JobRecord { id, name: job.name, tasks: count, idempotency_key: job.idempotency_key };
        batch.put(&job_key(id), &record)?;
        if let Some(key) = &record.idempotency_key {
            batch.put(&idempotency_key(key), &id)?;
        }
        self.jobs.insert(id, record);
        for (index, spec) in job.tasks.into_iter().enumerate() {
            let task = TaskId::new(id, index as u32);
            batch.put(&task_spec_key(task), &spec)?;
            // No state record yet: a spec without one is a fresh queued task (see
            // `recover`), so a job costs one write per task, not two.
            let shape =
                TaskShape { plugin: spec.plugin, method: spec.method, gpus: spec.gpus, deadline: spec.deadline };
            self.tasks.insert(task, TaskEntry { record: TaskRecord::fresh(), shape });
            self.push_ready(task);
        }
        self.record(HistoryEvent::JobAccepted { job: id, tasks: count }, batch)?;
        batch.reply(request, OperatorReply::JobAccepted { job: id, tasks: count, existing: false });
        self.dispatch_all(batch)
    }

    fn validate_job(&self, job: &JobSubmission) -> Result<()> {
        let limits = &self.settings.limits;
        if job.tasks.is_empty() {
            return Err(Error::invalid_input("tasks: a job needs at least one task"));
        }
        if job.tasks.len() > limits.max_tasks_per_job as usize {
            return Err(Error::invalid_input(format!(
                "tasks: {} tasks exceed limits.max_tasks_per_job ({})",
                job.tasks.len(),
                limits.max_tasks_per_job
            )));
        }
        for (i, spec) in job.tasks.iter().enumerate() {
            if spec.plugin.trim().is_empty() {
                return Err(Error::invalid_input(format!("tasks[{i}].plugin: must name a plugin")));
            }
            if spec.payload.len() > limits.max_payload_bytes as usize {
                return Err(Error::invalid_input(format!(
                    "tasks[{i}].payload: {} bytes exceed limits.max_payload_bytes ({})",
                    spec.payload.len(),
                    limits.max_payload_bytes
                )));
            }
        }
        Ok(())
    }

    fn job_tasks(&self, job: JobId) -> impl Iterator<Item = TaskId> + '_ {
        self.tasks.range(TaskId::new(job, 0)..=TaskId::new(job, u32::MAX)).map(|(t, _)| *t)
    }

    fn on_submit(&mut self, now: Now, id: &WorkerId, submit: Submit, batch: &mut Batch<'_>) -> Result<()> {
        let Submit { task, token, outcome, .. } = submit;
        let verdict = self.judge_submit(id, task, token, &outcome);
        match verdict {
            SubmitVerdict::Accepted => match outcome {
                Outcome::Succeeded { result, size_bytes }
                    if size_bytes <= u64::from(self.settings.limits.max_result_bytes) =>
                {
                    self.release_lease_slot(task);
                    let entry = self.tasks.get_mut(&task).expect("judged accepted");
                    entry.record.state = TaskState::Committed { result, size_bytes };
                    self.dirty_tasks.insert(task);
                    if let Some(bytes) = self.batch_results.remove(&result) {
                        batch.txn()?.put(&result_key(&result), &bytes)?;
                    }
                    self.record(HistoryEvent::Committed { task, worker: id.clone(), token, result }, batch)?;
                }
                Outcome::Succeeded { size_bytes, .. } => {
                    let reason = format!(
                        "result of {size_bytes} bytes exceeds limits.max_result_bytes ({})",
                        self.settings.limits.max_result_bytes
                    );
                    self.end_lease(now, task, reason, true, batch)?;
                }
                Outcome::Failed { message } => self.end_lease(now, task, message, true, batch)?,
            },
            SubmitVerdict::Duplicate => {
                self.record(HistoryEvent::DuplicateSubmit { task, worker: id.clone(), token }, batch)?;
            }
            SubmitVerdict::Stale => {
                self.record(HistoryEvent::StaleRejected { task, worker: id.clone(), token }, batch)?;
            }
        }
        batch.send(id, ToWorker::SubmitAck { task, token, verdict });
        if verdict == SubmitVerdict::Accepted {
            self.dispatch_all(batch)?;
        }
        Ok(())
    }

    /// The fencing rule: only the current token of a live lease is accepted; a repeat
    /// of what was recorded is a duplicate; anything else is stale and changes nothing.
    fn judge_submit(&self, id: &WorkerId, task: TaskId, token: FencingToken, outcome: &Outcome) -> SubmitVerdict {
        let Some(entry) = self.tasks.get(&task) else { return SubmitVerdict::Stale };
        #[cfg(feature = "planted-bugs")]
        if self.settings.planted.skip_fencing_check && matches!(entry.record.state, TaskState::Leased { .. }) {
            return SubmitVerdict::Accepted;
        }
        if entry.record.token != Some(token) {
            return SubmitVerdict::Stale;
        }
        match (&entry.record.state, outcome) {
            (TaskState::Leased { worker, .. }, _) if worker == id => SubmitVerdict::Accepted,
            (TaskState::Committed { result, .. }, Outcome::Succeeded { result: submitted, .. })
                if result == submitted =>
            {
                SubmitVerdict::Duplicate
            }
            (TaskState::Queued | TaskState::DeadLettered, Outcome::Failed { message }) => {
                let recorded = entry.record.errors.last().map(String::as_str);
                if recorded == Some(self.truncate(message).as_str()) {
                    SubmitVerdict::Duplicate
                } else {
                    SubmitVerdict::Stale
                }
            }
            _ => SubmitVerdict::Stale,
        }
    }

    fn truncate(&self, message: &str) -> String {
        rollout_core::text::truncate_at_char_boundary(message.to_owned(), self.settings.max_error_message_bytes)
    }

    /// Removes a task's lease from its worker's books (slots and GPUs).
    fn release_lease_slot(&mut self, task: TaskId) {
        let Some(entry) = self.tasks.get(&task) else { return };
        if let TaskState::Leased { worker, .. } = &entry.record.state
            && let Some(w) = self.workers.get_mut(worker)
        {
            w.leases.remove(&task);
            w.gpus_in_use = w.gpus_in_use.saturating_sub(entry.shape.gpus);
        }
    }

    /// Ends a task's current lease without a result. With `failed`, the attempt
    /// counts against `tasks.max_attempts` (its error is recorded) and the retry waits
    /// out the backoff; otherwise (the assignment was lost in transit) the task is
    /// re-queued at once and the attempt is not held against it.
    fn end_lease(&mut self, now: Now, task: TaskId, error: String, failed: bool, batch: &mut Batch<'_>) -> Result<()> {
        self.release_lease_slot(task);
        let error = self.truncate(&error);
        let max_attempts = self.settings.tasks.max_attempts as usize;
        let entry = self.tasks.get_mut(&task).ok_or_else(|| Error::internal(format!("no task {task}")))?;
        if failed {
            entry.record.errors.push(error.clone());
            let excess = entry.record.errors.len().saturating_sub(max_attempts);
            entry.record.errors.drain(..excess);
        }
        let attempt = entry.record.attempt;
        self.dirty_tasks.insert(task);
        if failed && entry.record.errors.len() >= max_attempts {
            entry.record.state = TaskState::DeadLettered;
            self.record(HistoryEvent::DeadLettered { task, attempts: attempt }, batch)?;
        } else {
            entry.record.state = TaskState::Queued;
            let failures = entry.record.errors.len() as u32;
            if failed {
                let delay = self.retry_backoff(failures);
                self.delayed.insert((now.mono + delay, task));
            } else {
                self.push_ready(task);
            }
            let error = if failed || !error.is_empty() { error } else { "assignment lost in transit".to_owned() };
            self.record(HistoryEvent::Requeued { task, attempt, error }, batch)?;
        }
        Ok(())
    }

    /// `retry_backoff_initial × 2^(failures-1)`, capped at `retry_backoff_max`.
    fn retry_backoff(&self, failures: u32) -> Duration {
        let t = &self.settings.tasks;
        let doublings = failures.saturating_sub(1).min(32);
        t.retry_backoff_initial.saturating_mul(1u32 << doublings.min(31)).min(t.retry_backoff_max)
    }

    /// Cancels a task that is not finished; returns whether it changed state.
    fn cancel_task(&mut self, task: TaskId, batch: &mut Batch<'_>) -> Result<bool> {
        let Some(entry) = self.tasks.get(&task) else { return Ok(false) };
        match entry.record.state.clone() {
            TaskState::Queued => {}
            TaskState::Leased { worker, .. } => {
                if let Some(token) = entry.record.token {
                    batch.send(&worker, ToWorker::Control(Control::CancelTask { task, token }));
                }
                self.release_lease_slot(task);
            }
            _ => return Ok(false),
        }
        let entry = self.tasks.get_mut(&task).expect("checked above");
        entry.record.state = TaskState::Cancelled;
        self.dirty_tasks.insert(task);
        self.record(HistoryEvent::Cancelled { task }, batch)?;
        Ok(true)
    }

    // ------------------------------------------------------------------ leasing

    fn push_ready(&mut self, task: TaskId) {
        let shape = &self.tasks[&task].shape;
        self.ready_seq += 1;
        self.ready.entry((shape.plugin.clone(), shape.gpus)).or_default().push_back((self.ready_seq, task));
    }

    /// Offers ready tasks to every worker with credits, one task per worker per round,
    /// so a burst of work spreads across the cluster.
    fn dispatch_all(&mut self, batch: &mut Batch<'_>) -> Result<()> {
        loop {
            let hungry: Vec<WorkerId> = self
                .workers
                .values()
                .filter(|w| w.credits > 0 && w.record.state == WorkerState::Active)
                .map(|w| w.record.id.clone())
                .collect();
            let mut progressed = false;
            for id in hungry {
                if let Some(task) = self.pick_task(&id) {
                    self.lease(task, &id, batch)?;
                    progressed = true;
                }
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    fn dispatch_to(&mut self, id: &WorkerId, batch: &mut Batch<'_>) -> Result<()> {
        while self.workers.get(id).is_some_and(|w| w.credits > 0) {
            let Some(task) = self.pick_task(id) else { break };
            self.lease(task, id, batch)?;
        }
        Ok(())
    }

    /// The oldest ready task this worker can run (plugin, free GPUs), removed from its
    /// queue. Entries of tasks no longer queued (cancelled meanwhile) are dropped.
    fn pick_task(&mut self, id: &WorkerId) -> Option<TaskId> {
        let worker = self.workers.get(id)?;
        let free_gpus = (worker.record.inventory.gpus.len() as u32).saturating_sub(worker.gpus_in_use);
        loop {
            let mut best: Option<(u64, ReadyKey)> = None;
            for plugin in &worker.record.plugins {
                let range = (plugin.clone(), 0)..=(plugin.clone(), free_gpus);
                for (key, queue) in self.ready.range(range) {
                    if let Some(&(seq, _)) = queue.front()
                        && best.as_ref().is_none_or(|(b, _)| seq < *b)
                    {
                        best = Some((seq, key.clone()));
                    }
                }
            }
            let (_, key) = best?;
            let queue = self.ready.get_mut(&key).expect("found above");
            let (_, task) = queue.pop_front().expect("non-empty above");
            if queue.is_empty() {
                self.ready.remove(&key);
            }
            if self.tasks.get(&task).is_some_and(|t| t.record.state == TaskState::Queued) {
                return Some(task);
            }
        }
    }

    fn lease(&mut self, task: TaskId, id: &WorkerId, batch: &mut Batch<'_>) -> Result<()> {
        self.counters.last_token = self.counters.last_token.next();
        self.counters_dirty = true;
        let token = self.counters.last_token;
        let worker = self.workers.get_mut(id).expect("dispatch only picks known workers");
        worker.record.assigns_sent += 1;
        worker.credits = worker.credits.saturating_sub(1);
        worker.leases.insert(task);
        let seq = worker.record.assigns_sent;
        let incarnation = worker.record.incarnation;
        let entry = self.tasks.get_mut(&task).expect("picked from the ready queue");
        worker.gpus_in_use += entry.shape.gpus;
        entry.record.attempt = Attempt(entry.record.attempt.get() + 1);
        entry.record.token = Some(token);
        entry.record.state = TaskState::Leased { worker: id.clone(), incarnation, seq };
        let attempt = entry.record.attempt;
        let (plugin, method) = (entry.shape.plugin.clone(), entry.shape.method.clone());
        let deadline = entry.shape.deadline.unwrap_or(self.settings.default_task_deadline);
        self.dirty_workers.insert(id.clone());
        self.dirty_tasks.insert(task);
        let spec_key = task_spec_key(task);
        let spec: TaskSpec = match batch.get(&spec_key)? {
            Some(bytes) => decode(&spec_key, &bytes)?,
            None => return Err(Error::internal(format!("task {task} has no stored spec"))),
        };
        self.record(HistoryEvent::Leased { task, worker: id.clone(), token, attempt }, batch)?;
        batch.send(
            id,
            ToWorker::Assign(Assignment {
                incarnation,
                seq,
                task,
                token,
                attempt,
                plugin,
                method,
                payload: spec.payload,
                deadline,
            }),
        );
        Ok(())
    }

    // ------------------------------------------------------------------ durability

    /// Appends an event to the audit chain (in this batch) and to the outputs.
    fn record(&mut self, event: HistoryEvent, batch: &mut Batch<'_>) -> Result<()> {
        self.counters.audit_seq += 1;
        let entry = AuditEntry::new(self.counters.audit_seq, batch.wall_unix_ms, &event, self.counters.audit_head);
        self.counters.audit_head = entry.hash;
        self.counters_dirty = true;
        self.audit_block.push(entry);
        batch.outputs.push(CoordinatorOutput::Event(event));
        Ok(())
    }

    /// Writes every record the batch changed.
    fn finish_batch(&mut self, batch: &mut Batch<'_>) -> Result<()> {
        for id in std::mem::take(&mut self.dirty_workers) {
            if let Some(w) = self.workers.get(&id) {
                batch.put(&worker_key(&id), &w.record)?;
            }
        }
        for task in std::mem::take(&mut self.dirty_tasks) {
            if let Some(t) = self.tasks.get(&task) {
                batch.put(&task_key(task), &t.record)?;
            }
        }
        let block = std::mem::take(&mut self.audit_block);
        if let Some(first) = block.first() {
            batch.put(&audit_key(first.seq), &block)?;
        }
        if std::mem::take(&mut self.counters_dirty) {
            batch.put(COUNTERS, &self.counters)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ introspection

    /// Every worker, in id order.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        self.workers
            .values()
            .map(|w| WorkerStatus {
                id: w.record.id.clone(),
                incarnation: w.record.incarnation,
                state: w.record.state,
                due_at: w.due_at,
                last_beat: w.last_beat,
                slots: w.record.slots,
                leased: w.leases.len() as u32,
                plugins: w.record.plugins.clone(),
                inventory: w.record.inventory.clone(),
            })
            .collect()
    }

    /// Every job's progress, in id order.
    pub fn jobs(&self) -> Vec<JobStatus> {
        self.jobs.values().map(|j| self.job_status(j)).collect()
    }

    /// One job's progress.
    pub fn job(&self, job: JobId) -> Option<JobStatus> {
        self.jobs.get(&job).map(|j| self.job_status(j))
    }

    fn job_status(&self, job: &JobRecord) -> JobStatus {
        let mut s = JobStatus { job: job.id, name: job.name.clone(), tasks: job.tasks, ..JobStatus::default() };
        for task in self.job_tasks(job.id) {
            match self.tasks[&task].record.state {
                TaskState::Queued => s.queued += 1,
                TaskState::Leased { .. } => s.leased += 1,
                TaskState::Committed { .. } => s.committed += 1,
                TaskState::DeadLettered => s.dead_lettered += 1,
                TaskState::Cancelled => s.cancelled += 1,
            }
        }
        s
    }

    /// Every task of a job, in index order.
    pub fn task_reports(&self, job: JobId) -> Vec<TaskReport> {
        self.job_tasks(job)
            .map(|task| {
                let r = &self.tasks[&task].record;
                TaskReport { task, state: r.state.clone(), attempts: r.attempt, errors: r.errors.clone() }
            })
            .collect()
    }

    /// A task's state and current token.
    pub fn task_state(&self, task: TaskId) -> Option<(&TaskState, Option<FencingToken>)> {
        self.tasks.get(&task).map(|t| (&t.record.state, t.record.token))
    }

    /// Every task's state, in task order (for the invariant checker).
    pub fn task_states(&self) -> impl Iterator<Item = (TaskId, &TaskState)> {
        self.tasks.iter().map(|(id, t)| (*id, &t.record.state))
    }

    /// Merged metrics.
    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    /// Latency percentiles, from merged histograms.
    pub fn latencies(&self) -> Vec<LatencySummary> {
        self.metrics.latencies()
    }

    /// The settings in force.
    pub fn settings(&self) -> &CoordinatorSettings {
        &self.settings
    }
}
