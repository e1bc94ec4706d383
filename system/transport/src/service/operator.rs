//! The `Operator` service: jobs, status, results, cancels and drains, for operator
//! certificates only.

use super::*;

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
            .map(|w| pb::WorkerStatus {
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
        }))
    }

    type ResultsStream = BoxStream<pb::TaskResult>;

    async fn results(&self, req: Request<pb::ResultsRequest>) -> Result<Response<Self::ResultsStream>, Status> {
        authorize_operator(&req)?;
        let pb::ResultsRequest { job, include_bytes, from_index } = req.into_inner();
        let job = JobId(job);
        let results = self.results.clone();
        let storage = Arc::clone(&results.storage);
        let retention = self.job_retention_ms;
        // Served from storage (what is durable), never from the machine: a page of
        // task records at a time, on the blocking pool.
        let lookup = tokio::task::spawn_blocking(move || stored_job(&*storage, job))
            .await
            .map_err(|e| Status::internal(format!("reading {job}: {e}")))?
            .map_err(internal)?;
        let stored = match lookup {
            JobLookup::Found(stored) if stored.sealed => stored,
            JobLookup::Found(stored) => {
                return Err(Status::failed_precondition(format!(
                    "{job} is open ({} tasks appended) and has no results until it is sealed",
                    stored.tasks
                )));
            }
            JobLookup::Gone => {
                return Err(Status::not_found(format!(
                    "{job} expired: finished jobs and their results are deleted after tasks.job_retention ({}), \
                     and jobs never sealed after tasks.open_job_timeout",
                    rollout_core::config::duration_text::format(std::time::Duration::from_millis(retention))
                )));
            }
            JobLookup::Unknown => return Err(Status::not_found(format!("no job {job}"))),
        };
        let (tx, rx) = mpsc::channel(256);
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
                        (true, Some(id), _) => match results.get(&id) {
                            Ok(bytes) => bytes,
                            Err(e) => {
                                let _ = tx.blocking_send(Err(Status::internal(format!("result of {}: {e}", r.task))));
                                return;
                            }
                        },
                        _ => Vec::new(),
                    };
                    let item = pb::TaskResult {
                        task: Some(r.task.into()),
                        state: state.into(),
                        attempts: r.attempts.get(),
                        content_id: content_id.map(|c: ContentId| c.as_bytes().to_vec()).unwrap_or_default(),
                        result,
                        errors: r.errors,
                    };
                    if tx.blocking_send(Ok(item)).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(self.until_shutdown(ReceiverStream::new(rx))))
    }
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
