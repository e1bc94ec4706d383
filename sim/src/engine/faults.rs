//! The fault schedule played out: each fault when its time comes, and its undoing at
//! the end of its `for_ms`.

use rollout_coordinator::CoordinatorInput;
use rollout_core::TaskId;
use rollout_storage::CrashMode;

use super::coordinator::Disk;
use super::{Ev, NS_PER_MS, Sim};
use crate::liveness::{CoordEnv, Env};
use crate::scenario::{Direction, FaultKind, NodeRef};

/// How long the coordinator stays down after a power cut without `for_ms`.
pub(crate) const POWER_CUT_DOWNTIME_MS: u64 = 2_000;

impl Sim {
    pub(super) fn fault(&mut self, i: usize) {
        let fault = self.faults[i].clone();
        let node = fault.node.as_deref().and_then(|n| self.scenario.node(n));
        let name = fault.node.clone().unwrap_or_else(|| "all links".into());
        let undo_at = fault.for_ms.map(|ms| self.now + ms * NS_PER_MS);
        match (fault.kind, node) {
            (FaultKind::Crash, Some(NodeRef::Coordinator)) => {
                self.coord_crash(CrashMode::LoseUnsynced, false);
                self.open_span(&name, "crash".into());
            }
            (FaultKind::Crash, Some(NodeRef::Worker(w))) => {
                self.worker_crash(w);
                self.open_span(&name, "crash".into());
            }
            (FaultKind::Restart, Some(NodeRef::Coordinator)) => {
                if self.coord.machine.is_none() {
                    self.close_span(&name, "crash");
                    self.coord_start();
                }
            }
            (FaultKind::Restart, Some(NodeRef::Worker(w))) => {
                self.close_span(&name, "crash");
                self.worker_start(w);
            }
            (FaultKind::Partition, Some(NodeRef::Worker(w))) => {
                let dir = fault.direction.unwrap_or_default();
                let up = matches!(dir, Direction::Both | Direction::ToCoordinator);
                let down = matches!(dir, Direction::Both | Direction::ToWorker);
                self.block(w, up, down);
                let what = match dir {
                    Direction::Both => "partition",
                    Direction::ToCoordinator => "partition to coordinator",
                    Direction::ToWorker => "partition to worker",
                };
                self.open_span(&name, what.into());
            }
            (FaultKind::Heal, Some(NodeRef::Worker(w))) => self.heal(w),
            (FaultKind::Heal, None) => {
                for w in 0..self.links.len() {
                    self.heal(w);
                }
            }
            (FaultKind::Reset, Some(NodeRef::Worker(w))) => {
                self.instant_span(&name, "reset".into());
                self.reset_link(w, "reset");
            }
            (FaultKind::ClockJump, Some(node)) => {
                // A step of any size is no disturbance to the liveness checks: the
                // coordinator keeps deadlines on its own monotonic clock.
                let by_ms = fault.by_ms.unwrap_or(0);
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
            (FaultKind::Slow, Some(NodeRef::Worker(w))) => {
                let ms = fault.latency_ms.unwrap_or(0);
                self.links[w].extra_ns = ms * NS_PER_MS;
                let id = self.workers[w].id.clone();
                self.liveness.worker_env(self.now, &id, Env::Disturbed);
                self.open_span(&name, format!("slow +{ms} ms"));
            }
            (FaultKind::Flap, Some(NodeRef::Worker(w))) => {
                let period = fault.period_ms.unwrap_or(1).max(1) * NS_PER_MS;
                let until = undo_at.unwrap_or(self.now);
                self.fault_log_push(&name, format!("flapping every {} ms", period / NS_PER_MS), Some(until));
                self.push(self.now, Ev::Flap { w, cut: true, period, until });
                return;
            }
            (FaultKind::DiskLatency, Some(NodeRef::Coordinator)) => {
                let ms = fault.latency_ms.unwrap_or(0);
                self.coord.commit_latency_ns = ms * NS_PER_MS;
                self.liveness.commit_latency(ms * NS_PER_MS);
                self.liveness.coord_env(self.now, CoordEnv::Disturbed);
                self.open_span(&name, format!("fsync {ms} ms"));
            }
            (FaultKind::Pause, Some(NodeRef::Worker(w))) => {
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
            (FaultKind::Drain, Some(NodeRef::Worker(w))) => {
                let request = self.operator_request();
                let worker = self.workers[w].id.clone();
                self.coord_enqueue(CoordinatorInput::Drain { request, worker });
                self.instant_span(&name, "drain".into());
            }
            (FaultKind::CancelJob | FaultKind::CancelTask, _) => {
                let index = fault.job.unwrap_or(0);
                // Only a job the operator has heard back about has an id to cancel.
                let Some(&(job, _)) = self.acked.get(&index) else { return };
                let request = self.operator_request();
                let (input, what) = match (fault.kind, fault.task) {
                    (FaultKind::CancelTask, Some(t)) => {
                        let task = TaskId::new(job, t);
                        (CoordinatorInput::CancelTask { request, task }, format!("cancel {task}"))
                    }
                    _ => (CoordinatorInput::CancelJob { request, job }, format!("cancel {job}")),
                };
                self.coord_enqueue(input);
                self.instant_span("coordinator", what);
            }
            (FaultKind::SyncFailure, Some(NodeRef::Coordinator)) => {
                self.coord.fail_next_sync = true;
                return;
            }
            (FaultKind::PowerCut, Some(NodeRef::Coordinator)) => {
                if self.coord.machine.is_none() {
                    // Already down: no commit to cut.
                    return;
                }
                // The next commit's first or second sync fails; the crash follows it.
                let syncs = self.rng_fault.below(2);
                if let Disk::Redb(disk) = &self.coord.disk {
                    disk.cut_power_after_syncs(syncs);
                }
                self.coord.power_cut = Some(fault.for_ms.unwrap_or(POWER_CUT_DOWNTIME_MS) * NS_PER_MS);
                return;
            }
            // Validation rejects every other combination.
            _ => return,
        }
        if let Some(at) = undo_at {
            self.push(at, Ev::Undo(i));
        }
    }

    /// The end of fault `i`'s `for_ms`.
    pub(super) fn undo(&mut self, i: usize) {
        let fault = self.faults[i].clone();
        let node = fault.node.as_deref().and_then(|n| self.scenario.node(n));
        let name = fault.node.clone().unwrap_or_default();
        match (fault.kind, node) {
            (FaultKind::Crash, Some(NodeRef::Coordinator)) if self.coord.machine.is_none() => {
                self.close_span(&name, "crash");
                self.coord_start();
            }
            (FaultKind::Crash, Some(NodeRef::Worker(w))) => {
                self.close_span(&name, "crash");
                self.worker_start(w);
            }
            (FaultKind::Partition | FaultKind::Slow, Some(NodeRef::Worker(w))) => self.heal(w),
            (FaultKind::DiskLatency, _) => {
                self.coord.commit_latency_ns = self.scenario.coordinator.commit_latency_us * 1_000;
                self.liveness.coord_env(self.now, CoordEnv::Disturbed);
                self.close_span("coordinator", "fsync");
            }
            _ => {}
        }
    }
}
