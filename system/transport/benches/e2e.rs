//! End-to-end throughput and latency of the real runtime (`make bench`).
//!
//! One coordinator and two workers in this process, talking gRPC over loopback TCP
//! under mutual TLS, with durable commits (redb on disk, fsync per batch) and the
//! built-in no-op plugins (`echo` in place, `sleep 0` on the blocking pool). Nothing is mocked: certificates, the services, the
//! drivers, the machines and storage are the ones `rollout coordinator|worker` run.
//!
//! Two measurements, each on a fresh cluster in a fresh temp dir:
//!
//! 1. **Throughput**: `BENCH_TASKS` tasks (default 200,000) submitted as jobs of
//!    `BENCH_JOB_TASKS` (default 10,000) as fast as the operator API takes them; the
//!    clock runs from the first submit to the last commit. Repeated `BENCH_RUNS` times
//!    (default 3); the median is quoted.
//! 2. **Latency**: an open-loop load at `BENCH_LATENCY_LOAD` (default 0.5) of the
//!    measured median throughput, in jobs of 50 tasks, for `BENCH_LATENCY_SECS`
//!    (default 5) seconds; submit-to-start is the time from just before a job's submit
//!    RPC to the worker's `task_started` event of each of its tasks. p50/p99 quoted.
//!
//! `BENCH_NOOPS=echo|sleep0|both` (default both) picks the throughput workloads;
//! `BENCH_WAL_BYTES` sets `storage.wal_bytes` (0: no write-ahead log).
//!
//! Baseline in the same run: the raw cost of a durable commit on this disk (one
//! fsync'd empty redb transaction), so the numbers can be read against the machine.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rollout_core::history::{HistoryEvent, HistoryRecord};
use rollout_core::traits::{EventEmitter, Storage};
use rollout_core::{Config, JobId, TaskId, WorkerId};
use rollout_proto::transport as pb;
use rollout_transport::{
    BuiltinPlugins, CoordinatorOptions, RunningCoordinator, WorkerOptions, ensure_dev_ca, issue_client_cert,
    issue_operator_cert, issue_server_cert, operator_client, run_worker_process, start_coordinator,
};
use tokio::sync::{Notify, watch};

const WORKERS: [&str; 2] = ["w1", "w2"];
const SLOTS: u32 = 512;
const LATENCY_JOB_TASKS: u32 = 50;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v}: expected a whole number")),
        Err(_) => default,
    }
}

fn env_f64(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v}: expected a number")),
        Err(_) => default,
    }
}

/// Counts commits (coordinator side) and wakes the waiter at a target.
#[derive(Default)]
struct Commits {
    count: AtomicU64,
    target: AtomicU64,
    reached: Notify,
}

impl EventEmitter for Commits {
    fn emit(&self, record: &HistoryRecord) {
        if matches!(record.event, HistoryEvent::Committed { .. }) {
            let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= self.target.load(Ordering::Relaxed) {
                self.reached.notify_one();
            }
        }
    }
}

/// When each task started (worker side).
#[derive(Default)]
struct Starts(Mutex<Vec<(TaskId, Instant)>>);

impl EventEmitter for Starts {
    fn emit(&self, record: &HistoryRecord) {
        if let HistoryEvent::TaskStarted { task, .. } = record.event {
            let now = Instant::now();
            self.0.lock().expect("starts lock").push((task, now));
        }
    }
}

struct Cluster {
    _dir: tempfile::TempDir,
    config: Config,
    addr: String,
    coordinator: RunningCoordinator,
    commits: Arc<Commits>,
    starts: Arc<Starts>,
    stop_workers: watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<rollout_core::Result<()>>>,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.storage.data_dir = dir.path().join("data");
        config.transport.tls_dir = dir.path().join("tls");
        config.metrics.listen_addr = "127.0.0.1:0".into();
        // BENCH_WAL_BYTES=0 runs without the write-ahead log (every commit a durable redb
        // commit), for a same-sitting comparison.
        config.storage.wal_bytes = env_u64("BENCH_WAL_BYTES", config.storage.wal_bytes);
        let tls = &config.transport.tls_dir;
        ensure_dev_ca(tls).expect("CA");
        issue_server_cert(tls, &[]).expect("server cert");
        issue_operator_cert(tls, "ops").expect("operator cert");
        for w in WORKERS {
            issue_client_cert(tls, &WorkerId::new(w).expect("id")).expect("worker cert");
        }
        let commits = Arc::new(Commits::default());
        commits.target.store(u64::MAX, Ordering::Relaxed);
        let coordinator = start_coordinator(CoordinatorOptions {
            config: config.clone(),
            emitter: commits.clone(),
            listen_addr: Some("127.0.0.1:0".into()),
        })
        .await
        .expect("coordinator starts");
        let addr = coordinator.local_addr.to_string();
        let starts = Arc::new(Starts::default());
        let (stop_workers, _) = watch::channel(false);
        let mut workers = Vec::new();
        for (i, w) in WORKERS.iter().enumerate() {
            let opts = WorkerOptions {
                config: config.clone(),
                id: WorkerId::new(*w).expect("id"),
                slots: SLOTS,
                plugins: Arc::new(BuiltinPlugins),
                emitter: starts.clone(),
                coordinator_addr: Some(addr.clone()),
                cert: None,
                rng_seed: Some(i as u64),
            };
            workers.push(tokio::spawn(run_worker_process(opts, stop_workers.subscribe())));
        }
        let cluster = Cluster { _dir: dir, config, addr, coordinator, commits, starts, stop_workers, workers };
        cluster.wait_for_workers().await;
        cluster
    }

    async fn wait_for_workers(&self) {
        let mut operator = operator_client(&self.config, "ops", Some(&self.addr)).expect("operator");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = operator.status(pb::StatusRequest::default()).await.expect("status").into_inner();
            if status.workers.iter().filter(|w| w.state == pb::WorkerState::Active as i32).count() == WORKERS.len() {
                return;
            }
            assert!(Instant::now() < deadline, "workers did not register within 20 s: {:?}", status.workers);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Submits `tasks` echo tasks as jobs of `job_tasks`, all at once, and returns each
    /// job's id with the instant just before its submit.
    async fn submit(&self, tasks: u64, job_tasks: u32, noop: NoOp) -> Vec<(JobId, u32, Instant)> {
        let mut sends = Vec::new();
        let mut left = tasks;
        while left > 0 {
            let n = left.min(u64::from(job_tasks)) as u32;
            left -= u64::from(n);
            let mut operator = operator_client(&self.config, "ops", Some(&self.addr)).expect("operator");
            sends.push(tokio::spawn(async move {
                let request = noop_job(n, noop);
                let at = Instant::now();
                let reply = operator.submit_job(request).await.expect("submit").into_inner();
                (JobId(reply.job), n, at)
            }));
        }
        let mut jobs = Vec::new();
        for s in sends {
            jobs.push(s.await.expect("submit task"));
        }
        jobs
    }

    async fn wait_commits(&self, total: u64) {
        self.commits.target.store(total, Ordering::Relaxed);
        let deadline = Duration::from_secs(600);
        let waited = tokio::time::timeout(deadline, async {
            while self.commits.count.load(Ordering::Relaxed) < total {
                // Short naps as well as the notify: a wake-up between the check and the
                // wait is not lost for long.
                let _ = tokio::time::timeout(Duration::from_millis(50), self.commits.reached.notified()).await;
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "only {} of {total} tasks committed within {deadline:?}",
            self.commits.count.load(Ordering::Relaxed)
        );
    }

    async fn stop(self) {
        let _ = self.stop_workers.send(true);
        for w in self.workers {
            let _ = w.await;
        }
        self.coordinator.shutdown().await.expect("coordinator shuts down");
    }
}

/// The no-op task measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoOp {
    /// The built-in `echo`: runs in place on the worker's driver (no thread hand-off).
    Echo,
    /// The built-in `sleep` for 0 ms: runs on the blocking pool, like every user plugin
    /// (cdylib, Python), with its deadline timer.
    Sleep0,
}

impl NoOp {
    fn name(self) -> &'static str {
        match self {
            NoOp::Echo => "echo (in place)",
            NoOp::Sleep0 => "sleep 0 ms (blocking pool, like user plugins)",
        }
    }
}

/// A job of `tasks` no-op tasks. Echo payloads are distinct (so are the results), so
/// nothing is flattered by content addressing.
fn noop_job(tasks: u32, noop: NoOp) -> pb::SubmitJobRequest {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let first = NEXT.fetch_add(u64::from(tasks), Ordering::Relaxed);
    let tasks = (0..u64::from(tasks))
        .map(|i| pb::TaskSpec {
            plugin: match noop {
                NoOp::Echo => "echo".into(),
                NoOp::Sleep0 => "sleep".into(),
            },
            method: "run".into(),
            payload: match noop {
                NoOp::Echo => (first + i).to_le_bytes().to_vec(),
                // Equal results cost the same here: small results are written with
                // their commit, not deduplicated in the object store.
                NoOp::Sleep0 => b"0".to_vec(),
            },
            gpus: 0,
            deadline_ms: 60_000,
            inputs: Vec::new(),
        })
        .collect();
    pb::SubmitJobRequest { name: "bench".into(), tasks, idempotency_key: String::new() }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Tasks/s of one run on a fresh cluster.
async fn throughput_run(tasks: u64, job_tasks: u32, noop: NoOp) -> f64 {
    let cluster = Cluster::start().await;
    let started = Instant::now();
    let jobs = cluster.submit(tasks, job_tasks, noop).await;
    let submitted = started.elapsed();
    cluster.wait_commits(tasks).await;
    let elapsed = started.elapsed();
    let rate = tasks as f64 / elapsed.as_secs_f64();
    println!(
        "  run: {tasks} tasks in {} jobs; submits acknowledged after {:.2} s, all committed after {:.2} s: {:.0} tasks/s",
        jobs.len(),
        submitted.as_secs_f64(),
        elapsed.as_secs_f64(),
        rate
    );
    cluster.stop().await;
    rate
}

/// Submit-to-start latencies under an open-loop load of `rate` tasks/s.
async fn latency_run(rate: f64, secs: u64) -> Vec<Duration> {
    let cluster = Cluster::start().await;
    let period = Duration::from_secs_f64(f64::from(LATENCY_JOB_TASKS) / rate);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = Vec::new();
    let operator = operator_client(&cluster.config, "ops", Some(&cluster.addr)).expect("operator");
    while Instant::now() < end {
        ticker.tick().await;
        let mut operator = operator.clone();
        sends.push(tokio::spawn(async move {
            let at = Instant::now();
            let reply =
                operator.submit_job(noop_job(LATENCY_JOB_TASKS, NoOp::Echo)).await.expect("submit").into_inner();
            (JobId(reply.job), at)
        }));
    }
    let mut submitted_at = BTreeMap::new();
    for s in sends {
        let (job, at) = s.await.expect("submit task");
        submitted_at.insert(job, at);
    }
    let total = submitted_at.len() as u64 * u64::from(LATENCY_JOB_TASKS);
    cluster.wait_commits(total).await;
    let mut latencies: Vec<Duration> = {
        let starts = cluster.starts.0.lock().expect("starts lock");
        let mut first: BTreeMap<TaskId, Instant> = BTreeMap::new();
        for (task, at) in starts.iter() {
            first.entry(*task).or_insert(*at);
        }
        first
            .iter()
            .filter_map(|(task, at)| submitted_at.get(&task.job).map(|s| at.saturating_duration_since(*s)))
            .collect()
    };
    latencies.sort();
    println!("  offered {rate:.0} tasks/s for {secs} s: {} tasks started", latencies.len());
    cluster.stop().await;
    latencies
}

/// The machine's baseline: one durable (fsync'd) redb commit, median of 200.
fn fsync_baseline() -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = rollout_storage::RedbStorage::open(dir.path().join("baseline.db")).expect("open");
    let mut times = Vec::new();
    for i in 0u32..200 {
        let t = Instant::now();
        let mut txn = storage.begin_write().expect("begin");
        txn.put(b"k", &i.to_le_bytes()).expect("put");
        txn.commit().expect("commit");
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let tasks = env_u64("BENCH_TASKS", 200_000);
    let job_tasks = env_u64("BENCH_JOB_TASKS", 10_000) as u32;
    let runs = env_u64("BENCH_RUNS", 3).max(1);
    let load = env_f64("BENCH_LATENCY_LOAD", 0.5);
    let latency_secs = env_u64("BENCH_LATENCY_SECS", 5);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");

    println!(
        "e2e: 1 coordinator + 2 workers ({SLOTS} slots each), loopback TCP, mTLS, redb with fsync, built-in no-op plugins"
    );
    println!("     {cores} cores; {tasks} tasks per run in jobs of {job_tasks}; {runs} runs");
    let baseline = fsync_baseline();
    println!("baseline: one durable redb commit (fsync) takes {:.0} us (median of 200)", baseline.as_secs_f64() * 1e6);

    let mut rate = 0.0;
    let noops: Vec<NoOp> = match std::env::var("BENCH_NOOPS").as_deref() {
        Ok("echo") => vec![NoOp::Echo],
        Ok("sleep0") => vec![NoOp::Sleep0],
        Ok("both") | Err(_) => vec![NoOp::Echo, NoOp::Sleep0],
        Ok(other) => panic!("BENCH_NOOPS={other}: expected echo, sleep0 or both"),
    };
    for noop in noops {
        println!("throughput, {}:", noop.name());
        let rates: Vec<f64> = (0..runs).map(|_| runtime.block_on(throughput_run(tasks, job_tasks, noop))).collect();
        let median = median(rates);
        println!("throughput, {}: median {median:.0} tasks/s over {runs} runs", noop.name());
        if noop == NoOp::Echo {
            rate = median;
        }
    }

    if latency_secs > 0 {
        println!("latency, {}:", NoOp::Echo.name());
        let latencies = runtime.block_on(latency_run(rate * load, latency_secs));
        if latencies.is_empty() {
            println!("latency: no task started");
        } else {
            println!(
                "latency: submit-to-start at {:.0}% load ({:.0} tasks/s): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} tasks",
                load * 100.0,
                rate * load,
                percentile(&latencies, 0.5).as_secs_f64() * 1e3,
                percentile(&latencies, 0.99).as_secs_f64() * 1e3,
                latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
                latencies.len()
            );
        }
    }
}
