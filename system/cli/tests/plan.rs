//! `rollout plan` as a user runs it: exit codes and one-line reasons.

use std::io::Write;
use std::process::{Command, Output};

fn plan(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rollout"));
    cmd.arg("plan").args(args);
    // Keep the caller's ROLLOUT_* overrides out of the test.
    for (name, _) in std::env::vars().filter(|(n, _)| n.starts_with("ROLLOUT_")) {
        cmd.env_remove(name);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("rollout binary runs")
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new().suffix(".toml").tempfile().expect("temp file");
    f.write_all(text.as_bytes()).expect("write config");
    f
}

fn stderr_line(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(text.trim_end().lines().count(), 1, "one-line reason, got: {text}");
    text
}

#[test]
fn valid_config_prints_the_effective_config() {
    let f = config_file("[health]\nheartbeat_interval = \"400ms\"\n");
    let out = plan(&["--config", f.path().to_str().expect("utf-8 path")], &[]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("heartbeat_interval = \"400ms\""), "{stdout}");
    assert!(stdout.contains("coordinator_failure_timeout = \"5s\""), "defaults filled in: {stdout}");
}

#[test]
fn self_fence_of_6s_names_the_field_and_exits_2() {
    let f = config_file("[health]\nworker_self_fence_timeout = \"6s\"\n");
    let out = plan(&["--config", f.path().to_str().expect("utf-8 path")], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_line(&out).contains("worker_self_fence_timeout"));
}

#[test]
fn unknown_key_is_named_and_exits_2() {
    let f = config_file("[limits]\nmax_widgets = 3\n");
    let out = plan(&["--config", f.path().to_str().expect("utf-8 path")], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_line(&out).contains("limits.max_widgets"));
}

#[test]
fn missing_file_names_the_path_and_exits_2() {
    let out = plan(&["--config", "/definitely/not/here.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_line(&out).contains("/definitely/not/here.toml"));
}

#[test]
fn environment_overrides_are_applied_and_checked() {
    let out = plan(&[], &[("ROLLOUT_HEALTH__HEARTBEAT_INTERVAL", "300ms")]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("heartbeat_interval = \"300ms\""));

    let out = plan(&[], &[("ROLLOUT_HEALTH__CLOCK_SKEW_BUDGET", "2s")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_line(&out).contains("clock_skew_budget"));
}
