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
    for command in
        ["coordinator", "worker", "certs", "submit", "status", "results", "cancel", "drain", "audit", "plan", "check"]
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
    assert!(tls.join("workers/w1/cert.pem").exists() && tls.join("workers/w1/key.pem").exists());
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

#[test]
fn check_judges_recorded_histories_and_names_the_violation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lines = [
        r#"{"seq":0,"node":"coordinator","wall_unix_ms":1,"event":"job_accepted","job":1,"tasks":1}"#,
        r#"{"seq":1,"node":"coordinator","wall_unix_ms":2,"event":"leased","task":"job-1.0","worker":"w1","token":1,"attempt":1}"#,
        r#"{"seq":2,"node":"coordinator","wall_unix_ms":4,"event":"committed","task":"job-1.0","worker":"w1","token":1,"result":"eb836fa0a41cb38c32b81c2cd853a22f62b4e5fd2b1b8459456a2e19c7be445d"}"#,
    ];
    let worker = [
        r#"{"seq":0,"node":"w1","wall_unix_ms":3,"event":"task_started","task":"job-1.0","worker":"w1","token":1}"#,
        r#"{"seq":1,"node":"w1","wall_unix_ms":3,"event":"task_stopped","task":"job-1.0","worker":"w1","token":1}"#,
    ];
    std::fs::write(dir.path().join("c.jsonl"), lines.join("\n")).expect("write");
    std::fs::write(dir.path().join("w1.jsonl"), worker.join("\n")).expect("write");
    let ok = rollout(&["check", "c.jsonl", "w1.jsonl", "--complete", "--strict-overlap"], dir.path());
    assert!(ok.status.success(), "{ok:?}");
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(stdout.contains("1 of 1 tasks"), "{ok:?}");
    assert!(stdout.contains("not checked: no_lost_task"), "without states it claims nothing: {stdout}");

    // With the coordinator's states: no_lost_task is checked, and fails when it is lost.
    let committed = r#"{"task":"job-1.0","state":"committed","attempts":1,"content_id":null,"errors":[]}"#;
    std::fs::write(dir.path().join("states.jsonl"), committed).expect("write");
    let held = rollout(&["check", "c.jsonl", "w1.jsonl", "--states", "states.jsonl"], dir.path());
    assert!(held.status.success(), "{held:?}");
    assert!(String::from_utf8_lossy(&held.stdout).contains("no_lost_task (1 tasks"), "{held:?}");
    std::fs::write(dir.path().join("empty.jsonl"), "").expect("write");
    let lost = rollout(&["check", "c.jsonl", "--states", "empty.jsonl"], dir.path());
    assert_eq!(lost.status.code(), Some(1), "{lost:?}");
    assert!(String::from_utf8_lossy(&lost.stderr).contains("no_lost_task"), "{lost:?}");
    let queued = committed.replace("committed", "queued");
    std::fs::write(dir.path().join("changed.jsonl"), queued).expect("write");
    let changed = rollout(&["check", "c.jsonl", "--states", "changed.jsonl"], dir.path());
    assert_eq!(changed.status.code(), Some(1), "a committed task reported queued: {changed:?}");

    // The same commit twice: single_commit, exit 1, naming the record.
    std::fs::write(dir.path().join("twice.jsonl"), [lines.join("\n"), lines[2].to_owned()].join("\n")).expect("write");
    let bad = rollout(&["check", "twice.jsonl"], dir.path());
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("single_commit") && err.contains("job-1.0"), "{err}");

    // Not a history: exit 2 naming file and line.
    std::fs::write(dir.path().join("junk.jsonl"), format!("{}\nnot json\n", lines[0])).expect("write");
    let junk = rollout(&["check", "junk.jsonl"], dir.path());
    assert_eq!(junk.status.code(), Some(2), "{junk:?}");
    assert!(String::from_utf8_lossy(&junk.stderr).contains("junk.jsonl:2"), "{junk:?}");
}

#[test]
fn audit_export_writes_the_coordinator_history_that_check_reads() {
    use std::sync::Arc;
    use std::time::SystemTime;

    use rollout_coordinator::{Coordinator, CoordinatorInput, CoordinatorSettings, JobSubmission, TaskSpec};
    use rollout_core::{Config, Mono, Now};

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
    {
        // A coordinator that accepted one job of two tasks, then went away.
        let storage = Arc::new(rollout_storage::RedbStorage::open(dir.path().join("data/rollout.db")).expect("open"));
        let settings = CoordinatorSettings::from_config(&Config::default());
        let now = Now::new(Mono::ZERO, SystemTime::now());
        let mut coordinator = Coordinator::recover(storage, settings, now).expect("recover");
        let spec = TaskSpec {
            plugin: "echo".into(),
            method: "run".into(),
            payload: b"x".to_vec(),
            gpus: 0,
            deadline: None,
            inputs: Vec::new(),
        };
        let job = JobSubmission { name: "j".into(), tasks: vec![spec.clone(), spec], idempotency_key: None };
        let mut out = Vec::new();
        coordinator.handle(now, CoordinatorInput::SubmitJob { request: 1, job }, &mut out).expect("commits");
    }
    let out = rollout(&["audit", "export", "--out", "coord.jsonl"], dir.path());
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(dir.path().join("coord.jsonl")).expect("export written");
    let records: Vec<serde_json::Value> =
        text.lines().map(|l| serde_json::from_str(l).expect("one JSON record a line")).collect();
    assert_eq!(records.len(), 1, "{text}");
    assert_eq!(records[0]["event"], "job_accepted");
    assert_eq!(records[0]["node"], "coordinator");
    assert_eq!(records[0]["tasks"], 2);
    // audit verify --json, for scripts.
    let verify = rollout(&["audit", "verify", "--json"], dir.path());
    assert!(verify.status.success(), "{verify:?}");
    let v: serde_json::Value = serde_json::from_slice(&verify.stdout).expect("one JSON object");
    assert_eq!((v["verified"].as_bool(), v["entries"].as_u64()), (Some(true), Some(1)), "{v}");
    // The checker reads it: safe, and (with --complete) the unfinished tasks are named.
    assert!(rollout(&["check", "coord.jsonl"], dir.path()).status.success());
    let incomplete = rollout(&["check", "--complete", "coord.jsonl"], dir.path());
    assert_eq!(incomplete.status.code(), Some(1), "{incomplete:?}");
}

#[test]
fn token_list_json_gives_each_token_with_its_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(rollout(&["certs", "init"], dir.path()).status.success());
    let created = rollout(&["token", "create", "--worker", "w7"], dir.path());
    assert!(created.status.success(), "{created:?}");
    let listed = rollout(&["token", "list", "--json"], dir.path());
    assert!(listed.status.success(), "{listed:?}");
    let text = String::from_utf8_lossy(&listed.stdout);
    let tokens: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("JSON")).collect();
    assert_eq!(tokens.len(), 1, "{text}");
    assert_eq!(tokens[0]["worker"], "w7");
    assert_eq!(tokens[0]["state"], "unused");
    assert!(tokens[0]["used_by"].is_null() && tokens[0]["expires_at_unix_ms"].as_u64().is_some(), "{text}");
}
