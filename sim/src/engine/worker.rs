//! Worker hosts: the real machine, its clock, and the simulated plugin host (runs that
//! take a drawn time and end as drawn: success, failure, or a hang stopped at the
//! task's deadline).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rollout_core::config::CERT_NOT_BEFORE_SLACK;
use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{Assignment, Channel};
use rollout_core::traits::Inventory;
use rollout_core::{ContentId, FencingToken, Incarnation, TaskId, WorkerId};
use rollout_worker::{Credential, TaskOutcome, Worker, WorkerInput, WorkerOutput, WorkerSettings, plugin_stop_after};

use super::clock::Clock;
use super::network::{Dir, Wire};
use super::{Ev, NS_PER_MS, Sim};
use crate::liveness::Env;
use rollout_core::oracle::SelfFenceOracle;

/// An ended incarnation's Work stream (opened on connection `.1`) waiting for its runs.
type Retiring = (Incarnation, u64, BTreeSet<(TaskId, FencingToken)>);

/// One plugin run; its id tells a current finish event from a stale one.
struct Run {
    id: u64,
}

pub(super) struct WorkerNode {
    pub(super) id: WorkerId,
    pub(super) machine: Option<Worker>,
    pub(super) clock: Clock,
    pub(super) epoch: u64,
    timer_generation: u64,
    /// When the pending timer event fires (true ns), if one is pending.
    timer_at: Option<u64>,
    /// Plugin runs on this host; an entry lives until its `TaskFinished` is delivered.
    runs: BTreeMap<(TaskId, FencingToken), Run>,
    /// Suspended since then until the `Resume` event: everything aimed at the host
    /// waits for it, in `held`.
    pub(super) paused_since: Option<u64>,
    pub(super) held: VecDeque<Ev>,
    /// The self-fence rule rebuilt from this process's messages.
    pub(super) oracle: SelfFenceOracle,
    /// The current incarnation's Work stream and the connection it was opened on.
    pub(super) work_stream: Option<(Incarnation, u64)>,
    /// Work streams of ended incarnations, held open (like the driver) until the runs
    /// they had stopped.
    retiring: Vec<Retiring>,
    /// The certificate on this host's disk (issued at its first start, replaced by each
    /// renewal; a restarted process starts with it).
    credential: Option<Credential>,
}

/// What every simulated worker host offers (the simulator schedules no GPU work).
fn sim_inventory() -> Inventory {
    Inventory { cpus: 8, memory_bytes: 16 << 30, gpus: Vec::new() }
}

impl WorkerNode {
    pub(super) fn new(id: WorkerId, clock: Clock) -> WorkerNode {
        WorkerNode {
            id,
            machine: None,
            clock,
            epoch: 0,
            timer_generation: 0,
            timer_at: None,
            runs: BTreeMap::new(),
            paused_since: None,
            held: VecDeque::new(),
            oracle: SelfFenceOracle::default(),
            work_stream: None,
            retiring: Vec::new(),
            credential: None,
        }
    }
}

impl Sim {
    pub(super) fn worker_start(&mut self, w: usize) {
        let node = &mut self.workers[w];
        if node.machine.is_some() {
            return;
        }
        let mut settings = WorkerSettings::from_config(
            node.id.clone(),
            self.scenario.cluster.slots,
            vec!["sim".into()],
            sim_inventory(),
            &self.worker_config,
        );
        // The certificate: issued at the first start for transport.worker_cert_lifetime
        // (valid from an hour before, as the CA writes it), renewed through the
        // coordinator from then on, kept across crashes.
        let lifetime = self.worker_config.transport.worker_cert_lifetime;
        let wall = node.clock.now(self.now).wall;
        let credential = *node
            .credential
            .get_or_insert(Credential { not_before: wall - CERT_NOT_BEFORE_SLACK, not_after: wall + lifetime });
        settings.credential = Some(credential);
        node.machine = Some(Worker::new(settings, self.rng_worker_seeds.next_u64()));
        node.oracle = SelfFenceOracle::default();
        let id = node.id.clone();
        self.liveness.worker_env(self.now, &id, Env::WorkerUp);
        self.worker_input(w, WorkerInput::Start);
    }

    pub(super) fn worker_crash(&mut self, w: usize) {
        let node = &mut self.workers[w];
        if node.machine.take().is_none() {
            return;
        }
        // A suspended host that dies stays dead: what it held is gone with it.
        if let Some(since) = node.paused_since.take() {
            node.clock.stalled_ns += self.now - since;
            node.held.clear();
        }
        node.epoch += 1;
        node.timer_generation += 1;
        node.timer_at = None;
        // The plugin host dies with the worker: its runs stop now. The machine cannot
        // say so, so the simulator records the stops on its behalf.
        let stopped: Vec<_> = std::mem::take(&mut node.runs).into_keys().collect();
        let (id, wall) = (node.id.clone(), node.clock.now(self.now).wall);
        let mut closing: Vec<(Incarnation, u64)> = node.retiring.drain(..).map(|(i, c, _)| (i, c)).collect();
        closing.extend(node.work_stream.take());
        for (task, token) in stopped {
            self.record(id.as_str(), wall, HistoryEvent::TaskStopped { task, worker: id.clone(), token });
        }
        self.drop_connection(w, closing);
        self.liveness.worker_env(self.now, &id, Env::WorkerDown);
    }

    pub(super) fn worker_input(&mut self, w: usize, input: WorkerInput) {
        let node = &mut self.workers[w];
        let Some(machine) = node.machine.as_mut() else { return };
        let now = node.clock.now(self.now);
        let mut out = Vec::new();
        machine.handle(now, input, &mut out);
        let incarnation = machine.incarnation();
        let id = node.id.clone();
        // At or past its self-fence deadline a worker must neither submit nor start:
        // judged by the oracle, from what the worker sent and received.
        let mut broken = None;
        for o in &out {
            if let Err(why) = o.judge_self_fence(&mut node.oracle, now.mono) {
                broken.get_or_insert(format!("{id} {why}: {o:?}"));
            }
        }
        if let Some(message) = broken {
            self.fail("self_fence", message);
        }
        // Like the driver: the Work stream follows the incarnation, and an ended
        // incarnation's stream closes once the runs it had stopped (the coordinator
        // leases their tasks elsewhere when it sees the close).
        if incarnation != self.workers[w].work_stream.map(|(i, _)| i) {
            let conn = self.links[w].conn;
            let node = &mut self.workers[w];
            if let Some((old, old_conn)) = node.work_stream.take() {
                let runs: BTreeSet<_> = node.runs.keys().copied().collect();
                if runs.is_empty() {
                    self.close_work(w, old, old_conn);
                } else {
                    self.workers[w].retiring.push((old, old_conn, runs));
                }
            }
            self.workers[w].work_stream = incarnation.map(|i| (i, conn));
        }
        // Like the driver: unary calls go at once, Work messages as one burst at the end.
        let mut work = Vec::new();
        let mut expired = false;
        for o in out {
            match o {
                WorkerOutput::Send(msg) if msg.channel() == Channel::Work => work.push(Wire::Up(msg)),
                WorkerOutput::Send(msg) => self.send(w, Wire::Up(msg)),
                WorkerOutput::StartTask(a) => {
                    let (after_ns, outcome) = self.plugin_call(&a);
                    self.start_run(w, a.task, a.token, after_ns, outcome);
                }
                WorkerOutput::CancelTask { task, token } => {
                    // Cancellation is immediate: the run stops and reports at once.
                    if self.workers[w].runs.contains_key(&(task, token)) {
                        self.start_run(w, task, token, 0, TaskOutcome::Cancelled);
                    }
                }
                WorkerOutput::Event(e) => self.record(id.as_str(), now.wall, e),
                WorkerOutput::Fatal(message) => self.fail("worker_fatal", format!("{id}: {message}")),
                WorkerOutput::RenewCertificate => self.renew_certificate(w),
                WorkerOutput::CertificateExpired { .. } => expired = true,
                // A simulated link breaks whole (reported as its Work stream), so no
                // Control stream breaks alone and none is re-opened.
                WorkerOutput::OpenControl { .. } => {
                    self.fail("sim", format!("{id} re-opens a Control stream that never broke alone"))
                }
            }
        }
        self.send_work(w, work);
        self.worker_set_timer(w);
        if expired {
            // The process exits (its runs were cancelled just now): like a crash from
            // here on, and a restart finds the same expired certificate.
            self.coverage.certificates_expired += 1;
            self.worker_crash(w);
        }
    }

    /// `Enrollment/Renew` over worker `w`'s link: answered (a certificate issued on the
    /// coordinator's clock) after a round trip if both directions are open and the
    /// coordinator runs, failed after the register timeout otherwise. The crypto is
    /// the transport's (tested there); this is the outcome.
    fn renew_certificate(&mut self, w: usize) {
        let link_open = !self.links[w].blocked(Dir::Up) && !self.links[w].blocked(Dir::Down);
        let epoch = self.workers[w].epoch;
        if link_open && self.coord.machine.is_some() {
            let rtt = self.latency() + self.latency();
            let wall = self.coord.clock.now(self.now).wall;
            let credential = Credential {
                not_before: wall - CERT_NOT_BEFORE_SLACK,
                not_after: wall + self.worker_config.transport.worker_cert_lifetime,
            };
            self.push(self.now + rtt, Ev::Renewal { w, epoch, credential: Some(credential) });
        } else {
            let timeout = self.worker_config.health.heartbeat_interval.saturating_mul(2);
            let after = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
            self.push(self.now + after, Ev::Renewal { w, epoch, credential: None });
        }
    }

    pub(super) fn worker_renewed(&mut self, w: usize, epoch: u64, credential: Option<Credential>) {
        if self.workers[w].epoch != epoch || self.workers[w].machine.is_none() {
            return;
        }
        match credential {
            Some(c) => {
                self.workers[w].credential = Some(c);
                self.coverage.certificates_renewed += 1;
                self.worker_input(w, WorkerInput::CertificateRenewed(c));
            }
            None => self.worker_input(w, WorkerInput::RenewalFailed),
        }
    }

    /// The simulated plugin: how long the call of `a` takes and how it ends, drawn from
    /// the workload. A call still running at its deadline plus the grace is stopped.
    fn plugin_call(&mut self, a: &Assignment) -> (u64, TaskOutcome) {
        let wl = &self.scenario.workload;
        let [lo, hi] = wl.task_duration_ms;
        let (p_fail, p_hang) = (wl.failure_probability, wl.hang_probability);
        let mut dur = (lo + self.rng_plugin.below(hi - lo + 1)) * NS_PER_MS;
        let mut outcome = if self.rng_plugin.unit_f64() < p_fail {
            TaskOutcome::Failed { message: "simulated failure".into() }
        } else {
            let mut bytes = a.payload.clone();
            bytes.extend_from_slice(a.task.to_string().as_bytes());
            if wl.result_bytes > 0 {
                bytes.resize(wl.result_bytes as usize, 0);
            }
            TaskOutcome::Succeeded { result: ContentId::of(&bytes), size_bytes: bytes.len() as u64 }
        };
        if p_hang > 0.0 && self.rng_plugin.unit_f64() < p_hang {
            dur = u64::MAX;
        }
        // Stopped where every driver stops a call: its deadline plus the grace.
        let stop = u64::try_from(plugin_stop_after(a.deadline).as_nanos()).unwrap_or(u64::MAX);
        if dur > stop {
            dur = stop;
            outcome = TaskOutcome::Failed { message: format!("plugin call exceeded its deadline of {:?}", a.deadline) };
        }
        (dur, outcome)
    }

    /// (Re)places the plugin run of `(task, token)`: a new run id makes any earlier
    /// finish event of that run stale.
    fn start_run(&mut self, w: usize, task: TaskId, token: FencingToken, after_ns: u64, outcome: TaskOutcome) {
        self.next_run += 1;
        let run = self.next_run;
        let node = &mut self.workers[w];
        node.runs.insert((task, token), Run { id: run });
        let epoch = node.epoch;
        self.push(self.now.saturating_add(after_ns), Ev::PluginFinish { w, epoch, task, token, run, outcome });
    }

    /// A plugin run ends (unless the host restarted or the run was replaced since).
    pub(super) fn plugin_finish(
        &mut self,
        w: usize,
        epoch: u64,
        (task, token): (TaskId, FencingToken),
        run: u64,
        outcome: TaskOutcome,
    ) {
        let node = &mut self.workers[w];
        if node.epoch != epoch || node.runs.get(&(task, token)).is_none_or(|r| r.id != run) {
            return;
        }
        node.runs.remove(&(task, token));
        let mut closed = Vec::new();
        node.retiring.retain_mut(|(incarnation, conn, runs)| {
            runs.remove(&(task, token));
            if runs.is_empty() {
                closed.push((*incarnation, *conn));
            }
            !runs.is_empty()
        });
        self.worker_input(w, WorkerInput::TaskFinished { task, token, outcome });
        for (incarnation, conn) in closed {
            self.close_work(w, incarnation, conn);
        }
    }

    pub(super) fn worker_timer(&mut self, w: usize, generation: u64) {
        if generation == self.workers[w].timer_generation {
            self.workers[w].timer_at = None;
            self.worker_input(w, WorkerInput::Tick);
        }
    }

    pub(super) fn worker_set_timer(&mut self, w: usize) {
        let now = self.now;
        let node = &mut self.workers[w];
        let at = node.machine.as_ref().and_then(|m| m.poll_timeout());
        let t = at.map(|at| node.clock.true_time_of(at).max(now + 1_000));
        if t.is_some() && t == node.timer_at {
            return;
        }
        node.timer_generation += 1;
        node.timer_at = t;
        let Some(t) = t else { return };
        let generation = node.timer_generation;
        self.push(t, Ev::WorkerTimer { w, generation });
    }

    /// The end of a pause: the monotonic clock carries on from where it stood (it lost
    /// the pause), the wall clock is right again (the host's time sync), and what
    /// arrived or fell due meanwhile happens now, in order.
    pub(super) fn resume(&mut self, w: usize, epoch: u64) {
        let node = &mut self.workers[w];
        if node.epoch != epoch {
            return;
        }
        let Some(since) = node.paused_since.take() else { return };
        let paused = self.now - since;
        node.clock.stalled_ns += paused;
        node.clock.wall_offset_ns += paused as i128;
        let held: Vec<Ev> = node.held.drain(..).collect();
        let id = node.id.clone();
        self.close_span(id.as_str(), "paused");
        let env = self.links[w].env();
        self.liveness.worker_env(self.now, &id, env);
        for ev in held {
            self.dispatch(ev);
        }
        // Timers set while it slept were set on a clock that stood still.
        self.worker_set_timer(w);
    }
}
