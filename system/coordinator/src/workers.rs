//! Workers: registration, heartbeats and the deadline the coordinator keeps, pulls,
//! drain, the failure scan, and forgetting failed workers.

use std::collections::BTreeSet;

use rollout_core::health;
use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{
    Control, GPUS_PER_WORKER_MAX, Heartbeat, MetricDeltas, NAME_BYTES_MAX, Pull, RUNNING_PER_SLOT_MAX, Register,
    ToWorker, metric,
};
use rollout_core::time::unix_millis;
use rollout_core::{Error, FencingToken, Incarnation, Now, PROTOCOL_VERSION, Result, TaskId, WorkerId};

use crate::machine::{Batch, Coordinator, NOTICE_INTERVAL, Notice, OperatorReply, RequestId, WorkerEntry};
use crate::metrics::MergeOutcome;
use crate::records::{TaskState, WorkerRecord, WorkerState, worker_key};
use crate::submits::LeaseEnd;

impl Coordinator {
    pub(crate) fn on_register(&mut self, now: Now, id: WorkerId, reg: Register, batch: &mut Batch<'_>) -> Result<()> {
        if let Some(reason) = self.register_refusal(&id, &reg) {
            batch.send(&id, ToWorker::RegisterRejected { reason });
            return Ok(());
        }
        let slack = self.settings.health.heartbeat_interval.saturating_mul(2);
        if let Some(old) = self.workers.get_mut(&id)
            && old.boot == Some(reg.boot)
            && old.record.state != WorkerState::Failed
            && reg.adopted < Some(old.record.incarnation)
        {
            // Sent by this incarnation's process before it adopted it: a retry whose
            // first answer was slow or lost, or a late duplicate. Ending the incarnation
            // would re-queue tasks the worker may be running; give the same answer. The
            // process is alive, so its deadline moves as a new registration's would (a
            // later deadline only ever delays a declaration, so this is always safe).
            old.deadline = old.deadline.max(now.mono + slack);
            old.due_at = old.due_at.max(now.wall + slack);
            let (incarnation, assigns_sent) = (old.record.incarnation, old.record.assigns_sent);
            let draining = old.record.state == WorkerState::Draining;
            batch.send(&id, ToWorker::Registered { incarnation, terms: self.settings.worker_terms(), assigns_sent });
            if draining {
                batch.send(&id, ToWorker::Control(Control::Drain));
            }
            return Ok(());
        }
        let was_draining = self.workers.get(&id).is_some_and(|w| w.record.state == WorkerState::Draining);
        if let Some(old) = self.workers.get(&id) {
            // A worker that lost its connection to a restarted coordinator re-registers
            // and its runs were stopped: that costs the tasks a re-run, not an attempt.
            // (Its leases were granted by an earlier run exactly when its incarnation is
            // one this run did not hand out.)
            let charged = old.record.incarnation > self.incarnations_before_recovery;
            let reason = if charged {
                format!("worker {id} registered again; incarnation {} ended", old.record.incarnation)
            } else {
                format!(
                    "worker {id} registered again after a coordinator restart; incarnation {} ended (no attempt charged)",
                    old.record.incarnation
                )
            };
            let leases: Vec<TaskId> = old.leases.iter().copied().collect();
            for task in leases {
                self.end_lease(
                    now,
                    task,
                    reason.clone(),
                    if charged { LeaseEnd::WorkerLost } else { LeaseEnd::Uncharged },
                    batch,
                )?;
            }
            self.set_credits(&id, 0);
        }
        self.counters.last_incarnation = self.counters.last_incarnation.next();
        self.counters_dirty = true;
        let incarnation = self.counters.last_incarnation;
        let mut plugins = reg.plugins;
        plugins.sort_unstable();
        plugins.dedup();
        let record = WorkerRecord {
            id: id.clone(),
            incarnation,
            plugins,
            slots: reg.slots,
            inventory: reg.inventory,
            state: if was_draining { WorkerState::Draining } else { WorkerState::Active },
            assigns_sent: 0,
            failed_at_unix_ms: None,
        };
        let mut entry = WorkerEntry::new(record, now.mono + slack, now.wall + slack, Some(now.wall));
        entry.boot = Some(reg.boot);
        self.workers.insert(id.clone(), entry);
        self.dirty_workers.insert(id.clone());
        self.record(HistoryEvent::Registered { worker: id.clone(), incarnation }, batch);
        batch.send(&id, ToWorker::Registered { incarnation, terms: self.settings.worker_terms(), assigns_sent: 0 });
        if was_draining {
            batch.send(&id, ToWorker::Control(Control::Drain));
        }
        Ok(())
    }

    /// Why a registration is refused, naming the field and the limit; `None` to accept.
    fn register_refusal(&self, id: &WorkerId, reg: &Register) -> Option<String> {
        let limits = &self.settings.limits;
        if reg.protocol_version != PROTOCOL_VERSION {
            return Some(format!(
                "protocol version mismatch: coordinator speaks {PROTOCOL_VERSION}, worker {id} speaks {}",
                reg.protocol_version
            ));
        }
        if reg.slots == 0 || reg.slots > limits.max_slots_per_worker {
            return Some(format!(
                "slots: worker {id} declares {} slots; the coordinator accepts 1 to {} (limits.max_slots_per_worker)",
                reg.slots, limits.max_slots_per_worker
            ));
        }
        if reg.plugins.is_empty() {
            return Some(format!("plugins: worker {id} offers no plugins, so no task could ever match it"));
        }
        if reg.plugins.len() > limits.max_plugins_per_worker as usize {
            return Some(format!(
                "plugins: worker {id} offers {} plugins; the coordinator accepts at most {} \
                 (limits.max_plugins_per_worker)",
                reg.plugins.len(),
                limits.max_plugins_per_worker
            ));
        }
        if let Some(p) = reg.plugins.iter().find(|p| p.is_empty() || p.len() > NAME_BYTES_MAX) {
            return Some(format!(
                "plugins: worker {id} offers a plugin name of {} bytes; names are 1 to {NAME_BYTES_MAX} bytes",
                p.len()
            ));
        }
        let gpus = &reg.inventory.gpus;
        if gpus.len() > GPUS_PER_WORKER_MAX {
            return Some(format!(
                "inventory.gpus: worker {id} declares {} GPUs; at most {GPUS_PER_WORKER_MAX}",
                gpus.len()
            ));
        }
        if let Some(g) = gpus.iter().find(|g| g.name.len() > NAME_BYTES_MAX || g.uuid.len() > NAME_BYTES_MAX) {
            return Some(format!(
                "inventory.gpus: worker {id} declares GPU {} with a name or uuid over {NAME_BYTES_MAX} bytes",
                g.index
            ));
        }
        let live = self.workers.values().filter(|w| w.record.state != WorkerState::Failed).count();
        let known_live = self.workers.get(id).is_some_and(|w| w.record.state != WorkerState::Failed);
        if !known_live && live >= limits.max_workers as usize {
            return Some(format!("the coordinator already has {live} workers (limits.max_workers)"));
        }
        None
    }

    pub(crate) fn current_worker(&self, id: &WorkerId, incarnation: Incarnation) -> bool {
        self.workers
            .get(id)
            .is_some_and(|w| w.record.incarnation == incarnation && w.record.state != WorkerState::Failed)
    }

    pub(crate) fn on_heartbeat(
        &mut self,
        now: Now,
        id: &WorkerId,
        beat: Heartbeat,
        batch: &mut Batch<'_>,
    ) -> Result<()> {
        if !self.current_worker(id, beat.incarnation) {
            batch.send(
                id,
                ToWorker::HeartbeatAck { incarnation: beat.incarnation, beat_seq: beat.beat_seq, reregister: true },
            );
            return Ok(());
        }
        let health_cfg = self.settings.health;
        let kept = health::beat_deadline(now.wall, beat.due_at, &health_cfg);
        let worker = self.workers.get_mut(id).expect("checked by current_worker");
        // The coordinator's clock decides: the deadline is the arrival plus a slack
        // that the worker's clock can move by the skew budget at most.
        worker.deadline = now.mono + kept.slack;
        worker.due_at = now.wall + kept.slack;
        worker.clock_offset_ms = Some(kept.offset_ms);
        // The heartbeat ledger lives in memory only: a beat costs no write and no
        // fsync, and a restarted coordinator gives every worker a fresh deadline anyway.
        worker.last_beat = Some(now.wall);
        if kept.beyond_budget(&health_cfg) && due(worker.clock_noticed_at, now) {
            worker.clock_noticed_at = Some(now.mono);
            batch.notice(Notice::ClockOffset {
                worker: id.clone(),
                offset_ms: kept.offset_ms,
                budget_ms: u64::try_from(health_cfg.clock_skew_budget.as_millis()).unwrap_or(u64::MAX),
            });
        }
        if let Some(deltas) = &beat.metrics {
            self.merge_metrics(now, id, deltas, batch);
        }

        // A beat names at most what its worker could be running (its slots, and the
        // submits waiting for acks); the rest is not looked at.
        let worker = self.workers.get(id).expect("checked by current_worker");
        let kept_len = (worker.record.slots as usize).saturating_mul(RUNNING_PER_SLOT_MAX);
        let mut running = beat.running;
        if running.len() > kept_len {
            batch.notice(Notice::BeatTruncated { worker: id.clone(), reported: running.len(), kept: kept_len });
            running.truncate(kept_len);
        }
        // Leases whose assignment the worker has had time to receive (seq at or below
        // what it reports) but which it does not run were lost in transit.
        let reported: BTreeSet<(TaskId, FencingToken)> = running.iter().copied().collect();
        let lost: Vec<TaskId> = worker
            .leases
            .iter()
            .copied()
            .filter(|task| match self.tasks.get(task) {
                Some(Some(record)) => match (&record.state, record.token) {
                    (TaskState::Leased { seq, .. }, Some(token)) => {
                        *seq <= beat.assigns_through && !reported.contains(&(*task, token))
                    }
                    _ => false,
                },
                _ => false,
            })
            .collect();
        // Tasks the worker runs without holding their lease (cancelled, revoked): stop them.
        let zombies: Vec<(TaskId, FencingToken)> =
            running.iter().copied().filter(|(task, token)| !self.holds_lease(id, *task, *token)).collect();
        for task in lost {
            self.end_lease(now, task, String::new(), LeaseEnd::Uncharged, batch)?;
        }
        for (task, token) in zombies {
            batch.send(id, ToWorker::Control(Control::CancelTask { task, token }));
        }
        batch.send(
            id,
            ToWorker::HeartbeatAck { incarnation: beat.incarnation, beat_seq: beat.beat_seq, reregister: false },
        );
        Ok(())
    }

    /// Merges a beat's metric deltas, at most once per half heartbeat interval per
    /// worker and only for the plugins it offers; says so (rate-limited) when some were
    /// dropped.
    fn merge_metrics(&mut self, now: Now, id: &WorkerId, deltas: &MetricDeltas, batch: &mut Batch<'_>) {
        let series_max = self.settings.limits.max_metric_series_per_beat as usize;
        let min_gap = self.settings.health.heartbeat_interval / 2;
        let Some(worker) = self.workers.get_mut(id) else { return };
        let series = (deltas.counters.len() + deltas.histograms.len()) as u32;
        let outcome = if worker.metrics_merged_at.is_some_and(|at| now.mono.saturating_since(at) < min_gap) {
            self.metrics.reject(series);
            MergeOutcome {
                dropped: series,
                reason: Some("metrics shipped again within half a heartbeat interval".into()),
            }
        } else {
            worker.metrics_merged_at = Some(now.mono);
            let worker = &*worker;
            self.metrics.merge_from(deltas, |p| p == metric::UNKNOWN_PLUGIN || worker.offers(p), series_max)
        };
        let worker = self.workers.get_mut(id).expect("looked up above");
        if outcome.dropped > 0 && due(worker.metrics_noticed_at, now) {
            worker.metrics_noticed_at = Some(now.mono);
            batch.notice(Notice::MetricsRefused {
                worker: id.clone(),
                dropped: outcome.dropped,
                reason: outcome.reason.unwrap_or_default(),
            });
        }
    }

    pub(crate) fn holds_lease(&self, id: &WorkerId, task: TaskId, token: FencingToken) -> bool {
        match self.tasks.get(&task) {
            Some(Some(record)) => {
                record.token == Some(token) && matches!(&record.state, TaskState::Leased { worker, .. } if worker == id)
            }
            _ => false,
        }
    }

    pub(crate) fn on_pull(&mut self, id: &WorkerId, pull: Pull, batch: &mut Batch<'_>) -> Result<()> {
        if !self.current_worker(id, pull.incarnation) {
            return Ok(());
        }
        let max_credits = self.settings.limits.max_credits_per_pull;
        let worker = self.workers.get(id).expect("checked by current_worker");
        if worker.record.state != WorkerState::Active {
            return Ok(());
        }
        let in_flight = worker.record.assigns_sent.saturating_sub(pull.assigns_through);
        let in_flight = u32::try_from(in_flight).unwrap_or(u32::MAX);
        let unleased = worker.record.slots.saturating_sub(worker.leases.len() as u32);
        let credits = pull.free_slots.saturating_sub(in_flight).min(unleased).min(max_credits);
        self.set_credits(id, credits);
        self.dispatch_to(id, batch)
    }

    /// Sets a worker's credits, keeping the index of hungry workers by plugin.
    pub(crate) fn set_credits(&mut self, id: &WorkerId, credits: u32) {
        let Some(worker) = self.workers.get_mut(id) else { return };
        let was_hungry = worker.credits > 0;
        worker.credits = credits;
        let hungry = credits > 0 && worker.record.state == WorkerState::Active;
        if was_hungry == hungry {
            return;
        }
        for plugin in &worker.record.plugins {
            if hungry {
                self.hungry.entry(plugin.clone()).or_default().insert(id.clone());
            } else if let Some(set) = self.hungry.get_mut(plugin) {
                set.remove(id);
                if set.is_empty() {
                    self.hungry.remove(plugin);
                }
            }
        }
    }

    pub(crate) fn on_drain(&mut self, request: RequestId, id: &WorkerId, batch: &mut Batch<'_>) -> Result<()> {
        let Some(worker) = self.workers.get(id) else {
            batch.reply(request, OperatorReply::Rejected(Error::invalid_input(format!("no worker named {id}"))));
            return Ok(());
        };
        if worker.record.state == WorkerState::Failed {
            batch.reply(
                request,
                OperatorReply::Rejected(Error::invalid_input(format!("worker {id} is failed; nothing to drain"))),
            );
            return Ok(());
        }
        self.set_credits(id, 0);
        let worker = self.workers.get_mut(id).expect("looked up above");
        worker.record.state = WorkerState::Draining;
        self.dirty_workers.insert(id.clone());
        self.record(HistoryEvent::Drained { worker: id.clone() }, batch);
        batch.send(id, ToWorker::Control(Control::Drain));
        batch.reply(request, OperatorReply::Draining);
        Ok(())
    }

    /// Declares failed every worker whose kept deadline passed long enough ago.
    pub(crate) fn scan_failures(&mut self, now: Now, batch: &mut Batch<'_>) -> Result<()> {
        let health_cfg = self.settings.health;
        let failed: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.record.state != WorkerState::Failed)
            .filter(|w| health::is_failed_after(now.mono.saturating_since(w.deadline), &health_cfg))
            .map(|w| w.record.id.clone())
            .collect();
        for id in failed {
            self.declare_failed(now, &id, batch)?;
        }
        Ok(())
    }

    /// The worker's end closed the Work stream of `incarnation`: if that is the
    /// worker's current incarnation (and it is not failed already), it is declared
    /// failed now, without waiting for its deadline. A close of an older incarnation
    /// (the worker registered again meanwhile) changes nothing.
    pub(crate) fn on_work_closed(
        &mut self,
        now: Now,
        id: &WorkerId,
        incarnation: Incarnation,
        batch: &mut Batch<'_>,
    ) -> Result<()> {
        if !self.current_worker(id, incarnation) {
            return Ok(());
        }
        let reason = format!("worker {id} (incarnation {incarnation}) closed its connection");
        self.declare_failed_because(now, id, &reason, batch)
    }

    /// Marks a worker failed (its deadline passed) and re-queues (or dead-letters)
    /// everything it held.
    fn declare_failed(&mut self, now: Now, id: &WorkerId, batch: &mut Batch<'_>) -> Result<()> {
        let incarnation = self.workers.get(id).map(|w| w.record.incarnation);
        let reason = match incarnation {
            Some(incarnation) => format!("worker {id} (incarnation {incarnation}) was declared failed"),
            None => return Ok(()),
        };
        self.declare_failed_because(now, id, &reason, batch)
    }

    /// [`Self::declare_failed`] with the reason the re-queued tasks carry.
    fn declare_failed_because(&mut self, now: Now, id: &WorkerId, reason: &str, batch: &mut Batch<'_>) -> Result<()> {
        self.set_credits(id, 0);
        let Some(worker) = self.workers.get_mut(id) else { return Ok(()) };
        worker.record.state = WorkerState::Failed;
        worker.record.failed_at_unix_ms = Some(unix_millis(now.wall));
        let incarnation = worker.record.incarnation;
        let leases: Vec<TaskId> = worker.leases.iter().copied().collect();
        self.dirty_workers.insert(id.clone());
        self.record(HistoryEvent::DeclaredFailed { worker: id.clone(), incarnation }, batch);
        let reason = reason.to_owned();
        for task in leases {
            self.end_lease(now, task, reason.clone(), LeaseEnd::WorkerLost, batch)?;
        }
        Ok(())
    }

    /// Deletes failed workers' records older than `health.failed_worker_retention`.
    pub(crate) fn forget_failed_workers(&mut self, now: Now, batch: &mut Batch<'_>) -> Result<()> {
        let retention = u64::try_from(self.settings.health.failed_worker_retention.as_millis()).unwrap_or(u64::MAX);
        let now_ms = unix_millis(now.wall);
        let gone: Vec<WorkerId> = self
            .workers
            .values()
            .filter(|w| w.record.state == WorkerState::Failed && w.leases.is_empty())
            .filter(|w| w.record.failed_at_unix_ms.is_some_and(|at| now_ms.saturating_sub(at) >= retention))
            .map(|w| w.record.id.clone())
            .collect();
        for id in gone {
            self.workers.remove(&id);
            self.dirty_workers.remove(&id);
            batch.delete(&worker_key(&id))?;
            batch.notice(Notice::WorkerForgotten { worker: id });
        }
        Ok(())
    }
}

/// Whether a rate-limited notice last given at `at` may be given again now.
pub(crate) fn due(at: Option<rollout_core::Mono>, now: Now) -> bool {
    at.is_none_or(|at| now.mono.saturating_since(at) >= NOTICE_INTERVAL)
}
