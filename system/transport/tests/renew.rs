//! Certificate renewal with the real transport (issue 18 item 2): a worker whose
//! certificate is due renews it over its connection while a long task runs, keeps its
//! lease, and presents the new certificate on its next connection; a renewal a crash
//! cut short is finished or discarded at start; Renew answers workers only.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rollout_core::history::HistoryEvent;
use rollout_core::{PROTOCOL_VERSION, WorkerId};
use rollout_proto::transport as pb;
use rollout_proto::transport::coordinator_client::CoordinatorClient;
use rollout_proto::transport::enrollment_client::EnrollmentClient;
use rollout_transport::renewal::{Pending, finish_pending_renewal, staged};
use rollout_transport::tls::{CertFiles, CertInfo, PeerRole, issue_client_cert_at};
use rollout_transport::{BuiltinPlugins, MemoryEmitter, WorkerOptions, connect, operator_client, run_worker_process};
use tokio::sync::watch;

fn register_request(id: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        worker_id: id.into(),
        protocol_version: PROTOCOL_VERSION,
        slots: 1,
        plugins: vec!["echo".into()],
        ..Default::default()
    }
}

async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_renews_over_its_connection_while_a_task_runs_and_reconnects_with_the_new_certificate() {
    let started = common::start(common::fast_config(), &[]).await;
    let tls_dir = started.config.transport.tls_dir.clone();
    let w1 = WorkerId::new("w1").expect("id");
    // Issued three hours ago for four: two thirds of its validity (with the hour of
    // slack before issue) is behind it, so it is due at once; it expires in an hour.
    let hour = Duration::from_secs(3600);
    let files = issue_client_cert_at(&tls_dir, &w1, SystemTime::now() - 3 * hour, 4 * hour).expect("cert");
    let old = CertInfo::of_file(&files.cert).expect("old info");
    let old_key = std::fs::read(&files.key).expect("old key");

    let mut operator = operator_client(&started.config, "ops", Some(&started.addr)).expect("operator client");
    let sleep_task = |ms: u32| pb::TaskSpec {
        plugin: "sleep".into(),
        method: "run".into(),
        payload: ms.to_string().into_bytes(),
        gpus: 0,
        deadline_ms: 30_000,
        inputs: Vec::new(),
    };
    let job = operator
        .submit_job(pb::SubmitJobRequest {
            name: "long".into(),
            tasks: vec![sleep_task(2500)],
            idempotency_key: "long".into(),
        })
        .await
        .expect("accepted")
        .into_inner()
        .job;
    let (stop_tx, stop_rx) = watch::channel(false);
    let opts = WorkerOptions {
        config: started.config.clone(),
        id: w1.clone(),
        slots: 2,
        plugins: Arc::new(BuiltinPlugins),
        emitter: Arc::new(MemoryEmitter::new()),
        coordinator_addr: Some(started.addr.clone()),
        cert: None,
        rng_seed: Some(7),
    };
    let worker = tokio::spawn(run_worker_process(opts, stop_rx));

    let history = started.history.clone();
    let leased = || {
        history
            .records()
            .iter()
            .any(|r| matches!(&r.event, HistoryEvent::Leased { worker, .. } if worker.as_str() == "w1"))
    };
    wait_for("the long task is leased to w1", 20, leased).await;
    let renewed = || CertInfo::of_file(&files.cert).is_ok_and(|i| i.serial != old.serial);
    wait_for("w1's certificate is renewed", 20, renewed).await;
    let committed = |history: &MemoryEmitter| {
        history.records().iter().filter(|r| matches!(r.event, HistoryEvent::Committed { .. })).count()
    };
    assert_eq!(committed(&started.history), 0, "the renewal happened while the task ran");

    // The new certificate: same worker, a new key, the configured lifetime, no staged files left.
    let new = CertInfo::of_file(&files.cert).expect("new info");
    assert_eq!(new.role, Some(PeerRole::Worker(w1.clone())));
    assert!(new.not_after > old.not_after + Duration::from_secs(86_400), "{:?} vs {:?}", new.not_after, old.not_after);
    assert_ne!(std::fs::read(&files.key).expect("new key"), old_key, "the old key is gone");
    let next = staged(&files);
    assert!(!next.cert.exists() && !next.key.exists(), "nothing staged is left");
    assert!(tls_dir.join("enrolled/w1.pem").exists(), "the coordinator keeps its copy");

    // The task runs on across the renewal: committed once, by w1, at its first attempt.
    wait_for("the long task commits", 20, || committed(&started.history) == 1).await;
    let records = started.history.records();
    assert!(!records.iter().any(|r| matches!(r.event, HistoryEvent::DeclaredFailed { .. })), "no failure");
    assert_eq!(records.iter().filter(|r| matches!(r.event, HistoryEvent::Leased { .. })).count(), 1, "leased once");
    let status = operator.status(pb::StatusRequest::default()).await.expect("status").into_inner();
    assert!(status.jobs.iter().any(|j| j.job == job && j.committed == 1), "{status:?}");

    // A new handshake with the new files is a w1 connection (it may speak for w1 only).
    let ca = CertFiles::ca(&tls_dir).cert;
    let mut probe = CoordinatorClient::new(connect(&started.addr, &ca, &files).expect("channel"));
    let err = probe.register(register_request("w1-probe")).await.expect_err("speaks for w1 only");
    assert!(err.message().contains("may not speak for"), "{err:?}");

    // Status shows the certificate w1 registered with: still the old one.
    let cert_of_w1 = |status: &pb::StatusResponse| {
        let w = status.workers.iter().find(|w| w.worker_id == "w1").expect("w1 in status");
        (w.cert_serial.clone(), w.cert_not_after_unix_ms)
    };
    let (serial, not_after) = cert_of_w1(&status);
    assert_eq!(serial, old.serial);
    assert_eq!(not_after / 1000, rollout_core::time::unix_millis(old.not_after) / 1000);

    // Revoking the old certificate cuts the connection the worker opened with it; the
    // worker reconnects presenting the renewed one and works on.
    let registered = |history: &MemoryEmitter| {
        history.records().iter().filter(|r| matches!(r.event, HistoryEvent::Registered { .. })).count()
    };
    let before = registered(&started.history);
    let revoked = rollout_transport::revocation::revoke(&tls_dir, &old, SystemTime::now()).expect("revoke");
    assert!(revoked, "the old serial is newly revoked");
    wait_for("w1 registers again", 30, || registered(&started.history) > before).await;
    operator
        .submit_job(pb::SubmitJobRequest {
            name: "after".into(),
            tasks: vec![sleep_task(10)],
            idempotency_key: "after".into(),
        })
        .await
        .expect("accepted");
    wait_for("the task after the reconnect commits", 20, || committed(&started.history) == 2).await;
    let status = operator.status(pb::StatusRequest::default()).await.expect("status").into_inner();
    let (serial, not_after) = cert_of_w1(&status);
    assert_eq!(serial, new.serial, "status shows the certificate of the new registration");
    assert_eq!(not_after / 1000, rollout_core::time::unix_millis(new.not_after) / 1000);

    stop_tx.send(true).expect("stop");
    worker.await.expect("worker task").expect("worker stops cleanly");
    started.coordinator.shutdown().await.expect("clean shutdown");
}

#[test]
fn a_renewal_cut_short_is_finished_or_discarded_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = CertFiles { cert: dir.path().join("worker.w1.pem"), key: dir.path().join("worker.w1.key.pem") };
    let next = staged(&files);
    let write = |p: &std::path::Path, text: &str| std::fs::write(p, text).expect("write");
    write(&files.cert, "old cert");
    write(&files.key, "old key");
    assert_eq!(finish_pending_renewal(&files).expect("nothing pending"), Pending::None);

    // Cut after the new key was staged, before the certificate: the attempt is dropped.
    write(&next.key, "new key");
    assert_eq!(finish_pending_renewal(&files).expect("discard"), Pending::Discarded);
    assert!(!next.key.exists());
    assert_eq!(std::fs::read_to_string(&files.key).expect("key"), "old key");

    // Cut after both were staged: both go into place.
    write(&next.key, "new key");
    write(&next.cert, "new cert");
    assert_eq!(finish_pending_renewal(&files).expect("roll forward"), Pending::RolledForward);
    assert_eq!(std::fs::read_to_string(&files.key).expect("key"), "new key");
    assert_eq!(std::fs::read_to_string(&files.cert).expect("cert"), "new cert");

    // Cut between the two renames (the key is in place): the certificate follows it.
    write(&next.cert, "newer cert");
    assert_eq!(finish_pending_renewal(&files).expect("roll forward"), Pending::RolledForward);
    assert_eq!(std::fs::read_to_string(&files.cert).expect("cert"), "newer cert");
    assert!(!next.cert.exists() && !next.key.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renew_answers_an_unexpired_worker_only_and_names_a_bad_request() {
    let started = common::start(common::fast_config(), &["w1"]).await;
    let tls_dir = started.config.transport.tls_dir.clone();
    let ca = CertFiles::ca(&tls_dir).cert;
    let renew = |files: CertFiles, csr_pem: String| {
        let channel = connect(&started.addr, &ca, &files).expect("channel");
        async move { EnrollmentClient::new(channel).renew(pb::RenewRequest { csr_pem }).await }
    };
    let err = renew(CertFiles::operator(&tls_dir, "ops"), "x".into()).await.expect_err("an operator");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("operator ops"), "{err:?}");
    let w1 = CertFiles::worker(&tls_dir, &WorkerId::new("w1").expect("id"));
    let err = renew(w1, "not a CSR".into()).await.expect_err("a bad CSR");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("csr_pem"), "{err:?}");

    // A connection outlives its certificate: once that has expired, the connection
    // opened with it may not renew it (only a token gets a new one).
    let w2 = WorkerId::new("w2").expect("id");
    let minute = Duration::from_secs(60);
    let brief = issue_client_cert_at(&tls_dir, &w2, SystemTime::now() - minute + Duration::from_secs(3), minute)
        .expect("a certificate expiring in 3 s");
    let expires = CertInfo::of_file(&brief.cert).expect("info").not_after;
    let mut client = EnrollmentClient::new(connect(&started.addr, &ca, &brief).expect("channel"));
    let err = client.renew(pb::RenewRequest { csr_pem: "x".into() }).await.expect_err("a bad CSR, while valid");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "the connection is up and the certificate valid: {err:?}");
    tokio::time::sleep(expires.duration_since(SystemTime::now()).unwrap_or_default() + Duration::from_millis(500))
        .await;
    let err = client.renew(pb::RenewRequest { csr_pem: "x".into() }).await.expect_err("expired since the handshake");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired at") && err.message().contains("--join"), "{err:?}");
    started.coordinator.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_certificate_expires_unrenewed_stops_saying_how_to_get_a_new_one() {
    let started = common::start(common::fast_config(), &[]).await;
    let tls_dir = started.config.transport.tls_dir.clone();
    let w4 = WorkerId::new("w4").expect("id");
    // A minute's certificate issued 57 s ago: due for renewal at once, expired in 3 s.
    let files =
        issue_client_cert_at(&tls_dir, &w4, SystemTime::now() - Duration::from_secs(57), Duration::from_secs(60))
            .expect("cert");
    let expires = CertInfo::of_file(&files.cert).expect("info").not_after;
    // The coordinator cannot sign (its CA key is away), so every renewal fails.
    let key = CertFiles::ca(&tls_dir).key;
    std::fs::rename(&key, key.with_extension("away")).expect("move the CA key");
    let (_stop_tx, stop_rx) = watch::channel(false);
    let opts = WorkerOptions {
        config: started.config.clone(),
        id: w4.clone(),
        slots: 1,
        plugins: Arc::new(BuiltinPlugins),
        emitter: Arc::new(MemoryEmitter::new()),
        coordinator_addr: Some(started.addr.clone()),
        cert: None,
        rng_seed: Some(5),
    };
    let ran = tokio::time::timeout(Duration::from_secs(20), run_worker_process(opts, stop_rx))
        .await
        .expect("the worker stops by itself");
    let err = ran.expect_err("an expired certificate ends the worker");
    let text = err.to_string();
    assert!(text.contains("expired at") && text.contains("--join") && text.contains("w4"), "{text}");
    assert!(SystemTime::now() >= expires, "not before the expiry");
    started.coordinator.shutdown().await.expect("clean shutdown");
}
