//! rollout's layer-1 simulator: the real coordinator and worker state machines driven
//! by a deterministic discrete-event loop with virtual clocks, a virtual network, a
//! crash-faithful in-memory disk and a simulated plugin host, judged after every event
//! by an invariant checker.
//!
//! One `u64` seed determines a whole run: same scenario, seed and binary give the same
//! trace hash ([`RunReport::trace_hash`]).

mod engine;
/// The invariant checker, in its own crate so that `rollout check` needs no simulator.
pub use rollout_history as checker;
pub mod liveness;
pub mod model_store;
pub mod scenario;
pub mod schedule;
pub mod shrink;
mod swarm;
pub mod timeline;

pub use engine::{
    Coverage, FRAMES_BY_COUNT, FaultSpan, MessageRecord, Options, RELEASE_BEFORE_DURABLE, RESET_ENDS_INCARNATION,
    RunReport, run, run_with,
};
pub use scenario::Scenario;

/// The shipped scenarios' folder (`<workspace>/scenarios`).
///
/// Under cargo (`cargo test`, `cargo run`), the checkout being run, read at run time: a
/// binary reused from a shared target dir may have been built in another checkout. Else
/// the checkout this was built in.
pub fn scenarios_dir() -> std::path::PathBuf {
    let at_run_time = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(|dir| std::path::Path::new(&dir).join("..").join("scenarios"))
        .filter(|dir| dir.is_dir());
    at_run_time.unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("scenarios"))
}
