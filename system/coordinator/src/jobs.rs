//! Jobs: submission in one message or streamed (open, append, seal), cancellation, the
//! per-job counts every status is served from, and deletion of finished jobs past
//! their retention and of open jobs never sealed.

use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{Control, NAME_BYTES_MAX, ToWorker};
use rollout_core::time::unix_millis;
use rollout_core::{Error, JobId, Now, Recoverable, Result, RetryHint, TaskId};

use crate::machine::{
    Batch, Coordinator, DELETIONS_PER_BATCH_MAX, Deletion, JobEntry, JobSubmission, Notice, OperatorReply, RequestId,
};
use crate::records::{self, *};

/// Most blobs one task may name as inputs (the wire holds it to the same).
pub const INPUTS_PER_TASK_MAX: usize = 64;

impl Coordinator {
    pub(crate) fn on_submit_job(
        &mut self,
        now: Now,
        request: RequestId,
        job: JobSubmission,
        batch: &mut Batch<'_>,
    ) -> Result<()> {
        if let Some(key) = &job.idempotency_key
            && let Some(existing) = batch.load::<JobId>(&idempotency_key(key))?
        {
            let reply = match self.jobs.get(&existing) {
                Some(j) if j.record.sealed => {
                    OperatorReply::JobAccepted { job: existing, tasks: j.record.tasks, existing: true }
                }
                Some(j) => OperatorReply::Rejected(Error::invalid_input(format!(
                    "idempotency_key: {existing} was opened with this key and is not sealed yet ({} tasks appended)",
                    j.record.tasks
                ))),
                None => OperatorReply::Rejected(Error::internal(format!("idempotency key names missing {existing}"))),
            };
            batch.reply(request, reply);
            return Ok(());
        }
        if let Err(e) = self.validate_name(&job.name).and_then(|()| self.validate_tasks(0, 0, &job.tasks)) {
            batch.reply(request, OperatorReply::Rejected(e));
            return Ok(());
        }
        let id = self.create_job(now, job.name, job.idempotency_key, batch)?;
        self.append(id, &job.tasks, batch)?;
        let tasks = self.seal(id, batch)?;
        batch.reply(request, OperatorReply::JobAccepted { job: id, tasks, existing: false });
        Ok(())
    }

    pub(crate) fn on_open_job(
        &mut self,
        now: Now,
        request: RequestId,
        name: String,
        idempotency_key: Option<String>,
        batch: &mut Batch<'_>,
    ) -> Result<()> {
        if let Some(key) = &idempotency_key
            && let Some(existing) = batch.load::<JobId>(&records::idempotency_key(key))?
        {
            let reply = match self.jobs.get(&existing) {
                Some(j) => OperatorReply::JobOpened {
                    job: existing,
                    tasks: j.record.tasks,
                    sealed: j.record.sealed,
                    existing: true,
                },
                None => OperatorReply::Rejected(Error::internal(format!("idempotency key names missing {existing}"))),
            };
            batch.reply(request, reply);
            return Ok(());
        }
        if let Err(e) = self.validate_name(&name) {
            batch.reply(request, OperatorReply::Rejected(e));
            return Ok(());
        }
        let max_open = self.settings.limits.max_open_jobs as usize;
        if self.open_jobs.len() >= max_open {
            let e = Error::recoverable(
                Recoverable::ResourceExhausted(format!(
                    "{} jobs are open for appends, the most limits.max_open_jobs allows; seal one, or wait for \
                     tasks.open_job_timeout to abandon unsealed ones",
                    self.open_jobs.len()
                )),
                RetryHint::Backoff,
            );
            batch.reply(request, OperatorReply::Rejected(e));
            return Ok(());
        }
        let id = self.create_job(now, name, idempotency_key, batch)?;
        batch.reply(request, OperatorReply::JobOpened { job: id, tasks: 0, sealed: false, existing: false });
        Ok(())
    }

    pub(crate) fn on_append_tasks(
        &mut self,
        request: RequestId,
        job: JobId,
        first_index: u32,
        tasks: Vec<TaskSpec>,
        batch: &mut Batch<'_>,
    ) -> Result<()> {
        let Some(entry) = self.jobs.get(&job) else {
            batch.reply(request, OperatorReply::Rejected(self.no_such_job(job)));
            return Ok(());
        };
        let have = entry.record.tasks;
        let end = u64::from(first_index) + tasks.len() as u64;
        if first_index > have {
            let e = Error::invalid_input(format!(
                "first_index: {job} holds {have} tasks, so an append must start at index {have}, not {first_index}"
            ));
            batch.reply(request, OperatorReply::Rejected(e));
            return Ok(());
        }
        // Tasks it has already (a repeated append after a lost reply) are skipped.
        let skip = (have - first_index) as usize;
        if end <= u64::from(have) {
            batch.reply(request, OperatorReply::TasksAppended { job, tasks: have });
            return Ok(());
        }
        if entry.record.sealed {
            let e = Error::invalid_input(format!("{job} is sealed with {have} tasks; nothing can be appended"));
            batch.reply(request, OperatorReply::Rejected(e));
            return Ok(());
        }
        let new = &tasks[skip..];
        if let Err(e) = self.validate_tasks(have, first_index as usize + skip, new) {
            batch.reply(request, OperatorReply::Rejected(e));
            return Ok(());
        }
        self.append(job, new, batch)?;
        let tasks = self.jobs.get(&job).map_or(0, |j| j.record.tasks);
        batch.reply(request, OperatorReply::TasksAppended { job, tasks });
        Ok(())
    }

    pub(crate) fn on_seal_job(
        &mut self,
        request: RequestId,
        job: JobId,
        tasks: u32,
        batch: &mut Batch<'_>,
    ) -> Result<()> {
        let Some(entry) = self.jobs.get(&job) else {
            batch.reply(request, OperatorReply::Rejected(self.no_such_job(job)));
            return Ok(());
        };
        let have = entry.record.tasks;
        let refusal = if tasks != have {
            Some(format!("tasks: {job} holds {have} tasks; the seal says {tasks}"))
        } else if entry.record.sealed {
            batch.reply(request, OperatorReply::JobAccepted { job, tasks, existing: true });
            return Ok(());
        } else if have == 0 {
            Some("tasks: a job needs at least one task".to_owned())
        } else {
            None
        };
        if let Some(reason) = refusal {
            batch.reply(request, OperatorReply::Rejected(Error::invalid_input(reason)));
            return Ok(());
        }
        let tasks = self.seal(job, batch)?;
        batch.reply(request, OperatorReply::JobAccepted { job, tasks, existing: false });
        Ok(())
    }

    /// Why an unknown job id is unknown: never used, or deleted.
    fn no_such_job(&self, job: JobId) -> Error {
        if job.get() < self.counters.next_job {
            Error::invalid_input(format!(
                "{job} no longer exists: it finished more than tasks.job_retention ago, or it was opened and not \
                 sealed within tasks.open_job_timeout"
            ))
        } else {
            Error::invalid_input(format!("no job {job}"))
        }
    }

    fn validate_name(&self, name: &str) -> Result<()> {
        if name.len() > NAME_BYTES_MAX {
            return Err(Error::invalid_input(format!("name: {} bytes exceed {NAME_BYTES_MAX}", name.len())));
        }
        Ok(())
    }

    /// Checks tasks to be appended to a job holding `have` (the first of them has index
    /// `first`); errors name the task and the limit.
    fn validate_tasks(&self, have: u32, first: usize, tasks: &[TaskSpec]) -> Result<()> {
        let limits = &self.settings.limits;
        if have == 0 && tasks.is_empty() {
            return Err(Error::invalid_input("tasks: a job needs at least one task"));
        }
        let total = u64::from(have) + tasks.len() as u64;
        if total > u64::from(limits.max_tasks_per_job) {
            return Err(Error::invalid_input(format!(
                "tasks: {total} tasks exceed limits.max_tasks_per_job ({})",
                limits.max_tasks_per_job
            )));
        }
        for (i, spec) in tasks.iter().enumerate() {
            let i = first + i;
            if spec.plugin.trim().is_empty() {
                return Err(Error::invalid_input(format!("tasks[{i}].plugin: must name a plugin")));
            }
            if spec.plugin.len() > NAME_BYTES_MAX || spec.method.len() > NAME_BYTES_MAX {
                return Err(Error::invalid_input(format!(
                    "tasks[{i}]: plugin and method names are at most {NAME_BYTES_MAX} bytes"
                )));
            }
            if spec.inputs.len() > INPUTS_PER_TASK_MAX {
                return Err(Error::invalid_input(format!(
                    "tasks[{i}].inputs: {} blobs exceed the {INPUTS_PER_TASK_MAX} a task may name",
                    spec.inputs.len()
                )));
            }
            if spec.payload.len() > limits.max_payload_bytes as usize {
                return Err(Error::invalid_input(format!(
                    "tasks[{i}].payload: {} bytes exceed limits.max_payload_bytes ({})",
                    spec.payload.len(),
                    limits.max_payload_bytes
                )));
            }
        }
        Ok(())
    }

    /// A new open job, durable with this batch.
    fn create_job(
        &mut self,
        now: Now,
        name: String,
        idempotency_key: Option<String>,
        batch: &mut Batch<'_>,
    ) -> Result<JobId> {
        let id = JobId(self.counters.next_job);
        self.counters.next_job += 1;
        self.counters_dirty = true;
        if let Some(key) = &idempotency_key {
            batch.put(&records::idempotency_key(key), &id)?;
        }
        let record = JobRecord {
            id,
            name,
            tasks: 0,
            idempotency_key,
            sealed: false,
            counts: TaskCounts::default(),
            finished_at_unix_ms: None,
        };
        self.jobs.insert(id, JobEntry { record, shapes: Vec::new(), opened_at: now.mono, has_inputs: false });
        self.open_jobs.insert((now.mono, id));
        self.dirty_jobs.insert(id);
        Ok(id)
    }

    /// Stores validated tasks at the end of an open job: one payload record each and one
    /// shape record for all of them.
    fn append(&mut self, job: JobId, tasks: &[TaskSpec], batch: &mut Batch<'_>) -> Result<()> {
        let entry = self.jobs.get_mut(&job).ok_or_else(|| Error::internal(format!("appending to unknown {job}")))?;
        let first = entry.record.tasks;
        for (i, spec) in tasks.iter().enumerate() {
            let task = TaskId::new(job, first + i as u32);
            batch.put_chunked(&payload_key(task), &spec.payload)?;
            if !spec.inputs.is_empty() {
                batch.put(&inputs_key(task), &spec.inputs)?;
                entry.has_inputs = true;
            }
        }
        let runs = shape_runs(tasks);
        batch.put(&shapes_key(job, first), &runs)?;
        entry.extend_shapes(runs);
        entry.record.tasks += tasks.len() as u32;
        self.dirty_jobs.insert(job);
        Ok(())
    }

    /// Seals an open job: every task is queued and may run. Returns the task count.
    fn seal(&mut self, job: JobId, batch: &mut Batch<'_>) -> Result<u32> {
        let entry = self.jobs.get_mut(&job).ok_or_else(|| Error::internal(format!("sealing unknown {job}")))?;
        let tasks = entry.record.tasks;
        entry.record.sealed = true;
        entry.record.counts.queued = tasks;
        self.open_jobs.remove(&(entry.opened_at, job));
        self.active_jobs.insert(job);
        self.totals.queued += tasks;
        self.dirty_jobs.insert(job);
        for index in 0..tasks {
            let task = TaskId::new(job, index);
            // No state record yet: a task without one is a fresh queued task (see
            // `recover`), so a job costs one write per task.
            self.tasks.insert(task, None);
            self.push_ready(task);
        }
        self.record(HistoryEvent::JobAccepted { job, tasks }, batch);
        Ok(tasks)
    }

    /// Moves a task's count from one state to another, in its job and in the totals;
    /// a job whose last live task ends is finished (and its retention starts).
    pub(crate) fn count_transition(&mut self, job: JobId, from: StateKind, to: StateKind) {
        let Some(entry) = self.jobs.get_mut(&job) else { return };
        *entry.record.counts.slot(from) -= 1;
        *entry.record.counts.slot(to) += 1;
        *self.totals.slot(from) -= 1;
        *self.totals.slot(to) += 1;
        self.dirty_jobs.insert(job);
        if entry.is_finished() && entry.record.finished_at_unix_ms.is_none() {
            let at = self.now_wall_ms;
            entry.record.finished_at_unix_ms = Some(at);
            self.active_jobs.remove(&job);
            self.finished_jobs.insert((at, job));
        }
    }

    /// Writes a task that reached a terminal state and drops it from memory.
    pub(crate) fn retire(&mut self, task: TaskId, record: TaskRecord, batch: &mut Batch<'_>) -> Result<()> {
        self.tasks.remove(&task);
        self.dirty_tasks.remove(&task);
        batch.put(&task_key(task), &record)
    }

    pub(crate) fn on_cancel_job(&mut self, request: RequestId, job: JobId, batch: &mut Batch<'_>) -> Result<()> {
        let Some(entry) = self.jobs.get(&job) else {
            batch.reply(request, OperatorReply::Rejected(self.no_such_job(job)));
            return Ok(());
        };
        if !entry.record.sealed {
            // An open job has run nothing: cancelling it abandons it now.
            let opened_at = entry.opened_at;
            self.open_jobs.remove(&(opened_at, job));
            self.start_deletion(job, false);
            batch.reply(request, OperatorReply::Cancelled { tasks: 0 });
            return Ok(());
        }
        let live: Vec<TaskId> =
            self.tasks.range(TaskId::new(job, 0)..=TaskId::new(job, u32::MAX)).map(|(t, _)| *t).collect();
        let mut cancelled = 0;
        for task in live {
            cancelled += u32::from(self.cancel_task(task, batch)?);
        }
        // Their ready entries would only be skipped one by one later.
        for queue in self.ready.values_mut() {
            queue.retain(|(_, t)| t.job != job);
        }
        self.ready.retain(|_, q| !q.is_empty());
        self.delayed.retain(|(_, t)| t.job != job);
        batch.reply(request, OperatorReply::Cancelled { tasks: cancelled });
        Ok(())
    }

    pub(crate) fn on_cancel_task(&mut self, request: RequestId, task: TaskId, batch: &mut Batch<'_>) -> Result<()> {
        let known = self.jobs.get(&task.job).is_some_and(|j| j.record.sealed && task.index < j.record.tasks);
        if !known {
            batch.reply(request, OperatorReply::Rejected(Error::invalid_input(format!("no task {task}"))));
            return Ok(());
        }
        let cancelled = self.cancel_task(task, batch)?;
        batch.reply(request, OperatorReply::Cancelled { tasks: u32::from(cancelled) });
        Ok(())
    }

    /// Cancels a task that is not finished; returns whether it changed state.
    fn cancel_task(&mut self, task: TaskId, batch: &mut Batch<'_>) -> Result<bool> {
        let Some(slot) = self.tasks.get(&task) else { return Ok(false) };
        let mut record = slot.as_deref().cloned().unwrap_or_else(TaskRecord::fresh);
        if let TaskState::Leased { worker, .. } = &record.state {
            if let Some(token) = record.token {
                batch.send(worker, ToWorker::Control(Control::CancelTask { task, token }));
            }
            self.release_lease_slot(task);
        }
        let from = std::mem::replace(&mut record.state, TaskState::Cancelled);
        self.count_transition(task.job, from.kind(), StateKind::Cancelled);
        self.retire(task, record, batch)?;
        self.record(HistoryEvent::Cancelled { task }, batch);
        Ok(true)
    }

    /// Queues the deletion of a job that left memory: finished and expired, or
    /// abandoned before it was sealed.
    fn start_deletion(&mut self, job: JobId, expired: bool) {
        if let Some(entry) = self.jobs.remove(&job) {
            if entry.record.sealed {
                self.totals.subtract(&entry.record.counts);
            }
            self.deletions.push_back(Deletion { job, tasks: entry.record.tasks, next_index: 0, expired });
            self.dirty_jobs.remove(&job);
        }
    }

    /// Open jobs not sealed within `tasks.open_job_timeout` are abandoned.
    pub(crate) fn abandon_stale_open_jobs(&mut self, now: Now, batch: &mut Batch<'_>) -> Result<()> {
        let timeout = self.settings.tasks.open_job_timeout;
        while let Some(&(opened_at, job)) = self.open_jobs.first() {
            if now.mono.saturating_since(opened_at) < timeout {
                break;
            }
            self.open_jobs.pop_first();
            let tasks = self.jobs.get(&job).map_or(0, |j| j.record.tasks);
            batch.notice(Notice::JobAbandoned { job, tasks });
            self.start_deletion(job, false);
        }
        Ok(())
    }

    /// Starts deleting finished jobs past `tasks.job_retention` and carries on with the
    /// deletions in progress, [`DELETIONS_PER_BATCH_MAX`] tasks per batch. A crash
    /// midway is harmless: the job record goes last, so recovery finds the job again
    /// and its deletion starts over, skipping what is gone.
    pub(crate) fn delete_expired(&mut self, now: Now, batch: &mut Batch<'_>) -> Result<()> {
        let retention = u64::try_from(self.settings.tasks.job_retention.as_millis()).unwrap_or(u64::MAX);
        let now_ms = unix_millis(now.wall);
        while let Some(&(finished_at, job)) = self.finished_jobs.first() {
            if now_ms.saturating_sub(finished_at) < retention {
                break;
            }
            self.finished_jobs.pop_first();
            self.start_deletion(job, true);
        }
        let mut budget = DELETIONS_PER_BATCH_MAX;
        while budget > 0
            && let Some(deletion) = self.deletions.front_mut()
        {
            let (job, from) = (deletion.job, deletion.next_index);
            if from < deletion.tasks {
                let end = deletion.tasks.min(from.saturating_add(budget));
                deletion.next_index = end;
                budget -= end - from;
                for index in from..end {
                    self.delete_task(TaskId::new(job, index), batch)?;
                }
                continue;
            }
            // Then the shape records (one per append), a page per batch: this batch's
            // deletes are not visible to the read, the next batch's reads see them.
            let page = self.storage.scan_page(&job_shapes_prefix(job), None, budget as usize)?;
            let full = page.len() == budget as usize;
            budget = budget.saturating_sub(page.len().max(1) as u32);
            for (key, _) in page {
                batch.delete(&key)?;
            }
            if full {
                break;
            }
            let done = self.deletions.pop_front().expect("front above");
            self.delete_job_records(done, batch)?;
        }
        if !self.deletions.is_empty() {
            self.more_work = true;
        }
        Ok(())
    }

    /// Deletes a task's payload and state record, and its claim on its result.
    fn delete_task(&mut self, task: TaskId, batch: &mut Batch<'_>) -> Result<()> {
        let key = task_key(task);
        if let Some(record) = batch.load::<TaskRecord>(&key)? {
            // (An inline result goes with the record.)
            if let TaskState::Committed { result, .. } = record.state {
                self.release_result(&result, batch)?;
            }
            batch.delete(&key)?;
        }
        batch.delete_chunked(&payload_key(task))?;
        batch.delete(&inputs_key(task))?;
        Ok(())
    }

    /// The last of a deletion: the job's record and its idempotency key.
    fn delete_job_records(&mut self, done: Deletion, batch: &mut Batch<'_>) -> Result<()> {
        let key = job_key(done.job);
        let record: Option<JobRecord> = batch.load(&key)?;
        if let Some(idem) = record.as_ref().and_then(|r| r.idempotency_key.as_ref()) {
            batch.delete(&idempotency_key(idem))?;
        }
        batch.delete(&key)?;
        if done.expired {
            self.record(HistoryEvent::JobExpired { job: done.job }, batch);
        }
        Ok(())
    }
}
