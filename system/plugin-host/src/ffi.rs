//! The only unsafe code of the host: loading a cdylib, checking its descriptor, and
//! calling through the C ABI defined in `rollout_plugin_sdk::abi`.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::path::{Path, PathBuf};

use libloading::Library;
use rollout_core::traits::PluginError;
use rollout_plugin_sdk::abi::{
    ABI_VERSION, ABI_VERSION_OLDEST, DESCRIPTOR_SYMBOL, PluginDescriptor, PluginResult, STATUS_ERROR, STATUS_OK,
    STATUS_PANIC,
};

type CallWithInputs = unsafe extern "C" fn(*const u8, usize, *const u8, usize, *const u8, usize) -> PluginResult;

use crate::LoadError;

/// The host's reading of [`PluginDescriptor`]: the same layout, but with nullable
/// function pointers, so a descriptor written by hand in C with a null entry is
/// refused instead of being undefined behaviour.
#[repr(C)]
struct RawDescriptor {
    abi_version: u32,
    name_ptr: *const u8,
    name_len: usize,
    init: Option<extern "C" fn() -> PluginResult>,
    call: Option<unsafe extern "C" fn(*const u8, usize, *const u8, usize) -> PluginResult>,
    free: Option<unsafe extern "C" fn(PluginResult)>,
    shutdown: Option<extern "C" fn()>,
    /// Version 2 only: read only when the library says 2 (a version-1 static ends
    /// before it).
    call_with_inputs: Option<CallWithInputs>,
}

/// The version-1 prefix of [`RawDescriptor`]: all a version-1 library's static holds.
#[repr(C)]
struct RawDescriptorV1 {
    abi_version: u32,
    name_ptr: *const u8,
    name_len: usize,
    init: Option<extern "C" fn() -> PluginResult>,
    call: Option<unsafe extern "C" fn(*const u8, usize, *const u8, usize) -> PluginResult>,
    free: Option<unsafe extern "C" fn(PluginResult)>,
    shutdown: Option<extern "C" fn()>,
}

// The two views must agree, or the mirror reads garbage.
const _: () = assert!(size_of::<RawDescriptor>() == size_of::<PluginDescriptor>());
const _: () = assert!(align_of::<RawDescriptor>() == align_of::<PluginDescriptor>());

/// A loaded, initialised plugin library. Dropping it calls the plugin's `shutdown`,
/// then unloads the library; callers keep it in an `Arc` that every running call
/// holds, so it is never unloaded under a running (or abandoned) call.
pub(crate) struct NativeLibrary {
    plugin_name: String,
    call: unsafe extern "C" fn(*const u8, usize, *const u8, usize) -> PluginResult,
    /// None for a version-1 library (it cannot take input blobs).
    call_with_inputs: Option<CallWithInputs>,
    abi_version: u32,
    free: unsafe extern "C" fn(PluginResult),
    shutdown: extern "C" fn(),
    // Dropped last (fields drop in declaration order, after `Drop::drop`).
    _library: Library,
}

impl std::fmt::Debug for NativeLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeLibrary").field("plugin_name", &self.plugin_name).finish_non_exhaustive()
    }
}

impl NativeLibrary {
    /// Loads `path`, checks the ABI version before touching anything else in the
    /// descriptor, and runs the plugin's `init`.
    pub(crate) fn load(plugin: &str, path: &Path) -> Result<Self, LoadError> {
        let path_buf = PathBuf::from(path);
        // SAFETY: loading runs the library's initialisers. A plugin library is trusted
        // user code named in the worker's config; that trust is the premise of the
        // cdylib mode (use the sidecar mode for code that must be isolated).
        let library = unsafe { Library::new(path) }.map_err(|source| LoadError::Open {
            plugin: plugin.to_owned(),
            path: path_buf.clone(),
            reason: source.to_string(),
        })?;
        let missing =
            |reason: String| LoadError::NotAPlugin { plugin: plugin.to_owned(), path: path_buf.clone(), reason };
        // SAFETY: we ask for the address of a data symbol (a `*const c_void` is what
        // `dlsym` returns); nothing is read through it yet.
        let symbol = unsafe { library.get::<*const c_void>(DESCRIPTOR_SYMBOL) }.map_err(|e| {
            missing(format!(
                "no `rollout_plugin_descriptor` symbol ({e}); was it built with rollout-plugin-sdk's export_plugin!?"
            ))
        })?;
        let address: *const c_void = *symbol;
        if address.is_null() {
            return Err(missing("`rollout_plugin_descriptor` is null".to_owned()));
        }
        // SAFETY: every ABI version starts the descriptor with a u32 version, so reading
        // exactly that much is valid whatever version the plugin speaks; the symbol is a
        // static of the library, which stays loaded while `library` lives.
        let theirs = unsafe { address.cast::<u32>().read() };
        if !(ABI_VERSION_OLDEST..=ABI_VERSION).contains(&theirs) {
            return Err(LoadError::AbiMismatch {
                plugin: plugin.to_owned(),
                path: path_buf,
                ours: ABI_VERSION,
                theirs,
            });
        }
        // SAFETY: a known version: the static has the layout of `PluginDescriptor` up to
        // what that version has, and the version-1 fields are its prefix, which
        // `RawDescriptorV1` mirrors with nullable function pointers.
        let raw = unsafe { &*address.cast::<RawDescriptorV1>() };
        let (Some(init), Some(call), Some(free), Some(shutdown)) = (raw.init, raw.call, raw.free, raw.shutdown) else {
            return Err(missing("the descriptor has a null function pointer".to_owned()));
        };
        let call_with_inputs = if theirs >= 2 {
            // SAFETY: a version-2 static has the whole `PluginDescriptor` layout, which
            // `RawDescriptor` mirrors (asserted above).
            let full = unsafe { &*address.cast::<RawDescriptor>() };
            Some(
                full.call_with_inputs
                    .ok_or_else(|| missing("the descriptor has a null call_with_inputs".to_owned()))?,
            )
        } else {
            None
        };
        let own_name = if raw.name_ptr.is_null() {
            String::new()
        } else {
            // SAFETY: the ABI says name_ptr/name_len describe 'static bytes of the library.
            String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(raw.name_ptr, raw.name_len) }).into_owned()
        };
        tracing::debug!(plugin, path = %path.display(), own_name, "plugin_library_loaded");
        let loaded = NativeLibrary {
            plugin_name: plugin.to_owned(),
            call,
            call_with_inputs,
            abi_version: theirs,
            free,
            shutdown,
            _library: library,
        };
        let result = init();
        let (status, bytes) = loaded.take(result);
        if status != STATUS_OK {
            return Err(LoadError::InitFailed {
                plugin: plugin.to_owned(),
                reason: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        Ok(loaded)
    }

    /// Runs one call on the current thread. Blocks for as long as the plugin does.
    pub(crate) fn call(&self, method: &str, payload: &[u8], inputs: &[String]) -> Result<Vec<u8>, PluginError> {
        let result = match (inputs.is_empty(), self.call_with_inputs) {
            // SAFETY: both buffers are live borrows for the whole call, as the ABI
            // requires; the plugin's `call` is thread-safe by the ABI's contract.
            (true, _) => unsafe { (self.call)(method.as_ptr(), method.len(), payload.as_ptr(), payload.len()) },
            (false, Some(call_with_inputs)) => {
                let encoded = rollout_plugin_sdk::abi::encode_inputs(inputs);
                // SAFETY: the three buffers are live borrows for the whole call, as the
                // ABI requires; `call_with_inputs` is thread-safe by its contract.
                unsafe {
                    call_with_inputs(
                        method.as_ptr(),
                        method.len(),
                        payload.as_ptr(),
                        payload.len(),
                        encoded.as_ptr(),
                        encoded.len(),
                    )
                }
            }
            (false, None) => {
                return Err(PluginError::Failed {
                    message: format!(
                        "plugin {:?} was built with plugin ABI {}, which cannot take input blobs; rebuild it with \
                         rollout-plugin-sdk (ABI {ABI_VERSION}) and export_plugin!(name, handler, inputs)",
                        self.plugin_name, self.abi_version
                    ),
                    detail: None,
                });
            }
        };
        let (status, bytes) = self.take(result);
        let text = || String::from_utf8_lossy(&bytes).into_owned();
        match status {
            STATUS_OK => Ok(bytes),
            STATUS_ERROR => Err(PluginError::Failed { message: text(), detail: None }),
            STATUS_PANIC => Err(PluginError::Failed {
                message: text(),
                detail: Some(format!("a panic inside plugin {:?} was caught at the FFI boundary", self.plugin_name)),
            }),
            other => Err(PluginError::Crashed(format!(
                "plugin {:?} returned unknown status {other} (ABI version {ABI_VERSION})",
                self.plugin_name
            ))),
        }
    }

    /// Copies a result's bytes out and hands the result back to the plugin's `free`.
    fn take(&self, result: PluginResult) -> (u32, Vec<u8>) {
        let status = result.status;
        let bytes = if result.ptr.is_null() || result.len == 0 {
            Vec::new()
        } else {
            // SAFETY: a result from this plugin's `init`/`call` points at `len` readable
            // bytes until it is passed to `free`, which happens only below.
            unsafe { std::slice::from_raw_parts(result.ptr, result.len) }.to_vec()
        };
        // SAFETY: `result` came from this plugin's `init` or `call` and is freed once.
        unsafe { (self.free)(result) };
        (status, bytes)
    }
}

impl Drop for NativeLibrary {
    fn drop(&mut self) {
        // Runs once, after the last call returned (every call holds an Arc to us).
        (self.shutdown)();
    }
}
