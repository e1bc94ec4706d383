//! The environment-aware invariants: `no_false_failure`, `detect` and `rejoin`.
//!
//! Unlike [`crate::checker`], which judges a history alone, these need to know what
//! the network and the nodes were doing: a worker declared failed is a violation only
//! if its link was healthy, and a worker must be declared failed only if it really was
//! cut off. The simulator feeds this module both the history and its own fault state
//! ([`Env`] changes), all stamped with true time.
//!
//! Bounds (DESIGN.md, "Liveness"), in true time, with `slack` covering clock offsets
//! and network latency, plus twice the slowest commit latency in force (commits are
//! pipelined: a declaration or an answer may wait for the sync under way and then for
//! its own; see [`Liveness::commit_latency`]):
//! - `detect`: a registered worker cut off at `t0` (crashed, suspended, or its link to
//!   the coordinator cut) is declared failed by `t0 + 2 × heartbeat_interval +
//!   skew_budget + max(failure_timeout, skew_budget) + scan_interval + slack` (the
//!   deadline the coordinator keeps is at most two intervals and the skew budget after
//!   the last beat's arrival, on its own clock). A coordinator restart moves the bound
//!   to `restart + max(failure_timeout, skew_budget) + scan_interval + slack`.
//! - `rejoin`: a worker whose link is healthy again, alive and not registered at the
//!   coordinator, is registered again by `register_timeout + reconnect_backoff_max +
//!   slack` after the heal (or after being declared failed while healthy, or after the
//!   last message its link lost since: a lost registration costs one more try). The
//!   register timeout (two heartbeat intervals) is in it because a Register lost just
//!   before the heal is only given up on then, and the next waits out a backoff.
//! - `no_false_failure`: a worker declared failed had a disturbance (crash, restart, cut,
//!   slow link, reset, lost message, clock jump, coordinator crash or slow disk) within
//!   `failure_timeout + 2 × heartbeat_interval + scan_interval + slack` before.
//!
//! Clocks are not exempt: the coordinator keeps every deadline on its own monotonic
//! clock and lets a worker's `due_at` move it by the skew budget at most, so a wall
//! clock stepped by any amount, on a worker or on the coordinator, must break none of
//! the three.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rollout_core::config::Config;
use rollout_core::history::{HistoryEvent, HistoryRecord};
use rollout_core::{Incarnation, WorkerId};

use crate::checker::Violation;

/// A change in a worker's environment, as the simulator applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Env {
    /// The worker process died.
    WorkerDown,
    /// The worker process started.
    WorkerUp,
    /// The worker's link changed: whether worker → coordinator and coordinator →
    /// worker messages get through.
    Link {
        /// Worker → coordinator open.
        up: bool,
        /// Coordinator → worker open.
        down: bool,
    },
    /// Something that may legitimately delay beats: a lost message, a reset, a slow
    /// link starting or ending.
    Disturbed,
}

/// A change in the coordinator's environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoordEnv {
    /// Crashed.
    Down,
    /// Restarted (recovered from its disk).
    Up,
    /// Slow disk or anything else that may delay its batches.
    Disturbed,
}

/// The bounds, in ns of true time.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Cut-off to declared failed.
    pub detect_ns: u64,
    /// Coordinator restart to declared failed.
    pub detect_after_restart_ns: u64,
    /// Heal to registered again.
    pub rejoin_ns: u64,
    /// How long a worker must be undisturbed before a failure declaration is false.
    pub quiet_ns: u64,
}

impl Bounds {
    /// The bounds implied by `config`, with `slack_ns` for offsets, latency and commits.
    pub fn new(config: &Config, slack_ns: u64) -> Bounds {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let h = &config.health;
        let grace = ns(h.coordinator_failure_timeout.max(h.clock_skew_budget));
        let beat = ns(h.heartbeat_interval);
        let scan = ns(h.failure_scan_interval);
        let skew = ns(h.clock_skew_budget);
        Bounds {
            detect_ns: 2 * beat + skew + grace + scan + slack_ns,
            detect_after_restart_ns: grace + scan + slack_ns,
            // The worker's register_timeout is two beats (WorkerSettings::from_config).
            rejoin_ns: ns(config.transport.reconnect_backoff_max) + 2 * beat + slack_ns,
            quiet_ns: ns(h.coordinator_failure_timeout) + 2 * beat + scan + slack_ns,
        }
    }
}

#[derive(Debug, Clone)]
struct WorkerTrack {
    alive: bool,
    up: bool,
    down: bool,
    /// Registered at the coordinator (from the history).
    registered: bool,
    disturbed_at: u64,
    /// Declared failed by then, or violation.
    detect_by: Option<u64>,
    /// Registered again by then, or violation.
    rejoin_by: Option<u64>,
    /// The latest incarnation the worker ended itself (`SelfFenced`): the coordinator
    /// declaring that one failed (on the close of its Work stream) is no false failure.
    ended_itself: Option<Incarnation>,
}

/// The liveness checker. Feed it environment changes and history records in true-time
/// order, and call [`Liveness::tick`] as time passes.
#[derive(Debug)]
pub struct Liveness {
    bounds: Bounds,
    strict_false_failure: bool,
    strict_liveness: bool,
    workers: BTreeMap<WorkerId, WorkerTrack>,
    coord_up: bool,
    coord_disturbed_at: u64,
    /// Added to every pending bound: what the slowest commit seen so far can add to an
    /// answer. Commits are pipelined, so a batch's outputs may wait for the sync under
    /// way and then for their own: twice the commit latency (a `disk_latency` fault
    /// raises it).
    commit_allowance_ns: u64,
    /// The earliest pending bound (kept current: the simulator asks after every event).
    next: Option<u64>,
}

impl Liveness {
    /// A checker over `workers`; the `strict_*` flags choose which invariants fail.
    pub fn new(
        bounds: Bounds,
        workers: impl IntoIterator<Item = WorkerId>,
        strict_false_failure: bool,
        strict_liveness: bool,
    ) -> Self {
        let track = WorkerTrack {
            alive: false,
            up: true,
            down: true,
            registered: false,
            disturbed_at: 0,
            detect_by: None,
            rejoin_by: None,
            ended_itself: None,
        };
        Liveness {
            bounds,
            strict_false_failure,
            strict_liveness,
            workers: workers.into_iter().map(|w| (w, track.clone())).collect(),
            coord_up: true,
            coord_disturbed_at: 0,
            commit_allowance_ns: 0,
            next: None,
        }
    }

    fn refresh(&mut self) {
        let pending = self.workers.values().flat_map(|w| [w.detect_by, w.rejoin_by]).flatten().min();
        self.next = pending.map(|by| by + self.commit_allowance_ns);
    }

    /// The coordinator's commits take `ns` from now on (the bounds allow for the
    /// slowest seen).
    pub fn commit_latency(&mut self, ns: u64) {
        self.commit_allowance_ns = self.commit_allowance_ns.max(2 * ns);
        self.refresh();
    }

    /// A worker's environment changed at true time `t`.
    pub fn worker_env(&mut self, t: u64, worker: &WorkerId, change: Env) {
        let Some(w) = self.workers.get_mut(worker) else { return };
        let was_cut = !w.alive || !w.up;
        let was_healthy = w.alive && w.up && w.down;
        match change {
            Env::WorkerDown => w.alive = false,
            Env::WorkerUp => w.alive = true,
            Env::Link { up, down } => {
                w.up = up;
                w.down = down;
            }
            Env::Disturbed => {}
        }
        w.disturbed_at = t;
        let cut = !w.alive || !w.up;
        let healthy = w.alive && w.up && w.down;
        if cut && !was_cut && w.registered && self.coord_up {
            w.detect_by = Some(t + self.bounds.detect_ns);
        }
        if !cut {
            // Reachable again: whatever detection was pending is moot.
            w.detect_by = None;
        }
        if healthy && !was_healthy && !w.registered && self.coord_up {
            w.rejoin_by = Some(t + self.bounds.rejoin_ns);
        }
        if !healthy {
            w.rejoin_by = None;
        }
        if change == Env::Disturbed
            && let Some(by) = w.rejoin_by
        {
            // A registration (or its answer) lost on a healed link costs one more try.
            w.rejoin_by = Some(by.max(t + self.bounds.rejoin_ns));
        }
        self.refresh();
    }

    /// The coordinator recovered holding `registered` (the workers it keeps and has not
    /// declared failed). Call before [`CoordEnv::Up`]. A batch cut by a power failure may
    /// have reached the disk though the history never saw its events (a declaration of
    /// failure, a registration): what the coordinator recovered is what it believes.
    pub fn recovered(&mut self, registered: &BTreeSet<WorkerId>) {
        for (id, w) in &mut self.workers {
            w.registered = registered.contains(id);
        }
    }

    /// The coordinator's environment changed at true time `t`.
    pub fn coord_env(&mut self, t: u64, change: CoordEnv) {
        self.coord_disturbed_at = t;
        match change {
            CoordEnv::Down => {
                self.coord_up = false;
                for w in self.workers.values_mut() {
                    w.detect_by = None;
                    w.rejoin_by = None;
                }
            }
            CoordEnv::Up => {
                self.coord_up = true;
                let (detect, rejoin) = (self.bounds.detect_after_restart_ns, self.bounds.rejoin_ns);
                for w in self.workers.values_mut() {
                    if w.registered && (!w.alive || !w.up) {
                        w.detect_by = Some(t + detect);
                    }
                    if !w.registered && w.alive && w.up && w.down {
                        w.rejoin_by = Some(t + rejoin);
                    }
                }
            }
            CoordEnv::Disturbed => {}
        }
        self.refresh();
    }

    /// Judges one history record observed at true time `t`.
    pub fn observe(&mut self, t: u64, record: &HistoryRecord) -> Result<(), Violation> {
        let result = self.judge(t, record);
        self.refresh();
        result
    }

    fn judge(&mut self, t: u64, record: &HistoryRecord) -> Result<(), Violation> {
        let seq = Some(record.seq);
        match &record.event {
            HistoryEvent::Registered { worker, .. } => {
                if let Some(w) = self.workers.get_mut(worker) {
                    w.registered = true;
                    w.rejoin_by = None;
                    w.detect_by = None;
                    if !w.alive || !w.up {
                        // A registration from a process that is down or cut off (an old
                        // message, or the last one before the cut): detect it anew.
                        w.detect_by = Some(t + self.bounds.detect_ns);
                    }
                }
            }
            HistoryEvent::SelfFenced { worker, incarnation } => {
                if let Some(w) = self.workers.get_mut(worker) {
                    w.ended_itself = Some(*incarnation);
                }
            }
            HistoryEvent::DeclaredFailed { worker, incarnation } => {
                let quiet = self.bounds.quiet_ns;
                let coord_disturbed_at = self.coord_disturbed_at;
                let Some(w) = self.workers.get_mut(worker) else { return Ok(()) };
                let healthy = w.alive && w.up && w.down;
                // Declared failed on the worker's own word (its stream's close) is no
                // false failure.
                let on_its_word = w.ended_itself == Some(*incarnation);
                let undisturbed_since = w.disturbed_at.max(coord_disturbed_at);
                if self.strict_false_failure && healthy && !on_its_word && t.saturating_sub(undisturbed_since) > quiet {
                    return Err(Violation {
                        invariant: "no_false_failure",
                        seq,
                        message: format!(
                            "{worker} declared failed although its link was healthy and nothing disturbed it \
                             for {:.3} s (bound {:.3} s)",
                            t.saturating_sub(undisturbed_since) as f64 / 1e9,
                            quiet as f64 / 1e9
                        ),
                    });
                }
                w.registered = false;
                w.detect_by = None;
                if healthy {
                    w.rejoin_by = Some(t + self.bounds.rejoin_ns);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Checks the bounds that have passed by true time `t`.
    pub fn tick(&mut self, t: u64) -> Result<(), Violation> {
        if !self.strict_liveness {
            return Ok(());
        }
        let allowance = self.commit_allowance_ns;
        for (id, w) in &self.workers {
            if let Some(by) = w.detect_by.map(|by| by + allowance)
                && t > by
            {
                return Err(Violation {
                    invariant: "detect",
                    seq: None,
                    message: format!(
                        "{id} was cut off but not declared failed by t={:.3}s (bound {:.3} s after the cut, \
                         or {:.3} s after a coordinator restart, plus {:.3} s for commits)",
                        by as f64 / 1e9,
                        self.bounds.detect_ns as f64 / 1e9,
                        self.bounds.detect_after_restart_ns as f64 / 1e9,
                        allowance as f64 / 1e9
                    ),
                });
            }
            if let Some(by) = w.rejoin_by.map(|by| by + allowance)
                && t > by
            {
                return Err(Violation {
                    invariant: "rejoin",
                    seq: None,
                    message: format!(
                        "{id} healthy again but not registered by t={:.3}s (bound {:.3} s after the heal, plus \
                         {:.3} s for commits)",
                        by as f64 / 1e9,
                        self.bounds.rejoin_ns as f64 / 1e9,
                        allowance as f64 / 1e9
                    ),
                });
            }
        }
        Ok(())
    }

    /// The earliest pending bound, so the simulator can check exactly when it passes.
    pub fn next_deadline(&self) -> Option<u64> {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollout_core::Incarnation;

    fn w1() -> WorkerId {
        WorkerId::new("w1").expect("valid")
    }
    fn rec(seq: u64, event: HistoryEvent) -> HistoryRecord {
        HistoryRecord { seq, node: "coordinator".into(), wall_unix_ms: 0, wall_unix_us: None, event }
    }
    fn registered() -> HistoryEvent {
        HistoryEvent::Registered { worker: w1(), incarnation: Incarnation(1) }
    }
    fn failed() -> HistoryEvent {
        HistoryEvent::DeclaredFailed { worker: w1(), incarnation: Incarnation(1) }
    }
    const S: u64 = 1_000_000_000;

    fn checker() -> Liveness {
        let bounds = Bounds { detect_ns: 7 * S, detect_after_restart_ns: 6 * S, rejoin_ns: 6 * S, quiet_ns: 7 * S };
        let mut l = Liveness::new(bounds, [w1()], true, true);
        l.worker_env(0, &w1(), Env::WorkerUp);
        l
    }

    #[test]
    fn a_healthy_worker_declared_failed_is_a_false_failure() {
        let mut l = checker();
        l.observe(S, &rec(0, registered())).expect("fine");
        let v = l.observe(20 * S, &rec(1, failed())).expect_err("false failure");
        assert_eq!(v.invariant, "no_false_failure");
        // The same declaration soon after a lost message is fine.
        let mut l = checker();
        l.observe(S, &rec(0, registered())).expect("fine");
        l.worker_env(18 * S, &w1(), Env::Disturbed);
        assert!(l.observe(20 * S, &rec(1, failed())).is_ok());
    }

    #[test]
    fn a_cut_worker_must_be_detected_in_time() {
        let mut l = checker();
        l.observe(S, &rec(0, registered())).expect("fine");
        l.worker_env(10 * S, &w1(), Env::WorkerDown);
        assert!(l.tick(16 * S).is_ok());
        assert_eq!(l.tick(18 * S).expect_err("late").invariant, "detect");
        let mut l = checker();
        l.observe(S, &rec(0, registered())).expect("fine");
        l.worker_env(10 * S, &w1(), Env::Link { up: false, down: true });
        l.observe(15 * S, &rec(1, failed())).expect("a cut worker may be declared failed");
        assert!(l.tick(30 * S).is_ok());
    }

    #[test]
    fn a_healed_worker_must_rejoin_in_time() {
        let mut l = checker();
        l.observe(S, &rec(0, registered())).expect("fine");
        l.worker_env(10 * S, &w1(), Env::Link { up: false, down: false });
        l.observe(15 * S, &rec(1, failed())).expect("cut");
        l.worker_env(20 * S, &w1(), Env::Link { up: true, down: true });
        assert!(l.tick(25 * S).is_ok());
        assert_eq!(l.tick(27 * S).expect_err("late").invariant, "rejoin");
        let mut l2 = checker();
        l2.observe(S, &rec(0, registered())).expect("fine");
        l2.worker_env(10 * S, &w1(), Env::Link { up: false, down: false });
        l2.observe(15 * S, &rec(1, failed())).expect("cut");
        l2.worker_env(20 * S, &w1(), Env::Link { up: true, down: true });
        l2.observe(22 * S, &rec(2, registered())).expect("rejoined");
        assert!(l2.tick(40 * S).is_ok());
    }

    #[test]
    fn a_declaration_the_history_never_saw_counts_once_the_coordinator_recovers_it() {
        // w1 dies; the coordinator declares it failed in a batch cut by a power failure
        // after the commit reached the disk: no event, but the recovered state says so.
        let mut l = checker();
        l.observe(S, &rec(0, registered())).expect("fine");
        l.worker_env(2 * S, &w1(), Env::WorkerDown);
        l.coord_env(8 * S, CoordEnv::Down);
        l.recovered(&BTreeSet::new());
        l.coord_env(9 * S, CoordEnv::Up);
        assert!(l.tick(60 * S).is_ok(), "failed in the coordinator's own records");
        // Recovered as registered, it must be declared failed within the restart bound.
        let mut l = checker();
        l.observe(S, &rec(0, registered())).expect("fine");
        l.worker_env(2 * S, &w1(), Env::WorkerDown);
        l.coord_env(8 * S, CoordEnv::Down);
        l.recovered(&BTreeSet::from([w1()]));
        l.coord_env(9 * S, CoordEnv::Up);
        assert!(l.tick(14 * S).is_ok());
        assert_eq!(l.tick(16 * S).expect_err("late").invariant, "detect");
    }

    #[test]
    fn a_worker_that_dies_is_detected_in_time_whatever_its_clock_did() {
        // Clocks are no excuse: the environment knows no clock changes at all.
        let mut l = checker();
        l.observe(S, &rec(0, registered())).expect("fine");
        l.worker_env(10 * S, &w1(), Env::WorkerDown);
        assert_eq!(l.tick(60 * S).expect_err("never declared").invariant, "detect");
    }
}
