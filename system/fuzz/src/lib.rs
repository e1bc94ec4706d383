//! The bodies of rollout's fuzz targets: one function per decoder fed from outside the
//! process, each taking the fuzzer's bytes and running them through the same code the
//! binaries run (wire conversion, then the machine where one takes the result).
//!
//! A body must not panic, whatever the bytes; `fuzz/` (cargo-fuzz, nightly) runs each
//! under libFuzzer with a memory bound (`-rss_limit_mb`) and a time bound per input
//! (`-timeout`), and `tests/corpus.rs` replays every committed corpus file through
//! the same bodies on the stable toolchain in `make test`, so a crash once found stays
//! fixed. [`TARGETS`] names them all; [`seeds`] makes their seed inputs from real
//! messages.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prost::Message;
use rollout_coordinator::metrics::{ClusterMetrics, check_histogram};
use rollout_coordinator::{
    Coordinator, CoordinatorInput, CoordinatorOutput, CoordinatorSettings, JobsQuery, StatusQuery, audit,
    durable_task_states,
};
use rollout_core::history::HistoryRecord;
use rollout_core::protocol::{Heartbeat, MetricDeltas, ToCoordinator, ToWorker};
use rollout_core::traits::Storage;
use rollout_core::{Config, Incarnation, JobId, Mono, Now, WorkerId};
use rollout_proto::transport as pb;
use rollout_transport::wire;
use sim::model_store::ModelStorage;

/// A target's body: the fuzzer's bytes in, nothing out (a panic is the finding).
pub type Body = fn(&[u8]);

/// Every target: its name (the file under `fuzz/fuzz_targets/` and the corpus
/// directory under `fuzz/corpus/`) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("register_request", register_request),
    ("heartbeat_request", heartbeat_request),
    ("worker_frame", worker_frame),
    ("submit_job_request", submit_job_request),
    ("enroll_request", enroll_request),
    ("bootstrap_token", bootstrap_token),
    ("stored_records", stored_records),
    ("config_toml", config_toml),
    ("scenario_toml", scenario_toml),
    ("history_jsonl", history_jsonl),
    ("histogram", histogram),
    ("fault_schedule", fault_schedule),
];

/// The body of `name`.
pub fn target(name: &str) -> Option<Body> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

fn now() -> Now {
    Now::new(Mono::from_duration(Duration::from_secs(100)), SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
}

/// A coordinator on fresh in-memory storage, with the default limits.
fn coordinator() -> Coordinator {
    let storage: Arc<dyn Storage> = Arc::new(ModelStorage::new());
    let settings = CoordinatorSettings::from_config(&Config::default());
    Coordinator::recover(storage, settings, now()).expect("an empty storage recovers")
}

fn worker_id() -> WorkerId {
    WorkerId::new("fuzz").expect("a valid worker id")
}

fn feed(c: &mut Coordinator, input: CoordinatorInput) -> Vec<CoordinatorOutput> {
    let mut out = Vec::new();
    // A refused batch is an answer too; only a panic is a finding.
    let _ = c.handle(now(), input, &mut out);
    out
}

/// Registers worker `fuzz` offering `echo`; its incarnation.
fn registered(c: &mut Coordinator) -> Incarnation {
    let register = rollout_core::protocol::Register {
        protocol_version: rollout_core::PROTOCOL_VERSION,
        plugins: vec!["echo".into()],
        slots: 4,
        inventory: Default::default(),
        boot: 1,
        adopted: None,
    };
    let out = feed(c, CoordinatorInput::FromWorker { worker: worker_id(), message: ToCoordinator::Register(register) });
    out.iter()
        .find_map(|o| match o {
            CoordinatorOutput::Send { message: ToWorker::Registered { incarnation, .. }, .. } => Some(*incarnation),
            _ => None,
        })
        .expect("a plain registration is accepted")
}

/// The coordinator's storage prefixes, for [`stored_records`].
const RECORD_PREFIXES: [&[u8]; 12] = [
    b"c/format",
    b"c/counters",
    b"c/w/",
    b"c/j/",
    b"c/idem/",
    b"c/js/",
    b"c/tp/",
    b"c/t/",
    b"c/audit/",
    b"c/audit_base",
    b"c/r/",
    b"c/rc/",
];

/// `RegisterRequest` bytes: decoded as tonic would, checked as the service does, then
/// registered with a coordinator.
pub fn register_request(data: &[u8]) {
    let Ok(req) = pb::RegisterRequest::decode(data) else { return };
    let Ok(register) = wire::register_from_wire(&req) else { return };
    let mut c = coordinator();
    feed(&mut c, CoordinatorInput::FromWorker { worker: worker_id(), message: ToCoordinator::Register(register) });
    let _ = c.status(&StatusQuery::default());
}

/// `HeartbeatRequest` bytes (metric deltas with HDR histograms included), as the beat
/// of a registered worker.
pub fn heartbeat_request(data: &[u8]) {
    let Ok(req) = pb::HeartbeatRequest::decode(data) else { return };
    let Ok(beat) = wire::heartbeat_from_wire(req) else { return };
    let mut c = coordinator();
    let incarnation = registered(&mut c);
    let beat = Heartbeat { incarnation, ..beat };
    feed(&mut c, CoordinatorInput::FromWorker { worker: worker_id(), message: ToCoordinator::Heartbeat(beat) });
    let _ = c.latencies();
}

/// `WorkerFrame` bytes: its submits and pulls, as a registered worker's.
pub fn worker_frame(data: &[u8]) {
    let Ok(frame) = pb::WorkerFrame::decode(data) else { return };
    let _ = wire::worker_frames(frame.clone(), 4 << 20);
    let mut c = coordinator();
    let incarnation = registered(&mut c);
    for pull in frame.pulls.iter().take(16) {
        let pull = wire::pull_from_wire(incarnation, pull);
        feed(&mut c, CoordinatorInput::FromWorker { worker: worker_id(), message: ToCoordinator::Pull(pull) });
    }
    for submit in frame.submits.into_iter().take(256) {
        let Ok((task, token, outcome)) = wire::submit_from_wire(submit) else { continue };
        let (outcome, bytes) = match outcome {
            wire::WireOutcome::Result(bytes) => (
                rollout_core::protocol::Outcome::Succeeded {
                    result: rollout_core::ContentId::of(&bytes),
                    size_bytes: bytes.len() as u64,
                },
                Some(bytes),
            ),
            wire::WireOutcome::Failure(message) => (rollout_core::protocol::Outcome::Failed { message }, None),
        };
        let submit = rollout_core::protocol::Submit { incarnation, task, token, outcome };
        let inputs = [CoordinatorInput::Submit { worker: worker_id(), submit, inline_result: bytes }];
        let mut out = Vec::new();
        let _ = c.handle_batch(now(), inputs, &mut out);
    }
}

/// `SubmitJobRequest` bytes: submitted whole, and again in parts (open, append, seal).
pub fn submit_job_request(data: &[u8]) {
    let Ok(req) = pb::SubmitJobRequest::decode(data) else { return };
    let Ok(job) = wire::job_from_wire(req) else { return };
    let mut c = coordinator();
    let tasks = job.tasks.clone();
    feed(&mut c, CoordinatorInput::SubmitJob { request: 1, job });
    let out = feed(&mut c, CoordinatorInput::OpenJob { request: 2, name: "parts".into(), idempotency_key: None });
    let opened = out.iter().find_map(|o| match o {
        CoordinatorOutput::Reply { reply: rollout_coordinator::OperatorReply::JobOpened { job, .. }, .. } => Some(*job),
        _ => None,
    });
    if let Some(job) = opened {
        let half = tasks.len() / 2;
        let (first, rest) = tasks.split_at(half);
        feed(&mut c, CoordinatorInput::AppendTasks { request: 3, job, first_index: 0, tasks: first.to_vec() });
        feed(&mut c, CoordinatorInput::AppendTasks { request: 4, job, first_index: half as u32, tasks: rest.to_vec() });
        feed(&mut c, CoordinatorInput::SealJob { request: 5, job, tasks: tasks.len() as u32 });
    }
    let _ = c.status(&StatusQuery { jobs: JobsQuery::All { after: None }, ..StatusQuery::default() });
}

/// `EnrollRequest` bytes from a peer without a certificate: the token, the worker id
/// and the signing request are parsed as the Enrollment service does before it looks
/// at any file.
pub fn enroll_request(data: &[u8]) {
    let Ok(req) = pb::EnrollRequest::decode(data) else { return };
    let _ = req.bootstrap_token.parse::<rollout_transport::enroll::BootstrapToken>();
    let _ = rollout_proto::worker_id("enroll.worker_id", &req.worker_id);
    let _ = rollout_transport::enroll::parse_csr(&req.csr_pem);
}

/// Bootstrap token text (`--token`, `ROLLOUT_JOIN_TOKEN`).
pub fn bootstrap_token(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<rollout_transport::enroll::BootstrapToken>();
    }
}

/// Records read back from storage: the bytes are cut into key/value pairs under the
/// coordinator's prefixes, and a coordinator recovers from them (as after a restart
/// on a damaged or foreign database), then is asked for status, reports and a tick.
pub fn stored_records(data: &[u8]) {
    let storage = ModelStorage::new();
    let mut rest = data;
    {
        let Ok(mut txn) = storage.begin_write() else { return };
        // Pairs: prefix index (u8), key suffix length (u8, at most 16), suffix, value
        // length (u16 big-endian), value.
        while rest.len() >= 4 {
            let prefix = RECORD_PREFIXES[rest[0] as usize % RECORD_PREFIXES.len()];
            let key_len = (rest[1] as usize).min(16).min(rest.len() - 2);
            let key = [prefix, &rest[2..2 + key_len]].concat();
            rest = &rest[2 + key_len..];
            let [a, b, tail @ ..] = rest else { break };
            let value_len = (usize::from(*a) << 8 | usize::from(*b)).min(tail.len());
            let _ = txn.put(&key, &tail[..value_len]);
            rest = &tail[value_len..];
        }
        if txn.commit().is_err() {
            return;
        }
    }
    let storage: Arc<dyn Storage> = Arc::new(storage);
    let _ = audit::verify(&*storage);
    let _ = durable_task_states(&*storage);
    let settings = CoordinatorSettings::from_config(&Config::default());
    let Ok(mut c) = Coordinator::recover(Arc::clone(&storage), settings, now()) else { return };
    let page = c.status(&StatusQuery { jobs: JobsQuery::All { after: None }, ..StatusQuery::default() });
    for job in page.jobs.iter().take(4) {
        let _ = c.task_reports(job.job, 0, 64);
    }
    let _ = c.task_reports(JobId(0), 0, 64);
    let _ = c.handle_timeout(now(), &mut Vec::new());
}

/// A config file's text.
pub fn config_toml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::from_toml_str(text);
    }
}

/// A scenario file's text.
pub fn scenario_toml(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sim::Scenario::parse(text, std::path::Path::new("fuzz.toml"));
    }
}

/// JSON-lines histories (`rollout check`): every line that parses is a record of one
/// history, judged by the checker with and without reported states.
pub fn history_jsonl(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let records: Vec<HistoryRecord> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let merged = sim::checker::merge_histories(vec![records]);
    let _ = sim::checker::check_recorded(&merged, true, true);
    let _ = sim::checker::check_states(&merged, &[]);
}

/// The coverage-guided explorer: the bytes choose a fault schedule (and the seed) for
/// the swarm scenario ([`sim::schedule::scenario_from_bytes`]), and the simulator runs
/// it with the invariants as the oracle. A violation is shrunk and written out as a
/// regression scenario (to `ROLLOUT_FUZZ_FINDINGS`, default
/// `fuzz/artifacts/fault_schedule/`) before the panic that reports it.
/// `ROLLOUT_FUZZ_PLANT=<bug>` plants one of the simulator's bugs (e.g.
/// `release_before_durable`), to see the explorer find it.
pub fn fault_schedule(data: &[u8]) {
    static BASE: std::sync::OnceLock<sim::Scenario> = std::sync::OnceLock::new();
    let base = BASE.get_or_init(|| {
        let text = include_str!("../../../scenarios/swarm.toml");
        let mut base =
            sim::Scenario::parse(text, std::path::Path::new("swarm.toml")).expect("the shipped swarm parses");
        base.planted_bug = std::env::var("ROLLOUT_FUZZ_PLANT").ok().filter(|b| !b.is_empty());
        base
    });
    let (mut scenario, seed) = sim::schedule::scenario_from_bytes(base, data);
    let Some(violation) = sim::run(&scenario, seed).violation else { return };
    let id = rollout_core::ContentId::of(data).to_string();
    scenario.name = format!("fault_schedule_{}", &id[..12]);
    let dir = std::env::var_os("ROLLOUT_FUZZ_FINDINGS").map_or_else(
        || std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/artifacts/fault_schedule"),
        std::path::PathBuf::from,
    );
    let written = match sim::shrink::shrink(&scenario, seed, &mut |_| {}) {
        Ok(shrunk) => shrunk.write(&dir),
        Err(_) => std::fs::create_dir_all(&dir).and_then(|()| {
            let path = dir.join(format!("{}.toml", scenario.name));
            std::fs::write(&path, scenario.to_toml()).map(|()| path)
        }),
    };
    match written {
        Ok(path) => {
            panic!("{violation}\nregression scenario: {} (sim run {} --seed {seed})", path.display(), path.display())
        }
        Err(e) => panic!("{violation}\n(cannot write the regression scenario to {}: {e})", dir.display()),
    }
}

/// An HDR histogram from a worker's beat: the header check, then the merge.
pub fn histogram(data: &[u8]) {
    let _ = check_histogram(data);
    let mut metrics = ClusterMetrics::default();
    let deltas =
        MetricDeltas { counters: vec![], histograms: vec![("task_latency_us".into(), "echo".into(), data.to_vec())] };
    let _ = metrics.merge_from(&deltas, |_| true, 16);
    let _ = metrics.latencies();
}

/// Seed inputs for every target, made from real messages (and a few hostile ones that
/// once broke the coordinator), as `(target, bytes)`.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use hdrhistogram::serialization::{Serializer, V2Serializer};
    let mut seeds = Vec::new();
    let register = pb::RegisterRequest {
        protocol_version: rollout_core::PROTOCOL_VERSION,
        worker_id: "w1".into(),
        plugins: vec!["echo".into(), "sleep".into()],
        slots: 4,
        inventory: Some(pb::Inventory {
            cpus: 8,
            memory_bytes: 1 << 34,
            gpus: vec![pb::Gpu { index: 0, name: "H100".into(), uuid: "GPU-0".into(), memory_bytes: 80 << 30 }],
        }),
        boot: 0x5eed,
        adopted: Some(3),
    };
    seeds.push(("register_request", register.encode_to_vec()));
    let many = pb::RegisterRequest { plugins: (0..300).map(|i| format!("p{i}")).collect(), ..register };
    seeds.push(("register_request", many.encode_to_vec()));

    let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 86_400_000_000, 3).expect("bounds");
    for v in [10, 200, 3_000, 40_000] {
        h.record(v).expect("in range");
    }
    let mut hdr = Vec::new();
    V2Serializer::new().serialize(&h, &mut hdr).expect("serializes");
    let mut lying = hdr[..40].to_vec();
    lying[4..8].copy_from_slice(&(u32::MAX - 8).to_be_bytes());
    seeds.push(("histogram", hdr.clone()));
    seeds.push(("histogram", lying.clone()));
    let beat = pb::HeartbeatRequest {
        worker_id: "w1".into(),
        incarnation: 1,
        beat_seq: 7,
        due_at_unix_ms: 1_700_000_001_000,
        running: vec![pb::RunningTask { task: Some(pb::TaskId { job: 0, index: 1 }), token: 3 }],
        metrics: Some(pb::MetricDeltas {
            counters: vec![pb::CounterDelta { name: "tasks_succeeded".into(), plugin: "echo".into(), delta: 5 }],
            histograms: vec![
                pb::HistogramDelta { name: "task_latency_us".into(), plugin: "echo".into(), hdr_v2: hdr },
                pb::HistogramDelta { name: "task_latency_us".into(), plugin: "echo".into(), hdr_v2: lying },
            ],
        }),
        assigns_through: 1,
    };
    seeds.push(("heartbeat_request", beat.encode_to_vec()));
    let year_3000 = pb::HeartbeatRequest { due_at_unix_ms: 32_503_680_000_000, metrics: None, ..beat };
    seeds.push(("heartbeat_request", year_3000.encode_to_vec()));

    let frame = pb::WorkerFrame {
        hello: Some(pb::WorkHello { worker_id: "w1".into(), incarnation: 1 }),
        pulls: vec![pb::Pull { free_slots: 4, assigns_through: 0 }],
        submits: vec![
            pb::Submit {
                task: Some(pb::TaskId { job: 0, index: 0 }),
                token: 1,
                outcome: Some(pb::submit::Outcome::Result(b"ok".to_vec())),
            },
            pb::Submit {
                task: Some(pb::TaskId { job: 0, index: 1 }),
                token: 2,
                outcome: Some(pb::submit::Outcome::Failure(pb::TaskFailure {
                    message: "boom".into(),
                    detail: "trace".into(),
                })),
            },
        ],
    };
    seeds.push(("worker_frame", frame.encode_to_vec()));

    let job = pb::SubmitJobRequest {
        name: "demo".into(),
        tasks: (0..5)
            .map(|i| pb::TaskSpec {
                plugin: "echo".into(),
                method: "run".into(),
                payload: format!("task {i}").into_bytes(),
                gpus: i % 2,
                deadline_ms: 1_000,
                inputs: Vec::new(),
            })
            .collect(),
        idempotency_key: "k".into(),
    };
    seeds.push(("submit_job_request", job.encode_to_vec()));

    let token = "rollout-token-v1.0123456789abcdef.00112233445566778899aabbccddeeff.\
                 aa00aa00aa00aa00aa00aa00aa00aa00aa00aa00aa00aa00aa00aa00aa00aa00.1700003600000.w1";
    seeds.push(("bootstrap_token", token.as_bytes().to_vec()));
    let enroll = pb::EnrollRequest {
        bootstrap_token: token.into(),
        worker_id: "w1".into(),
        csr_pem: "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n".into(),
    };
    seeds.push(("enroll_request", enroll.encode_to_vec()));

    // Records as a coordinator writes them, and a counters record that is garbage.
    seeds.push(("stored_records", stored_records_from(&*storage_of_a_small_run())));
    seeds.push(("stored_records", vec![1, 0, 0, 3, 0xff, 0xff, 0xff]));

    seeds.push(("config_toml", rollout_core::Config::default().to_toml_string().into_bytes()));
    seeds.push((
        "config_toml",
        b"[limits]\nmax_message_bytes = 10\n[health]\nheartbeat_interval = \"99999999999999d\"\n".to_vec(),
    ));
    let scenario_dir = sim::scenarios_dir();
    for name in ["steady_state", "swarm", "process_pause"] {
        if let Ok(text) = std::fs::read(scenario_dir.join(format!("{name}.toml"))) {
            seeds.push(("scenario_toml", text));
        }
    }
    let history = [
        r#"{"seq":0,"node":"coordinator","wall_unix_ms":1,"event":"job_accepted","job":1,"tasks":1}"#,
        r#"{"seq":1,"node":"coordinator","wall_unix_ms":2,"event":"leased","task":"job-1.0","worker":"w1","token":1,"attempt":1}"#,
        r#"{"seq":2,"node":"w1","wall_unix_ms":3,"event":"task_started","task":"job-1.0","worker":"w1","token":1}"#,
        r#"{"seq":3,"node":"coordinator","wall_unix_ms":4,"event":"committed","task":"job-1.0","worker":"w1","token":1,"result":"eb836fa0a41cb38c32b81c2cd853a22f62b4e5fd2b1b8459456a2e19c7be445d"}"#,
        r#"{"seq":4,"node":"coordinator","wall_unix_ms":5,"event":"job_expired","job":1}"#,
    ];
    seeds.push(("history_jsonl", history.join("\n").into_bytes()));
    // Schedules: none, one fault of each of the first kinds, and a dense mix.
    seeds.push(("fault_schedule", vec![0; 8]));
    let mut rng = rollout_core::rng::SplitMix64::new(0x5c4e_d01e);
    for faults in [1usize, 3, 10] {
        let len = 8 + faults * sim::schedule::FAULT_BYTES;
        seeds.push(("fault_schedule", (0..len).map(|_| rng.next_u64() as u8).collect()));
    }
    seeds
}

/// A `stored_records` input holding every pair of `storage` (the ones that fit its format).
pub fn stored_records_from(storage: &dyn Storage) -> Vec<u8> {
    let mut out = Vec::new();
    for (key, value) in storage.scan(b"c/").unwrap_or_default() {
        // The longest prefix that matches (`c/rc/` before `c/r/`, `c/audit_base` before `c/audit/`).
        let Some(p) = (0..RECORD_PREFIXES.len())
            .filter(|&i| key.starts_with(RECORD_PREFIXES[i]))
            .max_by_key(|&i| RECORD_PREFIXES[i].len())
        else {
            continue;
        };
        let suffix = &key[RECORD_PREFIXES[p].len()..];
        let Ok(len) = u16::try_from(value.len()) else { continue };
        if suffix.len() > 16 {
            continue;
        }
        out.push(p as u8);
        out.push(suffix.len() as u8);
        out.extend_from_slice(suffix);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&value);
    }
    out
}

/// The storage of a small real run: a worker, a job of three tasks (one committed, one
/// failed once, one leased), a streamed job left open.
fn storage_of_a_small_run() -> Arc<dyn Storage> {
    let storage: Arc<dyn Storage> = Arc::new(ModelStorage::new());
    let settings = CoordinatorSettings::from_config(&Config::default());
    let mut c = Coordinator::recover(Arc::clone(&storage), settings, now()).expect("recovers");
    let incarnation = registered(&mut c);
    let spec = |p: &str| rollout_coordinator::TaskSpec {
        plugin: "echo".into(),
        method: "run".into(),
        payload: p.as_bytes().to_vec(),
        gpus: 0,
        deadline: None,
        inputs: Vec::new(),
    };
    let job = rollout_coordinator::JobSubmission {
        name: "seed".into(),
        tasks: vec![spec("a"), spec("b"), spec("c")],
        idempotency_key: Some("seed".into()),
    };
    feed(&mut c, CoordinatorInput::SubmitJob { request: 1, job });
    let pull = rollout_core::protocol::Pull { incarnation, free_slots: 3, assigns_through: 0 };
    let out = feed(&mut c, CoordinatorInput::FromWorker { worker: worker_id(), message: ToCoordinator::Pull(pull) });
    let assigns: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            CoordinatorOutput::Send { message: ToWorker::Assign(a), .. } => Some(a.clone()),
            _ => None,
        })
        .collect();
    for (i, a) in assigns.iter().take(2).enumerate() {
        let outcome = if i == 0 {
            rollout_core::protocol::Outcome::Succeeded { result: rollout_core::ContentId::of(b"r"), size_bytes: 1 }
        } else {
            rollout_core::protocol::Outcome::Failed { message: "boom".into() }
        };
        let submit = rollout_core::protocol::Submit { incarnation, task: a.task, token: a.token, outcome };
        let mut out = Vec::new();
        let _ = c.handle_batch(
            now(),
            [CoordinatorInput::Submit { worker: worker_id(), submit, inline_result: Some(b"r".to_vec()) }],
            &mut out,
        );
    }
    feed(&mut c, CoordinatorInput::OpenJob { request: 2, name: "open".into(), idempotency_key: Some("o".into()) });
    storage
}
