//! A tap on every byte a host writes to its TCP connections (TLS records, so
//! handshakes, keys and ciphertext included): one SHA-256 per host over its writes in
//! order, so two runs can be compared down to the bytes on the wire.

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Every host's running digest of what it wrote, and how many bytes.
#[derive(Debug, Clone, Default)]
pub struct Tap {
    hosts: Arc<Mutex<BTreeMap<String, (Sha256, u64)>>>,
}

impl Tap {
    /// `io`, with what it writes added to `host`'s digest.
    pub fn wrap<S>(&self, host: &str, io: S) -> Tapped<S> {
        Tapped { io, host: host.to_owned(), tap: self.clone() }
    }

    fn record(&self, host: &str, bytes: &[u8]) {
        let mut hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        let (hash, len) = hosts.entry(host.to_owned()).or_insert_with(|| (Sha256::new(), 0));
        hash.update(bytes);
        *len += bytes.len() as u64;
    }

    /// `host → (SHA-256 of its writes so far, bytes written)`.
    pub fn digests(&self) -> BTreeMap<String, (String, u64)> {
        let hosts = self.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        hosts
            .iter()
            .map(|(host, (hash, len))| {
                let hex = hash.clone().finalize().iter().map(|b| format!("{b:02x}")).collect();
                (host.clone(), (hex, *len))
            })
            .collect()
    }
}

/// A stream whose writes a [`Tap`] sees.
#[derive(Debug)]
pub struct Tapped<S> {
    io: S,
    host: String,
    tap: Tap,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tapped<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tapped<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &written {
            self.tap.record(&self.host, &buf[..*n]);
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
