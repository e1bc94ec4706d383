//! What a run produced: the report, the timeline's message and fault logs, the trace
//! hash, and the final checks against what the coordinator's disk holds.

use std::fmt::Write as _;

use rollout_coordinator::{Coordinator, TaskState, audit, durable_task_states};
use rollout_core::history::HistoryRecord;
use rollout_core::{JobId, TaskId};
use sha2::{Digest, Sha256};

use super::{Coverage, Sim};
use crate::checker::{FinalState, Violation};
use crate::scenario::{Fault, Scenario};

/// How many history records a failure report shows.
const TAIL: usize = 30;

#[derive(Debug, Clone)]
pub struct MessageRecord {
    /// The worker at one end (index; `w1` is 0).
    pub worker: usize,
    /// Worker → coordinator.
    pub up: bool,
    /// Its kind (`heartbeat`, `assign`, ...).
    pub kind: &'static str,
    /// The task it is about, if any.
    pub task: Option<TaskId>,
    /// True time sent, ns.
    pub sent_ns: u64,
    /// True time delivered, ns; `None`: lost.
    pub delivered_ns: Option<u64>,
}

/// One fault as it happened, for the timeline.
#[derive(Debug, Clone)]
pub struct FaultSpan {
    /// `coordinator` or a worker name.
    pub node: String,
    /// What (`crash`, `partition both`, `slow +800ms`, ...).
    pub what: String,
    /// True time it began, ns.
    pub start_ns: u64,
    /// True time it ended, ns (`None`: still on at the end; equal to start: instant).
    pub end_ns: Option<u64>,
}

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Keep every message and fault for a timeline (costs memory and time).
    pub record: bool,
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// The scenario's name.
    pub scenario: String,
    /// Events processed.
    pub events: u64,
    /// Simulated time reached, in ns.
    pub sim_ns: u64,
    /// SHA-256 over every event and history record, hex.
    pub trace_hash: String,
    /// Jobs acknowledged to the operator.
    pub jobs_acked: usize,
    /// Tasks committed (from the coordinator at the end).
    pub committed: u64,
    /// Tasks dead-lettered.
    pub dead_lettered: u64,
    /// Overlaps seen while `no_overlap` was not strict.
    pub overlaps: u64,
    /// Messages sent / dropped by the network.
    pub messages: (u64, u64),
    /// Coordinator batches and the inputs they carried (group commit).
    pub batches: (u64, u64),
    /// The first violation, if any.
    pub violation: Option<Violation>,
    /// The whole history, with each record's true time in ns.
    pub history: Vec<(u64, HistoryRecord)>,
    /// Every message (with [`Options::record`]).
    pub message_log: Vec<MessageRecord>,
    /// Every fault (with [`Options::record`]).
    pub fault_log: Vec<FaultSpan>,
    /// The faults that ran: the schedule plus the swarm's draws, in schedule order.
    pub faults: Vec<Fault>,
    /// Stale submits the coordinator rejected.
    pub stale_rejected: u64,
    /// Audit entries verified at the end.
    pub audit_entries: u64,
    /// Work frames over `limits.max_message_bytes`, each of which broke its stream.
    pub frames_broken: u64,
    /// Write sets of batches applied over a sync that then failed (dropped with it).
    pub sets_dropped: u64,
    /// What the run exercised.
    pub coverage: Coverage,
}

impl RunReport {
    /// The last history records before the end (or the violation), one per line.
    pub fn tail(&self) -> String {
        let mut s = String::new();
        for (t, r) in self.history.iter().rev().take(TAIL).rev() {
            let _ = writeln!(s, "  t={:.6}s {} {:?}", *t as f64 / 1e9, r.node, r.event);
        }
        s
    }
}

impl RunReport {
    pub(super) fn setup_failure(scenario: &Scenario, seed: u64, violation: Violation) -> RunReport {
        RunReport {
            seed,
            scenario: scenario.name.clone(),
            events: 0,
            sim_ns: 0,
            trace_hash: String::new(),
            jobs_acked: 0,
            committed: 0,
            dead_lettered: 0,
            overlaps: 0,
            messages: (0, 0),
            batches: (0, 0),
            violation: Some(violation),
            history: Vec::new(),
            message_log: Vec::new(),
            fault_log: Vec::new(),
            faults: scenario.faults.clone(),
            stale_rejected: 0,
            audit_entries: 0,
            frames_broken: 0,
            sets_dropped: 0,
            coverage: Coverage::default(),
        }
    }
}

pub(super) struct HashWriter<'a>(pub(super) &'a mut Sha256);

impl std::fmt::Write for HashWriter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.update(s.as_bytes());
        Ok(())
    }
}

impl Sim {
    pub(super) fn fault_log_push(&mut self, node: &str, what: String, end_ns: Option<u64>) {
        if self.options.record {
            self.fault_log.push(FaultSpan { node: node.to_owned(), what, start_ns: self.now, end_ns });
        }
    }

    pub(super) fn open_span(&mut self, node: &str, what: String) {
        self.fault_log_push(node, what, None);
    }

    pub(super) fn instant_span(&mut self, node: &str, what: String) {
        self.fault_log_push(node, what, Some(self.now));
    }

    /// Ends the open spans of `node` whose description starts with `prefix`.
    pub(super) fn close_span(&mut self, node: &str, prefix: &str) {
        let now = self.now;
        for span in self.fault_log.iter_mut().filter(|s| s.end_ns.is_none() && s.node == node) {
            if span.what.starts_with(prefix) {
                span.end_ns = Some(now);
            }
        }
    }

    // ---- end ----

    pub(super) fn final_checks(&mut self) {
        let acked: Vec<(JobId, u32)> = self.acked.values().copied().collect();
        let coord = match self.coord.machine.take() {
            Some(c) => Some(c),
            // Down at the end: judge what its disk would recover.
            None => self
                .coord
                .disk
                .open(true)
                .ok()
                .and_then(|s| Coordinator::recover(s, self.settings.clone(), self.coord.clock.now(self.now)).ok()),
        };
        let Some(coord) = coord else {
            return self.fail("coordinator_recovery", "the final state could not be recovered from disk".into());
        };
        // Judged from what its disk holds, not from the machine's memory: one look at it
        // (a fork, opened once) for the task states and the audit chain, both read-only.
        let on_disk = self.coord.disk.open(true);
        let durable = on_disk.clone().and_then(|s| durable_task_states(&*s).map_err(|e| e.to_string()));
        let states = match durable {
            Ok(states) => states,
            Err(e) => return self.fail("coordinator_recovery", format!("reading the final task states: {e}")),
        };
        let held: Vec<(TaskId, FinalState)> = states
            .iter()
            .map(|(t, s)| (*t, if s.is_terminal() { FinalState::Terminal } else { FinalState::Pending }))
            .collect();
        self.final_states = states;
        let progress = self.scenario.invariants.progress;
        if progress && self.acked.len() < self.scenario.workload.jobs as usize {
            let missing = self.scenario.workload.jobs as usize - self.acked.len();
            return self.fail("progress", format!("{missing} job(s) never acknowledged"));
        }
        if let Err(v) = self.checker.finish(&acked, held, progress) {
            self.violation = Some(v);
        }
        if self.scenario.invariants.all_committed {
            let expected = u64::from(self.scenario.workload.jobs) * u64::from(self.scenario.workload.tasks_per_job);
            let committed = self.final_states.iter().filter(|(_, s)| s.committed_result().is_some()).count();
            if let Some((task, state)) = self.final_states.iter().find(|(_, s)| s.committed_result().is_none()) {
                let message = format!(
                    "{task} ended {state:?} though no attempt of the workload fails ({committed} of {expected} committed; {} work frame(s) over the message limit)",
                    self.frames_broken
                );
                self.fail("all_committed", message);
            } else if (committed as u64) < expected {
                self.fail("all_committed", format!("{committed} of {expected} tasks committed"));
            }
        }
        self.coord.machine = Some(coord);
        // audit_chain: the hash chain on disk verifies, entry by entry.
        let audit = on_disk.and_then(|s| audit::verify(&*s).map_err(|e| e.to_string()));
        match audit {
            Ok(entries) => self.audit_entries = entries,
            Err(e) => self.fail("audit_chain", e),
        }
    }

    pub(super) fn report(mut self, seed: u64) -> RunReport {
        let (mut committed, mut dead_lettered) = (0, 0);
        for (_, s) in &self.final_states {
            match s {
                TaskState::Committed { .. } | TaskState::CommittedInline { .. } => committed += 1,
                TaskState::DeadLettered => dead_lettered += 1,
                _ => {}
            }
        }
        let _ = writeln!(HashWriter(&mut self.hasher), "end {} {:?}", self.now, self.violation);
        let hash = self.hasher.finalize();
        let trace_hash = hash.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
        RunReport {
            seed,
            scenario: self.scenario.name.clone(),
            events: self.events,
            sim_ns: self.now,
            trace_hash,
            jobs_acked: self.acked.len(),
            committed,
            dead_lettered,
            overlaps: self.checker.overlaps,
            messages: self.messages,
            batches: self.batches,
            violation: self.violation,
            history: self.history,
            message_log: self.message_log,
            fault_log: self.fault_log,
            faults: self.faults,
            stale_rejected: self.stale_rejected,
            audit_entries: self.audit_entries,
            frames_broken: self.frames_broken,
            sets_dropped: self.sets_dropped,
            coverage: Coverage {
                sets_dropped: self.sets_dropped,
                frames_broken: self.frames_broken,
                overlaps: self.checker.overlaps,
                ..self.coverage
            },
        }
    }
}
