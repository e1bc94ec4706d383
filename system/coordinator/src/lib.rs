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
mod machine;
pub mod metrics;
mod records;

#[cfg(feature = "planted-bugs")]
pub use machine::PlantedBugs;
pub use machine::{
    Coordinator, CoordinatorInput, CoordinatorOutput, CoordinatorSettings, JobStatus, JobSubmission, OperatorReply,
    PLANTED_BUGS, RequestId, TaskReport, WorkerStatus,
};
pub use records::{TaskSpec, TaskState, WorkerState, stored_result};

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;
