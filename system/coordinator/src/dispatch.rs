//! Leasing: ready queues by (plugin, GPUs), the index of hungry workers by plugin, and
//! handing a task to a worker under a fresh fencing token.
//!
//! Cost: a dispatch looks only at workers that have credits and offer a plugin with
//! ready tasks, and for each of them only at the queues of plugins both sides have
//! (the smaller side is walked), so it grows with neither the plugin lists of idle
//! workers nor the number of queued tasks.

use std::collections::{BTreeSet, VecDeque};

use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{Assignment, ToWorker};
use rollout_core::{Attempt, Error, Result, TaskId, WorkerId};

use crate::machine::{ASSIGN_BYTES_PER_BATCH_MAX, Batch, Coordinator, ReadyKey};
use crate::records::{StateKind, TaskRecord, TaskState, WorkerState, inputs_key, payload_key};

impl Coordinator {
    /// Whether `task` is a live task waiting for a worker.
    pub(crate) fn is_queued(&self, task: TaskId) -> bool {
        match self.tasks.get(&task) {
            Some(None) => true,
            Some(Some(record)) => record.state == TaskState::Queued,
            None => false,
        }
    }

    /// Puts a queued task at the back of its ready queue.
    pub(crate) fn push_ready(&mut self, task: TaskId) {
        let Some(shape) = self.jobs.get(&task.job).and_then(|j| j.shape(task.index)) else { return };
        let key = (shape.plugin.clone(), shape.gpus);
        self.ready_seq += 1;
        self.ready.entry(key).or_default().push_back((self.ready_seq, task));
        self.ready_changed = true;
    }

    /// Offers ready tasks to every worker with credits, one task per worker per round,
    /// so a burst of work spreads across the cluster.
    pub(crate) fn dispatch_all(&mut self, batch: &mut Batch<'_>) -> Result<()> {
        loop {
            if self.ready.is_empty() || self.hungry.is_empty() || self.assign_budget_spent() {
                return Ok(());
            }
            let mut candidates: BTreeSet<WorkerId> = BTreeSet::new();
            let mut last_plugin: Option<&str> = None;
            for (plugin, _) in self.ready.keys() {
                if last_plugin == Some(plugin.as_str()) {
                    continue;
                }
                last_plugin = Some(plugin.as_str());
                if let Some(workers) = self.hungry.get(plugin) {
                    candidates.extend(workers.iter().cloned());
                }
            }
            let mut progressed = false;
            for id in candidates {
                if self.assign_budget_spent() {
                    return Ok(());
                }
                if self.workers.get(&id).is_some_and(|w| w.credits > 0)
                    && let Some(task) = self.pick_task(&id)
                {
                    self.lease(task, &id, batch)?;
                    progressed = true;
                }
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    pub(crate) fn dispatch_to(&mut self, id: &WorkerId, batch: &mut Batch<'_>) -> Result<()> {
        while self.workers.get(id).is_some_and(|w| w.credits > 0 && w.record.state == WorkerState::Active) {
            if self.assign_budget_spent() {
                break;
            }
            let Some(task) = self.pick_task(id) else { break };
            self.lease(task, id, batch)?;
        }
        Ok(())
    }

    /// Whether this batch handed out its share of assignment bytes; the rest waits for
    /// the next batch, which the machine asks for at once.
    fn assign_budget_spent(&mut self) -> bool {
        let spent = self.batch_assign_bytes >= ASSIGN_BYTES_PER_BATCH_MAX;
        if spent {
            self.more_work = true;
        }
        spent
    }

    /// The oldest ready task this worker can run (plugin, free GPUs), removed from its
    /// queue. Entries of tasks no longer queued (cancelled meanwhile) are dropped.
    fn pick_task(&mut self, id: &WorkerId) -> Option<TaskId> {
        loop {
            let key = self.best_ready_key(id)?;
            let queue = self.ready.get_mut(&key).expect("found above");
            let (_, task) = queue.pop_front().expect("non-empty above");
            if queue.is_empty() {
                self.ready.remove(&key);
            }
            if self.is_queued(task) {
                return Some(task);
            }
        }
    }

    /// The key of the ready queue whose front task is the oldest this worker can run.
    fn best_ready_key<'a>(&'a self, id: &WorkerId) -> Option<ReadyKey> {
        let worker = self.workers.get(id)?;
        let free_gpus = (worker.record.inventory.gpus.len() as u32).saturating_sub(worker.gpus_in_use);
        let mut best: Option<(u64, &ReadyKey)> = None;
        let mut consider = |key: &'a ReadyKey, queue: &VecDeque<(u64, TaskId)>| {
            if let Some(&(seq, _)) = queue.front()
                && best.is_none_or(|(b, _)| seq < b)
            {
                best = Some((seq, key));
            }
        };
        // Walk the smaller side: the worker's plugins, or the plugins with ready tasks.
        if worker.record.plugins.len() <= self.ready.len() {
            for plugin in &worker.record.plugins {
                let range = (plugin.clone(), 0)..=(plugin.clone(), free_gpus);
                for (key, queue) in self.ready.range(range) {
                    consider(key, queue);
                }
            }
        } else {
            for (key, queue) in &self.ready {
                if key.1 <= free_gpus && worker.offers(&key.0) {
                    consider(key, queue);
                }
            }
        }
        best.map(|(_, key)| key.clone())
    }

    pub(crate) fn lease(&mut self, task: TaskId, id: &WorkerId, batch: &mut Batch<'_>) -> Result<()> {
        let shape = self
            .jobs
            .get(&task.job)
            .and_then(|j| j.shape(task.index))
            .cloned()
            .ok_or_else(|| Error::internal(format!("task {task} has no shape")))?;
        let payload = batch
            .get_chunked(&payload_key(task))?
            .ok_or_else(|| Error::internal(format!("task {task} has no stored payload")))?;
        let has_inputs = self.jobs.get(&task.job).is_some_and(|j| j.has_inputs);
        let inputs: Vec<rollout_core::ContentId> =
            if has_inputs { batch.load(&inputs_key(task))?.unwrap_or_default() } else { Vec::new() };
        self.counters.last_token = self.counters.last_token.next();
        self.counters_dirty = true;
        let token = self.counters.last_token;
        let worker = self.workers.get_mut(id).expect("dispatch only picks known workers");
        worker.record.assigns_sent += 1;
        worker.leases.insert(task);
        worker.gpus_in_use += shape.gpus;
        let credits = worker.credits.saturating_sub(1);
        let seq = worker.record.assigns_sent;
        let incarnation = worker.record.incarnation;
        self.set_credits(id, credits);
        let slot = self.tasks.get_mut(&task).ok_or_else(|| Error::internal(format!("leasing unknown task {task}")))?;
        let record = slot.get_or_insert_with(|| Box::new(TaskRecord::fresh()));
        record.attempt = Attempt(record.attempt.get() + 1);
        record.token = Some(token);
        record.state = TaskState::Leased { worker: id.clone(), incarnation, seq };
        let attempt = record.attempt;
        self.count_transition(task.job, StateKind::Queued, StateKind::Leased);
        self.dirty_workers.insert(id.clone());
        self.dirty_tasks.insert(task);
        self.batch_assign_bytes += payload.len() as u64;
        let deadline = shape.deadline.unwrap_or(self.settings.default_task_deadline);
        self.record(HistoryEvent::Leased { task, worker: id.clone(), token, attempt }, batch);
        batch.send(
            id,
            ToWorker::Assign(Assignment {
                incarnation,
                seq,
                task,
                token,
                attempt,
                plugin: shape.plugin.clone(),
                method: shape.method.clone(),
                payload,
                deadline,
                inputs,
            }),
        );
        Ok(())
    }
}
