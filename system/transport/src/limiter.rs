//! Per-source bookkeeping with a bound: counting events of a source address in a
//! window (failed enrollments), and logging a refusal once per source per interval
//! instead of once per attempt. Both keep at most [`SOURCES_MAX`] sources; beyond it,
//! new sources share one bucket, so a flood from many addresses cannot grow memory or
//! push an address out of its own count.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Sources tracked at once.
pub const SOURCES_MAX: usize = 4096;
/// The bucket sources beyond [`SOURCES_MAX`] share.
const OVERFLOW: &str = "*";

/// The address part of `host:port` (IPv6 `[::1]:7450` included); the whole text when
/// there is no port.
pub fn source_of(remote: &str) -> &str {
    match remote.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !host.is_empty() => host,
        _ => remote,
    }
}

/// A bounded map of sources to `(window start, count)`.
#[derive(Debug)]
struct Sources {
    window: Duration,
    entries: Mutex<BTreeMap<String, (Instant, u32)>>,
}

impl Sources {
    /// Runs `f` on the entry of `source` (made if new: `(now, 0)`); when the map is full,
    /// entries whose window is over go first, and a new source beyond the bound gets
    /// the shared overflow entry.
    fn with_entry<R>(&self, source: &str, now: Instant, f: impl FnOnce(&mut (Instant, u32), bool) -> R) -> R {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= SOURCES_MAX && !entries.contains_key(source) {
            let window = self.window;
            entries.retain(|_, (start, _)| now.saturating_duration_since(*start) < window);
        }
        let key = if entries.len() >= SOURCES_MAX && !entries.contains_key(source) { OVERFLOW } else { source };
        let new = !entries.contains_key(key);
        let entry = entries.entry(key.to_owned()).or_insert((now, 0));
        f(entry, new)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Events per source in fixed windows.
#[derive(Debug)]
pub struct WindowCounter {
    sources: Sources,
}

impl WindowCounter {
    /// Windows of `window`.
    pub fn new(window: Duration) -> Self {
        WindowCounter { sources: Sources { window, entries: Mutex::new(BTreeMap::new()) } }
    }

    fn window(&self) -> Duration {
        self.sources.window
    }

    /// Counts one event of `source`; returns the count in its current window.
    pub fn count(&self, source: &str, now: Instant) -> u32 {
        let window = self.window();
        self.sources.with_entry(source, now, |entry, _| {
            if now.saturating_duration_since(entry.0) >= window {
                *entry = (now, 0);
            }
            entry.1 = entry.1.saturating_add(1);
            entry.1
        })
    }

    /// The count of `source` in its current window, and how long until it ends.
    pub fn current(&self, source: &str, now: Instant) -> (u32, Duration) {
        let window = self.window();
        self.sources.with_entry(source, now, |entry, _| {
            if now.saturating_duration_since(entry.0) >= window {
                *entry = (now, 0);
            }
            (entry.1, window.saturating_sub(now.saturating_duration_since(entry.0)))
        })
    }
}

/// Says whether a refusal of a source should be logged now: the first one, then the
/// first of each later interval, with how many were kept quiet since the last line.
#[derive(Debug)]
pub struct LogLimiter {
    sources: Sources,
}

impl LogLimiter {
    /// At most one line per source per `interval`.
    pub fn new(interval: Duration) -> Self {
        LogLimiter { sources: Sources { window: interval, entries: Mutex::new(BTreeMap::new()) } }
    }

    /// `Some(suppressed)` when this refusal of `source` should be logged (`suppressed`:
    /// refusals since the last line that were not logged); `None` to stay quiet.
    pub fn admit(&self, source: &str, now: Instant) -> Option<u32> {
        let interval = self.sources.window;
        self.sources.with_entry(source, now, |entry, new| {
            if new || now.saturating_duration_since(entry.0) >= interval {
                let suppressed = entry.1;
                *entry = (now, 0);
                Some(suppressed)
            } else {
                entry.1 = entry.1.saturating_add(1);
                None
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_addresses_without_ports() {
        assert_eq!(source_of("10.0.0.7:51234"), "10.0.0.7");
        assert_eq!(source_of("[::1]:7450"), "[::1]");
        assert_eq!(source_of("somewhere"), "somewhere");
    }

    #[tokio::test(start_paused = true)]
    async fn counts_reset_with_their_window_and_logs_come_once_per_interval() {
        let c = WindowCounter::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(c.count("a", t0), 1);
        assert_eq!(c.count("a", t0 + Duration::from_secs(1)), 2);
        assert_eq!(c.count("b", t0 + Duration::from_secs(1)), 1);
        assert_eq!(c.current("a", t0 + Duration::from_secs(30)), (2, Duration::from_secs(30)));
        assert_eq!(c.count("a", t0 + Duration::from_secs(61)), 1, "a new window");
        let log = LogLimiter::new(Duration::from_secs(10));
        assert_eq!(log.admit("a", t0), Some(0));
        assert_eq!(log.admit("a", t0 + Duration::from_secs(1)), None);
        assert_eq!(log.admit("a", t0 + Duration::from_secs(2)), None);
        assert_eq!(log.admit("a", t0 + Duration::from_secs(11)), Some(2), "two kept quiet");
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_sources_shares_one_bucket_beyond_the_bound() {
        let c = WindowCounter::new(Duration::from_secs(60));
        let now = Instant::now();
        for i in 0..SOURCES_MAX {
            c.count(&format!("10.0.{}.{}", i / 256, i % 256), now);
        }
        assert_eq!(c.count("192.168.0.1", now), 1);
        assert_eq!(c.count("192.168.0.2", now), 2, "beyond the bound, new sources share the overflow bucket");
        assert_eq!(c.sources.len(), SOURCES_MAX + 1);
    }
}
