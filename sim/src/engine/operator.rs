//! The simulated operator: submits the workload's jobs (re-submitting with the same
//! idempotency key until acknowledged) and reads the answers.

use std::time::Duration;

use rollout_coordinator::{CoordinatorInput, JobSubmission, OperatorReply, TaskSpec};

use super::{Ev, NS_PER_MS, Sim};

/// How long the operator waits for a job's acknowledgement before re-submitting it
/// (with the same idempotency key, so a re-submit never duplicates a job).
const SUBMIT_RETRY_NS: u64 = 3_000 * NS_PER_MS;

impl Sim {
    pub(super) fn submit_job(&mut self, job: u32) {
        self.next_request += 1;
        let request = self.next_request;
        self.requests.insert(request, Some(job));
        let wl = &self.scenario.workload;
        let tasks = (0..wl.tasks_per_job)
            .map(|k| TaskSpec {
                plugin: "sim".into(),
                method: "run".into(),
                payload: payload(job, k, wl.payload_bytes as usize),
                gpus: 0,
                deadline: wl.task_deadline_ms.map(Duration::from_millis),
                inputs: Vec::new(),
            })
            .collect();
        let submission = JobSubmission { name: format!("job{job}"), tasks, idempotency_key: Some(format!("job{job}")) };
        self.coord_enqueue(CoordinatorInput::SubmitJob { request, job: submission });
        self.push(self.now + SUBMIT_RETRY_NS, Ev::SubmitJobRetry { job });
    }

    pub(super) fn operator_request(&mut self) -> u64 {
        self.next_request += 1;
        self.requests.insert(self.next_request, None);
        self.next_request
    }

    pub(super) fn operator_reply(&mut self, request: u64, reply: OperatorReply) {
        let Some(job) = self.requests.remove(&request) else { return };
        // Drain and cancel answers need nothing from the operator (the history shows
        // their effect); an unknown job or worker is the scenario's own doing.
        let Some(job) = job else { return };
        match reply {
            OperatorReply::JobAccepted { job: id, tasks, .. } => {
                self.acked.insert(job, (id, tasks));
            }
            OperatorReply::Rejected(e) => self.fail("sim", format!("job{job} rejected: {e}")),
            other => self.fail("sim", format!("unexpected reply to job{job}: {other:?}")),
        }
    }

    pub(super) fn submit_retry(&mut self, job: u32) {
        if !self.acked.contains_key(&job) {
            self.submit_job(job);
        }
    }
}

/// Task `k` of job `job`'s payload: its name, padded with zeros to `size` bytes.
fn payload(job: u32, k: u32, size: usize) -> Vec<u8> {
    let mut bytes = format!("job{job}-task{k}").into_bytes();
    if bytes.len() < size {
        bytes.resize(size, 0);
    }
    bytes
}
