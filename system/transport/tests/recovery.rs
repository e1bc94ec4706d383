//! The runtime under failures, over loopback TCP with mutual TLS and fast health
//! settings: a coordinator that crashes and restarts, a worker cut off from its
//! coordinator (it must fence itself, then rejoin), and a worker that vanishes (its
//! connection closes, so its tasks must be re-leased at once and finished by the other).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rollout_core::history::{HistoryEvent, HistoryRecord};
use rollout_core::{Config, WorkerId};
use rollout_proto::transport as pb;
use rollout_transport::{
    BuiltinPlugins, CoordinatorOptions, MemoryEmitter, RunningCoordinator, WorkerOptions, operator_client,
    run_worker_process, start_coordinator,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

struct Harness {
    _dir: tempfile::TempDir,
    config: Config,
    addr: String,
    coordinator: Option<RunningCoordinator>,
    history: Arc<MemoryEmitter>,
    worker_history: Arc<MemoryEmitter>,
    stop_workers: watch::Sender<bool>,
    workers: BTreeMap<String, JoinHandle<rollout_core::Result<()>>>,
}

impl Harness {
    async fn start(workers: &[&str]) -> Harness {
        let mut h = Harness::certified(workers).await;
        for (i, w) in workers.iter().enumerate() {
            h.spawn_worker(w, i as u64);
        }
        h
    }

    /// A coordinator, and certificates for `workers` (none started).
    async fn certified(workers: &[&str]) -> Harness {
        let common::Started { dir, config, addr, coordinator, history } =
            common::start(common::fast_config(), workers).await;
        let (stop_workers, _) = watch::channel(false);
        Harness {
            _dir: dir,
            config,
            addr,
            coordinator: Some(coordinator),
            history,
            worker_history: Arc::new(MemoryEmitter::new()),
            stop_workers,
            workers: BTreeMap::new(),
        }
    }

    fn spawn_worker(&mut self, id: &str, seed: u64) {
        self.spawn_worker_with(id, seed, self.config.clone());
    }

    fn spawn_worker_with(&mut self, id: &str, seed: u64, config: Config) {
        let opts = WorkerOptions {
            config,
            id: WorkerId::new(id).expect("id"),
            slots: 4,
            plugins: Arc::new(BuiltinPlugins),
            emitter: self.worker_history.clone(),
            coordinator_addr: Some(self.addr.clone()),
            cert: None,
            rng_seed: Some(seed),
        };
        let task = tokio::spawn(run_worker_process(opts, self.stop_workers.subscribe()));
        self.workers.insert(id.to_owned(), task);
    }

    async fn crash_coordinator(&mut self) {
        if let Some(c) = self.coordinator.take() {
            c.abort().await;
        }
    }

    async fn restart_coordinator(&mut self) {
        // An aborted server may hold its port, and its database handle, for a moment while
        // its tasks unwind.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let started = start_coordinator(CoordinatorOptions {
                config: self.config.clone(),
                emitter: self.history.clone(),
                listen_addr: Some(self.addr.clone()),
            })
            .await;
            match started {
                Ok(coordinator) => {
                    self.coordinator = Some(coordinator);
                    return;
                }
                Err(e)
                    if tokio::time::Instant::now() < deadline
                        && (e.to_string().contains("in use") || e.to_string().contains("already open")) =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("coordinator restarts on the same address and data: {e}"),
            }
        }
    }

    async fn submit_sleep_job(&self, tasks: u32, sleep_ms: u64) -> u64 {
        let mut operator = operator_client(&self.config, "ops", Some(&self.addr)).expect("operator");
        let tasks = (0..tasks)
            .map(|_| pb::TaskSpec {
                plugin: "sleep".into(),
                method: "run".into(),
                payload: sleep_ms.to_string().into_bytes(),
                gpus: 0,
                deadline_ms: 30_000,
                inputs: Vec::new(),
            })
            .collect();
        let request = pb::SubmitJobRequest { name: "sleepers".into(), tasks, idempotency_key: String::new() };
        operator.submit_job(request).await.expect("job accepted").into_inner().job
    }

    /// Waits until every task of `job` is committed (operator calls retry while the
    /// coordinator is down).
    async fn wait_committed(&self, job: u64, tasks: u32, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let mut operator = operator_client(&self.config, "ops", Some(&self.addr)).expect("operator");
        loop {
            if let Ok(status) = operator.status(pb::StatusRequest::default()).await {
                let status = status.into_inner();
                if status.jobs.iter().any(|j| j.job == job && j.committed == tasks) {
                    return;
                }
                assert!(tokio::time::Instant::now() < deadline, "job {job} unfinished: {:?}", status.jobs);
            }
            assert!(tokio::time::Instant::now() < deadline, "job {job} unfinished; coordinator unreachable");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for(&self, within: Duration, what: &str, found: impl Fn(&[HistoryRecord], &[HistoryRecord]) -> bool) {
        let deadline = tokio::time::Instant::now() + within;
        while !found(&self.history.records(), &self.worker_history.records()) {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until w1 and w2 have both started tasks.
    async fn wait_both_running(&self) {
        self.wait_for(Duration::from_secs(10), "both workers to run tasks", |_, w| {
            let on = |id: &str| {
                w.iter().any(|r| matches!(&r.event, HistoryEvent::TaskStarted { worker, .. } if worker.as_str() == id))
            };
            on("w1") && on("w2")
        })
        .await;
    }

    fn assert_each_task_committed_at_most_once(&self) {
        let mut commits: BTreeMap<String, u32> = BTreeMap::new();
        for r in self.history.records() {
            if let HistoryEvent::Committed { task, .. } = r.event {
                *commits.entry(task.to_string()).or_default() += 1;
            }
        }
        assert!(commits.values().all(|&n| n == 1), "a task committed twice: {commits:?}");
    }

    async fn stop(mut self) {
        let _ = self.stop_workers.send(true);
        for (_, w) in std::mem::take(&mut self.workers) {
            let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
        }
        if let Some(c) = self.coordinator.take() {
            c.shutdown().await.expect("clean shutdown");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_survives_a_coordinator_crash_and_restart() {
    let mut h = Harness::start(&["w1", "w2"]).await;
    let job = h.submit_sleep_job(40, 100).await;
    h.wait_for(Duration::from_secs(10), "the first commits", |c, _| {
        c.iter().any(|r| matches!(r.event, HistoryEvent::Committed { .. }))
    })
    .await;
    h.crash_coordinator().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.restart_coordinator().await;
    h.wait_committed(job, 40, Duration::from_secs(30)).await;
    h.assert_each_task_committed_at_most_once();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_worker_fences_itself_then_rejoins() {
    let mut h = Harness::start(&["w1"]).await;
    h.submit_sleep_job(1, 20_000).await;
    h.wait_for(Duration::from_secs(10), "the task to start", |_, w| {
        w.iter().any(|r| matches!(r.event, HistoryEvent::TaskStarted { .. }))
    })
    .await;
    let cut_at = tokio::time::Instant::now();
    h.crash_coordinator().await;
    // The broken Work stream ends the incarnation at once (WorkerInput::StreamBroken(Channel::Work))
    // were the connection only silent, the self-fence deadline would.
    h.wait_for(Duration::from_secs(5), "the worker to fence itself", |_, w| {
        w.iter().any(|r| matches!(r.event, HistoryEvent::SelfFenced { .. }))
    })
    .await;
    let fenced_after = cut_at.elapsed();
    assert!(fenced_after <= Duration::from_millis(800 + 1200), "fenced {fenced_after:?} after the cut");
    h.wait_for(Duration::from_secs(2), "the cancelled run to stop", |_, w| {
        w.iter().any(|r| matches!(r.event, HistoryEvent::TaskStopped { .. }))
    })
    .await;

    h.restart_coordinator().await;
    h.wait_for(Duration::from_secs(10), "the worker to register again", |c, _| {
        c.iter().filter(|r| matches!(r.event, HistoryEvent::Registered { .. })).count() >= 2
    })
    .await;
    h.stop().await;
}

/// A worker whose connection closes (its process is gone: here its runtime task is
/// dropped, which closes the connection as a killed process's kernel would) has its
/// tasks leased elsewhere at once, not at its deadline (1 s past due here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tasks_of_a_worker_whose_connection_closed_are_leased_elsewhere_at_once() {
    let mut h = Harness::start(&["w1", "w2"]).await;
    let job = h.submit_sleep_job(16, 300).await;
    h.wait_both_running().await;
    let gone_at = tokio::time::Instant::now();
    if let Some(w1) = h.workers.remove("w1") {
        w1.abort();
    }
    h.wait_for(Duration::from_secs(10), "w1 to be declared failed", |c, _| {
        c.iter().any(|r| matches!(&r.event, HistoryEvent::DeclaredFailed { worker, .. } if worker.as_str() == "w1"))
    })
    .await;
    let detected_after = gone_at.elapsed();
    // The deadline rule could not have fired yet: the last beat's due_at (up to 200 ms
    // ahead) plus the failure timeout of 1 s.
    assert!(detected_after < Duration::from_millis(1000), "declared failed after {detected_after:?}");
    let requeued: Vec<String> = h
        .history
        .records()
        .iter()
        .filter_map(|r| match &r.event {
            HistoryEvent::Requeued { error, .. } => Some(error.clone()),
            _ => None,
        })
        .collect();
    assert!(
        !requeued.is_empty() && requeued.iter().all(|e| e.contains("w1") && e.contains("closed its connection")),
        "{requeued:?}"
    );
    h.wait_committed(job, 16, Duration::from_secs(30)).await;
    h.assert_each_task_committed_at_most_once();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_follows_the_coordinators_health_settings_over_its_own() {
    let mut h = Harness::certified(&["w1"]).await;
    // The worker's own config has the seed values (beat every 500 ms, fence after 4 s);
    // the coordinator's says 100 ms and 800 ms.
    let mut own = h.config.clone();
    own.health = rollout_core::config::HealthConfig::default();
    assert_eq!(own.health.heartbeat_interval, Duration::from_millis(500));
    h.spawn_worker_with("w1", 1, own);
    h.wait_for(Duration::from_secs(10), "w1 to register", |c, _| {
        c.iter().any(|r| matches!(r.event, HistoryEvent::Registered { .. }))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Every beat announces due_at = wall_now + 2 × heartbeat_interval: 200 ms ahead on
    // the coordinator's schedule, 1 000 ms on the worker's own.
    let mut operator = operator_client(&h.config, "ops", Some(&h.addr)).expect("operator");
    let status = operator.status(pb::StatusRequest::default()).await.expect("status").into_inner();
    let w1 = status.workers.iter().find(|w| w.worker_id == "w1").expect("w1 listed");
    let ahead = w1.due_at_unix_ms.saturating_sub(w1.last_beat_unix_ms);
    assert!((150..=400).contains(&ahead), "due_at is {ahead} ms past the last beat: {w1:?}");
    h.stop().await;
}
