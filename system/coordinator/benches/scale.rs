//! What a long-lived coordinator costs (`make bench-recovery`): restart with a million
//! tasks in storage, and status with a hundred thousand finished jobs kept.
//!
//! Each measurement runs in a fresh child process (this binary, re-run with `--child`),
//! so its peak RSS (VmHWM) is its own, and each is quoted beside a baseline measured in
//! the same run on the same database:
//!
//! - `recover`: opening the redb file (default options: 64 MiB cache, integrity check on
//!   open), `Coordinator::recover`, then the first batch that leases a task (a worker
//!   registers and pulls): time to accepting work and peak RSS, for a million queued
//!   tasks (one unfinished job: every task is live) and a million finished tasks (1,000
//!   jobs of 1,000: only job records are read), and again without the integrity check.
//!   Baseline: reading every pair of the same database page by page (the disk's floor
//!   for a full read).
//! - `status`: one status page (the default view: active jobs and the 10 most recently
//!   finished, up to 1,000 workers) with 100,000 finished jobs kept, median of many;
//!   baseline: the same page (the same ten jobs shown) with ten finished jobs kept.
//!
//! Sizes: `BENCH_TASKS` (default 1,000,000), `BENCH_JOBS` (default 100,000). The
//! databases go in a temporary directory (under `ROLLOUT_BENCH_DIR` when set).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rollout_coordinator::{
    Coordinator, CoordinatorInput, CoordinatorOutput, CoordinatorSettings, JobSubmission, OperatorReply, StatusQuery,
    TaskSpec,
};
use rollout_core::protocol::{Outcome, Pull, Register, Submit, ToCoordinator, ToWorker};
use rollout_core::traits::Storage;
use rollout_core::{Config, ContentId, Mono, Now, PROTOCOL_VERSION, WorkerId};
use rollout_storage::{OpenOptions, RedbStorage};

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now() -> Now {
    Now::new(Mono::from_duration(Duration::from_secs(1)), SystemTime::now())
}

fn settings() -> CoordinatorSettings {
    CoordinatorSettings::from_config(&Config::default())
}

fn spec(i: u32) -> TaskSpec {
    TaskSpec {
        plugin: "echo".into(),
        method: "run".into(),
        payload: format!("task-{i:08}").into_bytes(),
        gpus: 0,
        deadline: None,
        inputs: Vec::new(),
    }
}

fn feed(c: &mut Coordinator, inputs: Vec<CoordinatorInput>) -> Vec<CoordinatorOutput> {
    let mut out = Vec::new();
    c.handle_batch(now(), inputs, &mut out).expect("batch commits");
    out
}

fn worker() -> WorkerId {
    WorkerId::new("bench").expect("id")
}

fn register(c: &mut Coordinator) -> rollout_core::Incarnation {
    let reg = Register {
        protocol_version: PROTOCOL_VERSION,
        plugins: vec!["echo".into()],
        slots: 1000,
        inventory: Default::default(),
        boot: 1,
        adopted: None,
    };
    let out = feed(c, vec![CoordinatorInput::FromWorker { worker: worker(), message: ToCoordinator::Register(reg) }]);
    out.iter()
        .find_map(|o| match o {
            CoordinatorOutput::Send { message: ToWorker::Registered { incarnation, .. }, .. } => Some(*incarnation),
            _ => None,
        })
        .expect("registered")
}

/// A million queued tasks: one job, appended 10,000 at a time.
fn build_queued(path: &Path, tasks: u32) {
    let storage: Arc<dyn Storage> = Arc::new(RedbStorage::open(path).expect("open"));
    let mut c = Coordinator::recover(storage, settings(), now()).expect("recover");
    let out = feed(&mut c, vec![CoordinatorInput::OpenJob { request: 1, name: "big".into(), idempotency_key: None }]);
    let job = out
        .iter()
        .find_map(|o| match o {
            CoordinatorOutput::Reply { reply: OperatorReply::JobOpened { job, .. }, .. } => Some(*job),
            _ => None,
        })
        .expect("opened");
    let mut first = 0;
    while first < tasks {
        let n = (tasks - first).min(10_000);
        let batch = (first..first + n).map(spec).collect();
        feed(&mut c, vec![CoordinatorInput::AppendTasks { request: 2, job, first_index: first, tasks: batch }]);
        first += n;
    }
    feed(&mut c, vec![CoordinatorInput::SealJob { request: 3, job, tasks }]);
}

/// `jobs` finished jobs of `per_job` committed tasks each.
fn build_finished(path: &Path, jobs: u32, per_job: u32) {
    let storage: Arc<dyn Storage> = Arc::new(RedbStorage::open(path).expect("open"));
    let mut c = Coordinator::recover(storage, settings(), now()).expect("recover");
    let incarnation = register(&mut c);
    let mut through = 0;
    // Many jobs per batch: one fsync per batch, not per job.
    let jobs_per_batch = (10_000 / per_job).max(1);
    let mut j = 0;
    while j < jobs {
        let n = (jobs - j).min(jobs_per_batch);
        let submits = (0..n)
            .map(|k| CoordinatorInput::SubmitJob {
                request: u64::from(j + k),
                job: JobSubmission {
                    name: format!("job{}", j + k),
                    tasks: (0..per_job).map(spec).collect(),
                    idempotency_key: None,
                },
            })
            .collect();
        feed(&mut c, submits);
        let mut left = n * per_job;
        while left > 0 {
            let pull = Pull { incarnation, free_slots: 1000, assigns_through: through };
            let out = feed(
                &mut c,
                vec![CoordinatorInput::FromWorker { worker: worker(), message: ToCoordinator::Pull(pull) }],
            );
            let mut inputs = Vec::new();
            for o in out {
                if let CoordinatorOutput::Send { message: ToWorker::Assign(a), .. } = o {
                    through = through.max(a.seq);
                    let bytes = a.payload.clone();
                    let outcome = Outcome::Succeeded { result: ContentId::of(&bytes), size_bytes: bytes.len() as u64 };
                    let submit = Submit { incarnation, task: a.task, token: a.token, outcome };
                    inputs.push(CoordinatorInput::Submit { worker: worker(), submit, inline_result: Some(bytes) });
                }
            }
            left -= (inputs.len() / 2) as u32;
            assert!(!inputs.is_empty(), "every job's tasks are leased");
            feed(&mut c, inputs);
        }
        j += n;
    }
}

/// Peak resident memory of this process, bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// In the child: one measurement on `path`, printed as `key=value` pairs.
fn child(what: &str, path: &Path) {
    match what {
        "scan" => {
            let storage = RedbStorage::open(path).expect("open");
            let started = Instant::now();
            let (mut pairs, mut bytes, mut after) = (0u64, 0u64, None::<Vec<u8>>);
            loop {
                let page = storage.scan_page(b"", after.as_deref(), 4096).expect("scan");
                pairs += page.len() as u64;
                bytes += page.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>();
                let full = page.len() == 4096;
                after = page.last().map(|(k, _)| k.clone());
                if !full {
                    break;
                }
            }
            println!("ms={} rss={} pairs={pairs} bytes={bytes}", started.elapsed().as_millis(), peak_rss());
        }
        "recover" | "recover-unchecked" => {
            let started = Instant::now();
            let options = OpenOptions { check_integrity_on_open: what == "recover", ..OpenOptions::default() };
            let storage: Arc<dyn Storage> = Arc::new(RedbStorage::open_with(path, options).expect("open"));
            let mut c = Coordinator::recover(storage, settings(), now()).expect("recover");
            let recovered = started.elapsed();
            let live = c.live_tasks();
            let incarnation = register(&mut c);
            let pull = Pull { incarnation, free_slots: 1, assigns_through: 0 };
            let out = feed(
                &mut c,
                vec![CoordinatorInput::FromWorker { worker: worker(), message: ToCoordinator::Pull(pull) }],
            );
            let leased = out.iter().any(|o| matches!(o, CoordinatorOutput::Send { message: ToWorker::Assign(_), .. }));
            println!(
                "ms={} recover_ms={} rss={} live={live} leased={leased}",
                started.elapsed().as_millis(),
                recovered.as_millis(),
                peak_rss()
            );
        }
        "status" => {
            let storage: Arc<dyn Storage> = Arc::new(RedbStorage::open(path).expect("open"));
            let c = Coordinator::recover(storage, settings(), now()).expect("recover");
            let query = StatusQuery::default();
            let mut samples = Vec::new();
            for _ in 0..200 {
                let started = Instant::now();
                let page = c.status(&query);
                samples.push(started.elapsed().as_nanos() as f64 / 1000.0);
                std::hint::black_box(page);
            }
            samples.sort_by(f64::total_cmp);
            let jobs = c.status(&query).totals.jobs_finished;
            println!("us={:.1} finished={jobs} rss={}", samples[samples.len() / 2], peak_rss());
        }
        other => panic!("unknown measurement {other}"),
    }
}

fn run_child(what: &str, path: &Path) -> String {
    let out = Command::new(std::env::current_exe().expect("this binary"))
        .args(["--child", what])
        .arg(path)
        .output()
        .expect("the child runs");
    assert!(out.status.success(), "{what} on {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

fn mib(bytes: f64) -> String {
    format!("{:.0} MiB", bytes / f64::from(1 << 20))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1], &PathBuf::from(&args[i + 2]));
        return;
    }
    if args.iter().any(|a| a == "--list" || a == "--test") {
        return;
    }
    let tasks = env_u32("BENCH_TASKS", 1_000_000);
    let jobs = env_u32("BENCH_JOBS", 100_000);
    let dir = match std::env::var_os("ROLLOUT_BENCH_DIR") {
        Some(base) => tempfile::tempdir_in(base),
        None => tempfile::tempdir(),
    }
    .expect("temporary directory");

    println!(
        "scale: building the databases ({tasks} queued tasks; {tasks} finished tasks in jobs of 1,000; {jobs} finished jobs)"
    );
    let queued = dir.path().join("queued.db");
    let t = Instant::now();
    build_queued(&queued, tasks);
    println!("scale:   {tasks} queued tasks written in {:.1} s", t.elapsed().as_secs_f64());
    let finished = dir.path().join("finished.db");
    let t = Instant::now();
    build_finished(&finished, tasks / 1000, 1000);
    println!("scale:   {} jobs of 1,000 finished tasks in {:.1} s", tasks / 1000, t.elapsed().as_secs_f64());
    let many = dir.path().join("many-jobs.db");
    let t = Instant::now();
    build_finished(&many, jobs, 1);
    println!("scale:   {jobs} finished jobs in {:.1} s", t.elapsed().as_secs_f64());
    let ten = dir.path().join("ten-jobs.db");
    build_finished(&ten, 10, 1);

    for (label, path) in [("queued", &queued), ("finished", &finished)] {
        let scan = run_child("scan", path);
        let recover = run_child("recover", path);
        let unchecked = run_child("recover-unchecked", path);
        let size = std::fs::metadata(path).map_or(0, |m| m.len());
        println!(
            "recover  {label:>8}: {tasks} tasks stored (database {}): accepting work after {:.0} ms (recover {:.0} ms), \
             peak RSS {}, {} live tasks in memory, a task leased at once: {}; baseline, reading every pair: {:.0} ms, \
             peak RSS {} => {:.2}x the read",
            mib(size as f64),
            field(&recover, "ms"),
            field(&recover, "recover_ms"),
            mib(field(&recover, "rss")),
            field(&recover, "live") as u64,
            recover.contains("leased=true"),
            field(&scan, "ms"),
            mib(field(&scan, "rss")),
            field(&recover, "ms") / field(&scan, "ms").max(1.0),
        );
        println!(
            "recover  {label:>8}: without storage.check_integrity_on_open: accepting work after {:.0} ms, peak RSS {}",
            field(&unchecked, "ms"),
            mib(field(&unchecked, "rss")),
        );
    }
    let big = run_child("status", &many);
    let small = run_child("status", &ten);
    println!(
        "status: default page with {} finished jobs kept: median {:.1} us, peak RSS {}; baseline with {}: {:.1} us => {:.2}x",
        field(&big, "finished") as u64,
        field(&big, "us"),
        mib(field(&big, "rss")),
        field(&small, "finished") as u64,
        field(&small, "us"),
        field(&big, "us") / field(&small, "us").max(0.001),
    );
}
