//! Swarm testing: each seed draws its own fault mix (kinds, nodes, times, lengths)
//! from the scenario's `[swarm]` table, on a random stream of its own, so the drawn
//! faults never shift the draws of the network, the plugins or the clocks. The drawn
//! faults are ordinary [`Fault`]s appended to the schedule: a run of the scenario with
//! the draws written out as its schedule (and no swarm) is the same run, which is what
//! lets the shrinker work on them.

use rollout_core::Config;
use rollout_core::rng::SplitMix64;

use std::num::NonZeroU64;

use crate::scenario::{Direction, Fault, FaultAction, FaultKind, NodeRef, OnCoordinator, Scenario, SeenBy, WorkerRef};

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
        let for_ms = 100 + rng.below(room);
        let worker = WorkerRef(rng.below(workers) as usize);
        let action = match kind {
            FaultKind::Crash => {
                // The coordinator is one node among workers + 1.
                let node = if rng.below(workers + 1) == 0 { NodeRef::Coordinator } else { worker.into() };
                FaultAction::Crash { node, for_ms: Some(for_ms) }
            }
            FaultKind::Partition => {
                let direction = match rng.below(3) {
                    0 => Direction::Both,
                    1 => Direction::ToCoordinator,
                    _ => Direction::ToWorker,
                };
                FaultAction::Partition { node: worker, direction, for_ms: Some(for_ms) }
            }
            FaultKind::Slow => {
                FaultAction::Slow { node: worker, latency_ms: 50 + rng.below(3_000), for_ms: Some(for_ms) }
            }
            FaultKind::Flap => {
                let period_ms = NonZeroU64::new(200 + rng.below(2_000)).unwrap_or(NonZeroU64::MIN);
                FaultAction::Flap { node: worker, period_ms, for_ms }
            }
            FaultKind::Reset => FaultAction::Reset {
                node: worker,
                seen_by: [SeenBy::Both, SeenBy::Worker, SeenBy::Coordinator][rng.below(3) as usize],
            },
            FaultKind::ClockJump => {
                // Half within the skew budget (a quarter of it either way), half far
                // beyond it (up to a minute): the coordinator keeps deadlines on its own
                // clock, so neither may make any invariant fail.
                let quarter = (budget_ms / 4).max(1);
                let reach = if rng.below(2) == 0 { quarter } else { 60_000 };
                let by_ms = rng.below(2 * reach as u64 + 1) as i64 - reach;
                let node = if rng.below(workers + 1) == 0 { NodeRef::Coordinator } else { worker.into() };
                FaultAction::ClockJump { node, by_ms }
            }
            FaultKind::Pause => FaultAction::Pause { node: worker, for_ms },
            FaultKind::DiskLatency => {
                FaultAction::DiskLatency { node: OnCoordinator, latency_ms: 5 + rng.below(300), for_ms: Some(for_ms) }
            }
            FaultKind::PowerCut => FaultAction::PowerCut { node: OnCoordinator, for_ms: Some(200 + rng.below(5_000)) },
            FaultKind::SyncFailure => FaultAction::SyncFailure { node: OnCoordinator },
            FaultKind::Drain => FaultAction::Drain { node: worker },
            FaultKind::Heal | FaultKind::Restart | FaultKind::CancelJob | FaultKind::CancelTask => continue,
        };
        let fault = Fault { at_ms, action };
        faults.push(fault);
    }
    faults
}
