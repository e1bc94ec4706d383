//! A scenario's values checked against each other, with errors naming the key.

use std::path::Path;

use super::{FaultAction, FaultKind, Scenario, ScenarioError, StorageKind};

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
            let cancels = self.faults.iter().any(|f| matches!(f.kind(), FaultKind::CancelJob | FaultKind::CancelTask));
            if wl.failure_probability > 0.0 || wl.hang_probability > 0.0 || cancels {
                return Err(bad(
                    "invariants.all_committed".into(),
                    "needs a workload without failures or hangs, and no cancels",
                ));
            }
        }
        if self.coordinator.storage == StorageKind::Model {
            let cut_scheduled = self.faults.iter().any(|f| f.kind() == FaultKind::PowerCut);
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
        // Each kind's fields are its variant's (parsing checked them); what is left is
        // whether the nodes and jobs named exist.
        for (i, fault) in self.faults.iter().enumerate() {
            if let Some(node) = fault.node()
                && !self.has(node)
            {
                let why = format!("no such node {node} (the cluster has w1..w{})", self.cluster.workers);
                return Err(bad(format!("faults[{i}].node"), &why));
            }
            if let FaultAction::CancelJob { job } | FaultAction::CancelTask { job, .. } = fault.action
                && job >= self.workload.jobs
            {
                return Err(bad(format!("faults[{i}].job"), "no such job in the workload (0-based)"));
            }
            if let FaultAction::CancelTask { task, .. } = fault.action
                && task >= self.workload.tasks_per_job
            {
                return Err(bad(format!("faults[{i}].task"), "no such task in the job (0-based)"));
            }
        }
        Ok(())
    }
}
