//! Every shipped scenario passes its strict invariants over a few fixed seeds, and a
//! run is a pure function of (scenario, seed): the trace-hash meta-test.

use sim::{Scenario, run, scenarios_dir};

/// Every `scenarios/*.toml`, sorted by name.
fn shipped() -> Vec<Scenario> {
    let mut paths: Vec<_> = std::fs::read_dir(scenarios_dir())
        .expect("scenarios/ exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    paths.iter().map(|p| Scenario::load(p.to_str().expect("utf-8 path"), &scenarios_dir()).expect("parses")).collect()
}

#[test]
fn the_required_scenarios_ship() {
    let names: Vec<String> = shipped().into_iter().map(|s| s.name).collect();
    for required in
        ["steady_state", "worker_crash", "coordinator_crash_restart", "partition_heal", "clock_skew_beyond_budget"]
    {
        assert!(names.iter().any(|n| n == required), "missing scenario {required}; have {names:?}");
    }
}

#[test]
fn every_scenario_passes_its_strict_invariants() {
    for scenario in shipped() {
        for seed in [1, 2, 3] {
            let report = run(&scenario, seed);
            assert!(
                report.violation.is_none(),
                "cargo run -p sim -- run {} --seed {seed}\n{}\n{}",
                scenario.name,
                report.violation.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                report.tail()
            );
            assert!(report.committed > 0, "{} seed {seed}: nothing committed", scenario.name);
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
