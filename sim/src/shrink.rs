//! The shrinker: delta-debugs a failing (scenario, seed) to a small scenario that
//! still fails the same invariant with the same seed.
//!
//! It first writes the swarm's draws out as a plain schedule (the same run, see
//! [`crate::swarm`]), then, keeping each change only if the run still breaks the same
//! invariant: cuts the run short after the violation, removes faults (ddmin over the
//! schedule), removes jobs, tasks and workers, and switches off the random noise
//! (plugin failures and hangs, message loss and duplication, clock offsets).

use std::path::{Path, PathBuf};

use crate::engine::{RunReport, run};
use crate::scenario::{NodeRef, Scenario};

/// What the shrinker produced.
#[derive(Debug)]
pub struct Shrunk {
    /// The minimal scenario (its `seeds` is the failing seed).
    pub scenario: Scenario,
    /// Its failing run.
    pub report: RunReport,
    /// The invariant it breaks.
    pub invariant: &'static str,
    /// Runs tried.
    pub runs: u32,
}

impl Shrunk {
    /// Faults plus jobs: the "events" a reader has to follow.
    pub fn size(&self) -> usize {
        self.scenario.faults.len() + self.scenario.workload.jobs as usize
    }

    /// Writes the scenario to `dir/<name>.toml`; the path.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.toml", self.scenario.name));
        std::fs::write(&path, self.scenario.to_toml())?;
        Ok(path)
    }
}

struct Search<'a> {
    seed: u64,
    target: &'static str,
    runs: u32,
    progress: &'a mut dyn FnMut(&str),
}

impl Search<'_> {
    /// Whether `candidate` still fails with the target invariant.
    fn fails(&mut self, candidate: &Scenario) -> bool {
        self.runs += 1;
        run(candidate, self.seed).violation.is_some_and(|v| v.invariant == self.target)
    }

    /// Keeps `change` applied to `best` if the result still fails.
    fn attempt(&mut self, best: &mut Scenario, what: &str, change: impl FnOnce(&mut Scenario) -> bool) -> bool {
        let mut candidate = best.clone();
        if !change(&mut candidate) || candidate == *best {
            return false;
        }
        if self.fails(&candidate) {
            (self.progress)(&format!("kept: {what}"));
            *best = candidate;
            true
        } else {
            false
        }
    }

    /// ddmin over the fault schedule.
    fn faults(&mut self, best: &mut Scenario) {
        let mut chunks = 2usize;
        while !best.faults.is_empty() {
            let len = best.faults.len();
            let size = len.div_ceil(chunks);
            let mut removed = false;
            for start in (0..len).step_by(size.max(1)) {
                let end = (start + size).min(len);
                let what = format!("without faults {start}..{end} of {len}");
                if self.attempt(best, &what, |s| {
                    s.faults.drain(start..end);
                    true
                }) {
                    removed = true;
                    break;
                }
            }
            if removed {
                chunks = chunks.saturating_sub(1).max(2);
            } else if chunks >= len {
                break;
            } else {
                chunks = (chunks * 2).min(len);
            }
        }
    }

    /// Halves, then decrements, a count while the run still fails.
    fn count(&mut self, best: &mut Scenario, what: &str, get: fn(&Scenario) -> u32, set: fn(&mut Scenario, u32)) {
        loop {
            let n = get(best);
            if n <= 1 {
                return;
            }
            if self.attempt(best, &format!("{what} {} -> {}", n, n / 2), |s| {
                set(s, n / 2);
                true
            }) {
                continue;
            }
            if !self.attempt(best, &format!("{what} {} -> {}", n, n - 1), |s| {
                set(s, n - 1);
                true
            }) {
                return;
            }
        }
    }
}

/// Shrinks `scenario` failing with `seed`. `progress` hears each kept step.
pub fn shrink(scenario: &Scenario, seed: u64, progress: &mut dyn FnMut(&str)) -> Result<Shrunk, String> {
    let first = run(scenario, seed);
    let Some(violation) = first.violation.clone() else {
        return Err(format!("{} does not fail with seed {seed}: nothing to shrink", scenario.name));
    };
    let mut search = Search { seed, target: violation.invariant, runs: 1, progress };
    // The swarm's draws, written out: the same run.
    let mut best = scenario.clone();
    best.faults = first.faults.clone();
    best.swarm = None;
    best.seeds = vec![seed];
    // A regression exists for its failure, not for the original's coverage.
    best.exercises.clear();
    if !search.fails(&best) {
        return Err("the swarm's draws written out as a schedule no longer fail; cannot shrink".into());
    }
    // The run need not go on after the violation (end-of-run checks need the end).
    let secs = first.sim_ns.div_ceil(1_000_000_000) + 1;
    if violation.seq.is_some() && secs < best.duration_s {
        let what = format!("duration {} s -> {secs} s", best.duration_s);
        search.attempt(&mut best, &what, |s| {
            s.duration_s = secs;
            s.faults.retain(|f| f.at_ms < secs * 1_000);
            true
        });
    }
    // Each pass may open the way for another (one worker left takes every task, so
    // fewer tasks may do): repeat them until a round changes nothing.
    for _ in 0..4 {
        let before = best.clone();
        search.faults(&mut best);
        search.count(&mut best, "jobs", |s| s.workload.jobs, |s, n| s.workload.jobs = n);
        search.count(&mut best, "tasks per job", |s| s.workload.tasks_per_job, |s, n| s.workload.tasks_per_job = n);
        // Workers from the last, while no fault names the one removed.
        while best.cluster.workers > 1 {
            let last = best.cluster.workers as usize - 1;
            if best.faults.iter().any(|f| f.node() == Some(NodeRef::Worker(last))) {
                break;
            }
            if !search.attempt(&mut best, "one worker fewer", |s| {
                s.cluster.workers -= 1;
                true
            }) {
                break;
            }
        }
        search.count(&mut best, "slots", |s| s.cluster.slots, |s, n| s.cluster.slots = n);
        if best == before {
            break;
        }
    }
    search.attempt(&mut best, "no plugin failures", |s| {
        s.workload.failure_probability = 0.0;
        true
    });
    search.attempt(&mut best, "no plugin hangs", |s| {
        s.workload.hang_probability = 0.0;
        true
    });
    search.attempt(&mut best, "no message loss or duplication", |s| {
        s.network.unary_loss = 0.0;
        s.network.unary_duplicate = 0.0;
        true
    });
    search.attempt(&mut best, "exact clocks", |s| {
        s.clocks.max_offset_ms = 0;
        s.clocks.max_drift_ppm = 0;
        true
    });
    // Fewer jobs and workers may make more faults removable.
    search.faults(&mut best);
    let report = run(&best, seed);
    best.name = format!("{}_seed{seed}", scenario.name);
    best.description = format!(
        "Shrunk by `sim shrink` from {} with seed {seed} ({} runs): {}",
        scenario.name,
        search.runs,
        report.violation.as_ref().map(ToString::to_string).unwrap_or_default()
    );
    Ok(Shrunk { scenario: best, report, invariant: violation.invariant, runs: search.runs })
}
