//! How the rest of the runtime talks to the driver: its clock, the messages it takes,
//! and the handle that sends them.

use super::*;

/// The node's clocks: monotonic from tokio's clock (so a simulated runtime can drive
/// it), wall from a [`WallClock`] (the system's unless a simulation supplies one).
#[derive(Debug, Clone)]
pub struct NodeClock {
    origin: tokio::time::Instant,
    wall: Arc<dyn WallClock>,
}

impl NodeClock {
    /// A clock whose monotonic origin is now, with the system's wall clock.
    pub fn start() -> Self {
        Self::start_with(Arc::new(SystemWallClock))
    }

    /// A clock whose monotonic origin is now, reading wall time from `wall`.
    pub fn start_with(wall: Arc<dyn WallClock>) -> Self {
        NodeClock { origin: tokio::time::Instant::now(), wall }
    }

    /// Both readings.
    pub fn now(&self) -> Now {
        Now::new(Mono::from_duration(self.origin.elapsed()), self.wall.now())
    }

    /// The tokio instant of a monotonic reading.
    pub fn instant_of(&self, at: Mono) -> tokio::time::Instant {
        self.origin + at.as_duration()
    }
}

/// An operator request, as the driver takes it.
#[derive(Debug, Clone)]
pub enum OperatorRequest {
    /// Queue a job.
    SubmitJob(JobSubmission),
    /// Open a job for appends.
    OpenJob {
        /// Its label.
        name: String,
        /// Its key.
        idempotency_key: Option<String>,
    },
    /// Append tasks to an open job.
    AppendTasks {
        /// The job.
        job: JobId,
        /// Index of the first task given.
        first_index: u32,
        /// The tasks.
        tasks: Vec<TaskSpec>,
    },
    /// Seal an open job.
    SealJob {
        /// The job.
        job: JobId,
        /// Tasks appended in all.
        tasks: u32,
    },
    /// Cancel a job's unfinished tasks.
    CancelJob(JobId),
    /// Cancel one task.
    CancelTask(TaskId),
    /// Drain a worker.
    Drain(WorkerId),
}

/// What flows down a Work stream: frames, or the error that ends it.
pub(crate) type WorkItem = std::result::Result<pb::CoordinatorFrame, tonic::Status>;

pub(crate) enum DriverMsg {
    /// What one Work frame of a worker carried: submits (each with its result's
    /// bytes, stored with its commit if it is accepted) and the frame's latest pull.
    /// `permit` holds the bytes against the stream's budget until the batch is applied.
    WorkFrame {
        worker: WorkerId,
        submits: Vec<(Submit, Option<Vec<u8>>)>,
        pull: Option<Pull>,
        permit: Option<OwnedSemaphorePermit>,
    },
    Register(WorkerId, Register, oneshot::Sender<ToWorker>),
    Heartbeat(WorkerId, Heartbeat, oneshot::Sender<ToWorker>),
    Operator(OperatorRequest, oneshot::Sender<OperatorReply>),
    AttachWork {
        worker: WorkerId,
        incarnation: Incarnation,
        conn: u64,
        tx: mpsc::Sender<WorkItem>,
    },
    AttachControl {
        worker: WorkerId,
        incarnation: Incarnation,
        conn: u64,
        tx: mpsc::Sender<pb::ControlMessage>,
    },
    Detach {
        worker: WorkerId,
        conn: u64,
    },
    /// The worker's end closed its Work stream of `incarnation` (see
    /// `CoordinatorInput::WorkClosed`).
    WorkClosed {
        worker: WorkerId,
        incarnation: Incarnation,
    },
    Status(StatusQuery, oneshot::Sender<StatusPage>),
}

/// A cheap, cloneable handle to the coordinator driver.
#[derive(Clone, Debug)]
pub struct CoordinatorHandle {
    pub(crate) inbox: mpsc::Sender<DriverMsgBox>,
    /// Bumped each time a released batch ended tasks (their audit entries are durable
    /// by then): followers of results read the chain again.
    pub(crate) tasks_ended: tokio::sync::watch::Receiver<u64>,
}

/// Wrapper so the handle can derive Debug without exposing the message type.
pub(crate) struct DriverMsgBox(pub(crate) DriverMsg);

impl std::fmt::Debug for DriverMsgBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DriverMsg")
    }
}

impl CoordinatorHandle {
    pub(crate) async fn send(&self, msg: DriverMsg) -> Result<()> {
        self.inbox.send(DriverMsgBox(msg)).await.map_err(|_| stopped())
    }

    /// Sends an operator request and waits for its reply (after its batch committed).
    pub async fn operator(&self, request: OperatorRequest) -> Result<OperatorReply> {
        let (tx, rx) = oneshot::channel();
        self.send(DriverMsg::Operator(request, tx)).await?;
        rx.await.map_err(|_| stopped())
    }

    /// A page of the cluster's current state (answered once what it shows is durable).
    pub async fn status(&self, query: StatusQuery) -> Result<StatusPage> {
        let (tx, rx) = oneshot::channel();
        self.send(DriverMsg::Status(query, tx)).await?;
        rx.await.map_err(|_| stopped())
    }
}

pub(super) fn stopped() -> Error {
    Error::recoverable(
        rollout_core::Recoverable::Unavailable(
            "the coordinator dropped the request: its batch failed and was not committed, or the coordinator is \
             stopping"
                .into(),
        ),
        rollout_core::RetryHint::Backoff,
    )
}
