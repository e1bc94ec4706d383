//! Layer 2 plays scenario files: the cluster, workload, network, clocks, `[config]` and
//! fault schedule of a `scenarios/*.toml`, on the real runtime over turmoil, judged by
//! the same checker as layer 1.
//!
//! What carries over, and what cannot (a scenario needing the latter is refused with
//! the reason, never run halfway):
//! - Faults: `crash`, `restart`, two-way `partition` (turmoil holds the link's
//!   segments, as TCP would retransmit them), `heal`, `clock_jump`, `power_cut`. A
//!   coordinator `crash` runs as a power cut (no FIN or RST leaves the host): turmoil
//!   cannot kill a process with its kernel's resets reproducibly (see
//!   `Cluster::crash`). One-way partitions (turmoil drops segments one way, a loss TCP
//!   never has without a reset), `reset`, `slow`, `flap`, `pause`, `disk_latency`,
//!   `sync_failure`, `drain` and the cancels are layer 1's only.
//! - Workload: jobs of `echo` tasks at the scenario's times, each running for a time
//!   drawn from `task_duration_ms` (simulated: the worker driver's `PluginTime`, since
//!   a plugin that slept would block the host in real time). A call never fails or
//!   hangs (`failure_probability` and `hang_probability` are layer 1's), so every task
//!   must commit exactly once; a job must fit one SubmitJob message.
//! - Clocks: each host's wall clock starts within `max_offset_ms` (drawn from the
//!   seed); drift is not simulated. Network: each segment's latency within
//!   `latency_us` (at least turmoil's 1 ms tick); unary loss and duplication are
//!   layer 1's (TCP has neither).
//! - Invariants: the checker's, over the merged histories, as `rollout check` judges a
//!   real cluster; the liveness bounds (layer 1's `detect`/`rejoin` arithmetic) are
//!   layer 1's.

use std::time::Duration;

use rollout_core::history::HistoryRecord;
use rollout_core::rng::SplitMix64;
use sim::Scenario;
use sim::scenario::{Direction, FaultAction, NodeRef};

use super::{COORDINATOR, Cluster, ClusterSpec};

/// How long after the scenario's end every task must have committed.
const SETTLE: Duration = Duration::from_secs(60);
/// The downtime of a `power_cut` without `for_ms` (layer 1's default).
const POWER_CUT_DOWNTIME_MS: u64 = 2_000;

/// One thing the runner does at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A job of `tasks` echo tasks, each payload `payload_bytes` long (at least its name).
    Submit { tasks: u32, payload_bytes: usize },
    /// The host goes down (a power cut).
    Crash(String),
    /// The host's software starts again.
    Restart(String),
    /// The worker's link is held both ways.
    Cut(String),
    /// The worker's link delivers again.
    Heal(String),
    /// Every link delivers again.
    HealAll,
    /// The host's wall clock steps (ms).
    ClockJump(String, i64),
}

/// The scenario's schedule as steps in time order (ms), or why layer 2 cannot run it.
pub fn plan(scenario: &Scenario) -> Result<Vec<(u64, Step)>, String> {
    let name = |node: NodeRef| node.to_string();
    let wl = &scenario.workload;
    let config = scenario.effective_config().map_err(|e| format!("[config]: {e}"))?;
    let job_bytes = u64::from(wl.tasks_per_job) * (u64::from(wl.payload_bytes) + 64);
    if job_bytes > u64::from(config.limits.max_message_bytes) {
        return Err(format!(
            "workload: a job of {} tasks of {} bytes does not fit one SubmitJob within limits.max_message_bytes ({})",
            wl.tasks_per_job, wl.payload_bytes, config.limits.max_message_bytes
        ));
    }
    let run = std::time::Duration::from_secs(scenario.duration_s);
    if config.transport.worker_cert_lifetime < run {
        return Err(format!(
            "[config.transport] worker_cert_lifetime ({:?}) ends within the run ({:?}): layer 2's workers have no \
             certificate files, so they neither renew nor expire; layer 1 plays renewal",
            config.transport.worker_cert_lifetime, run
        ));
    }
    let mut steps = Vec::new();
    for job in 0..u64::from(wl.jobs) {
        let payload_bytes = wl.payload_bytes as usize;
        steps.push((
            wl.submit_start_ms + job * wl.submit_every_ms,
            Step::Submit { tasks: wl.tasks_per_job, payload_bytes },
        ));
    }
    for (i, fault) in scenario.faults.iter().enumerate() {
        let at = fault.at_ms;
        let until = |for_ms: Option<u64>| for_ms.map(|ms| at + ms);
        match &fault.action {
            FaultAction::Crash { node, for_ms } => {
                steps.push((at, Step::Crash(name(*node))));
                if let Some(end) = until(*for_ms) {
                    steps.push((end, Step::Restart(name(*node))));
                }
            }
            FaultAction::Restart { node } => steps.push((at, Step::Restart(name(*node)))),
            FaultAction::Partition { node, direction: Direction::Both, for_ms } => {
                steps.push((at, Step::Cut(node.to_string())));
                if let Some(end) = until(*for_ms) {
                    steps.push((end, Step::Heal(node.to_string())));
                }
            }
            FaultAction::Heal { node: Some(node) } => steps.push((at, Step::Heal(node.to_string()))),
            FaultAction::Heal { node: None } => steps.push((at, Step::HealAll)),
            FaultAction::ClockJump { node, by_ms } => steps.push((at, Step::ClockJump(name(*node), *by_ms))),
            FaultAction::PowerCut { for_ms, .. } => {
                steps.push((at, Step::Crash(COORDINATOR.into())));
                steps.push((at + for_ms.unwrap_or(POWER_CUT_DOWNTIME_MS), Step::Restart(COORDINATOR.into())));
            }
            other => {
                let kind = serde_json::to_value(fault.kind()).ok().and_then(|v| v.as_str().map(str::to_owned));
                let kind = kind.unwrap_or_default();
                let why = match other {
                    FaultAction::Partition { .. } => "a one-way partition (turmoil drops those segments for good)",
                    _ => "a fault only layer 1 simulates",
                };
                return Err(format!("faults[{i}] ({kind}): {why}"));
            }
        }
    }
    // Stable: simultaneous steps keep the file's order.
    steps.sort_by_key(|(at, _)| *at);
    Ok(steps)
}

/// The cluster `scenario` describes, with the clock offsets `seed` draws.
fn spec(scenario: &Scenario, seed: u64) -> Result<ClusterSpec, String> {
    let config = scenario.effective_config().map_err(|e| format!("[config]: {e}"))?;
    let [lo, hi] = scenario.network.latency_us;
    let tick = Duration::from_millis(1);
    let latency = (Duration::from_micros(lo).max(tick), Duration::from_micros(hi).max(tick));
    let workers: Vec<String> = (1..=scenario.cluster.workers).map(|n| format!("w{n}")).collect();
    let mut rng = SplitMix64::new(seed ^ 0xc10c_0ff5);
    let max = scenario.clocks.max_offset_ms.min(3_600_000) as i64;
    let wall_offsets_ms = std::iter::once(COORDINATOR.to_owned())
        .chain(workers.iter().cloned())
        .map(|node| (node, rng.below(2 * max as u64 + 1) as i64 - max))
        .collect();
    let task_duration_ms = Some(scenario.workload.task_duration_ms);
    Ok(ClusterSpec { workers, slots: scenario.cluster.slots, config, latency, wall_offsets_ms, task_duration_ms })
}

/// What a played scenario left.
pub struct Played {
    /// The merged history, judged clean and complete.
    pub merged: Vec<HistoryRecord>,
    /// Steps carried out (submissions and faults).
    pub steps: usize,
    /// Simulated time it took, until every task had committed.
    pub elapsed: Duration,
    /// Every host's digest of the bytes it wrote to the network, with their count.
    pub wire: std::collections::BTreeMap<String, (String, u64)>,
}

/// Plays `scenario` with `seed` at layer 2 and judges it (panicking, naming the seed,
/// on a violation or an unfinished workload); `Err` says why layer 2 cannot run it.
pub fn play(scenario: &Scenario, seed: u64) -> Result<Played, String> {
    let steps = plan(scenario)?;
    let spec = spec(scenario, seed)?;
    let mut c = Cluster::start_with(seed, &spec);
    let mut down: Vec<String> = Vec::new();
    let mut cut: Vec<String> = Vec::new();
    for (at_ms, step) in &steps {
        let at = Duration::from_millis(*at_ms);
        if at > c.elapsed() {
            c.run_for(at - c.elapsed());
        }
        match step {
            Step::Submit { tasks, payload_bytes } => c.submit_sized(*tasks, *payload_bytes),
            Step::Crash(node) if !down.contains(node) => {
                c.crash(node);
                down.push(node.clone());
            }
            Step::Restart(node) if down.contains(node) => {
                c.restart(node);
                down.retain(|n| n != node);
            }
            Step::Cut(node) if !cut.contains(node) => {
                c.cut(node);
                cut.push(node.clone());
            }
            Step::Heal(node) if cut.contains(node) => {
                c.heal(node);
                cut.retain(|n| n != node);
            }
            Step::HealAll => {
                for node in std::mem::take(&mut cut) {
                    c.heal(&node);
                }
            }
            Step::ClockJump(node, by_ms) => c.step_wall_clock(node, *by_ms),
            // A crash of a node already down, a restart of one running, a second cut
            // or a heal of a healthy link change nothing (as at layer 1).
            _ => {}
        }
    }
    // The scenario's end: whatever it left broken is mended, and the workload finishes.
    let end = Duration::from_secs(scenario.duration_s).max(c.elapsed());
    for node in std::mem::take(&mut cut) {
        c.heal(&node);
    }
    for node in std::mem::take(&mut down) {
        c.restart(&node);
    }
    let within = end.saturating_sub(c.elapsed()) + SETTLE;
    c.run_until("every task to commit", within, Cluster::all_committed);
    let merged = c.assert_clean_and_complete();
    Ok(Played { merged, steps: steps.len(), elapsed: c.elapsed(), wire: c.wire_digests() })
}
