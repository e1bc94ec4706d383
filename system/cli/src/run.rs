//! `rollout coordinator` and `rollout worker`.

use std::path::PathBuf;
use std::sync::Arc;

use rollout_core::traits::EventEmitter;
use rollout_core::{Error, WorkerId};
use rollout_transport::{
    BuiltinPlugins, CoordinatorOptions, FileJsonEmitter, StdoutJsonEmitter, WorkerOptions, run_worker_process,
    start_coordinator,
};
use tokio::sync::watch;

use crate::{CommonArgs, load_config};

fn emitter(history: Option<PathBuf>) -> Result<Arc<dyn EventEmitter>, Error> {
    Ok(match history {
        Some(path) => Arc::new(FileJsonEmitter::open(&path)?),
        None => Arc::new(StdoutJsonEmitter::new()),
    })
}

pub async fn coordinator(common: &CommonArgs, listen: Option<String>, history: Option<PathBuf>) -> Result<(), Error> {
    let config = load_config(common)?;
    let mut running =
        start_coordinator(CoordinatorOptions { config, emitter: emitter(history)?, listen_addr: listen }).await?;
    tracing::info!(addr = %running.local_addr, "coordinator running; Ctrl-C stops it");
    tokio::select! {
        r = running.wait() => r,
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("stopping");
            running.shutdown().await
        }
    }
}

pub async fn worker(
    common: &CommonArgs,
    id: &str,
    slots: u32,
    coordinator: Option<String>,
    history: Option<PathBuf>,
) -> Result<(), Error> {
    let config = load_config(common)?;
    let id = WorkerId::new(id).map_err(|e| Error::invalid_input(format!("--id: {e}")))?;
    if slots == 0 || slots > config.limits.max_slots_per_worker {
        return Err(Error::invalid_input(format!(
            "--slots: {slots} is outside 1..={} (limits.max_slots_per_worker)",
            config.limits.max_slots_per_worker
        )));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let opts = WorkerOptions {
        config,
        id,
        slots,
        plugins: Arc::new(BuiltinPlugins),
        emitter: emitter(history)?,
        coordinator_addr: coordinator,
        cert: None,
        rng_seed: None,
    };
    let run = run_worker_process(opts, stop_rx);
    tokio::pin!(run);
    tokio::select! {
        r = &mut run => r,
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("stopping");
            let _ = stop_tx.send(true);
            run.await
        }
    }
}
