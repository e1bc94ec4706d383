//! `rollout-cloud-local`: the cloud seams of [`rollout_core::traits`] implemented on
//! one machine, with nothing but the local filesystem, a [`Storage`] and the process
//! environment.
//!
//! - [`FsObjectStore`] ([`ObjectStore`]): content-addressed blobs under
//!   `./data/object-store/ab/cd/<hex>`, each with a `<hex>.meta.json` sidecar.
//! - [`DurableQueue`] ([`Queue`]): a bounded FIFO written through to a [`Storage`]
//!   under `cloudlocal_queue/<ulid>` before it is visible in memory.
//! - [`EnvSecretStore`] ([`SecretStore`]): an allowlist of `ROLLOUT_SECRET_<NAME>`
//!   environment variables, read-only.
//! - [`LocalComputeHint`] ([`ComputeHint`]): CPUs and memory from `/proc`, GPUs from
//!   NVML (feature `nvml`), preemption from a marker file.
//!
//! Architecture invariant: this crate implements traits; it holds no coordinator or
//! worker logic, depends on no async runtime, and never panics on what it reads
//! from outside the process (files, environment, storage): that is an [`Error`]
//! naming the file, variable or key.
//!
//! [`Storage`]: rollout_core::traits::Storage
//! [`ObjectStore`]: rollout_core::traits::ObjectStore
//! [`Queue`]: rollout_core::traits::Queue
//! [`SecretStore`]: rollout_core::traits::SecretStore
//! [`ComputeHint`]: rollout_core::traits::ComputeHint
//! [`Error`]: rollout_core::Error

#![warn(missing_docs)]

mod compute;
mod io_error;
mod object_store;
mod queue;
mod secrets;

pub use compute::{LocalComputeHint, parse_cpuinfo, parse_meminfo};
pub use object_store::{CHUNK_BYTES, DEFAULT_MAX_OBJECT_BYTES, DEFAULT_ROOT, FsObjectStore, ObjectMeta};
pub use queue::{DEFAULT_MAX_LEN, DurableQueue, QUEUE_KEY_PREFIX};
pub use secrets::{ENV_PREFIX, EnvSecretStore};
