//! What every transport test starts from: a temp dir, a CA with a coordinator, worker
//! and operator certificates, and a coordinator on an ephemeral loopback port.
#![allow(dead_code, reason = "each test binary uses its own part of it")]

use std::path::Path;
use std::sync::Arc;

use rollout_core::{Config, WorkerId};
use rollout_transport::{
    CoordinatorOptions, MemoryEmitter, RunningCoordinator, ensure_dev_ca, issue_client_cert, issue_operator_cert,
    issue_server_cert, start_coordinator,
};

/// [`Config::fast_failure_detection`], checked.
pub fn fast_config() -> Config {
    let config = Config::fast_failure_detection();
    config.validate().expect("a valid fast config");
    config
}

/// A coordinator ready for workers `workers` and operator "ops".
pub struct Started {
    pub dir: tempfile::TempDir,
    pub config: Config,
    pub addr: String,
    pub coordinator: RunningCoordinator,
    pub history: Arc<MemoryEmitter>,
}

/// `config` with its data and TLS dirs moved into `dir`, and `/metrics` on any free
/// port (tests run side by side; `RunningCoordinator::metrics_addr` says which).
pub fn config_in(dir: &Path, mut config: Config) -> Config {
    config.storage.data_dir = dir.join("data");
    config.transport.tls_dir = dir.join("tls");
    config.metrics.listen_addr = "127.0.0.1:0".into();
    config
}

/// Certificates for `workers` and operator "ops", then a coordinator with `config`
/// (its data and TLS dirs moved into a fresh temp dir).
pub async fn start(config: Config, workers: &[&str]) -> Started {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_in(dir.path(), config);
    let tls = &config.transport.tls_dir;
    ensure_dev_ca(tls).expect("CA");
    issue_server_cert(tls, &[]).expect("server cert");
    issue_operator_cert(tls, "ops").expect("operator cert");
    for w in workers {
        issue_client_cert(tls, &WorkerId::new(*w).expect("id")).expect("worker cert");
    }
    let history = Arc::new(MemoryEmitter::new());
    let coordinator = start_coordinator(CoordinatorOptions {
        config: config.clone(),
        emitter: history.clone(),
        listen_addr: Some("127.0.0.1:0".into()),
    })
    .await
    .expect("coordinator starts");
    let addr = coordinator.local_addr.to_string();
    Started { dir, config, addr, coordinator, history }
}

/// Starts in-process workers `ids` (built-in plugins, 4 slots each) against `started`;
/// sending `true` on the returned sender stops them.
pub fn spawn_workers(
    started: &Started,
    ids: &[&str],
) -> (tokio::sync::watch::Sender<bool>, Vec<tokio::task::JoinHandle<rollout_core::Result<()>>>) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let workers = ids
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let opts = rollout_transport::WorkerOptions {
                config: started.config.clone(),
                id: WorkerId::new(*w).expect("id"),
                slots: 4,
                plugins: Arc::new(rollout_transport::BuiltinPlugins),
                emitter: Arc::new(MemoryEmitter::new()),
                coordinator_addr: Some(started.addr.clone()),
                cert: None,
                rng_seed: Some(i as u64),
            };
            tokio::spawn(rollout_transport::run_worker_process(opts, stop_rx.clone()))
        })
        .collect();
    (stop_tx, workers)
}
