//! The simulator earns its keep: with the coordinator's fencing check switched off (a
//! test-only planted bug, feature `planted-bugs`), exploring the split-brain scenario
//! finds a stale commit within a few seeds, and the shrinker cuts it down to a
//! scenario of a handful of events that still fails, and writes it out.

use sim::{Scenario, run, scenarios_dir};

#[test]
fn a_planted_fencing_bug_is_found_within_k_seeds_and_shrunk() {
    const K: u64 = 10;
    let mut scenario = Scenario::load("process_pause", &scenarios_dir()).expect("ships");
    assert!(run(&scenario, 0).violation.is_none(), "without the bug the scenario passes");
    scenario.planted_bug = Some("skip_fencing_check".into());
    let found = (0..K).find_map(|seed| run(&scenario, seed).violation.map(|v| (seed, v)));
    let (seed, violation) = found.unwrap_or_else(|| panic!("the planted bug went unnoticed for {K} seeds"));
    assert!(matches!(violation.invariant, "fenced_commit" | "single_commit"), "{violation}");

    let mut steps = Vec::new();
    let shrunk = sim::shrink::shrink(&scenario, seed, &mut |s| steps.push(s.to_owned())).expect("shrinks");
    assert_eq!(shrunk.invariant, violation.invariant);
    let small = &shrunk.scenario;
    assert!(small.faults.len() <= 2, "faults left: {:?}\nsteps: {steps:#?}", small.faults);
    assert!(small.workload.jobs * small.workload.tasks_per_job <= 8, "tasks left: {:?}", small.workload);
    assert!(small.cluster.workers <= 3, "workers left: {}", small.cluster.workers);
    assert!(shrunk.size() <= 6, "a handful of events, not {}", shrunk.size());
    assert!(run(small, seed).violation.is_some_and(|v| v.invariant == violation.invariant));

    // Written out, it loads back and fails the same way.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = shrunk.write(dir.path()).expect("writes");
    let back = Scenario::load(path.to_str().expect("utf-8"), dir.path()).expect("loads back");
    assert_eq!(back.seeds, vec![seed]);
    assert_eq!(back.planted_bug.as_deref(), Some("skip_fencing_check"));
    assert!(run(&back, seed).violation.is_some_and(|v| v.invariant == violation.invariant));
}

#[test]
fn a_run_that_does_not_fail_is_not_shrunk() {
    let scenario = Scenario::load("steady_state", &scenarios_dir()).expect("ships");
    let err = sim::shrink::shrink(&scenario, 1, &mut |_| {}).expect_err("nothing to shrink");
    assert!(err.contains("does not fail"), "{err}");
}

/// The frame-size bug of the transport before Work frames were cut by bytes, planted in
/// the simulator's model of the transport: a batch's assignments went as one frame,
/// over `limits.max_message_bytes`, the stream broke, the worker registered again, and
/// each registration cost the leases an attempt until the tasks were dead-lettered.
#[test]
fn a_planted_frame_size_bug_is_found_within_k_seeds_and_shrunk() {
    const K: u64 = 5;
    let mut scenario = Scenario::load("large_messages", &scenarios_dir()).expect("ships");
    let clean = run(&scenario, 0);
    assert!(clean.violation.is_none(), "without the bug the scenario passes: {:?}", clean.violation);
    assert_eq!(clean.frames_broken, 0);
    scenario.planted_bug = Some(sim::FRAMES_BY_COUNT.into());
    let found = (0..K).find_map(|seed| run(&scenario, seed).violation.map(|v| (seed, v)));
    let (seed, violation) = found.unwrap_or_else(|| panic!("the planted bug went unnoticed for {K} seeds"));
    assert_eq!(violation.invariant, "all_committed", "{violation}");
    assert!(violation.message.contains("over the message limit"), "{violation}");

    let shrunk = sim::shrink::shrink(&scenario, seed, &mut |_| {}).expect("shrinks");
    assert_eq!(shrunk.invariant, "all_committed");
    let small = &shrunk.scenario;
    assert!(small.faults.is_empty(), "no fault is needed: {:?}", small.faults);
    assert_eq!(small.cluster.workers, 1, "one worker is enough");
    // From 4 jobs of 18 tasks on 3 workers; fewer tasks let the worker's later, smaller
    // pulls get through one by one.
    assert_eq!(small.workload.jobs, 1, "one job is enough");
    assert!(small.workload.tasks_per_job <= 12, "tasks left: {:?}", small.workload);
    let back = run(small, seed);
    assert!(back.violation.is_some_and(|v| v.invariant == "all_committed") && back.frames_broken > 0);
}

/// The commit pipeline's release rule, planted wrong in the driver's commit loop: a
/// batch's outputs leave as soon as it is applied, before its writes are synced. A
/// failed sync or a crash then loses writes the world has already seen (a lease a worker
/// runs, a fencing token it holds), and the recovered coordinator hands them out again.
#[test]
fn a_planted_pipeline_release_bug_is_found_within_k_seeds_and_shrunk() {
    const K: u64 = 5;
    let mut scenario = Scenario::load("pipeline_failures", &scenarios_dir()).expect("ships");
    assert!(run(&scenario, 0).violation.is_none(), "without the bug the scenario passes");
    scenario.planted_bug = Some(sim::RELEASE_BEFORE_DURABLE.into());
    let found = (0..K).find_map(|seed| run(&scenario, seed).violation.map(|v| (seed, v)));
    let (seed, violation) = found.unwrap_or_else(|| panic!("the planted bug went unnoticed for {K} seeds"));
    assert!(
        matches!(violation.invariant, "fenced_commit" | "single_commit" | "no_lost_task" | "progress"),
        "{violation}"
    );

    let shrunk = sim::shrink::shrink(&scenario, seed, &mut |_| {}).expect("shrinks");
    assert_eq!(shrunk.invariant, violation.invariant);
    let small = &shrunk.scenario;
    assert!(small.swarm.is_none() && small.faults.len() <= 2, "faults left: {:?}", small.faults);
    assert!(small.faults.iter().all(|f| f.node() == Some(sim::scenario::NodeRef::Coordinator)), "{:?}", small.faults);
    assert!(small.cluster.workers <= 2, "workers left: {}", small.cluster.workers);
    assert!(run(small, seed).violation.is_some_and(|v| v.invariant == violation.invariant));
}

/// The explorer's decoding (the `fault_schedule` fuzz target's): byte strings choose the
/// fault schedule and the seed of the swarm scenario, and the invariants judge each run.
/// Plain pseudo-random bytes already find the planted release bug; libFuzzer, guided by
/// coverage, searches the same space (`make fuzz`).
#[test]
fn byte_chosen_fault_schedules_find_the_planted_release_bug() {
    const K: u64 = 20;
    let mut base = Scenario::load("swarm", &scenarios_dir()).expect("ships");
    base.planted_bug = Some(sim::RELEASE_BEFORE_DURABLE.into());
    let mut rng = rollout_core::rng::SplitMix64::new(1);
    let found = (0..K).find_map(|_| {
        let bytes: Vec<u8> = (0..8 + 6 * sim::schedule::FAULT_BYTES).map(|_| rng.next_u64() as u8).collect();
        let (scenario, seed) = sim::schedule::scenario_from_bytes(&base, &bytes);
        run(&scenario, seed).violation.map(|v| (scenario, seed, v))
    });
    let (scenario, seed, violation) = found.unwrap_or_else(|| panic!("{K} byte-chosen schedules missed the bug"));
    assert!(scenario.swarm.is_none(), "the schedule is the bytes', not the swarm's");
    let shrunk = sim::shrink::shrink(&scenario, seed, &mut |_| {}).expect("shrinks");
    assert_eq!(shrunk.invariant, violation.invariant);
    assert!(shrunk.scenario.faults.len() <= 2, "faults left: {:?}", shrunk.scenario.faults);
}

/// The coordinator's transport taking a reset for the worker's death, planted: a reset
/// only the coordinator's end sees (a middlebox's RST) then ends the incarnation at
/// once, its tasks are leased elsewhere while the worker, which knows nothing yet, still
/// runs them, and `no_overlap` fails. Without the bug the same seeds pass: the
/// coordinator ends an incarnation at once only on a close from the worker's end.
#[test]
fn a_planted_reset_taken_for_a_death_is_found_as_an_overlap() {
    const K: u64 = 5;
    let mut scenario = Scenario::load("reset_seen_by_one_side", &scenarios_dir()).expect("ships");
    for seed in 0..K {
        let clean = run(&scenario, seed);
        assert!(clean.violation.is_none(), "seed {seed} without the bug: {:?}", clean.violation);
    }
    scenario.planted_bug = Some(sim::RESET_ENDS_INCARNATION.into());
    let found = (0..K).find_map(|seed| run(&scenario, seed).violation.map(|v| (seed, v)));
    let (seed, violation) = found.unwrap_or_else(|| panic!("the planted bug went unnoticed for {K} seeds"));
    assert_eq!(violation.invariant, "no_overlap", "{violation}");
    let shrunk = sim::shrink::shrink(&scenario, seed, &mut |_| {}).expect("shrinks");
    assert_eq!(shrunk.invariant, "no_overlap");
    let faults = &shrunk.scenario.faults;
    assert!(
        faults.len() == 1
            && matches!(
                faults[0].action,
                sim::scenario::FaultAction::Reset { seen_by: sim::scenario::SeenBy::Coordinator, .. }
            ),
        "one reset seen by the coordinator is enough: {faults:?}"
    );
}
