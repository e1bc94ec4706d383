//! The fault schedule played out: each fault when its time comes, and its undoing at
//! the end of its `for_ms`.

use rollout_coordinator::CoordinatorInput;
use rollout_core::TaskId;

use super::coordinator::{CrashModes, Disk};
use super::{Ev, NS_PER_MS, Sim};
use crate::liveness::{CoordEnv, Env};
use crate::scenario::{Direction, FaultAction, NodeRef, SeenBy, WorkerRef};

/// How long the coordinator stays down after a power cut without `for_ms`.
pub(crate) const POWER_CUT_DOWNTIME_MS: u64 = 2_000;

impl Sim {
    pub(super) fn fault(&mut self, i: usize) {
        let fault = self.faults[i].clone();
        let name = fault.node().map_or_else(|| "all links".to_owned(), |n| n.to_string());
        let undo_at = fault.for_ms().map(|ms| self.now + ms * NS_PER_MS);
        match fault.action {
            FaultAction::Crash { node: NodeRef::Coordinator, .. } => {
                self.coord_crash(CrashModes::lose_unsynced(), false);
                self.open_span(&name, "crash".into());
            }
            FaultAction::Crash { node: NodeRef::Worker(w), .. } => {
                self.worker_crash(w);
                self.open_span(&name, "crash".into());
            }
            FaultAction::Restart { node: NodeRef::Coordinator } => {
                if self.coord.machine.is_none() {
                    self.close_span(&name, "crash");
                    self.coord_start();
                }
            }
            FaultAction::Restart { node: NodeRef::Worker(w) } => {
                self.close_span(&name, "crash");
                self.worker_start(w);
            }
            FaultAction::Partition { node: WorkerRef(w), direction, .. } => {
                let up = matches!(direction, Direction::Both | Direction::ToCoordinator);
                let down = matches!(direction, Direction::Both | Direction::ToWorker);
                self.block(w, up, down);
                let what = match direction {
                    Direction::Both => "partition",
                    Direction::ToCoordinator => "partition to coordinator",
                    Direction::ToWorker => "partition to worker",
                };
                self.open_span(&name, what.into());
            }
            FaultAction::Heal { node: Some(WorkerRef(w)) } => self.heal(w),
            FaultAction::Heal { node: None } => {
                for w in 0..self.links.len() {
                    self.heal(w);
                }
            }
            FaultAction::Reset { node: WorkerRef(w), seen_by } => match seen_by {
                // The coordinator's end draws nothing from a reset (it cannot tell a
                // middlebox's RST from a dead peer's), so a reset the worker's end sees
                // plays the same whether or not the coordinator's sees it too.
                SeenBy::Both | SeenBy::Worker => {
                    self.instant_span(&name, "reset".into());
                    self.reset_link(w, "reset");
                }
                SeenBy::Coordinator => {
                    self.instant_span(&name, "reset seen by the coordinator".into());
                    self.reset_coordinator_end(w);
                }
            },
            FaultAction::ClockJump { node, by_ms } => {
                // A step of any size is no disturbance to the liveness checks: the
                // coordinator keeps deadlines on its own monotonic clock.
                let by = i128::from(by_ms) * NS_PER_MS as i128;
                let running = match node {
                    NodeRef::Coordinator => self.coord.machine.is_some(),
                    NodeRef::Worker(w) => self.workers[w].machine.is_some(),
                };
                self.coverage.clock_steps += u64::from(running && by != 0);
                match node {
                    NodeRef::Coordinator => self.coord.clock.wall_offset_ns += by,
                    NodeRef::Worker(w) => self.workers[w].clock.wall_offset_ns += by,
                }
                self.instant_span(&name, format!("clock {by_ms:+} ms"));
            }
            FaultAction::Slow { node: WorkerRef(w), latency_ms, .. } => {
                self.links[w].extra_ns = latency_ms * NS_PER_MS;
                let id = self.workers[w].id.clone();
                self.liveness.worker_env(self.now, &id, Env::Disturbed);
                self.open_span(&name, format!("slow +{latency_ms} ms"));
            }
            FaultAction::Flap { node: WorkerRef(w), period_ms, .. } => {
                let period = period_ms.get() * NS_PER_MS;
                let until = undo_at.unwrap_or(self.now);
                self.fault_log_push(&name, format!("flapping every {} ms", period / NS_PER_MS), Some(until));
                self.push(self.now, Ev::Flap { w, cut: true, period, until });
                return;
            }
            FaultAction::DiskLatency { latency_ms, .. } => {
                self.coord.commit_latency_ns = latency_ms * NS_PER_MS;
                self.liveness.commit_latency(latency_ms * NS_PER_MS);
                self.liveness.coord_env(self.now, CoordEnv::Disturbed);
                self.open_span(&name, format!("fsync {latency_ms} ms"));
            }
            FaultAction::Pause { node: WorkerRef(w), .. } => {
                let node = &mut self.workers[w];
                if node.machine.is_none() || node.paused_since.is_some() {
                    return;
                }
                node.paused_since = Some(self.now);
                let (epoch, id) = (node.epoch, node.id.clone());
                // To the coordinator it is as if the link were cut both ways.
                self.liveness.worker_env(self.now, &id, Env::Link { up: false, down: false });
                self.open_span(&name, "paused".into());
                self.push(undo_at.unwrap_or(self.now), Ev::Resume { w, epoch });
                return;
            }
            FaultAction::Drain { node: WorkerRef(w) } => {
                let request = self.operator_request();
                let worker = self.workers[w].id.clone();
                self.coord_enqueue(CoordinatorInput::Drain { request, worker });
                self.instant_span(&name, "drain".into());
            }
            FaultAction::CancelJob { job: index } | FaultAction::CancelTask { job: index, .. } => {
                // Only a job the operator has heard back about has an id to cancel.
                let Some(&(job, _)) = self.acked.get(&index) else { return };
                let request = self.operator_request();
                let (input, what) = match fault.action {
                    FaultAction::CancelTask { task: t, .. } => {
                        let task = TaskId::new(job, t);
                        (CoordinatorInput::CancelTask { request, task }, format!("cancel {task}"))
                    }
                    _ => (CoordinatorInput::CancelJob { request, job }, format!("cancel {job}")),
                };
                self.coord_enqueue(input);
                self.instant_span("coordinator", what);
            }
            FaultAction::SyncFailure { .. } => {
                self.coord.fail_next_sync = true;
                return;
            }
            FaultAction::PowerCut { for_ms, .. } => {
                if self.coord.machine.is_none() {
                    // Already down: no commit to cut.
                    return;
                }
                // The next commit's first or second sync fails; the crash follows it.
                let syncs = self.rng_fault.below(2);
                if let Disk::Redb { data, log } = &self.coord.disk {
                    // A commit syncs the log, or (a checkpoint) the database: either may be the one cut.
                    data.cut_power_after_syncs(syncs);
                    if let Some((log, _)) = log {
                        log.cut_power_after_syncs(syncs);
                    }
                }
                self.coord.power_cut = Some(for_ms.unwrap_or(POWER_CUT_DOWNTIME_MS) * NS_PER_MS);
                return;
            }
        }
        if let Some(at) = undo_at {
            self.push(at, Ev::Undo(i));
        }
    }

    /// The end of fault `i`'s `for_ms`.
    pub(super) fn undo(&mut self, i: usize) {
        let fault = self.faults[i].clone();
        let name = fault.node().map(|n| n.to_string()).unwrap_or_default();
        match fault.action {
            FaultAction::Crash { node: NodeRef::Coordinator, .. } if self.coord.machine.is_none() => {
                self.close_span(&name, "crash");
                self.coord_start();
            }
            FaultAction::Crash { node: NodeRef::Worker(w), .. } => {
                self.close_span(&name, "crash");
                self.worker_start(w);
            }
            FaultAction::Partition { node: WorkerRef(w), .. } | FaultAction::Slow { node: WorkerRef(w), .. } => {
                self.heal(w)
            }
            FaultAction::DiskLatency { .. } => {
                self.coord.commit_latency_ns = self.scenario.coordinator.commit_latency_us * 1_000;
                self.liveness.coord_env(self.now, CoordEnv::Disturbed);
                self.close_span("coordinator", "fsync");
            }
            _ => {}
        }
    }
}
