//! Connections: mutual TLS over any byte stream. The server side turns a stream of
//! accepted connections into a stream of verified TLS connections that carry their
//! peer's role (for tonic's `serve_with_incoming`); the client side is a connector for
//! `Endpoint::connect_with_connector_lazy` that dials through a [`Dialer`].
//!
//! Both are generic over the byte stream, so the same code runs over real TCP and over
//! a simulated network.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::limiter::{LogLimiter, source_of};
use crate::tls::{PeerRole, peer_role};

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Verified connections waiting for the server to pick them up.
const ACCEPTED_BACKLOG: usize = 64;
/// A refused connection is logged once per source per this interval.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// How many connections the server keeps, and for how long one without a client
/// certificate (from `[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once; beyond it, a new one is closed when accepted.
    pub max_connections: usize,
    /// Of those, connections without a client certificate (they may only enroll).
    pub max_unauthenticated: usize,
    /// TLS handshakes in progress at once; the next connection waits to start its own.
    pub max_handshakes: usize,
    /// A connection without a client certificate is closed this long after its handshake.
    pub unauthenticated_timeout: Duration,
}

impl ConnectionLimits {
    /// The limits of a config.
    pub fn from_config(limits: &rollout_core::config::LimitsConfig) -> Self {
        ConnectionLimits {
            max_connections: limits.max_connections as usize,
            max_unauthenticated: limits.max_unauthenticated_connections as usize,
            max_handshakes: limits.max_handshakes_in_flight as usize,
            unauthenticated_timeout: limits.unauthenticated_connection_timeout,
        }
    }
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits::from_config(&rollout_core::config::LimitsConfig::default())
    }
}

/// One place in a connection count, given back when dropped.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A place, if fewer than `max` are taken.
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Slot(Arc::clone(count)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the server knows about a connection's peer; every request on the connection
/// carries it as a request extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The role in the peer's verified client certificate (`None`: no rollout role).
    pub role: Option<PeerRole>,
    /// The peer's address, for logs.
    pub remote: String,
    /// How the connection's byte stream ended, once it has.
    pub connection: ConnectionWatch,
    /// Set once the peer's certificate is revoked (every RPC is refused from then on).
    pub revoked: RevokedWatch,
    /// The peer's verified client certificate: serial and expiry (`None`: none).
    pub cert: Option<PeerCert>,
}

/// What a connection's client certificate says, for status and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// Serial number, hex.
    pub serial: String,
    /// When it expires.
    pub not_after: std::time::SystemTime,
}

/// Shared view of whether a connection's certificate has been revoked; equal only to
/// its own clones. The default (no certificate, or no deny list) is never revoked.
#[derive(Debug, Clone, Default)]
pub struct RevokedWatch(Option<Arc<crate::revocation::RevokeFlag>>);

impl RevokedWatch {
    /// Whether the certificate has been revoked.
    pub fn is_revoked(&self) -> bool {
        self.0.as_ref().is_some_and(|f| f.is_revoked())
    }
}

impl PartialEq for RevokedWatch {
    fn eq(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl Eq for RevokedWatch {}

/// How a connection's byte stream ended, as the first read (or write) that did not
/// carry bytes showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// Not ended (as far as reads and writes have seen).
    Open,
    /// The peer's kernel closed it (FIN): the peer's process closed the socket or is
    /// gone. A middlebox resets connections; it does not close them.
    ClosedByPeer,
    /// Reset (RST) or failed otherwise: the peer may still be running.
    Broken,
}

/// Shared view of one connection's [`ConnectionEnd`]; the first end seen sticks.
/// Equal only to its own clones.
#[derive(Debug, Clone, Default)]
pub struct ConnectionWatch(Arc<AtomicU8>);

impl ConnectionWatch {
    const OPEN: u8 = 0;
    const CLOSED: u8 = 1;
    const BROKEN: u8 = 2;

    /// How the connection ended so far.
    pub fn end(&self) -> ConnectionEnd {
        match self.0.load(Ordering::Acquire) {
            Self::OPEN => ConnectionEnd::Open,
            Self::CLOSED => ConnectionEnd::ClosedByPeer,
            _ => ConnectionEnd::Broken,
        }
    }

    fn note(&self, end: u8) {
        let _ = self.0.compare_exchange(Self::OPEN, end, Ordering::AcqRel, Ordering::Acquire);
    }
}

impl PartialEq for ConnectionWatch {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ConnectionWatch {}

/// A byte stream that notes in its [`ConnectionWatch`] how it ended: an empty read is
/// the peer's FIN, an error a reset or worse. It sits under TLS, so it sees the
/// kernel's view (a killed process sends no TLS close_notify, only the FIN).
#[derive(Debug)]
pub struct Watched<IO> {
    inner: IO,
    watch: ConnectionWatch,
}

impl<IO> Watched<IO> {
    /// Watches `inner`.
    pub fn new(inner: IO, watch: ConnectionWatch) -> Self {
        Watched { inner, watch }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) if wanted && buf.filled().len() == before => self.watch.note(ConnectionWatch::CLOSED),
            Poll::Ready(Err(_)) => self.watch.note(ConnectionWatch::BROKEN),
            _ => {}
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Err(_)) = &polled {
            self.watch.note(ConnectionWatch::BROKEN);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Err(_)) = &polled {
            self.watch.note(ConnectionWatch::BROKEN);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A server-side TLS connection whose client certificate was verified (or that has
/// none, and may only enroll until its deadline).
#[derive(Debug)]
pub struct PeerStream<IO> {
    inner: tokio_rustls::server::TlsStream<Watched<IO>>,
    info: PeerInfo,
    /// Its places in the connection counts, given back when it closes.
    _slots: (Slot, Option<Slot>),
    /// When a connection without a client certificate is cut.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Its certificate's place in the deny list: reads and writes fail once revoked.
    live: Option<crate::revocation::LiveCert>,
}

impl<IO> PeerStream<IO> {
    /// An error once the deadline of a connection without a certificate has passed.
    fn check_deadline(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match &mut self.deadline {
            Some(deadline) => deadline
                .as_mut()
                .poll(cx)
                .map(|()| io::Error::new(io::ErrorKind::TimedOut, "connection without a client certificate timed out")),
            None => Poll::Pending,
        }
    }

    /// An error once the certificate is revoked (the reader is woken when it is).
    fn check_revoked(&self, cx: &mut Context<'_>) -> Option<io::Error> {
        let live = self.live.as_ref()?;
        live.flag.register(cx.waker());
        live.flag
            .is_revoked()
            .then(|| io::Error::new(io::ErrorKind::PermissionDenied, "the peer's certificate was revoked"))
    }
}

impl<IO> Connected for PeerStream<IO> {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for PeerStream<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.check_deadline(cx) {
            return Poll::Ready(Err(e));
        }
        if let Some(e) = self.check_revoked(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PeerStream<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Poll::Ready(e) = self.check_deadline(cx) {
            return Poll::Ready(Err(e));
        }
        if let Some(e) = self.check_revoked(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepted TCP connections as `(stream, peer address)`, with `TCP_NODELAY` set.
/// Accept errors (e.g. out of file descriptors) are logged and retried after a pause.
pub fn tcp_incoming(listener: TcpListener) -> impl Stream<Item = io::Result<(TcpStream, String)>> + Send + 'static {
    futures_util::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((Ok((stream, addr.to_string())), listener));
                }
                Err(e) => {
                    tracing::warn!(channel = "transport", error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// Runs the TLS handshake on every accepted connection (at most
/// `limits.max_handshakes` at once, each bounded by [`HANDSHAKE_TIMEOUT`]) and yields
/// only the verified ones. A failed handshake (a certificate from another CA, garbage)
/// is logged as `mtls_handshake_failed` and dropped; it never ends the stream, so it
/// never stops the server. Beyond `limits.max_connections` open connections, a new one
/// is closed at once; a connection without a client certificate counts against
/// `limits.max_unauthenticated` too and is cut `limits.unauthenticated_timeout` after
/// its handshake (it needs one Enroll call). A connection with a client certificate is
/// registered in `deny` under its serial, and its reads and writes fail once that serial
/// is revoked. Refusals are logged once per source per [`REFUSAL_LOG_INTERVAL`].
pub fn tls_incoming<L, IO, E>(
    listener: L,
    config: Arc<ServerConfig>,
    limits: ConnectionLimits,
    deny: Arc<crate::revocation::DenyList>,
) -> impl Stream<Item = Result<PeerStream<IO>, io::Error>> + Send + 'static
where
    L: Stream<Item = Result<(IO, String), E>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (tx, rx) = mpsc::channel(ACCEPTED_BACKLOG);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes.max(1)));
    let open = Arc::new(AtomicUsize::new(0));
    let unauthenticated = Arc::new(AtomicUsize::new(0));
    let refusals = Arc::new(LogLimiter::new(REFUSAL_LOG_INTERVAL));
    tokio::spawn(async move {
        let mut listener = std::pin::pin!(listener);
        while let Some(next) = listener.next().await {
            let (io, remote) = match next {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(channel = "transport", error = %e, "accept failed");
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let Some(slot) = Slot::take(&open, limits.max_connections) else {
                refused(&refusals, &remote, "connection_refused", "limits.max_connections connections are open");
                drop(io);
                continue;
            };
            // Back-pressure: beyond the handshake bound, accepting waits (the kernel's
            // backlog holds the rest).
            let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else { break };
            let (acceptor, tx, unauthenticated, refusals, deny) =
                (acceptor.clone(), tx.clone(), Arc::clone(&unauthenticated), Arc::clone(&refusals), Arc::clone(&deny));
            tokio::spawn(async move {
                let connection = ConnectionWatch::default();
                let io = Watched::new(io, connection.clone());
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await;
                drop(permit);
                match handshake {
                    Ok(Ok(stream)) => {
                        let certified = stream.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                        let leaf = stream.get_ref().1.peer_certificates().and_then(|c| c.first());
                        let role = leaf.and_then(|c| peer_role(c));
                        let cert = leaf
                            .and_then(|c| crate::tls::CertInfo::of_der(c))
                            .map(|info| PeerCert { serial: info.serial, not_after: info.not_after });
                        let live = cert.as_ref().map(|c| deny.register(c.serial.clone()));
                        let revoked = RevokedWatch(live.as_ref().map(|l| Arc::clone(&l.flag)));
                        let (extra, deadline) = if certified {
                            (None, None)
                        } else {
                            let Some(extra) = Slot::take(&unauthenticated, limits.max_unauthenticated) else {
                                refused(
                                    &refusals,
                                    &remote,
                                    "connection_refused",
                                    "limits.max_unauthenticated_connections connections without a certificate are open",
                                );
                                return;
                            };
                            (Some(extra), Some(Box::pin(tokio::time::sleep(limits.unauthenticated_timeout))))
                        };
                        tracing::debug!(channel = "tls", event = "mtls_handshake_ok", %remote, ?role);
                        let peer = PeerStream {
                            inner: stream,
                            info: PeerInfo { role, remote, connection, revoked, cert },
                            _slots: (slot, extra),
                            deadline,
                            live,
                        };
                        let _ = tx.send(Ok(peer)).await;
                    }
                    Ok(Err(e)) => refused(&refusals, &remote, "mtls_handshake_failed", &e.to_string()),
                    Err(_) => refused(&refusals, &remote, "mtls_handshake_failed", "handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Logs a refused connection, once per source per [`REFUSAL_LOG_INTERVAL`].
fn refused(refusals: &LogLimiter, remote: &str, event: &'static str, why: &str) {
    if let Some(suppressed) = refusals.admit(source_of(remote), tokio::time::Instant::now()) {
        tracing::warn!(channel = "tls", event, %remote, reason = why, suppressed,
            "{event}: {why} (further refusals of this source are logged at most every {REFUSAL_LOG_INTERVAL:?})");
    }
}

/// Opens byte streams to the coordinator. Implemented for TCP by [`TcpDialer`]; a
/// simulated network implements it for its own streams.
pub trait Dialer: Clone + Send + Sync + 'static {
    /// The byte stream.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Opens one connection.
    fn dial(&self) -> Pin<Box<dyn Future<Output = io::Result<Self::Io>> + Send>>;
}

/// Dials `host:port` over TCP with `TCP_NODELAY`.
#[derive(Debug, Clone)]
pub struct TcpDialer {
    addr: String,
}

impl TcpDialer {
    /// A dialer for `addr` (`host:port`).
    pub fn new(addr: impl Into<String>) -> Self {
        TcpDialer { addr: addr.into() }
    }
}

impl Dialer for TcpDialer {
    type Io = TcpStream;

    fn dial(&self) -> Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>> {
        let addr = self.addr.clone();
        Box::pin(async move {
            let stream = TcpStream::connect(&addr).await?;
            let _ = stream.set_nodelay(true);
            Ok(stream)
        })
    }
}

/// A tonic connector: dials, then runs the client side of mutual TLS.
#[derive(Clone)]
pub struct TlsConnector<D> {
    dialer: D,
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
}

impl<D: std::fmt::Debug> std::fmt::Debug for TlsConnector<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector").field("dialer", &self.dialer).field("server_name", &self.server_name).finish()
    }
}

impl<D: Dialer> TlsConnector<D> {
    /// Dials with `dialer` and checks the server's certificate against `server_name`.
    pub fn new(dialer: D, config: Arc<ClientConfig>, server_name: ServerName<'static>) -> Self {
        TlsConnector { dialer, tls: tokio_rustls::TlsConnector::from(config), server_name }
    }
}

type ConnectFuture<T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send>>;

impl<D: Dialer> tower_service::Service<Uri> for TlsConnector<D> {
    type Response = TokioIo<tokio_rustls::client::TlsStream<D::Io>>;
    type Error = io::Error;
    type Future = ConnectFuture<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let (dialer, tls, name) = (self.dialer.clone(), self.tls.clone(), self.server_name.clone());
        Box::pin(async move {
            let io = dialer.dial().await?;
            let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.connect(name, io))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
            Ok(TokioIo::new(stream))
        })
    }
}

/// One HTTP/2 connection to the coordinator, opened on first use and re-opened on
/// demand after it breaks. Every RPC of a worker or operator shares it.
pub fn lazy_channel<D: Dialer>(connector: TlsConnector<D>) -> Channel {
    Endpoint::from_static("http://rollout.coordinator")
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(connector)
}
