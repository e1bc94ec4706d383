//! Shared setup for the plugin host's integration tests: building the fixture cdylibs
//! and the Python venv, once per test binary.
//!
//! Why a nested `cargo build` into its own target directory: the cdylibs are separate
//! workspace crates (a test cannot depend on a cdylib as a library), and a nested cargo
//! on the *same* target directory would wait forever on the lock the outer `cargo
//! test` may hold. `<target>/plugin-fixtures` sits next to the outer one (found from
//! this test binary's path), so it is cached between runs, and the two tiny crates
//! build in seconds.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    // Read at run time: a binary reused from a shared target dir may have been built in
    // another checkout, whose path `env!` would have baked in.
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo test sets CARGO_MANIFEST_DIR");
    Path::new(&manifest_dir).join("../..").canonicalize().expect("workspace root")
}

/// `<target>/plugin-fixtures`, beside the target directory this test was built in.
fn fixture_target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // <target>/<profile>/deps/<test binary>
    let target = exe.ancestors().nth(3).expect("test binary lives in <target>/<profile>/deps");
    target.join("plugin-fixtures")
}

/// Builds the example and fixture cdylibs (once) and returns their directory.
fn cdylib_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let target_dir = fixture_target_dir();
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "rollout-example-echo", "-p", "rollout-test-plugin-abi-mismatch"])
            .arg("--manifest-path")
            .arg(workspace_root().join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir)
            .status()
            .expect("run cargo to build the fixture plugins");
        assert!(status.success(), "building the fixture plugins failed: {status}");
        target_dir.join("debug")
    })
}

fn cdylib(crate_name: &str) -> PathBuf {
    let file = format!("{}{crate_name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let path = cdylib_dir().join(file);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// The example plugin (examples/plugins/echo).
pub fn echo_cdylib() -> PathBuf {
    cdylib("rollout_example_echo")
}

/// The fixture that claims ABI version `ABI_VERSION + 1`.
pub fn abi_mismatch_cdylib() -> PathBuf {
    cdylib("rollout_test_plugin_abi_mismatch")
}

/// The venv's interpreter, after `scripts/python-venv.sh` (fast when already done).
/// A failure here fails the test with the script's reason: it is never skipped.
pub fn venv_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let root = workspace_root();
            let output = Command::new("bash")
                .arg(root.join("scripts/python-venv.sh"))
                .output()
                .expect("run scripts/python-venv.sh");
            assert!(
                output.status.success(),
                "scripts/python-venv.sh failed ({}); the sidecar tests need python3 >= 3.11 and pip:\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
            root.join(".venv/bin/python")
        })
        .clone()
}
