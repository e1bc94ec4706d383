//! rollout's layer-1 simulator: the real coordinator and worker state machines driven
//! by a deterministic discrete-event loop with virtual clocks, a virtual network, a
//! crash-faithful in-memory disk and a simulated plugin host, judged after every event
//! by an invariant checker.
//!
//! One `u64` seed determines a whole run: same scenario, seed and binary give the same
//! trace hash ([`RunReport::trace_hash`]).

pub mod checker;
mod engine;
pub mod liveness;
pub mod model_store;
pub mod scenario;
pub mod shrink;
mod swarm;
pub mod timeline;

pub use engine::{FaultSpan, MessageRecord, Options, RunReport, run, run_with};
pub use scenario::Scenario;

/// The shipped scenarios' folder (`<workspace>/scenarios`).
pub fn scenarios_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("scenarios")
}
