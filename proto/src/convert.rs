//! Wire <-> core conversions. Conversions from the wire are fallible and name the
//! offending field: a peer's malformed message becomes an error reply, never a panic.

use rollout_core::traits::{Gpu, Inventory};
use rollout_core::{Error, JobId, TaskId, WorkerId};

use crate::transport as pb;

/// A wire message that does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed message: field {field}: {reason}")]
pub struct WireError {
    /// The offending field, e.g. `submit.task`.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Error {
        Error::invalid_input(e.to_string())
    }
}

impl From<TaskId> for pb::TaskId {
    fn from(t: TaskId) -> Self {
        pb::TaskId { job: t.job.get(), index: t.index }
    }
}

impl From<pb::TaskId> for TaskId {
    fn from(t: pb::TaskId) -> Self {
        TaskId::new(JobId(t.job), t.index)
    }
}

/// A required task id: proto3 message fields are optional on the wire.
pub fn required_task_id(field: &'static str, task: Option<pb::TaskId>) -> Result<TaskId, WireError> {
    task.map(TaskId::from).ok_or_else(|| WireError { field, reason: "missing".to_owned() })
}

/// A worker id from the wire, validated.
pub fn worker_id(field: &'static str, text: &str) -> Result<WorkerId, WireError> {
    WorkerId::new(text).map_err(|e| WireError { field, reason: e.to_string() })
}

impl From<Inventory> for pb::Inventory {
    fn from(inv: Inventory) -> Self {
        pb::Inventory {
            cpus: inv.cpus,
            memory_bytes: inv.memory_bytes,
            gpus: inv
                .gpus
                .into_iter()
                .map(|g| pb::Gpu { index: g.index, name: g.name, uuid: g.uuid, memory_bytes: g.memory_bytes })
                .collect(),
        }
    }
}

impl From<pb::Inventory> for Inventory {
    fn from(inv: pb::Inventory) -> Self {
        Inventory {
            cpus: inv.cpus,
            memory_bytes: inv.memory_bytes,
            gpus: inv
                .gpus
                .into_iter()
                .map(|g| Gpu { index: g.index, name: g.name, uuid: g.uuid, memory_bytes: g.memory_bytes })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    proptest! {
        #[test]
        fn task_id_round_trips_through_the_wire(job in any::<u64>(), index in any::<u32>()) {
            let id = TaskId::new(JobId(job), index);
            let bytes = pb::TaskId::from(id).encode_to_vec();
            let decoded = pb::TaskId::decode(bytes.as_slice()).expect("decodes");
            prop_assert_eq!(required_task_id("t", Some(decoded)), Ok(id));
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = pb::WorkerFrame::decode(bytes.as_slice());
            let _ = pb::RegisterRequest::decode(bytes.as_slice());
        }
    }

    #[test]
    fn missing_and_malformed_fields_are_named() {
        let err = required_task_id("submit.task", None).expect_err("missing");
        assert_eq!(err.to_string(), "malformed message: field submit.task: missing");
        let err = worker_id("register.worker_id", "bad id").expect_err("space");
        assert!(err.to_string().contains("register.worker_id"), "{err}");
        assert!(Error::from(err).is_fatal());
    }

    #[test]
    fn inventory_round_trips() {
        let inv = Inventory {
            cpus: 16,
            memory_bytes: 1 << 37,
            gpus: vec![Gpu { index: 0, name: "H100".into(), uuid: "GPU-1".into(), memory_bytes: 80 << 30 }],
        };
        assert_eq!(Inventory::from(pb::Inventory::from(inv.clone())), inv);
    }

    #[test]
    fn services_are_generated() {
        // Compile-time check that both client and server stubs exist.
        fn _client(_: Option<pb::coordinator_client::CoordinatorClient<tonic::transport::Channel>>) {}
        fn _plugin(_: Option<crate::plugin::plugin_client::PluginClient<tonic::transport::Channel>>) {}
        let names = [pb::coordinator_server::SERVICE_NAME, pb::operator_server::SERVICE_NAME];
        assert_eq!(names, ["rollout.transport.v1.Coordinator", "rollout.transport.v1.Operator"]);
    }
}
