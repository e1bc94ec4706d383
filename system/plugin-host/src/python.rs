//! Python plugins run in-process through PyO3 (feature `python`).
//!
//! The module is imported once; each call runs `handle(method, payload)` (or
//! `handle(payload)`) on its own thread, which attaches to the interpreter only for the
//! Python part. The waiting caller never holds the GIL, so the worker's own threads
//! keep running while Python works, and several calls may be in flight (Python
//! interleaves them under its GIL).
//!
//! At the deadline (or on cancellation) the call is abandoned like a native one, and a
//! `DeadlineExceeded` exception (a `BaseException`, so `except Exception` does not
//! swallow it) is injected into its thread. That stops pure-Python code at its next
//! bytecode; code blocked inside C (a sleep, a socket read, a long numpy operation)
//! only sees it when the C call returns. Use the sidecar mode where that matters.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyModule};
use rollout_core::traits::{CancelToken, PluginError};

use crate::LoadError;
use crate::bounded::{AbandonedCalls, run_bounded};

/// The Python side of the host: load, call, interrupt.
const HOST_CODE: &std::ffi::CStr = cr#"
import ctypes, importlib, inspect, sys, threading, traceback

class DeadlineExceeded(BaseException):
    """Raised into a plugin call the worker gave up on (deadline or cancellation)."""

def load(module, path):
    if path is not None and path not in sys.path:
        sys.path.insert(0, path)
    mod = importlib.import_module(module)
    handle = getattr(mod, "handle", None)
    if not callable(handle):
        raise TypeError(f"module {module!r} has no callable handle(method, payload) or handle(payload)")
    try:
        required = [
            p for p in inspect.signature(handle).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        ]
        arity = 1 if len(required) == 1 else (3 if len(required) >= 3 else 2)
    except (TypeError, ValueError):
        arity = 2
    return handle, arity

def ident():
    return threading.get_ident()

def call(handle, arity, method, payload, inputs):
    try:
        if arity == 1:
            result = handle(payload)
        elif arity == 3:
            result = handle(method, payload, inputs)
        else:
            result = handle(method, payload)
        if isinstance(result, str):
            result = result.encode()
        if not isinstance(result, (bytes, bytearray, memoryview)):
            return False, b"", f"TypeError: handle returned {type(result).__name__}, expected bytes", ""
        return True, bytes(result), "", ""
    except BaseException as e:
        return False, b"", f"{type(e).__name__}: {e}", traceback.format_exc()

def interrupt(ident):
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(DeadlineExceeded))
"#;

struct Loaded {
    host: Py<PyModule>,
    handle: Py<PyAny>,
    arity: u8,
}

/// A loaded in-process Python plugin.
pub(crate) struct PythonPlugin {
    name: String,
    loaded: Arc<Loaded>,
    abandoned: AbandonedCalls,
}

impl PythonPlugin {
    pub(crate) fn load(name: &str, module: &str, path: Option<&Path>) -> Result<Self, LoadError> {
        let failed = |reason: String| LoadError::Python { plugin: name.to_owned(), reason };
        let path = match path {
            None => None,
            Some(p) => {
                Some(p.to_str().ok_or_else(|| failed(format!("path {} is not valid UTF-8", p.display())))?.to_owned())
            }
        };
        let loaded = Python::attach(|py| -> PyResult<Loaded> {
            let host = PyModule::from_code(py, HOST_CODE, c"<rollout_plugin_host>", c"_rollout_plugin_host")?;
            let (handle, arity): (Py<PyAny>, u8) = host.getattr("load")?.call1((module, path))?.extract()?;
            Ok(Loaded { host: host.unbind(), handle, arity })
        })
        .map_err(|e| failed(format!("cannot load module {module:?}: {}", describe(&e))))?;
        Ok(PythonPlugin { name: name.to_owned(), loaded: Arc::new(loaded), abandoned: AbandonedCalls::default() })
    }

    pub(crate) fn call(
        &self,
        method: &str,
        payload: &[u8],
        inputs: &[String],
        deadline: Duration,
        cancel: &CancelToken,
    ) -> Result<Vec<u8>, PluginError> {
        let loaded = Arc::clone(&self.loaded);
        let inputs = inputs.to_vec();
        let thread_ident = Arc::new(AtomicU64::new(0));
        let ident_for_call = Arc::clone(&thread_ident);
        let (method, payload) = (method.to_owned(), payload.to_vec());
        let work = move || {
            Python::attach(|py| {
                let result = run_call(py, &loaded, &ident_for_call, &method, &payload, &inputs);
                // Cleared while attached, so `interrupt` (also attached) never targets
                // this thread once its Python part is over.
                ident_for_call.store(0, Ordering::Release);
                result
            })
        };
        let loaded = Arc::clone(&self.loaded);
        let on_abandon = move || {
            // Attaching may wait for the GIL; never make the caller wait for it.
            std::thread::spawn(move || {
                Python::attach(|py| {
                    let ident = thread_ident.load(Ordering::Acquire);
                    if ident != 0
                        && let Err(e) = loaded.host.bind(py).getattr("interrupt").and_then(|f| f.call1((ident,)))
                    {
                        tracing::warn!(error = %e, "python_plugin_interrupt_failed");
                    }
                });
            });
        };
        run_bounded(&self.name, deadline, cancel, &self.abandoned, work, on_abandon)
    }

    pub(crate) fn abandoned_calls(&self) -> usize {
        self.abandoned.running()
    }
}

fn run_call(
    py: Python<'_>,
    loaded: &Loaded,
    ident: &AtomicU64,
    method: &str,
    payload: &[u8],
    inputs: &[String],
) -> Result<Vec<u8>, PluginError> {
    let crashed = |e: PyErr| PluginError::Crashed(format!("python plugin host: {}", describe(&e)));
    let host = loaded.host.bind(py);
    let me: u64 = host.getattr("ident").and_then(|f| f.call0()).and_then(|v| v.extract()).map_err(crashed)?;
    ident.store(me, Ordering::Release);
    let outcome = host
        .getattr("call")
        .and_then(|f| {
            f.call1((loaded.handle.bind(py), loaded.arity, method, PyBytes::new(py, payload), inputs.to_vec()))
        })
        .map_err(crashed)?;
    let (ok, bytes, message, traceback): (bool, Bound<'_, PyBytes>, String, String) =
        outcome.extract().map_err(crashed)?;
    if ok {
        Ok(bytes.as_bytes().to_vec())
    } else {
        Err(PluginError::Failed { message, detail: Some(traceback).filter(|t| !t.is_empty()) })
    }
}

/// "Type: message" followed by the traceback, when there is one.
fn describe(e: &PyErr) -> String {
    Python::attach(|py| match e.traceback(py).and_then(|tb| tb.format().ok()) {
        Some(tb) => format!("{e}\n{tb}"),
        None => e.to_string(),
    })
}
