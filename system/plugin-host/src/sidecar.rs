//! Python sidecars: one child process per plugin, serving `plugin.proto` over gRPC on
//! a Unix socket, driven by a tonic client on a small tokio runtime of our own.
//!
//! Lifecycle: started and health-checked (Health, then Describe for the ABI version)
//! by [`SidecarPlugin::start`]. A call that times out or is cancelled has its RPC
//! cancelled; a sidecar that says it cooperates (`DescribeResponse.cooperative_cancel`,
//! as the SDK does) gets [`CANCEL_GRACE`] to stop it, watched through Health's list of
//! running calls, and keeps running. One that does not stop in time (or a sidecar that
//! does not cooperate) is killed, and the other calls it was running are re-run once on
//! a fresh process within their own deadlines, so their tasks are not charged an attempt
//! for another's timeout. A call that loses its connection otherwise (the process
//! crashed) fails; the next call starts a fresh process first, after a backoff that
//! doubles with each crash in a row ([`RESTART_BACKOFF_INITIAL`] to
//! [`RESTART_BACKOFF_MAX`]) so a crashing sidecar is not restarted in a tight loop. A
//! generation number ties each failure to the process it happened on, so a late
//! failure never kills a newer process.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rollout_core::traits::{CancelToken, PluginError};
use rollout_proto::plugin::call_response::Outcome;
use rollout_proto::plugin::plugin_client::PluginClient;
use rollout_proto::plugin::{CallRequest, DescribeRequest, HealthRequest};
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::LoadError;
use crate::spec::{SidecarSpec, check_socket};

/// The sidecar protocol version (`DescribeResponse.abi_version`); the Python SDK
/// (`rollout_plugin.ABI_VERSION`) must report the same.
pub const SIDECAR_ABI_VERSION: u32 = 1;
/// Largest request or response on a sidecar connection (both directions).
pub const SIDECAR_MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// A fresh directory for a sidecar's socket, mode 0700, under the temp directory: a
/// name that exists already (someone else's, or a leftover) is skipped, never reused.
fn private_dir(plugin: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for n in 0..1000u32 {
        let dir = base.join(format!("rollout-sidecar-{}-{plugin}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot make a private directory for the socket in {}: {e}", base.display())),
        }
    }
    Err(format!("no free name for a private socket directory in {}", base.display()))
}

/// Set to `stdin` in a sidecar's environment: its stdin is a pipe from the worker, and
/// end of file on it means the worker is gone (the SDK exits then).
pub const PARENT_PIPE_ENV: &str = "ROLLOUT_PLUGIN_PARENT_PIPE";

/// Pause between health checks while a sidecar starts.
const HEALTH_RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// Limit on one health check or describe RPC.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long to wait for a dying sidecar to be reaped before reporting it as alive.
const EXIT_WAIT: Duration = Duration::from_millis(200);
/// How often a running call looks at its cancel token.
const CANCEL_POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How long a cooperating sidecar has to stop a cancelled or timed-out call before the
/// process is killed.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);
/// How often Health is asked whether a cancelled call has stopped.
const STOPPED_POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The pause before restarting a sidecar after its first crash in a row; it doubles per
/// crash up to [`RESTART_BACKOFF_MAX`], and a call that succeeds resets it.
pub const RESTART_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// The longest pause before a restart.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Generations killed to stop another call, remembered so their other calls are re-run.
const KILLED_REMEMBERED: usize = 16;

/// The tokio runtime that drives every sidecar client of one host. `None` only while
/// it is being dropped.
pub(crate) struct SidecarRuntime(Option<tokio::runtime::Runtime>);

impl Drop for SidecarRuntime {
    fn drop(&mut self) {
        // The host may be dropped by a worker's async task; dropping a runtime there
        // panics, shutting it down in the background does not.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl SidecarRuntime {
    pub(crate) fn new() -> Result<Self, String> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("plugin-sidecar-io")
            .enable_all()
            .build()
            .map(|runtime| SidecarRuntime(Some(runtime)))
            .map_err(|e| format!("cannot start the sidecar I/O runtime: {e}"))
    }

    /// Runs `future` to completion from blocking code. Inside another runtime's task
    /// (where `block_on` would panic) it runs on a short-lived thread instead.
    fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let runtime = self.0.as_ref().expect("the runtime lives until the host is dropped");
        if tokio::runtime::Handle::try_current().is_err() {
            return runtime.block_on(future);
        }
        std::thread::scope(|scope| {
            scope.spawn(|| runtime.block_on(future)).join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// Why a sidecar did not come up.
enum StartError {
    Abi { theirs: u32 },
    Other(String),
}

struct Running {
    child: Child,
    client: PluginClient<Channel>,
    generation: u64,
    /// The sidecar stops a cancelled call and reports its running calls.
    cooperative: bool,
    /// The write end of the child's stdin: dropped (with this process, or when the
    /// sidecar is replaced), it tells the child its worker is gone.
    _parent_writer: std::io::PipeWriter,
}

/// One sidecar plugin and its (current) process.
pub(crate) struct SidecarPlugin {
    name: String,
    spec: SidecarSpec,
    socket: PathBuf,
    runtime: Arc<SidecarRuntime>,
    running: Mutex<Option<Running>>,
    starts: AtomicU64,
    next_call: AtomicU64,
    /// Generations killed on purpose (to stop a call that would not): their other calls
    /// failed through no fault of their own and are re-run.
    killed_on_purpose: Mutex<std::collections::VecDeque<u64>>,
    /// Crashes in a row (processes that died by themselves), for the restart backoff.
    crashes_in_a_row: AtomicU64,
    /// The 0700 directory made for the socket (removed with the plugin).
    private_dir: Option<PathBuf>,
}

impl SidecarPlugin {
    /// Starts the process and waits until it is healthy and speaks our ABI version.
    pub(crate) fn start(name: &str, spec: &SidecarSpec, runtime: Arc<SidecarRuntime>) -> Result<Self, LoadError> {
        let (socket, private_dir) = match &spec.socket {
            Some(socket) => (socket.clone(), None),
            None => {
                // In a directory only this user can enter, made fresh here: a name in the
                // shared temp directory could be taken first by another local user, who
                // would then be talked to as the plugin.
                let dir =
                    private_dir(name).map_err(|reason| LoadError::SidecarStart { plugin: name.to_owned(), reason })?;
                (dir.join(format!("{name}.sock")), Some(dir))
            }
        };
        check_socket(&socket).map_err(|reason| LoadError::SidecarStart { plugin: name.to_owned(), reason })?;
        let plugin = SidecarPlugin {
            name: name.to_owned(),
            spec: spec.clone(),
            socket,
            private_dir,
            runtime,
            running: Mutex::new(None),
            starts: AtomicU64::new(0),
            next_call: AtomicU64::new(1),
            killed_on_purpose: Mutex::new(std::collections::VecDeque::new()),
            crashes_in_a_row: AtomicU64::new(0),
        };
        match plugin.launch() {
            Ok(running) => *plugin.lock() = Some(running),
            Err(StartError::Abi { theirs }) => {
                return Err(LoadError::AbiMismatch {
                    plugin: name.to_owned(),
                    path: spec.program.clone(),
                    ours: SIDECAR_ABI_VERSION,
                    theirs,
                });
            }
            Err(StartError::Other(reason)) => return Err(LoadError::SidecarStart { plugin: name.to_owned(), reason }),
        }
        Ok(plugin)
    }

    /// How many processes were started so far (1 after a clean start).
    pub(crate) fn starts(&self) -> u64 {
        self.starts.load(Ordering::Acquire)
    }

    pub(crate) fn call(
        &self,
        method: &str,
        payload: &[u8],
        inputs: &[String],
        deadline: Duration,
        cancel: &CancelToken,
    ) -> Result<Vec<u8>, PluginError> {
        if payload.len() > SIDECAR_MESSAGE_BYTES_MAX {
            return Err(PluginError::Failed {
                message: format!(
                    "payload of {} bytes exceeds the sidecar message limit of {SIDECAR_MESSAGE_BYTES_MAX} bytes",
                    payload.len()
                ),
                detail: None,
            });
        }
        self.call_once(method, payload, inputs, deadline, cancel, true)
    }

    fn call_once(
        &self,
        method: &str,
        payload: &[u8],
        inputs: &[String],
        deadline: Duration,
        cancel: &CancelToken,
        may_rerun: bool,
    ) -> Result<Vec<u8>, PluginError> {
        let started = Instant::now();
        let (mut client, generation, cooperative) = self.ensure_running(deadline)?;
        let call_id = self.next_call.fetch_add(1, Ordering::AcqRel);
        // A restart's time comes out of the call's budget; errors name the deadline given.
        let budget = deadline.saturating_sub(started.elapsed());
        // No gRPC timeout on the request: the select below is the one deadline, so the
        // outcome does not depend on which of two timers fires first.
        let request = tonic::Request::new(CallRequest {
            method: method.to_owned(),
            payload: payload.to_vec(),
            deadline_ms: u64::try_from(budget.as_millis()).unwrap_or(u64::MAX),
            task_id: String::new(),
            attempt: 0,
            input_paths: inputs.to_vec(),
            call_id,
        });
        enum Ended {
            Rpc(Result<tonic::Response<rollout_proto::plugin::CallResponse>, tonic::Status>),
            Deadline,
            Cancelled,
        }
        let ended = self.runtime.block_on(async {
            tokio::select! {
                reply = client.call(request) => Ended::Rpc(reply),
                () = tokio::time::sleep(budget) => Ended::Deadline,
                () = cancelled(cancel) => Ended::Cancelled,
            }
        });
        match ended {
            Ended::Rpc(Ok(reply)) => {
                self.crashes_in_a_row.store(0, Ordering::Release);
                match reply.into_inner().outcome {
                    Some(Outcome::Result(bytes)) => Ok(bytes),
                    Some(Outcome::Failure(failure)) => Err(PluginError::Failed {
                        message: failure.message,
                        detail: Some(failure.traceback).filter(|t| !t.is_empty()),
                    }),
                    None => {
                        self.stop(generation, "sent a reply with no outcome", false);
                        Err(PluginError::Crashed(format!("sidecar {:?} sent a reply with no outcome", self.name)))
                    }
                }
            }
            Ended::Rpc(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                self.stop_call(client, generation, cooperative, call_id, "call ran past its deadline");
                Err(PluginError::DeadlineExceeded(deadline))
            }
            Ended::Rpc(Err(status)) => {
                let what = self.stop(generation, "call failed", true);
                if self.was_killed_on_purpose(generation) {
                    // Killed to stop another call: not this call's fault, so it runs again
                    // on a fresh process (once), and its task is not charged an attempt.
                    let left = deadline.saturating_sub(started.elapsed());
                    if may_rerun && !cancel.is_cancelled() && !left.is_zero() {
                        tracing::info!(plugin = self.name, call_id, generation, "sidecar_call_rerun");
                        return self.call_once(method, payload, inputs, left, cancel, false);
                    }
                } else {
                    self.crashes_in_a_row.fetch_add(1, Ordering::AcqRel);
                }
                Err(PluginError::Crashed(format!(
                    "sidecar {:?} {what} during the call ({}: {})",
                    self.name,
                    status.code(),
                    status.message()
                )))
            }
            Ended::Deadline => {
                self.stop_call(client, generation, cooperative, call_id, "call ran past its deadline");
                Err(PluginError::DeadlineExceeded(deadline))
            }
            Ended::Cancelled => {
                self.stop_call(client, generation, cooperative, call_id, "call was cancelled");
                Err(PluginError::Cancelled)
            }
        }
    }

    /// After the select dropped a call's RPC (its HTTP/2 stream is reset, which the SDK
    /// turns into the handler's `cancelled` event): waits up to [`CANCEL_GRACE`] for a
    /// cooperating sidecar to stop it, else kills the process, marking it killed on
    /// purpose so the calls it was running for others are re-run.
    fn stop_call(&self, client: PluginClient<Channel>, generation: u64, cooperative: bool, call_id: u64, why: &str) {
        if cooperative && self.runtime.block_on(wait_stopped(client, call_id, CANCEL_GRACE)) {
            tracing::info!(plugin = self.name, call_id, generation, why, "sidecar_call_stopped");
            return;
        }
        {
            let mut killed = self.killed_on_purpose.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if killed.len() == KILLED_REMEMBERED {
                killed.pop_front();
            }
            killed.push_back(generation);
        }
        let why = if cooperative { format!("{why}, and did not stop within {CANCEL_GRACE:?}") } else { why.to_owned() };
        self.stop(generation, &why, false);
    }

    fn was_killed_on_purpose(&self, generation: u64) -> bool {
        self.killed_on_purpose.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&generation)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Running>> {
        // A panic while holding the lock leaves at worst a dead process recorded, which
        // the next call notices and replaces.
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The client of a live process, restarting the sidecar first if it is gone (after
    /// the crash backoff, waited at most `deadline`).
    fn ensure_running(&self, deadline: Duration) -> Result<(PluginClient<Channel>, u64, bool), PluginError> {
        let mut running = self.lock();
        if let Some(current) = running.as_mut() {
            match current.child.try_wait() {
                Ok(None) => return Ok((current.client.clone(), current.generation, current.cooperative)),
                Ok(Some(status)) => tracing::warn!(plugin = self.name, %status, "sidecar_exited"),
                Err(e) => tracing::warn!(plugin = self.name, error = %e, "sidecar_wait_failed"),
            }
            if let Some(mut old) = running.take() {
                reap(&mut old.child);
            }
            self.crashes_in_a_row.fetch_add(1, Ordering::AcqRel);
        }
        let crashes = self.crashes_in_a_row.load(Ordering::Acquire);
        if crashes > 0 {
            // The lock stays held: every call waits for the same restart.
            let pause = restart_backoff(crashes);
            tracing::warn!(
                plugin = self.name,
                crashes_in_a_row = crashes,
                pause_ms = pause.as_millis() as u64,
                "sidecar_restart_backoff"
            );
            std::thread::sleep(pause.min(deadline));
            if pause > deadline {
                return Err(PluginError::Crashed(format!(
                    "sidecar {:?} crashed {crashes} times in a row; its restart waits {pause:?}, past this call's \
                     deadline",
                    self.name
                )));
            }
        }
        tracing::info!(plugin = self.name, "sidecar_restarting");
        match self.launch() {
            Ok(fresh) => {
                let handle = (fresh.client.clone(), fresh.generation, fresh.cooperative);
                *running = Some(fresh);
                Ok(handle)
            }
            Err(StartError::Abi { theirs }) => {
                Err(PluginError::AbiMismatch { plugin: self.name.clone(), ours: SIDECAR_ABI_VERSION, theirs })
            }
            Err(StartError::Other(reason)) => {
                Err(PluginError::Crashed(format!("sidecar {:?} could not be restarted: {reason}", self.name)))
            }
        }
    }

    /// Kills the process of `generation` (if it is still the current one) and says
    /// how it ended, for the error message.
    fn stop(&self, generation: u64, why: &str, may_be_exiting: bool) -> String {
        let mut running = self.lock();
        if running.as_ref().is_none_or(|r| r.generation != generation) {
            return "was already replaced".to_owned();
        }
        // The lock stays held until the socket is removed below, so a restart by another
        // call cannot create its socket before we delete the old one.
        let Some(mut old) = running.take() else { return "was already replaced".to_owned() };
        // Give a process that is dying by itself a moment to be reaped, so the error
        // says "exited with status" rather than "was killed".
        let until = Instant::now() + EXIT_WAIT;
        let exited = loop {
            match old.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if may_be_exiting && Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
                _ => break None,
            }
        };
        let what = match exited {
            Some(status) => format!("exited ({status})"),
            None => {
                reap(&mut old.child);
                "was killed".to_owned()
            }
        };
        tracing::warn!(plugin = self.name, pid = old.child.id(), why, what, "sidecar_stopped");
        remove_socket(&self.socket);
        what
    }

    /// Spawns a process and waits for it to pass Health and Describe.
    fn launch(&self) -> Result<Running, StartError> {
        remove_socket(&self.socket);
        let mut command = Command::new(&self.spec.program);
        // The worker's environment stays with the worker: the sidecar starts from a
        // cleared one, with only SIDECAR_BASE_ENV inherited, then what its [[plugins]]
        // entry declares (`env`, and `secrets` through an allowlist of exactly those),
        // then the SDK's own ROLLOUT_PLUGIN_*. No ROLLOUT_SECRET_* it did not ask for,
        // no ROLLOUT_JOIN_TOKEN, no config override reaches user code.
        command.env_clear();
        for key in crate::spec::SIDECAR_BASE_ENV {
            if let Some(value) = std::env::var_os(key) {
                command.env(key, value);
            }
        }
        command.envs(&self.spec.env);
        if !self.spec.secrets.is_empty() {
            use rollout_core::traits::SecretStore;
            let store = rollout_cloud_local::EnvSecretStore::new(self.spec.secrets.iter().cloned())
                .map_err(|e| StartError::Other(format!("secrets: {e}")))?;
            for name in &self.spec.secrets {
                let secret = store.get(name).map_err(|e| {
                    StartError::Other(format!(
                        "secret {name} (asked for by its secrets list): {e}; set {}{name} in the worker's environment",
                        rollout_cloud_local::ENV_PREFIX
                    ))
                })?;
                command.env(name, secret.expose());
            }
        }
        command
            .args(&self.spec.args)
            .arg("--socket")
            .arg(&self.socket)
            .env("ROLLOUT_PLUGIN_SOCKET", &self.socket)
            .env("ROLLOUT_PLUGIN_NAME", &self.name)
            .env("PYTHONUNBUFFERED", "1");
        if let Some(dir) = &self.spec.python_path {
            let mut joined = dir.as_os_str().to_owned();
            if let Some(existing) = std::env::var_os("PYTHONPATH").filter(|p| !p.is_empty()) {
                joined.push(":");
                joined.push(existing);
            }
            command.env("PYTHONPATH", joined);
        }
        // The child's stdin is a pipe only this process writes to: when the worker dies,
        // however it dies, the pipe closes and the SDK exits at once (a sidecar left
        // running after `kill -9` would go on with calls whose tasks the coordinator,
        // seeing the worker's connection close, has already leased elsewhere). The
        // write end is closed on exec, so no other child holds it.
        let (parent_pipe, parent_writer) =
            std::io::pipe().map_err(|e| StartError::Other(format!("cannot make the sidecar's parent pipe: {e}")))?;
        command.stdin(parent_pipe).env(PARENT_PIPE_ENV, "stdin");
        let mut child = command
            .spawn()
            .map_err(|e| StartError::Other(format!("cannot run {}: {e}", self.spec.program.display())))?;
        let generation = self.starts.fetch_add(1, Ordering::AcqRel) + 1;
        match self.runtime.block_on(wait_healthy(&mut child, &self.socket, self.spec.startup_timeout)) {
            Ok((client, cooperative)) => {
                tracing::info!(plugin = self.name, pid = child.id(), generation, cooperative, "sidecar_started");
                Ok(Running { child, client, generation, cooperative, _parent_writer: parent_writer })
            }
            Err(e) => {
                reap(&mut child);
                remove_socket(&self.socket);
                Err(e)
            }
        }
    }
}

impl Drop for SidecarPlugin {
    fn drop(&mut self) {
        if let Some(mut running) = self.lock().take() {
            reap(&mut running.child);
        }
        remove_socket(&self.socket);
        if let Some(dir) = &self.private_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Polls Health until it answers `serving` (or the process exits, or `timeout`
/// passes), then checks Describe's ABI version.
async fn wait_healthy(
    child: &mut Child,
    socket: &Path,
    timeout: Duration,
) -> Result<(PluginClient<Channel>, bool), StartError> {
    let started = Instant::now();
    let mut last_error = String::from("the socket never appeared");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(StartError::Other(format!("the process exited during startup ({status})")));
        }
        if started.elapsed() >= timeout {
            return Err(StartError::Other(format!(
                "not healthy within {timeout:?} on {} (last error: {last_error})",
                socket.display()
            )));
        }
        if socket.exists() {
            match probe(socket).await {
                Ok((client, abi_version, cooperative)) if abi_version == SIDECAR_ABI_VERSION => {
                    return Ok((client, cooperative));
                }
                Ok((_, theirs, _)) => return Err(StartError::Abi { theirs }),
                Err(e) => last_error = e,
            }
        }
        tokio::time::sleep(HEALTH_RETRY_INTERVAL).await;
    }
}

/// One Health + Describe round; the client, the sidecar's ABI version and whether it
/// stops cancelled calls.
async fn probe(socket: &Path) -> Result<(PluginClient<Channel>, u32, bool), String> {
    // The URI only fills HTTP/2's :authority; the connector ignores it.
    let channel = Endpoint::from_static("http://plugin.sidecar")
        .connect_timeout(PROBE_TIMEOUT)
        .connect_with_connector(UnixConnector(Arc::from(socket)))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = PluginClient::new(channel)
        .max_decoding_message_size(SIDECAR_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(SIDECAR_MESSAGE_BYTES_MAX);
    let mut health = tonic::Request::new(HealthRequest {});
    health.set_timeout(PROBE_TIMEOUT);
    let serving = client.health(health).await.map_err(|s| format!("health: {}", s.message()))?.into_inner().serving;
    if !serving {
        return Err("health: not serving yet".to_owned());
    }
    let mut describe = tonic::Request::new(DescribeRequest {});
    describe.set_timeout(PROBE_TIMEOUT);
    let described = client.describe(describe).await.map_err(|s| format!("describe: {}", s.message()))?.into_inner();
    Ok((client, described.abi_version, described.cooperative_cancel))
}

/// Whether call `call_id` leaves Health's list of running calls within `grace`.
async fn wait_stopped(mut client: PluginClient<Channel>, call_id: u64, grace: Duration) -> bool {
    let until = Instant::now() + grace;
    loop {
        let mut health = tonic::Request::new(HealthRequest {});
        health
            .set_timeout(PROBE_TIMEOUT.min(until.saturating_duration_since(Instant::now()).max(STOPPED_POLL_INTERVAL)));
        // An error (a busy or dying process) proves nothing either way: ask again until the grace is over.
        if let Ok(reply) = client.health(health).await
            && !reply.get_ref().running.contains(&call_id)
        {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(STOPPED_POLL_INTERVAL).await;
    }
}

/// The pause before the restart after `crashes` crashes in a row.
fn restart_backoff(crashes: u64) -> Duration {
    let doublings = u32::try_from(crashes.saturating_sub(1)).unwrap_or(u32::MAX).min(16);
    RESTART_BACKOFF_INITIAL.saturating_mul(1 << doublings).min(RESTART_BACKOFF_MAX)
}

async fn cancelled(cancel: &CancelToken) {
    while !cancel.is_cancelled() {
        tokio::time::sleep(CANCEL_POLL_INTERVAL).await;
    }
}

/// Kills (if still running) and waits for a child, so no zombie is left.
fn reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // An error here means it already exited; wait() below reaps it either way.
        let _ = child.kill();
    }
    let _ = child.wait();
}

fn remove_socket(socket: &Path) {
    if let Err(e) = std::fs::remove_file(socket)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %socket.display(), error = %e, "sidecar_socket_not_removed");
    }
}

/// Connects tonic to a Unix socket instead of TCP.
#[derive(Clone)]
struct UnixConnector(Arc<Path>);

impl tower_service::Service<Uri> for UnixConnector {
    type Response = TokioIo<UnixStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let path = Arc::clone(&self.0);
        Box::pin(async move {
            let stream = UnixStream::connect(&*path).await?;
            check_peer(&stream, &path)?;
            Ok(TokioIo::new(stream))
        })
    }
}

/// The process at the other end of a sidecar's socket must run as this worker's user
/// (SO_PEERCRED): a socket someone else bound at that path is refused before a byte of
/// a task is sent to it.
fn check_peer(stream: &UnixStream, path: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let peer = stream.peer_cred()?;
    // The owner of /proc/self is this process's effective user.
    let ours = std::fs::metadata("/proc/self")?.uid();
    if peer.uid() != ours {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the process serving the sidecar socket {} (pid {:?}) runs as uid {}, not as this worker's uid {ours}; \
                 refusing to talk to it",
                path.display(),
                peer.pid(),
                peer.uid()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod peer_tests {
    use super::*;

    /// A socket served by this user passes; one served by another user (nobody, which
    /// needs root to arrange) is refused naming both uids.
    #[tokio::test]
    async fn a_socket_served_by_another_user_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mine = dir.path().join("mine.sock");
        let _listener = tokio::net::UnixListener::bind(&mine).expect("bind");
        let stream = UnixStream::connect(&mine).await.expect("connect");
        check_peer(&stream, &mine).expect("our own user");

        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        use std::os::unix::process::CommandExt;
        if std::fs::metadata("/proc/self").expect("proc").uid() != 0 {
            println!("the other-user half of this test needs root (it starts a listener as nobody); not run");
            return;
        }
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let theirs = dir.path().join("theirs.sock");
        let script = format!(
            "import socket, time\ns = socket.socket(socket.AF_UNIX)\ns.bind({:?})\ns.listen()\ntime.sleep(30)",
            theirs.display().to_string()
        );
        let mut child = std::process::Command::new("python3")
            .args(["-c", &script])
            .uid(65534)
            .gid(65534)
            .spawn()
            .expect("python3 as nobody");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !theirs.exists() {
            assert!(std::time::Instant::now() < deadline, "the other user's listener never bound");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stream = UnixStream::connect(&theirs).await.expect("connect");
        let err = check_peer(&stream, &theirs).expect_err("another user");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("uid 65534") && err.to_string().contains("uid 0"), "{err}");
    }
}
