//! The coordinator driver: one tokio task that owns the [`Coordinator`] machine.
//!
//! Every RPC handler talks to it through one bounded channel. The driver waits for the
//! first message (or the machine's timer), then takes everything else already queued
//! (up to [`BATCH_INPUTS_MAX`]) and applies it as one batch: one storage transaction,
//! one fsync (group commit). Only after the commit does it release the batch's outputs:
//! messages go to the right worker's streams, unary calls get their answers, operator
//! requests their replies, and history events go to the emitter. While a batch is
//! applied (on the blocking pool), new inputs queue up and form the next batch.
//!
//! Commits are pipelined ([`CommitPipeline`]): the machine's commit hands its writes to
//! a commit thread and returns, so batch N+1 is applied while batch N syncs. Each
//! batch's outputs wait in `held` until the pipeline reports its writes (and all before
//! them) durable, and queries (status, task reports), answered from the machine's
//! memory, wait for the writes they could reveal. Nothing leaves the driver before the
//! state it reflects is on disk.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use rollout_coordinator::{
    Coordinator, CoordinatorInput, CoordinatorOutput, CoordinatorSettings, JobSubmission, Notice, OperatorReply,
    RequestId, StatusPage, StatusQuery, TaskSpec,
};
use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{Heartbeat, Pull, Register, Submit, ToCoordinator, ToWorker};
use rollout_core::traits::{EventEmitter, Storage};
use rollout_core::{Error, Incarnation, JobId, Mono, Now, Result, TaskId, WorkerId};
use rollout_proto::transport as pb;
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::dashboard::Dashboard;
use crate::history::Stamper;
use crate::metrics::CoordinatorMetrics;
use crate::node_env::{BlockingWork, NodeEnv, SystemWallClock, WallClock};
use crate::pipeline::{CommitPipeline, Durability};
use crate::wire;
use rollout_storage::pipeline::Releases;

mod handle;
pub use handle::*;

/// Most inputs applied in one batch (one transaction).
pub const BATCH_INPUTS_MAX: usize = 8192;
/// Result and payload bytes taken into one batch; the rest waits for the next (a
/// batch's transaction, and the write sets in flight, stay bounded).
pub const BATCH_RESULT_BYTES_MAX: usize = 64 << 20;
/// Capacity of the driver's inbox; handlers wait when it is full (back-pressure).
pub const INBOX_CAPACITY: usize = 65_536;
/// Frames queued towards one worker's Work stream before further ones are dropped
/// (the protocol recovers lost assignments and acks).
pub const WORK_FRAMES_QUEUED_MAX: usize = 1024;
/// Control messages queued towards one worker before further ones are dropped.
pub const CONTROL_QUEUED_MAX: usize = 256;
/// The gauges of `/metrics` are refreshed from the machine at most this often.
const GAUGE_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);
/// Workers and jobs the dashboard's snapshot shows at most.
const DASHBOARD_WORKERS_MAX: usize = 1000;
const DASHBOARD_JOBS_MAX: usize = 200;
/// The coordinator logs a summary line this often.
const SUMMARY_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// A worker silent this long leaves the heartbeat lateness bookkeeping.
const BEATS_FORGOTTEN_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// What the driver needs.
pub struct CoordinatorDriverOptions {
    /// Durable state (opened by the caller; recovered at start).
    pub storage: Arc<dyn Storage>,
    /// Machine settings.
    pub settings: CoordinatorSettings,
    /// Where history events go.
    pub emitter: Arc<dyn EventEmitter>,
    /// Set to `true` to stop the driver.
    pub shutdown: watch::Receiver<bool>,
    /// Wall clock and blocking work (`NodeEnv::default()` outside a simulation).
    pub env: NodeEnv,
    /// Where the driver counts what it releases (served at `/metrics` by the caller).
    pub metrics: Arc<CoordinatorMetrics>,
    /// Where it publishes the dashboard's snapshot and events (none: no dashboard).
    pub dashboard: Option<Arc<Dashboard>>,
}

impl std::fmt::Debug for CoordinatorDriverOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorDriverOptions").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// Recovers the coordinator from storage and starts its driver on the current tokio
/// runtime. Returns the handle the services use and the driver's task (which ends
/// with an error only if storage fails beyond recovery).
pub fn spawn_coordinator_driver(opts: CoordinatorDriverOptions) -> Result<(CoordinatorHandle, JoinHandle<Result<()>>)> {
    let clock = NodeClock::start_with(Arc::clone(&opts.env.wall_clock));
    let pipeline = Arc::new(CommitPipeline::new(opts.storage, opts.env.blocking)?);
    let for_commits = Arc::clone(&opts.metrics);
    pipeline.observe_commits(Arc::new(move |seconds| for_commits.observe_commit(seconds)));
    let machine = Coordinator::recover(Arc::clone(&pipeline) as Arc<dyn Storage>, opts.settings.clone(), clock.now())?;
    let (tx, rx) = mpsc::channel(INBOX_CAPACITY);
    let (tasks_ended, tasks_ended_rx) = watch::channel(0u64);
    let durable = pipeline.durable();
    let max_message_bytes = opts.settings.limits.max_message_bytes as usize;
    let driver = Driver {
        max_message_bytes,
        permits: Vec::new(),
        batch_result_bytes: 0,
        machine: Some(machine),
        pipeline,
        durable,
        held: Releases::default(),
        settings: opts.settings,
        emitter: opts.emitter,
        stamper: Stamper::new("coordinator"),
        clock,
        blocking: opts.env.blocking,
        inbox: rx,
        links: BTreeMap::new(),
        pending_registers: BTreeMap::new(),
        pending_beats: BTreeMap::new(),
        pending_requests: BTreeMap::new(),
        next_request: 0,
        metrics: opts.metrics,
        dashboard: opts.dashboard,
        tasks_ended,
        last_beats: BTreeMap::new(),
        gauges_at: None,
        summary: None,
    };
    let join = tokio::spawn(driver.run(opts.shutdown));
    Ok((CoordinatorHandle { inbox: tx, tasks_ended: tasks_ended_rx }, join))
}

#[derive(Default)]
struct WorkerLink {
    work: Option<(u64, Incarnation, mpsc::Sender<WorkItem>)>,
    control: Option<(u64, Incarnation, mpsc::Sender<pb::ControlMessage>)>,
}

/// What a batch or a query leaves for the world, held (in [`Releases`], under the
/// pipeline's ticket) until the writes it may reflect are durable.
struct Held {
    now: Now,
    outputs: Vec<CoordinatorOutput>,
    answer: Option<Box<dyn FnOnce() + Send>>,
}

struct Driver {
    machine: Option<Coordinator>,
    /// Frames to workers are cut to fit this.
    max_message_bytes: usize,
    /// Work-stream budget held by the inputs of the batch being gathered or applied.
    permits: Vec<OwnedSemaphorePermit>,
    /// Result bytes in the batch being gathered.
    batch_result_bytes: usize,
    /// The machine's storage.
    pipeline: Arc<CommitPipeline>,
    durable: watch::Receiver<Durability>,
    /// The release rule shared with the simulator.
    held: Releases<Held>,
    settings: CoordinatorSettings,
    emitter: Arc<dyn EventEmitter>,
    stamper: Stamper,
    clock: NodeClock,
    blocking: BlockingWork,
    inbox: mpsc::Receiver<DriverMsgBox>,
    links: BTreeMap<WorkerId, WorkerLink>,
    pending_registers: BTreeMap<WorkerId, VecDeque<oneshot::Sender<ToWorker>>>,
    pending_beats: BTreeMap<(WorkerId, Incarnation, u64), Vec<oneshot::Sender<ToWorker>>>,
    pending_requests: BTreeMap<RequestId, oneshot::Sender<OperatorReply>>,
    next_request: RequestId,
    metrics: Arc<CoordinatorMetrics>,
    dashboard: Option<Arc<Dashboard>>,
    /// Bumped after releasing a batch that ended tasks (see `CoordinatorHandle`).
    tasks_ended: watch::Sender<u64>,
    /// When each worker's last beat arrived (for the lateness histogram); pruned of
    /// workers silent for [`BEATS_FORGOTTEN_AFTER`] at each gauge refresh.
    last_beats: BTreeMap<WorkerId, tokio::time::Instant>,
    /// When the gauges were last refreshed from the machine.
    gauges_at: Option<tokio::time::Instant>,
    /// When the last summary line was logged, and the committed count then.
    summary: Option<(tokio::time::Instant, u32)>,
}

impl Driver {
    async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<()> {
        let mut inputs: Vec<CoordinatorInput> = Vec::new();
        loop {
            let mut timer_fired = false;
            let deadline = self
                .machine
                .as_ref()
                .map(Coordinator::poll_timeout)
                .map(|at| self.clock.instant_of(at))
                .unwrap_or_else(|| tokio::time::Instant::now() + std::time::Duration::from_secs(1));
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        tracing::info!(channel = "coordinator", "coordinator driver stopping");
                        return self.finish().await;
                    }
                    continue;
                }
                changed = self.durable.changed(), if !self.held.is_empty() => {
                    if changed.is_err() {
                        return Err(Error::internal("the storage pipeline stopped"));
                    }
                    if self.release_durable() {
                        self.recover().await?;
                    }
                    continue;
                }
                msg = self.inbox.recv() => match msg {
                    Some(DriverMsgBox(msg)) => self.take(msg, &mut inputs),
                    None => return self.finish().await,
                },
                () = tokio::time::sleep_until(deadline) => timer_fired = true,
            }
            // Group commit: everything already waiting joins this batch.
            while inputs.len() < BATCH_INPUTS_MAX && self.batch_result_bytes < BATCH_RESULT_BYTES_MAX {
                match self.inbox.try_recv() {
                    Ok(DriverMsgBox(msg)) => self.take(msg, &mut inputs),
                    Err(_) => break,
                }
            }
            // A batch runs the machine's due timers after its inputs; with no inputs, a
            // fired timer is a batch of its own.
            if !inputs.is_empty() || timer_fired {
                self.apply(std::mem::take(&mut inputs)).await?;
            }
            // The batch was applied: its results are in the machine's write set, and
            // the streams that sent them may send more.
            self.permits.clear();
            self.batch_result_bytes = 0;
            self.refresh_gauges();
        }
    }

    /// Turns a message into machine input, or answers it directly (queries, attaches).
    fn take(&mut self, msg: DriverMsg, inputs: &mut Vec<CoordinatorInput>) {
        match msg {
            DriverMsg::WorkFrame { worker, submits, pull, permit } => {
                self.permits.extend(permit);
                for (submit, inline_result) in submits {
                    self.batch_result_bytes += inline_result.as_ref().map_or(0, Vec::len);
                    inputs.push(CoordinatorInput::Submit { worker: worker.clone(), submit, inline_result });
                }
                if let Some(pull) = pull {
                    inputs.push(CoordinatorInput::FromWorker { worker, message: ToCoordinator::Pull(pull) });
                }
            }
            DriverMsg::Register(worker, register, reply) => {
                self.pending_registers.entry(worker.clone()).or_default().push_back(reply);
                inputs.push(CoordinatorInput::FromWorker { worker, message: ToCoordinator::Register(register) });
            }
            DriverMsg::Heartbeat(worker, beat, reply) => {
                let now = tokio::time::Instant::now();
                let interval = self.settings.health.heartbeat_interval;
                let late = self
                    .last_beats
                    .insert(worker.clone(), now)
                    .map_or(0.0, |before| now.saturating_duration_since(before + interval).as_secs_f64());
                self.metrics.observe_beat(late);
                self.pending_beats.entry((worker.clone(), beat.incarnation, beat.beat_seq)).or_default().push(reply);
                inputs.push(CoordinatorInput::FromWorker { worker, message: ToCoordinator::Heartbeat(beat) });
            }
            DriverMsg::Operator(request, reply) => {
                let payloads = |tasks: &[TaskSpec]| tasks.iter().map(|t| t.payload.len()).sum::<usize>();
                self.batch_result_bytes += match &request {
                    OperatorRequest::SubmitJob(job) => payloads(&job.tasks),
                    OperatorRequest::AppendTasks { tasks, .. } => payloads(tasks),
                    _ => 0,
                };
                self.next_request += 1;
                let id = self.next_request;
                self.pending_requests.insert(id, reply);
                inputs.push(match request {
                    OperatorRequest::SubmitJob(job) => CoordinatorInput::SubmitJob { request: id, job },
                    OperatorRequest::OpenJob { name, idempotency_key } => {
                        CoordinatorInput::OpenJob { request: id, name, idempotency_key }
                    }
                    OperatorRequest::AppendTasks { job, first_index, tasks } => {
                        CoordinatorInput::AppendTasks { request: id, job, first_index, tasks }
                    }
                    OperatorRequest::SealJob { job, tasks } => CoordinatorInput::SealJob { request: id, job, tasks },
                    OperatorRequest::CancelJob(job) => CoordinatorInput::CancelJob { request: id, job },
                    OperatorRequest::CancelTask(task) => CoordinatorInput::CancelTask { request: id, task },
                    OperatorRequest::Drain(worker) => CoordinatorInput::Drain { request: id, worker },
                });
            }
            DriverMsg::AttachWork { worker, incarnation, conn, tx } => {
                let link = self.links.entry(worker).or_default();
                if link.work.as_ref().is_none_or(|(_, inc, _)| *inc <= incarnation) {
                    link.work = Some((conn, incarnation, tx));
                }
            }
            DriverMsg::AttachControl { worker, incarnation, conn, tx } => {
                let link = self.links.entry(worker).or_default();
                if link.control.as_ref().is_none_or(|(_, inc, _)| *inc <= incarnation) {
                    link.control = Some((conn, incarnation, tx));
                }
            }
            DriverMsg::Detach { worker, conn } => {
                if let Some(link) = self.links.get_mut(&worker) {
                    if link.work.as_ref().is_some_and(|(c, _, _)| *c == conn) {
                        link.work = None;
                    }
                    if link.control.as_ref().is_some_and(|(c, _, _)| *c == conn) {
                        link.control = None;
                    }
                }
            }
            DriverMsg::WorkClosed { worker, incarnation } => {
                inputs.push(CoordinatorInput::WorkClosed { worker, incarnation });
            }
            DriverMsg::Status(query, reply) => {
                if let Some(m) = &self.machine {
                    let page = m.status(&query);
                    self.answer_when_durable(move || drop(reply.send(page)));
                }
            }
        }
    }

    /// One batch: apply it and hand its writes to the pipeline (on the blocking pool
    /// unless the environment says inline), then hold its outputs until they are
    /// durable. Earlier batches' outputs are released meanwhile, as their commits land.
    async fn apply(&mut self, inputs: Vec<CoordinatorInput>) -> Result<()> {
        let Some(mut machine) = self.machine.take() else { return Err(Error::internal("coordinator machine missing")) };
        let now = self.clock.now();
        let batch_len = inputs.len();
        self.metrics.observe_batch(batch_len);
        let mut work = std::pin::pin!(self.blocking.run(move || {
            let mut out = Vec::new();
            let result = if inputs.is_empty() {
                machine.handle_timeout(now, &mut out)
            } else {
                machine.handle_batch(now, inputs, &mut out)
            };
            (machine, out, result)
        }));
        let mut pipeline_failed = false;
        let joined = loop {
            tokio::select! {
                joined = &mut work => break joined,
                changed = self.durable.changed(), if !self.held.is_empty() && !pipeline_failed => {
                    pipeline_failed = changed.is_err() || self.release_durable();
                }
            }
        };
        let (machine, out, result) = joined.map_err(|e| Error::internal(format!("coordinator batch panicked: {e}")))?;
        self.machine = Some(machine);
        if let Err(e) = result {
            // The machine is poisoned: its memory may be ahead of storage. Recover a
            // fresh one from what was committed; the callers of every batch not yet
            // durable see their calls fail and retry.
            tracing::error!(channel = "coordinator", error = %e, batch_len, "batch failed; recovering from storage");
            return self.recover().await;
        }
        if pipeline_failed {
            return self.recover().await;
        }
        tracing::trace!(channel = "coordinator", batch_len, outputs = out.len(), "batch applied");
        self.held.hold(self.pipeline.enqueued(), Held { now, outputs: out, answer: None });
        if self.release_durable() {
            return self.recover().await;
        }
        Ok(())
    }

    /// Holds `answer` until everything the machine has applied so far is durable.
    fn answer_when_durable(&mut self, answer: impl FnOnce() + Send + 'static) {
        let held = Held { now: self.clock.now(), outputs: Vec::new(), answer: Some(Box::new(answer)) };
        self.held.hold(self.pipeline.enqueued(), held);
        if self.release_durable() {
            // Noticed again (and recovered from) at the next durability change or batch.
            tracing::debug!(channel = "coordinator", "storage pipeline failed; answers held");
        }
    }

    /// Releases every held batch whose writes are durable, in order. Returns whether the
    /// pipeline failed (then nothing is released; the caller recovers).
    fn release_durable(&mut self) -> bool {
        let durability = self.durable.borrow_and_update().clone();
        let Ok(ready) = self.held.release(&durability) else { return true };
        for held in ready {
            self.release(held.now, held.outputs);
            if let Some(answer) = held.answer {
                answer();
            }
        }
        false
    }

    /// After a failed batch or commit: drops every held output (their callers see their
    /// calls fail and retry), waits for the pipeline to settle, and rebuilds the machine
    /// from what storage committed.
    async fn recover(&mut self) -> Result<()> {
        let failure = self.durable.borrow().failed.clone();
        let held = self.held.clear();
        tracing::error!(channel = "coordinator", failure = ?failure, held, "recovering the coordinator from storage");
        self.pending_registers.clear();
        self.pending_beats.clear();
        self.pending_requests.clear();
        self.machine = None;
        let pipeline = Arc::clone(&self.pipeline);
        self.blocking
            .run(move || {
                pipeline.drain_blocking();
                pipeline.reset();
            })
            .await
            .map_err(|e| Error::internal(format!("settling the storage pipeline panicked: {e}")))?;
        let _ = self.durable.borrow_and_update();
        let storage = Arc::clone(&self.pipeline) as Arc<dyn Storage>;
        self.machine = Some(Coordinator::recover(storage, self.settings.clone(), self.clock.now())?);
        Ok(())
    }

    /// At shutdown: waits for the writes in flight and releases what they hold.
    async fn finish(mut self) -> Result<()> {
        let pipeline = Arc::clone(&self.pipeline);
        let failed = self
            .blocking
            .run(move || pipeline.drain_blocking())
            .await
            .map_err(|e| Error::internal(format!("settling the storage pipeline panicked: {e}")))?;
        match failed {
            Some(reason) => Err(Error::internal(format!("the last commits failed: {reason}"))),
            None => {
                self.release_durable();
                Ok(())
            }
        }
    }

    /// The events an operator should see in the log: registrations and declarations of
    /// failure (with how long the worker had been silent).
    fn log_event(&self, event: &HistoryEvent) {
        match event {
            HistoryEvent::Registered { worker, incarnation } => {
                tracing::info!(channel = "register", event = "worker_registered", %worker, %incarnation,
                    "worker {worker} registered as {incarnation}");
            }
            HistoryEvent::DeclaredFailed { worker, incarnation } => {
                let silent_ms = self
                    .last_beats
                    .get(worker)
                    .map(|at| tokio::time::Instant::now().saturating_duration_since(*at).as_millis() as u64);
                tracing::warn!(channel = "heartbeat", event = "worker_declared_failed", %worker, %incarnation,
                    last_beat_ms_ago = silent_ms,
                    "worker {worker} ({incarnation}) declared failed{}; its leases are re-queued",
                    silent_ms.map(|ms| format!(", its last beat {ms} ms ago")).unwrap_or_default());
            }
            _ => {}
        }
    }

    /// Refreshes the gauges from the machine's counts, at most once per
    /// [`GAUGE_REFRESH`] (a scrape reads what is there and never waits for the driver).
    fn refresh_gauges(&mut self) {
        let now = tokio::time::Instant::now();
        if self.gauges_at.is_some_and(|at| now.saturating_duration_since(at) < GAUGE_REFRESH) {
            return;
        }
        self.gauges_at = Some(now);
        if let Some(m) = &self.machine {
            // The dashboard shows the first workers and the current jobs; the gauges need
            // only the totals.
            let query = match self.dashboard {
                Some(_) => StatusQuery {
                    workers_max: DASHBOARD_WORKERS_MAX,
                    jobs_max: DASHBOARD_JOBS_MAX,
                    ..StatusQuery::default()
                },
                None => StatusQuery { workers_max: 0, jobs_max: 0, ..StatusQuery::default() },
            };
            let page = m.status(&query);
            self.metrics.refresh(&page);
            if let Some(dashboard) = &self.dashboard {
                dashboard.publish(&page, self.clock.now().wall);
            }
            // One line a minute of what the cluster is doing.
            let (at, committed_before) = *self.summary.get_or_insert((now, page.totals.tasks.committed));
            if now.saturating_duration_since(at) >= SUMMARY_EVERY {
                let t = &page.totals;
                let per_s = f64::from(t.tasks.committed.saturating_sub(committed_before))
                    / now.saturating_duration_since(at).as_secs_f64();
                tracing::info!(
                    channel = "coordinator",
                    event = "summary",
                    workers_active = t.workers_active,
                    workers_failed = t.workers_failed,
                    tasks_queued = t.tasks.queued,
                    tasks_leased = t.tasks.leased,
                    tasks_committed = t.tasks.committed,
                    tasks_dead_lettered = t.tasks.dead_lettered,
                    committed_per_s = per_s,
                    "{} workers active ({} failed); tasks: {} queued, {} leased, {} committed ({per_s:.1}/s over the last minute), {} dead-lettered",
                    t.workers_active,
                    t.workers_failed,
                    t.tasks.queued,
                    t.tasks.leased,
                    t.tasks.committed,
                    t.tasks.dead_lettered
                );
                self.summary = Some((now, t.tasks.committed));
            }
        }
        self.last_beats.retain(|_, at| now.saturating_duration_since(*at) < BEATS_FORGOTTEN_AFTER);
    }

    fn release(&mut self, now: Now, out: Vec<CoordinatorOutput>) {
        let mut frames: BTreeMap<WorkerId, pb::CoordinatorFrame> = BTreeMap::new();
        // The batch's events first, in one write: recorded before anything they caused
        // leaves.
        let events = out.iter().filter_map(|o| match o {
            CoordinatorOutput::Event(event) => Some(event.clone()),
            _ => None,
        });
        self.stamper.emit_all(&*self.emitter, now.wall, events);
        let ended = out.iter().any(|o| {
            matches!(
                o,
                CoordinatorOutput::Event(
                    HistoryEvent::Committed { .. } | HistoryEvent::DeadLettered { .. } | HistoryEvent::Cancelled { .. }
                )
            )
        });
        if ended {
            self.tasks_ended.send_modify(|n| *n += 1);
        }
        for output in &out {
            match output {
                CoordinatorOutput::Event(event) => {
                    self.metrics.observe_event(event);
                    self.log_event(event);
                    if let Some(dashboard) = &self.dashboard {
                        dashboard.event(event, now.wall);
                    }
                }
                CoordinatorOutput::Send { message: ToWorker::SubmitAck { verdict, .. }, .. } => {
                    self.metrics.observe_verdict(*verdict)
                }
                _ => {}
            }
        }
        for output in out {
            match output {
                CoordinatorOutput::Event(_) => {}
                CoordinatorOutput::Notice(notice) => log_notice(&notice),
                CoordinatorOutput::Reply { request, reply } => {
                    if let Some(tx) = self.pending_requests.remove(&request) {
                        let _ = tx.send(reply);
                    }
                }
                CoordinatorOutput::Send { to, message } => match message {
                    ToWorker::Registered { .. } | ToWorker::RegisterRejected { .. } => {
                        let waiting = self.pending_registers.get_mut(&to);
                        if let Some(tx) = waiting.and_then(VecDeque::pop_front) {
                            let _ = tx.send(message);
                        }
                        if self.pending_registers.get(&to).is_some_and(VecDeque::is_empty) {
                            self.pending_registers.remove(&to);
                        }
                    }
                    ToWorker::HeartbeatAck { incarnation, beat_seq, .. } => {
                        if let Some(waiting) = self.pending_beats.remove(&(to, incarnation, beat_seq)) {
                            for tx in waiting {
                                let _ = tx.send(message.clone());
                            }
                        }
                    }
                    ToWorker::Assign(a) => frames.entry(to).or_default().assigns.push(wire::assign_to_wire(a)),
                    ToWorker::SubmitAck { task, token, verdict } => {
                        frames.entry(to).or_default().acks.push(pb::SubmitAck {
                            task: Some(task.into()),
                            token: token.get(),
                            verdict: wire::verdict_to_wire(verdict).into(),
                        })
                    }
                    ToWorker::Control(c) => {
                        let sent = self
                            .links
                            .get(&to)
                            .and_then(|l| l.control.as_ref())
                            .map(|(_, _, tx)| tx.try_send(wire::control_to_wire(c)).is_ok());
                        if sent != Some(true) {
                            tracing::debug!(channel = "control", worker = %to, "control message dropped: no open control stream");
                        }
                    }
                },
            }
        }
        for (to, frame) in frames {
            // Cut by bytes: a batch may hold far more than one message of assignments.
            for frame in wire::coordinator_frames(frame.acks, frame.assigns, self.max_message_bytes) {
                let sent =
                    self.links.get(&to).and_then(|l| l.work.as_ref()).map(|(_, _, tx)| tx.try_send(Ok(frame)).is_ok());
                if sent != Some(true) {
                    // Lost assignments are re-queued at the worker's next beat; lost acks
                    // are answered again when the worker re-sends its submit.
                    tracing::debug!(channel = "work", worker = %to, "work frame dropped: no open work stream or queue full");
                }
            }
        }
    }
}

/// Logs what the machine wants an operator to hear (it rate-limits these itself).
fn log_notice(notice: &Notice) {
    match notice {
        Notice::ClockOffset { worker, offset_ms, budget_ms } => tracing::warn!(channel = "heartbeat",
            event = "clock_offset", worker = %worker, offset_ms, budget_ms,
            "worker {worker}'s clock is {offset_ms} ms off the coordinator's (health.clock_skew_budget is {budget_ms} ms): \
             its deadlines are kept on the coordinator's clock; fix its time sync"),
        Notice::MetricsRefused { worker, dropped, reason } => tracing::warn!(channel = "heartbeat",
            event = "metrics_refused", worker = %worker, dropped, %reason, "metric deltas of a beat dropped"),
        Notice::BeatTruncated { worker, reported, kept } => tracing::warn!(channel = "heartbeat",
            event = "beat_truncated", worker = %worker, reported, kept,
            "a beat reported more tasks than the worker's slots allow; the rest were ignored"),
        Notice::JobAbandoned { job, tasks } => tracing::info!(channel = "operator", event = "job_abandoned",
            %job, tasks, "an open job was not sealed within tasks.open_job_timeout; it is deleted"),
        Notice::WorkerForgotten { worker } => tracing::info!(channel = "coordinator", event = "worker_forgotten",
            worker = %worker, "a failed worker's record is deleted (health.failed_worker_retention)"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use rollout_coordinator::TaskSpec;
    use rollout_core::config::Config;

    use super::*;
    use crate::history::MemoryEmitter;
    use crate::test_storage::{GatedStorage, OpenOnDrop};

    fn job(name: &str) -> JobSubmission {
        let spec = TaskSpec {
            plugin: "echo".into(),
            method: "run".into(),
            payload: b"x".to_vec(),
            gpus: 0,
            deadline: None,
            inputs: Vec::new(),
        };
        JobSubmission { name: name.into(), tasks: vec![spec], idempotency_key: None }
    }

    fn driver(storage: GatedStorage, emitter: &Arc<MemoryEmitter>) -> (CoordinatorHandle, watch::Sender<bool>) {
        let (stop, shutdown) = watch::channel(false);
        let (handle, _driver) = spawn_coordinator_driver(CoordinatorDriverOptions {
            storage: Arc::new(storage),
            settings: CoordinatorSettings::from_config(&Config::default()),
            emitter: Arc::clone(emitter) as Arc<dyn EventEmitter>,
            shutdown,
            env: NodeEnv::default(),
            metrics: Default::default(),
            dashboard: None,
        })
        .expect("driver");
        (handle, stop)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_leaves_the_driver_before_its_writes_are_durable() {
        let (storage, gate, _) = GatedStorage::new();
        let emitter = Arc::new(MemoryEmitter::new());
        let (handle, _stop) = driver(storage, &emitter);
        let accepted = handle.operator(OperatorRequest::SubmitJob(job("first"))).await.expect("reply");
        assert!(matches!(accepted, OperatorReply::JobAccepted { existing: false, .. }), "{accepted:?}");
        let events_before = emitter.records().len();

        // The disk stops syncing: the next job is applied (and its commit handed over),
        // but neither its reply, nor its history, nor a status that would show it leaves.
        let _open_at_the_end = OpenOnDrop(Arc::clone(&gate));
        gate.set_shut(true);
        let submit = tokio::spawn({
            let handle = handle.clone();
            async move { handle.operator(OperatorRequest::SubmitJob(job("second"))).await }
        });
        let status = tokio::spawn({
            let handle = handle.clone();
            async move {
                // After the submit has reached the driver (same inbox, so in order).
                tokio::time::sleep(Duration::from_millis(50)).await;
                handle.status(StatusQuery::default()).await
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while gate.waiting() == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the second job's commit never reached the disk");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!submit.is_finished(), "the reply left before its job was durable");
        assert!(!status.is_finished(), "a status answered from memory left before what it shows was durable");
        assert_eq!(emitter.records().len(), events_before, "history left before it was durable");

        gate.set_shut(false);
        let reply = submit.await.expect("join").expect("reply");
        assert!(matches!(reply, OperatorReply::JobAccepted { existing: false, .. }), "{reply:?}");
        let snapshot = status.await.expect("join").expect("status");
        assert_eq!(snapshot.jobs.len(), 2, "the status shows both jobs once they are durable");
        assert!(emitter.records().len() > events_before, "the history follows the commit");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_drops_what_it_held_and_the_driver_recovers_from_storage() {
        let (storage, _gate, fail) = GatedStorage::new();
        let emitter = Arc::new(MemoryEmitter::new());
        let (handle, _stop) = driver(storage, &emitter);
        let first = handle.operator(OperatorRequest::SubmitJob(job("kept"))).await.expect("reply");
        assert!(matches!(first, OperatorReply::JobAccepted { .. }), "{first:?}");

        fail.store(true, Ordering::SeqCst);
        let lost = handle.operator(OperatorRequest::SubmitJob(job("lost"))).await;
        let err = lost.expect_err("a job whose commit failed is not acknowledged");
        assert!(err.to_string().contains("not committed"), "{err}");

        fail.store(false, Ordering::SeqCst);
        let again = handle.operator(OperatorRequest::SubmitJob(job("retried"))).await.expect("reply");
        assert!(matches!(again, OperatorReply::JobAccepted { existing: false, .. }), "{again:?}");
        let names: Vec<String> =
            handle.status(StatusQuery::default()).await.expect("status").jobs.into_iter().map(|j| j.name).collect();
        assert_eq!(names, ["kept", "retried"], "the recovered machine holds exactly what was committed");
    }
}
