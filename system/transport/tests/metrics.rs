//! `/metrics` of a real cluster (coordinator and two workers in this process, over
//! loopback mTLS), scraped over plain HTTP as Prometheus would, and checked against
//! what the cluster is known to have done.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rollout_core::WorkerId;
use rollout_proto::transport as pb;
use rollout_transport::{BuiltinPlugins, MemoryEmitter, WorkerOptions, operator_client, run_worker_process};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// `GET /metrics` on `addr`: the body, and the content type.
async fn scrape(addr: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect to /metrics");
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-type: ").map(str::to_owned))
        .unwrap_or_default();
    (body.to_owned(), content_type)
}

/// Every sample of the text, `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(k, v)| (k.to_owned(), v.parse().unwrap_or(f64::NAN))))
        .collect()
}

fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    listener.local_addr().expect("addr").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinators_and_the_workers_metrics_match_what_the_cluster_did() {
    let started = common::start(common::fast_config(), &["w1", "w2"]).await;
    let metrics_addr = started.coordinator.metrics_addr.expect("metrics served").to_string();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut worker_addrs = Vec::new();
    let mut workers = Vec::new();
    for (i, w) in ["w1", "w2"].into_iter().enumerate() {
        let mut config = started.config.clone();
        let addr = free_port();
        config.metrics.worker_listen_addr = addr.clone();
        worker_addrs.push(addr);
        let opts = WorkerOptions {
            config,
            id: WorkerId::new(w).expect("id"),
            slots: 4,
            plugins: Arc::new(BuiltinPlugins),
            emitter: Arc::new(MemoryEmitter::new()),
            coordinator_addr: Some(started.addr.clone()),
            cert: None,
            rng_seed: Some(i as u64),
        };
        workers.push(tokio::spawn(run_worker_process(opts, stop_rx.clone())));
    }

    const TASKS: u32 = 300;
    let mut operator = operator_client(&started.config, "ops", Some(&started.addr)).expect("operator");
    let tasks = (0..TASKS)
        .map(|i| pb::TaskSpec {
            plugin: "echo".into(),
            method: "run".into(),
            payload: format!("p{i}").into_bytes(),
            gpus: 0,
            deadline_ms: 10_000,
            inputs: Vec::new(),
        })
        .collect();
    let request = pb::SubmitJobRequest { name: "m".into(), tasks, idempotency_key: String::new() };
    let job = operator.submit_job(request).await.expect("accepted").into_inner().job;

    // The gauges are refreshed at most once a second, and the run-time percentiles need
    // a beat's metrics merged: wait until the scrape shows the finished job.
    let n = f64::from(TASKS);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (text, content_type) = loop {
        let (text, content_type) = scrape(&metrics_addr).await;
        let s = samples(&text);
        let done = s.get("rollout_tasks{state=\"committed\"}") == Some(&n)
            && s.get("rollout_workers{state=\"active\"}") == Some(&2.0)
            && s.contains_key("rollout_task_run_seconds{plugin=\"echo\",quantile=\"0.5\"}");
        if done {
            break (text, content_type);
        }
        assert!(tokio::time::Instant::now() < deadline, "the scrape never showed job {job} done:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    assert!(text.ends_with("# EOF\n"));
    let s = samples(&text);
    let get = |k: &str| s.get(k).copied().unwrap_or_else(|| panic!("{k} missing from\n{text}"));
    assert_eq!(get("rollout_committed_total"), n);
    assert_eq!(get("rollout_submits_total{verdict=\"accepted\"}"), n);
    assert!(get("rollout_leases_total") >= n);
    assert_eq!(get("rollout_registrations_total"), 2.0);
    assert_eq!(get("rollout_declared_failed_total"), 0.0);
    assert_eq!(get("rollout_tasks{state=\"queued\"}") + get("rollout_tasks{state=\"leased\"}"), 0.0);
    assert_eq!(get("rollout_jobs{phase=\"finished\"}"), 1.0);
    assert!(get("rollout_heartbeats_total") > 0.0);
    assert!(get("rollout_commit_duration_seconds_count") > 0.0);
    assert!(get("rollout_batch_inputs_count") > 0.0);
    let p50 = get("rollout_task_run_seconds{plugin=\"echo\",quantile=\"0.5\"}");
    assert!((0.0..1.0).contains(&p50), "echo's median run time {p50} s");

    // Each worker: its slots, registered, and the echo calls it ran add up to the job.
    let mut calls = 0.0;
    for addr in &worker_addrs {
        let (text, _) = scrape(addr).await;
        let s = samples(&text);
        let get = |k: &str| s.get(k).copied().unwrap_or_else(|| panic!("{k} missing from\n{text}"));
        assert_eq!(get("rollout_worker_slots"), 4.0);
        assert_eq!(get("rollout_worker_registered"), 1.0);
        assert_eq!(get("rollout_worker_running"), 0.0);
        assert!(get("rollout_worker_heartbeats_acked_total") > 0.0);
        assert_eq!(get("rollout_worker_fences_total"), 0.0);
        calls +=
            s.get("rollout_worker_plugin_calls_total{plugin=\"echo\",outcome=\"succeeded\"}").copied().unwrap_or(0.0);
    }
    assert_eq!(calls, n, "the workers' echo calls add up to the job");

    let _ = stop_tx.send(true);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
    }
    started.coordinator.shutdown().await.expect("clean shutdown");
}

/// The built-in plugins, with sidecar restarts of `echo` that a test sets.
struct Restarting {
    inner: BuiltinPlugins,
    echo_restarts: std::sync::atomic::AtomicU64,
}

impl rollout_core::traits::PluginHost for Restarting {
    fn plugins(&self) -> Vec<String> {
        self.inner.plugins()
    }

    fn call(
        &self,
        call: &rollout_core::traits::PluginCall,
        cancel: &rollout_core::traits::CancelToken,
    ) -> Result<Vec<u8>, rollout_core::traits::PluginError> {
        self.inner.call(call, cancel)
    }

    fn restarts(&self) -> Vec<(String, u64)> {
        vec![("echo".into(), self.echo_restarts.load(std::sync::atomic::Ordering::Relaxed))]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_restarts_reach_the_workers_metrics_the_coordinators_metrics_and_status() {
    let started = common::start(common::fast_config(), &["w1"]).await;
    let metrics_addr = started.coordinator.metrics_addr.expect("metrics served").to_string();
    let mut config = started.config.clone();
    let worker_metrics = free_port();
    config.metrics.worker_listen_addr = worker_metrics.clone();
    let plugins = Arc::new(Restarting { inner: BuiltinPlugins, echo_restarts: 0.into() });
    let (stop_tx, stop_rx) = watch::channel(false);
    let opts = WorkerOptions {
        config,
        id: WorkerId::new("w1").expect("id"),
        slots: 1,
        plugins: plugins.clone(),
        emitter: Arc::new(MemoryEmitter::new()),
        coordinator_addr: Some(started.addr.clone()),
        cert: None,
        rng_seed: Some(3),
    };
    let worker = tokio::spawn(run_worker_process(opts, stop_rx));
    let mut operator = operator_client(&started.config, "ops", Some(&started.addr)).expect("operator");
    plugins.echo_restarts.store(2, std::sync::atomic::Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = operator.status(pb::StatusRequest::default()).await.expect("status").into_inner();
        let shown: Vec<(String, u64)> = status.plugin_restarts.iter().map(|p| (p.plugin.clone(), p.count)).collect();
        if shown == [("echo".to_owned(), 2)] {
            break;
        }
        assert!(shown.is_empty(), "only ever nothing or echo's 2: {shown:?}");
        assert!(tokio::time::Instant::now() < deadline, "status never showed echo's restarts");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (text, _) = scrape(&metrics_addr).await;
        if samples(&text).get("rollout_plugin_restarts{plugin=\"echo\"}") == Some(&2.0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the coordinator's scrape never showed them:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (text, _) = scrape(&worker_metrics).await;
    assert_eq!(samples(&text).get("rollout_worker_plugin_restarts_total{plugin=\"echo\"}"), Some(&2.0), "{text}");
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), worker).await;
    started.coordinator.shutdown().await.expect("clean shutdown");
}

#[test]
fn a_metrics_address_beyond_loopback_is_a_config_error_naming_the_field() {
    let text = "[metrics]\nlisten_addr = \"0.0.0.0:9464\"\n";
    let err = rollout_core::Config::from_toml_str(text).expect_err("refused").to_string();
    assert!(err.contains("metrics.listen_addr") && err.contains("loopback"), "{err}");
    let text = "[metrics]\nworker_listen_addr = \"localhost\"\n";
    let err = rollout_core::Config::from_toml_str(text).expect_err("refused").to_string();
    assert!(err.contains("metrics.worker_listen_addr") && err.contains("ip:port"), "{err}");
    let off = rollout_core::Config::from_toml_str("[metrics]\nlisten_addr = \"\"\n").expect("empty is off");
    assert!(off.metrics.listen_addr.is_empty());
}
