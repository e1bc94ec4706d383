//! The tonic services: `Coordinator` (what workers call) and `Operator` (what
//! operators call), both thin: they check identity and the message, translate it, and
//! hand it to the coordinator driver.
//!
//! Identity: every connection carries its peer's verified certificate role
//! ([`PeerInfo`]). A worker may only speak for the worker id in its certificate; operator
//! RPCs need an operator certificate. Anything else is `PERMISSION_DENIED`.
//!
//! Bounds: every message is limited by `limits.max_message_bytes` when it is decoded,
//! every repeated field and name by [`crate::wire`]; a worker's Work stream may have
//! at most `limits.max_work_bytes_in_flight` bytes of results on their way into the
//! coordinator's batches (its next frames wait), so one worker cannot fill the
//! coordinator's memory and the others do not wait for it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{Stream, StreamExt};
use rollout_coordinator::{
    JobLookup, JobPhase, JobsQuery, OperatorReply, StatusQuery, StoredJob, TaskReport, TaskState, WorkerState,
    stored_job, stored_result, stored_task_reports,
};
use rollout_core::config::LimitsConfig;
use rollout_core::history::HistoryEvent;
use rollout_core::protocol::{Outcome, Submit, ToWorker};
use rollout_core::time::unix_millis;
use rollout_core::traits::Storage;
use rollout_core::{ContentId, Error, Fatal, Incarnation, JobId, PROTOCOL_VERSION, Recoverable, WorkerId};
use rollout_proto::transport as pb;
use rollout_proto::{WireError, required_task_id};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::coordinator::{CONTROL_QUEUED_MAX, CoordinatorHandle, DriverMsg, OperatorRequest, WORK_FRAMES_QUEUED_MAX};
use crate::net::{ConnectionEnd, ConnectionWatch, PeerInfo};
use crate::tls::PeerRole;
use crate::wire::{self, WireOutcome};

mod operator;
pub use operator::*;

/// Concurrent HTTP/2 streams one connection may open (a worker needs four: Work,
/// Control, a beat and a registration).
pub const STREAMS_PER_CONNECTION_MAX: u32 = 16;
/// Task results streamed per storage read by `Results`.
const RESULTS_PAGE: usize = 1024;

/// Where committed results are read from: the coordinator's database, where each is
/// stored with its commit (content-addressed, once however many tasks name it).
#[derive(Clone)]
pub struct ResultStore {
    storage: Arc<dyn Storage>,
}

impl std::fmt::Debug for ResultStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResultStore").finish_non_exhaustive()
    }
}

impl ResultStore {
    /// Results in `storage` (the coordinator's, as committed: not the pipeline).
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        ResultStore { storage }
    }

    /// The bytes of a committed result.
    pub fn get(&self, id: &ContentId) -> rollout_core::Result<Vec<u8>> {
        stored_result(&*self.storage, id)?
            .ok_or_else(|| Error::internal(format!("result {} is not stored (its job was deleted?)", id.to_hex())))
    }
}

/// The coordinator's gRPC face: implements both the `Coordinator` and the `Operator`
/// services over a [`CoordinatorHandle`].
#[derive(Clone)]
pub struct CoordinatorApi {
    driver: CoordinatorHandle,
    results: ResultStore,
    limits: LimitsConfig,
    job_retention_ms: u64,
    shutdown: Option<watch::Receiver<bool>>,
    next_conn: Arc<AtomicU64>,
    /// Operators' blobs (none: PutBlob and friends answer that there is no store).
    blobs: Option<Arc<rollout_cloud_local::FsObjectStore>>,
    /// The client certificate each worker registered with last, for status.
    certs: Arc<WorkerCerts>,
}

/// The certificate each worker registered with last (serial, expiry), shown by Status:
/// at most `limits.max_workers` entries, the least recently registered going first.
#[derive(Debug, Default)]
pub struct WorkerCerts {
    inner: std::sync::Mutex<WorkerCertsInner>,
    max: usize,
}

#[derive(Debug, Default)]
struct WorkerCertsInner {
    by_worker: std::collections::BTreeMap<WorkerId, (u64, crate::net::PeerCert)>,
    order: std::collections::BTreeMap<u64, WorkerId>,
    next: u64,
}

impl WorkerCerts {
    /// At most `max` workers' certificates.
    pub fn new(max: usize) -> Self {
        WorkerCerts { inner: Default::default(), max: max.max(1) }
    }

    /// `worker` registered presenting `cert`.
    pub fn note(&self, worker: &WorkerId, cert: crate::net::PeerCert) {
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stamp = inner.next;
        inner.next += 1;
        if let Some((old, _)) = inner.by_worker.insert(worker.clone(), (stamp, cert)) {
            inner.order.remove(&old);
        }
        inner.order.insert(stamp, worker.clone());
        while inner.by_worker.len() > self.max {
            let Some((_, oldest)) = inner.order.pop_first() else { break };
            inner.by_worker.remove(&oldest);
        }
    }

    /// The certificate `worker` registered with last.
    pub fn of(&self, worker: &WorkerId) -> Option<crate::net::PeerCert> {
        let inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.by_worker.get(worker).map(|(_, cert)| cert.clone())
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).by_worker.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for CoordinatorApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorApi").finish_non_exhaustive()
    }
}

impl CoordinatorApi {
    /// Services over a running driver; results are read from `results`; `config`
    /// gives the limits the services enforce.
    pub fn new(driver: CoordinatorHandle, results: ResultStore, config: &rollout_core::Config) -> Self {
        CoordinatorApi {
            driver,
            results,
            limits: config.limits,
            job_retention_ms: u64::try_from(config.tasks.job_retention.as_millis()).unwrap_or(u64::MAX),
            shutdown: None,
            next_conn: Arc::new(AtomicU64::new(1)),
            blobs: None,
            certs: Arc::new(WorkerCerts::new(config.limits.max_workers as usize)),
        }
    }

    /// Serves PutBlob, GetBlob and ListBlobs from `store` (its size limit is
    /// `limits.max_blob_bytes`, set by the caller).
    pub fn with_blobs(mut self, store: rollout_cloud_local::FsObjectStore) -> Self {
        self.blobs = Some(Arc::new(store));
        self
    }

    /// Keeps the certificate each worker registers with in `certs` (shared with the
    /// dashboard), instead of a table of its own.
    pub fn with_worker_certs(mut self, certs: Arc<WorkerCerts>) -> Self {
        self.certs = certs;
        self
    }

    /// Ends every open stream once `shutdown` turns true, so a graceful server
    /// shutdown does not wait for workers' long-lived streams.
    pub fn with_shutdown(mut self, shutdown: watch::Receiver<bool>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    /// A stream that ends at shutdown.
    fn until_shutdown<T: Send + 'static>(
        &self,
        stream: impl Stream<Item = Result<T, Status>> + Send + 'static,
    ) -> BoxStream<T> {
        match self.shutdown.clone() {
            None => Box::pin(stream),
            Some(mut rx) => Box::pin(stream.take_until(async move {
                while !*rx.borrow() {
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            })),
        }
    }

    /// Both services, with message size limits, ready for a tonic router.
    pub fn into_services(
        self,
        max_message_bytes: usize,
    ) -> (pb::coordinator_server::CoordinatorServer<CoordinatorApi>, pb::operator_server::OperatorServer<CoordinatorApi>)
    {
        let coordinator = pb::coordinator_server::CoordinatorServer::new(self.clone())
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        let operator = pb::operator_server::OperatorServer::new(self)
            .max_decoding_message_size(max_message_bytes)
            .max_encoding_message_size(max_message_bytes);
        (coordinator, operator)
    }
}

/// The worker id a request may speak for: the one in its certificate, if it matches
/// the `claimed` one.
fn authorize_worker<T>(req: &Request<T>, field: &'static str, claimed: &str) -> Result<WorkerId, Status> {
    let claimed = rollout_proto::worker_id(field, claimed).map_err(invalid)?;
    match req.extensions().get::<PeerInfo>().and_then(|p| p.role.clone()) {
        Some(PeerRole::Worker(id)) if id == claimed => Ok(id),
        Some(PeerRole::Worker(id)) => Err(Status::permission_denied(format!(
            "the client certificate names worker {id}; it may not speak for worker {claimed} ({field})"
        ))),
        Some(PeerRole::Operator(name)) => Err(Status::permission_denied(format!(
            "operator certificate {name:?} may not call worker RPCs (speaking for {claimed})"
        ))),
        None => Err(Status::permission_denied("the client certificate carries no rollout worker identity")),
    }
}

fn authorize_operator<T>(req: &Request<T>) -> Result<String, Status> {
    match req.extensions().get::<PeerInfo>().and_then(|p| p.role.clone()) {
        Some(PeerRole::Operator(name)) => Ok(name),
        Some(PeerRole::Worker(id)) => Err(Status::permission_denied(format!(
            "worker certificate {id} may not call operator RPCs; use an operator certificate (rollout certs issue --operator NAME)"
        ))),
        None => Err(Status::permission_denied("operator RPCs need an operator certificate")),
    }
}

fn invalid(e: WireError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn unavailable(e: Error) -> Status {
    Status::unavailable(e.to_string())
}

fn rejected(e: Error) -> Status {
    match e {
        Error::Fatal(Fatal::InvalidInput(m)) => Status::invalid_argument(m),
        Error::Fatal(Fatal::PermissionDenied(m)) => Status::permission_denied(m),
        Error::Fatal(Fatal::ProtocolMismatch { .. }) => Status::failed_precondition(e.to_string()),
        Error::Recoverable { kind: Recoverable::ResourceExhausted(m), .. } => Status::resource_exhausted(m),
        other => Status::failed_precondition(other.to_string()),
    }
}

fn internal(e: Error) -> Status {
    Status::internal(e.to_string())
}

async fn answer<T>(rx: oneshot::Receiver<T>) -> Result<T, Status> {
    rx.await.map_err(|_| Status::unavailable("the coordinator dropped the request (restarting); retry"))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CoordinatorApi {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let worker = authorize_worker(&req, "register.worker_id", &req.get_ref().worker_id)?;
        let cert = req.extensions().get::<PeerInfo>().and_then(|p| p.cert.clone());
        let span = tracing::info_span!("rpc", channel = "register", worker = %worker);
        async move {
            let body = req.into_inner();
            // The protocol version, like every other registration rule, is the machine's
            // to judge: a mismatch comes back as RegisterRejected naming both versions.
            let register = wire::register_from_wire(&body).map_err(invalid)?;
            let (tx, rx) = oneshot::channel();
            self.driver.send(DriverMsg::Register(worker.clone(), register, tx)).await.map_err(unavailable)?;
            match answer(rx).await? {
                ToWorker::Registered { incarnation, terms, assigns_sent } => {
                    tracing::info!(channel = "register", worker = %worker, %incarnation, "worker registered");
                    if let Some(cert) = cert {
                        self.certs.note(&worker, cert);
                    }
                    Ok(Response::new(pb::RegisterResponse {
                        protocol_version: PROTOCOL_VERSION,
                        incarnation: incarnation.get(),
                        settings: Some(wire::terms_to_wire(terms)),
                        assigns_sent,
                    }))
                }
                ToWorker::RegisterRejected { reason } => {
                    tracing::warn!(channel = "register", worker = %worker, %reason, "registration refused");
                    Err(Status::failed_precondition(reason))
                }
                other => Err(Status::internal(format!("unexpected answer to register: {other:?}"))),
            }
        }
        .instrument(span)
        .await
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let worker = authorize_worker(&req, "heartbeat.worker_id", &req.get_ref().worker_id)?;
        let span = tracing::debug_span!("rpc", channel = "heartbeat", worker = %worker);
        async move {
            let beat = wire::heartbeat_from_wire(req.into_inner()).map_err(invalid)?;
            tracing::debug!(channel = "heartbeat", event = "heartbeat_received", worker = %worker,
                incarnation = %beat.incarnation, beat_seq = beat.beat_seq, "heartbeat_received");
            let (tx, rx) = oneshot::channel();
            self.driver.send(DriverMsg::Heartbeat(worker, beat, tx)).await.map_err(unavailable)?;
            match answer(rx).await? {
                ToWorker::HeartbeatAck { beat_seq, reregister, .. } => {
                    Ok(Response::new(pb::HeartbeatResponse { beat_seq, reregister }))
                }
                other => Err(Status::internal(format!("unexpected answer to heartbeat: {other:?}"))),
            }
        }
        .instrument(span)
        .await
    }

    type ControlStream = BoxStream<pb::ControlMessage>;

    async fn control(&self, req: Request<pb::ControlSubscribe>) -> Result<Response<Self::ControlStream>, Status> {
        let worker = authorize_worker(&req, "control.worker_id", &req.get_ref().worker_id)?;
        let incarnation = Incarnation(req.get_ref().incarnation);
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(CONTROL_QUEUED_MAX);
        self.driver
            .send(DriverMsg::AttachControl { worker: worker.clone(), incarnation, conn, tx })
            .await
            .map_err(unavailable)?;
        tracing::info!(channel = "control", event = "control_subscribed", worker = %worker, %incarnation,
            "control_subscribed");
        let detach = DetachOnDrop { driver: self.driver.clone(), worker, conn };
        let stream = ReceiverStream::new(rx).map(move |m| {
            let _keep = &detach;
            Ok(m)
        });
        Ok(Response::new(self.until_shutdown(stream)))
    }

    type FetchBlobStream = BoxStream<pb::BlobChunk>;

    async fn fetch_blob(&self, req: Request<pb::GetBlobRequest>) -> Result<Response<Self::FetchBlobStream>, Status> {
        // Any worker may read any blob: tasks name them, and content ids are not secret
        // from the fleet.
        match req.extensions().get::<PeerInfo>().and_then(|p| p.role.clone()) {
            Some(PeerRole::Worker(_)) => {}
            _ => return Err(Status::permission_denied("FetchBlob is for workers (Operator.GetBlob for operators)")),
        }
        self.blob_stream("fetch_blob.content_id", &req.get_ref().content_id)
    }

    type WorkStream = BoxStream<pb::CoordinatorFrame>;

    async fn work(&self, req: Request<Streaming<pb::WorkerFrame>>) -> Result<Response<Self::WorkStream>, Status> {
        let peer = req.extensions().get::<PeerInfo>().cloned();
        let role = peer.as_ref().and_then(|p| p.role.clone());
        let connection = peer.map(|p| p.connection).unwrap_or_default();
        let mut inbound = req.into_inner();
        let first = match inbound.message().await? {
            Some(frame) => frame,
            None => {
                return Err(Status::invalid_argument(
                    "malformed message: field work.hello: the stream ended before it",
                ));
            }
        };
        let Some(hello) = first.hello.clone() else {
            return Err(Status::invalid_argument("malformed message: field work.hello: missing on the first frame"));
        };
        let worker = {
            // Reuse the unary check on a request carrying the same peer info.
            let mut probe = Request::new(());
            if let Some(role) = role {
                probe.extensions_mut().insert(PeerInfo {
                    role: Some(role),
                    remote: String::new(),
                    connection: Default::default(),
                    revoked: Default::default(),
                    cert: None,
                });
            }
            authorize_worker(&probe, "work.hello.worker_id", &hello.worker_id)?
        };
        let incarnation = Incarnation(hello.incarnation);
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(WORK_FRAMES_QUEUED_MAX);
        self.driver
            .send(DriverMsg::AttachWork { worker: worker.clone(), incarnation, conn, tx: tx.clone() })
            .await
            .map_err(unavailable)?;
        tracing::info!(channel = "work", event = "work_stream_opened", worker = %worker, %incarnation);
        let budget_bytes = self.limits.max_work_bytes_in_flight as usize;
        let pump = WorkPump {
            driver: self.driver.clone(),
            worker: worker.clone(),
            incarnation,
            max_result_bytes: self.limits.max_result_bytes as usize,
            budget: Arc::new(Semaphore::new(budget_bytes)),
            budget_bytes,
        };
        let span = tracing::debug_span!("rpc", channel = "work", worker = %worker);
        let detach = DetachOnDrop { driver: self.driver.clone(), worker: worker.clone(), conn };
        let driver = self.driver.clone();
        tokio::spawn(
            async move {
                let _detach = detach;
                if let Err(status) = pump.frame(first).await {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                let closed_by = loop {
                    match inbound.message().await {
                        Ok(Some(frame)) => {
                            if let Err(status) = pump.frame(frame).await {
                                tracing::warn!(channel = "work", error = %status.message(), "refusing a malformed frame");
                                let _ = tx.send(Err(status)).await;
                                return;
                            }
                        }
                        Ok(None) => break Some("the worker ended the stream"),
                        Err(status) => match closed_by_worker(&status, &connection) {
                            Some(how) => break Some(how),
                            None => {
                                tracing::debug!(channel = "work", error = %status, "work stream ended");
                                return;
                            }
                        },
                    }
                };
                if let Some(how) = closed_by {
                    // The incarnation runs nothing more: its tasks go elsewhere now
                    // rather than at its deadline.
                    tracing::info!(channel = "work", event = "work_stream_closed", worker = %worker, %incarnation,
                        how, "work_stream_closed: {how}; the incarnation ends now");
                    let _ = driver.send(DriverMsg::WorkClosed { worker, incarnation }).await;
                }
            }
            .instrument(span),
        );
        Ok(Response::new(self.until_shutdown(ReceiverStream::new(rx))))
    }
}

/// Whether a Work stream that failed with `status` was closed from the worker's end: a
/// stream the worker's process cancelled (it does so once the incarnation's runs
/// stopped), or a connection its kernel closed (FIN: the process is gone). A reset or
/// a keepalive timeout is not: the worker may still run, and the deadline rule decides.
fn closed_by_worker(status: &Status, connection: &ConnectionWatch) -> Option<&'static str> {
    if connection.end() == ConnectionEnd::ClosedByPeer {
        return Some("the worker's connection was closed by its peer (FIN)");
    }
    (status.code() == tonic::Code::Cancelled && connection.end() == ConnectionEnd::Open)
        .then_some("the worker cancelled the stream")
}

/// Forwards one worker's inbound Work frames to the driver.
struct WorkPump {
    driver: CoordinatorHandle,
    worker: WorkerId,
    incarnation: Incarnation,
    max_result_bytes: usize,
    /// Result bytes this stream may have on their way into the coordinator's batches.
    budget: Arc<Semaphore>,
    budget_bytes: usize,
}

impl WorkPump {
    async fn frame(&self, frame: pb::WorkerFrame) -> Result<(), Status> {
        if frame.pulls.len() > wire::REPEATED_MAX || frame.submits.len() > wire::REPEATED_MAX {
            return Err(Status::invalid_argument("malformed message: field work.frame: too many pulls or submits"));
        }
        let mut submits = Vec::with_capacity(frame.submits.len());
        let mut bytes = 0usize;
        for s in frame.submits {
            let submit = wire::submit_from_wire(s).map_err(invalid)?;
            let (submit, result) = to_submit(self.incarnation, submit, self.max_result_bytes);
            bytes += result.as_ref().map_or(0, Vec::len);
            submits.push((submit, result));
        }
        // The latest pull of a frame wins.
        let pull = frame.pulls.last().map(|pull| wire::pull_from_wire(self.incarnation, pull));
        if submits.is_empty() && pull.is_none() {
            return Ok(());
        }
        // Wait while this stream's earlier results are still on their way in (the
        // driver gives the permit back once their batch is applied). A frame holds at
        // most one message, and the budget at least one message (config validation).
        let permits = u32::try_from(bytes.min(self.budget_bytes)).unwrap_or(u32::MAX);
        let permit: Option<OwnedSemaphorePermit> = if permits == 0 {
            None
        } else {
            Some(
                Arc::clone(&self.budget)
                    .acquire_many_owned(permits)
                    .await
                    .map_err(|_| Status::internal("work stream budget closed"))?,
            )
        };
        let msg = DriverMsg::WorkFrame { worker: self.worker.clone(), submits, pull, permit };
        self.driver.send(msg).await.map_err(unavailable)
    }
}

/// A checked submit from the wire as the machine takes it, with the bytes of its
/// result to store with the commit, if it is accepted. A result over the limit travels
/// without its bytes: the machine fails the attempt for its size and stores nothing.
fn to_submit(
    incarnation: Incarnation,
    (task, token, outcome): (rollout_core::TaskId, rollout_core::FencingToken, WireOutcome),
    max_result_bytes: usize,
) -> (Submit, Option<Vec<u8>>) {
    let (outcome, bytes) = match outcome {
        WireOutcome::Result(bytes) => {
            let outcome = Outcome::Succeeded { result: ContentId::of(&bytes), size_bytes: bytes.len() as u64 };
            let bytes = (bytes.len() <= max_result_bytes).then_some(bytes);
            (outcome, bytes)
        }
        WireOutcome::Failure(message) => (Outcome::Failed { message }, None),
    };
    (Submit { incarnation, task, token, outcome }, bytes)
}

/// Tells the driver that a stream ended, so it stops routing to it.
struct DetachOnDrop {
    driver: CoordinatorHandle,
    worker: WorkerId,
    conn: u64,
}

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        let msg = DriverMsg::Detach { worker: self.worker.clone(), conn: self.conn };
        let driver = self.driver.clone();
        // try_send first; if the inbox is full, detach from a task (never block a drop).
        if let Err(mpsc::error::TrySendError::Full(msg)) = driver.inbox.try_send(crate::coordinator::DriverMsgBox(msg))
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                let _ = driver.inbox.send(msg).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(serial: &str) -> crate::net::PeerCert {
        crate::net::PeerCert { serial: serial.into(), not_after: std::time::UNIX_EPOCH }
    }

    #[test]
    fn worker_certs_keep_the_latest_per_worker_and_at_most_their_bound() {
        let certs = WorkerCerts::new(2);
        let id = |s: &str| WorkerId::new(s).expect("id");
        certs.note(&id("w1"), cert("a"));
        certs.note(&id("w2"), cert("b"));
        certs.note(&id("w1"), cert("c"));
        assert_eq!(certs.of(&id("w1")).map(|c| c.serial), Some("c".into()), "the latest registration wins");
        // A third worker evicts the least recently registered one (w2, since w1 registered again).
        certs.note(&id("w3"), cert("d"));
        assert_eq!(certs.len(), 2);
        assert_eq!(certs.of(&id("w2")), None);
        assert!(certs.of(&id("w1")).is_some() && certs.of(&id("w3")).is_some());
    }
}
