//! `make bench-sim`: how fast the simulator runs, on one core.
//!
//! 1. Simulated seconds per wall second for 1 coordinator + 16 workers (2 slots each),
//!    heartbeats every 500 ms, steady work: RL-rollout-like tasks of 30-90 s, 10 jobs
//!    of 100 tasks over 10 simulated minutes. Measured with the model store (the
//!    default for speed runs) and, for comparison, with redb on the crash-faithful
//!    in-memory disk; and once more with short tasks (2-20 s), where commits dominate.
//! 2. Seeds per minute for the swarm scenario cut to 60 simulated seconds.
//!
//! Each figure is the median of 5 runs (seeds 1..=5). Target: >= 10,000x.

use std::time::Instant;

use sim::{Scenario, run, scenarios_dir};

const STEADY: &str = r#"
description = "bench: 16 workers, steady work"
duration_s = 600
[cluster]
workers = 16
slots = 2
[workload]
jobs = 10
tasks_per_job = 100
submit_every_ms = 30000
task_duration_ms = [30000, 90000]
[invariants]
progress = false
"#;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Median simulated seconds per wall second, median events per wall second, and the
/// events of the last run.
fn speed(scenario: &Scenario) -> (f64, f64, u64) {
    let mut speeds = Vec::new();
    let mut rates = Vec::new();
    let mut events = 0;
    for seed in 1..=5 {
        let started = Instant::now();
        let report = run(scenario, seed);
        let wall = started.elapsed().as_secs_f64();
        assert!(report.violation.is_none(), "bench run failed: {:?}", report.violation);
        speeds.push(report.sim_ns as f64 / 1e9 / wall);
        rates.push(report.events as f64 / wall);
        events = report.events;
    }
    (median(speeds), median(rates), events)
}

fn main() {
    let steady = Scenario::parse(STEADY, std::path::Path::new("bench_steady.toml")).expect("bench scenario parses");
    let mut model = steady.clone();
    model.coordinator.storage = sim::scenario::StorageKind::Model;
    let mut short = model.clone();
    short.workload.task_duration_ms = [2_000, 20_000];
    let mut short_redb = short.clone();
    short_redb.coordinator.storage = sim::scenario::StorageKind::Redb;

    println!("simulator speed, 1 coordinator + 16 workers, heartbeat 500 ms, 600 simulated s, median of 5 seeds");
    for (label, scenario) in [
        ("tasks 30-90 s, model store", &model),
        ("tasks 30-90 s, redb on MemDisk", &steady),
        ("tasks 2-20 s, model store", &short),
        ("tasks 2-20 s, redb on MemDisk", &short_redb),
    ] {
        let (x, rate, events) = speed(scenario);
        let verdict = if x >= 10_000.0 { "meets" } else { "below" };
        println!(
            "  {label:<32} {x:>9.0} sim-s per wall-s, {rate:>9.0} events per wall-s ({events} events; {verdict} the \
             10,000x target)"
        );
    }

    let mut swarm = Scenario::load("swarm", &scenarios_dir()).expect("swarm ships");
    swarm.duration_s = 60;
    swarm.invariants.progress = false;
    if let Some(s) = swarm.swarm.as_mut() {
        s.heal_by_ms = 30_000;
    }
    let mut per_minute = Vec::new();
    for round in 0..5u64 {
        let started = Instant::now();
        let mut seeds = 0u64;
        while started.elapsed().as_secs_f64() < 2.0 {
            let report = run(&swarm, round * 1_000_000 + seeds);
            assert!(
                report.violation.is_none(),
                "swarm seed {} failed: {:?}",
                round * 1_000_000 + seeds,
                report.violation
            );
            seeds += 1;
        }
        per_minute.push(seeds as f64 * 60.0 / started.elapsed().as_secs_f64());
    }
    println!("swarm, 60 simulated s per seed: {:.0} seeds per minute (median of 5 rounds of 2 s)", median(per_minute));
}
