//! Operator commands: `submit`, `status`, `results`, `cancel`, `drain`, `audit verify`.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use indicatif::{ProgressBar, ProgressStyle};
use rollout_core::time::from_unix_millis;
use rollout_core::{Error, JobId};
use rollout_proto::transport as pb;
use rollout_proto::transport::operator_client::OperatorClient;
use rollout_storage::RedbStorage;
use rollout_transport::operator_client;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use crate::{CommonArgs, OperatorArgs, load_config};

/// How often `submit` polls progress while waiting, at most; at first more often
/// ([`poll_interval`]), so a short job is not reported up to this much late.
const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// How often `submit` polls at first.
const POLL_INTERVAL_MIN: Duration = Duration::from_millis(5);

/// The wait before the next progress poll, `waited` into the wait: a twentieth of it,
/// between [`POLL_INTERVAL_MIN`] and [`POLL_INTERVAL`], so the end of a job is seen
/// within about 5% of its run time and a long job costs 5 status calls a second.
fn poll_interval(waited: Duration) -> Duration {
    (waited / 20).clamp(POLL_INTERVAL_MIN, POLL_INTERVAL)
}

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

pub fn parse_job(text: &str) -> Result<JobId, Error> {
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
    /// Content ids (64 hex digits, as `rollout blob put` prints) of blobs the task reads.
    #[serde(default)]
    inputs: Vec<String>,
}

/// Most distinct `"job"` labels one submit file may use (each is a job open at once).
const JOBS_PER_FILE_MAX: usize = 64;
/// Task bytes buffered for appends, over every job of the file, before the fullest
/// buffer is sent.
const BUFFERED_BYTES_MAX: usize = 16 << 20;
/// Most tasks in one AppendTasks message.
const TASKS_PER_APPEND_MAX: usize = 16_384;
/// How long a submit keeps retrying a coordinator that is unreachable or restarting.
const RETRY_FOR: Duration = Duration::from_secs(30);

/// What the first pass learns of one job of the file.
struct JobPlan {
    tasks: u32,
    /// Lines of the job, with the name first: its idempotency key.
    hash: sha2::Sha256,
    first_line: usize,
}

/// Reads a submit file line by line, each bounded (`limit` bytes), naming file and line.
struct Lines {
    reader: std::io::BufReader<std::fs::File>,
    path: std::path::PathBuf,
    number: usize,
    limit: usize,
    buf: Vec<u8>,
}

impl Lines {
    fn open(path: &Path, limit: usize) -> Result<Self, Error> {
        let file = std::fs::File::open(path)
            .map_err(|e| Error::invalid_input(format!("{}: cannot read: {e}", path.display())))?;
        Ok(Lines { reader: std::io::BufReader::new(file), path: path.to_owned(), number: 0, limit, buf: Vec::new() })
    }

    /// The next line that is not blank, with its number; `None` at the end.
    fn next(&mut self) -> Result<Option<(usize, &str)>, Error> {
        use std::io::{BufRead, Read};
        loop {
            self.buf.clear();
            self.number += 1;
            let read =
                (&mut self.reader).take(self.limit as u64 + 1).read_until(b'\n', &mut self.buf).map_err(|e| {
                    Error::invalid_input(format!("{}:{}: cannot read: {e}", self.path.display(), self.number))
                })?;
            if read == 0 {
                return Ok(None);
            }
            if self.buf.len() > self.limit {
                return Err(Error::invalid_input(format!(
                    "{}:{}: the line is longer than {} bytes (a task's payload is at most limits.max_payload_bytes)",
                    self.path.display(),
                    self.number,
                    self.limit
                )));
            }
            while matches!(self.buf.last(), Some(b'\n' | b'\r')) {
                self.buf.pop();
            }
            if self.buf.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let text = std::str::from_utf8(&self.buf)
                .map_err(|_| Error::invalid_input(format!("{}:{}: not UTF-8", self.path.display(), self.number)))?;
            return Ok(Some((self.number, text)));
        }
    }
}

/// A line as the wire task it describes, checked against the local limits (the
/// coordinator checks again); errors name the file and line.
fn parse_task(path: &Path, number: usize, line: &str, max_payload_bytes: u32) -> Result<(TaskLine, Vec<u8>), Error> {
    let mut task: TaskLine =
        serde_json::from_str(line).map_err(|e| Error::invalid_input(format!("{}:{number}: {e}", path.display())))?;
    let payload = match std::mem::take(&mut task.payload) {
        serde_json::Value::Null => Vec::new(),
        serde_json::Value::String(s) => s.into_bytes(),
        other => other.to_string().into_bytes(),
    };
    let fail = |what: String| Err(Error::invalid_input(format!("{}:{number}: {what}", path.display())));
    if task.plugin.trim().is_empty() {
        return fail("plugin: must name a plugin".into());
    }
    let method_len = task.method.as_deref().map_or(0, str::len);
    if task.plugin.len() > rollout_transport::wire::NAME_BYTES_MAX
        || method_len > rollout_transport::wire::NAME_BYTES_MAX
    {
        return fail(format!("plugin and method names are at most {} bytes", rollout_transport::wire::NAME_BYTES_MAX));
    }
    if payload.len() > max_payload_bytes as usize {
        return fail(format!("payload: {} bytes exceed limits.max_payload_bytes ({max_payload_bytes})", payload.len()));
    }
    for (i, id) in task.inputs.iter().enumerate() {
        if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return fail(format!(
                "inputs[{i}]: {id:?} is not a content id (64 hex digits, as `rollout blob put` prints)"
            ));
        }
    }
    Ok((task, payload))
}

/// Retries `call` while the coordinator is unreachable or restarting (jittered,
/// doubling delays, for [`RETRY_FOR`]); every other answer is final.
async fn retrying<T, F, Fut>(what: &str, mut call: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(s)
                if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled)
                    && started.elapsed() < RETRY_FOR =>
            {
                let jitter = Duration::from_millis(u64::from(started.elapsed().subsec_nanos() % 100));
                tokio::time::sleep(delay + jitter).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(s) => return Err(rpc_error(what, s)),
        }
    }
}

/// `rollout submit FILE`: two passes over the file, so memory stays bounded however
/// many tasks it holds. The first checks every line and learns each job's task count
/// and idempotency key (a hash of its name and lines); the second streams each job's
/// tasks in batches (OpenJob, AppendTasks..., SealJob), resuming where an earlier,
/// interrupted run of the same file stopped. A job small enough for one message goes
/// as one SubmitJob.
pub async fn submit(op: &OperatorArgs, file: &Path, wait: bool, json: bool) -> Result<(), Error> {
    use sha2::Digest;
    let config = load_config(&op.common)?;
    let limits = config.limits;
    // A JSON string may escape every byte as \u00XX: six bytes per payload byte.
    let line_limit = (limits.max_payload_bytes as usize).saturating_mul(6).saturating_add(64 * 1024);
    let default_name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "job".into());

    // Pass 1: check, count, hash.
    let reading = spinner(&format!("reading {}", file.display()));
    let mut plans: BTreeMap<String, JobPlan> = BTreeMap::new();
    let mut lines = Lines::open(file, line_limit)?;
    let mut payload_bytes: BTreeMap<String, u64> = BTreeMap::new();
    while let Some((number, line)) = lines.next()? {
        let (task, payload) = parse_task(file, number, line, limits.max_payload_bytes)?;
        let name = task.job.clone().unwrap_or_else(|| default_name.clone());
        if !plans.contains_key(&name) && plans.len() == JOBS_PER_FILE_MAX {
            return Err(Error::invalid_input(format!(
                "{}:{number}: a submit file may hold at most {JOBS_PER_FILE_MAX} jobs (\"job\" labels)",
                file.display()
            )));
        }
        let plan = plans.entry(name.clone()).or_insert_with(|| {
            let mut hash = sha2::Sha256::new();
            hash.update(name.as_bytes());
            hash.update(b"\n");
            JobPlan { tasks: 0, hash, first_line: number }
        });
        if plan.tasks >= limits.max_tasks_per_job {
            return Err(Error::invalid_input(format!(
                "{}:{number}: job {name:?} has more than limits.max_tasks_per_job ({}) tasks",
                file.display(),
                limits.max_tasks_per_job
            )));
        }
        plan.tasks += 1;
        plan.hash.update(line.as_bytes());
        plan.hash.update(b"\n");
        *payload_bytes.entry(name).or_default() += payload.len() as u64;
        if number % 10_000 == 0 {
            reading.set_message(format!("reading {}: {number} lines", file.display()));
        }
    }
    reading.finish_and_clear();
    if plans.is_empty() {
        return Err(Error::invalid_input(format!("{}: no tasks (one JSON object per line)", file.display())));
    }

    // Open every job (or find it from an earlier run of the same file).
    let mut client = client(op)?;
    let mut open: BTreeMap<String, OpenJob> = BTreeMap::new();
    let mut accepted: Vec<pb::SubmitJobResponse> = Vec::new();
    let one_message = (limits.max_message_bytes as u64) / 2;
    for (name, plan) in plans {
        let key = hex::encode(plan.hash.finalize());
        let bytes = payload_bytes.get(&name).copied().unwrap_or(0);
        // Small enough for one message and for its buffer beside the other jobs': one SubmitJob.
        let small_bytes = one_message.min((BUFFERED_BYTES_MAX / JOBS_PER_FILE_MAX) as u64);
        let small = (plan.tasks as usize) <= TASKS_PER_APPEND_MAX && bytes + u64::from(plan.tasks) * 512 < small_bytes;
        let opened = if small {
            None
        } else {
            let request = pb::OpenJobRequest { name: name.clone(), idempotency_key: key.clone() };
            Some(
                retrying(&format!("opening job {name:?}"), || {
                    let (mut c, r) = (client.clone(), request.clone());
                    async move { c.open_job(r).await }
                })
                .await?
                .into_inner(),
            )
        };
        let resume_from = opened.as_ref().map_or(0, |o| o.tasks);
        let sealed = opened.as_ref().is_some_and(|o| o.sealed);
        open.insert(
            name.clone(),
            OpenJob {
                job: opened.as_ref().map(|o| o.job),
                key,
                tasks: plan.tasks,
                skip: resume_from,
                seen: 0,
                sealed,
                buffer: Vec::new(),
                buffered_bytes: 0,
                first_line: plan.first_line,
            },
        );
    }

    // Pass 2: stream the tasks.
    let total: u64 = open.values().map(|j| u64::from(j.tasks)).sum();
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} tasks sent {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let resumed: u64 = open.values().map(|j| u64::from(if j.sealed { j.tasks } else { j.skip })).sum();
    bar.set_position(resumed);
    let mut lines = Lines::open(file, line_limit)?;
    let mut buffered = 0usize;
    while let Some((number, line)) = lines.next()? {
        let (task, payload) = parse_task(file, number, line, limits.max_payload_bytes)?;
        let name = task.job.clone().unwrap_or_else(|| default_name.clone());
        let job = open.get_mut(&name).ok_or_else(|| {
            Error::invalid_input(format!("{}:{number}: the file changed while it was submitted", file.display()))
        })?;
        job.seen += 1;
        if job.sealed || job.seen <= job.skip {
            continue;
        }
        let spec = pb::TaskSpec {
            plugin: task.plugin,
            method: task.method.unwrap_or_else(|| "run".into()),
            payload,
            gpus: task.gpus,
            deadline_ms: task.deadline_ms,
            inputs: task.inputs.iter().filter_map(|id| hex::decode(id).ok()).collect(),
        };
        let size = spec.payload.len() + 512 + 34 * spec.inputs.len();
        job.buffered_bytes += size;
        buffered += size;
        job.buffer.push(spec);
        let batch_bytes = (limits.max_message_bytes as usize) / 2;
        if job.job.is_some() && (job.buffer.len() >= TASKS_PER_APPEND_MAX || job.buffered_bytes >= batch_bytes) {
            buffered -= job.buffered_bytes;
            let sent = job.buffer.len() as u64;
            job.append(&mut client, &name).await?;
            bar.inc(sent);
        }
        if buffered > BUFFERED_BYTES_MAX {
            // Many jobs, each with a little: send the fullest.
            if let Some((name, job)) =
                open.iter_mut().filter(|(_, j)| j.job.is_some()).max_by_key(|(_, j)| j.buffered_bytes)
            {
                buffered -= job.buffered_bytes;
                let sent = job.buffer.len() as u64;
                job.append(&mut client, name).await?;
                bar.inc(sent);
            }
        }
    }
    for (name, job) in &mut open {
        if job.seen != job.tasks {
            return Err(Error::invalid_input(format!(
                "{}: job {name:?} (from line {}) had {} tasks in the first pass and {} in the second: \
                 the file changed while it was submitted",
                file.display(),
                job.first_line,
                job.tasks,
                job.seen
            )));
        }
        let sent = job.buffer.len() as u64;
        let reply = match job.job {
            None => {
                // Small: the whole job in one message.
                let request = pb::SubmitJobRequest {
                    name: name.clone(),
                    tasks: std::mem::take(&mut job.buffer),
                    idempotency_key: job.key.clone(),
                };
                retrying(&format!("submitting job {name:?}"), || {
                    let (mut c, r) = (client.clone(), request.clone());
                    async move { c.submit_job(r).await }
                })
                .await?
                .into_inner()
            }
            Some(id) => {
                job.append(&mut client, name).await?;
                let request = pb::SealJobRequest { job: id, tasks: job.tasks };
                retrying(&format!("sealing job {name:?} ({})", JobId(id)), || {
                    let (mut c, r) = (client.clone(), request);
                    async move { c.seal_job(r).await }
                })
                .await?
                .into_inner()
            }
        };
        bar.inc(sent);
        accepted.push(reply);
        bar.suspend(|| {
            if json {
                let line = serde_json::json!({
                    "event": "queued",
                    "job": JobId(reply.job).to_string(),
                    "id": reply.job,
                    "name": name,
                    "tasks": reply.tasks,
                    "existing": reply.existing,
                });
                println!("{line}");
            } else {
                let note = if reply.existing { " (already queued by an earlier submit of this file)" } else { "" };
                println!("{} ({name}): {} tasks queued{note}", JobId(reply.job), reply.tasks);
            }
        });
    }
    bar.finish_and_clear();
    if !wait {
        return Ok(());
    }
    wait_for_jobs(&mut client, &accepted, json).await
}

/// A job of the file in the second pass.
struct OpenJob {
    /// Its id, once opened (`None`: small, goes as one SubmitJob at the end).
    job: Option<u64>,
    key: String,
    /// Tasks in the file.
    tasks: u32,
    /// Tasks the coordinator already holds (from an interrupted run): not sent again.
    skip: u32,
    /// Tasks of this job read so far in the second pass.
    seen: u32,
    sealed: bool,
    buffer: Vec<pb::TaskSpec>,
    buffered_bytes: usize,
    first_line: usize,
}

impl OpenJob {
    /// Appends the buffered tasks (from the index after those sent before).
    async fn append(&mut self, client: &mut OperatorClient<Channel>, name: &str) -> Result<(), Error> {
        let Some(job) = self.job else { return Ok(()) };
        if self.buffer.is_empty() {
            return Ok(());
        }
        let tasks = std::mem::take(&mut self.buffer);
        let first_index = self.seen - tasks.len() as u32;
        let request = pb::AppendTasksRequest { job, first_index, tasks };
        retrying(&format!("appending tasks {first_index}.. to job {name:?} ({})", JobId(job)), || {
            let (mut c, r) = (client.clone(), request.clone());
            async move { c.append_tasks(r).await }
        })
        .await?;
        self.buffered_bytes = 0;
        Ok(())
    }
}

fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Polls until every accepted job has finished, with a progress bar.
async fn wait_for_jobs(
    client: &mut OperatorClient<Channel>,
    accepted: &[pb::SubmitJobResponse],
    json: bool,
) -> Result<(), Error> {
    let total: u64 = accepted.iter().map(|a| u64::from(a.tasks)).sum();
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} tasks finished {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let started = tokio::time::Instant::now();
    loop {
        let mut mine = Vec::new();
        for a in accepted {
            let request = pb::StatusRequest {
                jobs_view: pb::JobsView::One.into(),
                job: a.job,
                jobs_only: true,
                ..Default::default()
            };
            let status = retrying("status", || {
                let (mut c, r) = (client.clone(), request.clone());
                async move { c.status(r).await }
            })
            .await?
            .into_inner();
            mine.extend(status.jobs);
        }
        let finished: u64 = mine.iter().map(|j| u64::from(j.committed + j.dead_lettered + j.cancelled)).sum();
        let (dead, leased): (u32, u32) = mine.iter().fold((0, 0), |(d, l), j| (d + j.dead_lettered, l + j.leased));
        bar.set_position(finished);
        bar.set_message(format!("({leased} running, {dead} dead-lettered)"));
        if finished >= total {
            bar.finish();
            for j in mine {
                if json {
                    let line = serde_json::json!({
                        "event": "finished",
                        "job": JobId(j.job).to_string(),
                        "committed": j.committed,
                        "dead_lettered": j.dead_lettered,
                        "cancelled": j.cancelled,
                        "tasks": j.tasks,
                    });
                    println!("{line}");
                } else {
                    println!(
                        "{}: {} committed, {} dead-lettered, {} cancelled of {}",
                        JobId(j.job),
                        j.committed,
                        j.dead_lettered,
                        j.cancelled,
                        j.tasks
                    );
                }
            }
            return Ok(());
        }
        tokio::time::sleep(poll_interval(started.elapsed())).await;
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

fn job_phase(phase: i32) -> &'static str {
    match pb::JobPhase::try_from(phase) {
        Ok(pb::JobPhase::Open) => "open",
        Ok(pb::JobPhase::Active) => "active",
        Ok(pb::JobPhase::Finished) => "finished",
        _ => "unknown",
    }
}

/// What `rollout status` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusView {
    /// Open and active jobs and the `recent` most recently finished (one page).
    Current {
        /// Finished jobs to show.
        recent: u32,
    },
    /// Every worker and every job kept, page after page.
    All,
    /// One job.
    Job(JobId),
}

/// One status RPC per page; `All` walks every page.
async fn status_pages(client: &mut OperatorClient<Channel>, view: StatusView) -> Result<pb::StatusResponse, Error> {
    let mut request = match view {
        StatusView::Current { recent } => {
            pb::StatusRequest { jobs_view: pb::JobsView::Current.into(), recent_finished: recent, ..Default::default() }
        }
        StatusView::All => pb::StatusRequest { jobs_view: pb::JobsView::All.into(), ..Default::default() },
        StatusView::Job(job) => {
            pb::StatusRequest { jobs_view: pb::JobsView::One.into(), job: job.get(), ..Default::default() }
        }
    };
    let mut all = retrying("status", || {
        let (mut c, r) = (client.clone(), request.clone());
        async move { c.status(r).await }
    })
    .await?
    .into_inner();
    while view == StatusView::All && (all.workers_more || all.jobs_more) {
        // Each list goes on from where it stopped; a finished one asks for (almost) nothing.
        request.workers_after = all.workers.last().map(|w| w.worker_id.clone()).unwrap_or_default();
        request.workers_max = if all.workers_more { 0 } else { 1 };
        request.jobs_from = if all.jobs_more { all.jobs.last().map_or(0, |j| j.job + 1) } else { u64::MAX };
        let page = retrying("status", || {
            let (mut c, r) = (client.clone(), request.clone());
            async move { c.status(r).await }
        })
        .await?
        .into_inner();
        if all.workers_more {
            all.workers.extend(page.workers);
            all.workers_more = page.workers_more;
        }
        if all.jobs_more {
            all.jobs.extend(page.jobs);
            all.jobs_more = page.jobs_more;
        }
        all.totals = page.totals;
    }
    Ok(all)
}

/// Time left on a worker's certificate: `6.9d`, `5h`, `expired`, `-` (not known).
fn cert_text(now: SystemTime, not_after_unix_ms: u64) -> String {
    if not_after_unix_ms == 0 {
        return "-".into();
    }
    let now_ms = rollout_core::time::unix_millis(now);
    if not_after_unix_ms <= now_ms {
        return "expired".into();
    }
    let left_h = (not_after_unix_ms - now_ms) as f64 / 3_600_000.0;
    if left_h >= 48.0 { format!("{:.1}d", left_h / 24.0) } else { format!("{left_h:.0}h") }
}

fn offset_text(w: &pb::WorkerStatus) -> String {
    if !w.clock_offset_known {
        return "-".into();
    }
    let ms = w.clock_offset_ms;
    if ms.unsigned_abs() >= 10_000 { format!("{:+.1}s", ms as f64 / 1000.0) } else { format!("{ms:+}ms") }
}

pub async fn status(op: &OperatorArgs, json: bool, view: StatusView) -> Result<(), Error> {
    let mut client = client(op)?;
    let status = status_pages(&mut client, view).await?;
    let totals = status.totals.unwrap_or_default();
    if json {
        let value = serde_json::json!({
            "totals": {
                "workers_active": totals.workers_active, "workers_draining": totals.workers_draining,
                "workers_failed": totals.workers_failed, "jobs_open": totals.jobs_open,
                "jobs_active": totals.jobs_active, "jobs_finished": totals.jobs_finished,
                "tasks_queued": totals.tasks_queued, "tasks_leased": totals.tasks_leased,
                "tasks_committed": totals.tasks_committed, "tasks_dead_lettered": totals.tasks_dead_lettered,
                "tasks_cancelled": totals.tasks_cancelled, "job_retention_ms": status.job_retention_ms,
            },
            "workers": status.workers.iter().map(|w| serde_json::json!({
                "worker_id": w.worker_id, "incarnation": w.incarnation, "state": worker_state(w.state),
                "last_beat_unix_ms": w.last_beat_unix_ms, "due_at_unix_ms": w.due_at_unix_ms,
                "clock_offset_ms": w.clock_offset_known.then_some(w.clock_offset_ms),
                "cert_not_after_unix_ms": (w.cert_not_after_unix_ms > 0).then_some(w.cert_not_after_unix_ms),
                "cert_serial": (!w.cert_serial.is_empty()).then_some(&w.cert_serial),
                "slots": w.slots, "running": w.running, "plugins": w.plugins,
                "cpus": w.inventory.as_ref().map(|i| i.cpus),
                "memory_bytes": w.inventory.as_ref().map(|i| i.memory_bytes),
                "gpus": w.inventory.as_ref().map(|i| i.gpus.len()),
            })).collect::<Vec<_>>(),
            "workers_more": status.workers_more,
            "jobs": status.jobs.iter().map(|j| serde_json::json!({
                "job": j.job, "name": j.name, "phase": job_phase(j.phase), "tasks": j.tasks, "queued": j.queued,
                "leased": j.leased, "committed": j.committed, "dead_lettered": j.dead_lettered,
                "cancelled": j.cancelled,
                "finished_at_unix_ms": (j.finished_at_unix_ms > 0).then_some(j.finished_at_unix_ms),
            })).collect::<Vec<_>>(),
            "jobs_more": status.jobs_more,
            "latencies": status.latencies.iter().map(|l| serde_json::json!({
                "plugin": l.plugin, "count": l.count, "p50_us": l.p50_us, "p90_us": l.p90_us,
                "p99_us": l.p99_us, "max_us": l.max_us,
            })).collect::<Vec<_>>(),
            "plugin_restarts": status.plugin_restarts.iter().map(|p| serde_json::json!({
                "plugin": p.plugin, "count": p.count,
            })).collect::<Vec<_>>(),
        });
        println!("{value:#}");
        return Ok(());
    }
    let now = SystemTime::now();
    let retention = rollout_core::config::duration_text::format(Duration::from_millis(status.job_retention_ms));
    println!(
        "CLUSTER  workers: {} active, {} draining, {} failed   jobs: {} open, {} active, {} finished (kept {retention})   \
         tasks: {} queued, {} leased, {} committed, {} dead-lettered, {} cancelled",
        totals.workers_active,
        totals.workers_draining,
        totals.workers_failed,
        totals.jobs_open,
        totals.jobs_active,
        totals.jobs_finished,
        totals.tasks_queued,
        totals.tasks_leased,
        totals.tasks_committed,
        totals.tasks_dead_lettered,
        totals.tasks_cancelled,
    );
    println!("WORKERS");
    println!(
        "  {:<20} {:<9} {:>6} {:>12} {:>12} {:>8} {:>8} {:>9} {:>5} {:>8} {:>4}  plugins",
        "id", "state", "inc", "last beat", "due", "clock", "cert", "running", "cpus", "mem GiB", "gpus"
    );
    for w in &status.workers {
        let inv = w.inventory.clone().unwrap_or_default();
        println!(
            "  {:<20} {:<9} {:>6} {:>12} {:>12} {:>8} {:>8} {:>5}/{:<3} {:>5} {:>8.1} {:>4}  {}",
            w.worker_id,
            worker_state(w.state),
            w.incarnation,
            ago(now, w.last_beat_unix_ms),
            ago(now, w.due_at_unix_ms),
            offset_text(w),
            cert_text(now, w.cert_not_after_unix_ms),
            w.running,
            w.slots,
            inv.cpus,
            inv.memory_bytes as f64 / (1u64 << 30) as f64,
            inv.gpus.len(),
            w.plugins.join(","),
        );
    }
    if status.workers_more {
        println!("  ... more workers (rollout status --all lists every one)");
    }
    println!("JOBS");
    println!(
        "  {:<10} {:<20} {:<8} {:>8} {:>8} {:>8} {:>10} {:>6} {:>9}  progress",
        "job", "name", "phase", "tasks", "queued", "leased", "committed", "dead", "cancelled"
    );
    if let StatusView::Job(job) = view
        && status.jobs.is_empty()
    {
        println!("  {job} is not kept: unknown, or deleted after tasks.job_retention ({retention})");
    }
    for j in &status.jobs {
        let done = j.committed + j.dead_lettered + j.cancelled;
        let pct = if j.tasks == 0 { 100.0 } else { f64::from(done) * 100.0 / f64::from(j.tasks) };
        println!(
            "  {:<10} {:<20} {:<8} {:>8} {:>8} {:>8} {:>10} {:>6} {:>9}  {pct:.0}%",
            JobId(j.job).to_string(),
            j.name,
            job_phase(j.phase),
            j.tasks,
            j.queued,
            j.leased,
            j.committed,
            j.dead_lettered,
            j.cancelled
        );
    }
    if status.jobs_more {
        println!("  ... more jobs (rollout status --all lists every one kept)");
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
    if !status.plugin_restarts.is_empty() {
        println!("PLUGIN RESTARTS (sidecars started again after a crash or a kill, fleet-wide)");
        for p in &status.plugin_restarts {
            println!("  {:<20} {}", p.plugin, p.count);
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct ResultLine {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
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

pub async fn results(op: &OperatorArgs, job: &str, bytes: bool, from: u32) -> Result<(), Error> {
    let job = parse_job(job)?;
    let mut client = client(op)?;
    let request = pb::ResultsRequest { job: job.get(), include_bytes: bytes, from_index: from };
    let mut stream = client.results(request).await.map_err(|s| rpc_error("results", s))?.into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(r) = stream.message().await.map_err(|s| rpc_error("results", s))? {
        // A closed pipe (`| head`) ends the listing quietly.
        if writeln!(out, "{}", result_line(&r, bytes, None)?).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// `results --follow`: each task as it ends, resumed after the last seq printed when
/// the connection breaks (the coordinator restarting, say), with the reconnect backoff.
pub async fn follow(op: &OperatorArgs, job: &str, bytes: bool, after: u64) -> Result<(), Error> {
    let job = parse_job(job)?;
    let mut client = client(op)?;
    let mut out = std::io::stdout().lock();
    let mut cursor = after;
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        let request = pb::WatchResultsRequest { job: job.get(), after_seq: cursor, include_bytes: bytes };
        let mut stream = match client.watch_results(request).await {
            Ok(stream) => stream.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                continue;
            }
            Err(s) => return Err(rpc_error("results --follow", s)),
        };
        loop {
            match stream.message().await {
                Ok(Some(outcome)) => {
                    let Some(r) = &outcome.result else { continue };
                    if writeln!(out, "{}", result_line(r, bytes, Some(outcome.seq))?).is_err() {
                        return Ok(());
                    }
                    let _ = out.flush();
                    cursor = outcome.seq;
                    backoff = std::time::Duration::from_millis(100);
                }
                Ok(None) => return Ok(()),
                Err(s)
                    if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal) =>
                {
                    eprintln!("results --follow: the stream broke ({}); resuming after seq {cursor}", s.message());
                    tokio::time::sleep(backoff).await;
                    break;
                }
                Err(s) => return Err(rpc_error("results --follow", s)),
            }
        }
    }
}

/// A task's JSON line (with `seq` when following).
fn result_line(r: &pb::TaskResult, bytes: bool, seq: Option<u64>) -> Result<String, Error> {
    {
        let task = rollout_transport::service::task_of(r).map_err(Error::from)?;
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
            seq,
            task: task.to_string(),
            state,
            attempts: r.attempts,
            content_id: (!r.content_id.is_empty()).then(|| hex::encode(&r.content_id)),
            result,
            result_hex,
            errors: r.errors.clone(),
        };
        serde_json::to_string(&line).map_err(|e| Error::internal(e.to_string()))
    }
}

/// Bytes per PutBlob chunk.
const BLOB_CHUNK_BYTES: usize = 1024 * 1024;

pub async fn blob_put(op: &OperatorArgs, file: &Path, json: bool) -> Result<(), Error> {
    use std::io::Read;
    use std::sync::{Arc, Mutex};
    let mut client = client(op)?;
    let mut f =
        std::fs::File::open(file).map_err(|e| Error::invalid_input(format!("{}: cannot read: {e}", file.display())))?;
    let expected = f.metadata().map(|m| m.len()).ok();
    // Streamed: one chunk in memory at a time, read as the upload asks for it. A read
    // error ends the stream early; it is reported (the prefix sent is stored under its
    // own id, which nothing names).
    let failed: Arc<Mutex<Option<String>>> = Arc::default();
    let read_failed = Arc::clone(&failed);
    let chunks = std::iter::from_fn(move || {
        let mut buf = vec![0u8; BLOB_CHUNK_BYTES];
        let mut filled = 0;
        while filled < buf.len() {
            match f.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    *read_failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
                    return None;
                }
            }
        }
        (filled > 0).then(|| {
            buf.truncate(filled);
            pb::BlobChunk { data: buf }
        })
    });
    let info = client.put_blob(tokio_stream::iter(chunks)).await.map_err(|s| rpc_error("blob put", s))?.into_inner();
    if let Some(e) = failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
        return Err(Error::invalid_input(format!(
            "{}: read failed part way ({e}); the blob was not uploaded whole",
            file.display()
        )));
    }
    if expected.is_some_and(|n| n != info.size_bytes) {
        return Err(Error::invalid_input(format!(
            "{}: {} bytes uploaded but the file has {} (did it change during the upload?)",
            file.display(),
            info.size_bytes,
            expected.unwrap_or(0)
        )));
    }
    let id = hex::encode(&info.content_id);
    if json {
        println!("{}", serde_json::json!({"content_id": id, "size_bytes": info.size_bytes}));
    } else {
        println!("{id}");
        eprintln!("{}: {} bytes stored as blob {id}", file.display(), info.size_bytes);
    }
    Ok(())
}

pub async fn blob_ls(op: &OperatorArgs, json: bool) -> Result<(), Error> {
    let mut client = client(op)?;
    let blobs =
        client.list_blobs(pb::ListBlobsRequest {}).await.map_err(|s| rpc_error("blob ls", s))?.into_inner().blobs;
    if !json {
        println!("{:<64}  {:>14}  stored", "content id", "bytes");
    }
    for b in blobs {
        let id = hex::encode(&b.content_id);
        if json {
            println!(
                "{}",
                serde_json::json!({"content_id": id, "size_bytes": b.size_bytes, "created_unix_ms": b.created_unix_ms})
            );
        } else {
            let when = rollout_core::time::from_unix_millis(b.created_unix_ms);
            println!("{id}  {:>14}  {}", b.size_bytes, rollout_transport::enroll::utc_text(when));
        }
    }
    Ok(())
}

pub async fn blob_get(op: &OperatorArgs, id: &str, out: Option<&Path>) -> Result<(), Error> {
    let bytes = hex::decode(id)
        .ok()
        .filter(|b| b.len() == 32)
        .ok_or_else(|| Error::invalid_input(format!("blob id {id:?}: expected 64 hex digits (as blob put prints)")))?;
    let mut client = client(op)?;
    let mut stream = client
        .get_blob(pb::GetBlobRequest { content_id: bytes })
        .await
        .map_err(|s| rpc_error("blob get", s))?
        .into_inner();
    match out {
        Some(path) => {
            // Written beside the target and renamed once complete and verified.
            let tmp = path.with_extension("partial");
            let mut file = std::fs::File::create(&tmp)
                .map_err(|e| Error::invalid_input(format!("{}: cannot write: {e}", tmp.display())))?;
            while let Some(chunk) = stream.message().await.map_err(|s| rpc_error("blob get", s))? {
                file.write_all(&chunk.data)
                    .map_err(|e| Error::invalid_input(format!("{}: write failed: {e}", tmp.display())))?;
            }
            file.sync_all().map_err(|e| Error::invalid_input(format!("{}: sync failed: {e}", tmp.display())))?;
            std::fs::rename(&tmp, path)
                .map_err(|e| Error::invalid_input(format!("{}: rename failed: {e}", path.display())))?;
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            while let Some(chunk) = stream.message().await.map_err(|s| rpc_error("blob get", s))? {
                if stdout.write_all(&chunk.data).is_err() {
                    return Ok(());
                }
            }
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
    // With the config's log setting: a log the coordinator runs with stays on.
    let options = rollout_storage::OpenOptions {
        wal_bytes: config.storage.wal_bytes,
        cache_bytes: usize::try_from(config.storage.cache_bytes).unwrap_or(usize::MAX),
        check_integrity_on_open: config.storage.check_integrity_on_open,
    };
    Ok((RedbStorage::open_with(&path, options)?, path))
}

pub fn audit_verify(common: &CommonArgs, json: bool) -> Result<(), Error> {
    let (storage, path) = open_database(common)?;
    let entries = rollout_coordinator::audit::verify(&storage)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"database": path.display().to_string(), "verified": true, "entries": entries})
        );
    } else {
        println!("audit chain of {} verifies: {entries} entries", path.display());
    }
    Ok(())
}

pub fn audit_export(common: &CommonArgs, out: Option<&Path>) -> Result<(), Error> {
    use rollout_coordinator::audit;
    let (storage, path) = open_database(common)?;
    // Two passes over the chain, each a page at a time: verify, then write.
    audit::verify(&storage)?;
    let base = audit::base(&storage)?;
    let mut sink: Box<dyn Write> = match out {
        Some(file) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(file)
                .map_err(|e| Error::invalid_input(format!("{}: cannot write: {e}", file.display())))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut count = 0u64;
    audit::for_each_entry(&storage, |entry| {
        let record = audit::record_of(&entry)?;
        let line = serde_json::to_string(&record)
            .map_err(|e| Error::internal(format!("encoding history record {}: {e}", record.seq)))?;
        writeln!(sink, "{line}").map_err(|e| Error::internal(format!("writing the history: {e}")))?;
        count += 1;
        Ok(())
    })?;
    sink.flush().map_err(|e| Error::internal(format!("writing the history: {e}")))?;
    if let Some(file) = out {
        let from = if base.seq > 0 {
            format!(" (entries 1..={} were deleted by the retention, tasks.job_retention)", base.seq)
        } else {
            String::new()
        };
        eprintln!(
            "{count} history records from the audit chain of {} written to {}{from}",
            path.display(),
            file.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_polls_start_fast_and_settle_at_the_interval() {
        assert_eq!(poll_interval(Duration::ZERO), POLL_INTERVAL_MIN);
        assert_eq!(poll_interval(Duration::from_millis(1_000)), Duration::from_millis(50));
        assert_eq!(poll_interval(Duration::from_secs(3_600)), POLL_INTERVAL);
    }
}
