//! A peer with a valid certificate misbehaves on purpose; an honest worker on the same
//! coordinator must not notice. Each test runs a real coordinator over loopback mutual
//! TLS with fast health settings, an honest `probe` worker that beats on schedule and
//! measures every answer, and a hostile client speaking the wire protocol directly.
//!
//! The honest side's promise: every beat answered within 2 × heartbeat_interval, no
//! task lost, and the coordinator's memory bounded (peak RSS of this process, which
//! hosts the coordinator; the tests of this file run one at a time so that figure is
//! theirs).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rollout_core::history::HistoryEvent;
use rollout_core::{PROTOCOL_VERSION, WorkerId};
use rollout_proto::transport as pb;
use rollout_proto::transport::coordinator_client::CoordinatorClient;
use rollout_transport::enroll::{self, CaPin};
use rollout_transport::{
    BuiltinPlugins, CertFiles, MemoryEmitter, WorkerOptions, connect, operator_client, run_worker_process,
};
use tokio::sync::watch;
use tonic::transport::Channel;

/// One test at a time: they measure this process's memory and timing.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The heartbeat interval of `common::fast_config`.
const BEAT: Duration = Duration::from_millis(100);

/// Peak resident memory of this process since the last [`reset_peak_rss`], in bytes.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kib * 1024
}

/// Resets the peak (Linux: writing 5 to clear_refs).
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
}

fn worker_client(started: &common::Started, id: &str) -> CoordinatorClient<Channel> {
    let tls = &started.config.transport.tls_dir;
    let worker = WorkerId::new(id).expect("id");
    let channel = connect(&started.addr, &CertFiles::ca(tls).cert, &CertFiles::worker(tls, &worker)).expect("channel");
    CoordinatorClient::new(channel).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20)
}

fn register_request(id: &str, plugins: Vec<String>) -> pb::RegisterRequest {
    pb::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: id.into(),
        plugins,
        slots: 4,
        inventory: Some(pb::Inventory { cpus: 2, memory_bytes: 1 << 30, gpus: vec![] }),
        ..Default::default()
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// An honest worker reduced to its heartbeat: registers, then beats every interval and
/// keeps the round-trip time of each beat. A beat that goes unanswered counts as the
/// time the probe waited for it.
struct Probe {
    worst: Arc<Mutex<Duration>>,
    beats: Arc<Mutex<u64>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Probe {
    async fn start(started: &common::Started, id: &str) -> Probe {
        let mut client = worker_client(started, id);
        let registered = client.register(register_request(id, vec!["probe".into()])).await.expect("probe registers");
        let incarnation = registered.into_inner().incarnation;
        let (stop, mut stopped) = watch::channel(false);
        let (worst, beats) = (Arc::new(Mutex::new(Duration::ZERO)), Arc::new(Mutex::new(0)));
        let (worst_w, beats_w, id) = (Arc::clone(&worst), Arc::clone(&beats), id.to_owned());
        let task = tokio::spawn(async move {
            let mut seq = 0;
            let mut ticker = tokio::time::interval(BEAT);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stopped.changed() => return,
                }
                seq += 1;
                let beat = pb::HeartbeatRequest {
                    worker_id: id.clone(),
                    incarnation,
                    beat_seq: seq,
                    due_at_unix_ms: unix_ms(SystemTime::now() + 2 * BEAT),
                    ..Default::default()
                };
                let sent = tokio::time::Instant::now();
                let answered = tokio::time::timeout(Duration::from_secs(10), client.heartbeat(beat)).await;
                let took = sent.elapsed();
                let mut w = worst_w.lock().expect("lock");
                *w = (*w).max(took);
                drop(w);
                match answered {
                    Ok(Ok(resp)) if !resp.get_ref().reregister => *beats_w.lock().expect("lock") += 1,
                    // Declared failed, or no answer at all: the worst case is already recorded.
                    Ok(Ok(_)) => *worst_w.lock().expect("lock") = Duration::from_secs(3600),
                    Ok(Err(_)) | Err(_) => {}
                }
            }
        });
        Probe { worst, beats, stop, task }
    }

    /// Stops beating (after at least 10 answered beats, so every test watches a while);
    /// asserts every beat was answered within 2 × heartbeat_interval.
    async fn assert_never_noticed(self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while *self.beats.lock().expect("lock") < 10 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(BEAT).await;
        }
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let worst = *self.worst.lock().expect("lock");
        let beats = *self.beats.lock().expect("lock");
        assert!(beats >= 5, "the honest probe got only {beats} beats answered");
        assert!(worst < 2 * BEAT, "an honest beat took {worst:?} to be answered (limit {:?})", 2 * BEAT);
    }
}

/// A worker running the built-in plugins, with its own history.
struct HonestWorker {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<rollout_core::Result<()>>,
    history: Arc<MemoryEmitter>,
}

impl HonestWorker {
    fn start(started: &common::Started, id: &str, slots: u32) -> HonestWorker {
        let (stop, stopped) = watch::channel(false);
        let history = Arc::new(MemoryEmitter::new());
        let opts = WorkerOptions {
            config: started.config.clone(),
            id: WorkerId::new(id).expect("id"),
            slots,
            plugins: Arc::new(BuiltinPlugins),
            emitter: history.clone(),
            coordinator_addr: Some(started.addr.clone()),
            cert: None,
            rng_seed: Some(7),
        };
        HonestWorker { stop, task: tokio::spawn(run_worker_process(opts, stopped)), history }
    }

    fn fenced(&self) -> bool {
        self.history.records().iter().any(|r| matches!(r.event, HistoryEvent::SelfFenced { .. }))
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

async fn submit(started: &common::Started, plugin: &str, payloads: Vec<Vec<u8>>) -> u64 {
    let mut operator = operator_client(&started.config, "ops", Some(&started.addr)).expect("operator");
    let tasks = payloads
        .into_iter()
        .map(|payload| pb::TaskSpec {
            plugin: plugin.into(),
            method: "run".into(),
            payload,
            gpus: 0,
            deadline_ms: 30_000,
            inputs: Vec::new(),
        })
        .collect();
    let request = pb::SubmitJobRequest { name: plugin.into(), tasks, idempotency_key: String::new() };
    operator.submit_job(request).await.expect("job accepted").into_inner().job
}

/// Waits until every task of `job` is committed; returns the result bytes in task order.
async fn wait_committed(started: &common::Started, job: u64, tasks: usize, within: Duration) -> Vec<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut operator = operator_client(&started.config, "ops", Some(&started.addr)).expect("operator");
    loop {
        let request = pb::ResultsRequest { job, include_bytes: true, from_index: 0 };
        let mut results = Vec::new();
        if let Ok(stream) = operator.results(request).await {
            let mut stream = stream.into_inner();
            while let Ok(Some(r)) = stream.message().await {
                results.push(r);
            }
        }
        let committed = results.iter().filter(|r| r.state == pb::TaskState::Committed as i32).count();
        if committed == tasks {
            return results.into_iter().map(|r| r.result).collect();
        }
        let states: Vec<(i32, u32, Vec<String>)> =
            results.iter().map(|r| (r.state, r.attempts, r.errors.clone())).collect();
        assert!(tokio::time::Instant::now() < deadline, "job {job}: {committed} of {tasks} committed: {states:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HdrHistogram V2 header (40 bytes, no payload) that claims `payload_len` bytes.
fn crafted_histogram(payload_len: u32, significant_digits: u32, highest: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(40);
    h.extend_from_slice(&0x1c84_9313u32.to_be_bytes()); // V2 cookie
    h.extend_from_slice(&payload_len.to_be_bytes());
    h.extend_from_slice(&0u32.to_be_bytes()); // normalizing offset
    h.extend_from_slice(&significant_digits.to_be_bytes());
    h.extend_from_slice(&1u64.to_be_bytes()); // lowest discernible value
    h.extend_from_slice(&highest.to_be_bytes());
    h.extend_from_slice(&1f64.to_be_bytes()); // integer-to-double ratio
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_histogram_headers_neither_allocate_nor_stall_the_coordinator() {
    let _one = SERIAL.lock().await;
    let started = common::start(common::fast_config(), &["probe", "evil"]).await;
    let probe = Probe::start(&started, "probe").await;
    let mut evil = worker_client(&started, "evil");
    let incarnation =
        evil.register(register_request("evil", vec!["echo".into()])).await.expect("evil registers").into_inner();

    reset_peak_rss();
    let rss_before = peak_rss_bytes();
    let histograms = (0..8)
        .map(|i| pb::HistogramDelta {
            name: "task_latency_us".into(),
            plugin: "echo".into(),
            // Each claims 4 GiB of payload; the last ones also ask for a huge counts array.
            hdr_v2: if i < 6 {
                crafted_histogram(u32::MAX - 8, 3, 3_600_000_000)
            } else {
                crafted_histogram(0, 5, u64::MAX / 4)
            },
        })
        .collect();
    let beat = pb::HeartbeatRequest {
        worker_id: "evil".into(),
        incarnation: incarnation.incarnation,
        beat_seq: 1,
        due_at_unix_ms: unix_ms(SystemTime::now() + 2 * BEAT),
        metrics: Some(pb::MetricDeltas { counters: vec![], histograms }),
        ..Default::default()
    };
    let answered = tokio::time::timeout(Duration::from_secs(5), evil.heartbeat(beat)).await;
    assert!(answered.is_ok(), "the crafted beat was never answered");
    tokio::time::sleep(5 * BEAT).await;
    let grown = peak_rss_bytes().saturating_sub(rss_before);
    assert!(grown < 256 << 20, "the coordinator's peak memory grew by {} MiB for one crafted beat", grown >> 20);
    probe.assert_never_noticed().await;
    started.coordinator.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_at_far_in_the_future_does_not_keep_a_silent_worker_alive() {
    let _one = SERIAL.lock().await;
    let started = common::start(common::fast_config(), &["probe", "evil", "honest"]).await;
    let probe = Probe::start(&started, "probe").await;
    let mut evil = worker_client(&started, "evil");
    let incarnation = evil
        .register(register_request("evil", vec!["sleep".into()]))
        .await
        .expect("registers")
        .into_inner()
        .incarnation;
    let job = submit(&started, "sleep", vec![b"10".to_vec(); 4]).await;

    // Take the four leases, announce a deadline in the year 3000, and go silent.
    let (frames, rx) = tokio::sync::mpsc::channel(8);
    frames
        .send(pb::WorkerFrame {
            hello: Some(pb::WorkHello { worker_id: "evil".into(), incarnation }),
            pulls: vec![pb::Pull { free_slots: 4, assigns_through: 0 }],
            submits: vec![],
        })
        .await
        .expect("queued");
    let mut down = evil.work(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("work stream").into_inner();
    let mut leases = Vec::new();
    while leases.len() < 4 {
        let frame = tokio::time::timeout(Duration::from_secs(5), down.message()).await;
        let frame = frame.expect("assignments arrive").expect("stream").expect("a frame");
        leases.extend(frame.assigns.iter().map(|a| pb::RunningTask { task: a.task, token: a.token }));
    }
    let year_3000 = SystemTime::UNIX_EPOCH + Duration::from_secs(32_503_680_000);
    let beat = pb::HeartbeatRequest {
        worker_id: "evil".into(),
        incarnation,
        beat_seq: 1,
        due_at_unix_ms: unix_ms(year_3000),
        running: leases,
        assigns_through: 4,
        metrics: None,
    };
    evil.heartbeat(beat).await.expect("the lying beat is answered");
    let silent_from = tokio::time::Instant::now();

    let honest = HonestWorker::start(&started, "honest", 4);
    // The coordinator's own clock bounds the deadline it keeps: receive time + 2 beats +
    // the skew budget, then the failure timeout and one scan.
    let bound = 2 * BEAT + Duration::from_millis(50) + Duration::from_secs(1) + Duration::from_millis(50);
    let results = wait_committed(&started, job, 4, bound + Duration::from_secs(5)).await;
    assert_eq!(results.len(), 4, "every task of the lying worker is finished by the honest one");
    let declared = started
        .history
        .records()
        .iter()
        .any(|r| matches!(&r.event, HistoryEvent::DeclaredFailed { worker, .. } if worker.as_str() == "evil"));
    assert!(declared, "the silent worker was declared failed");
    assert!(silent_from.elapsed() >= bound.saturating_sub(Duration::from_millis(200)), "declared too early");
    drop(frames);
    assert!(!honest.fenced(), "the honest worker fenced itself");
    honest.stop().await;
    probe.assert_never_noticed().await;
    started.coordinator.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_with_tens_of_thousands_of_plugin_names_is_refused() {
    let _one = SERIAL.lock().await;
    let started = common::start(common::fast_config(), &["probe", "evil", "honest"]).await;
    let probe = Probe::start(&started, "probe").await;
    let honest = HonestWorker::start(&started, "honest", 4);
    let mut evil = worker_client(&started, "evil");
    let plugins: Vec<String> = (0..60_000).map(|i| format!("plugin-{i:0>40}")).collect();
    let refused = evil.register(register_request("evil", plugins)).await.expect_err("refused");
    assert!(refused.message().contains("limits.max_plugins_per_worker"), "{refused:?}");

    let job = submit(&started, "echo", vec![b"hi".to_vec(); 50]).await;
    wait_committed(&started, job, 50, Duration::from_secs(10)).await;
    assert!(!honest.fenced(), "the honest worker fenced itself");
    honest.stop().await;
    probe.assert_never_noticed().await;
    started.coordinator.shutdown().await.expect("clean shutdown");
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_stale_one_mib_submits_stores_nothing() {
    let _one = SERIAL.lock().await;
    let started = common::start(common::fast_config(), &["probe", "evil", "honest"]).await;
    let probe = Probe::start(&started, "probe").await;
    let honest = HonestWorker::start(&started, "honest", 4);
    let mut evil = worker_client(&started, "evil");
    let incarnation = evil
        .register(register_request("evil", vec!["nothing".into()]))
        .await
        .expect("registers")
        .into_inner()
        .incarnation;
    let data_dir = started.dir.path().to_owned();
    let before = dir_bytes(&data_dir);

    let (frames, rx) = tokio::sync::mpsc::channel(4);
    let mut down = {
        let hello = pb::WorkerFrame {
            hello: Some(pb::WorkHello { worker_id: "evil".into(), incarnation }),
            ..Default::default()
        };
        frames.send(hello).await.expect("queued");
        evil.work(tokio_stream::wrappers::ReceiverStream::new(rx)).await.expect("work stream").into_inner()
    };
    let acks = tokio::spawn(async move {
        let mut stale = 0;
        while stale < 200
            && let Ok(Some(frame)) = down.message().await
        {
            stale += frame.acks.iter().filter(|a| a.verdict == pb::SubmitVerdict::Stale as i32).count();
        }
        stale
    });
    for i in 0..200u64 {
        let mut result = vec![0u8; 1 << 20];
        result[..8].copy_from_slice(&i.to_be_bytes());
        let submit = pb::Submit {
            task: Some(pb::TaskId { job: 999, index: i as u32 }),
            token: 1,
            outcome: Some(pb::submit::Outcome::Result(result)),
        };
        frames.send(pb::WorkerFrame { submits: vec![submit], ..Default::default() }).await.expect("sent");
    }
    let job = submit(&started, "echo", vec![b"hi".to_vec(); 20]).await;
    wait_committed(&started, job, 20, Duration::from_secs(10)).await;
    let stale = tokio::time::timeout(Duration::from_secs(10), acks).await.expect("acks end").expect("join");
    drop(frames);
    assert_eq!(stale, 200, "every stale submit is answered stale");
    let grown = dir_bytes(&data_dir).saturating_sub(before);
    assert!(grown < 16 << 20, "200 stale 1 MiB submits grew the data dir by {} MiB", grown >> 20);
    assert!(!honest.fenced(), "the honest worker fenced itself");
    honest.stop().await;
    probe.assert_never_noticed().await;
    started.coordinator.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_tasks_of_one_megabyte_each_commit_on_a_six_slot_worker() {
    let _one = SERIAL.lock().await;
    let started = common::start(common::fast_config(), &["w1"]).await;
    // Queued before the worker is there, so all six are leased in one batch.
    let mut jobs = Vec::new();
    for i in 0..6u8 {
        jobs.push(submit(&started, "echo", vec![vec![b'a' + i; 1_000_000]]).await);
    }
    let worker = HonestWorker::start(&started, "w1", 6);
    for (i, job) in jobs.into_iter().enumerate() {
        let results = wait_committed(&started, job, 1, Duration::from_secs(20)).await;
        assert_eq!(results[0], vec![b'a' + i as u8; 1_000_000], "job {job} echoes its payload");
    }
    assert!(!worker.fenced(), "the worker's streams never broke");
    worker.stop().await;
    started.coordinator.shutdown().await.expect("clean shutdown");
}

/// A TLS connection without a client certificate (what a worker uses to enroll),
/// handshake done; `None` if the server refused it during the handshake.
async fn anonymous_tls(addr: &str, pin: CaPin) -> Option<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let connector = tokio_rustls::TlsConnector::from(enroll::pinned_client_config(pin));
    let name = rollout_transport::tls::server_name_of(addr).expect("name");
    connector.connect(name, tcp).await.ok()
}

/// Waits until the server closes `stream` (EOF or an error), up to `within`.
async fn closed_within(mut stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // The server's HTTP/2 preface and settings: keep reading.
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_without_a_certificate_are_capped_and_cut() {
    let _one = SERIAL.lock().await;
    let mut config = common::fast_config();
    config.limits.max_unauthenticated_connections = 40;
    config.limits.unauthenticated_connection_timeout = Duration::from_secs(1);
    let started = common::start(config, &["probe"]).await;
    let probe = Probe::start(&started, "probe").await;
    let pin = CaPin::of_file(&CertFiles::ca(&started.config.transport.tls_dir).cert).expect("pin");
    let opened_at = tokio::time::Instant::now();
    let mut idle = Vec::new();
    for _ in 0..200 {
        if let Some(stream) = anonymous_tls(&started.addr, pin).await {
            idle.push(stream);
        }
    }
    // Each is watched for its close; beyond the cap they close at once, the others at
    // the timeout: all of them within it plus scheduling slack.
    let watched: Vec<_> = idle.into_iter().map(|s| tokio::spawn(closed_within(s, Duration::from_secs(4)))).collect();
    let mut closed = 0;
    for w in watched {
        closed += usize::from(w.await.expect("join"));
    }
    assert_eq!(closed, 200, "every connection without a certificate was closed by the server");
    assert!(opened_at.elapsed() >= Duration::from_millis(900), "the ones within the cap lived until the timeout");
    probe.assert_never_noticed().await;
    started.coordinator.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_repeated_failed_enrollments_are_refused_early() {
    let _one = SERIAL.lock().await;
    let mut config = common::fast_config();
    config.limits.max_failed_enrollments_per_minute = 3;
    let started = common::start(config, &["probe"]).await;
    let probe = Probe::start(&started, "probe").await;
    let pin = CaPin::of_file(&CertFiles::ca(&started.config.transport.tls_dir).cert).expect("pin");
    let name = rollout_transport::tls::server_name_of(&started.addr).expect("name");
    let channel = rollout_transport::net::lazy_channel(rollout_transport::net::TlsConnector::new(
        rollout_transport::net::TcpDialer::new(started.addr.clone()),
        enroll::pinned_client_config(pin),
        name,
    ));
    let mut client = pb::enrollment_client::EnrollmentClient::new(channel).max_encoding_message_size(8 << 20);
    // A megabyte from someone without a certificate is not decoded at all.
    let huge =
        pb::EnrollRequest { bootstrap_token: "x".repeat(1 << 20), worker_id: "w9".into(), csr_pem: String::new() };
    let refused = client.enroll(huge).await.expect_err("too large");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    assert!(refused.message().contains("too large"), "{refused:?}");
    // Three bad tokens, then the source is refused without a look at its token.
    for _ in 0..3 {
        let bad = pb::EnrollRequest { bootstrap_token: "nope".into(), worker_id: "w9".into(), csr_pem: String::new() };
        assert_eq!(client.enroll(bad).await.expect_err("bad token").code(), tonic::Code::InvalidArgument);
    }
    let bad = pb::EnrollRequest { bootstrap_token: "nope".into(), worker_id: "w9".into(), csr_pem: String::new() };
    let limited = client.enroll(bad).await.expect_err("rate-limited");
    assert_eq!(limited.code(), tonic::Code::ResourceExhausted, "{limited:?}");
    assert!(limited.message().contains("limits.max_failed_enrollments_per_minute"), "{limited:?}");
    probe.assert_never_noticed().await;
    started.coordinator.shutdown().await.expect("clean shutdown");
}
