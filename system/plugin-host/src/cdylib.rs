//! Rust cdylib plugins: loaded once, each call on its own thread under a deadline.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rollout_core::traits::{CancelToken, PluginError};

use crate::LoadError;
use crate::bounded::{AbandonedCalls, run_bounded};
use crate::ffi::NativeLibrary;

/// A loaded cdylib plugin.
#[derive(Debug)]
pub(crate) struct CdylibPlugin {
    name: String,
    library: Arc<NativeLibrary>,
    abandoned: AbandonedCalls,
}

impl CdylibPlugin {
    pub(crate) fn load(name: &str, path: &Path) -> Result<Self, LoadError> {
        let library = Arc::new(NativeLibrary::load(name, path)?);
        Ok(CdylibPlugin { name: name.to_owned(), library, abandoned: AbandonedCalls::default() })
    }

    /// A native call cannot be interrupted: at the deadline the call is abandoned (its
    /// thread keeps the library loaded until the plugin function returns).
    pub(crate) fn call(
        &self,
        method: &str,
        payload: &[u8],
        inputs: &[String],
        deadline: Duration,
        cancel: &CancelToken,
    ) -> Result<Vec<u8>, PluginError> {
        let library = Arc::clone(&self.library);
        let (method, payload, inputs) = (method.to_owned(), payload.to_vec(), inputs.to_vec());
        let work = move || library.call(&method, &payload, &inputs);
        run_bounded(&self.name, deadline, cancel, &self.abandoned, work, || {})
    }

    pub(crate) fn abandoned_calls(&self) -> usize {
        self.abandoned.running()
    }
}
