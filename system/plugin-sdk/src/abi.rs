//! The versioned C ABI between the worker (host) and a Rust cdylib plugin.
//!
//! A plugin exports one symbol, `rollout_plugin_descriptor`, a [`PluginDescriptor`]
//! static. The host reads its first field, `abi_version`, before anything else and
//! refuses the library unless it is between [`ABI_VERSION_OLDEST`] and [`ABI_VERSION`];
//! only then does it use the rest, and only the fields that version has. So
//! `abi_version` stays the first field, a `u32`, in every future version, and any change
//! to the layout below bumps [`ABI_VERSION`].
//!
//! Versions: 1 ends at `shutdown`; 2 appends `call_with_inputs`, which also passes the
//! local files of the task's input blobs (paths in UTF-8, separated by NUL bytes).
//!
//! Ownership: the host passes borrowed buffers as pointer + length, valid only for the
//! duration of the call. The plugin returns a [`PluginResult`] whose buffer it owns; the
//! host copies the bytes out and hands the result back to the plugin's `free`, exactly
//! once, so memory is always released by the allocator that made it.

#![allow(unsafe_code)]

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// The ABI version this SDK (and the host built from the same workspace) speaks.
pub const ABI_VERSION: u32 = 2;
/// The oldest ABI version the host still loads (a version-1 library runs every task
/// that names no input blobs).
pub const ABI_VERSION_OLDEST: u32 = 1;

/// The exported symbol name, NUL-terminated for `dlsym`.
pub const DESCRIPTOR_SYMBOL: &[u8] = b"rollout_plugin_descriptor\0";

/// The result bytes are the call's output.
pub const STATUS_OK: u32 = 0;
/// The result bytes are a UTF-8 error message from the handler (`Err`).
pub const STATUS_ERROR: u32 = 1;
/// The result bytes are the UTF-8 message of a panic caught inside the plugin.
pub const STATUS_PANIC: u32 = 2;

/// The signature a plugin author implements.
pub type Handler = fn(method: &str, payload: &[u8]) -> Result<Vec<u8>, String>;

/// The signature of a plugin that reads the task's input blobs (local files, in the
/// order the task names them).
pub type InputsHandler = fn(method: &str, payload: &[u8], inputs: &[&std::path::Path]) -> Result<Vec<u8>, String>;

/// What `init` and `call` return: a status and a buffer owned by the plugin.
#[repr(C)]
#[derive(Debug)]
pub struct PluginResult {
    /// One of [`STATUS_OK`], [`STATUS_ERROR`], [`STATUS_PANIC`].
    pub status: u32,
    /// Start of the buffer (non-null, possibly dangling when `len` is 0).
    pub ptr: *mut u8,
    /// Length of the buffer in bytes.
    pub len: usize,
}

/// The descriptor a plugin exports as `rollout_plugin_descriptor`.
#[repr(C)]
#[derive(Debug)]
pub struct PluginDescriptor {
    /// Must stay the first field: see the module documentation.
    pub abi_version: u32,
    /// The plugin's own name (UTF-8, not NUL-terminated), for logs.
    pub name_ptr: *const u8,
    /// Length of the name in bytes.
    pub name_len: usize,
    /// Called once after loading, before any call. A non-OK status refuses the plugin.
    pub init: extern "C" fn() -> PluginResult,
    /// Runs one call.
    ///
    /// # Safety
    /// `method_ptr`/`method_len` and `payload_ptr`/`payload_len` must each describe a
    /// readable buffer that stays valid until the call returns. May be called from
    /// several threads at once.
    pub call: unsafe extern "C" fn(
        method_ptr: *const u8,
        method_len: usize,
        payload_ptr: *const u8,
        payload_len: usize,
    ) -> PluginResult,
    /// Releases a result returned by `init` or `call`.
    ///
    /// # Safety
    /// `result` must come from this plugin's `init` or `call` and be freed only once.
    pub free: unsafe extern "C" fn(result: PluginResult),
    /// Called once before the library is unloaded, after the last call returned.
    pub shutdown: extern "C" fn(),
    /// (Version 2.) Runs one call with the task's input files: `inputs_ptr`/`inputs_len`
    /// is their paths in UTF-8, separated by NUL bytes (empty: none).
    ///
    /// # Safety
    /// As `call`, and the inputs buffer likewise.
    pub call_with_inputs: unsafe extern "C" fn(
        method_ptr: *const u8,
        method_len: usize,
        payload_ptr: *const u8,
        payload_len: usize,
        inputs_ptr: *const u8,
        inputs_len: usize,
    ) -> PluginResult,
}

// SAFETY: the descriptor is an immutable static; its pointers refer to 'static data
// (the name) and its function pointers are safe to share. Needed so it can be a static.
unsafe impl Sync for PluginDescriptor {}

/// `init` of a plugin built with `export_plugin!`: nothing to set up.
#[doc(hidden)]
pub fn init() -> PluginResult {
    result(STATUS_OK, Vec::new())
}

/// `call` of a plugin built with `export_plugin!`: runs `handler`, catching panics.
///
/// # Safety
/// As [`PluginDescriptor::call`].
#[doc(hidden)]
pub unsafe fn call(
    handler: Handler,
    method_ptr: *const u8,
    method_len: usize,
    payload_ptr: *const u8,
    payload_len: usize,
) -> PluginResult {
    // SAFETY: the caller guarantees both buffers are readable for their lengths and
    // outlive this call; `borrowed` handles the null/empty case.
    let (method, payload) = unsafe { (borrowed(method_ptr, method_len), borrowed(payload_ptr, payload_len)) };
    let Ok(method) = std::str::from_utf8(method) else {
        return result(STATUS_ERROR, b"method name is not valid UTF-8".to_vec());
    };
    // Unwind safety: the handler sees only borrowed input and returns owned output, so
    // a panic leaves nothing half-updated that we would observe afterwards.
    match catch_unwind(AssertUnwindSafe(|| handler(method, payload))) {
        Ok(Ok(bytes)) => result(STATUS_OK, bytes),
        Ok(Err(message)) => result(STATUS_ERROR, message.into_bytes()),
        Err(panic) => result(STATUS_PANIC, panic_message(panic.as_ref()).into_bytes()),
    }
}

/// `call_with_inputs` of a plugin built with `export_plugin!`: decodes the inputs and
/// runs `handler`, catching panics.
///
/// # Safety
/// As [`PluginDescriptor::call_with_inputs`].
#[doc(hidden)]
pub unsafe fn call_with_inputs(
    handler: InputsHandler,
    method_ptr: *const u8,
    method_len: usize,
    payload_ptr: *const u8,
    payload_len: usize,
    inputs_ptr: *const u8,
    inputs_len: usize,
) -> PluginResult {
    // SAFETY: the caller guarantees the three buffers are readable for their lengths
    // and outlive this call.
    let (method, payload, inputs) = unsafe {
        (borrowed(method_ptr, method_len), borrowed(payload_ptr, payload_len), borrowed(inputs_ptr, inputs_len))
    };
    let Ok(method) = std::str::from_utf8(method) else {
        return result(STATUS_ERROR, b"method name is not valid UTF-8".to_vec());
    };
    let Ok(inputs) = std::str::from_utf8(inputs) else {
        return result(STATUS_ERROR, b"input paths are not valid UTF-8".to_vec());
    };
    let paths: Vec<&std::path::Path> =
        if inputs.is_empty() { Vec::new() } else { inputs.split('\0').map(std::path::Path::new).collect() };
    match catch_unwind(AssertUnwindSafe(|| handler(method, payload, &paths))) {
        Ok(Ok(bytes)) => result(STATUS_OK, bytes),
        Ok(Err(message)) => result(STATUS_ERROR, message.into_bytes()),
        Err(panic) => result(STATUS_PANIC, panic_message(panic.as_ref()).into_bytes()),
    }
}

/// The input paths as `call_with_inputs` takes them (NUL-separated UTF-8).
pub fn encode_inputs(paths: &[String]) -> Vec<u8> {
    paths.join("\0").into_bytes()
}

/// `free` of a plugin built with `export_plugin!`.
///
/// # Safety
/// As [`PluginDescriptor::free`].
#[doc(hidden)]
pub unsafe fn free(result: PluginResult) {
    let slice = std::ptr::slice_from_raw_parts_mut(result.ptr, result.len);
    // SAFETY: `result` was made by `result()` below from `Box<[u8]>::into_raw` with this
    // exact pointer and length, and the caller frees it only once.
    drop(unsafe { Box::from_raw(slice) });
}

fn result(status: u32, bytes: Vec<u8>) -> PluginResult {
    let boxed: Box<[u8]> = bytes.into_boxed_slice();
    let len = boxed.len();
    let ptr = Box::into_raw(boxed).cast::<u8>();
    PluginResult { status, ptr, len }
}

/// # Safety
/// `ptr` must be readable for `len` bytes for the returned lifetime, or `len` must be 0.
unsafe fn borrowed<'a>(ptr: *const u8, len: usize) -> &'a [u8] {
    if ptr.is_null() || len == 0 {
        return &[];
    }
    // SAFETY: non-null and readable for `len` bytes for 'a, per this function's contract.
    unsafe { std::slice::from_raw_parts(ptr, len) }
}

/// The message of a caught panic (`panic!("..")` payloads are `&str` or `String`).
pub fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked with a non-string payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(method: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
        match method {
            "echo" => Ok(payload.to_vec()),
            "fail" => Err("told to fail".to_owned()),
            _ => panic!("unknown method {method}"),
        }
    }

    fn run(method: &str, payload: &[u8]) -> (u32, Vec<u8>) {
        // SAFETY: both buffers are live slices for the duration of the call.
        let r = unsafe { call(echo, method.as_ptr(), method.len(), payload.as_ptr(), payload.len()) };
        // SAFETY: `r.ptr`/`r.len` describe the buffer `call` just returned, not yet freed.
        let bytes = unsafe { std::slice::from_raw_parts(r.ptr, r.len) }.to_vec();
        let status = r.status;
        // SAFETY: `r` came from `call` and is freed once.
        unsafe { free(r) };
        (status, bytes)
    }

    #[test]
    fn ok_error_and_panic_map_to_their_status() {
        assert_eq!(run("echo", b"hi"), (STATUS_OK, b"hi".to_vec()));
        assert_eq!(run("echo", b""), (STATUS_OK, Vec::new()));
        assert_eq!(run("fail", b""), (STATUS_ERROR, b"told to fail".to_vec()));
        let (status, message) = run("boom", b"");
        assert_eq!(status, STATUS_PANIC);
        assert_eq!(String::from_utf8_lossy(&message), "panicked: unknown method boom");
    }

    #[test]
    fn null_buffers_read_as_empty() {
        // SAFETY: null with length 0 is explicitly allowed by `borrowed`.
        let r = unsafe { call(echo, "echo".as_ptr(), 4, std::ptr::null(), 0) };
        assert_eq!((r.status, r.len), (STATUS_OK, 0));
        // SAFETY: `r` came from `call` and is freed once.
        unsafe { free(r) };
    }
}
