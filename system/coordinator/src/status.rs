//! What the coordinator shows: status pages served from the counts the machine keeps
//! up to date (their cost grows with the page, not with the history), and the task
//! reports read from storage.

use std::time::SystemTime;

use rollout_core::time::from_unix_millis;
use rollout_core::traits::Inventory;
use rollout_core::{FencingToken, Incarnation, JobId, Result, TaskId, WorkerId};

use crate::machine::{Coordinator, JobEntry, WorkerEntry};
use crate::metrics::{ClusterMetrics, LatencySummary};
use crate::records::{
    JobLookup, TaskCounts, TaskRecord, TaskReport, TaskState, WorkerState, load, stored_job, stored_task_reports,
    task_key,
};

/// A worker as the coordinator sees it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Its id.
    pub id: WorkerId,
    /// Its current incarnation.
    pub incarnation: Incarnation,
    /// Active, draining or failed.
    pub state: WorkerState,
    /// The deadline kept for it, on the coordinator's wall clock (fresh after a restart).
    pub due_at: SystemTime,
    /// When its latest beat arrived (coordinator wall clock).
    pub last_beat: Option<SystemTime>,
    /// Its wall clock minus the coordinator's as its latest beat showed it, in ms.
    pub clock_offset_ms: Option<i64>,
    /// Its slots.
    pub slots: u32,
    /// Leases it holds.
    pub leased: u32,
    /// Its plugins.
    pub plugins: Vec<String>,
    /// Its inventory.
    pub inventory: Inventory,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JobPhase {
    /// Taking appends; nothing runs yet.
    #[default]
    Open,
    /// Sealed, with tasks that may still run.
    Active,
    /// Every task committed, dead-lettered or cancelled.
    Finished,
}

/// A job's progress.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobStatus {
    /// Its id.
    pub job: JobId,
    /// Its name.
    pub name: String,
    /// Open, active or finished.
    pub phase: JobPhase,
    /// Tasks in all (appended so far, while open).
    pub tasks: u32,
    /// Waiting.
    pub queued: u32,
    /// Running somewhere.
    pub leased: u32,
    /// Done.
    pub committed: u32,
    /// Out of attempts.
    pub dead_lettered: u32,
    /// Cancelled.
    pub cancelled: u32,
    /// When it finished (its retention counts from then).
    pub finished_at: Option<SystemTime>,
}

impl JobStatus {
    /// Whether every task is in a terminal state.
    pub fn is_finished(&self) -> bool {
        self.phase == JobPhase::Finished
    }
}

/// Which jobs a status page lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobsQuery {
    /// Open and active jobs (oldest first), then the `recent_finished` most recently
    /// finished ones (newest first).
    Current {
        /// How many finished jobs to add.
        recent_finished: usize,
    },
    /// Every job, in id order, after `after`.
    All {
        /// Where the previous page ended.
        after: Option<JobId>,
    },
    /// One job.
    One(JobId),
}

/// What a status page asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusQuery {
    /// Workers in id order after this one.
    pub workers_after: Option<WorkerId>,
    /// At most this many workers.
    pub workers_max: usize,
    /// Which jobs.
    pub jobs: JobsQuery,
    /// At most this many jobs.
    pub jobs_max: usize,
}

impl Default for StatusQuery {
    fn default() -> Self {
        StatusQuery {
            workers_after: None,
            workers_max: 1000,
            jobs: JobsQuery::Current { recent_finished: 10 },
            jobs_max: 1000,
        }
    }
}

/// Counts over the whole cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClusterTotals {
    /// Workers taking work.
    pub workers_active: u32,
    /// Workers draining.
    pub workers_draining: u32,
    /// Failed workers still remembered.
    pub workers_failed: u32,
    /// Jobs open for appends.
    pub jobs_open: u32,
    /// Sealed jobs with tasks that may still run.
    pub jobs_active: u32,
    /// Finished jobs within their retention.
    pub jobs_finished: u32,
    /// Tasks of every job in memory, by state.
    pub tasks: TaskCounts,
}

/// One page of status.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatusPage {
    /// Workers, in id order.
    pub workers: Vec<WorkerStatus>,
    /// More workers follow the last one.
    pub workers_more: bool,
    /// Jobs, in the query's order.
    pub jobs: Vec<JobStatus>,
    /// More jobs follow.
    pub jobs_more: bool,
    /// Cluster-wide counts.
    pub totals: ClusterTotals,
    /// Latency percentiles from merged histograms.
    pub latencies: Vec<LatencySummary>,
    /// Sidecar restarts the workers reported, by plugin (only plugins with any).
    pub plugin_restarts: Vec<(String, u64)>,
}

impl Coordinator {
    /// A status page: `O(workers + jobs shown)`, never `O(tasks)`.
    pub fn status(&self, query: &StatusQuery) -> StatusPage {
        let mut page = StatusPage {
            totals: self.totals(),
            latencies: self.metrics.latencies(),
            plugin_restarts: self
                .metrics
                .counters()
                .filter(|(name, _, n)| *name == rollout_core::protocol::metric::PLUGIN_RESTARTS && *n > 0)
                .map(|(_, plugin, n)| (plugin.to_owned(), n))
                .collect(),
            ..StatusPage::default()
        };
        let range = match &query.workers_after {
            Some(after) => {
                self.workers.range::<WorkerId, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
            }
            None => self.workers.range::<WorkerId, _>(..),
        };
        for (i, (_, w)) in range.enumerate() {
            if i == query.workers_max {
                page.workers_more = true;
                break;
            }
            page.workers.push(worker_status(w));
        }
        let push = |page: &mut StatusPage, job: &JobEntry| {
            if page.jobs.len() == query.jobs_max {
                page.jobs_more = true;
                return false;
            }
            page.jobs.push(job_status(job));
            true
        };
        match query.jobs {
            JobsQuery::One(id) => {
                if let Some(job) = self.jobs.get(&id) {
                    push(&mut page, job);
                }
            }
            JobsQuery::All { after } => {
                let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
                for (_, job) in self.jobs.range((start, std::ops::Bound::Unbounded)) {
                    if !push(&mut page, job) {
                        break;
                    }
                }
            }
            JobsQuery::Current { recent_finished } => {
                let mut unfinished: Vec<JobId> = self.open_jobs.iter().map(|(_, j)| *j).collect();
                unfinished.extend(self.active_jobs.iter().copied());
                unfinished.sort_unstable();
                let recent = self.finished_jobs.iter().rev().take(recent_finished).map(|(_, j)| *j);
                for id in unfinished.into_iter().chain(recent) {
                    if let Some(job) = self.jobs.get(&id)
                        && !push(&mut page, job)
                    {
                        break;
                    }
                }
            }
        }
        page
    }

    fn totals(&self) -> ClusterTotals {
        let mut t = ClusterTotals {
            jobs_open: self.open_jobs.len() as u32,
            jobs_active: self.active_jobs.len() as u32,
            jobs_finished: self.finished_jobs.len() as u32,
            tasks: self.totals,
            ..ClusterTotals::default()
        };
        for w in self.workers.values() {
            match w.record.state {
                WorkerState::Active => t.workers_active += 1,
                WorkerState::Draining => t.workers_draining += 1,
                WorkerState::Failed => t.workers_failed += 1,
            }
        }
        t
    }

    /// Every worker, in id order.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        self.workers.values().map(worker_status).collect()
    }

    /// Every job in memory (within its retention), in id order.
    pub fn jobs(&self) -> Vec<JobStatus> {
        self.jobs.values().map(job_status).collect()
    }

    /// One job's progress.
    pub fn job(&self, job: JobId) -> Option<JobStatus> {
        self.jobs.get(&job).map(job_status)
    }

    /// Up to `limit` task reports of `job` from index `from` on, read from the
    /// machine's storage (`None`: no such job).
    pub fn task_reports(&self, job: JobId, from: u32, limit: usize) -> Result<Option<Vec<TaskReport>>> {
        match stored_job(&*self.storage, job)? {
            JobLookup::Found(stored) => Ok(Some(stored_task_reports(&*self.storage, &stored, from, limit)?)),
            JobLookup::Gone | JobLookup::Unknown => Ok(None),
        }
    }

    /// A task's state and current token: from memory while it is live, from storage
    /// once it finished.
    pub fn task_state(&self, task: TaskId) -> Option<(TaskState, Option<FencingToken>)> {
        match self.tasks.get(&task) {
            Some(Some(record)) => Some((record.state.clone(), record.token)),
            Some(None) => Some((TaskState::Queued, None)),
            None => {
                let record: TaskRecord = load(&*self.storage, &task_key(task)).ok().flatten()?;
                Some((record.state, record.token))
            }
        }
    }

    /// How many queued or leased tasks the machine holds in memory.
    pub fn live_tasks(&self) -> usize {
        self.tasks.len()
    }

    /// Merged metrics.
    pub fn metrics(&self) -> &ClusterMetrics {
        &self.metrics
    }

    /// Latency percentiles, from merged histograms.
    pub fn latencies(&self) -> Vec<LatencySummary> {
        self.metrics.latencies()
    }
}

fn worker_status(w: &WorkerEntry) -> WorkerStatus {
    WorkerStatus {
        id: w.record.id.clone(),
        incarnation: w.record.incarnation,
        state: w.record.state,
        due_at: w.due_at,
        last_beat: w.last_beat,
        clock_offset_ms: w.clock_offset_ms,
        slots: w.record.slots,
        leased: w.leases.len() as u32,
        plugins: w.record.plugins.clone(),
        inventory: w.record.inventory.clone(),
    }
}

fn job_status(j: &JobEntry) -> JobStatus {
    let c = &j.record.counts;
    JobStatus {
        job: j.record.id,
        name: j.record.name.clone(),
        phase: if !j.record.sealed {
            JobPhase::Open
        } else if j.is_finished() {
            JobPhase::Finished
        } else {
            JobPhase::Active
        },
        tasks: j.record.tasks,
        queued: c.queued,
        leased: c.leased,
        committed: c.committed,
        dead_lettered: c.dead_lettered,
        cancelled: c.cancelled,
        finished_at: j.record.finished_at_unix_ms.map(from_unix_millis),
    }
}
