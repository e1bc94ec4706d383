//! The worker state machine.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, SystemTime};

use rollout_core::health::next_due_at;
use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{
    Assignment, Channel, Control, Heartbeat, Outcome, Pull, Register, Submit, ToCoordinator, ToWorker, WorkerTerms,
};
use rollout_core::rng::SplitMix64;
use rollout_core::text::truncate_at_char_boundary;
use rollout_core::{FencingToken, Incarnation, JobId, Mono, Now, PROTOCOL_VERSION, TaskId};

use crate::backoff::Backoff;
use crate::io::{TaskOutcome, WorkerInput, WorkerOutput};
use crate::metrics::{self, Metrics};
use crate::settings::{Credential, WorkerSettings, renew_at};

/// Finished-but-unacknowledged submits allowed per slot. When the backlog reaches
/// `slots ×` this, the worker reports no free slots until acks arrive: a coordinator
/// that stops answering submits cannot make the worker hold results without bound.
pub use rollout_core::protocol::UNACKED_SUBMITS_PER_SLOT;
/// Most heartbeats whose send time is remembered. Beats older than the self-fence
/// timeout are forgotten anyway (an ack for one could not keep the worker alive); this
/// caps the map should `Snapshot` commands arrive in a flood.
pub const OUTSTANDING_BEATS_MAX: usize = 256;
/// Most Register send times remembered in one registration round (same reasoning).
const REGISTER_SENDS_MAX: usize = 64;
/// Mixed into the seed for [`Worker::boot`], so drawing it leaves the jitter sequence as it was.
const BOOT_SALT: u64 = 0xb007_1d5e_ed00_0001;
/// Mixed into the seed for the renewal's jitter, a sequence of its own for the same reason.
const RENEW_SALT: u64 = 0x5245_4e45_5741_4c00;
/// The failure message submitted when the plugin host cancels a run on its own.
pub const CANCELLED_BY_HOST_MESSAGE: &str = "cancelled by the plugin host";

/// One run on the plugin host: a task under one lease.
type RunKey = (TaskId, FencingToken);

/// Where a worker is in its life, as [`Worker::phase`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Created, waiting for [`WorkerInput::Start`].
    NotStarted,
    /// Registering: a Register is in flight, or the next one waits for its backoff
    /// delay (also after a fence).
    Unregistered,
    /// Registered under [`Worker::incarnation`]: beating, pulling, running tasks.
    Registered,
    /// Registration was refused for good ([`WorkerOutput::Fatal`] was emitted); the
    /// machine only reports the end of runs it had already cancelled.
    Stopped,
}

/// The worker's sans-IO state machine: registration, heartbeats, self-fencing, pulls,
/// assignments and submits. See the crate documentation for the contract.
#[derive(Debug)]
pub struct Worker {
    settings: WorkerSettings,
    /// What the worker follows: its config's terms until a coordinator answers its
    /// Register, then that coordinator's.
    terms: WorkerTerms,
    rng: SplitMix64,
    backoff: Backoff,
    state: State,
    /// The highest incarnation ever adopted; older `Registered` answers are stale.
    highest_incarnation: Option<Incarnation>,
    /// This process's identity in every Register, drawn once from the seed.
    boot: u64,
    /// Set by a fence, cleared by the next registration.
    self_fenced: bool,
    /// Runs on the plugin host whose result the worker will submit.
    running: BTreeMap<RunKey, RunningTask>,
    /// Runs the worker cancelled (control channel or fence), awaiting their
    /// `TaskFinished`; their results are withheld. Value: the metrics plugin key.
    stopping: BTreeMap<RunKey, String>,
    /// Submits sent but not yet answered by a `SubmitAck`, re-sent until they are.
    unacked: BTreeMap<RunKey, PendingSubmit>,
    /// `unacked` in re-send order: `(last_sent_at, key)` of each, so timers and
    /// [`Worker::poll_timeout`] look at the due ones only (a worker may hold thousands).
    resend_order: BTreeSet<(Mono, RunKey)>,
    metrics: Metrics,
    metrics_shipped_at: Mono,
    /// The certificate's upkeep, when the settings carry one.
    renewal: Option<Renewal>,
}

/// Keeping the worker's certificate alive: when to ask for a new one, and what is
/// outstanding. Due times live on the wall clock (a certificate's validity is wall
/// time); their monotonic equivalents, for [`Worker::poll_timeout`], are refreshed from
/// each input's `now`.
#[derive(Debug)]
struct Renewal {
    credential: Credential,
    due: SystemTime,
    step: RenewStep,
    backoff: Backoff,
    rng: SplitMix64,
    /// `due` (while waiting) or the retry, and the expiry, as monotonic instants.
    next_mono: Option<Mono>,
    expires_mono: Mono,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RenewStep {
    /// Until `due`.
    Waiting,
    /// A [`WorkerOutput::RenewCertificate`] is out.
    InFlight,
    /// The last attempt failed; the next one goes out then.
    RetryAt(Mono),
}

fn unit_jitter(rng: &mut SplitMix64) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Debug)]
enum State {
    NotStarted,
    Unregistered(Registering),
    Registered(Session),
    Stopped,
}

#[derive(Debug)]
struct Registering {
    step: RegisterStep,
    /// When this round's Registers were sent, oldest first; only those sent less than
    /// the self-fence timeout ago are kept (an answer to an older one is useless).
    sent_at: VecDeque<Mono>,
}

#[derive(Debug, Clone, Copy)]
enum RegisterStep {
    /// A Register is out; at `timeout_at` it counts as failed and a retry is scheduled.
    AwaitingAnswer { timeout_at: Mono },
    /// The next Register goes out at this instant.
    SendAt(Mono),
}

#[derive(Debug)]
struct Session {
    incarnation: Incarnation,
    next_beat_seq: u64,
    next_beat_at: Mono,
    /// Send time of each beat not yet acknowledged, by `beat_seq`.
    outstanding_beats: BTreeMap<u64, Mono>,
    /// The self-fence clock: the send time of the latest acknowledged beat (or of the
    /// Register that the registration answered).
    last_acked_sent_at: Mono,
    assigns_through: u64,
    draining: bool,
    /// The broken Control stream is re-opened at this instant.
    control_reopen_at: Option<Mono>,
    control_backoff: Backoff,
}

#[derive(Debug)]
struct RunningTask {
    /// The plugin name metrics are filed under (bounded by the advertised plugins).
    metrics_plugin: String,
    started_at: Mono,
}

#[derive(Debug)]
struct PendingSubmit {
    submit: Submit,
    last_sent_at: Mono,
}

impl Worker {
    /// A worker that does nothing until [`WorkerInput::Start`]. All jitter is drawn
    /// from a [`SplitMix64`] seeded with `rng_seed`: same settings, seed and inputs,
    /// same outputs.
    pub fn new(settings: WorkerSettings, rng_seed: u64) -> Self {
        let backoff = Backoff::new(settings.reconnect_backoff_initial, settings.reconnect_backoff_max);
        let settings_credential = settings.credential;
        let renew_retry = (settings.renew_retry_initial, settings.renew_retry_max);
        Worker {
            terms: settings.terms(),
            settings,
            rng: SplitMix64::new(rng_seed),
            backoff,
            state: State::NotStarted,
            highest_incarnation: None,
            boot: SplitMix64::new(rng_seed ^ BOOT_SALT).next_u64(),
            self_fenced: false,
            running: BTreeMap::new(),
            stopping: BTreeMap::new(),
            unacked: BTreeMap::new(),
            resend_order: BTreeSet::new(),
            metrics: Metrics::default(),
            metrics_shipped_at: Mono::ZERO,
            renewal: settings_credential.map(|credential| {
                let mut rng = SplitMix64::new(rng_seed ^ RENEW_SALT);
                Renewal {
                    credential,
                    due: renew_at(credential.not_before, credential.not_after, unit_jitter(&mut rng)),
                    step: RenewStep::Waiting,
                    backoff: Backoff::new(renew_retry.0, renew_retry.1),
                    rng,
                    next_mono: None,
                    expires_mono: Mono::ZERO,
                }
            }),
        }
    }

    /// When a worker made with `rng_seed` first asks to renew `credential`
    /// (deterministic in the seed; later renewals draw on).
    pub fn first_renewal_at(credential: Credential, rng_seed: u64) -> SystemTime {
        let mut rng = SplitMix64::new(rng_seed ^ RENEW_SALT);
        renew_at(credential.not_before, credential.not_after, unit_jitter(&mut rng))
    }

    /// The certificate the machine looks after, as last renewed.
    pub fn credential(&self) -> Option<Credential> {
        self.renewal.as_ref().map(|r| r.credential)
    }

    /// Applies one input at time `now`; appends the outputs, in the order the driver
    /// must carry them out. Never panics on any message.
    ///
    /// `now.mono` must not go backwards between calls; `now.wall` may do anything.
    /// Before the input itself, the machine self-fences if its deadline has passed and
    /// fires every timer that is due, so a late [`WorkerInput::Tick`] loses nothing.
    pub fn handle(&mut self, now: Now, input: WorkerInput, out: &mut Vec<WorkerOutput>) {
        match self.state {
            State::NotStarted => {
                if input == WorkerInput::Start {
                    self.start(now, out);
                }
                return;
            }
            State::Stopped => {
                if let WorkerInput::TaskFinished { task, token, outcome } = input {
                    self.on_task_finished(now, (task, token), outcome, out);
                }
                return;
            }
            State::Unregistered(_) | State::Registered(_) => {}
        }
        if self.enforce_expiry(now, out) {
            if let WorkerInput::TaskFinished { task, token, outcome } = input {
                self.on_task_finished(now, (task, token), outcome, out);
            }
            return;
        }
        self.enforce_self_fence(now, out);
        self.fire_timers(now, out);
        self.apply(now, input, out);
        self.fire_renewal(now, out);
    }

    fn apply(&mut self, now: Now, input: WorkerInput, out: &mut Vec<WorkerOutput>) {
        match input {
            WorkerInput::Start | WorkerInput::Tick => {}
            WorkerInput::StreamBroken(Channel::Work | Channel::Unary) => self.end_incarnation(now, true, out),
            WorkerInput::StreamBroken(Channel::Control) => {
                if let State::Registered(session) = &mut self.state
                    && session.control_reopen_at.is_none()
                {
                    let delay = session.control_backoff.next_delay(&mut self.rng);
                    session.control_reopen_at = Some(later(now.mono, delay));
                }
            }
            WorkerInput::Message(message) => self.on_message(now, message, out),
            WorkerInput::TaskFinished { task, token, outcome } => {
                self.on_task_finished(now, (task, token), outcome, out)
            }
            WorkerInput::PluginRestarted { plugin, count } => {
                let plugin =
                    if self.settings.plugins.contains(&plugin) { plugin } else { metrics::UNKNOWN_PLUGIN.into() };
                self.metrics.add(metrics::PLUGIN_RESTARTS, &plugin, count);
            }
            WorkerInput::CertificateRenewed(credential) => {
                if let Some(r) = self.renewal.as_mut() {
                    r.credential = credential;
                    r.due = renew_at(credential.not_before, credential.not_after, unit_jitter(&mut r.rng));
                    r.step = RenewStep::Waiting;
                    r.backoff.reset();
                }
            }
            WorkerInput::RenewalFailed => {
                if let Some(r) = self.renewal.as_mut()
                    && r.step == RenewStep::InFlight
                {
                    let delay = r.backoff.next_delay(&mut r.rng);
                    r.step = RenewStep::RetryAt(later(now.mono, delay));
                }
            }
        }
    }

    /// Stops the worker for good if its certificate has expired (its wall clock):
    /// every run cancelled, results withheld, [`WorkerOutput::CertificateExpired`].
    /// Returns whether it did.
    fn enforce_expiry(&mut self, now: Now, out: &mut Vec<WorkerOutput>) -> bool {
        let Some(r) = &self.renewal else { return false };
        let not_after = r.credential.not_after;
        if now.wall < not_after {
            return false;
        }
        for (key, run) in std::mem::take(&mut self.running) {
            out.push(WorkerOutput::CancelTask { task: key.0, token: key.1 });
            self.stopping.insert(key, run.metrics_plugin);
        }
        self.unacked.clear();
        self.resend_order.clear();
        self.renewal = None;
        self.state = State::Stopped;
        out.push(WorkerOutput::CertificateExpired { not_after });
        true
    }

    /// Asks for a renewal when one is due, and refreshes the monotonic due times.
    fn fire_renewal(&mut self, now: Now, out: &mut Vec<WorkerOutput>) {
        if !matches!(self.state, State::Unregistered(_) | State::Registered(_)) {
            return;
        }
        let Some(r) = self.renewal.as_mut() else { return };
        let fire = match r.step {
            RenewStep::Waiting => now.wall >= r.due,
            RenewStep::RetryAt(at) => now.mono >= at,
            RenewStep::InFlight => false,
        };
        if fire {
            r.step = RenewStep::InFlight;
            out.push(WorkerOutput::RenewCertificate);
        }
        let from_now = |at: SystemTime| later(now.mono, at.duration_since(now.wall).unwrap_or_default());
        r.next_mono = match r.step {
            RenewStep::Waiting => Some(from_now(r.due)),
            RenewStep::RetryAt(at) => Some(at),
            RenewStep::InFlight => None,
        };
        r.expires_mono = from_now(r.credential.not_after);
    }

    /// The monotonic instant at which the driver must deliver [`WorkerInput::Tick`]
    /// next; `None` when no timer is set (not started, or stopped). Includes the
    /// self-fence deadline, so a worker cut off from the coordinator stops its tasks
    /// exactly on time. Changes only through [`Worker::handle`].
    pub fn poll_timeout(&self) -> Option<Mono> {
        match &self.state {
            State::NotStarted | State::Stopped => None,
            State::Unregistered(registering) => Some(match registering.step {
                RegisterStep::AwaitingAnswer { timeout_at } => timeout_at,
                RegisterStep::SendAt(at) => at,
            }),
            State::Registered(session) => {
                let resend_every = self.submit_resend_interval();
                let earliest_resend = self.resend_order.first().map(|(sent_at, _)| later(*sent_at, resend_every));
                let fence = later(session.last_acked_sent_at, self.terms.worker_self_fence_timeout);
                let first = earliest_resend.map_or(fence, |r| r.min(fence)).min(session.next_beat_at);
                Some(session.control_reopen_at.map_or(first, |at| at.min(first)))
            }
        }
        .map(|at| match &self.renewal {
            Some(r) => r.next_mono.map_or(at, |n| n.min(at)).min(r.expires_mono),
            None => at,
        })
    }

    /// The settings the worker was created with.
    pub fn settings(&self) -> &WorkerSettings {
        &self.settings
    }

    /// The beat interval, self-fence timeout and result limit the worker follows now:
    /// its config's until a coordinator accepts its registration, then that
    /// coordinator's.
    pub fn terms(&self) -> WorkerTerms {
        self.terms
    }

    /// Where the worker is in its life.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::NotStarted => Phase::NotStarted,
            State::Unregistered(_) => Phase::Unregistered,
            State::Registered(_) => Phase::Registered,
            State::Stopped => Phase::Stopped,
        }
    }

    /// This process's identity in its Registers (see [`Register::boot`]).
    pub fn boot(&self) -> u64 {
        self.boot
    }

    /// The current incarnation while registered.
    pub fn incarnation(&self) -> Option<Incarnation> {
        self.session().map(|s| s.incarnation)
    }

    /// Runs on the plugin host whose results the worker will submit, in key order.
    pub fn running_tasks(&self) -> impl Iterator<Item = (TaskId, FencingToken)> + '_ {
        self.running.keys().copied()
    }

    /// Runs the worker has cancelled and whose `TaskFinished` it still awaits; their
    /// results will be dropped. They still occupy a slot on the plugin host.
    pub fn stopping_tasks(&self) -> impl Iterator<Item = (TaskId, FencingToken)> + '_ {
        self.stopping.keys().copied()
    }

    /// Whether the submit of `(task, token)` was sent and is not yet acknowledged.
    pub fn awaits_ack(&self, task: TaskId, token: FencingToken) -> bool {
        self.unacked.contains_key(&(task, token))
    }

    /// How many submits were sent and are not yet acknowledged.
    pub fn unacknowledged_count(&self) -> usize {
        self.unacked.len()
    }

    /// Submits sent and not yet acknowledged, in key order.
    pub fn unacknowledged_submits(&self) -> impl Iterator<Item = (TaskId, FencingToken)> + '_ {
        self.unacked.keys().copied()
    }

    /// Whether the worker fenced itself (deadline passed, or the coordinator asked it to
    /// re-register) and has not registered again since.
    pub fn is_self_fenced(&self) -> bool {
        self.self_fenced
    }

    /// Whether the current registration was told to drain (no new tasks).
    pub fn is_draining(&self) -> bool {
        self.session().is_some_and(|s| s.draining)
    }

    /// While registered: the monotonic instant at which the worker fences itself unless
    /// a newer beat is acknowledged first (`send time of the latest acknowledged beat +
    /// worker_self_fence_timeout`). The worker never submits at or after it.
    pub fn self_fence_deadline(&self) -> Option<Mono> {
        self.session().map(|s| later(s.last_acked_sent_at, self.terms.worker_self_fence_timeout))
    }

    /// The highest assignment `seq` received in the current incarnation (0: none, or
    /// not registered).
    pub fn assigns_through(&self) -> u64 {
        self.session().map_or(0, |s| s.assigns_through)
    }

    /// Slots a new assignment could use now: `slots` minus runs on the plugin host
    /// (including ones being cancelled); 0 while the unacknowledged-submit backlog is
    /// full. Finished-but-unacknowledged tasks do not take a slot.
    pub fn free_slots(&self) -> u32 {
        let slots = self.settings.slots as usize;
        if self.unacked.len() >= slots.saturating_mul(UNACKED_SUBMITS_PER_SLOT) {
            return 0;
        }
        let busy = self.running.len() + self.stopping.len();
        u32::try_from(slots.saturating_sub(busy)).unwrap_or(u32::MAX)
    }

    fn session(&self) -> Option<&Session> {
        match &self.state {
            State::Registered(session) => Some(session),
            _ => None,
        }
    }

    fn submit_resend_interval(&self) -> Duration {
        self.terms.heartbeat_interval.saturating_mul(2)
    }

    fn start(&mut self, now: Now, out: &mut Vec<WorkerOutput>) {
        self.metrics_shipped_at = now.mono;
        self.state =
            State::Unregistered(Registering { step: RegisterStep::SendAt(now.mono), sent_at: VecDeque::new() });
        if self.enforce_expiry(now, out) {
            return;
        }
        self.fire_timers(now, out);
        self.fire_renewal(now, out);
    }

    fn enforce_self_fence(&mut self, now: Now, out: &mut Vec<WorkerOutput>) {
        if self.self_fence_deadline().is_some_and(|deadline| now.mono >= deadline) {
            self.end_incarnation(now, true, out);
        }
    }

    /// Stops everything of the current incarnation and schedules a new registration.
    /// `announce`: emit the `SelfFenced` history event (a self-fence), or not (the coordinator
    /// asked for re-registration; it already knows).
    fn end_incarnation(&mut self, now: Now, announce: bool, out: &mut Vec<WorkerOutput>) {
        let State::Registered(session) = &self.state else { return };
        if announce {
            out.push(WorkerOutput::Event(HistoryEvent::SelfFenced {
                worker: self.settings.id.clone(),
                incarnation: session.incarnation,
            }));
        }
        for (key, run) in std::mem::take(&mut self.running) {
            out.push(WorkerOutput::CancelTask { task: key.0, token: key.1 });
            self.stopping.insert(key, run.metrics_plugin);
        }
        // Withheld: the coordinator may already have leased these tasks again, and a
        // submit after the deadline is exactly what the self_fence invariant forbids.
        self.unacked.clear();
        self.resend_order.clear();
        self.self_fenced = true;
        let delay = self.backoff.next_delay(&mut self.rng);
        self.state = State::Unregistered(Registering {
            step: RegisterStep::SendAt(later(now.mono, delay)),
            sent_at: VecDeque::new(),
        });
    }

    fn fire_timers(&mut self, now: Now, out: &mut Vec<WorkerOutput>) {
        match &mut self.state {
            State::Unregistered(registering) => {
                if let RegisterStep::AwaitingAnswer { timeout_at } = registering.step
                    && now.mono >= timeout_at
                {
                    let delay = self.backoff.next_delay(&mut self.rng);
                    registering.step = RegisterStep::SendAt(later(now.mono, delay));
                }
                if let RegisterStep::SendAt(at) = registering.step
                    && now.mono >= at
                {
                    forget_older_than(&mut registering.sent_at, now.mono, self.terms.worker_self_fence_timeout);
                    if registering.sent_at.len() >= REGISTER_SENDS_MAX {
                        registering.sent_at.pop_front();
                    }
                    registering.sent_at.push_back(now.mono);
                    registering.step =
                        RegisterStep::AwaitingAnswer { timeout_at: later(now.mono, self.settings.register_timeout) };
                    out.push(WorkerOutput::Send(ToCoordinator::Register(Register {
                        protocol_version: PROTOCOL_VERSION,
                        plugins: self.settings.plugins.clone(),
                        slots: self.settings.slots,
                        inventory: self.settings.inventory.clone(),
                        boot: self.boot,
                        adopted: self.highest_incarnation,
                    })));
                }
            }
            State::Registered(session) => {
                if session.control_reopen_at.is_some_and(|at| now.mono >= at) {
                    session.control_reopen_at = None;
                    out.push(WorkerOutput::OpenControl { incarnation: session.incarnation });
                }
                if now.mono >= session.next_beat_at {
                    // A fixed schedule on the monotonic clock; after a stall, the next
                    // beat is one interval from now rather than a burst of catch-ups.
                    let interval = self.terms.heartbeat_interval;
                    let next = later(session.next_beat_at, interval);
                    session.next_beat_at = if next > now.mono { next } else { later(now.mono, interval) };
                    self.send_heartbeat(now, out);
                }
                let resend_every = self.submit_resend_interval();
                // The due ones, re-sent in key order.
                let mut due = Vec::new();
                while let Some(&(sent_at, key)) = self.resend_order.first()
                    && now.mono.saturating_since(sent_at) >= resend_every
                {
                    self.resend_order.pop_first();
                    due.push(key);
                }
                due.sort_unstable();
                for key in due {
                    if let Some(pending) = self.unacked.get_mut(&key) {
                        pending.last_sent_at = now.mono;
                        self.resend_order.insert((now.mono, key));
                        out.push(WorkerOutput::Send(ToCoordinator::Submit(pending.submit.clone())));
                    }
                }
            }
            State::NotStarted | State::Stopped => {}
        }
    }

    /// Sends a beat now (and a pull, while there is room for work).
    fn send_heartbeat(&mut self, now: Now, out: &mut Vec<WorkerOutput>) {
        // Runs being cancelled are left out: the coordinator should count them as gone.
        let running: BTreeSet<RunKey> = self.running.keys().chain(self.unacked.keys()).copied().collect();
        let metrics_due = now.mono.saturating_since(self.metrics_shipped_at) >= self.settings.metrics_interval;
        let fence_timeout = self.terms.worker_self_fence_timeout;
        let interval = self.terms.heartbeat_interval;
        let State::Registered(session) = &mut self.state else { return };
        // Only ship when there is something to ship; the interval then keeps counting
        // from the last real shipment, so the next delta goes out with the next beat.
        let metrics = if metrics_due && !self.metrics.is_empty() {
            self.metrics_shipped_at = now.mono;
            Some(self.metrics.take())
        } else {
            None
        };
        let beat_seq = session.next_beat_seq;
        session.next_beat_seq = session.next_beat_seq.saturating_add(1);
        forget_old_beats(&mut session.outstanding_beats, now.mono, fence_timeout);
        session.outstanding_beats.insert(beat_seq, now.mono);
        out.push(WorkerOutput::Send(ToCoordinator::Heartbeat(Heartbeat {
            incarnation: session.incarnation,
            beat_seq,
            due_at: next_due_at(now.wall, interval),
            running: running.into_iter().collect(),
            assigns_through: session.assigns_through,
            metrics,
        })));
        // Pulls are idempotent; repeating one with every beat means a lost pull costs
        // one interval, never a stalled worker.
        self.send_pull_if_room(out);
    }

    /// Sends a Pull if registered, not draining, and a slot is free.
    fn send_pull_if_room(&self, out: &mut Vec<WorkerOutput>) {
        let free_slots = self.free_slots();
        if let Some(session) = self.session()
            && !session.draining
            && free_slots > 0
        {
            out.push(WorkerOutput::Send(ToCoordinator::Pull(Pull {
                incarnation: session.incarnation,
                free_slots,
                assigns_through: session.assigns_through,
            })));
        }
    }

    fn on_message(&mut self, now: Now, message: ToWorker, out: &mut Vec<WorkerOutput>) {
        match message {
            ToWorker::Registered { incarnation, terms, assigns_sent } => {
                self.on_registered(now, incarnation, terms, assigns_sent, out)
            }
            ToWorker::RegisterRejected { reason } => self.on_register_rejected(reason, out),
            ToWorker::HeartbeatAck { incarnation, beat_seq, reregister } => {
                self.on_heartbeat_ack(now, incarnation, beat_seq, reregister, out)
            }
            ToWorker::Assign(assignment) => self.on_assign(now, assignment, out),
            ToWorker::SubmitAck { task, token, verdict: _ } => self.on_submit_ack((task, token), out),
            ToWorker::Control(control) => self.on_control(now, control, out),
        }
    }

    fn on_registered(
        &mut self,
        now: Now,
        incarnation: Incarnation,
        terms: WorkerTerms,
        assigns_sent: u64,
        out: &mut Vec<WorkerOutput>,
    ) {
        // While registered, a second answer is a late reply to an earlier retry; the
        // coordinator will answer our beats with `reregister` if it moved on.
        let State::Unregistered(registering) = &mut self.state else { return };
        if self.highest_incarnation.is_some_and(|highest| incarnation <= highest) {
            return;
        }
        // The coordinator's schedule, not our config's: its failure detection counts on
        // it. Kept after a fence, until the next coordinator answers with its own.
        self.terms = terms;
        let fence_timeout = self.terms.worker_self_fence_timeout;
        forget_older_than(&mut registering.sent_at, now.mono, fence_timeout);
        // The answer may be to any Register of this round; the oldest send time is the
        // conservative start of the self-fence clock. None left: the answer is to a
        // Register so old that the worker would have to fence at once; ignore it.
        let Some(&clock_start) = registering.sent_at.front() else { return };
        self.highest_incarnation = Some(incarnation);
        self.backoff.reset();
        self.self_fenced = false;
        self.state = State::Registered(Session {
            incarnation,
            next_beat_seq: 1,
            next_beat_at: later(now.mono, self.terms.heartbeat_interval),
            outstanding_beats: BTreeMap::new(),
            last_acked_sent_at: clock_start,
            // Assignments sent before the answer (to a retried Register) that have not
            // arrived count as received: not run, so the first beat reports them lost.
            assigns_through: assigns_sent,
            draining: false,
            control_reopen_at: None,
            control_backoff: Backoff::new(self.settings.reconnect_backoff_initial, self.settings.reconnect_backoff_max),
        });
        self.send_heartbeat(now, out);
    }

    fn on_register_rejected(&mut self, reason: String, out: &mut Vec<WorkerOutput>) {
        // Only an unregistered worker is waiting for an answer; a rejection arriving
        // while registered answers a superseded retry.
        if !matches!(self.state, State::Unregistered(_)) {
            return;
        }
        let reason = truncate_at_char_boundary(reason, self.settings.max_error_message_bytes);
        out.push(WorkerOutput::Fatal(format!("the coordinator refused registration: {reason}")));
        self.state = State::Stopped;
    }

    fn on_heartbeat_ack(
        &mut self,
        now: Now,
        incarnation: Incarnation,
        beat_seq: u64,
        reregister: bool,
        out: &mut Vec<WorkerOutput>,
    ) {
        let State::Registered(session) = &mut self.state else { return };
        if incarnation != session.incarnation {
            return;
        }
        if reregister {
            self.end_incarnation(now, false, out);
            return;
        }
        if let Some(&sent_at) = session.outstanding_beats.get(&beat_seq) {
            session.last_acked_sent_at = session.last_acked_sent_at.max(sent_at);
            // Earlier beats were sent earlier: their acks could not move the clock.
            session.outstanding_beats.retain(|&seq, _| seq > beat_seq);
        }
    }

    fn on_assign(&mut self, now: Now, assignment: Assignment, out: &mut Vec<WorkerOutput>) {
        let free_slots = self.free_slots();
        let State::Registered(session) = &mut self.state else { return };
        if assignment.incarnation != session.incarnation {
            return;
        }
        // Only a seq above assigns_through is new. One at or below it is a duplicate or
        // arrived out of order, and the coordinator counts an assignment at or below
        // assigns_through that is not reported running as lost and re-queues it: running
        // it anyway would only duplicate work.
        let fresh = assignment.seq > session.assigns_through;
        session.assigns_through = session.assigns_through.max(assignment.seq);
        let key = (assignment.task, assignment.token);
        let known =
            self.running.contains_key(&key) || self.stopping.contains_key(&key) || self.unacked.contains_key(&key);
        // Not started means not reported as running, so the coordinator re-queues it.
        if !fresh || known || session.draining || free_slots == 0 {
            return;
        }
        let metrics_plugin = if self.settings.plugins.contains(&assignment.plugin) {
            assignment.plugin.clone()
        } else {
            metrics::UNKNOWN_PLUGIN.to_owned()
        };
        self.metrics.count(metrics::TASKS_STARTED, &metrics_plugin);
        self.running.insert(key, RunningTask { metrics_plugin, started_at: now.mono });
        let event = HistoryEvent::TaskStarted { task: key.0, worker: self.settings.id.clone(), token: key.1 };
        out.push(WorkerOutput::StartTask(assignment));
        out.push(WorkerOutput::Event(event));
    }

    fn on_submit_ack(&mut self, key: RunKey, out: &mut Vec<WorkerOutput>) {
        let free_before = self.free_slots();
        // Any verdict ends the submit: Accepted and Duplicate mean recorded, Refused
        // recorded as a failed attempt, Stale never will be; re-sending changes nothing.
        let removed = self.unacked.remove(&key);
        if let Some(pending) = &removed {
            self.resend_order.remove(&(pending.last_sent_at, key));
        }
        if removed.is_some() && self.free_slots() > free_before {
            self.send_pull_if_room(out);
        }
    }

    fn on_control(&mut self, now: Now, control: Control, out: &mut Vec<WorkerOutput>) {
        // Commands address the current registration; an unregistered worker runs nothing.
        let State::Registered(session) = &mut self.state else { return };
        match control {
            Control::Drain => session.draining = true,
            Control::CancelTask { task, token } => self.cancel_run((task, token), out),
            Control::CancelJob { job } => {
                let runs: Vec<RunKey> = self.running.range(job_range(job)).map(|(key, _)| *key).collect();
                for key in runs {
                    self.cancel_run(key, out);
                }
            }
            Control::Snapshot => self.send_heartbeat(now, out),
        }
    }

    fn cancel_run(&mut self, key: RunKey, out: &mut Vec<WorkerOutput>) {
        if let Some(run) = self.running.remove(&key) {
            out.push(WorkerOutput::CancelTask { task: key.0, token: key.1 });
            self.stopping.insert(key, run.metrics_plugin);
        }
    }

    fn on_task_finished(&mut self, now: Now, key: RunKey, outcome: TaskOutcome, out: &mut Vec<WorkerOutput>) {
        let stopped = HistoryEvent::TaskStopped { task: key.0, worker: self.settings.id.clone(), token: key.1 };
        if let Some(run) = self.running.remove(&key) {
            out.push(WorkerOutput::Event(stopped));
            let max_message = self.settings.max_error_message_bytes;
            let (counter, outcome) = match outcome {
                TaskOutcome::Succeeded { size_bytes, .. } if size_bytes > self.terms.max_result_bytes => {
                    let message = format!(
                        "result of {size_bytes} bytes exceeds limits.max_result_bytes ({})",
                        self.terms.max_result_bytes
                    );
                    (
                        metrics::TASKS_FAILED,
                        Outcome::Failed { message: truncate_at_char_boundary(message, max_message) },
                    )
                }
                TaskOutcome::Succeeded { result, size_bytes } => {
                    (metrics::TASKS_SUCCEEDED, Outcome::Succeeded { result, size_bytes })
                }
                TaskOutcome::Failed { message } => (
                    metrics::TASKS_FAILED,
                    Outcome::Failed { message: truncate_at_char_boundary(message, max_message) },
                ),
                // Not asked for by the worker (that run would be in `stopping`): the
                // attempt produced nothing, so the coordinator should retry it.
                TaskOutcome::Cancelled => (
                    metrics::TASKS_FAILED,
                    Outcome::Failed {
                        message: truncate_at_char_boundary(CANCELLED_BY_HOST_MESSAGE.to_owned(), max_message),
                    },
                ),
            };
            self.metrics.count(counter, &run.metrics_plugin);
            self.metrics.record_latency(&run.metrics_plugin, now.mono.saturating_since(run.started_at));
            // A run is only ever tracked while registered (a fence moves every run to
            // `stopping`), so this always finds the session.
            let Some(session) = self.session() else { return };
            let submit = Submit { incarnation: session.incarnation, task: key.0, token: key.1, outcome };
            if let Some(old) =
                self.unacked.insert(key, PendingSubmit { submit: submit.clone(), last_sent_at: now.mono })
            {
                self.resend_order.remove(&(old.last_sent_at, key));
            }
            self.resend_order.insert((now.mono, key));
            out.push(WorkerOutput::Send(ToCoordinator::Submit(submit)));
            self.send_pull_if_room(out);
        } else if let Some(metrics_plugin) = self.stopping.remove(&key) {
            // Cancelled by us: the result, whatever it is, is withheld.
            out.push(WorkerOutput::Event(stopped));
            self.metrics.count(metrics::TASKS_CANCELLED, &metrics_plugin);
            self.send_pull_if_room(out);
        }
    }
}

/// `at + by`, saturating instead of panicking on absurd configured durations.
fn later(at: Mono, by: Duration) -> Mono {
    Mono::from_duration(at.as_duration().saturating_add(by))
}

/// Every run key of `job`, for a range scan of a `BTreeMap<RunKey, _>`.
fn job_range(job: JobId) -> std::ops::RangeInclusive<RunKey> {
    (TaskId::new(job, 0), FencingToken(0))..=(TaskId::new(job, u32::MAX), FencingToken(u64::MAX))
}

fn forget_older_than(sent_at: &mut VecDeque<Mono>, now: Mono, age_max: Duration) {
    while sent_at.front().is_some_and(|&t| now.saturating_since(t) >= age_max) {
        sent_at.pop_front();
    }
}

/// Forgets beats sent a fence timeout ago or earlier (an ack for one would leave the
/// deadline in the past) and keeps the map under [`OUTSTANDING_BEATS_MAX`] - 1 so one
/// more fits.
fn forget_old_beats(beats: &mut BTreeMap<u64, Mono>, now: Mono, fence_timeout: Duration) {
    beats.retain(|_, sent_at| now.saturating_since(*sent_at) < fence_timeout);
    while beats.len() >= OUTSTANDING_BEATS_MAX {
        beats.pop_first();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_range_covers_exactly_the_job() {
        let mut runs = BTreeMap::new();
        for (job, index, token) in [(1, 0, 5), (2, 0, 1), (2, u32::MAX, u64::MAX), (3, 0, 0)] {
            runs.insert((TaskId::new(JobId(job), index), FencingToken(token)), ());
        }
        let of_job_2: Vec<_> = runs.range(job_range(JobId(2))).map(|(k, _)| k.0.job).collect();
        assert_eq!(of_job_2, [JobId(2), JobId(2)]);
    }

    #[test]
    fn old_beats_are_forgotten_and_the_map_is_capped() {
        let ms = |n: u64| Mono::from_duration(Duration::from_millis(n));
        let mut beats: BTreeMap<u64, Mono> = (1..=3).map(|seq| (seq, ms(seq * 1_000))).collect();
        forget_old_beats(&mut beats, ms(6_000), Duration::from_secs(4));
        assert_eq!(beats.keys().copied().collect::<Vec<_>>(), [3], "beats 1 and 2 are 4 s old or more");
        let mut many: BTreeMap<u64, Mono> = (0..1_000).map(|seq| (seq, ms(10_000))).collect();
        forget_old_beats(&mut many, ms(10_000), Duration::from_secs(4));
        assert_eq!(many.len(), OUTSTANDING_BEATS_MAX - 1);
        assert_eq!(many.first_key_value().map(|(k, _)| *k), Some(1_000 - (OUTSTANDING_BEATS_MAX as u64 - 1)));
    }
}
