//! Heartbeat capacity (`make bench-heartbeats`): thousands of workers beating while
//! tasks flow, against the real `rollout` binaries.
//!
//! A `rollout coordinator` process and two `rollout worker` processes (the built-in
//! `echo`, 256 slots each) on loopback under mutual TLS, as deployed. The task load is
//! `BENCH_INFLIGHT_JOBS` (6) loops of `rollout submit` (jobs of 20,000 `echo` tasks, each
//! waited for), in processes of their own. This process is the beat load: in the second
//! phase, `BENCH_WORKERS` (10,000) more workers, each with
//! its own certificate and its own HTTP/2 connection, registered for a plugin no task
//! names and beating every `BENCH_BEAT_MS` (500 ms, the default heartbeat interval) on a
//! fixed schedule with a random phase, as real workers do.
//!
//! 1. **Baseline**: tasks/s over `BENCH_SECS` (10) seconds with the two task workers only.
//! 2. **Under beats**: the same with every beating worker connected: beats/s sustained,
//!    beat round trip p50/p99/max (the client's send to its answer), tasks/s and its
//!    ratio to the baseline, the coordinator's CPU, and whether any beating worker was
//!    declared failed (none may be: a beat late past the failure timeout would be).
//!
//! Targets (issue 15): ≥ 20,000 beats/s (10,000 workers) with beat p99 ≤ 50 ms. This
//! process and the coordinator share the machine's cores: the beats' client side (TLS,
//! HTTP/2, protobuf for 10,000 connections) is load on the same CPUs, as the bench says.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use rollout_core::{PROTOCOL_VERSION, WorkerId};
use rollout_proto::transport as pb;
use rollout_proto::transport::coordinator_client::CoordinatorClient;
use rollout_proto::transport::operator_client::OperatorClient;
use rollout_transport::{CertFiles, connect, ensure_dev_ca, issue_client_cert, issue_operator_cert, issue_server_cert};
use tonic::transport::Channel;

/// Tasks per job of the task load.
const JOB_TASKS: u32 = 20_000;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v}: expected a whole number")),
        Err(_) => default,
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The child processes, killed when dropped.
struct Procs(Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of the file (utime, stime) are 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

/// Raises this process's open-files limit to its hard limit (each beating worker holds a
/// socket).
fn raise_nofile() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if let Some(hard) = limit.maximum {
        let _ = setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: limit.maximum });
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The task load: `inflight` loops, each running `rollout submit FILE` (a job of
/// `job_tasks` echo tasks, waiting for it to finish) again and again, in processes of
/// their own so the beats' client side in this process does not slow them.
struct Load {
    ops: OperatorClient<Channel>,
    stop: Arc<AtomicBool>,
}

impl Load {
    fn start(ops: OperatorClient<Channel>, rollout: &str, cfg: &str, dir: &std::path::Path, inflight: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        for n in 0..inflight {
            let (rollout, cfg, stop) = (rollout.to_owned(), cfg.to_owned(), Arc::clone(&stop));
            let dir = dir.to_owned();
            std::thread::spawn(move || {
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    // A file of its own each time: the same file again is the same job.
                    let file = dir.join(format!("load-{n}-{round}.jsonl"));
                    let body: String = (0..JOB_TASKS)
                        .map(|i| format!("{{\"plugin\":\"echo\",\"payload\":\"{n}-{round}-{i}\"}}\n"))
                        .collect();
                    std::fs::write(&file, body).expect("job file");
                    let status = std::process::Command::new(&rollout)
                        .args(["submit", "--config", &cfg, "--operator", "ops", "--json"])
                        .arg(&file)
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .status();
                    let _ = std::fs::remove_file(&file);
                    if !status.is_ok_and(|s| s.success()) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            });
        }
        Load { ops, stop }
    }

    async fn committed(&mut self) -> u64 {
        let request = pb::StatusRequest { jobs_only: true, ..Default::default() };
        let status = self.ops.status(request).await.expect("status").into_inner();
        status.totals.map_or(0, |t| t.tasks_committed)
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What the beating workers measured.
#[derive(Default)]
struct BeatStats {
    beats: AtomicU64,
    failed: AtomicU64,
    rtt_us: std::sync::Mutex<Vec<u32>>,
    measuring: AtomicBool,
}

async fn beating_worker(
    channel: Channel,
    id: String,
    interval: Duration,
    phase: Duration,
    stats: Arc<BeatStats>,
    registered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut client = CoordinatorClient::new(channel);
    let register = pb::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: id.clone(),
        plugins: vec!["idle".into()],
        slots: 1,
        inventory: Some(pb::Inventory { cpus: 1, memory_bytes: 1 << 30, gpus: vec![] }),
        boot: rand_boot(&id),
        ..Default::default()
    };
    let incarnation = loop {
        match client.register(register.clone()).await {
            Ok(r) => break r.into_inner().incarnation,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    registered.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(phase).await;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        ticker.tick().await;
        seq += 1;
        let beat = pb::HeartbeatRequest {
            worker_id: id.clone(),
            incarnation,
            beat_seq: seq,
            due_at_unix_ms: unix_ms() + 2 * interval.as_millis() as u64,
            ..Default::default()
        };
        let sent = Instant::now();
        let answer = client.heartbeat(beat).await;
        let rtt = sent.elapsed();
        if !stats.measuring.load(Ordering::Relaxed) {
            continue;
        }
        match answer {
            Ok(_) => {
                stats.beats.fetch_add(1, Ordering::Relaxed);
                let us = u32::try_from(rtt.as_micros()).unwrap_or(u32::MAX);
                stats.rtt_us.lock().expect("rtt lock").push(us);
            }
            Err(_) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A boot id per worker name (the coordinator tells processes apart by it).
fn rand_boot(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let workers = env_u64("BENCH_WORKERS", 10_000) as usize;
    let secs = env_u64("BENCH_SECS", 10);
    let beat_ms = env_u64("BENCH_BEAT_MS", 500);
    let inflight = env_u64("BENCH_INFLIGHT_JOBS", 6) as usize;
    let rollout = std::env::var("ROLLOUT").unwrap_or_else(|_| {
        let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
        format!("{target}/release/rollout")
    });
    assert!(std::path::Path::new(&rollout).exists(), "no rollout binary at {rollout} (set ROLLOUT)");
    let nofile = raise_nofile();
    assert!(nofile as usize > workers + 256, "open-files limit {nofile} is too low for {workers} connections");

    let dir = tempfile::tempdir().expect("tempdir");
    let tls = dir.path().join("tls");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let cfg = dir.path().join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            "[health]\nheartbeat_interval = \"{beat_ms}ms\"\n\n[transport]\nlisten_addr = \"{addr}\"\ncoordinator_addr = \"{addr}\"\n\
             tls_dir = \"{}\"\n\n[storage]\ndata_dir = \"{}\"\n\n[limits]\nmax_workers = {}\nmax_connections = {}\n",
            tls.display(),
            dir.path().join("data").display(),
            workers + 16,
            workers + 256,
        ),
    )
    .expect("config");
    ensure_dev_ca(&tls).expect("CA");
    issue_server_cert(&tls, &[]).expect("server cert");
    issue_operator_cert(&tls, "ops").expect("operator cert");
    let issuing = Instant::now();
    let ids: Vec<WorkerId> = (0..workers).map(|i| WorkerId::new(format!("b{i}")).expect("id")).collect();
    for id in ids.iter().chain([&WorkerId::new("t1").expect("id"), &WorkerId::new("t2").expect("id")]) {
        issue_client_cert(&tls, id).expect("worker cert");
    }
    println!("heartbeats: {} worker certificates issued in {:.1} s", workers + 2, issuing.elapsed().as_secs_f64());

    let spawn = |args: &[&str]| {
        std::process::Command::new(&rollout)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn rollout")
    };
    let cfg_s = cfg.display().to_string();
    let mut procs = Procs(vec![spawn(&["coordinator", "--config", &cfg_s, "--history", "/dev/null"])]);
    let coordinator_pid = procs.0[0].id();
    for w in ["t1", "t2"] {
        procs.0.push(spawn(&["worker", "--config", &cfg_s, "--id", w, "--slots", "256", "--history", "/dev/null"]));
    }
    let ops_channel = connect(&addr, &CertFiles::ca(&tls).cert, &CertFiles::operator(&tls, "ops")).expect("channel");
    let mut ops = OperatorClient::new(ops_channel).max_decoding_message_size(64 << 20);
    let totals = |s: pb::StatusResponse| s.totals.unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let request = pb::StatusRequest { jobs_only: true, ..Default::default() };
        if let Ok(s) = ops.status(request).await
            && totals(s.into_inner()).workers_active >= 2
        {
            break;
        }
        assert!(Instant::now() < deadline, "the task workers did not register within 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Phase 1: tasks alone.
    let mut load = Load::start(ops.clone(), &rollout, &cfg_s, dir.path(), inflight);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (c0, t0, cpu0) = (load.committed().await, Instant::now(), cpu_seconds(coordinator_pid));
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let (c1, t1, cpu1) = (load.committed().await, Instant::now(), cpu_seconds(coordinator_pid));
    let baseline = (c1 - c0) as f64 / (t1 - t0).as_secs_f64();
    println!(
        "heartbeats: baseline {baseline:.0} tasks/s with the two task workers alone (coordinator CPU {:.0}%)",
        100.0 * (cpu1 - cpu0) / (t1 - t0).as_secs_f64()
    );

    // Phase 2: the beating workers join.
    let stats = Arc::new(BeatStats::default());
    let registered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let interval = Duration::from_millis(beat_ms);
    let connecting = Instant::now();
    for (i, id) in ids.iter().enumerate() {
        let channel = connect(&addr, &CertFiles::ca(&tls).cert, &CertFiles::worker(&tls, id)).expect("channel");
        let phase = Duration::from_micros((rand_boot(id.as_str()) % (beat_ms * 1000)).max(1));
        tokio::spawn(beating_worker(
            channel,
            id.to_string(),
            interval,
            phase,
            Arc::clone(&stats),
            Arc::clone(&registered),
            Arc::clone(&stop),
        ));
        if i % 256 == 255 {
            // Let handshakes proceed rather than queue 10,000 at once.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while (registered.load(Ordering::Relaxed) as usize) < workers {
        assert!(
            Instant::now() < deadline,
            "only {} of {workers} registered within 300 s",
            registered.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "heartbeats: {workers} workers connected (mTLS) and registered in {:.1} s",
        connecting.elapsed().as_secs_f64()
    );
    // Settle a couple of intervals, then measure.
    tokio::time::sleep(interval * 4).await;
    stats.measuring.store(true, Ordering::Relaxed);
    let (c0, t0, cpu0) = (load.committed().await, Instant::now(), cpu_seconds(coordinator_pid));
    let self0 = cpu_seconds(std::process::id());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stats.measuring.store(false, Ordering::Relaxed);
    let (c1, t1, cpu1) = (load.committed().await, Instant::now(), cpu_seconds(coordinator_pid));
    let self1 = cpu_seconds(std::process::id());
    let wall = (t1 - t0).as_secs_f64();
    let tasks = (c1 - c0) as f64 / wall;
    let beats = stats.beats.load(Ordering::Relaxed) as f64 / wall;
    let mut rtt = std::mem::take(&mut *stats.rtt_us.lock().expect("rtt lock"));
    rtt.sort_unstable();
    let status = ops.status(pb::StatusRequest { jobs_only: true, ..Default::default() }).await.expect("status");
    let counts = totals(status.into_inner());
    stop.store(true, Ordering::Relaxed);
    load.stop();
    println!(
        "heartbeats: {workers} workers beating every {beat_ms} ms: {beats:.0} beats/s sustained (offered {:.0}/s), \
         {} failed beats",
        workers as f64 * 1000.0 / beat_ms as f64,
        stats.failed.load(Ordering::Relaxed)
    );
    println!(
        "heartbeats: beat round trip p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target: >= 20,000 beats/s with p99 <= 50 ms)",
        pct(&rtt, 0.5),
        pct(&rtt, 0.99),
        pct(&rtt, 1.0)
    );
    println!(
        "heartbeats: tasks meanwhile {tasks:.0}/s = {:.2} x the baseline's {baseline:.0}/s; coordinator CPU {:.0}%, \
         this process (the beats' client side and the task load) {:.0}%",
        tasks / baseline,
        100.0 * (cpu1 - cpu0) / wall,
        100.0 * (self1 - self0) / wall
    );
    println!(
        "heartbeats: workers active {}, declared failed {} (a beating worker declared failed would be a beat later \
         than the failure timeout)",
        counts.workers_active, counts.workers_failed
    );
    drop(procs);
}
