//! The machine's inputs and outputs.

use rollout_core::history::HistoryEvent;
use rollout_core::oracle::SelfFenceOracle;
use rollout_core::protocol::{Assignment, Channel, ToCoordinator, ToWorker};
use rollout_core::{ContentId, FencingToken, Incarnation, Mono, TaskId};

/// Something that happened to the worker, handed to [`crate::Worker::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerInput {
    /// The worker process started: register. Inputs before it are ignored; a second
    /// `Start` is ignored too.
    Start,
    /// A timer fired. The driver delivers it at [`crate::Worker::poll_timeout`]; an early
    /// or extra tick is harmless, a late one only delays what was due.
    Tick,
    /// A message from the coordinator, as received (possibly duplicated, late or forged:
    /// never a reason to panic).
    Message(ToWorker),
    /// A stream to the coordinator broke: [`Channel::Work`] (or [`Channel::Unary`],
    /// the connection itself: a keepalive timed out) may have lost messages in flight,
    /// and the coordinator cannot tell which, so the worker ends its incarnation, as on
    /// a self-fence: it stops its tasks, withholds their results and registers again
    /// (with backoff). [`Channel::Control`]: [`WorkerOutput::OpenControl`] follows
    /// after a backoff; nothing else changes.
    StreamBroken(Channel),
    /// The plugin host reports that a task it was told to start has stopped.
    TaskFinished {
        /// The task.
        task: TaskId,
        /// The token of the `StartTask` it answers.
        token: FencingToken,
        /// How it ended.
        outcome: TaskOutcome,
    },
    /// The renewal asked for by [`WorkerOutput::RenewCertificate`] succeeded: the new
    /// certificate is in place, valid as given (the issuer's clock).
    CertificateRenewed(crate::Credential),
    /// The renewal failed (unreachable, refused, a bad answer); the machine tries
    /// again after a backoff while the certificate is valid.
    RenewalFailed,
    /// The plugin host started `plugin`'s process again `count` more times since the
    /// last report (the driver reads [`rollout_core::traits::PluginHost::restarts`]).
    /// Counted in the shipped metrics; changes nothing else.
    PluginRestarted {
        /// The plugin.
        plugin: String,
        /// Restarts since the last report.
        count: u64,
    },
}

/// How a task's run ended, as the plugin host saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutcome {
    /// The result is stored in the object store.
    Succeeded {
        /// Its content id.
        result: ContentId,
        /// Its length.
        size_bytes: u64,
    },
    /// The user code failed (error, crash, deadline).
    Failed {
        /// What went wrong; the worker truncates it before submitting.
        message: String,
    },
    /// The run was cancelled. If the worker asked for it, nothing is submitted;
    /// otherwise it counts as a failure.
    Cancelled,
}

/// What the driver must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerOutput {
    /// Send this message to the coordinator (best effort: the protocol survives loss).
    Send(ToCoordinator),
    /// Start running this assignment on the plugin host; report its end with
    /// [`WorkerInput::TaskFinished`] carrying the same task and token.
    StartTask(Assignment),
    /// Stop this run. The driver still reports [`WorkerInput::TaskFinished`] for it
    /// (whatever the outcome); its result is never submitted.
    CancelTask {
        /// The task.
        task: TaskId,
        /// The run's token.
        token: FencingToken,
    },
    /// A worker-side history event (`TaskStarted`, `TaskStopped`, `SelfFenced`); the
    /// driver stamps node, sequence number and wall time.
    Event(HistoryEvent),
    /// Registration was refused for good (e.g. protocol version mismatch): the worker
    /// process should exit with this message. The machine does nothing more.
    Fatal(String),
    /// Renew the worker's certificate (a new key and CSR, `Enrollment/Renew` over the
    /// connection) and report [`WorkerInput::CertificateRenewed`] or
    /// [`WorkerInput::RenewalFailed`]. At most one is outstanding.
    RenewCertificate,
    /// The certificate expired unrenewed at `not_after` (the worker's wall clock): the
    /// worker has stopped all its runs, withholds their results and does nothing more,
    /// as after [`WorkerOutput::Fatal`]; the process should exit. Only a bootstrap token
    /// gets it a new certificate.
    CertificateExpired {
        /// When it expired.
        not_after: std::time::SystemTime,
    },
    /// Open the Control stream of `incarnation` again (it broke, and its backoff
    /// passed); stale if the worker registered anew meanwhile.
    OpenControl {
        /// The incarnation whose stream broke.
        incarnation: Incarnation,
    },
}

impl WorkerOutput {
    /// Shows this output, produced at `mono`, to a [`SelfFenceOracle`] (for tests and
    /// the simulator): a Register or Heartbeat leaving is noted; a Submit or a start
    /// must come before the deadline the oracle rebuilt, or the error says why not.
    pub fn judge_self_fence(&self, oracle: &mut SelfFenceOracle, mono: Mono) -> Result<(), String> {
        match self {
            WorkerOutput::Send(ToCoordinator::Submit(s)) => oracle.judge(mono, s.incarnation),
            WorkerOutput::StartTask(a) => oracle.judge(mono, a.incarnation),
            WorkerOutput::Send(message) => {
                oracle.sent(mono, message);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}
