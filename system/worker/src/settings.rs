//! What a worker is configured with.

use std::time::Duration;

use rollout_core::config::HealthConfig;
use rollout_core::protocol::WorkerTerms;
use rollout_core::traits::Inventory;
use rollout_core::{Config, WorkerId};

/// How often metric deltas ride along with a heartbeat, by default. Every shipment
/// encodes (and the coordinator decodes and merges) one HDR histogram per plugin,
/// which is not free (it was a tenth of the simulator's time at one second), while
/// `rollout status` should show latencies within seconds.
pub const METRICS_INTERVAL_DEFAULT: Duration = Duration::from_secs(2);
/// The longest failure message a worker submits, by default (longer ones are truncated).
pub const MAX_ERROR_MESSAGE_BYTES_DEFAULT: usize = 4096;
/// How long past its deadline a plugin call is waited for. The plugin host is asked to
/// honour the deadline; a call still running this much later is stopped and its attempt
/// reported failed. One rule for every driver: the transport's worker and the simulator.
pub const PLUGIN_DEADLINE_GRACE: Duration = Duration::from_millis(100);

/// When a driver stops waiting for a plugin call with `deadline`.
pub fn plugin_stop_after(deadline: Duration) -> Duration {
    deadline.saturating_add(PLUGIN_DEADLINE_GRACE)
}

/// Everything a [`crate::Worker`] needs to know about itself and the protocol's timing.
///
/// The machine trusts these values (they come from a validated [`Config`]); it does
/// not panic on odd ones: zero `slots` makes a worker that never asks for work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSettings {
    /// The worker's name (its certificate's subject); appears in history events.
    pub id: WorkerId,
    /// How many tasks it runs at once.
    pub slots: u32,
    /// Plugins it can run, as advertised at Register.
    pub plugins: Vec<String>,
    /// Its CPUs, memory and GPUs, as advertised at Register.
    pub inventory: Inventory,
    /// Heartbeat interval and self-fence timeout (the other fields are the coordinator's)
    /// until a coordinator answers with its own ([`rollout_core::protocol::WorkerTerms`]).
    pub health: HealthConfig,
    /// First registration retry delay; doubles per failed attempt, with jitter.
    pub reconnect_backoff_initial: Duration,
    /// Upper bound of the registration retry delay.
    pub reconnect_backoff_max: Duration,
    /// How long a Register waits for its answer before it counts as failed.
    pub register_timeout: Duration,
    /// Metric deltas are shipped at most this often (with a heartbeat).
    pub metrics_interval: Duration,
    /// Failure messages are truncated to this many bytes (at a character boundary).
    pub max_error_message_bytes: usize,
    /// A result larger than this is submitted as a failure naming the limit (the
    /// coordinator would refuse it, and the bytes must not travel). Replaced by the
    /// coordinator's limit once it answers.
    pub max_result_bytes: u64,
}

impl WorkerSettings {
    /// The terms this config gives: what the worker follows until a coordinator answers
    /// with its own.
    pub fn terms(&self) -> WorkerTerms {
        WorkerTerms::new(&self.health, self.max_result_bytes)
    }

    /// Settings from the effective config: health, reconnect backoff and
    /// `limits.max_result_bytes` as configured, `register_timeout = 2 ×
    /// heartbeat_interval`, metrics every [`METRICS_INTERVAL_DEFAULT`], failure messages
    /// of at most 4 KiB.
    pub fn from_config(
        id: WorkerId,
        slots: u32,
        plugins: Vec<String>,
        inventory: Inventory,
        config: &Config,
    ) -> WorkerSettings {
        WorkerSettings {
            id,
            slots,
            plugins,
            inventory,
            health: config.health,
            reconnect_backoff_initial: config.transport.reconnect_backoff_initial,
            reconnect_backoff_max: config.transport.reconnect_backoff_max,
            register_timeout: config.health.heartbeat_interval.saturating_mul(2),
            metrics_interval: METRICS_INTERVAL_DEFAULT,
            max_error_message_bytes: MAX_ERROR_MESSAGE_BYTES_DEFAULT,
            max_result_bytes: u64::from(config.limits.max_result_bytes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_config_derives_register_timeout_from_the_beat() {
        let config = Config::default();
        let s = WorkerSettings::from_config(
            WorkerId::new("w1").expect("valid"),
            4,
            vec!["echo".into()],
            Inventory::default(),
            &config,
        );
        assert_eq!(s.register_timeout, config.health.heartbeat_interval * 2);
        assert_eq!(s.reconnect_backoff_initial, config.transport.reconnect_backoff_initial);
        assert_eq!(s.reconnect_backoff_max, config.transport.reconnect_backoff_max);
        assert_eq!(s.metrics_interval, METRICS_INTERVAL_DEFAULT);
        assert_eq!(s.max_error_message_bytes, 4096);
    }
}
