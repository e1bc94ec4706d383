//! Every shipped scenario and every regression passes its strict invariants over fixed
//! seeds, and a run is a pure function of (scenario, seed): the trace-hash meta-test.

use std::path::Path;

use sim::scenario::StorageKind;
use sim::{Options, Scenario, run, run_with, scenarios_dir};

/// The TOML files of `dir`, sorted by name, parsed.
fn load_dir(dir: &Path) -> Vec<Scenario> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| Scenario::load(p.to_str().expect("utf-8 path"), &scenarios_dir()).unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

fn shipped() -> Vec<Scenario> {
    load_dir(&scenarios_dir())
}

fn regressions() -> Vec<Scenario> {
    load_dir(&scenarios_dir().join("regressions"))
}

/// The seeds every scenario runs with unless it names its own.
const SEEDS: [u64; 3] = [1, 2, 3];

#[test]
fn the_required_scenarios_ship() {
    let names: Vec<String> = shipped().into_iter().map(|s| s.name).collect();
    for required in [
        "steady_state",
        "worker_crash",
        "coordinator_crash_restart",
        "partition_heal",
        "one_way_partition",
        "flapping_link",
        "duplicate_and_reorder",
        "clock_skew_within_budget",
        "clock_skew_beyond_budget",
        "process_pause",
        "slow_disk_fsync",
        "drain_and_cancel",
        "swarm",
    ] {
        assert!(names.iter().any(|n| n == required), "missing scenario {required}; have {names:?}");
    }
    assert!(!regressions().is_empty(), "scenarios/regressions/ holds the shrunk failures found so far");
}

#[test]
fn every_scenario_and_regression_passes_its_strict_invariants() {
    for scenario in shipped().into_iter().chain(regressions()) {
        let seeds = if scenario.seeds.is_empty() { SEEDS.to_vec() } else { scenario.seeds.clone() };
        for seed in seeds {
            let report = run(&scenario, seed);
            assert!(
                report.violation.is_none(),
                "cargo run -p sim -- run {} --seed {seed}\n{}\n{}",
                scenario.name,
                report.violation.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                report.tail()
            );
            assert!(report.committed > 0, "{} seed {seed}: nothing committed", scenario.name);
            assert!(report.audit_entries > 0, "{} seed {seed}: the audit chain was not checked", scenario.name);
        }
    }
}

#[test]
fn same_seed_same_trace_hash_different_seed_different_hash() {
    for scenario in shipped() {
        let a = run(&scenario, 42);
        let b = run(&scenario, 42);
        assert_eq!(a.trace_hash, b.trace_hash, "{} is not deterministic", scenario.name);
        assert_eq!(a.events, b.events);
        let c = run(&scenario, 43);
        assert_ne!(a.trace_hash, c.trace_hash, "{}: seeds 42 and 43 gave the same run", scenario.name);
    }
}

#[test]
fn a_suspended_worker_makes_runs_overlap_and_fencing_still_holds() {
    let scenario = Scenario::load("process_pause", &scenarios_dir()).expect("ships");
    let (mut overlaps, mut stale) = (0, 0);
    for seed in 0..6 {
        let report = run(&scenario, seed);
        assert!(report.violation.is_none(), "seed {seed}: {:?}", report.violation);
        overlaps += report.overlaps;
        stale += report.stale_rejected;
    }
    assert!(overlaps > 0, "split brain never produced overlapping runs in 6 seeds");
    assert!(stale > 0, "no stale submit was ever rejected in 6 seeds");
}

#[test]
fn clocks_far_beyond_the_budget_break_nothing_not_even_overlap() {
    // Strict everything, over more seeds than the default three: a worker's clock (an
    // hour off, 30 s back, 20 s ahead) and the coordinator's (45 s ahead) decide nothing.
    let scenario = Scenario::load("clock_skew_beyond_budget", &scenarios_dir()).expect("ships");
    assert!(scenario.invariants.no_overlap && scenario.invariants.no_false_failure && scenario.invariants.liveness);
    for seed in 0..8 {
        let report = run(&scenario, seed);
        assert!(report.violation.is_none(), "seed {seed}: {:?}", report.violation);
        assert_eq!(report.overlaps, 0, "seed {seed}");
    }
}

#[test]
fn the_swarm_draws_a_different_fault_mix_per_seed_and_writing_it_out_is_the_same_run() {
    let swarm = Scenario::load("swarm", &scenarios_dir()).expect("ships");
    let a = run(&swarm, 5);
    let b = run(&swarm, 6);
    assert_ne!(a.faults, b.faults, "two seeds drew the same faults");
    let mut written_out = swarm.clone();
    written_out.faults = a.faults.clone();
    written_out.swarm = None;
    assert_eq!(run(&written_out, 5).trace_hash, a.trace_hash, "the shrinker relies on this equivalence");
}

#[test]
fn the_model_store_gives_the_same_run_as_redb_on_the_crash_faithful_disk() {
    for name in ["steady_state", "coordinator_crash_restart"] {
        let redb = Scenario::load(name, &scenarios_dir()).expect("ships");
        assert_eq!(redb.coordinator.storage, StorageKind::Redb);
        let mut model = redb.clone();
        model.coordinator.storage = StorageKind::Model;
        assert_eq!(run(&redb, 7).trace_hash, run(&model, 7).trace_hash, "{name}");
    }
}

#[test]
fn recording_for_a_timeline_does_not_change_the_run() {
    let scenario = Scenario::load("partition_heal", &scenarios_dir()).expect("ships");
    let plain = run(&scenario, 9);
    let recorded = run_with(&scenario, 9, &Options { record: true });
    assert_eq!(plain.trace_hash, recorded.trace_hash);
    assert!(!recorded.message_log.is_empty() && !recorded.fault_log.is_empty());
    assert!(plain.message_log.is_empty());
}

#[test]
fn a_failed_sync_takes_batches_applied_over_it_down_with_it() {
    // The pipeline scenario exists for this: batch N+1 applied while N syncs, then N's
    // sync fails. Seen in its fixed seeds, and none of them breaks an invariant.
    let scenario = Scenario::load("pipeline_failures", &sim::scenarios_dir()).expect("ships");
    let dropped: u64 = SEEDS.iter().map(|&seed| run(&scenario, seed).sets_dropped).sum();
    assert!(dropped > 0, "no batch was ever applied over a sync that failed");
}

#[test]
fn every_scenario_still_exercises_what_it_exists_for() {
    // Each scenario names the rare states and fault effects it is for (`exercises`);
    // summed over its test seeds, each must be reached, or the scenario has stopped
    // testing what it claims (a fault that no longer lands, a timing that moved).
    for scenario in shipped() {
        let seeds = if scenario.seeds.is_empty() { SEEDS.to_vec() } else { scenario.seeds.clone() };
        let reports: Vec<_> = seeds.iter().map(|&seed| run(&scenario, seed)).collect();
        for name in &scenario.exercises {
            let total: u64 = reports.iter().filter_map(|r| r.coverage.get(name)).sum();
            assert!(total > 0, "{}: seeds {seeds:?} never reached {name}", scenario.name);
        }
    }
    let unknown = format!(
        "duration_s = 1\nexercises = [\"nothing\"]\n{}",
        "[cluster]\nworkers = 1\nslots = 1\n[workload]\njobs = 1\ntasks_per_job = 1\ntask_duration_ms = [1, 2]\n"
    );
    let err = Scenario::parse(&unknown, Path::new("x.toml")).expect_err("unknown name").to_string();
    assert!(err.contains("exercises[0]") && err.contains("stale_rejected"), "{err}");
}

/// A worker process killed mid-run: its kernel's FIN reaches the coordinator one network
/// latency later, and its tasks are leased elsewhere within a commit or two of that, not
/// at its deadline (seconds later).
#[test]
fn a_killed_workers_tasks_are_leased_elsewhere_within_milliseconds() {
    use rollout_core::history::HistoryEvent;
    let scenario = Scenario::load("reset_seen_by_one_side", &scenarios_dir()).expect("ships");
    let crash_ms = 20_000u64;
    let crashed = rollout_core::WorkerId::new("w4").expect("id");
    let bound_ns =
        scenario.network.latency_us[1] * 1_000 + 3 * scenario.coordinator.commit_latency_us * 1_000 + 1_000_000;
    for seed in [1, 2, 3] {
        let report = run(&scenario, seed);
        assert!(report.violation.is_none(), "{:?}", report.violation);
        let at = crash_ms * 1_000_000;
        let declared = report.history.iter().find(|(t, r)| {
            *t >= at && matches!(&r.event, HistoryEvent::DeclaredFailed { worker, .. } if *worker == crashed)
        });
        let (t, _) = declared.unwrap_or_else(|| panic!("seed {seed}: w4 never declared failed after its crash"));
        assert!(t - at <= bound_ns, "seed {seed}: declared failed {} µs after the crash", (t - at) / 1_000);
        // Its leases were re-queued in the same batch, and went out at once.
        let requeued: Vec<_> = report
            .history
            .iter()
            .filter(|(tr, r)| *tr == *t && matches!(r.event, HistoryEvent::Requeued { .. }))
            .collect();
        assert!(!requeued.is_empty(), "seed {seed}: w4 ran nothing when it was killed");
    }
}
