//! Putting it together: serve the coordinator over any stream of connections, or
//! start a whole coordinator (storage, object store, driver, TCP listener) or worker
//! from the effective [`Config`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use rollout_coordinator::CoordinatorSettings;
use rollout_core::traits::{EventEmitter, PluginHost, Storage};
use rollout_core::{Config, Error, Result, WorkerId};
use rollout_proto::transport::operator_client::OperatorClient;
use rollout_storage::{OpenOptions, RedbStorage};
use rollout_worker::WorkerSettings;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Server};

use crate::blob_cache::BlobCache;
use crate::coordinator::{CoordinatorDriverOptions, CoordinatorHandle, spawn_coordinator_driver};
use crate::dashboard::Dashboard;
use crate::enroll::{EnrollmentApi, require_client_certificate};
use crate::metrics::{CoordinatorMetrics, WorkerMetrics, serve_metrics};
use crate::net::{ConnectionLimits, TcpDialer, TlsConnector, lazy_channel, tcp_incoming, tls_incoming};
use crate::node_env::NodeEnv;
use crate::service::{CoordinatorApi, ResultStore, STREAMS_PER_CONNECTION_MAX};
use crate::tls::{self, CertFiles};
use crate::worker::{WorkerRuntimeOptions, run_worker};

/// How long a graceful shutdown waits for open connections.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The database file under the data directory.
pub const DATABASE_FILE: &str = "rollout.db";

/// What the server enforces on its connections and messages.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Largest message decoded or encoded (`limits.max_message_bytes`).
    pub max_message_bytes: usize,
    /// Connection counts and the deadline of connections without a certificate.
    pub connections: ConnectionLimits,
}

impl ServeLimits {
    /// The limits of a config.
    pub fn from_config(config: &Config) -> Self {
        ServeLimits {
            max_message_bytes: config.limits.max_message_bytes as usize,
            connections: ConnectionLimits::from_config(&config.limits),
        }
    }
}

/// The server's rustls configuration and the deny list its verifier and its
/// connections consult.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The rustls configuration (built with the same deny list, see
    /// [`tls::server_config_denying`]).
    pub config: Arc<ServerConfig>,
    /// Revoked serials; live connections presenting one are cut.
    pub deny: Arc<crate::revocation::DenyList>,
}

impl From<Arc<ServerConfig>> for ServerTls {
    /// A configuration without revocation.
    fn from(config: Arc<ServerConfig>) -> Self {
        ServerTls { config, deny: crate::revocation::DenyList::empty() }
    }
}

/// Serves both gRPC services on `incoming` (any stream of accepted byte streams, each
/// with a peer address for logs) under mutual TLS, until `shutdown` completes.
/// Enrollment is not served (Enroll answers `UNIMPLEMENTED`).
pub async fn serve_coordinator<L, IO, E, F>(
    api: CoordinatorApi,
    incoming: L,
    tls: impl Into<ServerTls>,
    limits: ServeLimits,
    shutdown: F,
) -> Result<()>
where
    L: Stream<Item = std::result::Result<(IO, String), E>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: std::fmt::Display + Send + 'static,
    F: Future<Output = ()> + Send,
{
    serve_coordinator_with_enrollment(api, None, incoming, tls, limits, shutdown).await
}

/// [`serve_coordinator`], plus the Enrollment service when `enrollment` is given. The
/// Coordinator and Operator services sit behind
/// [`require_client_certificate`](crate::enroll::require_client_certificate): a
/// connection without a client certificate reaches Enroll and nothing else.
pub async fn serve_coordinator_with_enrollment<L, IO, E, F>(
    api: CoordinatorApi,
    enrollment: Option<EnrollmentApi>,
    incoming: L,
    tls: impl Into<ServerTls>,
    limits: ServeLimits,
    shutdown: F,
) -> Result<()>
where
    L: Stream<Item = std::result::Result<(IO, String), E>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: std::fmt::Display + Send + 'static,
    F: Future<Output = ()> + Send,
{
    let tls = tls.into();
    let max_message_bytes = limits.max_message_bytes;
    let (coordinator, operator) = api.into_services(max_message_bytes);
    // The standard services, for grpcurl, grpc_health_probe and Kubernetes probes (with
    // an operator or worker certificate, like every service but Enroll): health says
    // SERVING for the whole server ("") and each of ours while this server runs.
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in [service_name(&coordinator), service_name(&operator)] {
        health.set_service_status(name, tonic_health::ServingStatus::Serving).await;
    }
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(rollout_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::internal(format!("gRPC reflection service: {e}")))?;
    Server::builder()
        .max_concurrent_streams(Some(STREAMS_PER_CONNECTION_MAX))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(InterceptedService::new(coordinator, require_client_certificate))
        .add_service(InterceptedService::new(operator, require_client_certificate))
        .add_service(InterceptedService::new(health_service, require_client_certificate))
        .add_service(InterceptedService::new(reflection, require_client_certificate))
        .add_optional_service(enrollment.map(|e| e.into_service(max_message_bytes)))
        .serve_with_incoming_shutdown(tls_incoming(incoming, tls.config, limits.connections, tls.deny), shutdown)
        .await
        .map_err(|e| Error::internal(format!("gRPC server failed: {e}")))
}

/// Creates `dir` (and its missing parents) readable by this user only (0700). An
/// existing directory keeps its mode; one that others may read is logged, naming the
/// setting, since the database and the objects in it are private.
pub fn create_private_dir(dir: &Path, field: &str) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::config_invalid(field, format!("creating {}: {e}", dir.display())))?;
    if let Ok(meta) = std::fs::metadata(dir) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(channel = "storage", dir = %dir.display(), mode = format!("{mode:o}"),
                "{field} {} is open to other users (mode {mode:o}); `chmod 700` it", dir.display());
        }
    }
    Ok(())
}

/// Operators' blobs live in `<storage.data_dir>/blobs` (content-addressed files).
pub const BLOB_DIR: &str = "blobs";

/// A temporary file this much older than the coordinator's start is a crashed writer's
/// and is removed then (an hour: far beyond any upload or certificate write in progress).
pub const STALE_TMP_AGE: Duration = Duration::from_secs(3600);
/// A worker keeps the blobs its tasks read in `<storage.data_dir>/blob-cache/<worker id>`.
pub const BLOB_CACHE_DIR: &str = "blob-cache";

/// A service's full gRPC name (e.g. `rollout.transport.v1.Coordinator`).
fn service_name<S: tonic::server::NamedService>(_: &S) -> &'static str {
    S::NAME
}

/// Where a coordinator keeps things and what it tells.
pub struct CoordinatorOptions {
    /// The effective config (listen address, TLS directory, data directory, limits).
    pub config: Config,
    /// History events (the audit log has them too).
    pub emitter: Arc<dyn EventEmitter>,
    /// Overrides `config.transport.listen_addr` (tests bind port 0).
    pub listen_addr: Option<String>,
}

impl std::fmt::Debug for CoordinatorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorOptions").field("listen_addr", &self.listen_addr).finish_non_exhaustive()
    }
}

/// A coordinator running on the current tokio runtime.
pub struct RunningCoordinator {
    /// The address it listens on.
    pub local_addr: SocketAddr,
    /// The driver's handle (for in-process operators and tests).
    pub handle: CoordinatorHandle,
    /// Where `/metrics` is served (`metrics.listen_addr`; none when it is empty).
    pub metrics_addr: Option<SocketAddr>,
    /// The coordinator's metrics (what `/metrics` serves).
    pub metrics: Arc<CoordinatorMetrics>,
    /// Its storage, for reads beside the driver (tests, sweeps): what is committed.
    pub storage: Arc<dyn Storage>,
    metrics_server: Option<JoinHandle<()>>,
    shutdown: watch::Sender<bool>,
    driver: JoinHandle<Result<()>>,
    server: JoinHandle<Result<()>>,
}

impl std::fmt::Debug for RunningCoordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningCoordinator")
            .field("local_addr", &self.local_addr)
            .field("metrics_addr", &self.metrics_addr)
            .finish_non_exhaustive()
    }
}

impl RunningCoordinator {
    /// Stops accepting, ends every stream, stops the driver, and waits for both (the
    /// server at most [`SHUTDOWN_GRACE`], then its connections are dropped).
    pub async fn shutdown(mut self) -> Result<()> {
        let _ = self.shutdown.send(true);
        if let Some(m) = self.metrics_server.take() {
            m.abort();
        }
        let server = match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.server).await {
            Ok(joined) => joined.map_err(|e| Error::internal(format!("server task: {e}")))?,
            Err(_) => {
                tracing::warn!(channel = "transport", "connections still open after the grace period; dropping them");
                self.server.abort();
                Ok(())
            }
        };
        let driver = self.driver.await.map_err(|e| Error::internal(format!("driver task: {e}")))?;
        server.and(driver)
    }

    /// Stops abruptly, like a crash: no grace for connections (storage keeps only
    /// what was committed).
    pub async fn abort(self) {
        let _ = self.shutdown.send(true);
        if let Some(m) = &self.metrics_server {
            m.abort();
        }
        self.server.abort();
        self.driver.abort();
        let _ = self.server.await;
        let _ = self.driver.await;
    }

    /// Waits until the server or the driver stops on its own (an error), or forever.
    pub async fn wait(&mut self) -> Result<()> {
        tokio::select! {
            r = &mut self.server => r.map_err(|e| Error::internal(format!("server task: {e}")))?,
            r = &mut self.driver => r.map_err(|e| Error::internal(format!("driver task: {e}")))?,
        }
    }
}

/// Opens storage (`<data_dir>/rollout.db`) and the object store
/// (`<data_dir>/object-store`), recovers the coordinator, binds the listener and serves.
/// The CA and the server certificate must exist in `transport.tls_dir` (see
/// `rollout certs init`). Serves Enrollment from the same directory (tokens from
/// `rollout token create`; signing needs `ca.key.pem`).
pub async fn start_coordinator(opts: CoordinatorOptions) -> Result<RunningCoordinator> {
    let config = opts.config;
    let data_dir = &config.storage.data_dir;
    create_private_dir(data_dir, "storage.data_dir")?;
    let options = OpenOptions {
        cache_bytes: usize::try_from(config.storage.cache_bytes).unwrap_or(usize::MAX),
        check_integrity_on_open: config.storage.check_integrity_on_open,
        wal_bytes: config.storage.wal_bytes,
    };
    let storage: Arc<dyn Storage> = Arc::new(RedbStorage::open_with(data_dir.join(DATABASE_FILE), options)?);
    let tls_dir = &config.transport.tls_dir;
    let now = std::time::SystemTime::now();
    // Certificates of the flat layout move into per-identity directories; a rotation
    // or certificate replacement a crash cut short is finished.
    tls::migrate_layout(tls_dir)?;
    for files in [CertFiles::ca(tls_dir), CertFiles::coordinator(tls_dir)] {
        crate::renewal::finish_pending_renewal(&files)?;
    }
    tls::check_own_certificate(&CertFiles::ca(tls_dir), now, "make a new CA (rollout certs init in a fresh tls_dir)")?;
    tls::check_own_certificate(
        &CertFiles::coordinator(tls_dir),
        now,
        "issue a new one: rollout certs issue --server [--san NAME]",
    )?;
    let deny = crate::revocation::DenyList::load(tls_dir)?;
    let (server_config, trust) = tls::server_config_reloading(
        &CertFiles::ca(tls_dir).cert,
        &CertFiles::coordinator(tls_dir),
        Arc::clone(&deny),
    )?;
    let server_tls = ServerTls { config: server_config, deny: Arc::clone(&deny) };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    deny.spawn_poll(shutdown_rx.clone());
    trust.spawn_poll(shutdown_rx.clone());
    if trust.cas() > 1 {
        tracing::info!(
            channel = "tls",
            event = "ca_rotation_open",
            cas = trust.cas(),
            "{} CAs are trusted: a CA rotation is under way (rollout certs status; rollout certs retire-ca ends it)",
            trust.cas()
        );
    }
    if !deny.is_empty() {
        tracing::info!(
            channel = "tls",
            event = "deny_list_loaded",
            revoked = deny.len(),
            "{} revoked certificates are refused",
            deny.len()
        );
    }
    let storage_for_results = Arc::clone(&storage);
    let storage_for_sweep = Arc::clone(&storage);
    let metrics = Arc::new(CoordinatorMetrics::new());
    // The dashboard lives on the metrics listener: none without it.
    let worker_certs = Arc::new(crate::service::WorkerCerts::new(config.limits.max_workers as usize));
    let dashboard = (!config.metrics.listen_addr.is_empty())
        .then(|| Arc::new(Dashboard::new().with_worker_certs(Arc::clone(&worker_certs))));
    let (handle, driver) = spawn_coordinator_driver(CoordinatorDriverOptions {
        storage,
        settings: CoordinatorSettings::from_config(&config),
        emitter: opts.emitter,
        shutdown: shutdown_rx.clone(),
        env: NodeEnv::default(),
        metrics: Arc::clone(&metrics),
        dashboard: dashboard.clone(),
    })?;
    let (metrics_addr, metrics_server) = match &dashboard {
        None => (None, None),
        Some(dashboard) => {
            let for_scrape = Arc::clone(&metrics);
            let routes = Some(dashboard.routes());
            let (addr, task) =
                serve_metrics(&config.metrics.listen_addr, Arc::new(move || for_scrape.encode()), routes).await?;
            tracing::info!(channel = "metrics", event = "dashboard_listening", %addr,
                "the dashboard is at http://{addr}/ (read-only; loopback only)");
            (Some(addr), Some(task))
        }
    };
    let addr = opts.listen_addr.unwrap_or_else(|| config.transport.listen_addr.clone());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| Error::config_invalid("transport.listen_addr", format!("cannot listen on {addr}: {e}")))?;
    let local_addr = listener.local_addr().map_err(|e| Error::internal(format!("listener address of {addr}: {e}")))?;
    tracing::info!(channel = "transport", event = "transport_server_starting", addr = %local_addr,
        data_dir = %data_dir.display(), tls_dir = %tls_dir.display(), "transport_server_starting");
    let blobs = rollout_cloud_local::FsObjectStore::open(data_dir.join(BLOB_DIR))?
        .with_max_object_bytes(config.limits.max_blob_bytes);
    // Temporary files a crashed writer left (an upload, a certificate write), old enough
    // that no live writer can own them.
    let swept_blobs = blobs.remove_stale_tmp(STALE_TMP_AGE)?;
    let swept_tls = tls::remove_stale_tmp(tls_dir, STALE_TMP_AGE)?;
    if swept_blobs + swept_tls > 0 {
        tracing::info!(
            channel = "transport",
            event = "stale_tmp_removed",
            blobs = swept_blobs,
            tls = swept_tls,
            "removed {} temporary file(s) older than {}s that crashed writers left ({swept_blobs} under {}, {swept_tls} under {})",
            swept_blobs + swept_tls,
            STALE_TMP_AGE.as_secs(),
            data_dir.join(BLOB_DIR).display(),
            tls_dir.display()
        );
    }
    // The blob retention sweep, until shutdown (it holds nothing the server needs).
    {
        let (store, storage, keep_for) = (blobs.clone(), Arc::clone(&storage_for_sweep), config.tasks.job_retention);
        let mut stop = shutdown_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(crate::blob_retention::SWEEP_EVERY) => {}
                    _ = stop.changed() => return,
                }
                let (store, storage) = (store.clone(), Arc::clone(&storage));
                let swept = tokio::task::spawn_blocking(move || {
                    crate::blob_retention::sweep(&store, &*storage, keep_for, std::time::SystemTime::now())
                })
                .await;
                match swept {
                    Ok(Ok(s)) if s.removed > 0 => tracing::info!(
                        channel = "blobs",
                        event = "blob_sweep",
                        kept = s.kept,
                        removed = s.removed,
                        removed_bytes = s.removed_bytes,
                        "blob retention sweep"
                    ),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(channel = "blobs", error = %e, "blob retention sweep failed"),
                    Err(e) => tracing::warn!(channel = "blobs", error = %e, "blob retention sweep panicked"),
                }
            }
        });
    }
    let api = CoordinatorApi::new(handle.clone(), ResultStore::new(storage_for_results), &config)
        .with_shutdown(shutdown_rx.clone())
        .with_blobs(blobs)
        .with_worker_certs(worker_certs);
    let limits = ServeLimits::from_config(&config);
    let enrollment_limits = config.limits;
    let worker_cert_lifetime = config.transport.worker_cert_lifetime;
    let mut stop = shutdown_rx;
    let tls_dir_for_enrollment = tls_dir.clone();
    let server = tokio::spawn(async move {
        let shutdown = async move {
            while !*stop.borrow() {
                if stop.changed().await.is_err() {
                    return;
                }
            }
        };
        let enrollment = Some(
            EnrollmentApi::with_limits(tls_dir_for_enrollment, &enrollment_limits)
                .with_worker_cert_lifetime(worker_cert_lifetime),
        );
        serve_coordinator_with_enrollment(api, enrollment, tcp_incoming(listener), server_tls, limits, shutdown).await
    });
    Ok(RunningCoordinator {
        storage: Arc::clone(&storage_for_sweep),
        local_addr,
        handle,
        metrics_addr,
        metrics,
        metrics_server,
        shutdown: shutdown_tx,
        driver,
        server,
    })
}

/// The single HTTP/2 connection (opened lazily, re-opened on demand) from a client
/// holding `client` to the coordinator at `addr`, trusting the CA at `ca_cert`.
pub fn connect(addr: &str, ca_cert: &Path, client: &CertFiles) -> Result<Channel> {
    let config = tls::client_config(ca_cert, client)?;
    let connector = TlsConnector::new(TcpDialer::new(addr), config, tls::server_name_of(addr)?);
    Ok(lazy_channel(connector))
}

/// An operator client using `operators/<name>/cert.pem` from `transport.tls_dir`.
pub fn operator_client(config: &Config, name: &str, addr: Option<&str>) -> Result<OperatorClient<Channel>> {
    let dir = &config.transport.tls_dir;
    let addr = addr.unwrap_or(&config.transport.coordinator_addr);
    tls::migrate_layout(dir)?;
    let files = CertFiles::operator(dir, name);
    if files.cert.exists() {
        tls::check_own_certificate(
            &files,
            std::time::SystemTime::now(),
            &format!("issue a new one where the CA is: rollout certs issue --operator {name}"),
        )?;
    }
    let channel = connect(addr, &CertFiles::ca(dir).cert, &files)?;
    let max = config.limits.max_message_bytes as usize;
    Ok(OperatorClient::new(channel).max_decoding_message_size(max).max_encoding_message_size(max))
}

/// What a worker process needs besides the config.
pub struct WorkerOptions {
    /// The effective config.
    pub config: Config,
    /// Its id (its certificate must be `workers/<id>/cert.pem` in `transport.tls_dir`).
    pub id: WorkerId,
    /// Concurrent tasks.
    pub slots: u32,
    /// The plugin host.
    pub plugins: Arc<dyn PluginHost>,
    /// Worker-side history events.
    pub emitter: Arc<dyn EventEmitter>,
    /// Overrides `config.transport.coordinator_addr`.
    pub coordinator_addr: Option<String>,
    /// Overrides the certificate files (default: from `transport.tls_dir`).
    pub cert: Option<CertFiles>,
    /// Seeds jitter (default: derived from the clock and the id).
    pub rng_seed: Option<u64>,
}

impl std::fmt::Debug for WorkerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerOptions").field("id", &self.id).field("slots", &self.slots).finish_non_exhaustive()
    }
}

/// Runs a worker until `shutdown` turns true (`Ok`) or the coordinator refuses it
/// for good (`Err`). Inventory comes from `/proc` (and NVML when built in).
pub async fn run_worker_process(opts: WorkerOptions, shutdown: watch::Receiver<bool>) -> Result<()> {
    use rollout_core::traits::ComputeHint;
    let config = opts.config;
    let dir: PathBuf = config.transport.tls_dir.clone();
    tls::migrate_layout(&dir)?;
    let cert = opts.cert.unwrap_or_else(|| CertFiles::worker(&dir, &opts.id));
    let addr = opts.coordinator_addr.unwrap_or_else(|| config.transport.coordinator_addr.clone());
    match crate::renewal::finish_pending_renewal(&cert)? {
        crate::renewal::Pending::None => {}
        pending => tracing::warn!(channel = "tls", event = "renewal_recovered", worker = %opts.id, ?pending,
            "a certificate renewal was cut short by a crash: {pending:?} ({})", cert.cert.display()),
    }
    let own = tls::check_own_certificate(
        &cert,
        std::time::SystemTime::now(),
        &format!(
            "a worker whose certificate has expired re-enrolls with a token: rollout worker --join ADDR --token T \
             (make one with rollout token create --worker {})",
            opts.id
        ),
    )?;
    let left = own.not_after.duration_since(std::time::SystemTime::now()).unwrap_or_default();
    let lifetime = own.not_after.duration_since(own.not_before).unwrap_or_default();
    if left < lifetime / 3 {
        tracing::warn!(channel = "tls", event = "certificate_expiring", worker = %opts.id, serial = %own.serial,
            expires = %crate::enroll::utc_text(own.not_after),
            "the worker's certificate {} expires at {} ({}s from now); it is renewed over the connection once \
             registered (or re-enroll with a token)",
            cert.cert.display(), crate::enroll::utc_text(own.not_after), left.as_secs());
    } else {
        tracing::info!(channel = "tls", event = "certificate_loaded", worker = %opts.id, serial = %own.serial,
            expires = %crate::enroll::utc_text(own.not_after), "worker certificate valid until {}",
            crate::enroll::utc_text(own.not_after));
    }
    let ca_cert = CertFiles::ca(&dir).cert;
    let client_tls = crate::renewal::client_config(&ca_cert, &cert)?;
    let channel = lazy_channel(TlsConnector::new(
        TcpDialer::new(addr.clone()),
        Arc::clone(&client_tls.config),
        tls::server_name_of(&addr)?,
    ));
    let inventory = rollout_cloud_local::LocalComputeHint::new().inventory().unwrap_or_default();
    let mut settings =
        WorkerSettings::from_config(opts.id.clone(), opts.slots, opts.plugins.plugins(), inventory, &config);
    // The machine keeps the certificate alive: it says when to renew, and stops the
    // worker if it expires unrenewed.
    settings.credential = Some(rollout_worker::Credential { not_before: own.not_before, not_after: own.not_after });
    let rng_seed = opts.rng_seed.unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        nanos ^ rollout_core::ContentId::of(opts.id.as_str().as_bytes()).as_bytes()[0] as u64
    });
    let metrics = Arc::new(WorkerMetrics::new(opts.slots));
    let metrics_server = if config.metrics.worker_listen_addr.is_empty() {
        None
    } else {
        let for_scrape = Arc::clone(&metrics);
        let addr = &config.metrics.worker_listen_addr;
        let (_, task) = serve_metrics(addr, Arc::new(move || for_scrape.encode()), None)
            .await
            .map_err(|e| Error::config_invalid("metrics.worker_listen_addr", e.to_string()))?;
        Some(task)
    };
    let cache_dir = config.storage.data_dir.join(BLOB_CACHE_DIR).join(opts.id.as_str());
    create_private_dir(&cache_dir, "storage.data_dir")?;
    let blob_cache = BlobCache::open(&cache_dir, config.storage.blob_cache_bytes, Arc::clone(&metrics))
        .map_err(|e| Error::config_invalid("storage.data_dir", format!("blob cache {}: {e}", cache_dir.display())))?;
    tracing::info!(channel = "register", event = "connecting", worker = %opts.id, coordinator = %addr,
        "connecting to the coordinator at {addr}");
    let ran = run_worker(
        WorkerRuntimeOptions {
            settings,
            plugins: opts.plugins,
            emitter: opts.emitter,
            rng_seed,
            max_message_bytes: config.limits.max_message_bytes as usize,
            shutdown,
            env: NodeEnv::default(),
            metrics,
            blob_cache: Some(Arc::new(blob_cache)),
            renewal: Some(crate::renewal::RenewalContext {
                channel: channel.clone(),
                worker: opts.id.clone(),
                files: cert.clone(),
                ca_cert,
                tls: client_tls,
                max_message_bytes: config.limits.max_message_bytes as usize,
            }),
        },
        channel,
    )
    .await;
    if let Some(task) = metrics_server {
        task.abort();
    }
    ran
}
