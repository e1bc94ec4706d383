//! The real transport over loopback TCP with mutual TLS: who gets in, who may speak
//! for whom, and a whole cluster (one coordinator, two workers) running a job.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rollout_core::history::HistoryEvent;
use rollout_core::{Config, PROTOCOL_VERSION, WorkerId};
use rollout_proto::transport as pb;
use rollout_proto::transport::coordinator_client::CoordinatorClient;
use rollout_transport::tls::{CertFiles, PeerRole};
use rollout_transport::{
    BuiltinPlugins, MemoryEmitter, RunningCoordinator, WorkerOptions, connect, ensure_dev_ca, issue_client_cert,
    operator_client, run_worker_process,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tonic::Code;

struct Cluster {
    _dir: tempfile::TempDir,
    config: Config,
    addr: String,
    coordinator: RunningCoordinator,
    history: Arc<MemoryEmitter>,
}

/// A coordinator on an ephemeral loopback port, with a fresh CA and certificates for
/// workers w1 and w2 and operator "ops".
async fn start_cluster() -> Cluster {
    let common::Started { dir, config, addr, coordinator, history } =
        common::start(Config::default(), &["w1", "w2"]).await;
    Cluster { _dir: dir, config, addr, coordinator, history }
}

fn worker_client(cluster: &Cluster, cert: &CertFiles) -> CoordinatorClient<tonic::transport::Channel> {
    let ca = CertFiles::ca(&cluster.config.transport.tls_dir).cert;
    CoordinatorClient::new(connect(&cluster.addr, &ca, cert).expect("channel"))
}

fn register_request(worker: &str, protocol_version: u32) -> pb::RegisterRequest {
    pb::RegisterRequest {
        protocol_version,
        worker_id: worker.into(),
        plugins: vec!["echo".into()],
        slots: 4,
        inventory: Some(pb::Inventory { cpus: 2, memory_bytes: 1 << 30, gpus: vec![] }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_a_foreign_ca_is_refused_at_the_handshake() {
    let cluster = start_cluster().await;
    let foreign = tempfile::tempdir().expect("tempdir");
    ensure_dev_ca(foreign.path()).expect("foreign CA");
    let w1 = WorkerId::new("w1").expect("id");
    let forged = issue_client_cert(foreign.path(), &w1).expect("forged cert");

    // At the TLS layer: the server verifies the client certificate and aborts the
    // handshake with an alert; the client never reads a byte of application data.
    let ca = CertFiles::ca(&cluster.config.transport.tls_dir).cert;
    let config = rollout_transport::tls::client_config(&ca, &forged).expect("client config");
    let name = rollout_transport::tls::server_name_of(&cluster.addr).expect("name");
    let tcp = tokio::net::TcpStream::connect(&cluster.addr).await.expect("tcp connects");
    let outcome = async {
        let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        tls.flush().await?;
        let mut buf = [0u8; 64];
        tls.read(&mut buf).await
    }
    .await;
    match outcome {
        Err(e) => assert!(e.to_string().contains("alert") || e.to_string().contains("certificate"), "{e}"),
        Ok(0) => {} // closed without a word
        Ok(n) => panic!("the server answered {n} bytes to a foreign certificate"),
    }

    // Through gRPC: the call fails in the transport; no handler ever answers it.
    let mut client = worker_client(&cluster, &forged);
    let err = client.register(register_request("w1", PROTOCOL_VERSION)).await.expect_err("refused");
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled),
        "expected a transport failure, got {err:?}"
    );

    // The genuine certificate for the same worker id gets in.
    let genuine = CertFiles::worker(&cluster.config.transport.tls_dir, &w1);
    let mut client = worker_client(&cluster, &genuine);
    client.register(register_request("w1", PROTOCOL_VERSION)).await.expect("registered");
    cluster.coordinator.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_naming_its_expiry() {
    use rollout_transport::tls::{CertInfo, issue_client_cert_at};
    use std::time::SystemTime;
    let cluster = start_cluster().await;
    let tls_dir = cluster.config.transport.tls_dir.clone();
    // The coordinator made its data dir private and its database 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    let data_dir = &cluster.config.storage.data_dir;
    assert_eq!(mode(data_dir), 0o700, "{}", data_dir.display());
    assert_eq!(mode(&data_dir.join(rollout_transport::server::DATABASE_FILE)), 0o600);
    assert_eq!(mode(&CertFiles::ca(&tls_dir).key), 0o600);
    let w3 = WorkerId::new("w3").expect("id");
    let day = Duration::from_secs(86_400);
    // Issued two days ago for one day: expired a day ago (an hour of slack before issue).
    let expired = issue_client_cert_at(&tls_dir, &w3, SystemTime::now() - 2 * day, day).expect("cert");
    let info = CertInfo::of_file(&expired.cert).expect("info");
    assert!(info.expired_at(SystemTime::now()));
    assert_eq!(info.serial.len(), 32, "a 128-bit random serial, not a hash of the key: {}", info.serial);

    // The worker process refuses to start on it, naming the file, the expiry and the way out.
    let (_stop, stop_rx) = watch::channel(false);
    let opts = WorkerOptions {
        config: cluster.config.clone(),
        id: w3.clone(),
        slots: 1,
        plugins: Arc::new(BuiltinPlugins),
        emitter: Arc::new(MemoryEmitter::new()),
        coordinator_addr: Some(cluster.addr.clone()),
        cert: None,
        rng_seed: Some(1),
    };
    let err = run_worker_process(opts, stop_rx).await.expect_err("an expired certificate");
    let text = err.to_string();
    let expiry = rollout_transport::enroll::utc_text(info.not_after);
    assert!(text.contains("expired at") && text.contains(&expiry), "{text}");
    assert!(text.contains("workers/w3/cert.pem") && text.contains("--join"), "{text}");

    // Used anyway, the coordinator refuses it at the handshake: no RPC gets through.
    let mut client = worker_client(&cluster, &expired);
    let err = client.register(register_request("w3", PROTOCOL_VERSION)).await.expect_err("refused");
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled),
        "expected a transport failure, got {err:?}"
    );
    // A fresh one for the same worker gets in, and its serial differs.
    let fresh = issue_client_cert(&tls_dir, &w3).expect("fresh");
    assert_ne!(CertInfo::of_file(&fresh.cert).expect("info").serial, info.serial);
    let mut client = worker_client(&cluster, &fresh);
    client.register(register_request("w3", PROTOCOL_VERSION)).await.expect("registered");
    cluster.coordinator.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_worker_is_cut_off_at_once_and_its_task_runs_elsewhere() {
    use rollout_transport::revocation::{DENY_LIST_POLL, revoke_identity};
    let mut config = Config::fast_failure_detection();
    config.health.heartbeat_interval = Duration::from_millis(300);
    config.health.worker_self_fence_timeout = Duration::from_millis(1200);
    config.health.coordinator_failure_timeout = Duration::from_millis(1500);
    config.validate().expect("valid");
    let started = common::start(config, &["w1", "w2"]).await;
    let tls_dir = started.config.transport.tls_dir.clone();
    let spawn = |id: &str, stop: watch::Receiver<bool>, history: Arc<MemoryEmitter>| {
        let opts = WorkerOptions {
            config: started.config.clone(),
            id: WorkerId::new(id).expect("id"),
            slots: 2,
            plugins: Arc::new(BuiltinPlugins),
            emitter: history,
            coordinator_addr: Some(started.addr.clone()),
            cert: None,
            rng_seed: Some(3),
        };
        tokio::spawn(run_worker_process(opts, stop))
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let worker_history = Arc::new(MemoryEmitter::new());
    let w1 = spawn("w1", stop_rx.clone(), worker_history.clone());
    let mut operator = operator_client(&started.config, "ops", Some(&started.addr)).expect("operator client");
    let task = pb::TaskSpec {
        plugin: "sleep".into(),
        method: "run".into(),
        payload: b"1500".to_vec(),
        gpus: 0,
        deadline_ms: 30_000,
        inputs: Vec::new(),
    };
    let job = operator
        .submit_job(pb::SubmitJobRequest { name: "long".into(), tasks: vec![task], idempotency_key: "long".into() })
        .await
        .expect("accepted")
        .into_inner()
        .job;
    let leased_to = |worker: &str| {
        started
            .history
            .records()
            .iter()
            .any(|r| matches!(&r.event, HistoryEvent::Leased { worker: w, .. } if w.as_str() == worker))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !leased_to("w1") {
        assert!(tokio::time::Instant::now() < deadline, "the task was never leased to w1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second connection with w1's certificate, open before the revocation.
    let w1_files = CertFiles::worker(&tls_dir, &WorkerId::new("w1").expect("id"));
    let mut held = worker_client_at(&started.addr, &tls_dir, &w1_files);
    held.register(register_request("w1-probe-no", PROTOCOL_VERSION)).await.expect_err("speaks for itself only");
    let w2 = spawn("w2", stop_rx.clone(), worker_history.clone());

    let revoked_at = tokio::time::Instant::now();
    let revoked = revoke_identity(
        &tls_dir,
        &PeerRole::Worker(WorkerId::new("w1").expect("id")),
        None,
        std::time::SystemTime::now(),
    )
    .expect("revoke");
    assert_eq!(revoked.len(), 1);
    // The open connection is cut within the deny list's poll (under one heartbeat interval).
    // (The probe speaks for another id, so it never disturbs the running w1: before the
    // cut it is refused by the identity check, after it by the revocation.)
    loop {
        let err = held.register(register_request("w1-probe-no", PROTOCOL_VERSION)).await.expect_err("never served");
        if !err.message().contains("may not speak for") {
            break;
        }
        assert!(revoked_at.elapsed() < Duration::from_secs(5), "the revoked certificate still gets answers");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cut_after = revoked_at.elapsed();
    eprintln!("the revoked connection was cut {cut_after:?} after the revocation");
    assert!(cut_after <= DENY_LIST_POLL * 2 + Duration::from_millis(100), "cut after {cut_after:?}");
    assert!(cut_after < started.config.health.heartbeat_interval, "cut after {cut_after:?}");
    // A new connection is refused at the handshake.
    let mut fresh = worker_client_at(&started.addr, &tls_dir, &w1_files);
    fresh.register(register_request("w1", PROTOCOL_VERSION)).await.expect_err("refused at the handshake");

    // w1's lease follows the failure path: declared failed at its deadline, the task
    // re-leased to w2 and committed there, once.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = operator.status(pb::StatusRequest::default()).await.expect("status").into_inner();
        if status.jobs.iter().any(|j| j.job == job && j.committed == 1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the task never finished elsewhere: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let records = started.history.records();
    assert!(
        records
            .iter()
            .any(|r| matches!(&r.event, HistoryEvent::DeclaredFailed { worker, .. } if worker.as_str() == "w1"))
    );
    let commits: Vec<_> = records
        .iter()
        .filter_map(|r| match &r.event {
            HistoryEvent::Committed { worker, .. } => Some(worker.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(commits, vec!["w2".to_owned()]);
    let _ = stop_tx.send(true);
    w2.await.expect("w2 task").expect("w2 stops cleanly");
    w1.abort();
    started.coordinator.shutdown().await.expect("clean shutdown");
}

fn worker_client_at(
    addr: &str,
    tls_dir: &std::path::Path,
    cert: &CertFiles,
) -> CoordinatorClient<tonic::transport::Channel> {
    CoordinatorClient::new(connect(addr, &CertFiles::ca(tls_dir).cert, cert).expect("channel"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_may_only_speak_for_itself() {
    let cluster = start_cluster().await;
    let tls = cluster.config.transport.tls_dir.clone();
    let w1_cert = CertFiles::worker(&tls, &WorkerId::new("w1").expect("id"));
    let mut as_w1 = worker_client(&cluster, &w1_cert);

    let beat_as_w2 = pb::HeartbeatRequest { worker_id: "w2".into(), incarnation: 1, beat_seq: 1, ..Default::default() };
    let err = as_w1.heartbeat(beat_as_w2).await.expect_err("w1 speaking for w2");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("w1") && err.message().contains("w2"), "{}", err.message());

    let err = as_w1.register(register_request("w2", PROTOCOL_VERSION)).await.expect_err("register as w2");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // A worker certificate is not an operator certificate.
    let ca = CertFiles::ca(&tls).cert;
    let mut op_as_worker = pb::operator_client::OperatorClient::new(connect(&cluster.addr, &ca, &w1_cert).expect("ch"));
    let err = op_as_worker.status(pb::StatusRequest::default()).await.expect_err("worker as operator");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // Malformed input is an error reply naming the field, and the server lives on.
    let err = as_w1
        .heartbeat(pb::HeartbeatRequest {
            worker_id: "w1".into(),
            running: vec![pb::RunningTask { task: None, token: 1 }],
            ..Default::default()
        })
        .await
        .expect_err("malformed");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("heartbeat.running.task"), "{}", err.message());
    let err = as_w1.register(register_request("not a valid id", PROTOCOL_VERSION)).await.expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("register.worker_id"), "{}", err.message());
    as_w1.register(register_request("w1", PROTOCOL_VERSION)).await.expect("still serving");
    cluster.coordinator.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_version_mismatch_names_both_versions() {
    let cluster = start_cluster().await;
    let cert = CertFiles::worker(&cluster.config.transport.tls_dir, &WorkerId::new("w1").expect("id"));
    let mut client = worker_client(&cluster, &cert);
    let theirs = PROTOCOL_VERSION + 98;
    let err = client.register(register_request("w1", theirs)).await.expect_err("mismatch");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let message = err.message();
    assert!(message.contains("protocol version mismatch"), "{message}");
    assert!(message.contains(&format!("speaks {PROTOCOL_VERSION}")), "{message}");
    assert!(message.contains(&format!("speaks {theirs}")), "{message}");
    cluster.coordinator.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_complete_every_task_of_a_job_exactly_once() {
    let cluster = start_cluster().await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let worker_history = Arc::new(MemoryEmitter::new());
    let mut workers = Vec::new();
    for w in ["w1", "w2"] {
        let opts = WorkerOptions {
            config: cluster.config.clone(),
            id: WorkerId::new(w).expect("id"),
            slots: 8,
            plugins: Arc::new(BuiltinPlugins),
            emitter: worker_history.clone(),
            coordinator_addr: Some(cluster.addr.clone()),
            cert: None,
            rng_seed: Some(7),
        };
        workers.push(tokio::spawn(run_worker_process(opts, stop_rx.clone())));
    }

    const TASKS: u32 = 200;
    let mut operator = operator_client(&cluster.config, "ops", Some(&cluster.addr)).expect("operator client");
    let tasks = (0..TASKS)
        .map(|i| pb::TaskSpec {
            plugin: "echo".into(),
            method: "run".into(),
            payload: format!("payload-{i}").into_bytes(),
            gpus: 0,
            deadline_ms: 10_000,
            inputs: Vec::new(),
        })
        .collect();
    let accepted = operator
        .submit_job(pb::SubmitJobRequest { name: "echo-200".into(), tasks, idempotency_key: "echo-200".into() })
        .await
        .expect("job accepted")
        .into_inner();
    assert_eq!(accepted.tasks, TASKS);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let status = operator.status(pb::StatusRequest::default()).await.expect("status").into_inner();
        let job = status.jobs.iter().find(|j| j.job == accepted.job).expect("job listed");
        if job.committed == TASKS {
            assert_eq!(status.workers.len(), 2, "both workers registered: {:?}", status.workers);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "job did not finish: {job:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut results = operator
        .results(pb::ResultsRequest { job: accepted.job, include_bytes: true, from_index: 0 })
        .await
        .expect("results")
        .into_inner();
    let mut seen = 0;
    while let Some(r) = results.message().await.expect("result") {
        let task = r.task.expect("task id");
        assert_eq!(r.state, pb::TaskState::Committed as i32);
        assert_eq!(r.result, format!("payload-{}", task.index).into_bytes());
        seen += 1;
    }
    assert_eq!(seen, TASKS);

    // Exactly once: one commit per task, and every commit under the lease's token.
    let mut commits: BTreeMap<String, u32> = BTreeMap::new();
    for record in cluster.history.records() {
        if let HistoryEvent::Committed { task, .. } = record.event {
            *commits.entry(task.to_string()).or_default() += 1;
        }
    }
    assert_eq!(commits.len(), TASKS as usize);
    assert!(commits.values().all(|&n| n == 1), "a task committed twice: {commits:?}");
    let started: Vec<_> = worker_history
        .records()
        .into_iter()
        .filter(|r| matches!(r.event, HistoryEvent::TaskStarted { .. }))
        .map(|r| r.node)
        .collect();
    assert!(started.len() >= TASKS as usize);
    assert!(started.iter().any(|n| n == "w1") && started.iter().any(|n| n == "w2"), "both workers ran tasks");

    let _ = stop_tx.send(true);
    for w in workers {
        w.await.expect("worker task").expect("worker stops cleanly");
    }
    cluster.coordinator.shutdown().await.expect("clean shutdown");
}
