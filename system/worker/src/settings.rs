//! What a worker is configured with.

use std::time::{Duration, SystemTime};

use rollout_core::config::{CERT_NOT_BEFORE_SLACK, HealthConfig};
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

/// The first pause before a failed certificate renewal is tried again, by default; it
/// doubles per failure, with jitter, up to [`RENEW_RETRY_MAX_DEFAULT`].
pub const RENEW_RETRY_INITIAL_DEFAULT: Duration = Duration::from_secs(5);
/// The longest pause between renewal attempts, by default.
pub const RENEW_RETRY_MAX_DEFAULT: Duration = Duration::from_secs(600);

/// The validity of the worker's certificate, as its issuer wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credential {
    /// Valid from.
    pub not_before: SystemTime,
    /// Valid until.
    pub not_after: SystemTime,
}

/// When a certificate valid from `not_before` to `not_after` is due for renewal: two
/// thirds of the way from its issue to its expiry, less `jitter` (0..1) of a twelfth of
/// that, so a fleet issued together does not renew together. Its issue is taken to be
/// [`CERT_NOT_BEFORE_SLACK`] after `not_before` (how rollout signs) when the validity is
/// longer than that: counted from `not_before`, a certificate of under half an hour
/// would be due at once again after every renewal.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let total = not_after.duration_since(not_before).unwrap_or_default();
    let issued = if total > CERT_NOT_BEFORE_SLACK { not_before + CERT_NOT_BEFORE_SLACK } else { not_before };
    let span = not_after.duration_since(issued).unwrap_or_default();
    let early = span.div_f64(12.0).mul_f64(jitter.clamp(0.0, 1.0));
    (issued + span.mul_f64(2.0 / 3.0)).checked_sub(early).unwrap_or(issued)
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
    /// The worker's certificate, when the machine keeps it alive: it asks for a renewal
    /// ([`crate::WorkerOutput::RenewCertificate`]) at [`renew_at`] on its wall clock,
    /// retries with backoff, and stops ([`crate::WorkerOutput::CertificateExpired`]) if
    /// the certificate expires unrenewed. `None`: no certificate to look after.
    pub credential: Option<Credential>,
    /// First pause before a failed renewal is tried again (doubling, jittered).
    pub renew_retry_initial: Duration,
    /// Longest pause between renewal attempts.
    pub renew_retry_max: Duration,
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
            credential: None,
            renew_retry_initial: RENEW_RETRY_INITIAL_DEFAULT,
            renew_retry_max: RENEW_RETRY_MAX_DEFAULT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_falls_at_two_thirds_of_the_validity_after_issue_whatever_the_slack() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 31);
        let s = |d: SystemTime| d.duration_since(t).unwrap_or_default().as_secs_f64();
        // A minute's certificate signed the rollout way (valid from an hour before):
        // due 40 s after issue, 35 s with the most jitter, not at once.
        let short = (t - CERT_NOT_BEFORE_SLACK, t + Duration::from_secs(60));
        assert_eq!(s(renew_at(short.0, short.1, 0.0)), 40.0);
        assert_eq!(s(renew_at(short.0, short.1, 1.0)), 35.0);
        // Seven days: at 4 d 16 h after issue.
        let week = (t - CERT_NOT_BEFORE_SLACK, t + Duration::from_secs(7 * 86_400));
        assert_eq!(s(renew_at(week.0, week.1, 0.0)), 7.0 * 86_400.0 * 2.0 / 3.0);
        // No slack, shorter than it: counted from not_before.
        assert_eq!(s(renew_at(t, t + Duration::from_secs(90), 0.0)), 60.0);
    }

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
