//! A layer-2 node's parts: its history recorder, wall clock, dialer, and the software
//! each host runs after every start (coordinator and worker).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use rollout_coordinator::CoordinatorSettings;
use rollout_core::history::HistoryRecord;
use rollout_core::traits::{EventEmitter, Inventory, PluginHost, Storage};
use rollout_core::{Config, WorkerId};
use rollout_storage::{MemDisk, RedbStorage};
use rollout_transport::coordinator::{CoordinatorDriverOptions, spawn_coordinator_driver};
use rollout_transport::net::{Dialer, TlsConnector, lazy_channel};
use rollout_transport::tls;
use rollout_transport::worker::{WorkerRuntimeOptions, run_worker};
use rollout_transport::{
    BlockingWork, BuiltinPlugins, CoordinatorApi, NodeEnv, PluginTime, ResultStore, ServeLimits, WallClock,
    serve_coordinator,
};
use rollout_worker::WorkerSettings;
use tokio::sync::watch;

use super::tap::{Tap, Tapped};
use super::{COORDINATOR, PORT};

/// One node's history in emission order, readable without copying it.
#[derive(Debug, Default)]
pub struct Recorder {
    pub(super) records: Mutex<Vec<HistoryRecord>>,
}

impl Recorder {
    /// Runs `f` over the records so far.
    pub fn with<R>(&self, f: impl FnOnce(&[HistoryRecord]) -> R) -> R {
        f(&self.records.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(super) fn snapshot(&self) -> Vec<HistoryRecord> {
        self.with(<[HistoryRecord]>::to_vec)
    }
}

impl EventEmitter for Recorder {
    fn emit(&self, record: &HistoryRecord) {
        self.records.lock().unwrap_or_else(PoisonError::into_inner).push(record.clone());
    }
}

/// A host's wall clock: turmoil's logical time (from a fixed epoch) plus the host's
/// own offset, which the test may step forwards or back while the host runs.
#[derive(Debug, Clone, Default)]
pub struct HostWallClock {
    pub(super) offset_ms: Arc<AtomicI64>,
}

impl HostWallClock {
    /// The reading at `since_epoch` of logical time.
    pub(super) fn at(&self, since_epoch: Duration) -> SystemTime {
        let base = SystemTime::UNIX_EPOCH + since_epoch;
        let offset_ms = self.offset_ms.load(Ordering::Relaxed);
        let by = Duration::from_millis(offset_ms.unsigned_abs());
        if offset_ms >= 0 { base + by } else { base - by }
    }

    pub(super) fn step(&self, by_ms: i64) {
        self.offset_ms.fetch_add(by_ms, Ordering::Relaxed);
    }
}

impl WallClock for HostWallClock {
    fn now(&self) -> SystemTime {
        self.at(turmoil::since_epoch().expect("a host's wall clock is read inside its turmoil host"))
    }
}

/// Dials the coordinator over turmoil's TCP from `host`, its writes tapped.
#[derive(Debug, Clone)]
pub(super) struct TurmoilDialer {
    pub(super) host: String,
    pub(super) tap: Tap,
}

impl Dialer for TurmoilDialer {
    type Io = Tapped<turmoil::net::TcpStream>;

    fn dial(&self) -> Pin<Box<dyn Future<Output = io::Result<Self::Io>> + Send>> {
        let (host, tap) = (self.host.clone(), self.tap.clone());
        Box::pin(async move {
            let io = turmoil::net::TcpStream::connect((COORDINATOR, PORT)).await?;
            Ok(tap.wrap(&host, io))
        })
    }
}

/// The coordinator's software: what runs after every start and bounce.
#[derive(Clone)]
pub(super) struct CoordinatorNode {
    pub(super) config: Config,
    pub(super) tap: Tap,
    pub(super) disk: MemDisk,
    /// The write-ahead log's disk (`storage.wal_bytes`), as the real coordinator keeps
    /// `rollout.db.wal` beside its database.
    pub(super) log_disk: MemDisk,
    pub(super) history: Arc<Recorder>,
    pub(super) wall: HostWallClock,
    pub(super) tls: Arc<rustls::ServerConfig>,
}

impl CoordinatorNode {
    pub(super) async fn run(self) -> turmoil::Result {
        let storage: Arc<dyn Storage> = Arc::new(match self.config.storage.wal_bytes {
            0 => RedbStorage::open_in_memory(&self.disk)?,
            wal_bytes => RedbStorage::open_in_memory_with_wal(&self.disk, &self.log_disk, wal_bytes)?,
        });
        // Never sent: the host runs until turmoil crashes it.
        let (_running, shutdown) = watch::channel(false);
        let results = ResultStore::new(Arc::clone(&storage));
        let (handle, driver) = spawn_coordinator_driver(CoordinatorDriverOptions {
            storage,
            settings: CoordinatorSettings::from_config(&self.config),
            emitter: self.history,
            shutdown,
            env: NodeEnv { wall_clock: Arc::new(self.wall), blocking: BlockingWork::Inline, plugin_time: None },
            metrics: Default::default(),
            dashboard: None,
        })?;
        let api = CoordinatorApi::new(handle, results, &self.config);
        let listener = turmoil::net::TcpListener::bind(("0.0.0.0", PORT)).await?;
        let tap = self.tap.clone();
        let incoming = futures_util::stream::unfold(listener, move |listener| {
            let tap = tap.clone();
            async move {
                let accepted = listener.accept().await.map(|(io, peer)| (tap.wrap(COORDINATOR, io), peer.to_string()));
                Some((accepted, listener))
            }
        });
        let limits = ServeLimits::from_config(&self.config);
        tokio::select! {
            biased;
            stopped = driver => Err(format!("the coordinator driver stopped: {stopped:?}").into()),
            served = serve_coordinator(api, incoming, self.tls, limits, std::future::pending()) => {
                Err(format!("the coordinator's server stopped: {served:?}").into())
            }
        }
    }
}

/// A worker's software.
#[derive(Clone)]
pub(super) struct WorkerNode {
    pub(super) config: Config,
    pub(super) tap: Tap,
    pub(super) id: WorkerId,
    pub(super) slots: u32,
    pub(super) plugin_time: Option<PluginTime>,
    pub(super) rng_seed: u64,
    /// How often the host has started: each start is a new process, with its own seed
    /// (and so its own boot in every Register), as a real restart draws one.
    pub(super) starts: Arc<AtomicU64>,
    pub(super) history: Arc<Recorder>,
    pub(super) wall: HostWallClock,
    pub(super) tls: Arc<rustls::ClientConfig>,
}

impl WorkerNode {
    pub(super) async fn run(self) -> turmoil::Result {
        let dialer = TurmoilDialer { host: self.id.to_string(), tap: self.tap.clone() };
        let connector = TlsConnector::new(dialer, self.tls, tls::server_name_of(COORDINATOR)?);
        let (_running, shutdown) = watch::channel(false);
        let plugins = Arc::new(BuiltinPlugins);
        let settings =
            WorkerSettings::from_config(self.id, self.slots, plugins.plugins(), Inventory::default(), &self.config);
        let options = WorkerRuntimeOptions {
            settings,
            plugins,
            emitter: self.history,
            rng_seed: self.rng_seed ^ self.starts.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            max_message_bytes: self.config.limits.max_message_bytes as usize,
            shutdown,
            env: NodeEnv {
                wall_clock: Arc::new(self.wall),
                blocking: BlockingWork::Inline,
                plugin_time: self.plugin_time,
            },
            metrics: Arc::new(rollout_transport::metrics::WorkerMetrics::new(0)),
            blob_cache: None,
            renewal: None,
        };
        run_worker(options, lazy_channel(connector)).await?;
        Ok(())
    }
}
