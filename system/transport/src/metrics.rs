//! Prometheus metrics: the coordinator's and a worker's series, and the HTTP listener
//! that serves them at `/metrics` (OpenMetrics text).
//!
//! Crate: `prometheus-client`, the Prometheus project's own Rust client: typed metrics
//! on atomics (an increment is one atomic add, from any thread, with no lock and no
//! global registry), and an encoder for the OpenMetrics text format Prometheus scrapes.
//!
//! A scrape never touches the commit path: counters and histograms are atomics updated
//! where things happen (the driver as it releases a batch's outputs, the commit thread
//! as a sync ends), and the gauges read from the machine (workers, tasks and jobs by
//! state, task run-time percentiles) are refreshed by the driver at most once a second,
//! from counts it keeps anyway. The scrape only encodes what is there.
//!
//! The listener binds loopback only (`metrics.listen_addr`, validated in rollout-core);
//! serving beyond loopback would need the operator mTLS the gRPC listener has.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rollout_coordinator::StatusPage;
use rollout_core::history::HistoryEvent;
use rollout_core::protocol::SubmitVerdict;
use rollout_core::{Error, Result};

/// One label, e.g. `state="queued"`.
type Label = [(&'static str, String); 1];
/// A float gauge (seconds).
type FloatGauge = Gauge<f64, AtomicU64>;

fn label(key: &'static str, value: impl Into<String>) -> Label {
    [(key, value.into())]
}

/// Buckets from 50 µs to about 100 s, doubling.
fn seconds_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(50e-6, 2.0, 22)
}

/// The coordinator's series.
pub struct CoordinatorMetrics {
    registry: Registry,
    workers: Family<Label, Gauge>,
    tasks: Family<Label, Gauge>,
    jobs: Family<Label, Gauge>,
    task_run_seconds: Family<[(&'static str, String); 2], FloatGauge>,
    plugin_restarts: Family<Label, Gauge>,
    leases: Counter,
    requeued: Family<Label, Counter>,
    dead_lettered: Counter,
    committed: Counter,
    verdicts: Family<Label, Counter>,
    declared_failed: Counter,
    registrations: Counter,
    heartbeats: Counter,
    beat_lateness: Histogram,
    batch_inputs: Histogram,
    commit_seconds: Histogram,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CoordinatorMetrics {
    /// Every series registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("rollout");
        let m = CoordinatorMetrics {
            workers: Family::default(),
            tasks: Family::default(),
            jobs: Family::default(),
            task_run_seconds: Family::default(),
            plugin_restarts: Family::default(),
            leases: Counter::default(),
            requeued: Family::default(),
            dead_lettered: Counter::default(),
            committed: Counter::default(),
            verdicts: Family::default(),
            declared_failed: Counter::default(),
            registrations: Counter::default(),
            heartbeats: Counter::default(),
            beat_lateness: Histogram::new(seconds_buckets()),
            batch_inputs: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
            commit_seconds: Histogram::new(seconds_buckets()),
            registry: Registry::default(),
        };
        registry.register("workers", "Workers the coordinator knows, by state", m.workers.clone());
        registry.register("tasks", "Tasks of the jobs held, by state", m.tasks.clone());
        registry.register("jobs", "Jobs held, by phase", m.jobs.clone());
        registry.register(
            "task_run_seconds",
            "Task run time (worker side, start to finish) by plugin and quantile, from the merged histograms",
            m.task_run_seconds.clone(),
        );
        registry.register(
            "plugin_restarts",
            "Sidecar processes started again (after a crash, or a kill of a call that would not stop), by plugin, \
             as the workers reported them since the coordinator's counters began",
            m.plugin_restarts.clone(),
        );
        registry.register("leases", "Leases granted", m.leases.clone());
        registry.register(
            "requeued",
            "Leases that ended without a result and put the task back in the queue, by reason",
            m.requeued.clone(),
        );
        registry.register("dead_lettered", "Tasks that ran out of attempts", m.dead_lettered.clone());
        registry.register("committed", "Results committed", m.committed.clone());
        registry.register("submits", "Worker submits by verdict", m.verdicts.clone());
        registry.register("declared_failed", "Worker incarnations declared failed", m.declared_failed.clone());
        registry.register("registrations", "Worker incarnations registered", m.registrations.clone());
        registry.register("heartbeats", "Heartbeats received", m.heartbeats.clone());
        registry.register_with_unit(
            "heartbeat_lateness",
            "How much later than one heartbeat interval after its previous beat a worker's beat arrived",
            prometheus_client::registry::Unit::Seconds,
            m.beat_lateness.clone(),
        );
        registry.register("batch_inputs", "Inputs per coordinator batch (group commit)", m.batch_inputs.clone());
        registry.register_with_unit(
            "commit_duration",
            "Time of one durable commit (write and fsync) of the storage pipeline",
            prometheus_client::registry::Unit::Seconds,
            m.commit_seconds.clone(),
        );
        CoordinatorMetrics { registry, ..m }
    }

    /// The OpenMetrics text of every series.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts what a released batch's history events show.
    pub(crate) fn observe_event(&self, event: &HistoryEvent) {
        match event {
            HistoryEvent::Leased { .. } => {
                self.leases.inc();
            }
            HistoryEvent::Requeued { error, .. } => {
                self.requeued.get_or_create(&label("reason", requeue_reason(error))).inc();
            }
            HistoryEvent::DeadLettered { .. } => {
                self.dead_lettered.inc();
            }
            HistoryEvent::Committed { .. } => {
                self.committed.inc();
            }
            HistoryEvent::DeclaredFailed { .. } => {
                self.declared_failed.inc();
            }
            HistoryEvent::Registered { .. } => {
                self.registrations.inc();
            }
            _ => {}
        }
    }

    /// Counts a submit's verdict.
    pub(crate) fn observe_verdict(&self, verdict: SubmitVerdict) {
        let name = match verdict {
            SubmitVerdict::Accepted => "accepted",
            SubmitVerdict::Duplicate => "duplicate",
            SubmitVerdict::Stale => "stale",
            SubmitVerdict::Refused => "refused",
        };
        self.verdicts.get_or_create(&label("verdict", name)).inc();
    }

    /// A heartbeat arrived `late_s` seconds past one interval after its worker's
    /// previous one (0 when on time or the first).
    pub(crate) fn observe_beat(&self, late_s: f64) {
        self.heartbeats.inc();
        self.beat_lateness.observe(late_s.max(0.0));
    }

    /// A batch of `inputs` inputs was applied.
    pub(crate) fn observe_batch(&self, inputs: usize) {
        self.batch_inputs.observe(inputs as f64);
    }

    /// One durable commit took `seconds`.
    pub(crate) fn observe_commit(&self, seconds: f64) {
        self.commit_seconds.observe(seconds);
    }

    /// Sets the gauges from a status page (totals and latencies).
    pub(crate) fn refresh(&self, page: &StatusPage) {
        let t = &page.totals;
        for (state, n) in [("active", t.workers_active), ("draining", t.workers_draining), ("failed", t.workers_failed)]
        {
            self.workers.get_or_create(&label("state", state)).set(i64::from(n));
        }
        let c = &t.tasks;
        for (state, n) in [
            ("queued", c.queued),
            ("leased", c.leased),
            ("committed", c.committed),
            ("dead_lettered", c.dead_lettered),
            ("cancelled", c.cancelled),
        ] {
            self.tasks.get_or_create(&label("state", state)).set(i64::from(n));
        }
        for (phase, n) in [("open", t.jobs_open), ("active", t.jobs_active), ("finished", t.jobs_finished)] {
            self.jobs.get_or_create(&label("phase", phase)).set(i64::from(n));
        }
        for (plugin, n) in &page.plugin_restarts {
            self.plugin_restarts.get_or_create(&label("plugin", plugin)).set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        for l in page.latencies.iter().filter(|l| l.metric == rollout_core::protocol::metric::TASK_LATENCY_US) {
            for (q, us) in [("0.5", l.p50_us), ("0.9", l.p90_us), ("0.99", l.p99_us), ("1", l.max_us)] {
                let labels = [("plugin", l.plugin.clone()), ("quantile", q.to_owned())];
                self.task_run_seconds.get_or_create(&labels).set(us as f64 / 1e6);
            }
        }
    }
}

/// The reason label of a re-queue, from its error text (the machine's words).
fn requeue_reason(error: &str) -> &'static str {
    if error.contains("closed its connection") {
        "worker_closed"
    } else if error.contains("declared failed") {
        "worker_failed"
    } else if error.contains("registered again") {
        "worker_reregistered"
    } else if error.is_empty() || error.contains("lost in transit") {
        "assignment_lost"
    } else if error.contains("without its worker at recovery") {
        "recovery"
    } else if error.contains("exceeds limits.max_result_bytes") {
        "result_too_large"
    } else {
        "task_failed"
    }
}

fn call_histogram() -> Histogram {
    Histogram::new(seconds_buckets())
}

impl std::fmt::Debug for CoordinatorMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorMetrics").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

/// A worker's series.
pub struct WorkerMetrics {
    registry: Registry,
    slots: Gauge,
    running: Gauge,
    registered: Gauge,
    calls: Family<[(&'static str, String); 2], Counter>,
    call_seconds: Family<Label, Histogram, fn() -> Histogram>,
    register_attempts: Counter,
    register_failures: Counter,
    fences: Counter,
    beats_acked: Counter,
    beat_rtt: Histogram,
    blob_fetches: Counter,
    blob_fetch_bytes: Counter,
    blob_cache_bytes: Gauge,
    plugin_restarts: Family<Label, Counter>,
}

impl WorkerMetrics {
    /// Every series registered; `slots` set.
    pub fn new(slots: u32) -> Self {
        let mut registry = Registry::with_prefix("rollout_worker");
        let m = WorkerMetrics {
            registry: Registry::default(),
            slots: Gauge::default(),
            running: Gauge::default(),
            registered: Gauge::default(),
            calls: Family::default(),
            call_seconds: Family::new_with_constructor(call_histogram),
            register_attempts: Counter::default(),
            register_failures: Counter::default(),
            fences: Counter::default(),
            beats_acked: Counter::default(),
            beat_rtt: Histogram::new(seconds_buckets()),
            blob_fetches: Counter::default(),
            blob_fetch_bytes: Counter::default(),
            blob_cache_bytes: Gauge::default(),
            plugin_restarts: Family::default(),
        };
        m.slots.set(i64::from(slots));
        registry.register("slots", "Tasks this worker runs at once", m.slots.clone());
        registry.register("running", "Plugin calls running now", m.running.clone());
        registry.register("registered", "1 while registered with the coordinator, else 0", m.registered.clone());
        registry.register("plugin_calls", "Plugin calls ended, by plugin and outcome", m.calls.clone());
        registry.register_with_unit(
            "plugin_call_duration",
            "Plugin call time, start to end, by plugin",
            prometheus_client::registry::Unit::Seconds,
            m.call_seconds.clone(),
        );
        registry.register("register_attempts", "Registrations sent", m.register_attempts.clone());
        registry.register(
            "register_failures",
            "Registrations that got no answer (coordinator unreachable or restarting)",
            m.register_failures.clone(),
        );
        registry.register("fences", "Incarnations this worker ended itself (self-fence)", m.fences.clone());
        registry.register("heartbeats_acked", "Heartbeats the coordinator acknowledged", m.beats_acked.clone());
        registry.register_with_unit(
            "heartbeat_round_trip",
            "Time from a heartbeat's send to its acknowledgement",
            prometheus_client::registry::Unit::Seconds,
            m.beat_rtt.clone(),
        );
        registry.register("blob_fetches", "Input blobs downloaded into the cache", m.blob_fetches.clone());
        registry.register("blob_fetch_bytes", "Bytes of input blobs downloaded", m.blob_fetch_bytes.clone());
        registry.register("blob_cache_bytes", "Bytes of blobs in the cache now", m.blob_cache_bytes.clone());
        registry.register(
            "plugin_restarts",
            "Sidecar processes started again (after a crash, or a kill of a call that would not stop), by plugin",
            m.plugin_restarts.clone(),
        );
        WorkerMetrics { registry, ..m }
    }

    pub(crate) fn plugin_restarted(&self, plugin: &str, count: u64) {
        self.plugin_restarts.get_or_create(&label("plugin", plugin)).inc_by(count);
    }

    pub(crate) fn blob_fetched(&self, bytes: u64) {
        self.blob_fetches.inc();
        self.blob_fetch_bytes.inc_by(bytes);
    }

    pub(crate) fn set_blob_cache_bytes(&self, bytes: u64) {
        self.blob_cache_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text of every series.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub(crate) fn call_started(&self) {
        self.running.inc();
    }

    pub(crate) fn call_ended(&self, plugin: &str, outcome: &'static str, seconds: f64) {
        self.running.dec();
        self.calls.get_or_create(&[("plugin", plugin.to_owned()), ("outcome", outcome.to_owned())]).inc();
        self.call_seconds.get_or_create(&label("plugin", plugin)).observe(seconds);
    }

    pub(crate) fn register_sent(&self) {
        self.register_attempts.inc();
    }

    pub(crate) fn register_failed(&self) {
        self.register_failures.inc();
    }

    pub(crate) fn set_registered(&self, registered: bool) {
        self.registered.set(i64::from(registered));
    }

    pub(crate) fn fenced(&self) {
        self.fences.inc();
    }

    pub(crate) fn beat_acked(&self, rtt_s: f64) {
        self.beats_acked.inc();
        self.beat_rtt.observe(rtt_s);
    }
}

/// What `/metrics` serves.
pub type Encoder = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` (OpenMetrics text of `encode()`), and the routes of `extra`
/// (the coordinator's dashboard), on `addr`, until the returned task is aborted or the
/// runtime stops. Returns the bound address (`addr` may have port 0).
pub async fn serve_metrics(
    addr: &str,
    encode: Encoder,
    extra: Option<axum::Router>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::config_invalid("metrics.listen_addr", format!("cannot listen on {addr}: {e}")))?;
    let bound = listener.local_addr().map_err(|e| Error::internal(format!("metrics listener address: {e}")))?;
    let app = extra.unwrap_or_default().route(
        "/metrics",
        axum::routing::get(move || {
            let encode = Arc::clone(&encode);
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    encode(),
                )
            }
        }),
    );
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(channel = "metrics", error = %e, "metrics listener stopped");
        }
    });
    tracing::info!(channel = "metrics", event = "metrics_listening", addr = %bound, "serving /metrics on http://{bound}/metrics");
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_every_series_with_units_and_labels() {
        let m = CoordinatorMetrics::new();
        m.observe_event(&HistoryEvent::Requeued {
            task: rollout_core::TaskId::new(rollout_core::JobId(1), 0),
            attempt: rollout_core::Attempt(1),
            error: "worker w1 (incarnation inc-1) closed its connection".into(),
        });
        m.observe_verdict(SubmitVerdict::Stale);
        m.observe_commit(0.002);
        let text = m.encode();
        for line in [
            "rollout_requeued_total{reason=\"worker_closed\"} 1",
            "rollout_submits_total{verdict=\"stale\"} 1",
            "rollout_commit_duration_seconds_count 1",
            "# TYPE rollout_leases counter",
            "# UNIT rollout_heartbeat_lateness_seconds seconds",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn requeue_reasons_follow_the_machines_words() {
        assert_eq!(requeue_reason("worker w1 (incarnation inc-3) was declared failed"), "worker_failed");
        assert_eq!(requeue_reason(""), "assignment_lost");
        assert_eq!(requeue_reason("ValueError: boom"), "task_failed");
        assert_eq!(requeue_reason("worker w1 registered again; incarnation inc-2 ended"), "worker_reregistered");
    }
}
