//! A worker's result report: the fencing rule that judges it, the commit (with the
//! result's bytes, stored only for an accepted submit), and the end of a lease without
//! a result (retry with backoff, or dead-letter).

use std::time::Duration;

use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{Outcome, Submit, SubmitVerdict, ToWorker};
use rollout_core::{ContentId, Error, FencingToken, Now, Result, TaskId, WorkerId};

use crate::machine::{Batch, Coordinator};
use crate::records::{
    INLINE_RESULT_BYTES_MAX, ResultRefs, StateKind, TaskRecord, TaskState, result_key, result_refs_key, task_key,
};

/// How a lease ended without a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseEnd {
    /// Not the task's doing, and nothing ran (an assignment lost in transit, a worker
    /// that re-registered with a restarted coordinator): re-queued at once, no attempt
    /// charged.
    Uncharged,
    /// Its worker is gone (declared failed, closed its connection, registered anew):
    /// the attempt counts (a task that kills its worker must not be tried forever) but
    /// the retry goes out at once, since the loss says nothing about when the task
    /// could succeed.
    WorkerLost,
    /// The attempt failed (an error, a refused result): it counts, and the retry waits
    /// out the backoff.
    Failed,
}

impl Coordinator {
    pub(crate) fn on_submit(
        &mut self,
        now: Now,
        id: &WorkerId,
        submit: Submit,
        inline_result: Option<Vec<u8>>,
        batch: &mut Batch<'_>,
    ) -> Result<()> {
        let Submit { incarnation, task, token, outcome } = submit;
        let current = self.workers.get(id).is_some_and(|w| w.record.incarnation == incarnation);
        let mut verdict =
            if current { self.judge_submit(id, task, token, &outcome, batch)? } else { SubmitVerdict::Stale };
        match verdict {
            SubmitVerdict::Accepted => match outcome {
                Outcome::Succeeded { result, size_bytes }
                    if size_bytes <= u64::from(self.settings.limits.max_result_bytes) =>
                {
                    self.release_lease_slot(task);
                    let mut record = self.live_record(task)?;
                    // A small result stays in the task's record: no random key to write.
                    let committed = match inline_result {
                        Some(bytes) if bytes.len() <= INLINE_RESULT_BYTES_MAX && bytes.len() as u64 == size_bytes => {
                            debug_assert!(ContentId::of(&bytes) == result, "inline bytes of another result");
                            TaskState::CommittedInline { result, bytes }
                        }
                        bytes => {
                            self.claim_result(&result, size_bytes, bytes, batch)?;
                            TaskState::Committed { result, size_bytes }
                        }
                    };
                    let from = std::mem::replace(&mut record.state, committed);
                    self.count_transition(task.job, from.kind(), StateKind::Committed);
                    self.retire(task, record, batch)?;
                    self.record(HistoryEvent::Committed { task, worker: id.clone(), token, result }, batch);
                }
                Outcome::Succeeded { size_bytes, .. } => {
                    let reason = format!(
                        "result of {size_bytes} bytes exceeds limits.max_result_bytes ({})",
                        self.settings.limits.max_result_bytes
                    );
                    self.end_lease(now, task, reason, LeaseEnd::Failed, batch)?;
                    // The lease is over, but not with this result: the worker is told so.
                    verdict = SubmitVerdict::Refused;
                }
                Outcome::Failed { message } => self.end_lease(now, task, message, LeaseEnd::Failed, batch)?,
            },
            SubmitVerdict::Duplicate => {
                self.record(HistoryEvent::DuplicateSubmit { task, worker: id.clone(), token }, batch);
            }
            SubmitVerdict::Stale => {
                self.record(HistoryEvent::StaleRejected { task, worker: id.clone(), token }, batch);
            }
            SubmitVerdict::Refused => return Err(Error::internal("the fencing rule never refuses")),
        }
        batch.send(id, ToWorker::SubmitAck { task, token, verdict });
        if matches!(verdict, SubmitVerdict::Accepted | SubmitVerdict::Refused) {
            // A freed slot's credit comes with the worker's next pull; freed GPUs may
            // let a held-back credit take a task now.
            self.dispatch_to(id, batch)?;
        }
        Ok(())
    }

    /// The fencing rule (for a submit of the worker's current incarnation; any other is
    /// stale): only the current token of a live lease is accepted; a repeat
    /// of what was recorded is a duplicate; anything else is stale and changes nothing.
    /// A task no longer in memory (finished) is judged from its stored record.
    fn judge_submit(
        &self,
        id: &WorkerId,
        task: TaskId,
        token: FencingToken,
        outcome: &Outcome,
        batch: &Batch<'_>,
    ) -> Result<SubmitVerdict> {
        let stored;
        let record = match self.tasks.get(&task) {
            Some(Some(record)) => &**record,
            Some(None) => return Ok(SubmitVerdict::Stale),
            None => {
                if !self.jobs.contains_key(&task.job) {
                    return Ok(SubmitVerdict::Stale);
                }
                match batch.load::<TaskRecord>(&task_key(task))? {
                    Some(r) => {
                        stored = r;
                        &stored
                    }
                    None => return Ok(SubmitVerdict::Stale),
                }
            }
        };
        #[cfg(feature = "planted-bugs")]
        if self.settings.planted.skip_fencing_check && matches!(record.state, TaskState::Leased { .. }) {
            return Ok(SubmitVerdict::Accepted);
        }
        if record.token != Some(token) {
            return Ok(SubmitVerdict::Stale);
        }
        Ok(match (&record.state, outcome) {
            (TaskState::Leased { worker, .. }, _) if worker == id => SubmitVerdict::Accepted,
            (state, Outcome::Succeeded { result: submitted, .. }) if state.committed_result() == Some(*submitted) => {
                SubmitVerdict::Duplicate
            }
            (TaskState::Queued | TaskState::DeadLettered, Outcome::Failed { message }) => {
                let recorded = record.errors.last().map(String::as_str);
                if recorded == Some(self.truncate(message).as_str()) {
                    SubmitVerdict::Duplicate
                } else {
                    SubmitVerdict::Stale
                }
            }
            _ => SubmitVerdict::Stale,
        })
    }

    /// The record of a live task that has one (it was leased at least once).
    fn live_record(&self, task: TaskId) -> Result<TaskRecord> {
        match self.tasks.get(&task) {
            Some(Some(record)) => Ok((**record).clone()),
            _ => Err(Error::internal(format!("task {task} has no live record"))),
        }
    }

    /// One more committed task names `result`: the first that carries its bytes stores
    /// them (none in a simulation, which carries ids only).
    fn claim_result(
        &mut self,
        result: &ContentId,
        size_bytes: u64,
        bytes: Option<Vec<u8>>,
        batch: &mut Batch<'_>,
    ) -> Result<()> {
        let refs_key = result_refs_key(result);
        let mut refs: ResultRefs = batch.load(&refs_key)?.unwrap_or(ResultRefs { refs: 0, size_bytes, stored: false });
        debug_assert!(bytes.as_ref().is_none_or(|b| ContentId::of(b) == *result), "inline bytes of another result");
        if !refs.stored
            && let Some(bytes) = bytes
            && bytes.len() as u64 == size_bytes
        {
            batch.put_chunked(&result_key(result), &bytes)?;
            refs.stored = true;
        }
        refs.refs += 1;
        batch.put(&refs_key, &refs)
    }

    /// One committed task fewer names `result` (its job was deleted): the last one
    /// takes the bytes with it.
    pub(crate) fn release_result(&mut self, result: &ContentId, batch: &mut Batch<'_>) -> Result<()> {
        let refs_key = result_refs_key(result);
        let Some(mut refs) = batch.load::<ResultRefs>(&refs_key)? else { return Ok(()) };
        if refs.refs <= 1 {
            batch.delete(&refs_key)?;
            batch.delete_chunked(&result_key(result))?;
        } else {
            refs.refs -= 1;
            batch.put(&refs_key, &refs)?;
        }
        Ok(())
    }

    /// Removes a task's lease from its worker's books (slots and GPUs).
    pub(crate) fn release_lease_slot(&mut self, task: TaskId) {
        let Some(Some(record)) = self.tasks.get(&task) else { return };
        let gpus = self.jobs.get(&task.job).and_then(|j| j.shape(task.index)).map_or(0, |s| s.gpus);
        if let TaskState::Leased { worker, .. } = &record.state
            && let Some(w) = self.workers.get_mut(worker)
        {
            w.leases.remove(&task);
            w.gpus_in_use = w.gpus_in_use.saturating_sub(gpus);
        }
    }

    /// Ends a task's current lease without a result, as `how` says: whether the
    /// attempt counts against `tasks.max_attempts` (its error is recorded) and whether
    /// the retry waits out the backoff.
    pub(crate) fn end_lease(
        &mut self,
        now: Now,
        task: TaskId,
        error: String,
        how: LeaseEnd,
        batch: &mut Batch<'_>,
    ) -> Result<()> {
        let mut record = self.live_record(task)?;
        if !matches!(record.state, TaskState::Leased { .. }) {
            return Ok(());
        }
        self.release_lease_slot(task);
        let error = self.truncate(&error);
        let max_attempts = self.settings.tasks.max_attempts as usize;
        let failed = how != LeaseEnd::Uncharged;
        if failed {
            record.errors.push(error.clone());
            let excess = record.errors.len().saturating_sub(max_attempts);
            record.errors.drain(..excess);
        }
        let attempt = record.attempt;
        if failed && record.errors.len() >= max_attempts {
            let from = std::mem::replace(&mut record.state, TaskState::DeadLettered);
            self.count_transition(task.job, from.kind(), StateKind::DeadLettered);
            self.retire(task, record, batch)?;
            self.record(HistoryEvent::DeadLettered { task, attempts: attempt }, batch);
            return Ok(());
        }
        let failures = record.errors.len() as u32;
        let from = std::mem::replace(&mut record.state, TaskState::Queued);
        self.count_transition(task.job, from.kind(), StateKind::Queued);
        self.tasks.insert(task, Some(Box::new(record)));
        self.dirty_tasks.insert(task);
        if how == LeaseEnd::Failed {
            let delay = self.retry_backoff(failures);
            self.delayed.insert((now.mono + delay, task));
        } else {
            self.push_ready(task);
        }
        let error = if failed || !error.is_empty() { error } else { "assignment lost in transit".to_owned() };
        self.record(HistoryEvent::Requeued { task, attempt, error }, batch);
        Ok(())
    }

    /// `retry_backoff_initial × 2^(failures-1)`, capped at `retry_backoff_max`.
    fn retry_backoff(&self, failures: u32) -> Duration {
        let t = &self.settings.tasks;
        let doublings = failures.saturating_sub(1).min(32);
        t.retry_backoff_initial.saturating_mul(1u32 << doublings.min(31)).min(t.retry_backoff_max)
    }
}
