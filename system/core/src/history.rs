//! A run's history: the events the invariant checker judges. The coordinator and
//! workers emit them (through [`crate::traits::EventEmitter`]); the simulator records
//! them; real binaries write them as JSON lines for `rollout check`.

use serde::{Deserialize, Serialize};

use crate::ids::{Attempt, ContentId, FencingToken, Incarnation, JobId, TaskId, WorkerId};

/// One event, stamped with where and when it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// Position in the recorder's total order (the simulator's event index, or the
    /// emitting node's own counter).
    pub seq: u64,
    /// The node that observed the event: `coordinator` or a worker id.
    pub node: String,
    /// The node's wall clock, in milliseconds since the Unix epoch.
    pub wall_unix_ms: u64,
    /// The same reading in microseconds, where the node took one (the real drivers do;
    /// the simulator's records and older files have none). For latency measurements:
    /// the invariants use `wall_unix_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_unix_us: Option<u64>,
    /// What happened.
    #[serde(flatten)]
    pub event: HistoryEvent,
}

/// What happened. Coordinator-side events describe decisions; worker-side events
/// (`task_started`, `task_stopped`, `fenced`) describe execution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum HistoryEvent {
    /// A worker registered and was given an incarnation.
    Registered { worker: WorkerId, incarnation: Incarnation },
    /// The coordinator declared a worker failed and revoked its leases.
    DeclaredFailed { worker: WorkerId, incarnation: Incarnation },
    /// A job was durably accepted; its tasks are queued.
    JobAccepted { job: JobId, tasks: u32 },
    /// A task was leased to a worker under a fencing token.
    Leased { task: TaskId, worker: WorkerId, token: FencingToken, attempt: Attempt },
    /// A result was committed: the task is done, forever.
    Committed { task: TaskId, worker: WorkerId, token: FencingToken, result: ContentId },
    /// A submit with the task's current token and the committed result, again.
    DuplicateSubmit { task: TaskId, worker: WorkerId, token: FencingToken },
    /// A submit with an old token or for an unknown lease; nothing changed.
    StaleRejected { task: TaskId, worker: WorkerId, token: FencingToken },
    /// An attempt failed; the task waits for its next attempt.
    Requeued { task: TaskId, attempt: Attempt, error: String },
    /// The task ran out of attempts.
    DeadLettered { task: TaskId, attempts: Attempt },
    /// The task was cancelled by an operator.
    Cancelled { task: TaskId },
    /// The worker was told to drain.
    Drained { worker: WorkerId },
    /// A finished job outlived `tasks.job_retention`: its records, specs and results
    /// were deleted (every one of its tasks had reached a terminal state).
    JobExpired { job: JobId },
    /// Worker side: the task's user code started.
    TaskStarted { task: TaskId, worker: WorkerId, token: FencingToken },
    /// Worker side: the task's user code stopped (finished, failed or cancelled).
    TaskStopped { task: TaskId, worker: WorkerId, token: FencingToken },
    /// Worker side: no beat acknowledged in time (or its Work stream broke); the
    /// worker stopped everything. (Histories written before the rename say `Fenced`.)
    #[serde(alias = "Fenced")]
    SelfFenced { worker: WorkerId, incarnation: Incarnation },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_one_flat_json_object() {
        let record = HistoryRecord {
            seq: 7,
            node: "coordinator".into(),
            wall_unix_ms: 1_000,
            wall_unix_us: None,
            event: HistoryEvent::Leased {
                task: TaskId::new(JobId(1), 2),
                worker: WorkerId::new("w1").expect("valid"),
                token: FencingToken(9),
                attempt: Attempt(1),
            },
        };
        let json = serde_json::to_string(&record).expect("encodes");
        assert_eq!(
            json,
            r#"{"seq":7,"node":"coordinator","wall_unix_ms":1000,"event":"leased","task":"job-1.2","worker":"w1","token":9,"attempt":1}"#
        );
        assert_eq!(serde_json::from_str::<HistoryRecord>(&json).expect("decodes"), record);
    }
}
