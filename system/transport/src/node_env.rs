//! What a driver takes from the host it runs on: a wall clock, and a place to run work
//! that blocks (a storage commit, a result write, a plugin call).
//!
//! [`NodeEnv::default`] is production: the system's wall clock and tokio's blocking
//! pool. A simulation (layer 2: turmoil hosts in `sim/tests`) supplies a simulated wall
//! clock, with per-host offsets and jumps, and [`BlockingWork::Inline`], because
//! blocking-pool threads run in real time outside the simulator's control.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rollout_core::traits::PluginCall;

/// A source of wall-clock readings. It may jump, forwards or back, as real wall clocks
/// do; the machines cope (the monotonic clock comes from tokio, not from here).
pub trait WallClock: Send + Sync + fmt::Debug {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemWallClock;

impl WallClock for SystemWallClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Where a driver runs work that blocks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum BlockingWork {
    /// On tokio's blocking pool, so the runtime's threads never wait for a disk or for
    /// user code. Always in production.
    #[default]
    Pool,
    /// On the runtime's own thread, in the calling task. Only for a simulation whose
    /// storage, object store and plugins are in memory and quick: it keeps every step on
    /// the simulated runtime, so a run is a function of its seed. A plugin that blocks
    /// would block the whole node.
    Inline,
}

impl BlockingWork {
    /// Runs `work` where this says; `Err` carries the panic message if it panicked.
    pub(crate) async fn run<T, F>(self, work: F) -> Result<T, String>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        match self {
            BlockingWork::Pool => tokio::task::spawn_blocking(work).await.map_err(|e| e.to_string()),
            BlockingWork::Inline => catch_unwind(AssertUnwindSafe(work)).map_err(|panic| {
                panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panicked".to_owned())
            }),
        }
    }
}

/// A simulation's model of how long user code runs: the worker driver reports a call's
/// end this long after the call returned, on its runtime's clock (simulated time under
/// a simulator), and the deadline rule applies as to any call. Production has none:
/// calls take the time they take.
#[derive(Clone)]
pub struct PluginTime(pub Arc<dyn Fn(&PluginCall) -> Duration + Send + Sync>);

impl fmt::Debug for PluginTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PluginTime(..)")
    }
}

/// A driver's environment. The default is production's.
#[derive(Debug, Clone)]
pub struct NodeEnv {
    /// The wall clock the node stamps `Now::wall`, beats' `due_at` and history with.
    pub wall_clock: Arc<dyn WallClock>,
    /// Where batch commits, result writes and plugin calls run. (The operator Results
    /// stream reads stored results on the blocking pool regardless.)
    pub blocking: BlockingWork,
    /// A simulation's plugin run times ([`PluginTime`]); `None` in production.
    pub plugin_time: Option<PluginTime>,
}

impl Default for NodeEnv {
    fn default() -> Self {
        NodeEnv { wall_clock: Arc::new(SystemWallClock), blocking: BlockingWork::Pool, plugin_time: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_kinds_of_blocking_work_return_the_value_or_the_panic() {
        for kind in [BlockingWork::Pool, BlockingWork::Inline] {
            assert_eq!(kind.run(|| 7).await, Ok(7));
            let err = kind.run(|| -> u32 { panic!("boom") }).await.expect_err("a panic is an error");
            assert!(err.contains("boom"), "{kind:?}: {err}");
        }
    }
}
