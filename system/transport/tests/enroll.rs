//! Enrollment over loopback TCP: a bootstrap token turns a machine without a
//! certificate into a worker; bad tokens, bad requests and a wrong pin are refused with
//! a reason; a connection without a client certificate reaches Enroll and nothing else.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rollout_core::{Config, PROTOCOL_VERSION, WorkerId};
use rollout_proto::transport as pb;
use rollout_transport::enroll::{self, BootstrapToken, CaPin, JoinOptions, Joined, create_token, list_tokens};
use rollout_transport::net::{TcpDialer, TlsConnector, lazy_channel};
use rollout_transport::tls::{self, CertFiles};
use rollout_transport::{BuiltinPlugins, MemoryEmitter, WorkerOptions, operator_client, run_worker_process};
use tokio::sync::watch;
use tonic::Code;
use tonic::transport::Channel;

const HOUR: Duration = Duration::from_secs(3600);

fn id(text: &str) -> WorkerId {
    WorkerId::new(text).expect("worker id")
}

fn join_options(addr: &str, token: &BootstrapToken, worker: &str, tls_dir: &Path) -> JoinOptions {
    JoinOptions {
        addr: addr.into(),
        token: token.clone(),
        worker: id(worker),
        tls_dir: tls_dir.into(),
        max_message_bytes: 4 << 20,
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        attempts_max: Some(200),
    }
}

/// A connection that presents no client certificate and trusts the pinned CA.
fn anonymous_channel(addr: &str, pin: CaPin) -> Channel {
    let name = tls::server_name_of(addr).expect("server name");
    lazy_channel(TlsConnector::new(TcpDialer::new(addr), enroll::pinned_client_config(pin), name))
}

fn csr_for(worker: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, worker);
    params.serialize_request(&key).expect("csr").pem().expect("pem")
}

async fn raw_enroll(
    channel: &Channel,
    token: &str,
    worker: &str,
    csr_pem: String,
) -> Result<pb::EnrollResponse, tonic::Status> {
    let mut client = pb::enrollment_client::EnrollmentClient::new(channel.clone());
    let request = pb::EnrollRequest { bootstrap_token: token.into(), worker_id: worker.into(), csr_pem };
    client.enroll(request).await.map(|r| r.into_inner())
}

fn assert_refused(status: &tonic::Status, code: Code, words: &[&str]) {
    assert_eq!(status.code(), code, "{status:?}");
    for w in words {
        assert!(status.message().contains(w), "{:?} lacks {w:?}", status.message());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_turns_a_bare_machine_into_a_worker_that_runs_a_task() {
    let started = common::start(Config::default(), &[]).await;
    let coordinator_tls = started.config.transport.tls_dir.clone();
    let token = create_token(&coordinator_tls, HOUR, Some(id("w9")), SystemTime::now()).expect("token");

    // The worker's machine: its own (empty) TLS directory.
    let worker_tls = started.dir.path().join("machine-w9").join("tls");
    let joined = enroll::join(join_options(&started.addr, &token, "w9", &worker_tls)).await.expect("enrolled");
    let files = CertFiles::worker(&worker_tls, &id("w9"));
    assert_eq!(joined, Joined::Enrolled(files.clone()));
    assert_eq!(std::fs::metadata(&files.key).expect("key").permissions().mode() & 0o777, 0o600);
    assert_eq!(
        std::fs::read(CertFiles::ca(&worker_tls).cert).expect("ca.pem"),
        std::fs::read(CertFiles::ca(&coordinator_tls).cert).expect("coordinator's ca.pem")
    );
    assert!(!CertFiles::ca(&worker_tls).key.exists(), "the CA key stays with the coordinator");
    assert!(coordinator_tls.join("enrolled/w9.pem").exists(), "the coordinator keeps a record");
    // --join again: the files are there, nothing is sent (the token is spent anyway).
    let again = enroll::join(join_options(&started.addr, &token, "w9", &worker_tls)).await.expect("idempotent");
    assert_eq!(again, Joined::AlreadyEnrolled(files));

    // From here on it is an ordinary worker.
    let mut worker_config = started.config.clone();
    worker_config.transport.tls_dir = worker_tls;
    let (stop_tx, stop_rx) = watch::channel(false);
    let worker = tokio::spawn(run_worker_process(
        WorkerOptions {
            config: worker_config,
            id: id("w9"),
            slots: 2,
            plugins: Arc::new(BuiltinPlugins),
            emitter: Arc::new(MemoryEmitter::new()),
            coordinator_addr: Some(started.addr.clone()),
            cert: None,
            rng_seed: Some(3),
        },
        stop_rx,
    ));
    let mut operator = operator_client(&started.config, "ops", Some(&started.addr)).expect("operator");
    let task = pb::TaskSpec {
        plugin: "echo".into(),
        method: "run".into(),
        payload: b"hi".to_vec(),
        gpus: 0,
        deadline_ms: 10_000,
        inputs: Vec::new(),
    };
    let job = operator
        .submit_job(pb::SubmitJobRequest { name: "one".into(), tasks: vec![task], idempotency_key: "one".into() })
        .await
        .expect("submitted")
        .into_inner()
        .job;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = operator.status(pb::StatusRequest::default()).await.expect("status").into_inner();
        let progress = status.jobs.iter().find(|j| j.job == job).expect("job listed");
        if progress.committed == 1 {
            assert!(status.workers.iter().any(|w| w.worker_id == "w9"), "{:?}", status.workers);
            let committed = started.history.records().into_iter().any(|r| {
                matches!(r.event, rollout_core::history::HistoryEvent::Committed { ref worker, .. } if worker.as_str() == "w9")
            });
            assert!(committed, "w9 committed the task");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the task did not finish: {progress:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    worker.await.expect("worker task").expect("worker stops cleanly");
    started.coordinator.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_bad_requests_are_refused_with_the_reason() {
    let started = common::start(Config::default(), &["w1"]).await;
    let tls_dir = started.config.transport.tls_dir.clone();
    let pin = CaPin::of_file(&CertFiles::ca(&tls_dir).cert).expect("pin");
    let channel = anonymous_channel(&started.addr, pin);
    let now = SystemTime::now();

    // Expired.
    let expired = create_token(&tls_dir, HOUR, None, now - 2 * HOUR).expect("token");
    let err = raw_enroll(&channel, &expired.to_string(), "w2", csr_for("w2")).await.expect_err("expired");
    assert_refused(&err, Code::Unauthenticated, &["enroll.bootstrap_token", &expired.id, "expired at"]);

    // Bound to another worker: refused by the coordinator, and by `join` before it sends.
    let bound = create_token(&tls_dir, HOUR, Some(id("w3")), now).expect("token");
    let err = raw_enroll(&channel, &bound.to_string(), "w4", csr_for("w4")).await.expect_err("wrong id");
    assert_refused(&err, Code::PermissionDenied, &["enroll.worker_id", "bound to worker w3", "w4"]);
    let machine = tempfile::tempdir().expect("tempdir");
    let err = enroll::join(join_options(&started.addr, &bound, "w4", machine.path())).await.expect_err("wrong id");
    assert!(err.to_string().contains("bound to worker w3"), "{err}");

    // A garbage CSR, a garbage token, a wrong secret, an unknown token.
    let err = raw_enroll(
        &channel,
        &bound.to_string(),
        "w3",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
    )
    .await
    .expect_err("garbage CSR");
    assert_refused(&err, Code::InvalidArgument, &["enroll.csr_pem"]);
    let err = raw_enroll(&channel, "let me in", "w3", csr_for("w3")).await.expect_err("garbage token");
    assert_refused(&err, Code::InvalidArgument, &["enroll.bootstrap_token", "not a rollout bootstrap token"]);
    let text = bound.to_string();
    let (head, rest) = text.split_at(text.find('.').expect("dot") + 1 + 16 + 1);
    let forged = format!("{head}{}{}", "0".repeat(32), &rest[32..]);
    let err = raw_enroll(&channel, &forged, "w3", csr_for("w3")).await.expect_err("wrong secret");
    assert_refused(&err, Code::Unauthenticated, &["wrong secret", &bound.id]);
    enroll::revoke_token(&tls_dir, &expired.id).expect("revoke");
    let err = raw_enroll(&channel, &expired.to_string(), "w2", csr_for("w2")).await.expect_err("revoked");
    assert_refused(&err, Code::Unauthenticated, &["unknown token", &expired.id]);

    // An unbound token cannot take over a worker id that already has a certificate.
    let unbound = create_token(&tls_dir, HOUR, None, now).expect("token");
    let err = raw_enroll(&channel, &unbound.to_string(), "w1", csr_for("w1")).await.expect_err("w1 exists");
    assert_refused(&err, Code::AlreadyExists, &["enroll.worker_id", "w1", "--worker w1"]);

    // None of the refusals spent the bound token: it still works, once.
    let issued = raw_enroll(&channel, &bound.to_string(), "w3", csr_for("w3")).await.expect("enrolled");
    let cert = rustls::pki_types::CertificateDer::from(
        x509_parser::pem::parse_x509_pem(issued.certificate_pem.as_bytes()).expect("pem").1.contents,
    );
    assert_eq!(
        tls::peer_role(&cert),
        Some(tls::PeerRole::Worker(id("w3"))),
        "CN and OU as issue_client_cert makes them"
    );
    let err = raw_enroll(&channel, &bound.to_string(), "w3", csr_for("w3")).await.expect_err("reused");
    assert_refused(&err, Code::Unauthenticated, &["already used", "by worker w3", "single-use"]);
    let uses: Vec<_> = list_tokens(&tls_dir).expect("list").into_iter().filter(|(_, used)| used.is_some()).collect();
    assert_eq!(uses.len(), 1, "{uses:?}");

    // Re-enrolling w1 (a token bound to it) revokes the certificate it had.
    let old = tls::CertInfo::of_file(&CertFiles::worker(&tls_dir, &id("w1")).cert).expect("w1's certificate");
    let rebind = create_token(&tls_dir, HOUR, Some(id("w1")), now).expect("token");
    let issued = raw_enroll(&channel, &rebind.to_string(), "w1", csr_for("w1")).await.expect("re-enrolled");
    let denied = rollout_transport::revocation::load_denied(&tls_dir, std::time::SystemTime::now()).expect("deny list");
    let new = tls::CertInfo::of_der(
        &x509_parser::pem::parse_x509_pem(issued.certificate_pem.as_bytes()).expect("pem").1.contents,
    )
    .expect("new certificate");
    assert!(denied.contains(&old.serial), "the old certificate is revoked: {denied:?}");
    assert!(!denied.contains(&new.serial), "the new one is not");
    started.coordinator.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbound_tokens_racing_for_one_new_worker_id_give_it_exactly_one_certificate() {
    let started = common::start(Config::default(), &["w1"]).await;
    let tls_dir = started.config.transport.tls_dir.clone();
    let pin = CaPin::of_file(&CertFiles::ca(&tls_dir).cert).expect("pin");
    let channel = anonymous_channel(&started.addr, pin);
    let tokens: Vec<BootstrapToken> =
        (0..8).map(|_| create_token(&tls_dir, HOUR, None, SystemTime::now()).expect("token")).collect();
    let calls = tokens.iter().map(|t| {
        let (channel, token) = (channel.clone(), t.to_string());
        tokio::spawn(async move { raw_enroll(&channel, &token, "w9", csr_for("w9")).await })
    });
    let mut won = 0;
    for call in calls.collect::<Vec<_>>() {
        match call.await.expect("join") {
            Ok(_) => won += 1,
            Err(status) => assert_refused(&status, Code::AlreadyExists, &["enroll.worker_id", "w9"]),
        }
    }
    assert_eq!(won, 1, "one certificate for w9");
    // The losers' tokens were not spent: each can still enroll another new id.
    let used = list_tokens(&tls_dir).expect("list").into_iter().filter(|(_, used)| used.is_some()).count();
    assert_eq!(used, 1);
    let mut spare = Vec::new();
    for (record, used) in list_tokens(&tls_dir).expect("list") {
        if used.is_none() {
            spare.push(record.id);
        }
    }
    let loser = tokens.iter().find(|t| spare.contains(&t.id)).expect("an unspent token");
    raw_enroll(&channel, &loser.to_string(), "w10", csr_for("w10")).await.expect("a loser's token still enrolls");
    started.coordinator.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_waits_for_a_coordinator_that_is_not_up_yet() {
    let started = common::start(Config::default(), &[]).await;
    let tls_dir = started.config.transport.tls_dir.clone();
    let token = create_token(&tls_dir, HOUR, None, SystemTime::now()).expect("token");
    started.coordinator.shutdown().await.expect("clean shutdown");

    // The machine starts joining while nothing listens at the address.
    let machine = tempfile::tempdir().expect("tempdir");
    let joining = tokio::spawn(enroll::join(join_options(&started.addr, &token, "w6", machine.path())));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!joining.is_finished(), "an unreachable coordinator is retried, not an error");

    let coordinator = rollout_transport::start_coordinator(rollout_transport::CoordinatorOptions {
        config: started.config.clone(),
        emitter: Arc::new(MemoryEmitter::new()),
        listen_addr: Some(started.addr.clone()),
    })
    .await
    .expect("the coordinator starts on the same address");
    let joined = tokio::time::timeout(Duration::from_secs(10), joining)
        .await
        .expect("joined once the coordinator is up")
        .expect("join task")
        .expect("enrolled");
    assert!(matches!(joined, Joined::Enrolled(_)), "{joined:?}");

    // With a bounded number of attempts, a coordinator that never comes says why.
    coordinator.shutdown().await.expect("clean shutdown");
    let other = create_token(&tls_dir, HOUR, None, SystemTime::now()).expect("token");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let opts = JoinOptions { attempts_max: Some(3), ..join_options(&started.addr, &other, "w7", elsewhere.path()) };
    let err = enroll::join(opts).await.expect_err("nobody listens");
    assert!(err.retry_hint().is_some(), "unreachable is recoverable: {err}");
    assert!(err.to_string().contains(&started.addr), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_sends_its_token_only_to_the_pinned_ca() {
    let started = common::start(Config::default(), &[]).await;
    let tls_dir = started.config.transport.tls_dir.clone();
    let token = create_token(&tls_dir, HOUR, None, SystemTime::now()).expect("token");
    let mut wrong_pin = token.clone();
    wrong_pin.ca_pin = CaPin([0xab; 32]);

    let machine = tempfile::tempdir().expect("tempdir");
    let err = enroll::join(join_options(&started.addr, &wrong_pin, "w5", machine.path())).await.expect_err("wrong pin");
    let text = err.to_string();
    assert!(
        text.contains("does not contain the CA the bootstrap token pins") && text.contains("sha256:abab"),
        "{text}"
    );
    assert!(!CertFiles::worker(machine.path(), &id("w5")).exist(), "nothing written");
    // The handshake failed, so no request carried the token: it is unused and still works.
    assert!(list_tokens(&tls_dir).expect("list").iter().all(|(_, used)| used.is_none()));
    let joined = enroll::join(join_options(&started.addr, &token, "w5", machine.path())).await.expect("right pin");
    assert!(matches!(joined, Joined::Enrolled(_)));
    started.coordinator.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_client_certificate_only_enroll_answers() {
    let started = common::start(Config::default(), &["w1"]).await;
    let pin = CaPin::of_file(&CertFiles::ca(&started.config.transport.tls_dir).cert).expect("pin");
    let channel = anonymous_channel(&started.addr, pin);
    let unauthenticated = |status: tonic::Status| {
        assert_refused(&status, Code::Unauthenticated, &["no client certificate"]);
    };

    let mut worker = pb::coordinator_client::CoordinatorClient::new(channel.clone());
    let register = pb::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: "w1".into(),
        plugins: vec!["echo".into()],
        slots: 1,
        inventory: None,
        ..Default::default()
    };
    unauthenticated(worker.register(register).await.expect_err("register"));
    let beat = pb::HeartbeatRequest { worker_id: "w1".into(), incarnation: 1, beat_seq: 1, ..Default::default() };
    unauthenticated(worker.heartbeat(beat).await.expect_err("heartbeat"));
    let subscribe = pb::ControlSubscribe { worker_id: "w1".into(), incarnation: 1 };
    unauthenticated(worker.control(subscribe).await.expect_err("control"));
    let hello =
        pb::WorkerFrame { hello: Some(pb::WorkHello { worker_id: "w1".into(), incarnation: 1 }), ..Default::default() };
    unauthenticated(worker.work(tokio_stream::iter(vec![hello])).await.expect_err("work"));

    let mut operator = pb::operator_client::OperatorClient::new(channel.clone());
    unauthenticated(operator.status(pb::StatusRequest::default()).await.expect_err("status"));
    let submit = pb::SubmitJobRequest { name: "x".into(), tasks: vec![], idempotency_key: "x".into() };
    unauthenticated(operator.submit_job(submit).await.expect_err("submit"));
    unauthenticated(operator.cancel_job(pb::CancelJobRequest { job: 1 }).await.expect_err("cancel"));
    unauthenticated(operator.drain(pb::DrainRequest { worker_id: "w1".into() }).await.expect_err("drain"));
    let results = pb::ResultsRequest { job: 1, include_bytes: false, from_index: 0 };
    unauthenticated(operator.results(results).await.expect_err("results"));

    // The same connection reaches Enroll's own checks.
    let err = raw_enroll(&channel, "nope", "w1", String::new()).await.expect_err("bad token");
    assert_refused(&err, Code::InvalidArgument, &["enroll.bootstrap_token"]);
    started.coordinator.shutdown().await.expect("clean shutdown");
}
