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

use crate::tls::{PeerRole, peer_role};

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Verified connections waiting for the server to pick them up.
const ACCEPTED_BACKLOG: usize = 64;

/// What the server knows about a connection's peer; every request on the connection
/// carries it as a request extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The role in the peer's verified client certificate (`None`: no rollout role).
    pub role: Option<PeerRole>,
    /// The peer's address, for logs.
    pub remote: String,
}

/// A server-side TLS connection whose client certificate was verified.
#[derive(Debug)]
pub struct PeerStream<IO> {
    inner: tokio_rustls::server::TlsStream<IO>,
    info: PeerInfo,
}

impl<IO> Connected for PeerStream<IO> {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for PeerStream<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for PeerStream<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
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

/// Runs the TLS handshake on every accepted connection (concurrently, each bounded by
/// [`HANDSHAKE_TIMEOUT`]) and yields only the verified ones. A failed handshake (no
/// client certificate, a certificate from another CA, garbage) is logged as
/// `mtls_handshake_failed` and dropped; it never ends the stream, so it never stops
/// the server.
pub fn tls_incoming<L, IO, E>(
    listener: L,
    config: Arc<ServerConfig>,
) -> impl Stream<Item = Result<PeerStream<IO>, io::Error>> + Send + 'static
where
    L: Stream<Item = Result<(IO, String), E>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (tx, rx) = mpsc::channel(ACCEPTED_BACKLOG);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
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
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                    Ok(Ok(stream)) => {
                        let role =
                            stream.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| peer_role(c));
                        tracing::debug!(channel = "tls", event = "mtls_handshake_ok", %remote, ?role);
                        let _ = tx.send(Ok(PeerStream { inner: stream, info: PeerInfo { role, remote } })).await;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(channel = "tls", event = "mtls_handshake_failed", %remote, error = %e,
                            "mtls_handshake_failed: connection refused");
                    }
                    Err(_) => {
                        tracing::warn!(channel = "tls", event = "mtls_handshake_failed", %remote,
                            "mtls_handshake_failed: handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
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
