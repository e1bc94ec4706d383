//! The coordinator's rules at its edges, one test each: clocks it does not trust, peers
//! that send too much, jobs submitted in parts, retention, and memory that holds only
//! what is live.

use std::time::Duration;

use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{Heartbeat, Outcome, Register, SubmitVerdict, ToCoordinator, ToWorker};
use rollout_core::traits::{Gpu, Inventory, Storage};
use rollout_core::{Config, ContentId, Error, FencingToken, JobId, PROTOCOL_VERSION, TaskId};
use rollout_storage::RedbStorage;

use crate::audit;
use crate::records::{FORMAT, ResultRefs, result_refs_key};
use crate::tests::{Harness, assigns, spec, w};
use crate::*;

fn success(bytes: &[u8]) -> Outcome {
    Outcome::Succeeded { result: ContentId::of(bytes), size_bytes: bytes.len() as u64 }
}

fn beat_with_due(h: &mut Harness, worker: &str, incarnation: rollout_core::Incarnation, due_at: std::time::SystemTime) {
    h.from(
        worker,
        ToCoordinator::Heartbeat(Heartbeat {
            incarnation,
            beat_seq: 1,
            due_at,
            running: vec![],
            assigns_through: 0,
            metrics: None,
        }),
    );
}

/// Submits `bytes` as the result of `a`, the bytes inline (as the driver does).
fn submit_with_bytes(h: &mut Harness, a: &Assignment, bytes: &[u8]) -> Vec<CoordinatorOutput> {
    h.input_batch(vec![CoordinatorInput::Submit {
        worker: w("w1"),
        submit: rollout_core::protocol::Submit {
            incarnation: a.incarnation,
            task: a.task,
            token: a.token,
            outcome: success(bytes),
        },
        inline_result: Some(bytes.to_vec()),
    }])
}

fn declared_failed(h: &Harness, worker: &str) -> bool {
    h.events().iter().any(|e| matches!(e, HistoryEvent::DeclaredFailed { worker: id, .. } if *id == w(worker)))
}

/// Advances time in scan ticks until `until` has passed.
fn run_for(h: &mut Harness, until: Duration) {
    let step = h.settings.health.failure_scan_interval;
    let mut passed = Duration::ZERO;
    while passed < until {
        h.advance(step);
        h.tick();
        passed += step;
    }
}

fn reply_of(out: &[CoordinatorOutput]) -> OperatorReply {
    out.iter()
        .find_map(|o| match o {
            CoordinatorOutput::Reply { reply, .. } => Some(reply.clone()),
            _ => None,
        })
        .expect("a reply")
}

fn rejection(out: &[CoordinatorOutput]) -> Error {
    match reply_of(out) {
        OperatorReply::Rejected(e) => e,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

// ---------------------------------------------------------------- clocks

#[test]
fn a_due_at_in_the_year_3000_buys_no_more_than_the_skew_budget() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    let year_3000 = std::time::UNIX_EPOCH + Duration::from_secs(32_503_680_000);
    let out = {
        beat_with_due(&mut h, "w1", inc, year_3000);
        h.outputs.clone()
    };
    assert!(
        out.iter().any(
            |o| matches!(o, CoordinatorOutput::Notice(Notice::ClockOffset { offset_ms, .. }) if *offset_ms > 1_000_000)
        ),
        "the offset is noticed"
    );
    let status = &h.coord().workers()[0];
    assert!(status.clock_offset_ms.is_some_and(|o| o > 1_000_000_000), "{status:?}");
    // Silent from now on: failed after 2 beats + budget + failure timeout + a scan, as for anyone.
    let hc = h.settings.health;
    let bound = 2 * hc.heartbeat_interval + hc.clock_skew_budget + hc.coordinator_failure_timeout;
    run_for(&mut h, bound - hc.failure_scan_interval);
    assert!(!declared_failed(&h, "w1"), "not before the failure timeout");
    run_for(&mut h, 2 * hc.failure_scan_interval);
    assert!(declared_failed(&h, "w1"), "a lying due_at did not keep it alive");
}

#[test]
fn a_worker_an_hour_behind_is_not_declared_failed_while_it_beats() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    let interval = h.settings.health.heartbeat_interval;
    for _ in 0..40 {
        h.advance(interval);
        let due = rollout_core::health::next_due_at(h.now.wall - Duration::from_secs(3600), interval);
        beat_with_due(&mut h, "w1", inc, due);
        h.tick();
    }
    assert!(!declared_failed(&h, "w1"), "its clock is off, not its heart");
    let notices =
        h.outputs.iter().filter(|o| matches!(o, CoordinatorOutput::Notice(Notice::ClockOffset { .. }))).count();
    assert_eq!(notices, 1, "said once, not every beat (NOTICE_INTERVAL)");
    assert!(h.coord().workers()[0].clock_offset_ms.is_some_and(|o| o < -3_500_000));
}

#[test]
fn the_coordinators_own_wall_clock_stepping_fakes_no_failure() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    let interval = h.settings.health.heartbeat_interval;
    for i in 0..20 {
        h.advance(interval);
        if i == 5 {
            // NTP steps the coordinator's wall clock a minute ahead; its monotonic clock goes on.
            h.now.wall += Duration::from_secs(60);
        }
        let due = rollout_core::health::next_due_at(h.now.wall, interval);
        beat_with_due(&mut h, "w1", inc, due);
        h.tick();
    }
    assert!(!declared_failed(&h, "w1"));
}

// ---------------------------------------------------------------- peers that send too much

fn register_refusal(h: &mut Harness, reg: Register) -> String {
    let out = h.from("w1", ToCoordinator::Register(reg));
    out.iter()
        .find_map(|o| match o {
            CoordinatorOutput::Send { message: ToWorker::RegisterRejected { reason }, .. } => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("not refused: {out:?}"))
}

#[test]
fn registrations_beyond_the_limits_are_refused_naming_the_limit() {
    let mut config = Config::default();
    config.limits.max_plugins_per_worker = 8;
    let mut h = Harness::with_config(config);
    let base = Register {
        protocol_version: PROTOCOL_VERSION,
        plugins: vec!["echo".into()],
        slots: 1,
        inventory: Inventory::default(),
        boot: 1,
        adopted: None,
    };
    let many = Register { plugins: (0..9).map(|i| format!("p{i}")).collect(), ..base.clone() };
    assert!(register_refusal(&mut h, many).contains("limits.max_plugins_per_worker"));
    let long = Register { plugins: vec!["x".repeat(300)], ..base.clone() };
    assert!(register_refusal(&mut h, long).contains("plugin name of 300 bytes"));
    let gpu = |name: String| Gpu { index: 0, name, uuid: "u".into(), memory_bytes: 1 };
    let gpus =
        Register { inventory: Inventory { gpus: vec![gpu("g".into()); 300], ..Inventory::default() }, ..base.clone() };
    assert!(register_refusal(&mut h, gpus).contains("300 GPUs"));
    let long_gpu =
        Register { inventory: Inventory { gpus: vec![gpu("g".repeat(1000))], ..Inventory::default() }, ..base };
    assert!(register_refusal(&mut h, long_gpu).contains("name or uuid"));
    assert!(h.coord().workers().is_empty());
}

#[test]
fn a_beat_reporting_more_than_its_slots_allow_is_looked_at_only_that_far() {
    let mut h = Harness::new();
    let inc = h.register_with("w1", &["echo"], 2, 0);
    let running: Vec<(TaskId, FencingToken)> =
        (0..50_000).map(|i| (TaskId::new(JobId(9), i), FencingToken(u64::from(i)))).collect();
    let out = h.beat("w1", inc, running, 0);
    let kept = 2 * rollout_core::protocol::RUNNING_PER_SLOT_MAX;
    assert!(
        out.iter().any(|o| matches!(o, CoordinatorOutput::Notice(Notice::BeatTruncated { reported: 50_000, kept: k, .. }) if *k == kept)),
        "{:?}",
        out.iter().find(|o| matches!(o, CoordinatorOutput::Notice(_)))
    );
    let stops = out
        .iter()
        .filter(|o| {
            matches!(
                o,
                CoordinatorOutput::Send {
                    message: ToWorker::Control(rollout_core::protocol::Control::CancelTask { .. }),
                    ..
                }
            )
        })
        .count();
    assert_eq!(stops, kept, "only the tasks looked at are told to stop");
    assert!(out.iter().any(|o| matches!(
        o,
        CoordinatorOutput::Send { message: ToWorker::HeartbeatAck { reregister: false, .. }, .. }
    )));
}

#[test]
fn a_stale_or_oversized_submit_stores_no_bytes() {
    let mut config = Config::default();
    config.limits.max_result_bytes = 1024;
    let mut h = Harness::with_config(config);
    let inc = h.register("w1");
    h.submit_job(vec![spec("echo", 0), spec("echo", 0)]);
    let got = h.pull("w1", inc, 2, 0);
    let stale = Assignment { token: FencingToken(999), ..got[0].clone() };
    let bytes = vec![7u8; 100];
    let verdict_of = |out: &[CoordinatorOutput]| {
        out.iter()
            .find_map(|o| match o {
                CoordinatorOutput::Send { message: ToWorker::SubmitAck { verdict, .. }, .. } => Some(*verdict),
                _ => None,
            })
            .expect("acked")
    };
    assert_eq!(verdict_of(&submit_with_bytes(&mut h, &stale, &bytes)), SubmitVerdict::Stale);
    let storage = h.storage();
    assert_eq!(stored_result(&*storage, &ContentId::of(&bytes)).expect("read"), None, "a stale submit stored nothing");
    assert!(storage.scan(b"c/r/").expect("scan").is_empty());
    // Over the limit: the attempt fails for its size, and nothing is stored either.
    let big = vec![1u8; 2048];
    let out = submit_with_bytes(&mut h, &got[1], &big);
    assert_eq!(verdict_of(&out), SubmitVerdict::Refused, "the worker is told its result was not taken");
    assert!(out.iter().any(|o| matches!(o, CoordinatorOutput::Event(HistoryEvent::Requeued { error, .. }) if error.contains("limits.max_result_bytes"))));
    assert_eq!(stored_result(&*storage, &ContentId::of(&big)).expect("read"), None);
    assert!(storage.scan(b"c/r/").expect("scan").is_empty(), "nothing over the limit either");
}

use rollout_core::protocol::Assignment;

// ---------------------------------------------------------------- jobs in parts

fn open(h: &mut Harness, name: &str, key: Option<&str>) -> OperatorReply {
    let request = h.next_request();
    reply_of(&h.input(CoordinatorInput::OpenJob {
        request,
        name: name.into(),
        idempotency_key: key.map(str::to_owned),
    }))
}

fn append(h: &mut Harness, job: JobId, first_index: u32, n: u32) -> OperatorReply {
    let request = h.next_request();
    let tasks = (0..n).map(|_| spec("echo", 0)).collect();
    reply_of(&h.input(CoordinatorInput::AppendTasks { request, job, first_index, tasks }))
}

fn seal(h: &mut Harness, job: JobId, tasks: u32) -> Vec<CoordinatorOutput> {
    let request = h.next_request();
    h.input(CoordinatorInput::SealJob { request, job, tasks })
}

#[test]
fn a_job_in_parts_runs_only_once_sealed_and_every_step_is_idempotent() {
    let mut h = Harness::new();
    let inc = h.register("w1");
    assert!(h.pull("w1", inc, 4, 0).is_empty());
    let OperatorReply::JobOpened { job, tasks: 0, sealed: false, existing: false } = open(&mut h, "big", Some("k1"))
    else {
        panic!("opened")
    };
    assert_eq!(append(&mut h, job, 0, 3), OperatorReply::TasksAppended { job, tasks: 3 });
    assert_eq!(append(&mut h, job, 0, 3), OperatorReply::TasksAppended { job, tasks: 3 }, "a repeat is skipped");
    assert_eq!(append(&mut h, job, 2, 3), OperatorReply::TasksAppended { job, tasks: 5 }, "the overlap is skipped");
    assert!(assigns(&h.outputs).is_empty(), "nothing runs before the seal");
    assert_eq!(h.coord().job(job).expect("kept").phase, JobPhase::Open);
    // Interrupted here: the same key finds the job and where it stopped.
    assert_eq!(
        open(&mut h, "big", Some("k1")),
        OperatorReply::JobOpened { job, tasks: 5, sealed: false, existing: true }
    );
    let out = seal(&mut h, job, 5);
    assert_eq!(reply_of(&out), OperatorReply::JobAccepted { job, tasks: 5, existing: false });
    assert!(out.iter().any(|o| matches!(o, CoordinatorOutput::Event(HistoryEvent::JobAccepted { tasks: 5, .. }))));
    assert_eq!(assigns(&out).len(), 4, "the waiting credits take tasks at the seal");
    assert_eq!(reply_of(&seal(&mut h, job, 5)), OperatorReply::JobAccepted { job, tasks: 5, existing: true });
    assert_eq!(
        open(&mut h, "big", Some("k1")),
        OperatorReply::JobOpened { job, tasks: 5, sealed: true, existing: true }
    );
    h.crash_and_restart();
    assert_eq!(h.coord().job(job).expect("durable").tasks, 5);
}

#[test]
fn appends_and_seals_that_do_not_fit_are_refused_naming_why() {
    let mut config = Config::default();
    config.limits.max_tasks_per_job = 10;
    config.limits.max_open_jobs = 2;
    let mut h = Harness::with_config(config);
    let OperatorReply::JobOpened { job, .. } = open(&mut h, "j", None) else { panic!("opened") };
    assert_eq!(append(&mut h, job, 0, 4), OperatorReply::TasksAppended { job, tasks: 4 });
    let gap = match append(&mut h, job, 6, 1) {
        OperatorReply::Rejected(e) => e.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(gap.contains("must start at index 4, not 6"), "{gap}");
    let over = match append(&mut h, job, 4, 7) {
        OperatorReply::Rejected(e) => e.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(over.contains("limits.max_tasks_per_job (10)"), "{over}");
    assert!(rejection(&seal(&mut h, job, 5)).to_string().contains("holds 4 tasks; the seal says 5"));
    open(&mut h, "j2", None);
    let full = match open(&mut h, "j3", None) {
        OperatorReply::Rejected(e) => e,
        other => panic!("{other:?}"),
    };
    assert!(matches!(full, Error::Recoverable { .. }) && full.to_string().contains("limits.max_open_jobs"), "{full}");
}

#[test]
fn an_open_job_never_sealed_is_abandoned_and_deleted() {
    let mut config = Config::default();
    config.tasks.open_job_timeout = Duration::from_secs(60);
    let mut h = Harness::with_config(config);
    let OperatorReply::JobOpened { job, .. } = open(&mut h, "forgotten", Some("key")) else { panic!("opened") };
    append(&mut h, job, 0, 3);
    run_for(&mut h, Duration::from_secs(61));
    assert!(h.outputs.iter().any(|o| matches!(o, CoordinatorOutput::Notice(Notice::JobAbandoned { tasks: 3, .. }))));
    assert!(h.coord().job(job).is_none());
    let left: Vec<_> = h.storage().scan(b"c/").expect("scan").into_iter().map(|(k, _)| k).collect();
    for prefix in [&b"c/j/"[..], b"c/js/", b"c/tp/", b"c/idem/"] {
        assert!(!left.iter().any(|k| k.starts_with(prefix)), "{:?} left behind", String::from_utf8_lossy(prefix));
    }
    // The key is free again: the same submission opens a new job.
    let OperatorReply::JobOpened { job: again, existing: false, .. } = open(&mut h, "forgotten", Some("key")) else {
        panic!("a new job")
    };
    assert_ne!(again, job);
}

// ---------------------------------------------------------------- retention

#[test]
fn a_finished_job_expires_with_its_results_and_shared_results_stay_while_named() {
    let mut config = Config::default();
    config.tasks.job_retention = Duration::from_secs(3600);
    let mut h = Harness::with_config(config);
    // Over the inline bound, so it is stored content-addressed, once.
    let same = vec![b's'; INLINE_RESULT_BYTES_MAX + 1];
    let inc = h.register("w1");
    let (first, _) = h.submit_job(vec![spec("echo", 0), spec("echo", 0)]);
    let got = h.pull("w1", inc, 2, 0);
    for a in &got {
        // Both tasks have the same result: stored once, named twice.
        submit_with_bytes(&mut h, a, &same);
    }
    assert!(h.coord().job(first).expect("kept").is_finished());
    h.advance(Duration::from_secs(1800));
    let (second, _) = h.submit_job(vec![spec("echo", 0)]);
    // The silent half hour failed w1 (the batch ran the failure scan that was due).
    assert!(h.events().iter().any(|e| matches!(e, HistoryEvent::DeclaredFailed { .. })));
    let inc = h.register("w1");
    let a = h.pull("w1", inc, 1, 0).remove(0);
    submit_with_bytes(&mut h, &a, &same);
    let refs = |h: &Harness, same: &[u8]| {
        h.storage()
            .get(&result_refs_key(&ContentId::of(same)))
            .expect("read")
            .map(|b| postcard::from_bytes::<ResultRefs>(&b).expect("refs").refs)
    };
    assert_eq!(refs(&h, &same), Some(3));
    // The first job's retention ends: its records go, the result stays for the second.
    run_for(&mut h, Duration::from_secs(1801));
    assert!(h.events().contains(&HistoryEvent::JobExpired { job: first }));
    assert!(h.coord().job(first).is_none());
    assert_eq!(refs(&h, &same), Some(1));
    assert_eq!(stored_result(&*h.storage(), &ContentId::of(&same)).expect("read").as_deref(), Some(&same[..]));
    assert_eq!(h.coord().task_reports(first, 0, 10).expect("read"), None, "reports of an expired job are gone");
    assert_eq!(stored_job(&*h.storage(), first).expect("read"), JobLookup::Gone);
    assert_eq!(stored_job(&*h.storage(), JobId(99)).expect("read"), JobLookup::Unknown);
    // Then the second's: the last name of the result takes its bytes along.
    run_for(&mut h, Duration::from_secs(1800));
    assert!(h.events().contains(&HistoryEvent::JobExpired { job: second }));
    assert_eq!(refs(&h, &same), None);
    assert_eq!(stored_result(&*h.storage(), &ContentId::of(&same)).expect("read"), None);
    assert!(h.storage().scan(b"c/r/").expect("scan").is_empty(), "its chunks went too");
    let left: Vec<String> = h
        .storage()
        .scan(b"c/")
        .expect("scan")
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
        .collect();
    assert!(
        left.iter().all(|k| k.starts_with("c/counters")
            || k.starts_with("c/w/")
            || k.starts_with("c/audit")
            || k.starts_with("c/format")),
        "{left:?}"
    );
}

#[test]
fn a_huge_job_is_deleted_a_bounded_chunk_per_batch() {
    let mut config = Config::default();
    config.tasks.job_retention = Duration::from_secs(1);
    let mut h = Harness::with_config(config);
    let n = DELETIONS_PER_BATCH_MAX * 2 + 10;
    let (job, _) = h.submit_job((0..n).map(|_| spec("echo", 0)).collect());
    let request = h.next_request();
    h.input(CoordinatorInput::CancelJob { request, job });
    h.advance(Duration::from_secs(2));
    let mut ticks = 0;
    while h.coord().poll_timeout() <= h.now.mono || ticks == 0 {
        h.tick();
        ticks += 1;
        assert!(ticks < 10, "the deletion does not end");
    }
    assert_eq!(ticks, 3, "two full chunks, then the rest with the job's last records: one batch each");
    assert!(h.events().contains(&HistoryEvent::JobExpired { job }));
}

#[test]
fn a_failed_worker_is_forgotten_after_its_retention() {
    let mut config = Config::default();
    config.health.failed_worker_retention = Duration::from_secs(60);
    let mut h = Harness::with_config(config);
    h.register("w1");
    run_for(&mut h, Duration::from_secs(10));
    assert!(declared_failed(&h, "w1"));
    assert_eq!(h.coord().workers().len(), 1, "kept for status a while");
    run_for(&mut h, Duration::from_secs(61));
    assert!(h.coord().workers().is_empty());
    assert!(h.outputs.iter().any(|o| matches!(o, CoordinatorOutput::Notice(Notice::WorkerForgotten { .. }))));
    h.crash_and_restart();
    assert!(h.coord().workers().is_empty(), "and its record is gone from storage");
}

// ---------------------------------------------------------------- what is live

#[test]
fn memory_holds_live_tasks_only_and_recovery_reads_only_unfinished_jobs() {
    let mut h = Harness::new();
    let inc = h.register_with("w1", &["echo"], 100, 0);
    let (done, _) = h.submit_job((0..50).map(|_| spec("echo", 0)).collect());
    let got = h.pull("w1", inc, 100, 0);
    for a in &got {
        h.submit("w1", a, success(b"ok"));
    }
    assert!(h.coord().job(done).expect("kept").is_finished());
    assert_eq!(h.coord().live_tasks(), 0, "finished tasks leave memory");
    let (queued, _) = h.submit_job((0..1000).map(|_| spec("other", 0)).collect());
    assert_eq!(h.coord().live_tasks(), 1000);
    h.crash_and_restart();
    assert_eq!(h.coord().live_tasks(), 1000, "only the unfinished job's tasks come back");
    let status = h.coord().job(queued).expect("kept");
    assert_eq!((status.queued, status.tasks), (1000, 1000));
    let totals = h.coord().status(&StatusQuery::default()).totals;
    assert_eq!(
        (totals.tasks.committed, totals.tasks.queued, totals.jobs_finished, totals.jobs_active),
        (50, 1000, 1, 1)
    );
}

#[test]
fn status_pages_cost_what_they_show() {
    let mut h = Harness::new();
    for i in 0..30 {
        h.register(&format!("w{i:02}"));
    }
    let inc = h.register_with("worker", &["echo"], 100, 0);
    assert!(h.pull("worker", inc, 100, 0).is_empty(), "credits wait for work");
    for _ in 0..25 {
        let (_, out) = h.submit_job(vec![spec("echo", 0)]);
        for a in assigns(&out) {
            h.submit("worker", &a, success(b"ok"));
        }
    }
    let (active, _) = h.submit_job(vec![spec("nobody-runs-this", 0)]);
    let page = h.coord().status(&StatusQuery {
        workers_max: 10,
        jobs: JobsQuery::Current { recent_finished: 3 },
        ..StatusQuery::default()
    });
    assert_eq!(page.workers.len(), 10);
    assert!(page.workers_more);
    assert_eq!(page.jobs.len(), 4, "the active job, then the three most recently finished");
    assert_eq!(page.jobs[0].job, active);
    assert!(page.jobs[1].job > page.jobs[2].job, "newest finished first");
    assert_eq!(page.totals.jobs_finished, 25);
    let next = h.coord().status(&StatusQuery {
        workers_after: page.workers.last().map(|w| w.id.clone()),
        workers_max: 100,
        jobs: JobsQuery::All { after: Some(JobId(20)) },
        jobs_max: 100,
    });
    assert_eq!(next.workers.len(), 21);
    assert!(!next.workers_more);
    assert_eq!(next.jobs.len(), 5, "jobs 21..=25");
}

#[test]
fn a_database_of_the_previous_format_is_read_and_marked_current_by_its_first_write() {
    let mut h = Harness::new();
    h.register("w1");
    h.coord = None;
    let storage = RedbStorage::open_in_memory(&h.disk).expect("open");
    let mut txn = storage.begin_write().expect("txn");
    txn.put(FORMAT, &postcard::to_allocvec(&FORMAT_VERSION_OLDEST).expect("encodes")).expect("put");
    txn.commit().expect("commit");
    drop(storage);
    h.crash_and_restart();
    h.register("w2");
    let format = h.storage().get(FORMAT).expect("read").map(|b| postcard::from_bytes::<u32>(&b).expect("a u32"));
    assert_eq!(format, Some(FORMAT_VERSION));
}

#[test]
fn a_database_of_another_format_is_refused_naming_both_versions() {
    let mut h = Harness::new();
    h.register("w1");
    h.coord = None;
    let storage = RedbStorage::open_in_memory(&h.disk).expect("open");
    let mut txn = storage.begin_write().expect("txn");
    txn.put(FORMAT, &postcard::to_allocvec(&7u32).expect("encodes")).expect("put");
    txn.commit().expect("commit");
    let err = Coordinator::recover(std::sync::Arc::new(storage), h.settings.clone(), h.now).expect_err("refused");
    assert!(
        err.to_string().contains("format 7")
            && err.to_string().contains(&format!("formats {FORMAT_VERSION_OLDEST} to {FORMAT_VERSION}")),
        "{err}"
    );
}

#[test]
fn audit_blocks_outlive_their_retention_by_nothing_and_what_is_kept_still_verifies() {
    let mut config = Config::default();
    config.tasks.job_retention = Duration::from_secs(3600);
    let mut h = Harness::with_config(config);
    h.register("w1");
    // A batch of 600 events is stored as blocks of AUDIT_BLOCK_ENTRIES_MAX.
    let (job, _) = h.submit_job((0..600).map(|_| spec("echo", 0)).collect());
    let request = h.next_request();
    h.input(CoordinatorInput::CancelJob { request, job });
    let blocks = h.storage().scan(b"c/audit/").expect("scan").len();
    assert_eq!(blocks, 1 + 1 + 3, "registered, accepted, then 600 cancels in blocks of 256");
    let before = audit::verify(&*h.storage()).expect("verifies");
    run_for(&mut h, Duration::from_secs(1800));
    h.register("w2");
    run_for(&mut h, Duration::from_secs(1801 + 60));
    // The first hour's blocks are gone (with the expired job), w2's registration is kept.
    let base = audit::base(&*h.storage()).expect("base");
    assert!(base.seq >= before, "the base moved past the old entries: {base:?}");
    let kept = audit::entries(&*h.storage()).expect("read");
    assert!(kept.iter().all(|e| e.seq > base.seq));
    assert!(kept.iter().any(|e| e.event().expect("decodes")
        == HistoryEvent::Registered { worker: w("w2"), incarnation: rollout_core::Incarnation(2) }));
    assert!(audit::verify(&*h.storage()).expect("what is kept verifies") >= 1);
    h.crash_and_restart();
    assert!(audit::verify(&*h.storage()).is_ok());
}
