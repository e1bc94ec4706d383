//! rollout-history: the invariant checker. It judges a recorded history ([`HistoryRecord`]s in their
//! total order) plus, at the end, the acknowledged jobs and the tasks the coordinator
//! holds, and nothing else, so it can later judge histories from real binaries too.
//!
//! Invariants (names as in DESIGN.md):
//! - `single_commit`: at most one `Committed` per task, and nothing leases or commits a
//!   task after it reached a terminal state.
//! - `fenced_commit`: a commit carries the task's latest leased token; leased tokens
//!   strictly increase per task.
//! - `self_fence`: after a worker's `SelfFenced`, it starts no task until the coordinator
//!   has registered it again. (The simulator additionally checks, with
//!   `rollout_core::oracle::SelfFenceOracle` over what each worker sent and received,
//!   that no Submit or start leaves at or after its deadline.)
//! - `no_overlap`: no task runs on two workers at once (strict only when clocks stay
//!   within the skew budget).
//! - `no_lost_task` (end): every task of every acknowledged job is held by the
//!   coordinator exactly once, unless the job expired (`job_expired`, after its
//!   retention), which it may only do once every one of its tasks ended.
//! - `progress` (end, after faults heal): every such task is terminal.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use rollout_core::history::{HistoryEvent, HistoryRecord};
use rollout_core::{FencingToken, Incarnation, JobId, TaskId, WorkerId};

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The invariant's name, e.g. `fenced_commit`.
    pub invariant: &'static str,
    /// The history position at which it broke (`None` for end-of-run checks).
    pub seq: Option<u64>,
    /// What happened, naming the task, worker and tokens.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.seq {
            Some(seq) => write!(f, "{} violated at event #{seq}: {}", self.invariant, self.message),
            None => write!(f, "{} violated at end of run: {}", self.invariant, self.message),
        }
    }
}

/// A task's terminal-or-not state as the end-of-run checks need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalState {
    /// Queued or leased.
    Pending,
    /// Committed, dead-lettered or cancelled.
    Terminal,
}

#[derive(Debug, Default)]
struct TaskTrack {
    latest_token: Option<FencingToken>,
    committed: bool,
    terminal: bool,
    /// Runs in progress: (worker, token).
    running: BTreeSet<(WorkerId, FencingToken)>,
}

/// Incremental checker: feed records in order with [`Checker::observe`].
#[derive(Debug)]
pub struct Checker {
    strict_overlap: bool,
    tasks: BTreeMap<TaskId, TaskTrack>,
    /// Workers fenced and not yet registered again.
    fenced: BTreeSet<WorkerId>,
    /// Accepted jobs and their task counts.
    accepted: BTreeMap<JobId, u32>,
    /// Jobs deleted after their retention: no longer held, and never lost.
    pub expired: BTreeSet<JobId>,
    /// Overlaps seen while `no_overlap` is not strict (reported, not failed).
    pub overlaps: u64,
    /// Committed results seen.
    pub commits: u64,
}

impl Checker {
    /// A checker; `strict_overlap` makes `no_overlap` fail the run.
    pub fn new(strict_overlap: bool) -> Self {
        Checker {
            strict_overlap,
            tasks: BTreeMap::new(),
            fenced: BTreeSet::new(),
            accepted: BTreeMap::new(),
            expired: BTreeSet::new(),
            overlaps: 0,
            commits: 0,
        }
    }

    /// Judges one record; the first violation it finds.
    pub fn observe(&mut self, record: &HistoryRecord) -> Result<(), Violation> {
        let seq = Some(record.seq);
        let fail = |invariant, message: String| Err(Violation { invariant, seq, message });
        match &record.event {
            HistoryEvent::Registered { worker, .. } => {
                self.fenced.remove(worker);
            }
            HistoryEvent::SelfFenced { worker, .. } => {
                self.fenced.insert(worker.clone());
            }
            HistoryEvent::Leased { task, worker, token, .. } => {
                let t = self.tasks.entry(*task).or_default();
                if t.terminal {
                    return fail("single_commit", format!("{task} leased to {worker} (token {token}) after it ended"));
                }
                if let Some(prev) = t.latest_token
                    && *token <= prev
                {
                    return fail(
                        "fenced_commit",
                        format!("{task} leased to {worker} with token {token}, not above previous token {prev}"),
                    );
                }
                t.latest_token = Some(*token);
            }
            HistoryEvent::Committed { task, worker, token, .. } => {
                let t = self.tasks.entry(*task).or_default();
                if t.committed || t.terminal {
                    return fail("single_commit", format!("{task} committed again by {worker} (token {token})"));
                }
                if t.latest_token != Some(*token) {
                    return fail(
                        "fenced_commit",
                        format!(
                            "{task} committed by {worker} with token {token}; latest lease token is {:?}",
                            t.latest_token
                        ),
                    );
                }
                t.committed = true;
                t.terminal = true;
                self.commits += 1;
            }
            HistoryEvent::DeadLettered { task, .. } | HistoryEvent::Cancelled { task } => {
                let t = self.tasks.entry(*task).or_default();
                if t.committed {
                    return fail("single_commit", format!("{task} ended again after its commit"));
                }
                t.terminal = true;
            }
            HistoryEvent::TaskStarted { task, worker, token } => {
                if self.fenced.contains(worker) {
                    return fail("self_fence", format!("{worker} started {task} (token {token}) while fenced"));
                }
                let t = self.tasks.entry(*task).or_default();
                if let Some((other, other_token)) = t.running.iter().find(|(w, _)| w != worker) {
                    self.overlaps += 1;
                    if self.strict_overlap {
                        return fail(
                            "no_overlap",
                            format!(
                                "{task} started on {worker} (token {token}) while running on {other} (token {other_token})"
                            ),
                        );
                    }
                }
                t.running.insert((worker.clone(), *token));
            }
            HistoryEvent::TaskStopped { task, worker, token } => {
                if let Some(t) = self.tasks.get_mut(task) {
                    t.running.remove(&(worker.clone(), *token));
                }
            }
            HistoryEvent::JobAccepted { job, tasks } => {
                self.accepted.insert(*job, *tasks);
            }
            HistoryEvent::JobExpired { job } => {
                let tasks = self.accepted.get(job).copied().unwrap_or(0);
                if let Some(index) =
                    (0..tasks).find(|i| !self.tasks.get(&TaskId::new(*job, *i)).is_some_and(|t| t.terminal))
                {
                    return fail("no_lost_task", format!("{job} expired while its task {index} had not ended"));
                }
                self.expired.insert(*job);
            }
            HistoryEvent::DeclaredFailed { .. }
            | HistoryEvent::DuplicateSubmit { .. }
            | HistoryEvent::StaleRejected { .. }
            | HistoryEvent::Requeued { .. }
            | HistoryEvent::Drained { .. } => {}
        }
        Ok(())
    }

    /// End of run: `no_lost_task` over the coordinator's tasks, and `progress` when
    /// `check_progress`. `acked` lists acknowledged jobs with their task counts;
    /// `held` every task the coordinator holds (a task listed twice is a violation).
    pub fn finish(
        &self,
        acked: &[(JobId, u32)],
        held: impl IntoIterator<Item = (TaskId, FinalState)>,
        check_progress: bool,
    ) -> Result<(), Violation> {
        let mut states: BTreeMap<TaskId, FinalState> = BTreeMap::new();
        for (task, state) in held {
            if states.insert(task, state).is_some() {
                return Err(end("no_lost_task", format!("{task} is held in more than one state")));
            }
        }
        for (job, tasks) in acked.iter().filter(|(job, _)| !self.expired.contains(job)) {
            for index in 0..*tasks {
                let task = TaskId::new(*job, index);
                match states.get(&task) {
                    None => return Err(end("no_lost_task", format!("{task} of acknowledged {job} is missing"))),
                    Some(FinalState::Pending) if check_progress => {
                        return Err(end("progress", format!("{task} is not terminal at the end of the run")));
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }
}

fn end(invariant: &'static str, message: String) -> Violation {
    Violation { invariant, seq: None, message }
}

/// Judges a whole recorded history; the first violation.
pub fn check_history(records: &[HistoryRecord], strict_overlap: bool) -> Result<Checker, Violation> {
    let mut checker = Checker::new(strict_overlap);
    for record in records {
        checker.observe(record)?;
    }
    Ok(checker)
}

/// A task's state as the coordinator reports it (`rollout results`), for
/// [`check_states`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportedState {
    /// Waiting for a worker.
    Queued,
    /// Running somewhere.
    Leased,
    /// Done.
    Committed,
    /// Out of attempts.
    DeadLettered,
    /// Cancelled.
    Cancelled,
}

impl ReportedState {
    /// The state named as `rollout results` prints it (`queued`, `dead_lettered`, ...).
    pub fn parse(text: &str) -> Option<ReportedState> {
        Some(match text {
            "queued" => ReportedState::Queued,
            "leased" => ReportedState::Leased,
            "committed" => ReportedState::Committed,
            "dead_lettered" => ReportedState::DeadLettered,
            "cancelled" => ReportedState::Cancelled,
            _ => return None,
        })
    }

    fn terminal_event(event: &HistoryEvent) -> Option<(TaskId, ReportedState)> {
        match event {
            HistoryEvent::Committed { task, .. } => Some((*task, ReportedState::Committed)),
            HistoryEvent::DeadLettered { task, .. } => Some((*task, ReportedState::DeadLettered)),
            HistoryEvent::Cancelled { task } => Some((*task, ReportedState::Cancelled)),
            _ => None,
        }
    }
}

/// `no_lost_task` against the coordinator's own account of its tasks (`reported`, the
/// task states of `rollout results`), not against the history alone: every task of
/// every job the history accepted (and did not see expire) is reported exactly once,
/// and a task the history saw end is reported in that terminal state. Returns how many
/// tasks were checked.
pub fn check_states(records: &[HistoryRecord], reported: &[(TaskId, ReportedState)]) -> Result<usize, Violation> {
    let fail = |message: String| Err(Violation { invariant: "no_lost_task", seq: None, message });
    let mut by_task: BTreeMap<TaskId, ReportedState> = BTreeMap::new();
    for (task, state) in reported {
        if by_task.insert(*task, *state).is_some() {
            return fail(format!("{task} is reported more than once"));
        }
    }
    let mut accepted: BTreeMap<JobId, u32> = BTreeMap::new();
    let mut ended: BTreeMap<TaskId, ReportedState> = BTreeMap::new();
    for record in records {
        match &record.event {
            HistoryEvent::JobAccepted { job, tasks } => {
                accepted.insert(*job, *tasks);
            }
            HistoryEvent::JobExpired { job } => {
                accepted.remove(job);
            }
            event => {
                if let Some((task, state)) = ReportedState::terminal_event(event) {
                    ended.insert(task, state);
                }
            }
        }
    }
    let mut checked = 0;
    for (job, tasks) in accepted {
        for index in 0..tasks {
            let task = TaskId::new(job, index);
            let Some(state) = by_task.get(&task) else {
                return fail(format!("{task} of accepted {job} is not among the coordinator's tasks"));
            };
            if let Some(ended) = ended.get(&task)
                && ended != state
            {
                return fail(format!("{task} ended {ended:?} in the history but the coordinator reports it {state:?}"));
            }
            checked += 1;
        }
    }
    Ok(checked)
}

/// What a recorded history (`rollout check`) came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedVerdict {
    /// Records judged.
    pub records: usize,
    /// Commits seen.
    pub commits: u64,
    /// Overlapping runs seen (a violation only with `strict_overlap`).
    pub overlaps: u64,
    /// Tasks of accepted jobs.
    pub tasks: usize,
    /// Of those, the ones that reached a terminal state.
    pub terminal: usize,
}

/// Merges the histories of several nodes (each in its own order) into one: a k-way
/// merge by wall time that never reorders records of one node, so a node whose clock
/// stepped back cannot make its own history look inverted, and that never puts an
/// effect before a cause the records name:
/// - a worker's `task_started` comes after the coordinator's `leased` of that task and
///   token (when the histories hold that lease);
/// - the coordinator's `registered` of a worker's incarnation comes after that
///   worker's `fenced` of every earlier incarnation.
///
/// Wall clocks within the skew budget can otherwise invert such a pair: a coordinator
/// 40 ms ahead stamps a re-registration after the task it let the worker start, and
/// `self_fence` would see a fenced worker start a task. Should the records name an
/// impossible cycle, the earliest head goes first anyway (the merge never stalls).
/// Records are renumbered.
pub fn merge_histories(files: Vec<Vec<HistoryRecord>>) -> Vec<HistoryRecord> {
    let mut leases_unmerged: BTreeSet<(TaskId, FencingToken)> = BTreeSet::new();
    let mut fences_unmerged: BTreeMap<WorkerId, BTreeMap<Incarnation, usize>> = BTreeMap::new();
    for record in files.iter().flatten() {
        match &record.event {
            HistoryEvent::Leased { task, token, .. } => {
                leases_unmerged.insert((*task, *token));
            }
            HistoryEvent::SelfFenced { worker, incarnation } => {
                *fences_unmerged.entry(worker.clone()).or_default().entry(*incarnation).or_default() += 1;
            }
            _ => {}
        }
    }
    let waits = |event: &HistoryEvent,
                 leases: &BTreeSet<(TaskId, FencingToken)>,
                 fences: &BTreeMap<WorkerId, BTreeMap<Incarnation, usize>>| match event {
        HistoryEvent::TaskStarted { task, token, .. } => leases.contains(&(*task, *token)),
        HistoryEvent::Registered { worker, incarnation } => {
            fences.get(worker).is_some_and(|f| f.range(..*incarnation).next().is_some())
        }
        _ => false,
    };
    let mut heads: Vec<std::iter::Peekable<std::vec::IntoIter<HistoryRecord>>> =
        files.into_iter().map(|f| f.into_iter().peekable()).collect();
    let mut merged = Vec::new();
    loop {
        let mut earliest = None;
        let mut earliest_ready = None;
        for (i, head) in heads.iter_mut().enumerate() {
            let Some(record) = head.peek() else { continue };
            let key = (record.wall_unix_ms, i);
            if earliest.is_none_or(|e| key < e) {
                earliest = Some(key);
            }
            if earliest_ready.is_none_or(|e| key < e) && !waits(&record.event, &leases_unmerged, &fences_unmerged) {
                earliest_ready = Some(key);
            }
        }
        let Some((_, i)) = earliest_ready.or(earliest) else { break };
        let Some(mut record) = heads[i].next() else { break };
        match &record.event {
            HistoryEvent::Leased { task, token, .. } => {
                leases_unmerged.remove(&(*task, *token));
            }
            HistoryEvent::SelfFenced { worker, incarnation } => {
                if let Some(fences) = fences_unmerged.get_mut(worker)
                    && let Some(n) = fences.get_mut(incarnation)
                {
                    *n -= 1;
                    if *n == 0 {
                        fences.remove(incarnation);
                    }
                }
            }
            _ => {}
        }
        record.seq = merged.len() as u64;
        merged.push(record);
    }
    merged
}

/// Judges a recorded history: every safety invariant the history shows and, with
/// `require_complete`, `progress` (every task of every accepted job terminal). It does
/// not judge `no_lost_task`: a history cannot show that the coordinator still holds a
/// task; [`check_states`] does, against the coordinator's reported states.
pub fn check_recorded(
    records: &[HistoryRecord],
    strict_overlap: bool,
    require_complete: bool,
) -> Result<RecordedVerdict, Violation> {
    let checker = check_history(records, strict_overlap)?;
    // Per accepted job, its task count and the indexes seen ending. This costs what
    // the history holds, never what a job_accepted line claims (one line may claim
    // four billion tasks).
    let mut jobs: BTreeMap<JobId, (u32, BTreeSet<u32>)> = BTreeMap::new();
    let mut ended: Vec<TaskId> = Vec::new();
    for record in records {
        match &record.event {
            HistoryEvent::JobAccepted { job, tasks } => jobs.entry(*job).or_default().0 = *tasks,
            HistoryEvent::Committed { task, .. }
            | HistoryEvent::DeadLettered { task, .. }
            | HistoryEvent::Cancelled { task } => ended.push(*task),
            _ => {}
        }
    }
    for task in ended {
        if let Some((tasks, done)) = jobs.get_mut(&task.job)
            && task.index < *tasks
        {
            done.insert(task.index);
        }
    }
    let (mut tasks, mut terminal) = (0usize, 0usize);
    for (job, (count, done)) in &jobs {
        tasks = tasks.saturating_add(*count as usize);
        terminal += done.len();
        if require_complete && !checker.expired.contains(job) && done.len() < *count as usize {
            // The first index not seen ending: found within done.len() + 1 steps.
            if let Some(index) = (0..*count).find(|i| !done.contains(i)) {
                let task = TaskId::new(*job, index);
                return Err(end("progress", format!("{task} is not terminal at the end of the run")));
            }
        }
    }
    Ok(RecordedVerdict {
        records: records.len(),
        commits: checker.commits,
        overlaps: checker.overlaps,
        tasks,
        terminal,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollout_core::{Attempt, ContentId, Incarnation};

    #[test]
    fn recorded_histories_merge_per_node_in_order_and_are_judged() {
        let rec = |node: &str, ms: u64, event: HistoryEvent| HistoryRecord {
            seq: 0,
            node: node.into(),
            wall_unix_ms: ms,
            wall_unix_us: None,
            event,
        };
        let accepted = HistoryEvent::JobAccepted { job: JobId(1), tasks: 1 };
        let coord = vec![
            rec("coordinator", 10, accepted),
            rec("coordinator", 20, leased("w1", 1).1),
            // The coordinator's clock stepped back: still after the lease.
            rec("coordinator", 15, committed("w1", 1).1),
        ];
        let worker = vec![rec("w1", 21, started("w1", 1).1), rec("w1", 22, stopped("w1", 1).1)];
        let merged = merge_histories(vec![coord, worker]);
        assert_eq!(merged.iter().map(|r| r.seq).collect::<Vec<_>>(), [0, 1, 2, 3, 4]);
        let verdict = check_recorded(&merged, true, true).expect("clean");
        assert_eq!((verdict.commits, verdict.tasks, verdict.terminal), (1, 1, 1));
        // Without the commit the task is pending: fine, unless completeness is required.
        let partial: Vec<_> =
            merged.iter().filter(|r| !matches!(r.event, HistoryEvent::Committed { .. })).cloned().collect();
        assert!(check_recorded(&partial, true, false).is_ok());
        assert_eq!(check_recorded(&partial, true, true).expect_err("incomplete").invariant, "progress");
    }

    #[test]
    fn a_job_accepted_line_claiming_billions_of_tasks_costs_what_the_history_holds() {
        // Found by the history_jsonl fuzz target: one 100-byte line claiming millions of
        // tasks made the verdict list every claimed task. Two of four billion ended.
        let job = JobId(7);
        let cancelled = |index| ("coordinator", HistoryEvent::Cancelled { task: TaskId::new(job, index) });
        let h = history(vec![
            ("coordinator", HistoryEvent::JobAccepted { job, tasks: u32::MAX }),
            cancelled(0),
            cancelled(1),
            cancelled(u32::MAX),
        ]);
        let verdict = check_recorded(&h, true, false).expect("safe");
        assert_eq!(
            (verdict.tasks, verdict.terminal),
            (u32::MAX as usize, 2),
            "an index past the count is not its task"
        );
        let v = check_recorded(&h, true, true).expect_err("incomplete");
        assert_eq!(v.invariant, "progress");
        assert!(v.message.contains("job-7.2"), "{}", v.message);
        assert_eq!(check_states(&h, &[]).expect_err("none reported").invariant, "no_lost_task");
    }

    #[test]
    fn merging_puts_named_causes_first_whatever_the_skew() {
        let rec = |node: &str, ms: u64, event: HistoryEvent| HistoryRecord {
            seq: 0,
            node: node.into(),
            wall_unix_ms: ms,
            wall_unix_us: None,
            event,
        };
        let fenced = |inc| HistoryEvent::SelfFenced { worker: w("w1"), incarnation: Incarnation(inc) };
        let registered = |inc| HistoryEvent::Registered { worker: w("w1"), incarnation: Incarnation(inc) };
        // w1 starts under token 1, fences at 1000, registers again (incarnation 2) at
        // 1010 and starts under token 2 at 1015 (true times). The coordinator's clock
        // runs `skew` ms ahead of w1's.
        let run = |skew: i64| {
            let at = |ms: i64| (ms + skew) as u64;
            let coord = vec![
                rec("coordinator", at(100), registered(1)),
                rec("coordinator", at(100), leased("w1", 1).1),
                rec("coordinator", at(1010), registered(2)),
                rec("coordinator", at(1012), leased("w1", 2).1),
            ];
            let worker = vec![
                rec("w1", 101, started("w1", 1).1),
                rec("w1", 102, stopped("w1", 1).1),
                rec("w1", 1000, fenced(1)),
                rec("w1", 1015, started("w1", 2).1),
            ];
            merge_histories(vec![coord, worker])
        };
        for skew in [-40, 0, 40] {
            let merged = run(skew);
            assert!(check_history(&merged, true).is_ok(), "skew {skew}: {merged:#?}");
        }
        // A real violation still shows: a start under the old token after the fence.
        let coord = vec![rec("coordinator", 140, leased("w1", 1).1)];
        let worker = vec![rec("w1", 1000, fenced(1)), rec("w1", 1015, started("w1", 1).1)];
        let v = check_history(&merge_histories(vec![coord, worker]), true).expect_err("violation");
        assert_eq!(v.invariant, "self_fence");
    }

    fn w(n: &str) -> WorkerId {
        WorkerId::new(n).expect("valid")
    }
    fn t() -> TaskId {
        TaskId::new(JobId(1), 0)
    }
    fn history(events: Vec<(&str, HistoryEvent)>) -> Vec<HistoryRecord> {
        events
            .into_iter()
            .enumerate()
            .map(|(i, (node, event))| HistoryRecord {
                seq: i as u64,
                node: node.into(),
                wall_unix_ms: 0,
                wall_unix_us: None,
                event,
            })
            .collect()
    }
    fn leased(worker: &str, token: u64) -> (&'static str, HistoryEvent) {
        (
            "coordinator",
            HistoryEvent::Leased { task: t(), worker: w(worker), token: FencingToken(token), attempt: Attempt(1) },
        )
    }
    fn committed(worker: &str, token: u64) -> (&'static str, HistoryEvent) {
        (
            "coordinator",
            HistoryEvent::Committed {
                task: t(),
                worker: w(worker),
                token: FencingToken(token),
                result: ContentId::of(b"r"),
            },
        )
    }
    fn started(worker: &'static str, token: u64) -> (&'static str, HistoryEvent) {
        (worker, HistoryEvent::TaskStarted { task: t(), worker: w(worker), token: FencingToken(token) })
    }
    fn stopped(worker: &'static str, token: u64) -> (&'static str, HistoryEvent) {
        (worker, HistoryEvent::TaskStopped { task: t(), worker: w(worker), token: FencingToken(token) })
    }

    #[test]
    fn clean_history_passes() {
        let h = history(vec![leased("w1", 1), started("w1", 1), stopped("w1", 1), committed("w1", 1)]);
        let c = check_history(&h, true).expect("clean");
        assert_eq!(c.commits, 1);
    }

    #[test]
    fn double_commit_is_caught() {
        let h = history(vec![leased("w1", 1), committed("w1", 1), leased("w2", 2), committed("w2", 2)]);
        let v = check_history(&h, true).expect_err("violation");
        assert_eq!((v.invariant, v.seq), ("single_commit", Some(2)));
        let h = history(vec![leased("w1", 1), committed("w1", 1), committed("w1", 1)]);
        assert_eq!(check_history(&h, true).expect_err("violation").invariant, "single_commit");
    }

    #[test]
    fn stale_token_commit_is_caught() {
        let h = history(vec![leased("w1", 1), leased("w2", 2), committed("w1", 1)]);
        let v = check_history(&h, true).expect_err("violation");
        assert_eq!((v.invariant, v.seq), ("fenced_commit", Some(2)));
    }

    #[test]
    fn non_increasing_lease_token_is_caught() {
        let h = history(vec![leased("w1", 5), leased("w2", 5)]);
        assert_eq!(check_history(&h, true).expect_err("violation").invariant, "fenced_commit");
    }

    #[test]
    fn overlap_is_caught_when_strict_and_counted_otherwise() {
        let h = history(vec![leased("w1", 1), started("w1", 1), leased("w2", 2), started("w2", 2)]);
        let v = check_history(&h, true).expect_err("violation");
        assert_eq!((v.invariant, v.seq), ("no_overlap", Some(3)));
        assert_eq!(check_history(&h, false).expect("lenient").overlaps, 1);
        let sequential = history(vec![started("w1", 1), stopped("w1", 1), started("w2", 2)]);
        assert!(check_history(&sequential, true).is_ok());
    }

    #[test]
    fn start_while_fenced_is_caught() {
        let fenced = ("w1", HistoryEvent::SelfFenced { worker: w("w1"), incarnation: Incarnation(1) });
        let h = history(vec![fenced.clone(), started("w1", 3)]);
        assert_eq!(check_history(&h, true).expect_err("violation").invariant, "self_fence");
        let registered = ("coordinator", HistoryEvent::Registered { worker: w("w1"), incarnation: Incarnation(2) });
        let h = history(vec![fenced, registered, started("w1", 3)]);
        assert!(check_history(&h, true).is_ok());
    }

    #[test]
    fn lost_and_unfinished_tasks_are_caught() {
        let c = Checker::new(true);
        let acked = [(JobId(1), 2)];
        let one = [(TaskId::new(JobId(1), 0), FinalState::Terminal)];
        assert_eq!(c.finish(&acked, one, false).expect_err("lost").invariant, "no_lost_task");
        let both = [(TaskId::new(JobId(1), 0), FinalState::Terminal), (TaskId::new(JobId(1), 1), FinalState::Pending)];
        assert!(c.finish(&acked, both, false).is_ok());
        assert_eq!(c.finish(&acked, both, true).expect_err("unfinished").invariant, "progress");
        let twice =
            [(TaskId::new(JobId(1), 0), FinalState::Terminal), (TaskId::new(JobId(1), 0), FinalState::Terminal)];
        assert_eq!(c.finish(&acked, twice, false).expect_err("twice").invariant, "no_lost_task");
    }
}
