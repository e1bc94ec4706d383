//! A scenario's values checked against each other, with errors naming the key.

use std::path::Path;

use super::{FaultKind, NodeRef, Scenario, ScenarioError, StorageKind};

impl Scenario {
    pub(super) fn validate(&self, path: &Path) -> Result<(), ScenarioError> {
        let bad = |key: String, message: &str| ScenarioError::Invalid {
            path: path.to_owned(),
            key,
            message: message.to_owned(),
        };
        for (i, name) in self.exercises.iter().enumerate() {
            if crate::Coverage::NAMES.iter().all(|n| n != name) {
                let known = crate::Coverage::NAMES.join(", ");
                return Err(bad(
                    format!("exercises[{i}]"),
                    &format!("unknown coverage name {name:?} (known: {known})"),
                ));
            }
        }
        if self.cluster.workers == 0 || self.cluster.workers > 1_000 {
            return Err(bad("cluster.workers".into(), "must be in 1..=1000"));
        }
        if self.duration_s == 0 {
            return Err(bad("duration_s".into(), "must be positive"));
        }
        let [lo, hi] = self.workload.task_duration_ms;
        if lo > hi || hi == 0 {
            return Err(bad("workload.task_duration_ms".into(), "must be [min, max] with 0 <= min <= max, max > 0"));
        }
        for (key, p) in [
            ("workload.failure_probability", self.workload.failure_probability),
            ("workload.hang_probability", self.workload.hang_probability),
            ("network.unary_loss", self.network.unary_loss),
            ("network.unary_duplicate", self.network.unary_duplicate),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(bad(key.into(), "must be in [0, 1]"));
            }
        }
        if self.network.keepalive_ms == 0 {
            return Err(bad("network.keepalive_ms".into(), "must be positive"));
        }
        if self.workload.task_deadline_ms == Some(0) {
            return Err(bad("workload.task_deadline_ms".into(), "must be positive"));
        }
        let config = self.effective_config().map_err(|message| bad("config".into(), &message))?;
        let limits = &config.limits;
        for (key, value, limit, limit_key) in [
            ("workload.payload_bytes", self.workload.payload_bytes, limits.max_payload_bytes, "max_payload_bytes"),
            ("workload.result_bytes", self.workload.result_bytes, limits.max_result_bytes, "max_result_bytes"),
        ] {
            if value > limit {
                return Err(bad(key.into(), &format!("{value} exceeds limits.{limit_key} ({limit}) of the config")));
            }
        }
        if self.invariants.all_committed {
            let wl = &self.workload;
            let cancels = self.faults.iter().any(|f| matches!(f.kind, FaultKind::CancelJob | FaultKind::CancelTask));
            if wl.failure_probability > 0.0 || wl.hang_probability > 0.0 || cancels {
                return Err(bad(
                    "invariants.all_committed".into(),
                    "needs a workload without failures or hangs, and no cancels",
                ));
            }
        }
        if self.coordinator.storage == StorageKind::Model {
            let cut_scheduled = self.faults.iter().any(|f| f.kind == FaultKind::PowerCut);
            let cut_drawn = self.swarm.as_ref().is_some_and(|s| s.kinds.contains(&FaultKind::PowerCut));
            if cut_scheduled || cut_drawn {
                return Err(bad(
                    "coordinator.storage".into(),
                    "power_cut needs storage = \"redb\" (the model store cannot tear a commit)",
                ));
            }
        }
        if let Some(swarm) = &self.swarm {
            if swarm.heal_by_ms == 0 || swarm.heal_by_ms > self.duration_s * 1_000 {
                return Err(bad("swarm.heal_by_ms".into(), "must be in 1..=duration_s * 1000"));
            }
            if swarm.kinds.is_empty() && swarm.faults > 0 {
                return Err(bad("swarm.kinds".into(), "must name at least one fault kind"));
            }
            if swarm.kinds.iter().any(|k| {
                matches!(k, FaultKind::Heal | FaultKind::Restart | FaultKind::CancelJob | FaultKind::CancelTask)
            }) {
                return Err(bad(
                    "swarm.kinds".into(),
                    "heal and restart are implied (every drawn fault undoes itself); cancels are not drawn",
                ));
            }
        }
        let [lo, hi] = self.network.latency_us;
        if lo > hi {
            return Err(bad("network.latency_us".into(), "must be [min, max] with min <= max"));
        }
        if self.clocks.max_drift_ppm >= 100_000 {
            return Err(bad("clocks.max_drift_ppm".into(), "must be below 100000"));
        }
        for (i, fault) in self.faults.iter().enumerate() {
            let node = match &fault.node {
                Some(name) => Some(
                    self.node(name)
                        .ok_or_else(|| bad(format!("faults[{i}].node"), "no such node (coordinator or w1..wN)"))?,
                ),
                None => None,
            };
            let needs_worker = matches!(
                fault.kind,
                FaultKind::Partition
                    | FaultKind::Reset
                    | FaultKind::Slow
                    | FaultKind::Flap
                    | FaultKind::Drain
                    | FaultKind::Pause
            );
            let needs_coordinator =
                matches!(fault.kind, FaultKind::DiskLatency | FaultKind::PowerCut | FaultKind::SyncFailure);
            let operator = matches!(fault.kind, FaultKind::CancelJob | FaultKind::CancelTask);
            match (fault.kind, node) {
                (FaultKind::Heal, None | Some(NodeRef::Worker(_))) => {}
                (_, None) if operator => {}
                (_, Some(_)) if operator => {
                    return Err(bad(format!("faults[{i}].node"), "cancel names a job, not a node"));
                }
                (_, None) => return Err(bad(format!("faults[{i}].node"), "required for this kind")),
                (_, Some(NodeRef::Coordinator)) if needs_worker || fault.kind == FaultKind::Heal => {
                    return Err(bad(format!("faults[{i}].node"), "names a link: must be a worker"));
                }
                (_, Some(NodeRef::Worker(_))) if needs_coordinator => {
                    return Err(bad(format!("faults[{i}].node"), "must be \"coordinator\""));
                }
                _ => {}
            }
            let allowed = |field: &str| match field {
                "for_ms" => matches!(
                    fault.kind,
                    FaultKind::Crash
                        | FaultKind::PowerCut
                        | FaultKind::Partition
                        | FaultKind::Slow
                        | FaultKind::Flap
                        | FaultKind::DiskLatency
                        | FaultKind::Pause
                ),
                "latency_ms" => matches!(fault.kind, FaultKind::Slow | FaultKind::DiskLatency),
                "period_ms" => fault.kind == FaultKind::Flap,
                _ => false,
            };
            for (field, present) in [
                ("for_ms", fault.for_ms.is_some()),
                ("latency_ms", fault.latency_ms.is_some()),
                ("period_ms", fault.period_ms.is_some()),
            ] {
                if present && !allowed(field) {
                    return Err(bad(format!("faults[{i}].{field}"), "not used by this kind"));
                }
            }
            let required: &[(&str, bool)] = match fault.kind {
                FaultKind::Slow | FaultKind::DiskLatency => &[("latency_ms", fault.latency_ms.is_some())],
                FaultKind::Flap => &[("period_ms", fault.period_ms.is_some()), ("for_ms", fault.for_ms.is_some())],
                FaultKind::Pause => &[("for_ms", fault.for_ms.is_some())],
                _ => &[],
            };
            for (field, present) in required {
                if !present {
                    return Err(bad(format!("faults[{i}].{field}"), "required for this kind"));
                }
            }
            let (job_ok, task_ok) = match fault.kind {
                FaultKind::CancelJob => (true, false),
                FaultKind::CancelTask => (true, true),
                _ => (false, false),
            };
            if fault.job.is_some() != job_ok {
                let why = if job_ok { "required for this kind" } else { "only for cancel_job and cancel_task" };
                return Err(bad(format!("faults[{i}].job"), why));
            }
            if fault.task.is_some() != task_ok {
                let why = if task_ok { "required for cancel_task" } else { "only for cancel_task" };
                return Err(bad(format!("faults[{i}].task"), why));
            }
            if let Some(job) = fault.job
                && job >= self.workload.jobs
            {
                return Err(bad(format!("faults[{i}].job"), "no such job in the workload (0-based)"));
            }
            if let Some(task) = fault.task
                && task >= self.workload.tasks_per_job
            {
                return Err(bad(format!("faults[{i}].task"), "no such task in the job (0-based)"));
            }
            if fault.period_ms == Some(0) {
                return Err(bad(format!("faults[{i}].period_ms"), "must be positive"));
            }
            if fault.direction.is_some() && fault.kind != FaultKind::Partition {
                return Err(bad(format!("faults[{i}].direction"), "only for kind = \"partition\""));
            }
            match (fault.kind, fault.by_ms) {
                (FaultKind::ClockJump, None) => {
                    return Err(bad(format!("faults[{i}].by_ms"), "required for clock_jump"));
                }
                (FaultKind::ClockJump, Some(_)) | (_, None) => {}
                (_, Some(_)) => return Err(bad(format!("faults[{i}].by_ms"), "only for kind = \"clock_jump\"")),
            }
        }
        Ok(())
    }
}
