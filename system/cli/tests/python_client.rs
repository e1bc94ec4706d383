//! The Python operator client's pytest suite (python/tests/test_client.py) against this
//! build's `rollout` binary: a real coordinator and two workers, started by the tests.
//! Needs ./.venv (made here by scripts/python-venv.sh: grpcio, protobuf, pytest).

use std::path::Path;
use std::process::Command;

#[test]
fn the_python_client_passes_its_tests_against_a_real_cluster() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let venv = Command::new(root.join("scripts/python-venv.sh")).status().expect("run scripts/python-venv.sh");
    assert!(venv.success(), "scripts/python-venv.sh failed");
    let out = Command::new(root.join(".venv/bin/python"))
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(root.join("python/tests/test_client.py"))
        .env("ROLLOUT", env!("CARGO_BIN_EXE_rollout"))
        .output()
        .expect("run pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pytest failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("10 passed"), "{stdout}");
}
