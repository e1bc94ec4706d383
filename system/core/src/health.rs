//! The heartbeat deadline formulas. Coordinator, worker and invariant checker all
//! use these two functions, so the rules exist in exactly one place.

use std::time::{Duration, SystemTime};

use crate::config::HealthConfig;

/// The deadline a worker announces with a beat sent at wall time `now`:
/// `now + 2 × interval`. Missing one beat is tolerated; missing two is not.
pub fn next_due_at(now: SystemTime, interval: Duration) -> SystemTime {
    now + interval.saturating_mul(2)
}

/// What the coordinator keeps of one beat: see [`beat_deadline`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeatDeadline {
    /// From the beat's arrival to the deadline the coordinator keeps, on its own clock.
    pub slack: Duration,
    /// The worker's wall clock minus the coordinator's, as this beat shows it (less the
    /// one-way latency), in milliseconds.
    pub offset_ms: i64,
}

impl BeatDeadline {
    /// Whether the measured offset is beyond `clock_skew_budget`.
    pub fn beyond_budget(&self, cfg: &HealthConfig) -> bool {
        self.offset_ms.unsigned_abs() > u64::try_from(cfg.clock_skew_budget.as_millis()).unwrap_or(u64::MAX)
    }
}

/// The deadline the coordinator keeps for a beat that arrived at its wall time
/// `received` announcing `due_at` on the worker's clock.
///
/// A worker announces `due_at = wall_now + 2 × heartbeat_interval`; the difference to
/// `received + 2 × heartbeat_interval` is its clock's offset. The coordinator lets the
/// offset move the deadline by at most `clock_skew_budget` either way, so the deadline
/// is always within `received + 2 × heartbeat_interval ± clock_skew_budget` on the
/// coordinator's own clock: a worker's clock ahead delays detection by no more than the
/// budget, and a clock behind cannot get a healthy worker declared failed. (Safety does
/// not rest on it: with `clock_skew_budget < 2 × heartbeat_interval` and
/// `worker_self_fence_timeout < coordinator_failure_timeout`, a cut-off worker fences
/// itself before the earliest such deadline plus the failure timeout.)
pub fn beat_deadline(received: SystemTime, due_at: SystemTime, cfg: &HealthConfig) -> BeatDeadline {
    let nominal = cfg.heartbeat_interval.saturating_mul(2);
    let expected = received + nominal;
    let offset_ms: i64 = match due_at.duration_since(expected) {
        Ok(ahead) => i64::try_from(ahead.as_millis()).unwrap_or(i64::MAX),
        Err(behind) => -i64::try_from(behind.duration().as_millis()).unwrap_or(i64::MAX),
    };
    let budget_ms = i64::try_from(cfg.clock_skew_budget.as_millis()).unwrap_or(i64::MAX);
    let kept_ms = offset_ms.clamp(-budget_ms, budget_ms);
    let slack = if kept_ms >= 0 {
        nominal.saturating_add(Duration::from_millis(kept_ms.unsigned_abs()))
    } else {
        nominal.saturating_sub(Duration::from_millis(kept_ms.unsigned_abs()))
    };
    BeatDeadline { slack, offset_ms }
}

/// Whether a worker whose kept deadline passed `elapsed` ago is failed: the same rule
/// as [`is_failed`], measured on the coordinator's monotonic clock.
pub fn is_failed_after(elapsed: Duration, cfg: &HealthConfig) -> bool {
    elapsed > cfg.clock_skew_budget && elapsed > cfg.coordinator_failure_timeout
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
    is_failed_after(elapsed_past_due(now, due_at), cfg)
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

    #[test]
    fn the_kept_deadline_moves_with_the_workers_clock_only_within_the_budget() {
        let c = HealthConfig::default();
        let received = t(100_000);
        let honest = beat_deadline(received, next_due_at(received, c.heartbeat_interval), &c);
        assert_eq!(honest, BeatDeadline { slack: Duration::from_secs(1), offset_ms: 0 });
        let ahead = beat_deadline(received, next_due_at(t(100_100), c.heartbeat_interval), &c);
        assert_eq!(ahead, BeatDeadline { slack: Duration::from_millis(1_100), offset_ms: 100 });
        assert!(!ahead.beyond_budget(&c));
        // The year 3000 buys no more than the budget; an hour behind costs no more either.
        let far = beat_deadline(received, t(32_503_680_000_000), &c);
        assert_eq!(far.slack, Duration::from_millis(1_250));
        assert!(far.beyond_budget(&c));
        let behind =
            beat_deadline(received, next_due_at(t(100_000) - Duration::from_secs(3600), c.heartbeat_interval), &c);
        assert_eq!(behind, BeatDeadline { slack: Duration::from_millis(750), offset_ms: -3_600_000 });
    }

    proptest! {
        #[test]
        fn the_kept_deadline_is_within_the_budget_of_the_nominal_one(
            received in 0u64..10_000_000_000, due in 0u64..20_000_000_000,
            beat in 1u64..10_000, skew_frac in 0u64..100,
        ) {
            let c = HealthConfig {
                heartbeat_interval: Duration::from_millis(beat),
                clock_skew_budget: Duration::from_millis(beat * 2 * skew_frac / 100),
                ..HealthConfig::default()
            };
            let d = beat_deadline(t(received), t(due), &c);
            let nominal = Duration::from_millis(2 * beat);
            prop_assert!(d.slack <= nominal + c.clock_skew_budget);
            prop_assert!(d.slack + c.clock_skew_budget >= nominal);
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
