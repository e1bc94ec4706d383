//! The heartbeat deadline formulas. Coordinator, worker and invariant checker all
//! use these two functions, so the rules exist in exactly one place.

use std::time::{Duration, SystemTime};

use crate::config::HealthConfig;

/// The deadline a worker announces with a beat sent at wall time `now`:
/// `now + 2 × interval`. Missing one beat is tolerated; missing two is not.
pub fn next_due_at(now: SystemTime, interval: Duration) -> SystemTime {
    now + interval.saturating_mul(2)
}

/// How far `now` is past `due_at` (zero when not yet due).
pub fn elapsed_past_due(now: SystemTime, due_at: SystemTime) -> Duration {
    now.duration_since(due_at).unwrap_or(Duration::ZERO)
}

/// Whether the coordinator, at its wall time `now`, should declare failed a worker
/// whose last announced deadline is `due_at`:
/// `elapsed_past_due > clock_skew_budget AND elapsed_past_due > coordinator_failure_timeout`.
///
/// Monotone in `now`: once true, it stays true for every later `now`.
pub fn is_failed(now: SystemTime, due_at: SystemTime, cfg: &HealthConfig) -> bool {
    let elapsed = elapsed_past_due(now, due_at);
    elapsed > cfg.clock_skew_budget && elapsed > cfg.coordinator_failure_timeout
}

/// The earliest wall time at which [`is_failed`] becomes true for `due_at`
/// (the driver's timer for the failure scan). `is_failed` is true strictly after it.
pub fn failure_threshold(due_at: SystemTime, cfg: &HealthConfig) -> SystemTime {
    due_at + cfg.clock_skew_budget.max(cfg.coordinator_failure_timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn cfg(skew_ms: u64, fail_ms: u64) -> HealthConfig {
        HealthConfig {
            clock_skew_budget: Duration::from_millis(skew_ms),
            coordinator_failure_timeout: Duration::from_millis(fail_ms),
            ..HealthConfig::default()
        }
    }

    #[test]
    fn seed_formulas() {
        assert_eq!(next_due_at(t(1_000), Duration::from_millis(500)), t(2_000));
        let c = HealthConfig::default();
        assert!(!is_failed(t(7_000), t(2_000), &c), "exactly 5s past due is not yet failed");
        assert!(is_failed(t(7_001), t(2_000), &c));
        assert!(!is_failed(t(1_000), t(2_000), &c), "not due yet");
    }

    #[test]
    fn a_worker_200ms_behind_is_not_failed_while_it_beats() {
        // Worker clock 200 ms behind the coordinator's; it beats every 500 ms.
        let c = HealthConfig::default();
        let skew = Duration::from_millis(200);
        for beat in 0..100u64 {
            let coord_now = t(10_000 + beat * 500);
            let due_at = next_due_at(coord_now - skew, c.heartbeat_interval);
            // The coordinator judges right before the next beat would arrive.
            assert!(!is_failed(coord_now + c.heartbeat_interval, due_at, &c));
        }
    }

    proptest! {
        #[test]
        fn is_failed_is_monotone_in_now(
            due in 0u64..1_000_000, a in 0u64..2_000_000, b in 0u64..2_000_000,
            skew in 1u64..10_000, fail in 1u64..20_000,
        ) {
            let c = cfg(skew, fail);
            let (early, late) = (a.min(b), a.max(b));
            if is_failed(t(early), t(due), &c) {
                prop_assert!(is_failed(t(late), t(due), &c));
            }
        }

        #[test]
        fn never_failed_within_the_bound(
            due in 0u64..1_000_000, past in 0u64..50_000, skew in 0u64..10_000, fail in 0u64..20_000,
        ) {
            let c = cfg(skew, fail);
            let bound = skew.max(fail);
            let now = t(due + past.min(bound));
            prop_assert!(!is_failed(now, t(due), &c));
        }

        #[test]
        fn failed_strictly_after_threshold(due in 0u64..1_000_000, skew in 0u64..10_000, fail in 0u64..20_000) {
            let c = cfg(skew, fail);
            let threshold = failure_threshold(t(due), &c);
            prop_assert!(!is_failed(threshold, t(due), &c));
            prop_assert!(is_failed(threshold + Duration::from_nanos(1), t(due), &c));
        }
    }
}
