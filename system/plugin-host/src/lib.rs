//! `rollout-plugin-host`: runs user code for a rollout worker, behind
//! [`rollout_core::traits::PluginHost`].
//!
//! Three modes, chosen per plugin in the worker config ([`spec`]):
//! - **cdylib**: a Rust shared library built with `rollout-plugin-sdk`, loaded with
//!   libloading after its ABI version is checked. Fast, but in-process: a hung call is
//!   abandoned (not killed) and a segfault takes the worker down.
//! - **python** (feature `python`): a Python module run in-process through PyO3.
//!   Exceptions become [`PluginError::Failed`] with the traceback. Like cdylib, a hung
//!   call is abandoned (an exception is injected into it on a best-effort basis).
//! - **sidecar**: a separate Python process serving `plugin.proto` over gRPC on a Unix
//!   socket. Isolated: a crash or a hang fails the call, the process is killed and is
//!   restarted before the next call.
//!
//! Calls block; a driver running on tokio calls [`LocalPluginHost`] from
//! `spawn_blocking` (the sidecar mode drives its own small runtime and must not be
//! called from inside an async task).

mod bounded;
mod cdylib;
mod ffi;
#[cfg(feature = "python")]
mod python;
mod sidecar;
pub mod spec;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub use bounded::ABANDONED_CALLS_MAX;
use rollout_core::traits::{CancelToken, PluginCall, PluginError, PluginHost};
pub use rollout_plugin_sdk::abi::ABI_VERSION;
pub use sidecar::{
    CANCEL_GRACE, PARENT_PIPE_ENV, RESTART_BACKOFF_INITIAL, RESTART_BACKOFF_MAX, SIDECAR_ABI_VERSION,
    SIDECAR_MESSAGE_BYTES_MAX,
};
pub use spec::{
    PluginMode, PluginSpec, SIDECAR_BASE_ENV, SidecarSpec, plugin_specs_from_config_file, plugin_specs_from_toml_str,
    validate_plugin_specs,
};

use crate::cdylib::CdylibPlugin;
use crate::sidecar::{SidecarPlugin, SidecarRuntime};

/// Why a plugin could not be loaded or started. Each names the plugin (and the file,
/// where there is one) and says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The shared library could not be opened.
    #[error("plugin {plugin:?}: cannot load {}: {reason}", path.display())]
    Open {
        /// The plugin's configured name.
        plugin: String,
        /// The library file.
        path: PathBuf,
        /// The loader's message.
        reason: String,
    },
    /// The library is not a rollout plugin.
    #[error("plugin {plugin:?}: {} is not a rollout plugin: {reason}", path.display())]
    NotAPlugin {
        /// The plugin's configured name.
        plugin: String,
        /// The library file.
        path: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// The plugin was built for another ABI version.
    #[error(
        "plugin {plugin:?}: {} was built for plugin ABI version {theirs}, this worker speaks version {ours}; \
         rebuild the plugin against the rollout-plugin-sdk of this release",
        path.display()
    )]
    AbiMismatch {
        /// The plugin's configured name.
        plugin: String,
        /// The library file (or the sidecar's command).
        path: PathBuf,
        /// The host's version.
        ours: u32,
        /// The plugin's version.
        theirs: u32,
    },
    /// The plugin's own initialisation failed.
    #[error("plugin {plugin:?}: init failed: {reason}")]
    InitFailed {
        /// The plugin's configured name.
        plugin: String,
        /// The plugin's message.
        reason: String,
    },
    /// A Python module could not be imported or has no usable `handle`.
    #[error("plugin {plugin:?}: {reason}")]
    Python {
        /// The plugin's configured name.
        plugin: String,
        /// What went wrong, with the Python traceback when there is one.
        reason: String,
    },
    /// mode = "python" in a worker built without the `python` feature.
    #[error(
        "plugin {plugin:?}: mode = \"python\" needs a worker built with the `python` feature; \
         rebuild with `--features python`, or run the module as mode = \"sidecar\""
    )]
    PythonNotBuiltIn {
        /// The plugin's configured name.
        plugin: String,
    },
    /// A sidecar did not start or did not become healthy in time.
    #[error("plugin {plugin:?}: sidecar did not start: {reason}")]
    SidecarStart {
        /// The plugin's configured name.
        plugin: String,
        /// What happened (exit status, timeout, socket error).
        reason: String,
    },
    /// Two plugins share a name.
    #[error("plugin {0:?} is configured twice; names must be unique")]
    DuplicateName(String),
}

impl From<LoadError> for rollout_core::Error {
    fn from(e: LoadError) -> Self {
        let field = match &e {
            LoadError::Open { plugin, .. }
            | LoadError::NotAPlugin { plugin, .. }
            | LoadError::AbiMismatch { plugin, .. }
            | LoadError::InitFailed { plugin, .. }
            | LoadError::Python { plugin, .. }
            | LoadError::PythonNotBuiltIn { plugin }
            | LoadError::SidecarStart { plugin, .. }
            | LoadError::DuplicateName(plugin) => format!("plugins.{plugin}"),
        };
        rollout_core::Error::config_invalid(field, e.to_string())
    }
}

enum Plugin {
    Cdylib(CdylibPlugin),
    #[cfg(feature = "python")]
    Python(python::PythonPlugin),
    Sidecar(Box<SidecarPlugin>),
}

/// The [`PluginHost`] that runs plugins on this machine, in the mode each one's
/// [`PluginSpec`] names.
pub struct LocalPluginHost {
    plugins: BTreeMap<String, Plugin>,
    // Kept alive for the sidecars' gRPC clients; None when there is no sidecar.
    _runtime: Option<Arc<SidecarRuntime>>,
}

impl std::fmt::Debug for LocalPluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPluginHost").field("plugins", &self.plugins.keys().collect::<Vec<_>>()).finish()
    }
}

impl LocalPluginHost {
    /// Loads every cdylib and Python plugin and starts every sidecar (waiting until it
    /// answers a health check). Fails on the first plugin that cannot be brought up;
    /// the ones already started are stopped again.
    pub fn start(specs: &[PluginSpec]) -> Result<Self, LoadError> {
        let needs_runtime = specs.iter().any(|s| matches!(s.mode, PluginMode::Sidecar(_)));
        let runtime = if needs_runtime {
            Some(Arc::new(SidecarRuntime::new().map_err(|reason| {
                LoadError::SidecarStart {
                    plugin: specs
                        .iter()
                        .find(|s| matches!(s.mode, PluginMode::Sidecar(_)))
                        .map_or_else(String::new, |s| s.name.clone()),
                    reason,
                }
            })?))
        } else {
            None
        };
        let mut plugins = BTreeMap::new();
        for spec in specs {
            if plugins.contains_key(&spec.name) {
                return Err(LoadError::DuplicateName(spec.name.clone()));
            }
            let plugin = match &spec.mode {
                PluginMode::Cdylib { path } => Plugin::Cdylib(CdylibPlugin::load(&spec.name, path)?),
                #[cfg(feature = "python")]
                PluginMode::Python { module, path } => {
                    Plugin::Python(python::PythonPlugin::load(&spec.name, module, path.as_deref())?)
                }
                #[cfg(not(feature = "python"))]
                PluginMode::Python { .. } => return Err(LoadError::PythonNotBuiltIn { plugin: spec.name.clone() }),
                PluginMode::Sidecar(sidecar) => {
                    let runtime = runtime.as_ref().map(Arc::clone).ok_or_else(|| LoadError::SidecarStart {
                        plugin: spec.name.clone(),
                        reason: "no runtime".to_owned(),
                    })?;
                    Plugin::Sidecar(Box::new(SidecarPlugin::start(&spec.name, sidecar, runtime)?))
                }
            };
            plugins.insert(spec.name.clone(), plugin);
        }
        Ok(LocalPluginHost { plugins, _runtime: runtime })
    }

    /// Calls of `plugin` given up on (deadline or cancellation) whose user code is
    /// still running in-process. Always 0 for sidecars, whose calls are killed.
    pub fn abandoned_calls(&self, plugin: &str) -> usize {
        match self.plugins.get(plugin) {
            Some(Plugin::Cdylib(p)) => p.abandoned_calls(),
            #[cfg(feature = "python")]
            Some(Plugin::Python(p)) => p.abandoned_calls(),
            Some(Plugin::Sidecar(_)) | None => 0,
        }
    }

    /// How many times the sidecar `plugin` was (re)started, counting the first start;
    /// `None` if `plugin` is not a sidecar.
    pub fn sidecar_starts(&self, plugin: &str) -> Option<u64> {
        match self.plugins.get(plugin) {
            Some(Plugin::Sidecar(p)) => Some(p.starts()),
            _ => None,
        }
    }
}

impl PluginHost for LocalPluginHost {
    fn plugins(&self) -> Vec<String> {
        self.plugins.keys().cloned().collect()
    }

    fn call(&self, call: &PluginCall, cancel: &CancelToken) -> Result<Vec<u8>, PluginError> {
        let plugin = self.plugins.get(&call.plugin).ok_or_else(|| PluginError::NotFound(call.plugin.clone()))?;
        if cancel.is_cancelled() {
            return Err(PluginError::Cancelled);
        }
        if call.deadline.is_zero() {
            return Err(PluginError::DeadlineExceeded(call.deadline));
        }
        let inputs: Vec<String> = call.inputs.iter().map(|p| p.display().to_string()).collect();
        match plugin {
            Plugin::Cdylib(p) => p.call(&call.method, &call.payload, &inputs, call.deadline, cancel),
            #[cfg(feature = "python")]
            Plugin::Python(p) => p.call(&call.method, &call.payload, &inputs, call.deadline, cancel),
            Plugin::Sidecar(p) => p.call(&call.method, &call.payload, &inputs, call.deadline, cancel),
        }
    }

    fn restarts(&self) -> Vec<(String, u64)> {
        self.plugins
            .iter()
            .filter_map(|(name, plugin)| match plugin {
                Plugin::Sidecar(p) => Some((name.clone(), p.starts().saturating_sub(1))),
                _ => None,
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}
