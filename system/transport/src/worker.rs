//! The worker driver: one tokio task that owns the [`Worker`] machine.
//!
//! It feeds the machine `Start`, then every answer, stream frame and task end as they
//! arrive, and a `Tick` at [`Worker::poll_timeout`], whether or not the coordinator is
//! reachable (so a cut-off worker self-fences on time: the machine decides). Outputs:
//! Register and Heartbeat become unary calls (each on its own task, answers fed back);
//! Pulls and Submits are batched into one frame of the Work stream; tasks run on the
//! plugin host on the blocking pool.
//!
//! Streams: after each registration the driver opens the Control and Work streams for
//! that incarnation on the worker's single HTTP/2 connection, and closes them when the
//! incarnation ended and its runs stopped (the coordinator then leases the tasks
//! elsewhere at once). A stream that ends is
//! reported to the machine (`WorkerInput::StreamBroken`), whose policy decides: a
//! broken Work stream ends the incarnation (messages lost with it cannot be told apart
//! from ones in flight), a broken Control stream alone is re-opened when the machine
//! says so (`WorkerOutput::OpenControl`, after its jittered backoff) while the Work
//! stream carries on. Registration retries are the machine's own too.
//!
//! Results travel with the Submit (the wire carries the bytes); the driver keeps the
//! bytes of each unacknowledged submit and the coordinator stores them,
//! content-addressed, before the submit reaches its machine.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{Channel as MessageChannel, Outcome, ToCoordinator, ToWorker, WorkerTerms};
use rollout_core::traits::{CancelToken, EventEmitter, PluginCall, PluginError, PluginHost};
use rollout_core::{ContentId, Error, FencingToken, Incarnation, Result, TaskId};
use rollout_proto::transport as pb;
use rollout_proto::transport::coordinator_client::CoordinatorClient;
use rollout_worker::{TaskOutcome, Worker, WorkerInput, WorkerOutput, WorkerSettings};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

use crate::blob_cache::BlobCache;
use crate::coordinator::NodeClock;
use crate::history::Stamper;
use crate::metrics::WorkerMetrics;
use crate::node_env::{BlockingWork, NodeEnv};
use crate::wire;

/// Frames queued towards the coordinator on the Work stream.
const WORK_FRAMES_QUEUED_MAX: usize = 1024;
/// Events queued towards the driver.
const EVENTS_QUEUED_MAX: usize = 65_536;
/// Streams of ended incarnations held open until their runs stopped.
const RETIRED_STREAMS_MAX: usize = 8;
/// Most events handled before the pulls and submits they caused are sent as one frame.
const EVENTS_PER_FRAME_MAX: usize = 4096;

/// What the worker driver needs.
pub struct WorkerRuntimeOptions {
    /// The machine's settings (id, slots, plugins, inventory, timing).
    pub settings: WorkerSettings,
    /// Runs the tasks.
    pub plugins: Arc<dyn PluginHost>,
    /// Where worker-side history events go.
    pub emitter: Arc<dyn EventEmitter>,
    /// Seeds the machine's jitter and the stream reconnect jitter.
    pub rng_seed: u64,
    /// Largest gRPC message sent or accepted.
    pub max_message_bytes: usize,
    /// Set to `true` to stop.
    pub shutdown: watch::Receiver<bool>,
    /// Wall clock and where plugin calls run (`NodeEnv::default()` outside a simulation).
    pub env: NodeEnv,
    /// Where the driver counts calls, registrations, fences and beats (served at
    /// `/metrics` by the caller).
    pub metrics: Arc<WorkerMetrics>,
    /// Where tasks' input blobs are kept (none: tasks that name inputs fail, saying so).
    pub blob_cache: Option<Arc<BlobCache>>,
    /// How to renew the worker's certificate when the machine asks (`settings.credential`
    /// says when); none: a renewal asked for fails.
    pub renewal: Option<crate::renewal::RenewalContext>,
}

impl std::fmt::Debug for WorkerRuntimeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerRuntimeOptions").field("settings", &self.settings).finish_non_exhaustive()
    }
}

type RunKey = (TaskId, FencingToken);

/// One plugin call under way.
struct Run {
    cancel: CancelToken,
    plugin: String,
    started: tokio::time::Instant,
}

/// The worker's link to the coordinator, as its logs tell it: one line per change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    /// Registering, no answer yet.
    Connecting,
    /// Registrations go unanswered (`failures` in a row).
    Unreachable { failures: u64 },
    /// Registered.
    Registered,
}

enum Event {
    RegisterAnswer(std::result::Result<pb::RegisterResponse, tonic::Status>),
    BeatAnswer(Incarnation, std::result::Result<pb::HeartbeatResponse, tonic::Status>, Duration),
    Frame(u64, Incarnation, pb::CoordinatorFrame),
    Control(u64, pb::ControlMessage),
    StreamEnded(u64, StreamChannel, String),
    TaskFinished(RunKey, TaskOutcome, Option<Vec<u8>>),
    Renewed(Result<crate::tls::CertInfo>),
}

/// Which of an incarnation's streams an event is about.
#[derive(Debug, Clone, Copy)]
enum StreamChannel {
    Work,
    Control,
}

/// The Work and Control streams of one incarnation (`session` tells their events
/// from those of streams they replaced).
struct Streams {
    session: u64,
    incarnation: Incarnation,
    work_tx: mpsc::Sender<pb::WorkerFrame>,
    work: JoinHandle<()>,
    /// `None` while a broken Control stream waits for the machine's re-open.
    control: Option<JoinHandle<()>>,
}

impl Drop for Streams {
    fn drop(&mut self) {
        self.work.abort();
        if let Some(control) = &self.control {
            control.abort();
        }
    }
}

/// Runs a worker until shutdown (`Ok`) or until the coordinator refuses it for good
/// (`Err`, e.g. a protocol version mismatch), over `channel` (see
/// [`crate::net::lazy_channel`]).
pub async fn run_worker(opts: WorkerRuntimeOptions, channel: Channel) -> Result<()> {
    let WorkerRuntimeOptions {
        settings,
        plugins,
        emitter,
        rng_seed,
        max_message_bytes,
        mut shutdown,
        env,
        metrics,
        blob_cache,
        renewal,
    } = opts;
    let client = CoordinatorClient::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let (events_tx, mut events) = mpsc::channel(EVENTS_QUEUED_MAX);
    let mut driver = WorkerDriver {
        max_message_bytes,
        id: settings.id.to_string(),
        stamper: Stamper::new(settings.id.as_str()),
        machine: Worker::new(settings, rng_seed),
        clock: NodeClock::start_with(env.wall_clock),
        blocking: env.blocking,
        plugin_time: env.plugin_time,
        client,
        plugins,
        emitter,
        events: events_tx,
        streams: None,
        next_session: 0,
        runs: BTreeMap::new(),
        retired: Vec::new(),
        results: BTreeMap::new(),
        frame: pb::WorkerFrame::default(),
        finished_in_place: VecDeque::new(),
        restarts_seen: BTreeMap::new(),
        link: Link::Connecting,
        metrics,
        blob_cache,
        renewal,
    };
    driver.input(WorkerInput::Start)?;
    loop {
        let deadline = driver
            .machine
            .poll_timeout()
            .map(|at| driver.clock.instant_of(at))
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(1));
        tokio::select! {
            biased;
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    driver.stop();
                    return Ok(());
                }
            }
            event = events.recv() => {
                let Some(event) = event else { return Ok(()) };
                driver.event(event)?;
                // Whatever else already arrived joins the same outgoing frame.
                for _ in 0..EVENTS_PER_FRAME_MAX {
                    match events.try_recv() {
                        Ok(event) => driver.event(event)?,
                        Err(_) => break,
                    }
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                driver.report_restarts()?;
                driver.input(WorkerInput::Tick)?;
            }
        }
        while let Some(event) = driver.finished_in_place.pop_front() {
            driver.event(event)?;
        }
        driver.flush();
    }
}

struct WorkerDriver {
    /// Frames to the coordinator are cut to fit this.
    max_message_bytes: usize,
    id: String,
    machine: Worker,
    stamper: Stamper,
    clock: NodeClock,
    blocking: BlockingWork,
    /// A simulation's plugin run times (none in production).
    plugin_time: Option<crate::node_env::PluginTime>,
    client: CoordinatorClient<Channel>,
    plugins: Arc<dyn PluginHost>,
    emitter: Arc<dyn EventEmitter>,
    events: mpsc::Sender<Event>,
    streams: Option<Streams>,
    /// Streams of ended incarnations, each held open until the runs it had stopped:
    /// the coordinator takes a Work stream closed by this end as proof that the
    /// incarnation runs nothing more, and leases its tasks elsewhere at once.
    retired: Vec<(Streams, BTreeSet<RunKey>)>,
    next_session: u64,
    runs: BTreeMap<RunKey, Run>,
    /// Result bytes of finished runs, kept until their submit is acknowledged.
    results: BTreeMap<RunKey, Vec<u8>>,
    /// Pulls and submits not yet sent (see [`WorkerDriver::flush`]).
    frame: pb::WorkerFrame,
    /// Ends of calls run in place ([`PluginHost::runs_in_place`]), fed to the machine
    /// after the input that started them.
    finished_in_place: VecDeque<Event>,
    /// Each plugin's restarts as last reported to the machine.
    restarts_seen: BTreeMap<String, u64>,
    /// The link as last logged.
    link: Link,
    metrics: Arc<WorkerMetrics>,
    blob_cache: Option<Arc<BlobCache>>,
    renewal: Option<crate::renewal::RenewalContext>,
}

impl WorkerDriver {
    fn event(&mut self, event: Event) -> Result<()> {
        match event {
            Event::RegisterAnswer(Ok(resp)) => match wire::terms_from_wire(resp.settings) {
                Ok(terms) => {
                    let incarnation = Incarnation(resp.incarnation);
                    let failed_before = match self.link {
                        Link::Unreachable { failures } => failures,
                        _ => 0,
                    };
                    tracing::info!(channel = "register", event = "registered", %incarnation,
                        heartbeat_interval = ?terms.heartbeat_interval,
                        worker_self_fence_timeout = ?terms.worker_self_fence_timeout, failed_before,
                        "registered with the coordinator as {incarnation} (a beat every {:?}, self-fence after {:?}{})",
                        terms.heartbeat_interval, terms.worker_self_fence_timeout,
                        if failed_before > 0 { format!("; after {failed_before} unanswered registrations") } else { String::new() });
                    self.link = Link::Registered;
                    self.log_terms(terms);
                    let assigns_sent = resp.assigns_sent;
                    self.input(WorkerInput::Message(ToWorker::Registered { incarnation, terms, assigns_sent }))
                }
                // Without the coordinator's schedule the worker cannot keep its side of
                // failure detection: as final as a refusal.
                Err(e) => self.input(WorkerInput::Message(ToWorker::RegisterRejected {
                    reason: format!("the coordinator's answer is unusable: {e}"),
                })),
            },
            Event::RegisterAnswer(Err(status)) => match status.code() {
                // The coordinator judged the registration and refused it: final.
                Code::FailedPrecondition | Code::PermissionDenied | Code::InvalidArgument => {
                    self.input(WorkerInput::Message(ToWorker::RegisterRejected { reason: status.message().to_owned() }))
                }
                _ => {
                    // Unreachable or restarting: the machine retries with its backoff.
                    // Logged once when the link changes to unreachable, then at debug.
                    self.metrics.register_failed();
                    let now = self.clock.now().mono;
                    let next_ms = self.machine.poll_timeout().map_or(0, |at| at.saturating_since(now).as_millis());
                    match &mut self.link {
                        Link::Unreachable { failures } => {
                            *failures += 1;
                            tracing::debug!(channel = "register", code = ?status.code(), error = %status.message(),
                                failures = *failures, next_attempt_ms = next_ms as u64, "register failed");
                        }
                        link => {
                            *link = Link::Unreachable { failures: 1 };
                            tracing::warn!(channel = "register", event = "coordinator_unreachable", code = ?status.code(),
                                error = %status.message(), next_attempt_ms = next_ms as u64,
                                "the coordinator is unreachable ({}); registering again with backoff, next attempt in about {next_ms} ms",
                                status.message());
                        }
                    }
                    Ok(())
                }
            },
            Event::BeatAnswer(incarnation, Ok(resp), rtt) => {
                self.metrics.beat_acked(rtt.as_secs_f64());
                self.input(WorkerInput::Message(ToWorker::HeartbeatAck {
                    incarnation,
                    beat_seq: resp.beat_seq,
                    reregister: resp.reregister,
                }))
            }
            Event::BeatAnswer(_, Err(status), _) => {
                tracing::debug!(channel = "heartbeat", code = ?status.code(), error = %status.message(), "heartbeat failed");
                Ok(())
            }
            Event::Frame(session, incarnation, frame) => {
                if !self.is_current(session) {
                    return Ok(());
                }
                for ack in frame.acks {
                    match wire::submit_ack_from_wire(ack) {
                        Ok(message) => self.input(WorkerInput::Message(message))?,
                        Err(e) => tracing::warn!(channel = "work", error = %e, "ignoring a malformed ack"),
                    }
                }
                for assign in frame.assigns {
                    match wire::assign_from_wire(incarnation, assign) {
                        Ok(a) => self.input(WorkerInput::Message(ToWorker::Assign(a)))?,
                        Err(e) => tracing::warn!(channel = "work", error = %e, "ignoring a malformed assignment"),
                    }
                }
                Ok(())
            }
            Event::Control(session, message) => {
                if !self.is_current(session) {
                    return Ok(());
                }
                match wire::control_from_wire(message) {
                    Ok(c) => self.input(WorkerInput::Message(ToWorker::Control(c))),
                    Err(e) => {
                        tracing::warn!(channel = "control", error = %e, "ignoring a malformed control message");
                        Ok(())
                    }
                }
            }
            Event::StreamEnded(session, channel, why) => {
                if self.is_current(session) {
                    let broken = match channel {
                        StreamChannel::Work => {
                            // Assigns or acks in flight may be lost, and the coordinator
                            // cannot tell which: the machine ends the incarnation (the
                            // simulator found the credit starvation a silent re-open
                            // causes); the new incarnation opens new streams.
                            tracing::warn!(channel = "work", error = %why,
                                "work stream to the coordinator ended; re-registering");
                            self.streams = None;
                            MessageChannel::Work
                        }
                        StreamChannel::Control => {
                            tracing::info!(channel = "control", error = %why,
                                "control stream to the coordinator ended; re-opening after backoff");
                            if let Some(s) = &mut self.streams {
                                s.control = None;
                            }
                            MessageChannel::Control
                        }
                    };
                    self.input(WorkerInput::StreamBroken(broken))?;
                }
                Ok(())
            }
            Event::TaskFinished(key, outcome, bytes) => {
                let Some(run) = self.runs.remove(&key) else { return Ok(()) };
                let ended = match &outcome {
                    TaskOutcome::Succeeded { .. } => "succeeded",
                    TaskOutcome::Failed { .. } => "failed",
                    TaskOutcome::Cancelled => "cancelled",
                };
                self.metrics.call_ended(&run.plugin, ended, run.started.elapsed().as_secs_f64());
                self.retired.retain_mut(|(_, runs)| {
                    runs.remove(&key);
                    !runs.is_empty()
                });
                if let Some(bytes) = bytes {
                    self.results.insert(key, bytes);
                }
                self.input(WorkerInput::TaskFinished { task: key.0, token: key.1, outcome })
            }
            Event::Renewed(Ok(info)) => self.input(WorkerInput::CertificateRenewed(rollout_worker::Credential {
                not_before: info.not_before,
                not_after: info.not_after,
            })),
            Event::Renewed(Err(_)) => self.input(WorkerInput::RenewalFailed),
        }
    }

    fn is_current(&self, session: u64) -> bool {
        self.streams.as_ref().is_some_and(|s| s.session == session)
    }

    /// Says so when the coordinator's terms differ from this worker's config (the
    /// coordinator's win).
    fn log_terms(&self, terms: WorkerTerms) {
        let configured = self.machine.settings().terms();
        if terms != configured {
            tracing::warn!(channel = "register", event = "worker_terms_adopted",
                heartbeat_interval = ?terms.heartbeat_interval,
                configured_heartbeat_interval = ?configured.heartbeat_interval,
                worker_self_fence_timeout = ?terms.worker_self_fence_timeout,
                configured_worker_self_fence_timeout = ?configured.worker_self_fence_timeout,
                clock_skew_budget = ?terms.clock_skew_budget,
                configured_clock_skew_budget = ?configured.clock_skew_budget,
                max_result_bytes = terms.max_result_bytes,
                configured_max_result_bytes = configured.max_result_bytes,
                "following the coordinator's health settings and result limit, which differ from this worker's config");
        }
    }

    /// Tells the machine (and this worker's `/metrics`) of plugin restarts since the
    /// last look. Bounded by the host's plugins; a count that went down (a host
    /// replaced) is taken as the new base.
    fn report_restarts(&mut self) -> Result<()> {
        for (plugin, total) in self.plugins.restarts() {
            let seen = self.restarts_seen.entry(plugin.clone()).or_insert(0);
            let count = total.saturating_sub(*seen);
            *seen = total;
            if count > 0 {
                tracing::warn!(channel = "plugin", event = "plugin_restarted", %plugin, count, total,
                    "plugin {plugin} was started again {count} time(s) ({total} in all): see its sidecar_exited / \
                     sidecar_restart_backoff lines");
                self.metrics.plugin_restarted(&plugin, count);
                self.input(WorkerInput::PluginRestarted { plugin, count })?;
            }
        }
        Ok(())
    }

    /// Feeds one input, then carries out the outputs in order.
    fn input(&mut self, input: WorkerInput) -> Result<()> {
        let now = self.clock.now();
        let mut out = Vec::new();
        let acked = match &input {
            WorkerInput::Message(ToWorker::SubmitAck { task, token, .. }) => Some((*task, *token)),
            _ => None,
        };
        self.machine.handle(now, input, &mut out);
        if let Some((task, token)) = acked
            && !self.machine.awaits_ack(task, token)
        {
            self.results.remove(&(task, token));
        }
        // Streams follow the registration: open them for a new incarnation before any
        // output (the first Pull) needs them; close them once the worker fenced and the
        // runs it cancelled stopped. (A broken Control stream is re-opened on
        // `OpenControl`, not here.)
        let incarnation = self.machine.incarnation();
        self.metrics.set_registered(incarnation.is_some());
        if incarnation != self.streams.as_ref().map(|s| s.incarnation) {
            if let Some(old) = self.streams.take() {
                self.retire_streams(old);
            }
            // What was meant for the old incarnation's stream goes nowhere (a fence
            // withholds submits on purpose).
            self.frame = pb::WorkerFrame::default();
            if let Some(inc) = incarnation {
                self.open_streams(inc);
            }
        }
        // The input's events first, in one write, before anything they describe runs or
        // leaves (starts and sends come after; frames go out at the next flush).
        let events = out.iter().filter_map(|o| match o {
            WorkerOutput::Event(event) => Some(event.clone()),
            _ => None,
        });
        self.stamper.emit_all(&*self.emitter, now.wall, events);
        for output in out {
            match output {
                WorkerOutput::Send(ToCoordinator::Register(reg)) => {
                    self.metrics.register_sent();
                    let mut request = tonic::Request::new(wire::register_to_wire(&self.id, reg));
                    request.set_timeout(self.machine.settings().register_timeout);
                    let (mut client, tx) = (self.client.clone(), self.events.clone());
                    tokio::spawn(async move {
                        let answer = client.register(request).await.map(tonic::Response::into_inner);
                        let _ = tx.send(Event::RegisterAnswer(answer)).await;
                    });
                }
                WorkerOutput::Send(ToCoordinator::Heartbeat(beat)) => {
                    let incarnation = beat.incarnation;
                    let mut request = tonic::Request::new(wire::heartbeat_to_wire(&self.id, beat));
                    // A beat unanswered for two intervals (the schedule the machine follows
                    // now) is lost; the machine copes.
                    request.set_timeout(self.machine.terms().heartbeat_interval.saturating_mul(2));
                    let (mut client, tx) = (self.client.clone(), self.events.clone());
                    tokio::spawn(async move {
                        let sent = tokio::time::Instant::now();
                        let answer = client.heartbeat(request).await.map(tonic::Response::into_inner);
                        let _ = tx.send(Event::BeatAnswer(incarnation, answer, sent.elapsed())).await;
                    });
                }
                WorkerOutput::Send(ToCoordinator::Pull(pull)) => {
                    self.frame
                        .pulls
                        .push(pb::Pull { free_slots: pull.free_slots, assigns_through: pull.assigns_through });
                }
                WorkerOutput::Send(ToCoordinator::Submit(submit)) => {
                    let key = (submit.task, submit.token);
                    let outcome = match submit.outcome {
                        Outcome::Succeeded { .. } => match self.results.get(&key) {
                            Some(bytes) => pb::submit::Outcome::Result(bytes.clone()),
                            None => {
                                tracing::error!(channel = "work", task = %key.0, "result bytes missing; submit skipped");
                                continue;
                            }
                        },
                        Outcome::Failed { message } => {
                            pb::submit::Outcome::Failure(pb::TaskFailure { message, detail: String::new() })
                        }
                    };
                    self.frame.submits.push(pb::Submit {
                        task: Some(key.0.into()),
                        token: key.1.get(),
                        outcome: Some(outcome),
                    });
                }
                WorkerOutput::StartTask(assignment) => self.start_task(assignment),
                WorkerOutput::CancelTask { task, token } => {
                    if let Some(run) = self.runs.get(&(task, token)) {
                        run.cancel.cancel();
                    }
                }
                WorkerOutput::Event(HistoryEvent::SelfFenced { incarnation, .. }) => {
                    self.metrics.fenced();
                    tracing::warn!(channel = "register", event = "self_fenced", %incarnation,
                        "fenced itself: {incarnation} ended (no heartbeat acknowledged within the self-fence \
                         timeout, or its Work stream broke); its runs are cancelled and their results withheld; \
                         registering again");
                    if self.link == Link::Registered {
                        self.link = Link::Connecting;
                    }
                }
                WorkerOutput::Event(_) => {}
                WorkerOutput::OpenControl { incarnation } => self.reopen_control(incarnation),
                WorkerOutput::Fatal(message) => {
                    tracing::error!(channel = "register", %message, "the coordinator refused this worker");
                    self.stop();
                    return Err(Error::Fatal(rollout_core::Fatal::InvalidInput(message)));
                }
                WorkerOutput::RenewCertificate => match self.renewal.clone() {
                    Some(renewal) => {
                        let tx = self.events.clone();
                        tokio::spawn(async move {
                            let _ = tx.send(Event::Renewed(renewal.renew().await)).await;
                        });
                    }
                    None => {
                        let tx = self.events.clone();
                        let refused = Error::internal("this worker has no certificate files to renew");
                        tokio::spawn(async move {
                            let _ = tx.send(Event::Renewed(Err(refused))).await;
                        });
                    }
                },
                WorkerOutput::CertificateExpired { not_after } => {
                    let message = format!(
                        "the worker's certificate expired at {} unrenewed; it stopped its tasks. A new certificate \
                         needs a token: rollout worker --join ADDR --token T (rollout token create --worker {})",
                        crate::enroll::utc_text(not_after),
                        self.id
                    );
                    tracing::error!(channel = "tls", event = "certificate_expired", worker = %self.id, "{message}");
                    self.stop();
                    return Err(Error::Fatal(rollout_core::Fatal::PermissionDenied(message)));
                }
            }
        }
        self.prune_results();
        Ok(())
    }

    /// Sends the pulls and submits gathered since the last flush, as Work frames cut to
    /// fit the message limit (results of up to a megabyte each add up fast).
    fn flush(&mut self) {
        if self.frame.pulls.is_empty() && self.frame.submits.is_empty() {
            return;
        }
        let frame = std::mem::take(&mut self.frame);
        let Some(s) = &self.streams else {
            tracing::debug!(channel = "work", "work frame dropped: no open stream");
            return;
        };
        for frame in wire::worker_frames(frame, self.max_message_bytes) {
            if s.work_tx.try_send(frame).is_err() {
                // The submits are re-sent until acknowledged; the next pull follows.
                tracing::debug!(channel = "work", "work frame dropped: stream full or closed");
            }
        }
    }

    /// Drops result bytes whose submit is no longer pending (withheld by a fence, or
    /// never sent); acknowledged ones are dropped as their ack arrives.
    fn prune_results(&mut self) {
        if self.results.len() > self.machine.unacknowledged_count() {
            let keep: std::collections::BTreeSet<RunKey> = self.machine.unacknowledged_submits().collect();
            self.results.retain(|k, _| keep.contains(k));
        }
    }

    fn open_streams(&mut self, incarnation: Incarnation) {
        let session = self.next_session;
        self.next_session += 1;
        let (work_tx, work_rx) = mpsc::channel(WORK_FRAMES_QUEUED_MAX);
        let hello = pb::WorkerFrame {
            hello: Some(pb::WorkHello { worker_id: self.id.clone(), incarnation: incarnation.get() }),
            ..Default::default()
        };
        let _ = work_tx.try_send(hello);
        let (mut client, tx) = (self.client.clone(), self.events.clone());
        let work = tokio::spawn(async move {
            let why = match client.work(ReceiverStream::new(work_rx)).await {
                Ok(resp) => {
                    let mut inbound = resp.into_inner();
                    loop {
                        match inbound.message().await {
                            Ok(Some(frame)) => {
                                if tx.send(Event::Frame(session, incarnation, frame)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break "closed by the coordinator".to_owned(),
                            Err(status) => break status.to_string(),
                        }
                    }
                }
                Err(status) => status.to_string(),
            };
            let _ = tx.send(Event::StreamEnded(session, StreamChannel::Work, why)).await;
        });
        let control = Some(self.spawn_control(session, incarnation));
        tracing::info!(channel = "work", %incarnation, session, "streams opened");
        self.streams = Some(Streams { session, incarnation, work_tx, work, control });
    }

    /// Subscribes to the Control stream of `incarnation`; its end is reported as an event.
    fn spawn_control(&self, session: u64, incarnation: Incarnation) -> JoinHandle<()> {
        let (mut client, tx) = (self.client.clone(), self.events.clone());
        let subscribe = pb::ControlSubscribe { worker_id: self.id.clone(), incarnation: incarnation.get() };
        tokio::spawn(async move {
            let why = match client.control(subscribe).await {
                Ok(resp) => {
                    let mut inbound = resp.into_inner();
                    loop {
                        match inbound.message().await {
                            Ok(Some(message)) => {
                                if tx.send(Event::Control(session, message)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(None) => break "closed by the coordinator".to_owned(),
                            Err(status) => break status.to_string(),
                        }
                    }
                }
                Err(status) => status.to_string(),
            };
            let _ = tx.send(Event::StreamEnded(session, StreamChannel::Control, why)).await;
        })
    }

    /// The machine's re-open of a broken Control stream, if its streams are still up.
    fn reopen_control(&mut self, incarnation: Incarnation) {
        let Some(s) = &self.streams else { return };
        if s.incarnation != incarnation || s.control.is_some() {
            return;
        }
        let control = self.spawn_control(s.session, incarnation);
        tracing::info!(channel = "control", %incarnation, "control stream re-opened");
        if let Some(s) = &mut self.streams {
            s.control = Some(control);
        }
    }

    fn start_task(&mut self, a: rollout_core::protocol::Assignment) {
        let key = (a.task, a.token);
        let cancel = CancelToken::new();
        self.runs.insert(
            key,
            Run { cancel: cancel.clone(), plugin: a.plugin.clone(), started: tokio::time::Instant::now() },
        );
        self.metrics.call_started();
        let deadline = a.deadline;
        let inputs = a.inputs;
        let mut call =
            PluginCall { plugin: a.plugin, method: a.method, payload: a.payload, deadline, inputs: Vec::new() };
        let simulated = self.plugin_time.as_ref().map(|t| (t.0)(&call));
        if inputs.is_empty() && simulated.is_none() && self.plugins.runs_in_place(&call.plugin) {
            // No thread hand-off, no timer: the call returns at once.
            let (outcome, bytes) = task_outcome(self.plugins.call(&call, &cancel));
            self.finished_in_place.push_back(Event::TaskFinished(key, outcome, bytes));
            return;
        }
        let (plugins, tx, blocking) = (Arc::clone(&self.plugins), self.events.clone(), self.blocking);
        let (cache, mut client) = (self.blob_cache.clone(), self.client.clone());
        tokio::spawn(async move {
            // The task's input blobs first, each from the cache or fetched once; the
            // fetch counts against the task's deadline like the call.
            let started = tokio::time::Instant::now();
            let mut held = Vec::new();
            let mut fetch_error = None;
            if !inputs.is_empty() {
                match &cache {
                    None => {
                        fetch_error =
                            Some("this worker has no blob cache, so it cannot run tasks with inputs".to_owned())
                    }
                    Some(cache) => {
                        for id in &inputs {
                            let hold = tokio::time::timeout(deadline, cache.hold(*id, &mut client)).await;
                            match hold {
                                Ok(Ok(path)) => {
                                    held.push(*id);
                                    call.inputs.push(path);
                                }
                                Ok(Err(e)) => {
                                    fetch_error = Some(e);
                                    break;
                                }
                                Err(_) => {
                                    fetch_error =
                                        Some(format!("input blob {id}: not fetched within the task's deadline"));
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            let result = match fetch_error {
                Some(message) => Err(PluginError::Failed { message, detail: None }),
                None => {
                    let blocking_cancel = cancel.clone();
                    let run = async move {
                        let result = blocking.run(move || plugins.call(&call, &blocking_cancel)).await;
                        if let Some(lasts) = simulated {
                            tokio::time::sleep(lasts).await;
                        }
                        result
                    };
                    let left = rollout_worker::plugin_stop_after(deadline).saturating_sub(started.elapsed());
                    // The host is asked to honour the deadline; if it does not, the
                    // driver stops waiting at the deadline plus the grace every driver
                    // gives (the simulator too) and reports the attempt failed. (Biased:
                    // a call that finished is never reported late, and the choice draws
                    // no randomness.)
                    tokio::select! {
                        biased;
                        joined = run => joined.unwrap_or_else(|e| Err(PluginError::Crashed(format!("plugin call panicked: {e}")))),
                        () = tokio::time::sleep(left) => {
                            cancel.cancel();
                            Err(PluginError::DeadlineExceeded(deadline))
                        }
                    }
                }
            };
            if let Some(cache) = &cache {
                for id in &held {
                    cache.release(id);
                }
            }
            let (outcome, bytes) = task_outcome(result);
            let _ = tx.send(Event::TaskFinished(key, outcome, bytes)).await;
        });
    }

    /// Cancels every run and closes the streams.
    fn stop(&mut self) {
        for run in self.runs.values() {
            run.cancel.cancel();
        }
        self.streams = None;
        self.retired.clear();
    }

    /// Closes the streams of an incarnation that ended once its runs (cancelled by the
    /// machine) have stopped; at once if none is left. At most
    /// [`RETIRED_STREAMS_MAX`] wait (each run ends by its deadline and grace anyway).
    fn retire_streams(&mut self, streams: Streams) {
        let runs: BTreeSet<RunKey> = self.runs.keys().copied().collect();
        if runs.is_empty() {
            return;
        }
        if self.retired.len() >= RETIRED_STREAMS_MAX {
            self.retired.remove(0);
        }
        self.retired.push((streams, runs));
    }
}

/// What the machine hears of a call's end, and the result bytes to keep for its submit.
/// (The machine turns a result above `limits.max_result_bytes` into a failure, and then
/// no bytes travel with its submit.)
fn task_outcome(result: std::result::Result<Vec<u8>, PluginError>) -> (TaskOutcome, Option<Vec<u8>>) {
    match result {
        Ok(bytes) => {
            let outcome = TaskOutcome::Succeeded { result: ContentId::of(&bytes), size_bytes: bytes.len() as u64 };
            (outcome, Some(bytes))
        }
        Err(PluginError::Cancelled) => (TaskOutcome::Cancelled, None),
        Err(e) => (TaskOutcome::Failed { message: e.to_string() }, None),
    }
}
