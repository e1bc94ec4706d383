//! The timeline of the split-brain scenario shows what the issue asks for: the
//! overlapping runs and the stale submit being rejected, in one self-contained page.

use sim::{Options, Scenario, run_with, scenarios_dir};

#[test]
fn the_split_brain_timeline_shows_the_overlap_and_the_rejected_stale_submit() {
    let scenario = Scenario::load("process_pause", &scenarios_dir()).expect("ships");
    let seed = (0..10)
        .find(|s| {
            let r = run_with(&scenario, *s, &Options::default());
            r.overlaps > 0 && r.stale_rejected > 0
        })
        .expect("a seed with both overlap and a stale submit");
    let report = run_with(&scenario, seed, &Options { record: true });
    let html = sim::timeline::render(&scenario, &report);
    assert!(html.starts_with("<!doctype html>") && html.trim_end().ends_with("</html>"));
    assert!(html.contains("<svg") && html.contains("</svg>"));
    assert!(html.contains("OVERLAP:") && html.contains(">overlap job-"), "overlap not marked");
    assert!(html.contains("stale submit rejected"), "stale submit not marked");
    assert!(html.contains("paused"), "the pause is not shaded");
    assert!(!html.contains("http://") || html.matches("http://").all(|_| html.contains("http://www.w3.org/2000/svg")));
    for lane in ["coordinator", "w1", "w4"] {
        assert!(html.contains(&format!(">{lane}</text>")), "lane {lane} missing");
    }
}

#[test]
fn a_violation_is_marked_on_the_timeline() {
    let mut scenario = Scenario::load("steady_state", &scenarios_dir()).expect("ships");
    // An impossible demand: every job finished within two seconds.
    scenario.duration_s = 2;
    let report = run_with(&scenario, 1, &Options { record: true });
    let v = report.violation.clone().expect("progress fails");
    let html = sim::timeline::render(&scenario, &report);
    assert!(html.contains(&format!("VIOLATION: {}", v.invariant)), "violation not marked");
}
