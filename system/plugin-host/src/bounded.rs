//! Runs a blocking call on its own thread so that the caller can give up on it at the
//! deadline or on cancellation. In-process user code (a native function, a Python
//! function) cannot be killed: a call given up on is *abandoned*, its thread runs on
//! until the user code returns, and its result is dropped. Abandoned calls are counted
//! and bounded, so a plugin that hangs for good stops taking new calls instead of
//! piling up threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rollout_core::traits::{CancelToken, PluginError};

/// Most abandoned calls still running per plugin before new calls are refused.
pub const ABANDONED_CALLS_MAX: usize = 16;

/// How often a waiting caller looks at its cancel token.
const CANCEL_POLL_INTERVAL: Duration = Duration::from_millis(10);

/// The abandoned-but-still-running calls of one plugin.
#[derive(Debug, Default, Clone)]
pub(crate) struct AbandonedCalls(Arc<AtomicUsize>);

impl AbandonedCalls {
    pub(crate) fn running(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// Runs `work` on a new thread and waits for it, the deadline, or `cancel`, whichever
/// comes first. On deadline or cancel, `on_abandon` is called (on the waiting thread;
/// it must not block) so the mode can try to stop the user code, and the call is
/// abandoned.
pub(crate) fn run_bounded<W, A>(
    plugin: &str,
    deadline: Duration,
    cancel: &CancelToken,
    abandoned: &AbandonedCalls,
    work: W,
    on_abandon: A,
) -> Result<Vec<u8>, PluginError>
where
    W: FnOnce() -> Result<Vec<u8>, PluginError> + Send + 'static,
    A: FnOnce(),
{
    let running = abandoned.running();
    if running >= ABANDONED_CALLS_MAX {
        return Err(PluginError::Crashed(format!(
            "plugin {plugin:?} has {running} calls still running past their deadline or cancellation; \
             it takes no new calls until they return (restart the worker to clear them)"
        )));
    }
    let started = Instant::now();
    let (tx, rx) = mpsc::sync_channel(1);
    let counter = abandoned.clone();
    let spawned = std::thread::Builder::new().name(format!("plugin-{plugin}")).spawn(move || {
        let result = work();
        // The receiver is gone only if the caller abandoned us, and it counted us as
        // abandoned before it let go of the receiver; undo that count.
        if tx.send(result).is_err() {
            counter.0.fetch_sub(1, Ordering::AcqRel);
        }
    });
    if let Err(e) = spawned {
        return Err(PluginError::Crashed(format!("cannot start a thread for plugin {plugin:?}: {e}")));
    }
    loop {
        if cancel.is_cancelled() {
            abandoned.0.fetch_add(1, Ordering::AcqRel);
            on_abandon();
            return Err(PluginError::Cancelled);
        }
        let Some(left) = deadline.checked_sub(started.elapsed()).filter(|left| !left.is_zero()) else {
            abandoned.0.fetch_add(1, Ordering::AcqRel);
            on_abandon();
            tracing::warn!(plugin, ?deadline, "plugin_call_abandoned");
            return Err(PluginError::DeadlineExceeded(deadline));
        };
        match rx.recv_timeout(left.min(CANCEL_POLL_INTERVAL)) {
            Ok(result) => return result,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(PluginError::Crashed(format!("the thread running plugin {plugin:?} panicked")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(ms: u64) -> impl FnOnce() -> Result<Vec<u8>, PluginError> + Send + 'static {
        move || {
            std::thread::sleep(Duration::from_millis(ms));
            Ok(b"done".to_vec())
        }
    }

    #[test]
    fn a_quick_call_returns_its_result() {
        let abandoned = AbandonedCalls::default();
        let r = run_bounded("t", Duration::from_secs(5), &CancelToken::new(), &abandoned, sleeper(1), || {});
        assert_eq!(r, Ok(b"done".to_vec()));
        assert_eq!(abandoned.running(), 0);
    }

    #[test]
    fn a_slow_call_is_abandoned_at_the_deadline_and_uncounted_when_it_returns() {
        let abandoned = AbandonedCalls::default();
        let mut told = false;
        let deadline = Duration::from_millis(30);
        let r = run_bounded("t", deadline, &CancelToken::new(), &abandoned, sleeper(200), || told = true);
        assert_eq!(r, Err(PluginError::DeadlineExceeded(deadline)));
        assert!(told);
        assert_eq!(abandoned.running(), 1);
        let until = Instant::now() + Duration::from_secs(5);
        while abandoned.running() != 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(abandoned.running(), 0);
    }

    #[test]
    fn cancellation_stops_the_wait() {
        let abandoned = AbandonedCalls::default();
        let cancel = CancelToken::new();
        let canceller = cancel.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            canceller.cancel();
        });
        let started = Instant::now();
        let r = run_bounded("t", Duration::from_secs(10), &cancel, &abandoned, sleeper(500), || {});
        assert_eq!(r, Err(PluginError::Cancelled));
        assert!(started.elapsed() < Duration::from_millis(400));
    }

    #[test]
    fn too_many_abandoned_calls_refuse_new_ones() {
        let abandoned = AbandonedCalls::default();
        abandoned.0.store(ABANDONED_CALLS_MAX, Ordering::Release);
        let r = run_bounded("t", Duration::from_secs(1), &CancelToken::new(), &abandoned, sleeper(0), || {});
        assert!(matches!(r, Err(PluginError::Crashed(m)) if m.contains("still running")));
    }
}
