//! `rollout-worker`: the worker's sans-IO state machine.
//!
//! [`Worker`] never reads a clock, draws OS randomness, spawns or does I/O. The
//! driver (the tokio runtime in `rollout-transport`, or the simulator) hands it a
//! [`Now`](rollout_core::Now) with every [`WorkerInput`], carries out the
//! [`WorkerOutput`]s in order, and delivers [`WorkerInput::Tick`] at
//! [`Worker::poll_timeout`]. Same settings, seed and inputs: same outputs.
//!
//! What a driver and the coordinator may rely on:
//!
//! - **Registration.** `Start` sends a Register at once. Unanswered after
//!   `register_timeout`, it is retried after `min(max, initial × 2^n)` with equal jitter
//!   (half fixed, half drawn from the seeded RNG). `RegisterRejected` is final:
//!   [`WorkerOutput::Fatal`], and the machine stops.
//! - **Heartbeats.** One per `heartbeat_interval` on the monotonic clock, from beat 1
//!   per incarnation, announcing `due_at = wall_now + 2 × heartbeat_interval`, the runs
//!   in progress plus the finished-but-unacknowledged ones (not the runs being
//!   cancelled: their results will never be submitted), `assigns_through`, and metric
//!   deltas at most once per `metrics_interval`. An ack moves the self-fence clock to
//!   the send time of the beat it names; acks for other incarnations are ignored.
//! - **Self-fence.** When `now.mono >= send time of the latest acknowledged beat +
//!   worker_self_fence_timeout` (registration counts as an acknowledged beat sent with
//!   the Register), the worker emits `SelfFenced`, cancels every run, withholds every
//!   result of the incarnation (unacknowledged submits included), and re-registers
//!   after a backoff delay. A `HeartbeatAck` with `reregister` does the same at once,
//!   without the `SelfFenced` event. No Submit ever leaves at or after the deadline.
//! - **Pulls.** Sent on registration, whenever a slot frees, and with every beat while a
//!   slot is free; idempotent. Never while draining.
//! - **Assignments.** Started only for the current incarnation, with a fresh `seq`, a
//!   free slot and no drain; at most `slots` runs (including ones being cancelled) are
//!   on the plugin host at once.
//! - **Submits.** Sent when a run ends, re-sent every `2 × heartbeat_interval` until a
//!   `SubmitAck` (any verdict) arrives. Failure messages are truncated to
//!   `max_error_message_bytes`.
//! - **Broken streams** ([`WorkerInput::StreamBroken`]). A broken Work stream (or
//!   connection) may have lost assignments or acks in flight, which the coordinator
//!   cannot tell from ones still coming, so it ends the incarnation as a self-fence
//!   does and registers again. A broken Control stream carries nothing the
//!   coordinator does not repeat: [`WorkerOutput::OpenControl`] asks for a new one
//!   after a jittered backoff (`reconnect_backoff_*`, restarted per incarnation).
//!
//! Architecture invariant: depends on `rollout-core` and small pure crates only; no
//! async runtime, no clock, no network, no `HashMap` iteration.

mod backoff;
mod io;
mod machine;
pub mod metrics;
mod settings;

pub use backoff::Backoff;
pub use io::{TaskOutcome, WorkerInput, WorkerOutput};
pub use machine::{CANCELLED_BY_HOST_MESSAGE, OUTSTANDING_BEATS_MAX, Phase, UNACKED_SUBMITS_PER_SLOT, Worker};
pub use settings::{
    Credential, MAX_ERROR_MESSAGE_BYTES_DEFAULT, METRICS_INTERVAL_DEFAULT, PLUGIN_DEADLINE_GRACE,
    RENEW_RETRY_INITIAL_DEFAULT, RENEW_RETRY_MAX_DEFAULT, WorkerSettings, plugin_stop_after, renew_at,
};
