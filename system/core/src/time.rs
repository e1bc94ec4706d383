//! Time as an input. A state machine never reads a clock: the driver hands it a
//! [`Now`] with every input. In the real runtime the driver reads the OS clocks; in
//! the simulator each node's clocks are virtual, skewed, drifting and jumping.

use std::ops::{Add, Sub};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

/// A node's monotonic clock reading: time since an arbitrary origin on that node.
///
/// Never goes backwards on one node (it may drift against real time). Readings from
/// different nodes are not comparable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Mono(Duration);

impl Mono {
    /// The origin.
    pub const ZERO: Mono = Mono(Duration::ZERO);

    /// A reading `since_origin` after the origin.
    pub const fn from_duration(since_origin: Duration) -> Self {
        Mono(since_origin)
    }

    /// Time since the origin.
    pub const fn as_duration(self) -> Duration {
        self.0
    }

    /// How long after `earlier` this reading is; zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Mono) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Mono {
    type Output = Mono;
    fn add(self, rhs: Duration) -> Mono {
        Mono(self.0 + rhs)
    }
}

impl Sub<Mono> for Mono {
    type Output = Duration;
    /// Saturating: a monotonic difference is never negative.
    fn sub(self, rhs: Mono) -> Duration {
        self.saturating_since(rhs)
    }
}

/// The time as a machine sees it while handling one input.
///
/// `mono` orders events on this node and measures timeouts that must not be fooled
/// by wall-clock jumps (self-fencing). `wall` is the node's wall clock, which may be
/// skewed against other nodes, and may jump forward or backward; it is what
/// heartbeat deadlines (`due_at`) are expressed in, because they cross nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// The node's monotonic clock.
    pub mono: Mono,
    /// The node's wall clock.
    pub wall: SystemTime,
}

impl Now {
    /// Both readings at once.
    pub const fn new(mono: Mono, wall: SystemTime) -> Self {
        Now { mono, wall }
    }

    /// Both clocks advanced by `by` (the simulator's and tests' way to step time).
    pub fn advanced(self, by: Duration) -> Self {
        Now { mono: self.mono + by, wall: self.wall + by }
    }
}

/// Milliseconds since the Unix epoch, for wire formats and logs; times before the
/// epoch read as 0.
pub fn unix_millis(wall: SystemTime) -> u64 {
    wall.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis().min(u64::MAX as u128) as u64).unwrap_or(0)
}

/// Microseconds since the Unix epoch (0 before it).
pub fn unix_micros(wall: SystemTime) -> u64 {
    wall.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_micros().min(u64::MAX as u128) as u64).unwrap_or(0)
}

/// The inverse of [`unix_millis`].
pub fn from_unix_millis(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mono_difference_saturates() {
        let a = Mono::from_duration(Duration::from_secs(5));
        let b = a + Duration::from_secs(2);
        assert_eq!(b - a, Duration::from_secs(2));
        assert_eq!(a - b, Duration::ZERO);
    }

    #[test]
    fn unix_millis_round_trips() {
        let t = from_unix_millis(1_700_000_000_123);
        assert_eq!(unix_millis(t), 1_700_000_000_123);
        assert_eq!(unix_millis(SystemTime::UNIX_EPOCH - Duration::from_secs(1)), 0);
    }
}
