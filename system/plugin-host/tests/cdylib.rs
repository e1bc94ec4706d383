//! Rust cdylib plugins: the example echo plugin loaded through the C ABI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rollout_core::traits::{CancelToken, PluginCall, PluginError, PluginHost};
use rollout_plugin_host::{ABI_VERSION, LoadError, LocalPluginHost, PluginMode, PluginSpec};

fn echo_host() -> LocalPluginHost {
    let spec = PluginSpec { name: "echo".into(), mode: PluginMode::Cdylib { path: common::echo_cdylib() } };
    LocalPluginHost::start(&[spec]).expect("load the echo plugin")
}

fn call(method: &str, payload: &[u8], deadline: Duration) -> PluginCall {
    PluginCall { plugin: "echo".into(), method: method.into(), payload: payload.to_vec(), deadline, inputs: Vec::new() }
}

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn round_trip() {
    let host = echo_host();
    assert_eq!(host.plugins(), vec!["echo".to_owned()]);
    let cancel = CancelToken::new();
    assert_eq!(host.call(&call("echo", b"hello", SECOND), &cancel), Ok(b"hello".to_vec()));
    assert_eq!(host.call(&call("upper", b"hello", SECOND), &cancel), Ok(b"HELLO".to_vec()));
    assert_eq!(host.call(&call("echo", b"", SECOND), &cancel), Ok(Vec::new()));
    let big = vec![7u8; 4 << 20];
    assert_eq!(host.call(&call("echo", &big, SECOND * 10), &cancel), Ok(big));
}

#[test]
fn concurrent_calls_each_get_their_own_result() {
    let host = Arc::new(echo_host());
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let host = Arc::clone(&host);
            std::thread::spawn(move || {
                let payload = format!("call {i}");
                host.call(&call("echo", payload.as_bytes(), SECOND * 5), &CancelToken::new()).map(|r| (r, payload))
            })
        })
        .collect();
    for t in threads {
        let (got, sent) = t.join().unwrap().expect("echo");
        assert_eq!(got, sent.into_bytes());
    }
}

#[test]
fn plugin_error_is_a_failed_call() {
    let host = echo_host();
    let err = host.call(&call("fail", b"abc", SECOND), &CancelToken::new()).unwrap_err();
    assert_eq!(err, PluginError::Failed { message: "fail was called with 3 bytes".into(), detail: None });
    let err = host.call(&call("nope", b"", SECOND), &CancelToken::new()).unwrap_err();
    assert!(matches!(err, PluginError::Failed { ref message, .. } if message.contains("unknown method \"nope\"")));
}

#[test]
fn a_panic_is_caught_at_the_boundary_and_the_plugin_keeps_working() {
    let host = echo_host();
    let err = host.call(&call("panic", b"", SECOND), &CancelToken::new()).unwrap_err();
    let PluginError::Failed { message, detail } = err else { panic!("expected Failed, got {err:?}") };
    assert_eq!(message, "panicked: the panic method was called");
    assert!(detail.unwrap().contains("caught at the FFI boundary"));
    assert_eq!(host.call(&call("echo", b"still here", SECOND), &CancelToken::new()), Ok(b"still here".to_vec()));
}

#[test]
fn a_call_past_its_deadline_is_abandoned() {
    let host = echo_host();
    let started = Instant::now();
    let deadline = Duration::from_millis(100);
    let err = host.call(&call("sleep", b"1500", deadline), &CancelToken::new()).unwrap_err();
    assert_eq!(err, PluginError::DeadlineExceeded(deadline));
    assert!(started.elapsed() < Duration::from_millis(1000), "returned after {:?}", started.elapsed());
    // The native call cannot be killed: it is counted until it returns by itself.
    assert_eq!(host.abandoned_calls("echo"), 1);
    assert_eq!(host.call(&call("echo", b"next", SECOND), &CancelToken::new()), Ok(b"next".to_vec()));
    let until = Instant::now() + Duration::from_secs(10);
    while host.abandoned_calls("echo") > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(host.abandoned_calls("echo"), 0);
}

#[test]
fn a_cancelled_call_returns_cancelled() {
    let host = echo_host();
    let cancel = CancelToken::new();
    let canceller = cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        canceller.cancel();
    });
    let err = host.call(&call("sleep", b"1000", SECOND * 10), &cancel).unwrap_err();
    assert_eq!(err, PluginError::Cancelled);
    let already = CancelToken::new();
    already.cancel();
    assert_eq!(host.call(&call("echo", b"", SECOND), &already), Err(PluginError::Cancelled));
}

#[test]
fn abi_mismatch_names_both_versions() {
    let path = common::abi_mismatch_cdylib();
    let spec = PluginSpec { name: "future".into(), mode: PluginMode::Cdylib { path: path.clone() } };
    let err = LocalPluginHost::start(&[spec]).unwrap_err();
    assert_eq!(
        err,
        LoadError::AbiMismatch { plugin: "future".into(), path, ours: ABI_VERSION, theirs: ABI_VERSION + 1 }
    );
    let message = err.to_string();
    assert!(message.contains(&format!("ABI version {}", ABI_VERSION + 1)), "{message}");
    assert!(message.contains(&format!("speaks version {ABI_VERSION}")), "{message}");
}

#[test]
fn a_missing_file_or_a_library_that_is_no_plugin_is_refused_by_name() {
    let missing =
        PluginSpec { name: "ghost".into(), mode: PluginMode::Cdylib { path: "/nonexistent/libghost.so".into() } };
    let err = LocalPluginHost::start(&[missing]).unwrap_err();
    assert!(matches!(err, LoadError::Open { ref plugin, .. } if plugin == "ghost"), "{err}");
    assert!(err.to_string().contains("/nonexistent/libghost.so"));

    // A real shared library without the descriptor: the C library itself.
    let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    if let Some(libc) = libc {
        let spec = PluginSpec { name: "libc".into(), mode: PluginMode::Cdylib { path: libc.into() } };
        let err = LocalPluginHost::start(&[spec]).unwrap_err();
        assert!(matches!(err, LoadError::NotAPlugin { .. }), "{err}");
        assert!(err.to_string().contains("rollout_plugin_descriptor"), "{err}");
    }
}

#[test]
fn an_unknown_plugin_or_a_spent_deadline_fails_fast() {
    let host = echo_host();
    let mut unknown = call("echo", b"", SECOND);
    unknown.plugin = "other".into();
    assert_eq!(host.call(&unknown, &CancelToken::new()), Err(PluginError::NotFound("other".into())));
    assert_eq!(
        host.call(&call("echo", b"", Duration::ZERO), &CancelToken::new()),
        Err(PluginError::DeadlineExceeded(Duration::ZERO))
    );
}

#[test]
fn a_worker_config_section_starts_the_host() {
    let path = common::echo_cdylib();
    let text = format!(
        "[health]\nheartbeat_interval = \"500ms\"\n\n[[plugins]]\nname = \"echo\"\nmode = \"cdylib\"\npath = {:?}\n",
        path.display().to_string()
    );
    let specs = rollout_plugin_host::plugin_specs_from_toml_str(&text).expect("valid plugins section");
    let host = LocalPluginHost::start(&specs).unwrap();
    assert_eq!(host.call(&call("echo", b"from config", SECOND), &CancelToken::new()), Ok(b"from config".to_vec()));
}

#[test]
fn a_cdylib_gets_the_tasks_input_files_through_abi_2() {
    let host = echo_host();
    let dir = tempfile::TempDir::new().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::write(&a, vec![1u8; 10]).unwrap();
    std::fs::write(&b, vec![2u8; 2048]).unwrap();
    let mut with_inputs = call("inputs", b"", Duration::from_secs(5));
    with_inputs.inputs = vec![a, b];
    assert_eq!(host.call(&with_inputs, &CancelToken::new()), Ok(b"10\n2048".to_vec()));
    // No inputs: the version-1 entry point, as before.
    assert_eq!(host.call(&call("echo", b"x", Duration::from_secs(5)), &CancelToken::new()), Ok(b"x".to_vec()));
}
