//! The coordinator's host: the real machine, its disk, its clock, and the driver's
//! commit pipeline (`rollout_storage::pipeline`, the state machine the transport's
//! commit thread drives too): a batch is applied as soon as its inputs are in, over the
//! writes of batches still syncing; one sync at a time takes everything handed over;
//! outputs leave once their batch's ticket is durable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::SystemTime;

use rollout_coordinator::{Coordinator, CoordinatorInput, CoordinatorOutput, WorkerState};
use rollout_core::protocol::Channel;
use rollout_core::traits::Storage;
use rollout_core::{Error, WorkerId};
use rollout_storage::pipeline::{PipelinedStorage, Releases, SyncPlan, WRITE_SETS_IN_FLIGHT_MAX};
use rollout_storage::{CrashMode, MemDisk, RedbStorage};

use super::clock::Clock;
use super::network::Wire;
use super::{Ev, Sim};
use crate::liveness::CoordEnv;
use crate::model_store::ModelStorage;

/// The coordinator's disk: redb on a crash-faithful in-memory disk, with its
/// write-ahead log on another when the scenario's config turns it on
/// (`storage.wal_bytes`, as the real coordinator does), or the model.
pub(super) enum Disk {
    Redb { data: MemDisk, log: Option<(MemDisk, u64)> },
    Model(ModelStorage),
}

/// How each of the coordinator's disks comes through a crash.
#[derive(Debug)]
pub(super) struct CrashModes {
    data: CrashMode,
    log: CrashMode,
}

impl CrashModes {
    /// A process crash or a clean power loss: exactly the synced bytes remain.
    pub(super) fn lose_unsynced() -> CrashModes {
        CrashModes { data: CrashMode::LoseUnsynced, log: CrashMode::LoseUnsynced }
    }
}

impl Disk {
    /// Opens the disk's current durable contents as a fresh `Storage` (a restart, or
    /// a look at what a restart would find: `fork` leaves the live disk alone).
    pub(super) fn open(&self, fork: bool) -> Result<Arc<dyn Storage>, String> {
        match self {
            Disk::Redb { data, log } => {
                // A fork is what a restart now would find: the synced bytes, no armed power cut.
                let copy = |d: &MemDisk| if fork { d.durable_fork() } else { d.clone() };
                let data = copy(data);
                match log {
                    None => RedbStorage::open_in_memory(&data),
                    Some((log, wal_bytes)) => RedbStorage::open_in_memory_with_wal(&data, &copy(log), *wal_bytes),
                }
                .map(|s| Arc::new(s) as Arc<dyn Storage>)
                .map_err(|e| e.to_string())
            }
            Disk::Model(m) => Ok(Arc::new(m.clone())),
        }
    }
}

pub(super) struct CoordNode {
    pub(super) machine: Option<Coordinator>,
    /// The machine's storage: the commit pipeline over the disk (a new one per start).
    pipeline: Option<Arc<PipelinedStorage>>,
    pub(super) disk: Disk,
    pub(super) clock: Clock,
    pub(super) inbox: Vec<CoordinatorInput>,
    /// The machine's timer fired: the next batch runs even with an empty inbox.
    timer_due: bool,
    run_scheduled: bool,
    /// Bumped on crash: stale syncs and timers are ignored.
    pub(super) epoch: u64,
    pub(super) timer_generation: u64,
    /// When the pending timer event fires (true ns), if one is pending.
    pub(super) timer_at: Option<u64>,
    /// Outputs of applied batches (with their batch's wall time), until durable.
    releases: Releases<(SystemTime, Vec<CoordinatorOutput>)>,
    /// The sync under way: it ends with a `SyncDone` event.
    syncing: Option<SyncPlan>,
    /// How long a sync (fsync) takes now (a `disk_latency` fault changes it).
    pub(super) commit_latency_ns: u64,
    /// An armed power cut: the downtime after the sync it breaks.
    pub(super) power_cut: Option<u64>,
    /// An armed `sync_failure`: the next sync reports an error (the disk survives).
    pub(super) fail_next_sync: bool,
}

impl CoordNode {
    pub(super) fn new(disk: Disk, clock: Clock, commit_latency_ns: u64) -> CoordNode {
        CoordNode {
            machine: None,
            pipeline: None,
            disk,
            clock,
            inbox: Vec::new(),
            timer_due: false,
            run_scheduled: false,
            epoch: 0,
            timer_generation: 0,
            timer_at: None,
            releases: Releases::default(),
            syncing: None,
            commit_latency_ns,
            power_cut: None,
            fail_next_sync: false,
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
        let pipeline = Arc::new(PipelinedStorage::new(storage));
        self.coord.pipeline = Some(Arc::clone(&pipeline));
        self.coord_recover_machine(pipeline, now);
    }

    /// A machine recovered from what the disk holds takes over: to the liveness checks
    /// it is a restart.
    fn coord_recover_machine(&mut self, pipeline: Arc<PipelinedStorage>, now: rollout_core::Now) {
        match Coordinator::recover(pipeline, self.settings.clone(), now) {
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

    /// The coordinator goes down. `power`: its machine lost power, so its sockets send
    /// nothing more (no FIN, no RST): each worker learns of it from its keepalive, or
    /// from the reset the restarted host answers its next message with. Otherwise the
    /// process was killed, and its kernel resets every connection at once.
    pub(super) fn coord_crash(&mut self, modes: CrashModes, power: bool) {
        if self.coord.machine.take().is_none() {
            return;
        }
        self.coord.epoch += 1;
        self.coord.timer_generation += 1;
        self.coord.timer_at = None;
        self.coord.inbox.clear();
        self.coord.timer_due = false;
        // What was not durable is gone with the process: its sets, and what they held.
        if self.coord.pipeline.as_ref().is_some_and(|p| p.state().in_flight() > 0) {
            self.coverage.lost_unsynced += 1;
        }
        self.coord.pipeline = None;
        self.coord.releases.clear();
        self.coord.syncing = None;
        self.coord.run_scheduled = false;
        self.coord.power_cut = None;
        self.coord.fail_next_sync = false;
        if let Disk::Redb { data, log } = &self.coord.disk {
            // Also disarms a power cut that no commit has met yet.
            data.crash(modes.data);
            if let Some((log, _)) = log {
                log.crash(modes.log);
            }
        }
        self.liveness.coord_env(self.now, CoordEnv::Down);
        for w in 0..self.links.len() {
            if power {
                self.peer_gone(w);
                continue;
            }
            // The process is gone, so are its connections: every worker sees them break.
            self.reset_link(w, "reset");
        }
    }

    /// Crash modes for a power cut in the middle of a commit: each disk's unsynced writes
    /// are torn or reordered, as drawn from the seed.
    fn torn_modes(&mut self) -> CrashModes {
        let (data, log) = match &self.coord.disk {
            Disk::Redb { data, log } => {
                (data.unsynced_write_sizes(), log.as_ref().map(|(l, _)| l.unsynced_write_sizes()).unwrap_or_default())
            }
            Disk::Model(_) => (Vec::new(), Vec::new()),
        };
        CrashModes { data: self.torn_mode(&data), log: self.torn_mode(&log) }
    }

    fn torn_mode(&mut self, sizes: &[usize]) -> CrashMode {
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
        self.coord_schedule_run();
    }

    /// Schedules a batch if there is anything to run and none is scheduled. It runs
    /// after everything already queued for this instant: all inputs arriving at the
    /// same virtual instant form one batch.
    fn coord_schedule_run(&mut self) {
        if (!self.coord.inbox.is_empty() || self.coord.timer_due) && !self.coord.run_scheduled {
            self.coord.run_scheduled = true;
            self.push(self.now, Ev::CoordRun);
        }
    }

    /// Applies the inputs gathered so far as one batch, unless the pipeline has its
    /// fill of unsynced batches (back-pressure: the next sync's end runs it).
    pub(super) fn coord_run(&mut self) {
        self.coord.run_scheduled = false;
        if self.coord.inbox.is_empty() && !self.coord.timer_due {
            return;
        }
        let Some(pipeline) = self.coord.pipeline.clone() else { return };
        if pipeline.state().in_flight() >= WRITE_SETS_IN_FLIGHT_MAX {
            return;
        }
        let Some(machine) = self.coord.machine.as_mut() else { return };
        let now = self.coord.clock.now(self.now);
        let inputs = std::mem::take(&mut self.coord.inbox);
        self.coord.timer_due = false;
        self.batches.0 += 1;
        self.batches.1 += inputs.len() as u64;
        let mut out = Vec::new();
        // As the driver: a batch runs the due timers after its inputs; a fired timer
        // with nothing else to do is a batch of its own.
        let applied = if inputs.is_empty() {
            machine.handle_timeout(now, &mut out)
        } else {
            machine.handle_batch(now, inputs, &mut out)
        };
        if let Err(e) = applied {
            return self.fail("coordinator_error", format!("batch failed: {e}"));
        }
        // Held under the batch's ticket: what it wrote and everything before. A batch
        // that wrote nothing waits only for the writes before it.
        let ticket = if self.release_before_durable { 0 } else { pipeline.state().enqueued() };
        self.coord.releases.hold(ticket, (now.wall, out));
        self.coord_release();
        self.coord_sync();
        self.coord_set_timer();
    }

    /// Starts a sync of everything handed over, unless one is under way.
    fn coord_sync(&mut self) {
        if self.coord.syncing.is_some() {
            return;
        }
        let Some(pipeline) = &self.coord.pipeline else { return };
        let Some(plan) = pipeline.state().sync_plan(None) else { return };
        self.coord.syncing = Some(plan);
        let epoch = self.coord.epoch;
        self.push(self.now + self.coord.commit_latency_ns, Ev::SyncDone { epoch });
    }

    /// The sync under way ends: durable (its batches' outputs leave), failed (an
    /// injected `sync_failure`: the driver recovers its machine from the disk, and
    /// nothing the failed batches or those built on them produced ever leaves), or cut
    /// short by a power cut (torn writes, a crash, a restart later).
    pub(super) fn coord_sync_done(&mut self, epoch: u64) {
        if epoch != self.coord.epoch {
            return;
        }
        let (Some(plan), Some(pipeline)) = (self.coord.syncing.take(), self.coord.pipeline.clone()) else { return };
        if std::mem::take(&mut self.coord.fail_next_sync) {
            let mut state = pipeline.state();
            // Batches applied over the failing one while it synced: dropped with it.
            self.sets_dropped += state.in_flight().saturating_sub(plan.sets.len()) as u64;
            let reason = state.sync_failed(&plan, &Error::internal("injected: fsync failed"));
            drop(state);
            return self.coord_recover(&reason);
        }
        if let Err(reason) = pipeline.finish_sync(&plan) {
            if let Some(down_ns) = self.coord.power_cut.take() {
                // The commit died with the power: tear the unsynced writes, come back later.
                let modes = self.torn_modes();
                self.coverage.torn_recovered += 1;
                self.open_span("coordinator", format!("power cut ({modes:?})"));
                self.coord_crash(modes, true);
                let epoch = self.coord.epoch;
                self.push(self.now + down_ns, Ev::PowerRestore { epoch });
                return;
            }
            return self.fail("coordinator_error", format!("sync failed: {reason}"));
        }
        self.coord_release();
        self.coord_sync();
        self.coord_schedule_run();
    }

    /// After a failed sync, as the driver does: drops everything held, resets the
    /// pipeline and recovers the machine from what the disk holds.
    fn coord_recover(&mut self, reason: &str) {
        self.instant_span("coordinator", format!("sync failed, recovered ({reason})"));
        self.coord.releases.clear();
        self.coord.machine = None;
        let Some(pipeline) = self.coord.pipeline.clone() else { return };
        pipeline.state().reset();
        let now = self.coord.clock.now(self.now);
        self.coord_recover_machine(pipeline, now);
        self.coord_schedule_run();
    }

    /// Releases what durable batches hold, in order: history events (in the audit log,
    /// committed with their batch), messages and replies.
    fn coord_release(&mut self) {
        let Some(pipeline) = &self.coord.pipeline else { return };
        let durability = pipeline.state().durability().clone();
        let Ok(ready) = self.coord.releases.release(&durability) else { return };
        for (wall, outputs) in ready {
            self.release_outputs(wall, outputs);
        }
    }

    fn release_outputs(&mut self, wall: SystemTime, outputs: Vec<CoordinatorOutput>) {
        // Like the driver: unary answers and control commands go at once, each worker's
        // Work messages of the batch after them as one burst.
        let mut work: BTreeMap<usize, Vec<Wire>> = BTreeMap::new();
        for o in outputs {
            match o {
                CoordinatorOutput::Event(e) => self.record("coordinator", wall, e),
                CoordinatorOutput::Send { to, message } => match self.worker_index.get(&to) {
                    Some(&w) if message.channel() == Channel::Work => {
                        work.entry(w).or_default().push(Wire::Down(message))
                    }
                    Some(&w) => self.send(w, Wire::Down(message)),
                    None => self.fail("sim", format!("coordinator sent to unknown worker {to}")),
                },
                CoordinatorOutput::Reply { request, reply } => self.operator_reply(request, reply),
                CoordinatorOutput::Notice(_) => {}
            }
        }
        for (w, burst) in work {
            self.send_work(w, burst);
        }
    }

    pub(super) fn coord_timer(&mut self, generation: u64) {
        if generation == self.coord.timer_generation {
            self.coord.timer_at = None;
            if self.coord.machine.is_some() {
                self.coord.timer_due = true;
                self.coord_schedule_run();
            }
        }
    }

    pub(super) fn coord_set_timer(&mut self) {
        let at = self.coord.machine.as_ref().map(Coordinator::poll_timeout);
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
