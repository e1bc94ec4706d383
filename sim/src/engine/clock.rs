//! A node's clocks as functions of true time.

use std::time::{Duration, SystemTime};

use rollout_core::{Mono, Now};

/// True time 0 reads as this wall time on a clock without offset (2023-11-14).
const BASE_WALL_NS: i128 = 1_700_000_000 * 1_000_000_000;

/// A node's clocks as functions of true time. Both advance at `1 + drift` per true
/// second; `wall` adds an offset that clock jumps change. `mono` never goes back; it
/// stands still while the node is suspended (`stalled_ns` of true time so far).
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    pub(super) drift_ppm: i64,
    pub(super) wall_offset_ns: i128,
    pub(super) stalled_ns: u64,
}

impl Clock {
    pub(super) fn mono_ns(&self, t: u64) -> u64 {
        let t = t.saturating_sub(self.stalled_ns);
        (t as i128 * (1_000_000 + self.drift_ppm as i128) / 1_000_000) as u64
    }

    pub(super) fn now(&self, t: u64) -> Now {
        let mono = self.mono_ns(t);
        let wall_ns = (BASE_WALL_NS + self.wall_offset_ns + mono as i128).max(0);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_nanos(wall_ns.min(u64::MAX as i128) as u64);
        Now::new(Mono::from_duration(Duration::from_nanos(mono)), wall)
    }

    /// The earliest true time at which this node's monotonic clock reads `mono`.
    pub(super) fn true_time_of(&self, mono: Mono) -> u64 {
        let m = mono.as_duration().as_nanos().min(u64::MAX as u128 / 2) as i128;
        let rate = 1_000_000 + self.drift_ppm as i128;
        let mut t = ((m * 1_000_000 + rate - 1) / rate).max(0) as u64 + self.stalled_ns;
        // Integer rounding may leave us a nanosecond short.
        while (self.mono_ns(t) as i128) < m {
            t += 1;
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_inverse_is_exact_and_monotonic() {
        for drift_ppm in [-500, 0, 7, 999] {
            let c = Clock { drift_ppm, wall_offset_ns: 0, stalled_ns: 0 };
            let mut prev = 0;
            for t in [0u64, 1, 999, 1_000_000, 123_456_789_012] {
                let m = c.mono_ns(t);
                assert!(m >= prev);
                prev = m;
                let back = c.true_time_of(Mono::from_duration(Duration::from_nanos(m)));
                assert!(back <= t && c.mono_ns(back) >= m, "drift {drift_ppm} t {t}");
            }
        }
    }
}
