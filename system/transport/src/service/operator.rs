//! The `Operator` service: jobs, status, results, cancels and drains, for operator
//! certificates only.

use super::*;
use rollout_core::traits::ObjectStore as _;

pub(super) fn job_accepted(reply: OperatorReply) -> Result<Response<pb::SubmitJobResponse>, Status> {
    match reply {
        OperatorReply::JobAccepted { job, tasks, existing } => {
            tracing::info!(channel = "operator", %job, tasks, existing, "job accepted");
            Ok(Response::new(pb::SubmitJobResponse { job: job.get(), tasks, existing }))
        }
        OperatorReply::Rejected(e) => Err(rejected(e)),
        other => Err(Status::internal(format!("unexpected reply: {other:?}"))),
    }
}

#[tonic::async_trait]
impl pb::operator_server::Operator for CoordinatorApi {
    async fn submit_job(&self, req: Request<pb::SubmitJobRequest>) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let operator = authorize_operator(&req)?;
        let job = wire::job_from_wire(req.into_inner()).map_err(invalid)?;
        self.check_inputs(&job.tasks, 0).await?;
        let span = tracing::info_span!("rpc", channel = "operator", operator = %operator, op = "submit_job");
        async move { job_accepted(self.driver.operator(OperatorRequest::SubmitJob(job)).await.map_err(unavailable)?) }
            .instrument(span)
            .await
    }

    async fn open_job(&self, req: Request<pb::OpenJobRequest>) -> Result<Response<pb::OpenJobResponse>, Status> {
        let operator = authorize_operator(&req)?;
        let pb::OpenJobRequest { name, idempotency_key } = req.into_inner();
        wire::optional_text("open_job.name", name.clone()).map_err(invalid)?;
        let idempotency_key = wire::optional_text("open_job.idempotency_key", idempotency_key).map_err(invalid)?;
        match self.driver.operator(OperatorRequest::OpenJob { name, idempotency_key }).await.map_err(unavailable)? {
            OperatorReply::JobOpened { job, tasks, sealed, existing } => {
                tracing::info!(channel = "operator", %operator, %job, tasks, sealed, existing, "job opened");
                Ok(Response::new(pb::OpenJobResponse { job: job.get(), tasks, sealed, existing }))
            }
            OperatorReply::Rejected(e) => Err(rejected(e)),
            other => Err(Status::internal(format!("unexpected reply: {other:?}"))),
        }
    }

    async fn append_tasks(
        &self,
        req: Request<pb::AppendTasksRequest>,
    ) -> Result<Response<pb::AppendTasksResponse>, Status> {
        authorize_operator(&req)?;
        let pb::AppendTasksRequest { job, first_index, tasks } = req.into_inner();
        let tasks = wire::tasks_from_wire("append_tasks.tasks", tasks).map_err(invalid)?;
        self.check_inputs(&tasks, first_index as usize).await?;
        let request = OperatorRequest::AppendTasks { job: JobId(job), first_index, tasks };
        match self.driver.operator(request).await.map_err(unavailable)? {
            OperatorReply::TasksAppended { tasks, .. } => Ok(Response::new(pb::AppendTasksResponse { tasks })),
            OperatorReply::Rejected(e) => Err(rejected(e)),
            other => Err(Status::internal(format!("unexpected reply: {other:?}"))),
        }
    }

    async fn seal_job(&self, req: Request<pb::SealJobRequest>) -> Result<Response<pb::SubmitJobResponse>, Status> {
        authorize_operator(&req)?;
        let pb::SealJobRequest { job, tasks } = req.into_inner();
        job_accepted(
            self.driver.operator(OperatorRequest::SealJob { job: JobId(job), tasks }).await.map_err(unavailable)?,
        )
    }

    async fn cancel_job(&self, req: Request<pb::CancelJobRequest>) -> Result<Response<pb::CancelJobResponse>, Status> {
        authorize_operator(&req)?;
        let job = JobId(req.get_ref().job);
        match self.driver.operator(OperatorRequest::CancelJob(job)).await.map_err(unavailable)? {
            OperatorReply::Cancelled { tasks } => Ok(Response::new(pb::CancelJobResponse { cancelled: tasks })),
            OperatorReply::Rejected(e) => Err(rejected(e)),
            other => Err(Status::internal(format!("unexpected reply: {other:?}"))),
        }
    }

    async fn drain(&self, req: Request<pb::DrainRequest>) -> Result<Response<pb::DrainResponse>, Status> {
        authorize_operator(&req)?;
        let worker = rollout_proto::worker_id("drain.worker_id", &req.get_ref().worker_id).map_err(invalid)?;
        match self.driver.operator(OperatorRequest::Drain(worker)).await.map_err(unavailable)? {
            OperatorReply::Draining => Ok(Response::new(pb::DrainResponse {})),
            OperatorReply::Rejected(e) => Err(rejected(e)),
            other => Err(Status::internal(format!("unexpected reply: {other:?}"))),
        }
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        authorize_operator(&req)?;
        let req = req.into_inner();
        let jobs_only = req.jobs_only;
        let mut query = status_query(req).map_err(invalid)?;
        if jobs_only {
            query.workers_max = 0;
        }
        let page = self.driver.status(query).await.map_err(unavailable)?;
        let workers = page
            .workers
            .into_iter()
            .map(|w| {
                let cert = self.certs.of(&w.id);
                pb::WorkerStatus {
                    cert_not_after_unix_ms: cert.as_ref().map_or(0, |c| unix_millis(c.not_after)),
                    cert_serial: cert.map(|c| c.serial).unwrap_or_default(),
                    worker_id: w.id.to_string(),
                    incarnation: w.incarnation.get(),
                    state: match w.state {
                        WorkerState::Active => pb::WorkerState::Active,
                        WorkerState::Draining => pb::WorkerState::Draining,
                        WorkerState::Failed => pb::WorkerState::Failed,
                    }
                    .into(),
                    last_beat_unix_ms: w.last_beat.map(unix_millis).unwrap_or(0),
                    due_at_unix_ms: unix_millis(w.due_at),
                    slots: w.slots,
                    running: w.leased,
                    plugins: w.plugins,
                    inventory: Some(w.inventory.into()),
                    clock_offset_ms: w.clock_offset_ms.unwrap_or(0),
                    clock_offset_known: w.clock_offset_ms.is_some(),
                }
            })
            .collect();
        let jobs = page
            .jobs
            .into_iter()
            .map(|j| pb::JobStatus {
                job: j.job.get(),
                name: j.name,
                tasks: j.tasks,
                queued: j.queued,
                leased: j.leased,
                committed: j.committed,
                dead_lettered: j.dead_lettered,
                cancelled: j.cancelled,
                phase: match j.phase {
                    JobPhase::Open => pb::JobPhase::Open,
                    JobPhase::Active => pb::JobPhase::Active,
                    JobPhase::Finished => pb::JobPhase::Finished,
                }
                .into(),
                finished_at_unix_ms: j.finished_at.map(unix_millis).unwrap_or(0),
            })
            .collect();
        let latencies = if jobs_only { Vec::new() } else { page.latencies };
        let latencies = latencies
            .into_iter()
            .map(|l| pb::LatencySummary {
                plugin: l.plugin,
                count: l.count,
                p50_us: l.p50_us,
                p90_us: l.p90_us,
                p99_us: l.p99_us,
                max_us: l.max_us,
            })
            .collect();
        let plugin_restarts = if jobs_only { Vec::new() } else { page.plugin_restarts };
        let plugin_restarts =
            plugin_restarts.into_iter().map(|(plugin, count)| pb::PluginCount { plugin, count }).collect();
        let t = page.totals;
        let totals = pb::ClusterTotals {
            workers_active: t.workers_active,
            workers_draining: t.workers_draining,
            workers_failed: t.workers_failed,
            jobs_open: t.jobs_open,
            jobs_active: t.jobs_active,
            jobs_finished: t.jobs_finished,
            tasks_queued: t.tasks.queued.into(),
            tasks_leased: t.tasks.leased.into(),
            tasks_committed: t.tasks.committed.into(),
            tasks_dead_lettered: t.tasks.dead_lettered.into(),
            tasks_cancelled: t.tasks.cancelled.into(),
        };
        Ok(Response::new(pb::StatusResponse {
            workers,
            jobs,
            latencies,
            workers_more: page.workers_more,
            jobs_more: page.jobs_more,
            totals: Some(totals),
            job_retention_ms: self.job_retention_ms,
            plugin_restarts,
        }))
    }

    type ResultsStream = BoxStream<pb::TaskResult>;

    async fn results(&self, req: Request<pb::ResultsRequest>) -> Result<Response<Self::ResultsStream>, Status> {
        authorize_operator(&req)?;
        let pb::ResultsRequest { job, include_bytes, from_index } = req.into_inner();
        let stored = self.sealed_job(JobId(job)).await?;
        let results = self.results.clone();
        let (tx, rx) = mpsc::channel(256);
        // Served from storage (what is durable), never from the machine: a page of
        // task records at a time, on the blocking pool.
        tokio::task::spawn_blocking(move || {
            let mut from = from_index;
            while from < stored.tasks {
                let page = match stored_task_reports(&*results.storage, &stored, from, RESULTS_PAGE) {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(internal(e)));
                        return;
                    }
                };
                from += page.len() as u32;
                for r in page {
                    let item = task_result(r, include_bytes, &results);
                    let failed = item.is_err();
                    if tx.blocking_send(item).is_err() || failed {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(self.until_shutdown(ReceiverStream::new(rx))))
    }

    async fn put_blob(&self, req: Request<Streaming<pb::BlobChunk>>) -> Result<Response<pb::BlobInfo>, Status> {
        authorize_operator(&req)?;
        let store = self.blob_store()?;
        let limit = self.limits.max_blob_bytes;
        let mut inbound = req.into_inner();
        // The bytes go to the store on the blocking pool through a small bounded
        // channel: memory holds a few chunks, whatever the blob's size.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Option<Vec<u8>>>(BLOB_CHUNKS_QUEUED);
        let writer = tokio::task::spawn_blocking(move || {
            let mut reader = ChannelReader { rx, current: Vec::new(), at: 0 };
            let id = store.put_stream(&mut reader)?;
            let meta = store.meta(&id)?;
            Ok::<_, Error>(meta)
        });
        let mut total: u64 = 0;
        let mut refused = None;
        loop {
            match inbound.message().await {
                Ok(Some(chunk)) => {
                    total += chunk.data.len() as u64;
                    if total > limit {
                        refused = Some(Status::invalid_argument(format!(
                            "blob: more than limits.max_blob_bytes ({limit}) bytes; nothing was stored"
                        )));
                        break;
                    }
                    if tx.send(Some(chunk.data)).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(status) => {
                    refused = Some(Status::cancelled(format!("the upload broke after {total} bytes: {status}")));
                    break;
                }
            }
        }
        if let Some(status) = refused {
            // The end-of-upload mark is never sent: the reader fails, the store
            // deletes the upload's tmp file, and nothing is stored.
            drop(tx);
            let _ = writer.await;
            return Err(status);
        }
        let _ = tx.send(None);
        drop(tx);
        let meta = writer.await.map_err(|e| Status::internal(format!("storing the blob: {e}")))?.map_err(internal)?;
        tracing::info!(channel = "operator", event = "blob_stored", content_id = %meta.content_id,
            size_bytes = meta.size_bytes, "blob stored");
        Ok(Response::new(blob_info(&meta)))
    }

    type GetBlobStream = BoxStream<pb::BlobChunk>;

    async fn get_blob(&self, req: Request<pb::GetBlobRequest>) -> Result<Response<Self::GetBlobStream>, Status> {
        authorize_operator(&req)?;
        self.blob_stream("get_blob.content_id", &req.get_ref().content_id)
    }

    async fn list_blobs(&self, req: Request<pb::ListBlobsRequest>) -> Result<Response<pb::ListBlobsResponse>, Status> {
        authorize_operator(&req)?;
        let store = self.blob_store()?;
        let metas = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|e| Status::internal(format!("listing blobs: {e}")))?
            .map_err(internal)?;
        Ok(Response::new(pb::ListBlobsResponse { blobs: metas.iter().map(blob_info).collect() }))
    }

    type WatchResultsStream = BoxStream<pb::TaskOutcome>;

    async fn watch_results(
        &self,
        req: Request<pb::WatchResultsRequest>,
    ) -> Result<Response<Self::WatchResultsStream>, Status> {
        authorize_operator(&req)?;
        let pb::WatchResultsRequest { job, after_seq, include_bytes } = req.into_inner();
        let job = JobId(job);
        let stored = self.sealed_job(job).await?;
        let (results, driver) = (self.results.clone(), self.driver.clone());
        let mut ended = self.driver.tasks_ended.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut cursor = after_seq;
            // Set once the job was seen finished: the next pass that catches up is the last.
            let mut last_pass = false;
            loop {
                // Seen before reading: a batch released during the read wakes the wait.
                ended.borrow_and_update();
                let (storage, stored_now, results_now) =
                    (Arc::clone(&results.storage), stored.clone(), results.clone());
                let read = tokio::task::spawn_blocking(move || {
                    outcomes_after(&*storage, &stored_now, cursor, include_bytes, &results_now)
                })
                .await;
                let (outcomes, next, caught_up) = match read {
                    Ok(Ok(read)) => read,
                    Ok(Err(status)) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(format!("reading the audit chain: {e}")))).await;
                        return;
                    }
                };
                cursor = next;
                for outcome in outcomes {
                    if tx.send(Ok(outcome)).await.is_err() {
                        return;
                    }
                }
                if !caught_up {
                    continue;
                }
                if last_pass {
                    return;
                }
                // Caught up: a finished job's last ends were durable before the status
                // answered, so one more pass reads them all, then the stream ends.
                let query =
                    StatusQuery { workers_max: 0, jobs: JobsQuery::One(job), jobs_max: 1, ..StatusQuery::default() };
                let finished = match driver.status(query).await {
                    Ok(page) => page.jobs.iter().find(|j| j.job == job).is_none_or(|j| j.phase == JobPhase::Finished),
                    Err(_) => return,
                };
                if finished {
                    last_pass = true;
                    continue;
                }
                tokio::select! {
                    changed = ended.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(WATCH_RECHECK) => {}
                }
            }
        });
        Ok(Response::new(self.until_shutdown(ReceiverStream::new(rx))))
    }
}

/// Chunks of a blob queued between the network and the disk, either way.
const BLOB_CHUNKS_QUEUED: usize = 8;
/// Bytes per chunk of a blob sent by GetBlob.
const BLOB_CHUNK_BYTES: usize = 1024 * 1024;

/// A content id from the wire, naming the field when it is not 32 bytes.
fn blob_id(field: &'static str, bytes: &[u8]) -> Result<ContentId, Status> {
    let array: [u8; 32] = bytes.try_into().map_err(|_| {
        Status::invalid_argument(format!("malformed message: field {field}: {} bytes, not 32", bytes.len()))
    })?;
    Ok(ContentId::from_digest(array))
}

fn blob_info(meta: &rollout_cloud_local::ObjectMeta) -> pb::BlobInfo {
    pb::BlobInfo {
        content_id: meta.content_id.as_bytes().to_vec(),
        size_bytes: meta.size_bytes,
        created_unix_ms: meta.created_unix_ms,
    }
}

/// The upload's chunks as a `Read`, ended by `None`; a channel closed before that mark
/// is an error, so the store deletes the partial upload.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Option<Vec<u8>>>,
    current: Vec<u8>,
    at: usize,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at >= self.current.len() {
            match self.rx.recv() {
                Ok(Some(chunk)) => {
                    self.current = chunk;
                    self.at = 0;
                }
                Ok(None) => return Ok(0),
                Err(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the upload was refused or broke",
                    ));
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.at);
        buf[..n].copy_from_slice(&self.current[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A `Write` that sends what it is given as blob chunks of at most
/// [`BLOB_CHUNK_BYTES`]; a gone receiver (the client left) is an error, which stops
/// the read.
struct ChannelWriter {
    tx: mpsc::Sender<Result<pb::BlobChunk, Status>>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(BLOB_CHUNK_BYTES);
        self.tx
            .blocking_send(Ok(pb::BlobChunk { data: buf[..n].to_vec() }))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A followed job's outcomes are looked for at least this often, notified or not.
const WATCH_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);
/// Audit entries read per pass of a follower.
const WATCH_ENTRIES_PER_PASS: usize = 1024;

impl CoordinatorApi {
    /// Refuses tasks that name a blob the store does not hold, naming the task, the
    /// input and the blob.
    async fn check_inputs(&self, tasks: &[rollout_coordinator::TaskSpec], first: usize) -> Result<(), Status> {
        let named: Vec<(usize, usize, ContentId)> = tasks
            .iter()
            .enumerate()
            .flat_map(|(i, t)| t.inputs.iter().enumerate().map(move |(j, id)| (first + i, j, *id)))
            .collect();
        if named.is_empty() {
            return Ok(());
        }
        let store = self.blob_store()?;
        tokio::task::spawn_blocking(move || {
            let mut known = std::collections::BTreeSet::new();
            for (i, j, id) in named {
                if known.contains(&id) {
                    continue;
                }
                if !store.exists(&id).map_err(internal)? {
                    return Err(Status::invalid_argument(format!(
                        "tasks[{i}].inputs[{j}]: blob {id} is not stored (upload it first: rollout blob put FILE)"
                    )));
                }
                // Used now: the retention counts from here (and the job's inputs
                // record keeps it from the next sweep on).
                store.touch(&id).map_err(internal)?;
                known.insert(id);
            }
            Ok(())
        })
        .await
        .map_err(|e| Status::internal(format!("checking inputs: {e}")))?
    }

    /// A stored blob's bytes as a stream of chunks, verified as they are read.
    pub(super) fn blob_stream(
        &self,
        field: &'static str,
        id: &[u8],
    ) -> Result<Response<BoxStream<pb::BlobChunk>>, Status> {
        let store = self.blob_store()?;
        let id = blob_id(field, id)?;
        if !store.exists(&id).map_err(internal)? {
            return Err(Status::not_found(format!("blob {id} is not stored")));
        }
        let (tx, rx) = mpsc::channel(BLOB_CHUNKS_QUEUED);
        tokio::task::spawn_blocking(move || {
            let mut sink = ChannelWriter { tx: tx.clone() };
            if let Err(e) = store.get_stream(&id, &mut sink) {
                let status = match &e {
                    Error::Fatal(rollout_core::Fatal::Corrupt { .. }) => {
                        Status::data_loss(format!("blob {id} is damaged; discard what was received: {e}"))
                    }
                    _ => internal(e),
                };
                let _ = tx.blocking_send(Err(status));
            }
        });
        Ok(Response::new(self.until_shutdown(ReceiverStream::new(rx))))
    }

    fn blob_store(&self) -> Result<Arc<rollout_cloud_local::FsObjectStore>, Status> {
        self.blobs
            .clone()
            .ok_or_else(|| Status::unimplemented("this coordinator keeps no blobs (no blob store configured)"))
    }

    /// The stored record of a sealed job, or the status that says why there is none.
    async fn sealed_job(&self, job: JobId) -> Result<StoredJob, Status> {
        let storage = Arc::clone(&self.results.storage);
        let retention = self.job_retention_ms;
        let lookup = tokio::task::spawn_blocking(move || stored_job(&*storage, job))
            .await
            .map_err(|e| Status::internal(format!("reading {job}: {e}")))?
            .map_err(internal)?;
        match lookup {
            JobLookup::Found(stored) if stored.sealed => Ok(stored),
            JobLookup::Found(stored) => Err(Status::failed_precondition(format!(
                "{job} is open ({} tasks appended) and has no results until it is sealed",
                stored.tasks
            ))),
            JobLookup::Gone => Err(Status::not_found(format!(
                "{job} expired: finished jobs and their results are deleted after tasks.job_retention ({}), \
                 and jobs never sealed after tasks.open_job_timeout",
                rollout_core::config::duration_text::format(std::time::Duration::from_millis(retention))
            ))),
            JobLookup::Unknown => Err(Status::not_found(format!("no job {job}"))),
        }
    }
}

/// A task's report as the wire carries it, with its result's bytes if asked.
fn task_result(r: TaskReport, include_bytes: bool, results: &ResultStore) -> Result<pb::TaskResult, Status> {
    let (state, content_id) = match &r.state {
        TaskState::Queued => (pb::TaskState::Queued, None),
        TaskState::Leased { .. } => (pb::TaskState::Leased, None),
        TaskState::Committed { result, .. } | TaskState::CommittedInline { result, .. } => {
            (pb::TaskState::Committed, Some(*result))
        }
        TaskState::DeadLettered => (pb::TaskState::DeadLettered, None),
        TaskState::Cancelled => (pb::TaskState::Cancelled, None),
    };
    let result = match (include_bytes, content_id, &r.state) {
        (true, _, TaskState::CommittedInline { bytes, .. }) => bytes.clone(),
        (true, Some(id), _) => results.get(&id).map_err(|e| Status::internal(format!("result of {}: {e}", r.task)))?,
        _ => Vec::new(),
    };
    Ok(pb::TaskResult {
        task: Some(r.task.into()),
        state: state.into(),
        attempts: r.attempts.get(),
        content_id: content_id.map(|c: ContentId| c.as_bytes().to_vec()).unwrap_or_default(),
        result,
        errors: r.errors,
    })
}

/// One pass of a follower: the ends of `job`'s tasks among the audit entries after
/// `after_seq` (at most [`WATCH_ENTRIES_PER_PASS`] entries looked at), the seq read up
/// to, and whether that was the end of the chain.
fn outcomes_after(
    storage: &dyn Storage,
    job: &StoredJob,
    after_seq: u64,
    include_bytes: bool,
    results: &ResultStore,
) -> Result<(Vec<pb::TaskOutcome>, u64, bool), Status> {
    let entries = rollout_coordinator::audit::entries_after(storage, after_seq, WATCH_ENTRIES_PER_PASS)
        .map_err(internal)?
        .ok_or_else(|| {
            Status::failed_precondition(format!(
                "the audit entries after seq {after_seq} were deleted by the audit retention (tasks.job_retention); \
                 list {} with Results instead",
                job.job
            ))
        })?;
    let caught_up = entries.len() < WATCH_ENTRIES_PER_PASS;
    let mut cursor = after_seq;
    let mut out = Vec::new();
    for entry in entries {
        cursor = entry.seq;
        let task = match entry.event().map_err(internal)? {
            HistoryEvent::Committed { task, .. }
            | HistoryEvent::DeadLettered { task, .. }
            | HistoryEvent::Cancelled { task } => task,
            _ => continue,
        };
        if task.job != job.job {
            continue;
        }
        let Some(report) = stored_task_reports(storage, job, task.index, 1).map_err(internal)?.pop() else { continue };
        out.push(pb::TaskOutcome { seq: entry.seq, result: Some(task_result(report, include_bytes, results)?) });
    }
    Ok((out, cursor, caught_up))
}

/// A status query from the wire.
pub(super) fn status_query(req: pb::StatusRequest) -> Result<StatusQuery, WireError> {
    let default = StatusQuery::default();
    let or_default = |n: u32, d: usize| if n == 0 { d } else { (n as usize).min(d.max(10_000)) };
    let workers_after = if req.workers_after.is_empty() {
        None
    } else {
        Some(rollout_proto::worker_id("status.workers_after", &req.workers_after)?)
    };
    let jobs = match pb::JobsView::try_from(req.jobs_view) {
        Ok(pb::JobsView::Current) => {
            let recent = if req.recent_finished == 0 { 10 } else { (req.recent_finished as usize).min(10_000) };
            JobsQuery::Current { recent_finished: recent }
        }
        Ok(pb::JobsView::All) => JobsQuery::All { after: req.jobs_from.checked_sub(1).map(JobId) },
        Ok(pb::JobsView::One) => JobsQuery::One(JobId(req.job)),
        Err(_) => {
            return Err(WireError { field: "status.jobs_view", reason: format!("unknown value {}", req.jobs_view) });
        }
    };
    Ok(StatusQuery {
        workers_after,
        workers_max: or_default(req.workers_max, default.workers_max),
        jobs,
        jobs_max: or_default(req.jobs_max, default.jobs_max),
    })
}

/// Checks a task id from the wire (used by clients reading results).
pub fn task_of(result: &pb::TaskResult) -> Result<rollout_core::TaskId, WireError> {
    required_task_id("task_result.task", result.task)
}
