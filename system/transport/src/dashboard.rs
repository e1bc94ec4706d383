//! The coordinator's live web dashboard, served beside `/metrics` on the same loopback
//! listener: one page (`/`, HTML, CSS and JavaScript embedded in the binary: no CDN, no
//! network at run time), a JSON snapshot (`/api/status`), and a Server-Sent Events
//! stream (`/api/events`) that carries the snapshot once a second and the events that
//! matter (registrations, declared failures, stale submits, dead letters, drains, jobs
//! accepted and expired) as they are released.
//!
//! Like the metrics, it never reaches the driver or the commit path: the driver
//! publishes a snapshot (at most once a second, with the gauges) and sends events into
//! a bounded broadcast channel as it releases a batch; a slow browser misses events
//! (it is told how many) and never holds anything up. Read-only: there is no route that
//! changes anything.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse};
use futures_util::Stream;
use rollout_coordinator::{JobPhase, StatusPage, WorkerState};
use rollout_core::history::HistoryEvent;
use rollout_core::time::unix_millis;
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// The page.
const INDEX_HTML: &str = include_str!("dashboard/index.html");
/// Events kept for a browser that connects later.
const RECENT_EVENTS_MAX: usize = 200;
/// Events a browser may fall behind by before it misses some.
const EVENT_BACKLOG: usize = 1024;
/// Throughput and latency samples kept (one per refresh: ten minutes).
const SAMPLES_MAX: usize = 600;
/// How often the stream carries the snapshot.
const STATUS_EVERY: Duration = Duration::from_secs(1);

/// One point of the charts.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at_ms: u64,
    committed: u64,
    /// Echo-or-first plugin's run-time percentiles, µs.
    p50_us: u64,
    p99_us: u64,
}

/// What the driver publishes and the listener serves.
#[derive(Debug)]
pub struct Dashboard {
    /// Each worker's certificate as it registered (serial, expiry), for the workers table.
    certs: Option<Arc<crate::service::WorkerCerts>>,
    snapshot: Mutex<Arc<String>>,
    samples: Mutex<VecDeque<Sample>>,
    recent: Mutex<VecDeque<Arc<String>>>,
    events: broadcast::Sender<Arc<String>>,
}

impl Default for Dashboard {
    fn default() -> Self {
        Self::new()
    }
}

impl Dashboard {
    /// Empty: no snapshot yet, no events.
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        Dashboard {
            certs: None,
            snapshot: Mutex::new(Arc::new("{}".into())),
            samples: Mutex::new(VecDeque::new()),
            recent: Mutex::new(VecDeque::new()),
            events,
        }
    }

    /// Shows each worker's certificate expiry from `certs`.
    pub fn with_worker_certs(mut self, certs: Arc<crate::service::WorkerCerts>) -> Self {
        self.certs = Some(certs);
        self
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The latest snapshot, as JSON.
    pub fn snapshot(&self) -> Arc<String> {
        Arc::clone(&Self::lock(&self.snapshot))
    }

    /// Publishes a status page taken at `now` (with its chart sample).
    pub(crate) fn publish(&self, page: &StatusPage, now: SystemTime) {
        let now_ms = unix_millis(now);
        let latency = page
            .latencies
            .iter()
            .filter(|l| l.metric == rollout_core::protocol::metric::TASK_LATENCY_US)
            .max_by_key(|l| l.count);
        let sample = Sample {
            at_ms: now_ms,
            committed: u64::from(page.totals.tasks.committed),
            p50_us: latency.map_or(0, |l| l.p50_us),
            p99_us: latency.map_or(0, |l| l.p99_us),
        };
        let samples: Vec<Value> = {
            let mut samples = Self::lock(&self.samples);
            if samples.len() >= SAMPLES_MAX {
                samples.pop_front();
            }
            samples.push_back(sample);
            samples
                .iter()
                .map(|s| json!({"at_ms": s.at_ms, "committed": s.committed, "p50_us": s.p50_us, "p99_us": s.p99_us}))
                .collect()
        };
        let text = status_json(page, now_ms, samples, self.certs.as_deref()).to_string();
        *Self::lock(&self.snapshot) = Arc::new(text);
    }

    /// Sends an event a batch released, if it is one the dashboard shows.
    pub(crate) fn event(&self, event: &HistoryEvent, now: SystemTime) {
        let Some((kind, text)) = describe(event) else { return };
        let line = Arc::new(json!({"at_ms": unix_millis(now), "kind": kind, "text": text}).to_string());
        {
            let mut recent = Self::lock(&self.recent);
            if recent.len() >= RECENT_EVENTS_MAX {
                recent.pop_front();
            }
            recent.push_back(Arc::clone(&line));
        }
        // No receiver is fine: nobody is looking.
        let _ = self.events.send(line);
    }

    /// The SSE stream of one browser: the recent events, then a `status` event every
    /// second and each new event as it comes.
    fn stream(self: Arc<Self>) -> impl Stream<Item = Result<Event, Infallible>> + Send + 'static {
        let recent: Vec<Arc<String>> = Self::lock(&self.recent).iter().cloned().collect();
        let receiver = self.events.subscribe();
        let state = (self, receiver, recent.into_iter(), tokio::time::interval(STATUS_EVERY));
        futures_util::stream::unfold(state, |(dash, mut receiver, mut recent, mut tick)| async move {
            if let Some(line) = recent.next() {
                let event = Event::default().event("event").data(line.as_str());
                return Some((Ok(event), (dash, receiver, recent, tick)));
            }
            let event = tokio::select! {
                _ = tick.tick() => Event::default().event("status").data(dash.snapshot().as_str()),
                received = receiver.recv() => match received {
                    Ok(line) => Event::default().event("event").data(line.as_str()),
                    Err(broadcast::error::RecvError::Lagged(missed)) => Event::default()
                        .event("event")
                        .data(json!({"kind": "missed", "text": format!("{missed} events missed (this browser fell behind)")}).to_string()),
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            };
            Some((Ok(event), (dash, receiver, recent, tick)))
        })
    }

    /// The dashboard's routes.
    pub fn routes(self: &Arc<Self>) -> axum::Router {
        let (for_status, for_events) = (Arc::clone(self), Arc::clone(self));
        axum::Router::new()
            .route("/", axum::routing::get(|| async { Html(INDEX_HTML) }))
            .route(
                "/api/status",
                axum::routing::get(move || {
                    let dash = Arc::clone(&for_status);
                    async move {
                        ([(axum::http::header::CONTENT_TYPE, "application/json")], dash.snapshot().as_str().to_owned())
                            .into_response()
                    }
                }),
            )
            .route(
                "/api/events",
                axum::routing::get(move || {
                    let dash = Arc::clone(&for_events);
                    async move { Sse::new(dash.stream()).keep_alive(KeepAlive::default()) }
                }),
            )
    }
}

/// The events the dashboard lists: kind and a line of text.
fn describe(event: &HistoryEvent) -> Option<(&'static str, String)> {
    Some(match event {
        HistoryEvent::Registered { worker, incarnation } => {
            ("registered", format!("{worker} registered as {incarnation}"))
        }
        HistoryEvent::DeclaredFailed { worker, incarnation } => {
            ("declared_failed", format!("{worker} ({incarnation}) declared failed; its leases re-queued"))
        }
        HistoryEvent::StaleRejected { task, worker, token } => {
            ("stale_rejected", format!("stale submit of {task} from {worker} (token {token}) rejected"))
        }
        HistoryEvent::DeadLettered { task, attempts } => {
            ("dead_lettered", format!("{task} dead-lettered after {attempts} attempts"))
        }
        HistoryEvent::Drained { worker } => ("drained", format!("{worker} told to drain")),
        HistoryEvent::JobAccepted { job, tasks } => ("job_accepted", format!("{job} accepted with {tasks} tasks")),
        HistoryEvent::JobExpired { job } => ("job_expired", format!("{job} expired (retention)")),
        _ => return None,
    })
}

fn ms(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, |t| json!(unix_millis(t)))
}

/// The snapshot's JSON (stable field names; the page and the browser test read them).
fn status_json(
    page: &StatusPage,
    now_ms: u64,
    samples: Vec<Value>,
    certs: Option<&crate::service::WorkerCerts>,
) -> Value {
    let t = &page.totals;
    json!({
        "now_ms": now_ms,
        "totals": {
            "workers_active": t.workers_active, "workers_draining": t.workers_draining,
            "workers_failed": t.workers_failed, "jobs_open": t.jobs_open, "jobs_active": t.jobs_active,
            "jobs_finished": t.jobs_finished, "tasks_queued": t.tasks.queued, "tasks_leased": t.tasks.leased,
            "tasks_committed": t.tasks.committed, "tasks_dead_lettered": t.tasks.dead_lettered,
            "tasks_cancelled": t.tasks.cancelled,
        },
        "workers": page.workers.iter().map(|w| json!({
            "id": w.id.as_str(),
            "incarnation": w.incarnation.get(),
            "state": match w.state {
                WorkerState::Active => "active",
                WorkerState::Draining => "draining",
                WorkerState::Failed => "failed",
            },
            "last_beat_ms": ms(w.last_beat),
            "due_at_ms": unix_millis(w.due_at),
            "clock_offset_ms": w.clock_offset_ms,
            "cert_not_after_ms": certs.and_then(|c| c.of(&w.id)).map(|c| unix_millis(c.not_after)),
            "running": w.leased,
            "slots": w.slots,
            "gpus": w.inventory.gpus.len(),
            "plugins": w.plugins,
        })).collect::<Vec<_>>(),
        "workers_more": page.workers_more,
        "jobs": page.jobs.iter().map(|j| json!({
            "job": j.job.to_string(),
            "name": j.name,
            "phase": match j.phase {
                JobPhase::Open => "open",
                JobPhase::Active => "active",
                JobPhase::Finished => "finished",
            },
            "tasks": j.tasks, "queued": j.queued, "leased": j.leased, "committed": j.committed,
            "dead_lettered": j.dead_lettered, "cancelled": j.cancelled,
            "finished_at_ms": ms(j.finished_at),
        })).collect::<Vec<_>>(),
        "latencies": page.latencies.iter().map(|l| json!({
            "metric": l.metric, "plugin": l.plugin, "count": l.count, "p50_us": l.p50_us, "p90_us": l.p90_us,
            "p99_us": l.p99_us, "max_us": l.max_us,
        })).collect::<Vec<_>>(),
        "samples": samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshot_and_the_events_carry_what_the_page_reads() {
        let dash = Dashboard::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        dash.publish(&StatusPage::default(), now);
        let snapshot: Value = serde_json::from_str(&dash.snapshot()).expect("json");
        for key in ["now_ms", "totals", "workers", "jobs", "latencies", "samples"] {
            assert!(snapshot.get(key).is_some(), "{key} missing from {snapshot}");
        }
        assert_eq!(snapshot["samples"].as_array().map(Vec::len), Some(1));
        let worker = rollout_core::WorkerId::new("w1").expect("id");
        dash.event(&HistoryEvent::DeclaredFailed { worker, incarnation: rollout_core::Incarnation(3) }, now);
        // A lease is no event the page lists.
        let task = rollout_core::TaskId::new(rollout_core::JobId(0), 0);
        let leased = HistoryEvent::Leased {
            task,
            worker: rollout_core::WorkerId::new("w2").expect("id"),
            token: rollout_core::FencingToken(1),
            attempt: rollout_core::Attempt(1),
        };
        dash.event(&leased, now);
        let recent: Vec<Arc<String>> = Dashboard::lock(&dash.recent).iter().cloned().collect();
        assert_eq!(recent.len(), 1);
        let e: Value = serde_json::from_str(&recent[0]).expect("json");
        assert_eq!(e["kind"], "declared_failed");
        assert!(e["text"].as_str().is_some_and(|t| t.contains("w1") && t.contains("inc-3")), "{e}");
    }
}
