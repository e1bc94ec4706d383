//! The operator-facing commands as a user runs them: help text, certificates, and
//! clear failures when something is missing.

use std::path::Path;
use std::process::{Command, Output};

fn rollout(args: &[&str], dir: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rollout"));
    cmd.args(args).current_dir(dir);
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("ROLLOUT_")) {
        cmd.env_remove(name);
    }
    cmd.output().expect("rollout binary runs")
}

#[test]
fn every_command_has_help() {
    let dir = tempfile::tempdir().expect("tempdir");
    for command in ["coordinator", "worker", "certs", "submit", "status", "results", "cancel", "drain", "audit", "plan"]
    {
        let out = rollout(&[command, "--help"], dir.path());
        assert!(out.status.success(), "{command} --help: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: rollout"), "{command}");
    }
}

#[test]
fn certs_init_is_idempotent_and_keys_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let first = rollout(&["certs", "init"], dir.path());
    assert!(first.status.success(), "{first:?}");
    let tls = dir.path().join("data/tls");
    let ca = std::fs::read(tls.join("ca.pem")).expect("ca.pem");
    let mode = std::fs::metadata(tls.join("ca.key.pem")).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let second = rollout(&["certs", "init"], dir.path());
    assert!(second.status.success(), "{second:?}");
    assert!(String::from_utf8_lossy(&second.stdout).contains("kept"), "{second:?}");
    assert_eq!(std::fs::read(tls.join("ca.pem")).expect("ca.pem"), ca, "the CA is never replaced");

    let issued = rollout(&["certs", "issue", "--worker", "w1"], dir.path());
    assert!(issued.status.success(), "{issued:?}");
    assert!(tls.join("worker.w1.pem").exists());
    let bad = rollout(&["certs", "issue", "--worker", "not valid"], dir.path());
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--worker"), "{bad:?}");
}

#[test]
fn operator_commands_name_the_missing_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = rollout(&["status"], dir.path());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ca.pem"), "{stderr}");
}

#[test]
fn audit_verify_names_a_missing_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = rollout(&["audit", "verify"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("rollout.db"), "{out:?}");
}
