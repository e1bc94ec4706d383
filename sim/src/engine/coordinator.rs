//! The coordinator's host: the real machine, its disk, its clock, and a model of the
//! driver's commit loop (inputs arriving during a commit form the next batch; outputs
//! leave once their batch's commit has finished).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use rollout_coordinator::{Coordinator, CoordinatorInput, CoordinatorOutput, WorkerState};
use rollout_core::WorkerId;
use rollout_core::protocol::Channel;
use rollout_core::traits::Storage;
use rollout_storage::{CrashMode, MemDisk, RedbStorage};

use super::clock::Clock;
use super::network::Wire;
use super::{Ev, Sim};
use crate::liveness::CoordEnv;
use crate::model_store::ModelStorage;

/// The coordinator's disk: redb on a crash-faithful in-memory disk, or the model.
pub(super) enum Disk {
    Redb(MemDisk),
    Model(ModelStorage),
}

impl Disk {
    /// Opens the disk's current durable contents as a fresh `Storage` (a restart, or
    /// a look at what a restart would find: `fork` leaves the live disk alone).
    pub(super) fn open(&self, fork: bool) -> Result<Arc<dyn Storage>, String> {
        match self {
            Disk::Redb(disk) => {
                let disk = if fork {
                    // What a restart now would find: the synced bytes, no armed power cut.
                    let copy = disk.fork();
                    copy.crash(CrashMode::LoseUnsynced);
                    copy
                } else {
                    disk.clone()
                };
                RedbStorage::open_in_memory(&disk).map(|s| Arc::new(s) as Arc<dyn Storage>).map_err(|e| e.to_string())
            }
            Disk::Model(m) => Ok(Arc::new(m.clone())),
        }
    }
}

pub(super) struct CoordNode {
    pub(super) machine: Option<Coordinator>,
    pub(super) disk: Disk,
    pub(super) clock: Clock,
    pub(super) inbox: Vec<CoordinatorInput>,
    busy_until: u64,
    run_scheduled: bool,
    /// Bumped on crash: stale releases and timers are ignored.
    pub(super) epoch: u64,
    pub(super) timer_generation: u64,
    /// When the pending timer event fires (true ns), if one is pending.
    pub(super) timer_at: Option<u64>,
    /// Outputs of committed batches waiting for their commit to finish.
    pending: VecDeque<Vec<CoordinatorOutput>>,
    /// How long a commit takes now (a `disk_latency` fault changes it).
    pub(super) commit_latency_ns: u64,
    /// An armed power cut: the downtime after the commit it breaks.
    pub(super) power_cut: Option<u64>,
}

impl CoordNode {
    pub(super) fn new(disk: Disk, clock: Clock, commit_latency_ns: u64) -> CoordNode {
        CoordNode {
            machine: None,
            disk,
            clock,
            inbox: Vec::new(),
            busy_until: 0,
            run_scheduled: false,
            epoch: 0,
            timer_generation: 0,
            timer_at: None,
            pending: VecDeque::new(),
            commit_latency_ns,
            power_cut: None,
        }
    }
}

impl Sim {
    pub(super) fn coord_start(&mut self) {
        let now = self.coord.clock.now(self.now);
        let storage = match self.coord.disk.open(false) {
            Ok(s) => s,
            Err(e) => return self.fail("coordinator_recovery", format!("opening storage: {e}")),
        };
        match Coordinator::recover(storage, self.settings.clone(), now) {
            Ok(c) => {
                let registered: BTreeSet<WorkerId> =
                    c.workers().into_iter().filter(|w| w.state != WorkerState::Failed).map(|w| w.id).collect();
                self.liveness.recovered(&registered);
                self.coord.machine = Some(c);
            }
            Err(e) => return self.fail("coordinator_recovery", format!("recover: {e}")),
        }
        self.liveness.coord_env(self.now, CoordEnv::Up);
        self.coord_set_timer();
    }

    pub(super) fn coord_crash(&mut self, mode: CrashMode) {
        if self.coord.machine.take().is_none() {
            return;
        }
        self.coord.epoch += 1;
        self.coord.timer_generation += 1;
        self.coord.timer_at = None;
        self.coord.inbox.clear();
        self.coord.pending.clear();
        self.coord.busy_until = 0;
        self.coord.run_scheduled = false;
        self.coord.power_cut = None;
        if let Disk::Redb(disk) = &self.coord.disk {
            // Also disarms a power cut that no commit has met yet.
            disk.crash(mode);
        }
        self.liveness.coord_env(self.now, CoordEnv::Down);
        // The process is gone, so are its connections: every worker sees them break.
        for w in 0..self.links.len() {
            self.reset_link(w, "reset");
        }
    }

    /// A crash mode for a power cut in the middle of a commit: the unsynced writes are
    /// torn or reordered, as drawn from the seed.
    fn torn_mode(&mut self) -> CrashMode {
        let sizes = match &self.coord.disk {
            Disk::Redb(disk) => disk.unsynced_write_sizes(),
            Disk::Model(_) => Vec::new(),
        };
        let n = sizes.len() as u64;
        if self.rng_fault.below(2) == 0 {
            let whole = self.rng_fault.below(n + 1) as usize;
            let torn = sizes.get(whole).map_or(0, |s| self.rng_fault.below(*s as u64 + 1) as usize);
            CrashMode::TornPrefix { whole_writes: whole, torn_bytes: torn }
        } else {
            let kept = (0..sizes.len()).filter(|_| self.rng_fault.below(2) == 0).collect();
            CrashMode::Reordered { kept_writes: kept }
        }
    }

    pub(super) fn coord_enqueue(&mut self, input: CoordinatorInput) {
        if self.coord.machine.is_none() {
            self.messages.1 += 1;
            return;
        }
        self.coord.inbox.push(input);
        if !self.coord.run_scheduled && self.coord.busy_until <= self.now {
            self.coord.run_scheduled = true;
            // Scheduled after everything already queued for this instant: all inputs
            // arriving at the same virtual instant form one batch.
            self.push(self.now, Ev::CoordRun);
        }
    }

    pub(super) fn coord_run(&mut self) {
        self.coord.run_scheduled = false;
        if self.coord.inbox.is_empty() {
            return;
        }
        let Some(machine) = self.coord.machine.as_mut() else { return };
        let now = self.coord.clock.now(self.now);
        let inputs = std::mem::take(&mut self.coord.inbox);
        self.batches.0 += 1;
        self.batches.1 += inputs.len() as u64;
        let mut out = Vec::new();
        if let Err(e) = machine.handle_batch(now, inputs, &mut out) {
            if let Some(down_ns) = self.coord.power_cut.take() {
                // The commit died with the power: tear the unsynced writes, come back later.
                let mode = self.torn_mode();
                self.open_span("coordinator", format!("power cut ({mode:?})"));
                self.coord_crash(mode);
                let epoch = self.coord.epoch;
                self.push(self.now + down_ns, Ev::PowerRestore { epoch });
                return;
            }
            return self.fail("coordinator_error", format!("handle_batch failed: {e}"));
        }
        let mut release = Vec::new();
        for o in out {
            match o {
                // Events are in the audit log, committed with the batch.
                CoordinatorOutput::Event(e) => self.record("coordinator", now.wall, e),
                other => release.push(other),
            }
        }
        self.coord.pending.push_back(release);
        let epoch = self.coord.epoch;
        let wrote = self.coord.machine.as_ref().is_some_and(Coordinator::last_batch_wrote);
        if wrote {
            // Messages and replies leave only once the commit (fsync) has finished.
            let done = self.now + self.coord.commit_latency_ns;
            self.coord.busy_until = done;
            self.push(done, Ev::CoordRelease { epoch });
        } else {
            // Nothing was written, so nothing waits for the disk.
            self.coord_release(epoch);
        }
        self.coord_set_timer();
    }

    pub(super) fn coord_release(&mut self, epoch: u64) {
        if epoch != self.coord.epoch {
            return;
        }
        let Some(outputs) = self.coord.pending.pop_front() else { return };
        // Like the driver: unary answers and control commands go at once, each worker's
        // Work messages of the batch after them as one burst.
        let mut work: BTreeMap<usize, Vec<Wire>> = BTreeMap::new();
        for o in outputs {
            match o {
                CoordinatorOutput::Send { to, message } => match self.worker_index.get(&to) {
                    Some(&w) if message.channel() == Channel::Work => {
                        work.entry(w).or_default().push(Wire::Down(message))
                    }
                    Some(&w) => self.send(w, Wire::Down(message)),
                    None => self.fail("sim", format!("coordinator sent to unknown worker {to}")),
                },
                CoordinatorOutput::Reply { request, reply } => self.operator_reply(request, reply),
                CoordinatorOutput::Event(_) | CoordinatorOutput::Notice(_) => {}
            }
        }
        for (w, burst) in work {
            self.send_work(w, burst);
        }
        if !self.coord.inbox.is_empty() && !self.coord.run_scheduled {
            self.coord.run_scheduled = true;
            self.push(self.now, Ev::CoordRun);
        }
    }

    pub(super) fn coord_timer(&mut self, generation: u64) {
        if generation == self.coord.timer_generation {
            self.coord.timer_at = None;
            if !self.coord.inbox.contains(&CoordinatorInput::Tick) {
                self.coord_enqueue(CoordinatorInput::Tick);
            }
        }
    }

    pub(super) fn coord_set_timer(&mut self) {
        let at = self.coord.machine.as_ref().and_then(|m| m.poll_timeout());
        let t = at.map(|at| self.coord.clock.true_time_of(at).max(self.now + 1_000));
        if t.is_some() && t == self.coord.timer_at {
            // Already pending at that time: no second event.
            return;
        }
        self.coord.timer_generation += 1;
        self.coord.timer_at = t;
        let Some(t) = t else { return };
        let generation = self.coord.timer_generation;
        self.push(t, Ev::CoordTimer { generation });
    }
}
