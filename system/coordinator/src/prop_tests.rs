//! Random interleavings of every kind of input, checked against the safety
//! invariants after every step, and run twice to prove determinism.

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{Assignment, Outcome, Submit, ToCoordinator};
use rollout_core::traits::{KeyValue, Storage};
use rollout_core::{ContentId, FencingToken, Incarnation, JobId, TaskId};
use rollout_storage::RedbStorage;

use crate::tests::{Harness, assigns, spec};
use crate::{CoordinatorInput, CoordinatorOutput, OperatorReply, TaskState};

const WORKERS: [&str; 3] = ["w0", "w1", "w2"];

#[derive(Debug, Clone)]
enum Op {
    Register(usize),
    Beat {
        worker: usize,
        keep_mask: u8,
    },
    Pull {
        worker: usize,
        free: u32,
    },
    Submit {
        worker: usize,
        pick: usize,
        fail: bool,
        result: u8,
        forge_token: Option<u64>,
    },
    SubmitJob {
        tasks: u32,
    },
    /// Streamed submission: open (a key from a small set, so re-opens happen), append
    /// (from a first index at, before or past the end), seal (with the count held, or
    /// a wrong one).
    OpenJob {
        key: u8,
    },
    Append {
        pick: usize,
        tasks: u32,
        back: u32,
    },
    Seal {
        pick: usize,
        off_by: u32,
    },
    CancelJob {
        pick: usize,
    },
    Drain(usize),
    /// Time passes; with `beats`, every registered worker beats first, reporting all it got.
    Advance {
        millis: u64,
        beats: bool,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..3usize).prop_map(Op::Register),
        4 => (0..3usize, any::<u8>()).prop_map(|(worker, keep_mask)| Op::Beat { worker, keep_mask }),
        6 => (0..3usize, 0..4u32).prop_map(|(worker, free)| Op::Pull { worker, free }),
        8 => (0..3usize, 0..16usize, any::<bool>(), 0..2u8, proptest::option::weighted(0.1, 0..40u64))
            .prop_map(|(worker, pick, fail, result, forge_token)| Op::Submit { worker, pick, fail, result, forge_token }),
        2 => (1..4u32).prop_map(|tasks| Op::SubmitJob { tasks }),
        1 => (0..3u8).prop_map(|key| Op::OpenJob { key }),
        2 => (0..4usize, 1..4u32, 0..3u32).prop_map(|(pick, tasks, back)| Op::Append { pick, tasks, back }),
        1 => (0..4usize, proptest::bool::weighted(0.8))
            .prop_map(|(pick, right)| Op::Seal { pick, off_by: u32::from(!right) }),
        1 => (0..4usize).prop_map(|pick| Op::CancelJob { pick }),
        1 => (0..3usize).prop_map(Op::Drain),
        4 => (0..3_000u64, proptest::bool::weighted(0.8)).prop_map(|(millis, beats)| Op::Advance { millis, beats }),
        1 => Just(Op::Restart),
    ]
}

/// What the simulated workers know: their incarnation and the assignments they got;
/// and what the operator knows: the jobs it opened.
#[derive(Default)]
struct Fleet {
    incarnation: BTreeMap<usize, Incarnation>,
    received: BTreeMap<usize, Vec<Assignment>>,
    opened: Vec<JobId>,
}

/// What the checker remembers from the history.
#[derive(Default)]
struct Checker {
    committed: BTreeMap<TaskId, ContentId>,
    last_leased_token: BTreeMap<TaskId, FencingToken>,
    accepted_jobs: BTreeMap<JobId, u32>,
}

impl Checker {
    fn observe(&mut self, out: &[CoordinatorOutput]) {
        for o in out {
            match o {
                CoordinatorOutput::Event(HistoryEvent::Leased { task, token, .. }) => {
                    if let Some(prev) = self.last_leased_token.insert(*task, *token) {
                        assert!(*token > prev, "fenced_commit: token {token} for {task} after {prev}");
                    }
                }
                CoordinatorOutput::Event(HistoryEvent::Committed { task, token, result, .. }) => {
                    assert_eq!(
                        self.last_leased_token.get(task),
                        Some(token),
                        "fenced_commit: {task} committed under an old token"
                    );
                    let first = self.committed.insert(*task, *result);
                    assert!(first.is_none(), "single_commit: {task} committed twice");
                }
                CoordinatorOutput::Reply { reply: OperatorReply::JobAccepted { job, tasks, .. }, .. } => {
                    if let Some(before) = self.accepted_jobs.insert(*job, *tasks) {
                        assert_eq!(before, *tasks, "{job} accepted twice with different counts");
                    }
                }
                _ => {}
            }
        }
    }

    fn check_state(&self, h: &Harness) {
        for (task, result) in &self.committed {
            match h.coord().task_state(*task) {
                Some((TaskState::Committed { result: now, .. }, _)) => {
                    assert_eq!(now, *result, "single_commit: {task}'s result changed")
                }
                other => panic!("single_commit: committed {task} is now {other:?}"),
            }
        }
        for (job, tasks) in &self.accepted_jobs {
            let status = h.coord().job(*job).unwrap_or_else(|| panic!("no_lost_task: job {job} vanished"));
            let accounted = status.queued + status.leased + status.committed + status.dead_lettered + status.cancelled;
            assert_eq!((status.tasks, accounted), (*tasks, *tasks), "no_lost_task: job {job}: {status:?}");
        }
        // The counts the machine keeps (and serves status from) are the records' counts.
        for job in h.coord().jobs() {
            if job.phase == crate::JobPhase::Open {
                continue;
            }
            let mut counts = crate::TaskCounts::default();
            for r in h.reports(job.job) {
                match r.state {
                    TaskState::Queued => counts.queued += 1,
                    TaskState::Leased { .. } => counts.leased += 1,
                    TaskState::Committed { .. } | TaskState::CommittedInline { .. } => counts.committed += 1,
                    TaskState::DeadLettered => counts.dead_lettered += 1,
                    TaskState::Cancelled => counts.cancelled += 1,
                }
            }
            let kept = (job.queued, job.leased, job.committed, job.dead_lettered, job.cancelled);
            let stored = (counts.queued, counts.leased, counts.committed, counts.dead_lettered, counts.cancelled);
            assert_eq!(kept, stored, "{}: the kept counts differ from the records", job.job);
            assert_eq!(h.coord().job(job.job).map(|j| j.is_finished()), Some(counts.live() == 0));
        }
        for w in h.coord().workers() {
            for report in h.coord().jobs().iter().flat_map(|j| h.reports(j.job)) {
                if let TaskState::Leased { worker, incarnation, .. } = &report.state
                    && *worker == w.id
                {
                    assert_eq!(*incarnation, w.incarnation, "a lease outlived its worker's incarnation");
                }
            }
        }
    }
}

fn run(ops: &[Op]) -> (Vec<String>, Vec<KeyValue>) {
    let mut h = Harness::new();
    let mut fleet = Fleet::default();
    let mut checker = Checker::default();
    let mut trace = Vec::new();
    let mut request = 0;
    for op in ops {
        let out = match op.clone() {
            Op::Register(i) => {
                let before = h.outputs.len();
                let inc = h.register(WORKERS[i]);
                fleet.incarnation.insert(i, inc);
                fleet.received.remove(&i);
                // All of it: the leases the registration ended may go to others at once.
                h.outputs[before..].to_vec()
            }
            Op::Beat { worker, keep_mask } => {
                let Some(inc) = fleet.incarnation.get(&worker).copied() else { continue };
                let got = fleet.received.get(&worker).cloned().unwrap_or_default();
                let running = got
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| keep_mask & (1 << (i % 8)) != 0)
                    .map(|(_, a)| (a.task, a.token))
                    .collect();
                let through = got.iter().map(|a| a.seq).max().unwrap_or(0);
                h.beat(WORKERS[worker], inc, running, through)
            }
            Op::Pull { worker, free } => {
                let Some(inc) = fleet.incarnation.get(&worker).copied() else { continue };
                let through = fleet.received.get(&worker).and_then(|g| g.iter().map(|a| a.seq).max()).unwrap_or(0);
                h.from(
                    WORKERS[worker],
                    ToCoordinator::Pull(rollout_core::protocol::Pull {
                        incarnation: inc,
                        free_slots: free,
                        assigns_through: through,
                    }),
                )
            }
            Op::Submit { worker, pick, fail, result, forge_token } => {
                let Some(got) = fleet.received.get(&worker).filter(|g| !g.is_empty()) else { continue };
                let a = &got[pick % got.len()];
                let outcome = if fail {
                    Outcome::Failed { message: "boom".into() }
                } else {
                    Outcome::Succeeded { result: ContentId::of(&[result]), size_bytes: 1 }
                };
                let token = forge_token.map_or(a.token, FencingToken);
                h.from(
                    WORKERS[worker],
                    ToCoordinator::Submit(Submit { incarnation: a.incarnation, task: a.task, token, outcome }),
                )
            }
            Op::SubmitJob { tasks } => h.submit_job((0..tasks).map(|_| spec("echo", 0)).collect()).1,
            Op::OpenJob { key } => {
                request += 1;
                let out = h.input(CoordinatorInput::OpenJob {
                    request: 1_000_000 + request,
                    name: "streamed".into(),
                    idempotency_key: Some(format!("k{key}")),
                });
                for o in &out {
                    if let CoordinatorOutput::Reply { reply: OperatorReply::JobOpened { job, .. }, .. } = o
                        && !fleet.opened.contains(job)
                    {
                        fleet.opened.push(*job);
                    }
                }
                out
            }
            Op::Append { pick, tasks, back } => {
                let Some(&job) = fleet.opened.get(pick % fleet.opened.len().max(1)) else { continue };
                let have = h.coord().job(job).map_or(0, |j| j.tasks);
                request += 1;
                h.input(CoordinatorInput::AppendTasks {
                    request: 1_000_000 + request,
                    job,
                    first_index: (have + 1).saturating_sub(back),
                    tasks: (0..tasks).map(|_| spec("echo", 0)).collect(),
                })
            }
            Op::Seal { pick, off_by } => {
                let Some(&job) = fleet.opened.get(pick % fleet.opened.len().max(1)) else { continue };
                let have = h.coord().job(job).map_or(0, |j| j.tasks);
                request += 1;
                h.input(CoordinatorInput::SealJob { request: 1_000_000 + request, job, tasks: have + off_by })
            }
            Op::CancelJob { pick } => {
                let jobs = h.coord().jobs();
                let Some(job) = jobs.get(pick % jobs.len().max(1)) else { continue };
                request += 1;
                h.input(CoordinatorInput::CancelJob { request, job: job.job })
            }
            Op::Drain(i) => {
                request += 1;
                h.input(CoordinatorInput::Drain { request, worker: crate::tests::w(WORKERS[i]) })
            }
            Op::Advance { millis, beats } => {
                let mut out = Vec::new();
                if beats {
                    for (i, inc) in fleet.incarnation.clone() {
                        let got = fleet.received.get(&i).cloned().unwrap_or_default();
                        let running = got.iter().map(|a| (a.task, a.token)).collect();
                        let through = got.iter().map(|a| a.seq).max().unwrap_or(0);
                        out.extend(h.beat(WORKERS[i], inc, running, through));
                    }
                }
                h.advance(Duration::from_millis(millis));
                out.extend(h.tick());
                out
            }
            Op::Restart => {
                h.crash_and_restart();
                Vec::new()
            }
        };
        for (i, name) in WORKERS.iter().enumerate() {
            let mine: Vec<Assignment> = assigns(&out)
                .into_iter()
                .filter(|a| out.iter().any(|o| matches!(o, CoordinatorOutput::Send { to, message: rollout_core::protocol::ToWorker::Assign(x) } if to.as_str() == *name && x == a)))
                .collect();
            fleet.received.entry(i).or_default().extend(mine);
        }
        checker.observe(&out);
        checker.check_state(&h);
        trace.push(format!("{out:?}"));
    }
    if std::env::var_os("ROLLOUT_PROP_STATS").is_some() {
        eprintln!(
            "stats: committed {} leased {} jobs {}",
            checker.committed.len(),
            checker.last_leased_token.len(),
            checker.accepted_jobs.len()
        );
    }
    h.coord = None;
    let storage = RedbStorage::open_in_memory(&h.disk).expect("reopen");
    crate::audit::verify(&storage).expect("audit_chain verifies after any history");
    let contents = storage.scan(b"").expect("scan");
    (trace, contents)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn safety_holds_after_every_step_and_runs_are_deterministic(random in proptest::collection::vec(op(), 1..100)) {
        // Start from a working cluster so that most runs reach leases and commits.
        let mut ops = vec![Op::Register(0), Op::Register(1), Op::Register(2), Op::SubmitJob { tasks: 3 }];
        ops.extend(random);
        let (trace_a, storage_a) = run(&ops);
        let (trace_b, storage_b) = run(&ops);
        prop_assert_eq!(trace_a, trace_b, "same inputs, same outputs");
        prop_assert!(storage_a == storage_b, "same inputs, same storage contents");
    }
}

#[test]
fn scripted_run_commits() {
    let ops = [
        Op::Register(0),
        Op::SubmitJob { tasks: 2 },
        Op::Pull { worker: 0, free: 2 },
        Op::Submit { worker: 0, pick: 0, fail: false, result: 1, forge_token: None },
        Op::Submit { worker: 0, pick: 1, fail: false, result: 1, forge_token: None },
    ];
    let (trace, _) = run(&ops);
    assert!(trace[4].contains("Committed"), "{trace:#?}");
}
