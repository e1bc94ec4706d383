//! Fault schedules from bytes, for a coverage-guided explorer: the fuzz target
//! `fault_schedule` (fuzz/, `make fuzz`) hands libFuzzer's input to
//! [`scenario_from_bytes`] and runs the result with the invariants as the oracle, so
//! the fuzzer searches the space of schedules (which fault, when, where, how long),
//! keeping the inputs that reach new code in the machines, instead of drawing uniform
//! seeds. Every byte string decodes to a valid scenario; a small change of the bytes is
//! a small change of the schedule (one fault moved, lengthened, retargeted), which is
//! what mutation-based search needs.
//!
//! Layout: 8 bytes of seed, then 8 bytes per fault (at most [`FAULTS_MAX`]; a
//! shorter tail is ignored): kind, time (2), node, length (2), parameter (2). Every
//! fault undoes itself by the base's `[swarm] heal_by_ms` + `max_for_ms`, as the
//! swarm's draws do, so the liveness checks stay fair.

use std::num::NonZeroU64;

use crate::scenario::{
    Direction, Fault, FaultAction, FaultKind, NodeRef, OnCoordinator, Scenario, SeenBy, Swarm, WorkerRef,
};

/// Bytes per fault.
pub const FAULT_BYTES: usize = 8;
/// Faults one input can schedule.
pub const FAULTS_MAX: usize = 24;

/// `base` with its swarm's draws replaced by the schedule `bytes` encode, and the seed
/// they name. The kinds are the base swarm's (`[swarm] kinds`); the times and lengths
/// are bounded by its `heal_by_ms` and `max_for_ms`. A base without a swarm table
/// gets [`Swarm::standard`].
pub fn scenario_from_bytes(base: &Scenario, bytes: &[u8]) -> (Scenario, u64) {
    let (seed_bytes, rest) = bytes.split_at(bytes.len().min(8));
    let mut seed = [0u8; 8];
    seed[..seed_bytes.len()].copy_from_slice(seed_bytes);
    let seed = u64::from_le_bytes(seed);
    let swarm = base.swarm.clone().unwrap_or_else(Swarm::standard);
    let kinds: Vec<FaultKind> = swarm
        .kinds
        .iter()
        .copied()
        .filter(|k| !matches!(k, FaultKind::Heal | FaultKind::Restart | FaultKind::CancelJob | FaultKind::CancelTask))
        .collect();
    let mut scenario = base.clone();
    scenario.swarm = None;
    scenario.seeds = vec![seed];
    scenario.exercises.clear();
    if kinds.is_empty() || base.cluster.workers == 0 {
        return (scenario, seed);
    }
    let workers = base.cluster.workers as usize;
    let heal_by_ms = swarm.heal_by_ms.max(1);
    let max_for_ms = swarm.max_for_ms.max(1);
    for chunk in rest.chunks_exact(FAULT_BYTES).take(FAULTS_MAX) {
        let u16_at = |i: usize| u64::from(u16::from_le_bytes([chunk[i], chunk[i + 1]]));
        let kind = kinds[usize::from(chunk[0]) % kinds.len()];
        let at_ms = u16_at(1) * heal_by_ms / 65_536;
        let worker = WorkerRef(usize::from(chunk[3]) % workers);
        // One node in workers + 1 is the coordinator, for the kinds it can have.
        let node = if usize::from(chunk[3]) % (workers + 1) == workers { NodeRef::Coordinator } else { worker.into() };
        let for_ms = 100 + u16_at(4) * max_for_ms / 65_536;
        let p = u16_at(6);
        let action = match kind {
            FaultKind::Crash => FaultAction::Crash { node, for_ms: Some(for_ms) },
            FaultKind::Partition => {
                let direction = [Direction::Both, Direction::ToCoordinator, Direction::ToWorker][(p % 3) as usize];
                FaultAction::Partition { node: worker, direction, for_ms: Some(for_ms) }
            }
            FaultKind::Slow => FaultAction::Slow { node: worker, latency_ms: 50 + p % 3_000, for_ms: Some(for_ms) },
            FaultKind::Flap => {
                let period_ms = NonZeroU64::new(200 + p % 2_000).unwrap_or(NonZeroU64::MIN);
                FaultAction::Flap { node: worker, period_ms, for_ms }
            }
            FaultKind::Reset => FaultAction::Reset {
                node: worker,
                seen_by: [SeenBy::Both, SeenBy::Worker, SeenBy::Coordinator][(p % 3) as usize],
            },
            // Up to a minute either way: within the skew budget or far beyond it, the
            // coordinator keeps deadlines on its own clock.
            FaultKind::ClockJump => FaultAction::ClockJump { node, by_ms: (p as i64 - 32_768) * 60_000 / 32_768 },
            FaultKind::Pause => FaultAction::Pause { node: worker, for_ms },
            FaultKind::DiskLatency => {
                FaultAction::DiskLatency { node: OnCoordinator, latency_ms: 5 + p % 300, for_ms: Some(for_ms) }
            }
            FaultKind::PowerCut => FaultAction::PowerCut { node: OnCoordinator, for_ms: Some(200 + p % 5_000) },
            FaultKind::SyncFailure => FaultAction::SyncFailure { node: OnCoordinator },
            FaultKind::Drain => FaultAction::Drain { node: worker },
            FaultKind::Heal | FaultKind::Restart | FaultKind::CancelJob | FaultKind::CancelTask => continue,
        };
        scenario.faults.push(Fault { at_ms, action });
    }
    (scenario, seed)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rollout_core::rng::SplitMix64;

    use super::*;
    use crate::scenarios_dir;

    #[test]
    fn every_byte_string_decodes_to_a_scenario_that_validates_and_reads_back() {
        let base = Scenario::load("swarm", &scenarios_dir()).expect("ships");
        let mut rng = SplitMix64::new(7);
        for len in [0, 3, 8, 15, 16, 40, 8 + FAULT_BYTES * (FAULTS_MAX + 5)] {
            for _ in 0..20 {
                let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                let (s, seed) = scenario_from_bytes(&base, &bytes);
                assert!(s.swarm.is_none() && s.seeds == [seed]);
                assert_eq!(s.faults.len(), len.saturating_sub(8).min(FAULT_BYTES * FAULTS_MAX) / FAULT_BYTES);
                let back = Scenario::parse(&s.to_toml(), Path::new("decoded.toml"))
                    .unwrap_or_else(|e| panic!("{e}\n{}", s.to_toml()));
                assert_eq!(back.faults, s.faults);
                let heal_by = base.swarm.as_ref().map_or(0, |w| w.heal_by_ms + w.max_for_ms + 5_100);
                assert!(s.faults.iter().all(|f| f.at_ms + f.for_ms().unwrap_or(0) <= heal_by), "{:?}", s.faults);
            }
        }
    }

    #[test]
    fn one_byte_changed_moves_one_fault() {
        let base = Scenario::load("swarm", &scenarios_dir()).expect("ships");
        let mut bytes = vec![0u8; 8 + 3 * FAULT_BYTES];
        let (a, _) = scenario_from_bytes(&base, &bytes);
        bytes[8 + FAULT_BYTES + 2] ^= 0x80;
        let (b, _) = scenario_from_bytes(&base, &bytes);
        let differ: Vec<usize> = (0..3).filter(|&i| a.faults[i] != b.faults[i]).collect();
        assert_eq!(differ, [1]);
        assert_ne!(a.faults[1].at_ms, b.faults[1].at_ms);
    }
}
