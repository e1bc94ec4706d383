//! Reconnect delays: exponential growth with "equal jitter", drawn from the seeded RNG.

use std::time::Duration;

use rollout_core::rng::SplitMix64;

/// The delay schedule of registration retries. Attempt `n` (from 0) waits between half
/// of and the whole of `min(max, initial × 2^n)`: half fixed, so a retry never comes
/// too soon, half random, so a fleet that lost its coordinator at the same instant
/// does not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    /// Delays drawn since the last [`Backoff::reset`].
    attempt: u32,
}

impl Backoff {
    /// A schedule starting at `initial`, never above `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max, attempt: 0 }
    }

    /// The next delay; each call moves one attempt further along the schedule.
    pub fn next_delay(&mut self, rng: &mut SplitMix64) -> Duration {
        let ceiling = ceiling(self.initial, self.max, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        equal_jitter(ceiling, rng)
    }

    /// Back to the first attempt (after a successful registration).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `min(max, initial × 2^attempt)`, without overflow.
pub(crate) fn ceiling(initial: Duration, max: Duration, attempt: u32) -> Duration {
    1u32.checked_shl(attempt).and_then(|factor| initial.checked_mul(factor)).map_or(max, |d| d.min(max))
}

/// Uniform in `[ceiling / 2, ceiling]` (nanosecond resolution).
fn equal_jitter(ceiling: Duration, rng: &mut SplitMix64) -> Duration {
    let ceiling_ns = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    let fixed_ns = ceiling_ns / 2;
    let span_ns = ceiling_ns - fixed_ns;
    let jitter_ns = match span_ns.checked_add(1) {
        Some(bound) => rng.below(bound),
        None => rng.next_u64(),
    };
    Duration::from_nanos(fixed_ns + jitter_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceiling_doubles_then_caps() {
        let ceilings: Vec<Duration> = (0..8).map(|n| ceiling(100 * MS, 5_000 * MS, n)).collect();
        assert_eq!(
            ceilings,
            [100, 200, 400, 800, 1_600, 3_200, 5_000, 5_000].map(|ms| ms * MS),
            "doubles per attempt, capped at the max"
        );
        assert_eq!(ceiling(100 * MS, 5_000 * MS, 40), 5_000 * MS, "no overflow for huge attempts");
        assert_eq!(ceiling(Duration::MAX, Duration::MAX, 3), Duration::MAX);
    }

    #[test]
    fn delays_stay_within_half_and_whole_ceiling() {
        let mut rng = SplitMix64::new(9);
        let mut backoff = Backoff::new(100 * MS, 5_000 * MS);
        for n in 0..20 {
            let cap = ceiling(100 * MS, 5_000 * MS, n);
            let delay = backoff.next_delay(&mut rng);
            assert!(delay >= cap / 2 && delay <= cap, "attempt {n}: {delay:?} outside [{:?}, {cap:?}]", cap / 2);
        }
        backoff.reset();
        assert!(backoff.next_delay(&mut rng) <= 100 * MS, "reset starts over");
    }

    #[test]
    fn extreme_ceiling_does_not_overflow() {
        let mut rng = SplitMix64::new(1);
        let delay = equal_jitter(Duration::MAX, &mut rng);
        assert!(delay >= Duration::from_nanos(u64::MAX / 2));
        assert_eq!(equal_jitter(Duration::ZERO, &mut rng), Duration::ZERO);
    }
}
