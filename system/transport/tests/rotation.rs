//! CA rotation with the real transport (issue 18 item 4): the coordinator picks up a
//! rotated CA while workers run, clients that trust only the old CA still verify it
//! (through the cross-signed certificate), workers move to the new CA and its bundle at
//! their renewal, the old CA is retired once nobody hangs on it, and no task is lost.
//! A token pins the CA that was current when it was made.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rollout_core::WorkerId;
use rollout_core::history::HistoryEvent;
use rollout_proto::transport as pb;
use rollout_proto::transport::coordinator_client::CoordinatorClient;
use rollout_transport::enroll::{self, JoinOptions, create_token};
use rollout_transport::renewal::first_renewal_at;
use rollout_transport::rotation::{retire_ca, rotate_ca, trust_status};
use rollout_transport::tls::{self, CertFiles, CertInfo, Lifetimes, NOT_BEFORE_SLACK};
use rollout_transport::{BuiltinPlugins, MemoryEmitter, WorkerOptions, connect, operator_client, run_worker_process};
use tokio::sync::watch;

const HOUR: Duration = Duration::from_secs(3600);

async fn wait_for(what: &str, secs: u64, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issues `worker` a certificate from the CA in `ca_dir` whose first renewal, by a
/// worker started with `seed`, falls `due_in` from now; copies it with the CA bundle
/// into a TLS directory of the worker's own, which it returns.
fn worker_dir(ca_dir: &Path, root: &Path, worker: &WorkerId, seed: u64, due_in: Duration) -> PathBuf {
    let lifetime = 2 * HOUR;
    // The due time moves with the issue time one for one: find the offset once.
    let probe = SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30);
    let offset = first_renewal_at(probe - NOT_BEFORE_SLACK, probe + lifetime, seed)
        .duration_since(probe)
        .expect("due after issue");
    let at = SystemTime::now() + due_in - offset;
    let issued = tls::issue_client_cert_at(ca_dir, worker, at, lifetime).expect("worker cert");
    let dir = root.join(format!("machine-{worker}"));
    std::fs::create_dir_all(&dir).expect("worker dir");
    let mine = CertFiles::worker(&dir, worker);
    std::fs::create_dir_all(mine.cert.parent().expect("identity dir")).expect("identity dir");
    std::fs::copy(&issued.cert, &mine.cert).expect("cert");
    std::fs::copy(&issued.key, &mine.key).expect("key");
    std::fs::copy(CertFiles::ca(ca_dir).cert, CertFiles::ca(&dir).cert).expect("ca");
    dir
}

fn sleep_task(ms: u32) -> pb::TaskSpec {
    pb::TaskSpec {
        plugin: "sleep".into(),
        method: "run".into(),
        payload: ms.to_string().into_bytes(),
        gpus: 0,
        deadline_ms: 30_000,
        inputs: Vec::new(),
    }
}

/// A register call for another id over a connection with `ca` and `files`: `Ok` when
/// the handshake passed (the coordinator then refuses the id), the error otherwise.
async fn handshake(addr: &str, ca: &Path, files: &CertFiles) -> Result<(), String> {
    let channel = connect(addr, ca, files).map_err(|e| e.to_string())?;
    let request = pb::RegisterRequest {
        worker_id: "probe".into(),
        protocol_version: rollout_core::PROTOCOL_VERSION,
        slots: 1,
        plugins: vec!["echo".into()],
        ..Default::default()
    };
    match CoordinatorClient::new(channel).register(request).await {
        Err(status) if status.message().contains("may not speak for") => Ok(()),
        Err(status) => Err(format!("{status:?}")),
        Ok(_) => Err("a probe registered as another worker".into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_completes_with_workers_running_throughout_and_no_task_lost() {
    let started = common::start(common::fast_config(), &[]).await;
    let tls_dir = started.config.transport.tls_dir.clone();
    let root = started.dir.path().to_path_buf();
    let old_ca = root.join("old-ca.pem");
    std::fs::copy(CertFiles::ca(&tls_dir).cert, &old_ca).expect("keep the old CA");
    let old_ops = CertFiles { cert: root.join("old-ops.pem"), key: root.join("old-ops.key.pem") };
    std::fs::copy(CertFiles::operator(&tls_dir, "ops").cert, &old_ops.cert).expect("ops cert");
    std::fs::copy(CertFiles::operator(&tls_dir, "ops").key, &old_ops.key).expect("ops key");

    // Two workers on machines of their own, due to renew 6 and 8 seconds from now:
    // after the rotation below, while the job runs.
    let ids = [WorkerId::new("w1").expect("id"), WorkerId::new("w2").expect("id")];
    let seeds = [11u64, 12];
    let dirs: Vec<PathBuf> = ids
        .iter()
        .zip(seeds)
        .zip([6u64, 8])
        .map(|((id, seed), due)| worker_dir(&tls_dir, &root, id, seed, Duration::from_secs(due)))
        .collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let workers: Vec<_> = ids
        .iter()
        .zip(&dirs)
        .zip(seeds)
        .map(|((id, dir), seed)| {
            let mut config = started.config.clone();
            config.transport.tls_dir = dir.clone();
            tokio::spawn(run_worker_process(
                WorkerOptions {
                    config,
                    id: id.clone(),
                    slots: 2,
                    plugins: Arc::new(BuiltinPlugins),
                    emitter: Arc::new(MemoryEmitter::new()),
                    coordinator_addr: Some(started.addr.clone()),
                    cert: None,
                    rng_seed: Some(seed),
                },
                stop_rx.clone(),
            ))
        })
        .collect();

    const TASKS: usize = 300;
    let mut operator = operator_client(&started.config, "ops", Some(&started.addr)).expect("operator client");
    let job = operator
        .submit_job(pb::SubmitJobRequest {
            name: "across-rotation".into(),
            tasks: (0..TASKS).map(|_| sleep_task(200)).collect(),
            idempotency_key: "across-rotation".into(),
        })
        .await
        .expect("accepted")
        .into_inner()
        .job;
    let committed =
        || started.history.records().iter().filter(|r| matches!(r.event, HistoryEvent::Committed { .. })).count();
    wait_for("the first tasks commit", 20, || committed() >= 4).await;

    // Rotate while the job runs.
    let rotated = rotate_ca(&tls_dir, SystemTime::now(), &Lifetimes::of(&started.config.transport)).expect("rotate-ca");
    assert!(committed() < TASKS, "the rotation happens mid-job");
    // The coordinator reads its files again within a second: a client that trusts only
    // the old CA verifies the new server certificate through the cross-signed one.
    let w2_old = CertFiles::worker(&dirs[1], &ids[1]);
    let new_pin = enroll::CaPin::of_file(&CertFiles::ca(&tls_dir).cert).expect("pin");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !trust_reloaded(&started.addr, new_pin, &rotated.server.serial).await {
        assert!(tokio::time::Instant::now() < deadline, "the coordinator did not pick up the rotation");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    handshake(&started.addr, &old_ca, &w2_old).await.expect("old trust, old certificate, new server certificate");

    // Each worker renews on its schedule and gets a certificate from the new CA and the bundle.
    for (id, dir) in ids.iter().zip(&dirs) {
        let files = CertFiles::worker(dir, id);
        let moved = || {
            CertInfo::of_file(&files.cert).is_ok_and(|c| c.issuer == rotated.current.subject)
                && CertInfo::all_of_file(&CertFiles::ca(dir).cert).is_ok_and(|cas| cas.len() == 2)
        };
        wait_for(&format!("{id} moves to the new CA"), 30, moved).await;
    }
    assert!(committed() < TASKS, "both renewals happened mid-job (make the job longer if this trips)");

    // The operator still hangs on the old CA: retiring is refused, naming it.
    let status = trust_status(&tls_dir, SystemTime::now()).expect("status");
    let hanging: Vec<&str> = status.on_previous().iter().map(|i| i.who.as_str()).collect();
    assert_eq!(hanging, ["operator ops"], "workers and the server have moved");
    let refused = retire_ca(&tls_dir, SystemTime::now()).expect_err("ops hangs on the old CA");
    assert!(refused.to_string().contains("operator ops"), "{refused}");
    tls::issue_operator_cert(&tls_dir, "ops").expect("ops from the new CA");
    let retired = retire_ca(&tls_dir, SystemTime::now()).expect("retire-ca");
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0].serial, rotated.previous.serial);

    // After the coordinator reloads: the old CA's certificates are refused at the
    // handshake, a client trusting only the old CA no longer verifies the server, and a
    // worker's new files (its renewed certificate, the bundle it took) connect.
    let w1_new = CertFiles::worker(&dirs[0], &ids[0]);
    let w1_ca = CertFiles::ca(&dirs[0]).cert;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while handshake(&started.addr, &w1_ca, &old_ops).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "the retired CA's certificates are still accepted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    handshake(&started.addr, &old_ca, &CertFiles::operator(&tls_dir, "ops")).await.expect_err("old trust only");
    handshake(&started.addr, &w1_ca, &w1_new).await.expect("w1's renewed files connect");

    // The job finishes on the same two workers, every task committed exactly once.
    wait_for("the job commits", 60, || committed() == TASKS).await;
    let records = started.history.records();
    assert!(!records.iter().any(|r| matches!(r.event, HistoryEvent::DeclaredFailed { .. })), "no worker failed");
    let leased = records.iter().filter(|r| matches!(r.event, HistoryEvent::Leased { .. })).count();
    assert_eq!(leased, TASKS, "no task was leased twice");
    let mut operator = operator_client(&started.config, "ops", Some(&started.addr)).expect("operator, new cert");
    let status = operator.status(pb::StatusRequest::default()).await.expect("status").into_inner();
    assert!(status.jobs.iter().any(|j| j.job == job && j.committed as usize == TASKS), "{status:?}");

    stop_tx.send(true).expect("stop");
    for worker in workers {
        worker.await.expect("worker task").expect("worker stops cleanly");
    }
    started.coordinator.shutdown().await.expect("clean shutdown");
}

/// Whether the coordinator presents the server certificate `serial`, chained to the
/// CA `pin`.
async fn trust_reloaded(addr: &str, pin: enroll::CaPin, serial: &str) -> bool {
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else { return false };
    let connector = tokio_rustls::TlsConnector::from(enroll::pinned_client_config(pin));
    let Ok(name) = tls::server_name_of(addr) else { return false };
    match connector.connect(name, stream).await {
        Ok(tls) => tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|c| CertInfo::of_der(c))
            .is_some_and(|c| c.serial == serial),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_refused_by_a_coordinator_whose_ca_it_does_not_pin() {
    let started = common::start(common::fast_config(), &[]).await;
    let tls_dir = started.config.transport.tls_dir.clone();
    let w5 = WorkerId::new("w5").expect("id");
    let before = create_token(&tls_dir, HOUR, Some(w5.clone()), SystemTime::now()).expect("token");
    let rotated = rotate_ca(&tls_dir, SystemTime::now(), &Lifetimes::of(&started.config.transport)).expect("rotate-ca");
    let after = create_token(&tls_dir, HOUR, Some(w5.clone()), SystemTime::now()).expect("token");
    assert_ne!(before.ca_pin, after.ca_pin, "a token pins the CA current when it is made");
    let options = |token: &enroll::BootstrapToken, dir: &Path| JoinOptions {
        addr: started.addr.clone(),
        token: token.clone(),
        worker: w5.clone(),
        tls_dir: dir.into(),
        max_message_bytes: 4 << 20,
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        attempts_max: Some(100),
    };
    // Whether or not the coordinator has reloaded yet, the old token is refused: its CA
    // no longer signs.
    let stale = enroll::join(options(&before, &started.dir.path().join("m1"))).await.expect_err("stale token");
    let text = stale.to_string();
    assert!(text.contains("another CA") && text.contains(&before.ca_pin.to_string()), "{text}");
    // The new token pins the new CA, which the coordinator's chain carries once it has
    // read its files again (within a second).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !trust_reloaded(&started.addr, after.ca_pin, &rotated.server.serial).await {
        assert!(tokio::time::Instant::now() < deadline, "the coordinator did not pick up the rotation");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m2 = started.dir.path().join("m2");
    enroll::join(options(&after, &m2)).await.expect("the new token enrolls");
    let cert = CertInfo::of_file(&CertFiles::worker(&m2, &w5).cert).expect("cert");
    assert_eq!(Some(cert.issuer), CertInfo::all_of_file(&CertFiles::ca(&m2).cert).ok().map(|c| c[0].subject.clone()));
    started.coordinator.shutdown().await.expect("clean shutdown");
}
