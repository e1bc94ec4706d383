//! `rollout coordinator` and `rollout worker`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rollout_core::traits::{EventEmitter, PluginHost};
use rollout_core::{Error, WorkerId};
use rollout_plugin_host::{LocalPluginHost, plugin_specs_from_config_file};
use rollout_transport::enroll::{self, BootstrapToken, JoinOptions, Joined};
use rollout_transport::{
    BuiltinPlugins, CoordinatorOptions, FileJsonEmitter, PluginRouter, StdoutJsonEmitter, WorkerOptions,
    run_worker_process, start_coordinator,
};
use tokio::sync::watch;

use crate::{CommonArgs, load_config};

fn emitter(history: Option<PathBuf>) -> Result<Arc<dyn EventEmitter>, Error> {
    Ok(match history {
        Some(path) => Arc::new(FileJsonEmitter::open(&path)?),
        None => Arc::new(StdoutJsonEmitter::new()),
    })
}

/// Open files a process needs besides its connections (database, logs, plugins).
const FILES_BESIDES_CONNECTIONS: u64 = 256;

/// Raises the soft limit of open files to the hard limit: every connection is a file,
/// and the default soft limit (often 1024) is far below `limits.max_connections`.
/// Warns, naming the limit, when even the hard limit is below `needed`.
fn raise_open_files(needed: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(1 << 20);
    if limit.current.is_some_and(|soft| soft < hard)
        && let Err(e) = setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: limit.maximum })
    {
        tracing::warn!(error = %e, "cannot raise the open-files limit (RLIMIT_NOFILE) to its hard limit {hard}");
    }
    let now = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    if now < needed {
        tracing::warn!(
            open_files = now,
            needed,
            "the open-files limit is {now}, below the {needed} that limits.max_connections and the process's own files \
             need: connections beyond it fail; raise the hard limit (ulimit -Hn, or LimitNOFILE= in a systemd unit)"
        );
    } else {
        tracing::debug!(open_files = now, "open-files limit");
    }
}

pub async fn coordinator(common: &CommonArgs, listen: Option<String>, history: Option<PathBuf>) -> Result<(), Error> {
    let config = load_config(common)?;
    raise_open_files(u64::from(config.limits.max_connections) + FILES_BESIDES_CONNECTIONS);
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
    join: Option<(String, String)>,
    history: Option<PathBuf>,
    metrics_addr: Option<String>,
) -> Result<(), Error> {
    let mut config = load_config(common)?;
    if let Some(addr) = metrics_addr {
        rollout_core::config::check_metrics_addr("--metrics-addr", &addr)?;
        config.metrics.worker_listen_addr = addr;
    }
    raise_open_files(FILES_BESIDES_CONNECTIONS + u64::from(slots));
    let id = WorkerId::new(id).map_err(|e| Error::invalid_input(format!("--id: {e}")))?;
    if slots == 0 || slots > config.limits.max_slots_per_worker {
        return Err(Error::invalid_input(format!(
            "--slots: {slots} is outside 1..={} (limits.max_slots_per_worker)",
            config.limits.max_slots_per_worker
        )));
    }
    let coordinator = match join {
        Some((addr, token)) => {
            let token: BootstrapToken = token.parse().map_err(|e| Error::invalid_input(format!("--token: {e}")))?;
            let opts = JoinOptions {
                addr: addr.clone(),
                token,
                worker: id.clone(),
                tls_dir: config.transport.tls_dir.clone(),
                max_message_bytes: config.limits.max_message_bytes as usize,
                retry_initial: config.transport.reconnect_backoff_initial,
                retry_max: config.transport.reconnect_backoff_max,
                attempts_max: None,
            };
            match enroll::join(opts).await? {
                Joined::AlreadyEnrolled(files) => {
                    tracing::info!(cert = %files.cert.display(), "--join: certificate already present; not enrolling");
                }
                Joined::Enrolled(files) => tracing::info!(cert = %files.cert.display(), "--join: enrolled"),
            }
            Some(addr)
        }
        None => coordinator,
    };
    let plugins = worker_plugins(common.config.as_deref()).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let opts = WorkerOptions {
        config,
        id,
        slots,
        plugins,
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

/// The worker's plugins: the `[[plugins]]` tables of its config file (relative paths
/// taken from the file's directory), started by [`LocalPluginHost`] (sidecars are up
/// and healthy when this returns), plus the built-in `echo` and `sleep` where no
/// configured plugin has that name. Exactly these names are advertised at Register.
async fn worker_plugins(config_file: Option<&Path>) -> Result<Arc<dyn PluginHost>, Error> {
    let specs = match config_file {
        Some(path) => plugin_specs_from_config_file(path)?,
        None => Vec::new(),
    };
    // Loading libraries and waiting for sidecars blocks.
    let host = tokio::task::spawn_blocking(move || LocalPluginHost::start(&specs))
        .await
        .map_err(|e| Error::internal(format!("starting the plugins: {e}")))??;
    let configured = host.plugins();
    let router = PluginRouter::new([Arc::new(host) as Arc<dyn PluginHost>, Arc::new(BuiltinPlugins)]);
    tracing::info!(?configured, advertised = ?router.plugins(), "plugins started");
    Ok(Arc::new(router))
}

#[cfg(test)]
mod tests {
    use rollout_core::Fatal;

    use super::*;

    /// The advertised names, or the error.
    fn plugins_of(config_file: Option<&Path>) -> Result<Vec<String>, Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build();
        runtime.expect("a tokio runtime").block_on(worker_plugins(config_file)).map(|host| host.plugins())
    }

    fn field_of(err: Error) -> String {
        match err {
            Error::Fatal(Fatal::ConfigInvalid { field, reason }) => format!("{field}: {reason}"),
            other => panic!("expected ConfigInvalid, got {other:?}"),
        }
    }

    #[test]
    fn without_plugins_the_worker_offers_the_built_ins() {
        assert_eq!(plugins_of(None).expect("built-ins"), ["echo", "sleep"]);
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("worker.toml");
        std::fs::write(&file, "[health]\nheartbeat_interval = \"200ms\"\n").expect("write config");
        assert_eq!(plugins_of(Some(&file)).expect("no [[plugins]]"), ["echo", "sleep"]);
    }

    #[test]
    fn configured_plugins_resolve_against_the_config_file_and_errors_name_the_plugin() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("worker.toml");
        std::fs::write(&file, "[[plugins]]\nname = \"echo\"\nmode = \"cdylib\"\npath = \"lib/libnope.so\"\n")
            .expect("write config");
        let err = field_of(plugins_of(Some(&file)).expect_err("the library does not exist"));
        assert!(err.starts_with("plugins.echo:"), "{err}");
        assert!(err.contains(&dir.path().join("lib/libnope.so").display().to_string()), "resolved: {err}");

        std::fs::write(&file, "[[plugins]]\nname = \"x\"\nmode = \"wasm\"\n").expect("write config");
        let err = field_of(plugins_of(Some(&file)).expect_err("no such mode"));
        assert!(err.starts_with(&format!("plugins[0].mode (in {})", file.display())), "{err}");
    }
}
