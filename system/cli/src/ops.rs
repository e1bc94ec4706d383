//! Operator commands: `submit`, `status`, `results`, `cancel`, `drain`, `audit verify`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use rollout_core::time::from_unix_millis;
use rollout_core::{ContentId, Error, JobId};
use rollout_proto::transport as pb;
use rollout_proto::transport::operator_client::OperatorClient;
use rollout_storage::RedbStorage;
use rollout_transport::operator_client;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::{CommonArgs, OperatorArgs, load_config};

/// How often `submit` polls progress while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

fn client(op: &OperatorArgs) -> Result<OperatorClient<Channel>, Error> {
    let config = load_config(&op.common)?;
    operator_client(&config, &op.operator, op.coordinator.as_deref())
}

fn rpc_error(what: &str, status: tonic::Status) -> Error {
    let message = format!("{what}: {} ({:?})", status.message(), status.code());
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::NotFound | tonic::Code::FailedPrecondition => {
            Error::invalid_input(message)
        }
        tonic::Code::PermissionDenied => Error::Fatal(rollout_core::Fatal::PermissionDenied(message)),
        _ => Error::recoverable(rollout_core::Recoverable::Unavailable(message), rollout_core::RetryHint::Backoff),
    }
}

fn parse_job(text: &str) -> Result<JobId, Error> {
    text.parse::<JobId>()
        .or_else(|_| text.parse::<u64>().map(JobId))
        .map_err(|_| Error::invalid_input(format!("JOB: {text:?} is not a job id (e.g. 3 or job-3)")))
}

/// One line of a submit file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskLine {
    plugin: String,
    #[serde(default)]
    method: Option<String>,
    /// A string is sent as its UTF-8 bytes; any other JSON value as its JSON text.
    #[serde(default)]
    payload: serde_json::Value,
    #[serde(default)]
    gpus: u32,
    #[serde(default)]
    deadline_ms: u64,
    #[serde(default)]
    job: Option<String>,
}

pub async fn submit(op: &OperatorArgs, file: &Path, wait: bool) -> Result<(), Error> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::invalid_input(format!("{}: cannot read: {e}", file.display())))?;
    let default_name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "job".into());
    let mut jobs: BTreeMap<String, (Vec<pb::TaskSpec>, String)> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let task: TaskLine = serde_json::from_str(line)
            .map_err(|e| Error::invalid_input(format!("{}:{}: {e}", file.display(), i + 1)))?;
        let payload = match task.payload {
            serde_json::Value::Null => Vec::new(),
            serde_json::Value::String(s) => s.into_bytes(),
            other => other.to_string().into_bytes(),
        };
        let entry = jobs.entry(task.job.unwrap_or_else(|| default_name.clone())).or_default();
        entry.0.push(pb::TaskSpec {
            plugin: task.plugin,
            method: task.method.unwrap_or_else(|| "run".into()),
            payload,
            gpus: task.gpus,
            deadline_ms: task.deadline_ms,
        });
        entry.1.push_str(line);
        entry.1.push('\n');
    }
    if jobs.is_empty() {
        return Err(Error::invalid_input(format!("{}: no tasks (one JSON object per line)", file.display())));
    }
    let mut client = client(op)?;
    let mut accepted = Vec::new();
    for (name, (tasks, lines)) in jobs {
        let key = ContentId::of(format!("{name}\n{lines}").as_bytes()).to_hex();
        let request = pb::SubmitJobRequest { name: name.clone(), tasks, idempotency_key: key };
        let reply = client.submit_job(request).await.map_err(|s| rpc_error(&format!("submitting job {name:?}"), s))?;
        let reply = reply.into_inner();
        println!("{} ({name}): {} tasks queued", JobId(reply.job), reply.tasks);
        accepted.push(reply);
    }
    if !wait {
        return Ok(());
    }
    let total: u64 = accepted.iter().map(|a| u64::from(a.tasks)).sum();
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} tasks finished {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    loop {
        let status = client.status(pb::StatusRequest {}).await.map_err(|s| rpc_error("status", s))?.into_inner();
        let mine: Vec<&pb::JobStatus> =
            status.jobs.iter().filter(|j| accepted.iter().any(|a| a.job == j.job)).collect();
        let finished: u64 = mine.iter().map(|j| u64::from(j.committed + j.dead_lettered + j.cancelled)).sum();
        let (dead, leased): (u32, u32) = mine.iter().fold((0, 0), |(d, l), j| (d + j.dead_lettered, l + j.leased));
        bar.set_position(finished);
        bar.set_message(format!("({leased} running, {dead} dead-lettered)"));
        if finished >= total {
            bar.finish();
            for j in mine {
                println!(
                    "{}: {} committed, {} dead-lettered, {} cancelled of {}",
                    JobId(j.job),
                    j.committed,
                    j.dead_lettered,
                    j.cancelled,
                    j.tasks
                );
            }
            return Ok(());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn ago(now: SystemTime, unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".into();
    }
    let at = from_unix_millis(unix_ms);
    match now.duration_since(at) {
        Ok(d) => format!("{:.1}s ago", d.as_secs_f64()),
        Err(e) => format!("in {:.1}s", e.duration().as_secs_f64()),
    }
}

fn worker_state(state: i32) -> &'static str {
    match pb::WorkerState::try_from(state) {
        Ok(pb::WorkerState::Active) => "active",
        Ok(pb::WorkerState::Draining) => "draining",
        Ok(pb::WorkerState::Failed) => "failed",
        _ => "unknown",
    }
}

pub async fn status(op: &OperatorArgs, json: bool) -> Result<(), Error> {
    let mut client = client(op)?;
    let status = client.status(pb::StatusRequest {}).await.map_err(|s| rpc_error("status", s))?.into_inner();
    if json {
        let value = serde_json::json!({
            "workers": status.workers.iter().map(|w| serde_json::json!({
                "worker_id": w.worker_id, "incarnation": w.incarnation, "state": worker_state(w.state),
                "last_beat_unix_ms": w.last_beat_unix_ms, "due_at_unix_ms": w.due_at_unix_ms,
                "slots": w.slots, "running": w.running, "plugins": w.plugins,
                "cpus": w.inventory.as_ref().map(|i| i.cpus),
                "memory_bytes": w.inventory.as_ref().map(|i| i.memory_bytes),
                "gpus": w.inventory.as_ref().map(|i| i.gpus.len()),
            })).collect::<Vec<_>>(),
            "jobs": status.jobs.iter().map(|j| serde_json::json!({
                "job": j.job, "name": j.name, "tasks": j.tasks, "queued": j.queued, "leased": j.leased,
                "committed": j.committed, "dead_lettered": j.dead_lettered, "cancelled": j.cancelled,
            })).collect::<Vec<_>>(),
            "latencies": status.latencies.iter().map(|l| serde_json::json!({
                "plugin": l.plugin, "count": l.count, "p50_us": l.p50_us, "p90_us": l.p90_us,
                "p99_us": l.p99_us, "max_us": l.max_us,
            })).collect::<Vec<_>>(),
        });
        println!("{value:#}");
        return Ok(());
    }
    let now = SystemTime::now();
    println!("WORKERS");
    println!(
        "  {:<20} {:<9} {:>6} {:>12} {:>12} {:>9} {:>5} {:>8} {:>4}  plugins",
        "id", "state", "inc", "last beat", "due", "running", "cpus", "mem GiB", "gpus"
    );
    for w in &status.workers {
        let inv = w.inventory.clone().unwrap_or_default();
        println!(
            "  {:<20} {:<9} {:>6} {:>12} {:>12} {:>5}/{:<3} {:>5} {:>8.1} {:>4}  {}",
            w.worker_id,
            worker_state(w.state),
            w.incarnation,
            ago(now, w.last_beat_unix_ms),
            ago(now, w.due_at_unix_ms),
            w.running,
            w.slots,
            inv.cpus,
            inv.memory_bytes as f64 / (1u64 << 30) as f64,
            inv.gpus.len(),
            w.plugins.join(","),
        );
    }
    println!("JOBS");
    println!(
        "  {:<10} {:<20} {:>8} {:>8} {:>8} {:>10} {:>6} {:>9}  progress",
        "job", "name", "tasks", "queued", "leased", "committed", "dead", "cancelled"
    );
    for j in &status.jobs {
        let done = j.committed + j.dead_lettered + j.cancelled;
        let pct = if j.tasks == 0 { 100.0 } else { f64::from(done) * 100.0 / f64::from(j.tasks) };
        println!(
            "  {:<10} {:<20} {:>8} {:>8} {:>8} {:>10} {:>6} {:>9}  {pct:.0}%",
            JobId(j.job).to_string(),
            j.name,
            j.tasks,
            j.queued,
            j.leased,
            j.committed,
            j.dead_lettered,
            j.cancelled
        );
    }
    println!("TASK LATENCY (merged across workers)");
    if status.latencies.is_empty() {
        println!("  none yet (workers ship latency histograms with their beats, every few seconds)");
    }
    for l in &status.latencies {
        println!(
            "  {:<20} n={:<8} p50={}us p90={}us p99={}us max={}us",
            l.plugin, l.count, l.p50_us, l.p90_us, l.p99_us, l.max_us
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct ResultLine {
    task: String,
    state: &'static str,
    attempts: u32,
    content_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result_hex: Option<String>,
    errors: Vec<String>,
}

pub async fn results(op: &OperatorArgs, job: &str, bytes: bool) -> Result<(), Error> {
    let job = parse_job(job)?;
    let mut client = client(op)?;
    let request = pb::ResultsRequest { job: job.get(), include_bytes: bytes };
    let mut stream = client.results(request).await.map_err(|s| rpc_error("results", s))?.into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(r) = stream.message().await.map_err(|s| rpc_error("results", s))? {
        let task = rollout_transport::service::task_of(&r).map_err(Error::from)?;
        let state = match pb::TaskState::try_from(r.state) {
            Ok(pb::TaskState::Queued) => "queued",
            Ok(pb::TaskState::Leased) => "leased",
            Ok(pb::TaskState::Committed) => "committed",
            Ok(pb::TaskState::DeadLettered) => "dead_lettered",
            Ok(pb::TaskState::Cancelled) => "cancelled",
            _ => "unknown",
        };
        let committed = state == "committed";
        let (result, result_hex) = match (bytes && committed, String::from_utf8(r.result.clone())) {
            (false, _) => (None, None),
            (true, Ok(text)) => (Some(text), None),
            (true, Err(_)) => (None, Some(hex::encode(&r.result))),
        };
        let line = ResultLine {
            task: task.to_string(),
            state,
            attempts: r.attempts,
            content_id: (!r.content_id.is_empty()).then(|| hex::encode(&r.content_id)),
            result,
            result_hex,
            errors: r.errors,
        };
        let text = serde_json::to_string(&line).map_err(|e| Error::internal(e.to_string()))?;
        // A closed pipe (`| head`) ends the listing quietly.
        if writeln!(out, "{text}").is_err() {
            return Ok(());
        }
    }
    Ok(())
}

pub async fn cancel(op: &OperatorArgs, job: &str) -> Result<(), Error> {
    let job = parse_job(job)?;
    let mut client = client(op)?;
    let reply = client.cancel_job(pb::CancelJobRequest { job: job.get() }).await.map_err(|s| rpc_error("cancel", s))?;
    println!("{job}: {} tasks cancelled", reply.into_inner().cancelled);
    Ok(())
}

pub async fn drain(op: &OperatorArgs, worker: &str) -> Result<(), Error> {
    let mut client = client(op)?;
    client.drain(pb::DrainRequest { worker_id: worker.to_owned() }).await.map_err(|s| rpc_error("drain", s))?;
    println!("{worker}: draining (finishes running tasks, takes no new ones)");
    Ok(())
}

/// Opens the coordinator's database named by the config (which must exist).
fn open_database(common: &CommonArgs) -> Result<(RedbStorage, std::path::PathBuf), Error> {
    let config = load_config(common)?;
    let path = config.storage.data_dir.join(rollout_transport::server::DATABASE_FILE);
    if !path.exists() {
        return Err(Error::invalid_input(format!("{}: no database here (storage.data_dir)", path.display())));
    }
    Ok((RedbStorage::open(&path)?, path))
}

pub fn audit_verify(common: &CommonArgs) -> Result<(), Error> {
    let (storage, path) = open_database(common)?;
    let entries = rollout_coordinator::audit::verify(&storage)?;
    println!("audit chain of {} verifies: {entries} entries", path.display());
    Ok(())
}

pub fn audit_export(common: &CommonArgs, out: Option<&Path>) -> Result<(), Error> {
    let (storage, path) = open_database(common)?;
    let records = rollout_coordinator::audit::history(&storage)?;
    let mut text = String::new();
    for record in &records {
        let line = serde_json::to_string(record)
            .map_err(|e| Error::internal(format!("encoding history record {}: {e}", record.seq)))?;
        text.push_str(&line);
        text.push('\n');
    }
    let count = records.len();
    match out {
        Some(file) => {
            std::fs::write(file, text)
                .map_err(|e| Error::invalid_input(format!("{}: cannot write: {e}", file.display())))?;
            eprintln!(
                "{count} history records from the audit chain of {} written to {}",
                path.display(),
                file.display()
            );
        }
        None => std::io::stdout()
            .write_all(text.as_bytes())
            .map_err(|e| Error::internal(format!("writing to standard output: {e}")))?,
    }
    Ok(())
}
