//! The Python operator client's pytest suite (python/tests/test_client.py) against this
//! build's `rollout` binary: a real coordinator and two workers, started by the tests.
//! Needs ./.venv (made here by scripts/python-venv.sh: grpcio, protobuf, pytest). The
//! example cdylib is built here (into `<target>/plugin-fixtures`, like the plugin
//! host's tests) so the suite can run a task through each plugin mode; the in-process
//! Python mode runs when this build has the `python` feature (`make test` builds with
//! all features), and the suite says when it does not.

use std::path::Path;
use std::process::Command;

#[test]
fn the_python_client_passes_its_tests_against_a_real_cluster() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let venv = Command::new(root.join("scripts/python-venv.sh")).status().expect("run scripts/python-venv.sh");
    assert!(venv.success(), "scripts/python-venv.sh failed");
    // <target>/<profile>/deps/<test binary> -> <target>/plugin-fixtures
    let exe = std::env::current_exe().expect("current exe");
    let fixtures =
        exe.ancestors().nth(3).expect("test binary lives in <target>/<profile>/deps").join("plugin-fixtures");
    let built = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "rollout-example-echo", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&fixtures)
        .status()
        .expect("run cargo to build the example cdylib");
    assert!(built.success(), "building examples/plugins/echo failed");
    let so = fixtures.join("debug").join(format!(
        "{}rollout_example_echo{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    let out = Command::new(root.join(".venv/bin/python"))
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root.join("python/tests/test_client.py"))
        .env("ROLLOUT", env!("CARGO_BIN_EXE_rollout"))
        .env("ROLLOUT_TEST_ECHO_SO", &so)
        .env("ROLLOUT_TEST_PY_INPROC", if cfg!(feature = "python") { "1" } else { "" })
        .output()
        .expect("run pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pytest failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(if cfg!(feature = "python") { "13 passed" } else { "12 passed, 1 skipped" }), "{stdout}");
}
