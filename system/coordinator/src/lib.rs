//! `rollout-coordinator`: the coordinator as a deterministic, sans-IO state machine.
//!
//! The driver (the tokio runtime in `rollout-transport`, or the simulator) hands it
//! inputs with the current [`rollout_core::Now`] and carries out its outputs; the
//! machine itself never reads a clock, touches a socket, spawns, or draws randomness.
//! Its durable state lives in a [`rollout_core::traits::Storage`]: each batch of
//! inputs is one transaction, committed before the batch's outputs are released.
//!
//! Architecture invariant: depends on `rollout-core` and small pure crates only
//! (postcard, serde, sha2, hdrhistogram); iteration order is deterministic (BTreeMap).

pub mod audit;
mod dispatch;
mod jobs;
mod machine;
pub mod metrics;
mod records;
mod status;
mod submits;
mod workers;

#[cfg(feature = "planted-bugs")]
pub use machine::PlantedBugs;
pub use machine::{
    ASSIGN_BYTES_PER_BATCH_MAX, Coordinator, CoordinatorInput, CoordinatorOutput, CoordinatorSettings,
    DELETIONS_PER_BATCH_MAX, JobSubmission, NOTICE_INTERVAL, Notice, OperatorReply, PLANTED_BUGS, RequestId,
};
pub use records::{
    FORMAT_VERSION, FORMAT_VERSION_OLDEST, INLINE_RESULT_BYTES_MAX, JobLookup, StoredJob, TaskCounts, TaskReport,
    TaskShape, TaskSpec, TaskState, WorkerState, durable_task_states, referenced_blobs, stored_job, stored_result,
    stored_task_reports,
};
pub use status::{ClusterTotals, JobPhase, JobStatus, JobsQuery, StatusPage, StatusQuery, WorkerStatus};

#[cfg(test)]
mod boundary_tests;
#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;
