//! Swarm testing: each seed draws its own fault mix (kinds, nodes, times, lengths)
//! from the scenario's `[swarm]` table, on a random stream of its own, so the drawn
//! faults never shift the draws of the network, the plugins or the clocks. The drawn
//! faults are ordinary [`Fault`]s appended to the schedule: a run of the scenario with
//! the draws written out as its schedule (and no swarm) is the same run, which is what
//! lets the shrinker work on them.

use rollout_core::Config;
use rollout_core::rng::SplitMix64;

use crate::scenario::{Direction, Fault, FaultKind, Scenario};

/// The faults `scenario.swarm` draws with `rng` (none without a swarm table).
pub fn draw(scenario: &Scenario, config: &Config, rng: &mut SplitMix64) -> Vec<Fault> {
    let Some(swarm) = &scenario.swarm else { return Vec::new() };
    if swarm.kinds.is_empty() {
        return Vec::new();
    }
    let count = rng.below(u64::from(swarm.faults) + 1);
    let workers = u64::from(scenario.cluster.workers);
    let budget_ms = config.health.clock_skew_budget.as_millis() as i64;
    let mut faults = Vec::new();
    for _ in 0..count {
        let kind = swarm.kinds[rng.below(swarm.kinds.len() as u64) as usize];
        let at_ms = rng.below(swarm.heal_by_ms.max(1));
        let room = swarm.heal_by_ms.saturating_sub(at_ms).clamp(1, swarm.max_for_ms.max(1));
        let for_ms = Some(100 + rng.below(room));
        let worker = Some(format!("w{}", 1 + rng.below(workers)));
        let mut fault = Fault {
            at_ms,
            kind,
            node: worker,
            direction: None,
            by_ms: None,
            for_ms: None,
            latency_ms: None,
            period_ms: None,
            job: None,
            task: None,
        };
        match kind {
            FaultKind::Crash => {
                // The coordinator is one node among workers + 1.
                if rng.below(workers + 1) == 0 {
                    fault.node = Some("coordinator".into());
                }
                fault.for_ms = for_ms;
            }
            FaultKind::Partition => {
                fault.direction = Some(match rng.below(3) {
                    0 => Direction::Both,
                    1 => Direction::ToCoordinator,
                    _ => Direction::ToWorker,
                });
                fault.for_ms = for_ms;
            }
            FaultKind::Slow => {
                fault.latency_ms = Some(50 + rng.below(3_000));
                fault.for_ms = for_ms;
            }
            FaultKind::Flap => {
                fault.period_ms = Some(200 + rng.below(2_000));
                fault.for_ms = for_ms;
            }
            FaultKind::Reset => {}
            FaultKind::ClockJump => {
                // Half within the skew budget (a quarter of it either way), half far
                // beyond it (up to a minute): the coordinator keeps deadlines on its own
                // clock, so neither may make any invariant fail.
                let quarter = (budget_ms / 4).max(1);
                let reach = if rng.below(2) == 0 { quarter } else { 60_000 };
                fault.by_ms = Some(rng.below(2 * reach as u64 + 1) as i64 - reach);
                if rng.below(workers + 1) == 0 {
                    fault.node = Some("coordinator".into());
                }
            }
            FaultKind::Pause => fault.for_ms = for_ms,
            FaultKind::DiskLatency => {
                fault.node = Some("coordinator".into());
                fault.latency_ms = Some(5 + rng.below(300));
                fault.for_ms = for_ms;
            }
            FaultKind::PowerCut => {
                fault.node = Some("coordinator".into());
                fault.for_ms = Some(200 + rng.below(5_000));
            }
            FaultKind::SyncFailure => fault.node = Some("coordinator".into()),
            FaultKind::Drain => {}
            FaultKind::Heal | FaultKind::Restart | FaultKind::CancelJob | FaultKind::CancelTask => continue,
        }
        faults.push(fault);
    }
    faults
}
