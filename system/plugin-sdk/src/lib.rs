//! `rollout-plugin-sdk`: write a rollout plugin as one safe Rust function.
//!
//! ```
//! fn handle(method: &str, payload: &[u8]) -> Result<Vec<u8>, String> {
//!     match method {
//!         "echo" => Ok(payload.to_vec()),
//!         other => Err(format!("unknown method {other:?}")),
//!     }
//! }
//! rollout_plugin_sdk::export_plugin!("echo", handle);
//! ```
//!
//! Build the crate as a `cdylib` (`[lib] crate-type = ["cdylib"]`) with the default
//! `panic = "unwind"`: a panic in the handler is caught and returned to the host as an
//! error, it never crosses the FFI boundary. (With `panic = "abort"` a panic takes the
//! whole worker down.)
//!
//! The handler may be called from several threads at once, so it must not rely on
//! being called serially. The host may abandon a call that runs past its deadline (a
//! native call cannot be killed); the thread keeps running until the handler returns.
//!
//! The C ABI itself is in [`abi`]; the host (`rollout-plugin-host`) reads the same
//! definitions, so the two cannot drift apart within one build of the workspace.

pub mod abi;

/// Exports `handler` as a rollout plugin named `name`.
///
/// `handler` is a path to a `fn(&str, &[u8]) -> Result<Vec<u8>, String>`: the method
/// name and the payload in, the result bytes or an error message out. With a third
/// argument `inputs`, `export_plugin!("name", handler, inputs)`, the handler is a
/// `fn(&str, &[u8], &[&Path]) -> Result<Vec<u8>, String>` that also gets the local
/// files of the task's input blobs. The macro defines the `rollout_plugin_descriptor`
/// static the host looks up and the `extern "C"` functions it points to; use it once
/// per cdylib.
#[macro_export]
macro_rules! export_plugin {
    ($name:literal, $handler:path $(, $inputs:ident)? $(,)?) => {
        $crate::export_plugin!(@abi_version $crate::abi::ABI_VERSION, $name, $handler $(, $inputs)?);
    };
    // Not for plugin authors: lets the host's tests build a plugin that speaks another
    // ABI version, to prove the mismatch is refused.
    (@abi_version $version:expr, $name:literal, $handler:path $(, $inputs:ident)? $(,)?) => {
        // An anonymous const block: its items see the caller's module (so `$handler`
        // resolves as written) and add no names to it.
        #[allow(unsafe_code)]
        const _: () = {
            use $crate::abi::{PluginDescriptor, PluginResult};

            const HANDLER: $crate::abi::Handler = $crate::__handler!($handler $(, $inputs)?);
            const INPUTS_HANDLER: $crate::abi::InputsHandler = $crate::__inputs_handler!($handler $(, $inputs)?);

            extern "C" fn init() -> PluginResult {
                $crate::abi::init()
            }

            /// # Safety
            /// As [`PluginDescriptor::call`].
            unsafe extern "C" fn call(
                method_ptr: *const u8,
                method_len: usize,
                payload_ptr: *const u8,
                payload_len: usize,
            ) -> PluginResult {
                // SAFETY: the host upholds the contract of `PluginDescriptor::call`, which is
                // exactly the contract of `abi::call`.
                unsafe { $crate::abi::call(HANDLER, method_ptr, method_len, payload_ptr, payload_len) }
            }

            /// # Safety
            /// As [`PluginDescriptor::call_with_inputs`].
            unsafe extern "C" fn call_with_inputs(
                method_ptr: *const u8,
                method_len: usize,
                payload_ptr: *const u8,
                payload_len: usize,
                inputs_ptr: *const u8,
                inputs_len: usize,
            ) -> PluginResult {
                // SAFETY: the host upholds the contract of
                // `PluginDescriptor::call_with_inputs`, which is that of `abi::call_with_inputs`.
                unsafe {
                    $crate::abi::call_with_inputs(
                        INPUTS_HANDLER, method_ptr, method_len, payload_ptr, payload_len, inputs_ptr, inputs_len,
                    )
                }
            }

            /// # Safety
            /// As [`PluginDescriptor::free`].
            unsafe extern "C" fn free(result: PluginResult) {
                // SAFETY: the host hands back, once, a result that this plugin's `init` or
                // `call` returned, which is the contract of `abi::free`.
                unsafe { $crate::abi::free(result) }
            }

            extern "C" fn shutdown() {}

            const NAME: &str = $name;

            // SAFETY: the symbol name is the one the ABI defines, exported once per cdylib;
            // the static is immutable and its pointers refer to 'static data and functions.
            #[unsafe(no_mangle)]
            pub static rollout_plugin_descriptor: PluginDescriptor = PluginDescriptor {
                abi_version: $version,
                name_ptr: NAME.as_ptr(),
                name_len: NAME.len(),
                init,
                call,
                free,
                shutdown,
                call_with_inputs,
            };
        };
    };
}

/// Not for plugin authors: the two-argument handler of `export_plugin!`.
#[doc(hidden)]
#[macro_export]
macro_rules! __handler {
    ($handler:path) => {
        $handler
    };
    ($handler:path, inputs) => {{
        fn without_inputs(
            method: &str,
            payload: &[u8],
        ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
            $handler(method, payload, &[])
        }
        without_inputs
    }};
}

/// Not for plugin authors: the three-argument handler of `export_plugin!`.
#[doc(hidden)]
#[macro_export]
macro_rules! __inputs_handler {
    ($handler:path) => {{
        fn ignoring_inputs(
            method: &str,
            payload: &[u8],
            _inputs: &[&::std::path::Path],
        ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
            $handler(method, payload)
        }
        ignoring_inputs
    }};
    ($handler:path, inputs) => {
        $handler
    };
}
