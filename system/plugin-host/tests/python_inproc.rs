//! In-process Python plugins (feature `python`): python/examples/inproc_echo.py and
//! small modules written by the tests. Built and run by `make test` (--all-features);
//! without the feature this file compiles to nothing.
#![cfg(feature = "python")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rollout_core::traits::{CancelToken, PluginCall, PluginError, PluginHost};
use rollout_plugin_host::{LoadError, LocalPluginHost, PluginMode, PluginSpec};
use tempfile::TempDir;

const SECOND: Duration = Duration::from_secs(1);

fn examples_dir() -> PathBuf {
    common::workspace_root().join("python/examples")
}

fn host(name: &str, module: &str, path: PathBuf) -> Result<LocalPluginHost, LoadError> {
    LocalPluginHost::start(&[PluginSpec {
        name: name.into(),
        mode: PluginMode::Python { module: module.into(), path: Some(path) },
    }])
}

fn call(plugin: &str, method: &str, payload: &[u8], deadline: Duration) -> PluginCall {
    PluginCall { plugin: plugin.into(), method: method.into(), payload: payload.to_vec(), deadline, inputs: Vec::new() }
}

#[test]
fn round_trip() {
    let host = host("py", "inproc_echo", examples_dir()).unwrap();
    let cancel = CancelToken::new();
    assert_eq!(host.call(&call("py", "echo", b"hello", SECOND), &cancel), Ok(b"hello".to_vec()));
    assert_eq!(host.call(&call("py", "upper", b"hello", SECOND), &cancel), Ok(b"HELLO".to_vec()));
    let big = vec![1u8; 4 << 20];
    assert_eq!(host.call(&call("py", "echo", &big, SECOND * 10), &cancel), Ok(big));
}

#[test]
fn a_one_argument_handle_gets_the_payload() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("one_arg_plugin.py"), "def handle(payload):\n    return payload[::-1]\n").unwrap();
    let host = host("rev", "one_arg_plugin", dir.path().to_owned()).unwrap();
    assert_eq!(host.call(&call("rev", "anything", b"abc", SECOND), &CancelToken::new()), Ok(b"cba".to_vec()));
}

#[test]
fn an_exception_is_a_failed_call_with_its_traceback() {
    let host = host("py", "inproc_echo", examples_dir()).unwrap();
    let err = host.call(&call("py", "fail", b"abcd", SECOND), &CancelToken::new()).unwrap_err();
    let PluginError::Failed { message, detail } = err else { panic!("expected Failed, got {err:?}") };
    assert_eq!(message, "ValueError: fail was called with 4 bytes");
    let traceback = detail.unwrap();
    assert!(traceback.contains("Traceback") && traceback.contains("inproc_echo.py"), "{traceback}");

    let err = host.call(&call("py", "not_bytes", b"", SECOND), &CancelToken::new()).unwrap_err();
    assert!(matches!(err, PluginError::Failed { ref message, .. } if message.contains("expected bytes")), "{err:?}");
    assert_eq!(host.call(&call("py", "echo", b"ok", SECOND), &CancelToken::new()), Ok(b"ok".to_vec()));
}

#[test]
fn a_pure_python_call_past_its_deadline_is_interrupted() {
    let host = host("py", "inproc_echo", examples_dir()).unwrap();
    let deadline = Duration::from_millis(200);
    let started = Instant::now();
    let err = host.call(&call("py", "spin", b"20000", deadline), &CancelToken::new()).unwrap_err();
    assert_eq!(err, PluginError::DeadlineExceeded(deadline));
    assert!(started.elapsed() < SECOND, "returned after {:?}", started.elapsed());
    // The injected exception stops the busy loop long before its 20 s are up.
    let until = Instant::now() + SECOND * 10;
    while host.abandoned_calls("py") > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(host.abandoned_calls("py"), 0, "the spinning call was not interrupted");
    assert_eq!(host.call(&call("py", "echo", b"after", SECOND), &CancelToken::new()), Ok(b"after".to_vec()));
}

#[test]
fn a_sleeping_call_is_abandoned_at_its_deadline() {
    let host = host("py", "inproc_echo", examples_dir()).unwrap();
    let deadline = Duration::from_millis(100);
    let started = Instant::now();
    assert_eq!(
        host.call(&call("py", "sleep", b"1500", deadline), &CancelToken::new()),
        Err(PluginError::DeadlineExceeded(deadline))
    );
    assert!(started.elapsed() < SECOND);
    // time.sleep releases the GIL, so other calls proceed meanwhile.
    assert_eq!(host.call(&call("py", "echo", b"meanwhile", SECOND), &CancelToken::new()), Ok(b"meanwhile".to_vec()));
}

#[test]
fn a_module_that_cannot_be_loaded_is_a_load_error_with_the_reason() {
    let err = host("py", "no_such_module_here", examples_dir()).unwrap_err();
    assert!(
        matches!(err, LoadError::Python { ref plugin, ref reason } if plugin == "py" && reason.contains("ModuleNotFoundError")),
        "{err}"
    );

    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("no_handle_plugin.py"), "x = 1\n").unwrap();
    let err = host("py", "no_handle_plugin", dir.path().to_owned()).unwrap_err();
    assert!(err.to_string().contains("no callable handle"), "{err}");

    std::fs::write(dir.path().join("broken_plugin.py"), "raise RuntimeError('broken at import')\n").unwrap();
    let err = host("py", "broken_plugin", dir.path().to_owned()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("broken at import") && text.contains("broken_plugin.py"), "{text}");
}

#[test]
fn a_three_argument_handle_reads_the_tasks_input_files() {
    let host = host("py", "inproc_echo", examples_dir()).unwrap();
    let dir = TempDir::new().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&a, b"first").unwrap();
    std::fs::write(&b, vec![9u8; 1000]).unwrap();
    let mut with_inputs = call("py", "inputs", b"", SECOND * 5);
    with_inputs.inputs = vec![a, b];
    let out = String::from_utf8(host.call(&with_inputs, &CancelToken::new()).unwrap()).unwrap();
    let want = format!(
        "{} 5\n{} 1000",
        rollout_core::ContentId::of(b"first").to_hex(),
        rollout_core::ContentId::of(&[9u8; 1000]).to_hex()
    );
    assert_eq!(out, want);
}
