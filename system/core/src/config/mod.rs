//! The effective configuration: seed defaults, overridden by a TOML file, overridden
//! by environment variables, then validated.
//!
//! Environment overrides are named `ROLLOUT_<SECTION>__<KEY>` (two underscores
//! between section and key), e.g. `ROLLOUT_HEALTH__HEARTBEAT_INTERVAL=750ms`. A value
//! that parses as a TOML scalar (`10`, `true`) is taken as one; anything else is a
//! string. Unknown sections and keys, in the file or the environment, are errors that
//! name the key and where it came from.
//!
//! One top-level key is not the core's: `[[plugins]]`, the worker's plugin list. It
//! lives in the same file so that one file describes a worker, but it is parsed and
//! validated by the plugin host (`rollout-plugin-host`'s `spec`), which the core does
//! not depend on. Here it is only checked to be an array of tables and then set aside.

pub mod duration_text;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "ROLLOUT_";
/// Separates section and key in an environment override.
pub const ENV_SEPARATOR: &str = "__";
/// The top-level key of the worker's `[[plugins]]` tables, which the plugin host reads
/// from the same file; [`Config::load`] checks their shape and otherwise ignores them.
pub const PLUGINS_KEY: &str = "plugins";
/// The shortest lifetime `transport.*_cert_lifetime` may give a certificate.
pub const CERT_LIFETIME_MIN: Duration = Duration::from_secs(60);
/// How far before its issue a certificate's validity starts, so that a verifier whose
/// clock is behind the issuer's accepts it (the clock skew tolerated at issue). Every
/// certificate rollout signs has it; a worker's renewal schedule leaves it out.
pub const CERT_NOT_BEFORE_SLACK: Duration = Duration::from_secs(3600);

/// Everything that can be configured. Each section has the seed defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Heartbeats, failure detection and self-fencing.
    pub health: HealthConfig,
    /// Addresses, certificates, reconnects.
    pub transport: TransportConfig,
    /// Where durable state lives.
    pub storage: StorageConfig,
    /// Retries and backoff of failed tasks.
    pub tasks: TasksConfig,
    /// Bounds on sizes and counts; every queue and message is bounded.
    pub limits: LimitsConfig,
    /// The Prometheus `/metrics` listeners.
    pub metrics: MetricsConfig,
}

/// Where `/metrics` (Prometheus text) is served: loopback only, since the listener has
/// no client authentication (the gRPC listener's operator mTLS does not cover it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// The coordinator's listener, `host:port` on loopback; empty: no listener.
    pub listen_addr: String,
    /// Each worker's listener, `host:port` on loopback (port 0: any free port, logged at
    /// start; `rollout worker --metrics-addr` overrides it); empty: no listener.
    pub worker_listen_addr: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen_addr: "127.0.0.1:9464".into(), worker_listen_addr: "127.0.0.1:0".into() }
    }
}

/// Checks a metrics listener address: empty (off) or a loopback `ip:port`.
pub fn check_metrics_addr(field: &str, addr: &str) -> Result<()> {
    if addr.is_empty() {
        return Ok(());
    }
    let parsed: std::net::SocketAddr = addr.parse().map_err(|_| {
        Error::config_invalid(field, format!("{addr:?} is not an ip:port (e.g. 127.0.0.1:9464; empty turns it off)"))
    })?;
    if !parsed.ip().is_loopback() {
        return Err(Error::config_invalid(
            field,
            format!(
                "{addr} is not a loopback address: /metrics has no client authentication, so it is served on \
                 loopback only (scrape through a local agent or an SSH tunnel)"
            ),
        ));
    }
    Ok(())
}

/// Failure detection. See DESIGN.md, "Health, leases, fencing".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// How often a worker beats. Its `due_at` is `wall_now + 2 × heartbeat_interval`.
    #[serde(with = "duration_text")]
    pub heartbeat_interval: Duration,
    /// A worker that has had no beat acknowledged for this long (monotonic clock)
    /// stops its tasks and withholds their results. Must be below
    /// `coordinator_failure_timeout`, so it stops before its leases are handed out again.
    #[serde(with = "duration_text")]
    pub worker_self_fence_timeout: Duration,
    /// How far past `due_at` (and past `clock_skew_budget`) a worker must be before
    /// the coordinator declares it failed and revokes its leases.
    #[serde(with = "duration_text")]
    pub coordinator_failure_timeout: Duration,
    /// The wall-clock disagreement between nodes the protocol tolerates without false
    /// failures or overlapping execution. Must be below `2 × heartbeat_interval`.
    #[serde(with = "duration_text")]
    pub clock_skew_budget: Duration,
    /// How often the coordinator scans heartbeat deadlines.
    #[serde(with = "duration_text")]
    pub failure_scan_interval: Duration,
    /// How long the coordinator keeps a failed worker's record (shown by `rollout
    /// status`) before forgetting it; a worker that registers again is new anyway.
    #[serde(with = "duration_text")]
    pub failed_worker_retention: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            heartbeat_interval: Duration::from_millis(500),
            worker_self_fence_timeout: Duration::from_secs(4),
            coordinator_failure_timeout: Duration::from_secs(5),
            clock_skew_budget: Duration::from_millis(250),
            failure_scan_interval: Duration::from_millis(250),
            failed_worker_retention: Duration::from_secs(3600),
        }
    }
}

/// Network and certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportConfig {
    /// Where the coordinator listens (`host:port`).
    pub listen_addr: String,
    /// Where workers and operators reach the coordinator (`host:port`).
    pub coordinator_addr: String,
    /// Directory of the CA and issued certificates.
    pub tls_dir: PathBuf,
    /// First reconnect delay of a worker; doubles per failed attempt, with jitter.
    #[serde(with = "duration_text")]
    pub reconnect_backoff_initial: Duration,
    /// Upper bound of the reconnect delay.
    #[serde(with = "duration_text")]
    pub reconnect_backoff_max: Duration,
    /// How long a CA made by `rollout certs init` is valid.
    #[serde(with = "duration_text")]
    pub ca_cert_lifetime: Duration,
    /// How long the coordinator's server certificate is valid.
    #[serde(with = "duration_text")]
    pub server_cert_lifetime: Duration,
    /// How long a worker certificate is valid (issued by `rollout certs issue` or
    /// enrollment). A worker whose certificate has expired re-enrolls with a token.
    #[serde(with = "duration_text")]
    pub worker_cert_lifetime: Duration,
    /// How long an operator certificate is valid.
    #[serde(with = "duration_text")]
    pub operator_cert_lifetime: Duration,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            listen_addr: "127.0.0.1:7450".to_owned(),
            coordinator_addr: "127.0.0.1:7450".to_owned(),
            tls_dir: PathBuf::from("./data/tls"),
            reconnect_backoff_initial: Duration::from_millis(100),
            reconnect_backoff_max: Duration::from_secs(5),
            ca_cert_lifetime: Duration::from_secs(730 * 86_400),
            server_cert_lifetime: Duration::from_secs(365 * 86_400),
            worker_cert_lifetime: Duration::from_secs(7 * 86_400),
            operator_cert_lifetime: Duration::from_secs(90 * 86_400),
        }
    }
}

/// Durable state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Root of the database file and the object store.
    pub data_dir: PathBuf,
    /// Bytes of database pages kept in memory: the bound of the coordinator's memory for
    /// storage whatever the database's size (more makes reads of results and payloads
    /// cheaper).
    pub cache_bytes: u64,
    /// Verify every page of the database when the coordinator starts (a read of the
    /// whole file, about a second per GiB: a damaged file is found at start, not at the
    /// first read of the damage).
    pub check_integrity_on_open: bool,
    /// Capacity in bytes of the write-ahead log beside the database (`rollout.db.wal`;
    /// e.g. 67108864): a small commit appends its writes there and syncs that alone, and
    /// the database itself is synced at checkpoints (when the log is full, every 4,096
    /// commits, or for a transaction over 64 KiB). A small commit is then about 1.5x
    /// faster, but at half load the p99 latency was several times worse (the cause is
    /// not found yet). 0 (the default): every commit is a durable database
    /// commit (a log left by an earlier run is replayed first). Otherwise 1 MiB to 1 GiB
    /// (the log is read whole at start).
    pub wal_bytes: u64,
    /// Bytes of task input blobs a worker keeps (under `<data_dir>/blob-cache/<worker>`);
    /// beyond it, the least recently used blobs no running task holds are deleted.
    pub blob_cache_bytes: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./data"),
            cache_bytes: 64 * 1024 * 1024,
            check_integrity_on_open: true,
            wal_bytes: 0,
            blob_cache_bytes: 16 * 1024 * 1024 * 1024,
        }
    }
}

/// What happens to a task whose attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TasksConfig {
    /// Attempts before a task is dead-lettered with its error history.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles per attempt.
    #[serde(with = "duration_text")]
    pub retry_backoff_initial: Duration,
    /// Upper bound of the retry delay.
    #[serde(with = "duration_text")]
    pub retry_backoff_max: Duration,
    /// How long a finished job (every task committed, dead-lettered or cancelled) keeps
    /// its records, specs and results; then all of it is deleted.
    #[serde(with = "duration_text")]
    pub job_retention: Duration,
    /// A job opened for streamed submission that is not sealed within this long is
    /// abandoned: its appended tasks are deleted and never run.
    #[serde(with = "duration_text")]
    pub open_job_timeout: Duration,
}

impl Default for TasksConfig {
    fn default() -> Self {
        TasksConfig {
            max_attempts: 3,
            retry_backoff_initial: Duration::from_millis(200),
            retry_backoff_max: Duration::from_secs(30),
            job_retention: Duration::from_secs(7 * 24 * 3600),
            open_job_timeout: Duration::from_secs(3600),
        }
    }
}

/// Bytes of every gRPC message reserved for framing around the one payload or result
/// it must always be able to carry (task id, token, plugin and method names, field
/// tags): a task payload or result may be at most `max_message_bytes` minus this.
pub const FRAME_OVERHEAD_BYTES: u32 = 4096;

/// Bounds on everything that could otherwise grow without limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest encoded gRPC message accepted or sent. Frames of assignments and
    /// submits are cut to fit it.
    pub max_message_bytes: u32,
    /// Largest task payload.
    pub max_payload_bytes: u32,
    /// Largest task result.
    pub max_result_bytes: u32,
    /// Most tasks in one job.
    pub max_tasks_per_job: u32,
    /// Most tasks a worker may ask for in one Pull.
    pub max_credits_per_pull: u32,
    /// Most slots (concurrent tasks) one worker may declare.
    pub max_slots_per_worker: u32,
    /// Most workers registered at once.
    pub max_workers: u32,
    /// Most plugins one worker may offer at registration.
    pub max_plugins_per_worker: u32,
    /// Most metric series (counters and histograms together) one heartbeat may carry;
    /// the rest are dropped and counted.
    pub max_metric_series_per_beat: u32,
    /// Most jobs open for streamed submission (opened, not yet sealed) at once.
    pub max_open_jobs: u32,
    /// Most connections the coordinator keeps open at once; further ones are closed
    /// right after they are accepted.
    pub max_connections: u32,
    /// Most connections without a client certificate (they may only enroll) at once,
    /// within `max_connections`.
    pub max_unauthenticated_connections: u32,
    /// Most TLS handshakes in progress at once; further connections wait to start theirs.
    pub max_handshakes_in_flight: u32,
    /// How long a connection without a client certificate may stay open.
    #[serde(with = "duration_text")]
    pub unauthenticated_connection_timeout: Duration,
    /// Failed enrollments one source address may make per minute; beyond it, the
    /// address is refused until the minute is over.
    pub max_failed_enrollments_per_minute: u32,
    /// Payload and result bytes one worker's Work stream may have on their way into the
    /// coordinator's batches; its next frames wait (so one worker cannot fill the
    /// coordinator's memory, and others are not slowed).
    pub max_work_bytes_in_flight: u32,
    /// Largest blob an operator may upload (`rollout blob put`, PutBlob).
    pub max_blob_bytes: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_bytes: 4 * 1024 * 1024,
            max_payload_bytes: 1024 * 1024,
            max_result_bytes: 1024 * 1024,
            max_tasks_per_job: 1_000_000,
            max_credits_per_pull: 1024,
            max_slots_per_worker: 1024,
            max_workers: 10_000,
            max_plugins_per_worker: 256,
            max_metric_series_per_beat: 256,
            max_open_jobs: 64,
            max_connections: 16_384,
            max_unauthenticated_connections: 256,
            max_handshakes_in_flight: 256,
            unauthenticated_connection_timeout: Duration::from_secs(10),
            max_failed_enrollments_per_minute: 10,
            max_work_bytes_in_flight: 16 * 1024 * 1024,
            max_blob_bytes: 4 * 1024 * 1024 * 1024,
        }
    }
}

/// Where a config value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    File(PathBuf),
    Env(String),
}

impl Config {
    /// Loads the effective config: defaults, then the file at `path` (if any), then
    /// the `ROLLOUT_<SECTION>__<KEY>` entries of `env`, then [`Config::validate`].
    ///
    /// Errors are [`crate::Fatal::ConfigInvalid`] naming the file, the key (and the
    /// environment variable it came from) or the field that failed validation.
    pub fn load<I, K, V>(path: Option<&Path>, env: I) -> Result<Config>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let mut merged = toml::Table::new();
        let mut origins = BTreeMap::new();
        if let Some(path) = path {
            let text = crate::text::read_text_bounded(path, crate::text::CONFIG_FILE_BYTES_MAX).map_err(|e| {
                Error::config_invalid(path.display().to_string(), format!("cannot read config file: {e}"))
            })?;
            let mut table: toml::Table = toml::from_str(&text).map_err(|e| {
                Error::config_invalid(path.display().to_string(), format!("not valid TOML: {}", e.message()))
            })?;
            set_plugins_aside(&mut table, &describe_origin(&Origin::File(path.to_owned())))?;
            merge(&mut merged, &mut origins, table, &Origin::File(path.to_owned()))?;
        }
        let mut env_table = toml::Table::new();
        let mut env_origins = BTreeMap::new();
        for (name, value) in env {
            let (name, value) = (name.into(), value.into());
            if let Some((section, key)) = env_override_path(&name) {
                let section_table =
                    env_table.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                if let toml::Value::Table(t) = section_table {
                    t.insert(key.clone(), env_value(&value));
                }
                env_origins.insert(format!("{section}.{key}"), name);
            }
        }
        for (path, name) in env_origins {
            origins.insert(path, Origin::Env(name));
        }
        merge(&mut merged, &mut BTreeMap::new(), env_table, &Origin::Env(String::new()))?;
        check_known_keys(&merged, &origins)?;

        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(merged)).map_err(|e| {
            let path = e.path().to_string();
            let origin = origins.get(&path).map(describe_origin).unwrap_or_default();
            Error::config_invalid(format!("{path}{origin}"), e.into_inner().message().trim().to_owned())
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The defaults with failure detection about ten times faster: a beat every 100 ms,
    /// a worker fences itself after 800 ms without an acknowledged beat, the coordinator
    /// declares it failed 1 s past its deadline (skew budget 50 ms, scans every 50 ms),
    /// reconnect backoff 50–500 ms, retry backoff from 50 ms. For tests and simulations
    /// that watch failures happen, on one machine or a LAN.
    pub fn fast_failure_detection() -> Config {
        let mut config = Config::default();
        config.health.heartbeat_interval = Duration::from_millis(100);
        config.health.worker_self_fence_timeout = Duration::from_millis(800);
        config.health.coordinator_failure_timeout = Duration::from_secs(1);
        config.health.clock_skew_budget = Duration::from_millis(50);
        config.health.failure_scan_interval = Duration::from_millis(50);
        config.transport.reconnect_backoff_initial = Duration::from_millis(50);
        config.transport.reconnect_backoff_max = Duration::from_millis(500);
        config.tasks.retry_backoff_initial = Duration::from_millis(50);
        config
    }

    /// Parses a config from TOML text alone (no environment), and validates it.
    pub fn from_toml_str(text: &str) -> Result<Config> {
        let mut table: toml::Table = toml::from_str(text)
            .map_err(|e| Error::config_invalid("<config text>", format!("not valid TOML: {}", e.message())))?;
        set_plugins_aside(&mut table, "")?;
        check_known_keys(&table, &BTreeMap::new())?;
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| Error::config_invalid(e.path().to_string(), e.into_inner().message().trim().to_owned()))?;
        config.validate()?;
        Ok(config)
    }

    /// The config as TOML, every field spelled out: what `rollout plan` prints.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a Config always serializes to TOML")
    }

    /// Every check: single fields first, then [`Config::validate_cross_fields`].
    pub fn validate(&self) -> Result<()> {
        let h = &self.health;
        non_zero("health.heartbeat_interval", h.heartbeat_interval)?;
        non_zero("health.worker_self_fence_timeout", h.worker_self_fence_timeout)?;
        non_zero("health.coordinator_failure_timeout", h.coordinator_failure_timeout)?;
        non_zero("health.failure_scan_interval", h.failure_scan_interval)?;
        non_zero("health.failed_worker_retention", h.failed_worker_retention)?;
        let t = &self.transport;
        non_empty("transport.listen_addr", &t.listen_addr)?;
        non_empty("transport.coordinator_addr", &t.coordinator_addr)?;
        non_zero("transport.reconnect_backoff_initial", t.reconnect_backoff_initial)?;
        at_most(
            "transport.reconnect_backoff_initial",
            t.reconnect_backoff_initial,
            "transport.reconnect_backoff_max",
            t.reconnect_backoff_max,
        )?;
        for (field, lifetime) in [
            ("transport.server_cert_lifetime", t.server_cert_lifetime),
            ("transport.worker_cert_lifetime", t.worker_cert_lifetime),
            ("transport.operator_cert_lifetime", t.operator_cert_lifetime),
        ] {
            if lifetime < CERT_LIFETIME_MIN {
                return Err(Error::config_invalid(
                    field,
                    format!(
                        "{} is shorter than the shortest certificate lifetime, {}",
                        duration_text::format(lifetime),
                        duration_text::format(CERT_LIFETIME_MIN)
                    ),
                ));
            }
            at_most(field, lifetime, "transport.ca_cert_lifetime", t.ca_cert_lifetime)?;
        }
        if self.storage.data_dir.as_os_str().is_empty() {
            return Err(Error::config_invalid("storage.data_dir", "must not be empty"));
        }
        if self.storage.cache_bytes < 1024 * 1024 {
            return Err(Error::config_invalid("storage.cache_bytes", "must be at least 1 MiB (1048576)"));
        }
        let wal = self.storage.wal_bytes;
        if wal != 0 && !(1 << 20..=1 << 30).contains(&wal) {
            return Err(Error::config_invalid(
                "storage.wal_bytes",
                format!("{wal} is out of range: 0 (no log), or 1 MiB (1048576) to 1 GiB (1073741824)"),
            ));
        }
        check_metrics_addr("metrics.listen_addr", &self.metrics.listen_addr)?;
        check_metrics_addr("metrics.worker_listen_addr", &self.metrics.worker_listen_addr)?;
        let k = &self.tasks;
        if k.max_attempts == 0 {
            return Err(Error::config_invalid("tasks.max_attempts", "must be at least 1"));
        }
        at_most(
            "tasks.retry_backoff_initial",
            k.retry_backoff_initial,
            "tasks.retry_backoff_max",
            k.retry_backoff_max,
        )?;
        non_zero("tasks.job_retention", k.job_retention)?;
        non_zero("tasks.open_job_timeout", k.open_job_timeout)?;
        let l = &self.limits;
        for (field, value) in [
            ("limits.max_message_bytes", l.max_message_bytes),
            ("limits.max_payload_bytes", l.max_payload_bytes),
            ("limits.max_result_bytes", l.max_result_bytes),
            ("limits.max_tasks_per_job", l.max_tasks_per_job),
            ("limits.max_credits_per_pull", l.max_credits_per_pull),
            ("limits.max_slots_per_worker", l.max_slots_per_worker),
            ("limits.max_workers", l.max_workers),
            ("limits.max_plugins_per_worker", l.max_plugins_per_worker),
            ("limits.max_metric_series_per_beat", l.max_metric_series_per_beat),
            ("limits.max_open_jobs", l.max_open_jobs),
            ("limits.max_connections", l.max_connections),
            ("limits.max_unauthenticated_connections", l.max_unauthenticated_connections),
            ("limits.max_handshakes_in_flight", l.max_handshakes_in_flight),
            ("limits.max_failed_enrollments_per_minute", l.max_failed_enrollments_per_minute),
            ("limits.max_work_bytes_in_flight", l.max_work_bytes_in_flight),
        ] {
            if value == 0 {
                return Err(Error::config_invalid(field, "must be at least 1"));
            }
        }
        non_zero("limits.unauthenticated_connection_timeout", l.unauthenticated_connection_timeout)?;
        if l.max_blob_bytes == 0 {
            return Err(Error::config_invalid("limits.max_blob_bytes", "must be at least 1"));
        }
        self.validate_cross_fields()
    }

    /// The two rules the health protocol's safety rests on:
    ///
    /// - `worker_self_fence_timeout < coordinator_failure_timeout`: a cut-off worker
    ///   stops running a task before the coordinator can lease it to another worker.
    /// - `clock_skew_budget < 2 × heartbeat_interval`: within the budget, a healthy
    ///   worker's next beat always lands before its `due_at` is judged.
    ///
    /// And the limits that must fit each other:
    ///
    /// - `max_payload_bytes` and `max_result_bytes`, plus [`FRAME_OVERHEAD_BYTES`], fit
    ///   in `max_message_bytes`: a maximal payload travels in one Assign, a maximal
    ///   result in one Submit, however frames are cut.
    /// - `max_work_bytes_in_flight` holds at least one maximal message, so a worker's
    ///   stream can always make progress.
    /// - `max_unauthenticated_connections` is within `max_connections`.
    ///
    /// Accepts exactly the configs that satisfy these; the error names the field.
    pub fn validate_cross_fields(&self) -> Result<()> {
        let l = &self.limits;
        for (field, value) in
            [("limits.max_payload_bytes", l.max_payload_bytes), ("limits.max_result_bytes", l.max_result_bytes)]
        {
            if u64::from(value) + u64::from(FRAME_OVERHEAD_BYTES) > u64::from(l.max_message_bytes) {
                return Err(Error::config_invalid(
                    field,
                    format!(
                        "{value} bytes plus {FRAME_OVERHEAD_BYTES} bytes of framing do not fit in \
                         limits.max_message_bytes ({}); raise limits.max_message_bytes to at least {} or lower {field}",
                        l.max_message_bytes,
                        u64::from(value) + u64::from(FRAME_OVERHEAD_BYTES)
                    ),
                ));
            }
        }
        if l.max_work_bytes_in_flight < l.max_message_bytes {
            return Err(Error::config_invalid(
                "limits.max_work_bytes_in_flight",
                format!(
                    "{} must be at least limits.max_message_bytes ({}), or a worker's largest frame could never be taken",
                    l.max_work_bytes_in_flight, l.max_message_bytes
                ),
            ));
        }
        if l.max_unauthenticated_connections > l.max_connections {
            return Err(Error::config_invalid(
                "limits.max_unauthenticated_connections",
                format!(
                    "{} must not exceed limits.max_connections ({})",
                    l.max_unauthenticated_connections, l.max_connections
                ),
            ));
        }
        let h = &self.health;
        if h.worker_self_fence_timeout >= h.coordinator_failure_timeout {
            return Err(Error::config_invalid(
                "health.worker_self_fence_timeout",
                format!(
                    "{} must be less than health.coordinator_failure_timeout ({}), so that a cut-off worker \
                     stops its tasks before the coordinator leases them to another worker",
                    duration_text::format(h.worker_self_fence_timeout),
                    duration_text::format(h.coordinator_failure_timeout)
                ),
            ));
        }
        let two_beats = h.heartbeat_interval.saturating_mul(2);
        if h.clock_skew_budget >= two_beats {
            return Err(Error::config_invalid(
                "health.clock_skew_budget",
                format!(
                    "{} must be less than 2 × health.heartbeat_interval ({}), or a healthy worker's clock skew \
                     could exceed the slack its due_at gives",
                    duration_text::format(h.clock_skew_budget),
                    duration_text::format(two_beats)
                ),
            ));
        }
        Ok(())
    }
}

fn non_zero(field: &str, d: Duration) -> Result<()> {
    if d.is_zero() { Err(Error::config_invalid(field, "must be greater than 0s")) } else { Ok(()) }
}

fn non_empty(field: &str, s: &str) -> Result<()> {
    if s.trim().is_empty() { Err(Error::config_invalid(field, "must not be empty")) } else { Ok(()) }
}

fn at_most(field: &str, value: Duration, bound_field: &str, bound: Duration) -> Result<()> {
    if value > bound {
        Err(Error::config_invalid(
            field,
            format!(
                "{} must not exceed {bound_field} ({})",
                duration_text::format(value),
                duration_text::format(bound)
            ),
        ))
    } else {
        Ok(())
    }
}

/// `ROLLOUT_HEALTH__HEARTBEAT_INTERVAL` → `("health", "heartbeat_interval")`.
fn env_override_path(name: &str) -> Option<(String, String)> {
    let rest = name.strip_prefix(ENV_PREFIX)?;
    let (section, key) = rest.split_once(ENV_SEPARATOR)?;
    Some((section.to_ascii_lowercase(), key.to_ascii_lowercase()))
}

/// An environment value as TOML: scalars as themselves, everything else as a string.
fn env_value(text: &str) -> toml::Value {
    let parsed = toml::from_str::<toml::Table>(&format!("v = {text}")).ok().and_then(|mut t| t.remove("v"));
    match parsed {
        Some(v @ (toml::Value::Integer(_) | toml::Value::Boolean(_) | toml::Value::Float(_))) => v,
        _ => toml::Value::String(text.to_owned()),
    }
}

/// Removes the `[[plugins]]` tables (the plugin host's to parse) after checking that
/// they are an array of tables; `origin` describes the file for the error.
fn set_plugins_aside(table: &mut toml::Table, origin: &str) -> Result<()> {
    match table.remove(PLUGINS_KEY) {
        None => Ok(()),
        Some(toml::Value::Array(entries)) if entries.iter().all(toml::Value::is_table) => Ok(()),
        Some(_) => Err(Error::config_invalid(
            format!("{PLUGINS_KEY}{origin}"),
            "expected [[plugins]] tables, one per plugin (name, mode, ...)",
        )),
    }
}

/// Overlays `layer` onto `merged`, one level of sections deep.
fn merge(
    merged: &mut toml::Table,
    origins: &mut BTreeMap<String, Origin>,
    layer: toml::Table,
    origin: &Origin,
) -> Result<()> {
    for (section, value) in layer {
        let toml::Value::Table(entries) = value else {
            return Err(Error::config_invalid(
                format!("{section}{}", describe_origin(origin)),
                "expected a [section] table of settings",
            ));
        };
        let target = merged.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(target) = target else { unreachable!("merged holds only tables") };
        for (key, v) in entries {
            origins.insert(format!("{section}.{key}"), origin.clone());
            target.insert(key, v);
        }
    }
    Ok(())
}

/// Rejects any section or key the defaults do not have, naming it and its origin and
/// suggesting the closest known key.
fn check_known_keys(table: &toml::Table, origins: &BTreeMap<String, Origin>) -> Result<()> {
    let known: toml::Table = toml::Table::try_from(Config::default()).expect("defaults serialize");
    for (section, value) in table {
        if section == PLUGINS_KEY {
            // Only the environment can bring it here: the file's [[plugins]] were set aside.
            let origin = origins.iter().find(|(path, _)| path.starts_with("plugins.")).map(|(_, o)| describe_origin(o));
            return Err(Error::config_invalid(
                format!("{section}{}", origin.unwrap_or_default()),
                "plugins are configured only as [[plugins]] tables in the config file, not from the environment",
            ));
        }
        let Some(toml::Value::Table(known_keys)) = known.get(section) else {
            let origin = origins
                .iter()
                .find(|(path, _)| path.starts_with(&format!("{section}.")))
                .map(|(_, o)| describe_origin(o))
                .unwrap_or_default();
            let sections: Vec<&str> = known.keys().map(String::as_str).collect();
            return Err(Error::config_invalid(
                format!("{section}{origin}"),
                format!("unknown section; known sections are {}", sections.join(", ")),
            ));
        };
        let toml::Value::Table(entries) = value else { continue };
        for key in entries.keys() {
            if !known_keys.contains_key(key) {
                let path = format!("{section}.{key}");
                let origin = origins.get(&path).map(describe_origin).unwrap_or_default();
                let hint = closest(key, known_keys.keys().map(String::as_str))
                    .map(|k| format!("; did you mean {section}.{k}?"))
                    .unwrap_or_default();
                return Err(Error::config_invalid(format!("{path}{origin}"), format!("unknown key{hint}")));
            }
        }
    }
    Ok(())
}

fn describe_origin(origin: &Origin) -> String {
    match origin {
        Origin::File(path) => format!(" (in {})", path.display()),
        Origin::Env(name) if name.is_empty() => " (from the environment)".to_owned(),
        Origin::Env(name) => format!(" (from environment variable {name})"),
    }
}

/// The candidate within edit distance 3 of `word`, if any.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates.map(|c| (edit_distance(word, c), c)).filter(|(d, _)| *d <= 3).min().map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev_diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            let next = (row[j + 1] + 1).min(row[j] + 1).min(prev_diag + cost);
            prev_diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests;
