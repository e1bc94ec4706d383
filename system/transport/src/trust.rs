//! Trust that changes while connections run.
//!
//! - [`ServerTrust`]: the coordinator's side. The CAs it accepts client certificates
//!   from (every certificate of `ca.pem`) and the chain it presents (`coordinator.pem`,
//!   then `ca.cross.pem` while a CA rotation overlaps, then the CAs), read again when
//!   any of those files changes, so `rollout certs rotate-ca` and `retire-ca` take
//!   effect on the next handshake without a restart. Open connections are not
//!   affected: they were verified when they started.
//! - [`WorkerTrust`]: a worker's side. The CAs it accepts the coordinator's certificate
//!   from, replaced when a renewal brings a new bundle (see `crate::renewal`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rollout_core::{Error, Result};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::tls::{self, CertFiles};

/// The file beside `ca.pem` holding the new CA cross-signed by the previous one, while
/// a rotation overlaps (see `crate::rotation`).
pub const CROSS_FILE: &str = "ca.cross.pem";
/// How often the coordinator looks at its TLS files again.
pub const TRUST_POLL: Duration = Duration::from_secs(1);
/// The most CAs a bundle may hold (the current one, the one being retired, and room).
pub const BUNDLE_CAS_MAX: usize = 4;

struct Loaded {
    /// SHA-256 over the files' contents: unchanged files are not parsed again.
    fingerprint: [u8; 32],
    verifier: Arc<dyn ClientCertVerifier>,
    certified: Arc<CertifiedKey>,
    cas: usize,
}

/// The coordinator's CAs and certificate, reloadable (see the module docs). It is both
/// the client-certificate verifier (wrapped by the deny list) and the certificate
/// resolver of the server's rustls configuration.
pub struct ServerTrust {
    ca_cert: PathBuf,
    cross: PathBuf,
    server: CertFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for ServerTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTrust").field("ca_cert", &self.ca_cert).field("server", &self.server).finish()
    }
}

impl ServerTrust {
    /// Reads the CAs at `ca_cert` (and `ca.cross.pem` beside it, if present) and the
    /// certificate and key in `server`. Errors name the file.
    pub fn load(ca_cert: &Path, server: &CertFiles, provider: Arc<CryptoProvider>) -> Result<Arc<Self>> {
        let cross = ca_cert.with_file_name(CROSS_FILE);
        let bytes = read_all(ca_cert, &cross, server)?;
        let loaded = build(ca_cert, &cross, server, &provider, &bytes)?;
        Ok(Arc::new(ServerTrust {
            ca_cert: ca_cert.to_path_buf(),
            cross,
            server: server.clone(),
            provider,
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    fn current(&self) -> Arc<Loaded> {
        Arc::clone(&self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// How many CAs are trusted now.
    pub fn cas(&self) -> usize {
        self.current().cas
    }

    /// Reads the files again; `Ok(true)` when they changed and now apply. Files that do
    /// not load (a key and certificate that do not fit, for the instant between the
    /// renames of a replacement) leave the last good state in force and are an error.
    pub fn refresh(&self) -> Result<bool> {
        let bytes = read_all(&self.ca_cert, &self.cross, &self.server)?;
        if fingerprint(&bytes) == self.current().fingerprint {
            return Ok(false);
        }
        let loaded = build(&self.ca_cert, &self.cross, &self.server, &self.provider, &bytes)?;
        let cas = loaded.cas;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(loaded);
        tracing::info!(channel = "tls", event = "trust_reloaded", cas, ca_file = %self.ca_cert.display(),
            "read the TLS files again: {cas} CA(s) trusted, server certificate from {}", self.server.cert.display());
        Ok(true)
    }

    /// Refreshes every [`TRUST_POLL`] until `stop` turns true (see [`spawn_refresh`]).
    pub fn spawn_poll(self: &Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        let trust = Arc::clone(self);
        spawn_refresh(TRUST_POLL, stop, "the TLS files", move || trust.refresh().map(drop));
    }
}

/// Calls `refresh` on the blocking pool every `every` until `stop` turns true: how the
/// coordinator follows files another process changes (the deny list, its TLS files). A
/// failure is logged once per streak, naming `what`; whatever `refresh` last loaded
/// stays in force.
pub(crate) fn spawn_refresh(
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    what: &'static str,
    refresh: impl Fn() -> Result<()> + Send + Sync + 'static,
) {
    let refresh = Arc::new(refresh);
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = stop.changed() => return,
            }
            let call = Arc::clone(&refresh);
            match tokio::task::spawn_blocking(move || call()).await {
                Ok(Ok(())) => failing = false,
                Ok(Err(e)) if !failing => {
                    failing = true;
                    tracing::warn!(channel = "tls", event = "reload_failed", what, error = %e,
                        "{what} could not be read again ({e}); the last ones read stay in force, retrying");
                }
                _ => {}
            }
        }
    });
}

struct FileBytes {
    ca: Vec<u8>,
    cross: Option<Vec<u8>>,
    cert: Vec<u8>,
    key: Vec<u8>,
}

fn read_all(ca_cert: &Path, cross: &Path, server: &CertFiles) -> Result<FileBytes> {
    let read = |p: &Path| tls::read_text(p).map(String::into_bytes);
    Ok(FileBytes {
        ca: read(ca_cert)?,
        cross: if cross.exists() { Some(read(cross)?) } else { None },
        cert: read(&server.cert)?,
        key: read(&server.key)?,
    })
}

fn fingerprint(bytes: &FileBytes) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [Some(&bytes.ca), bytes.cross.as_ref(), Some(&bytes.cert), Some(&bytes.key)] {
        let part = part.map_or(&[][..], Vec::as_slice);
        ctx.update(&(part.len() as u64).to_le_bytes());
        ctx.update(part);
    }
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn build(
    ca_cert: &Path,
    cross: &Path,
    server: &CertFiles,
    provider: &Arc<CryptoProvider>,
    bytes: &FileBytes,
) -> Result<Loaded> {
    let cas = tls::parse_certs(ca_cert, &bytes.ca)?;
    if cas.len() > BUNDLE_CAS_MAX {
        return Err(tls::tls_err(ca_cert, &format!("holds {} CAs; at most {BUNDLE_CAS_MAX}", cas.len())));
    }
    let mut roots = rustls::RootCertStore::empty();
    for ca in &cas {
        roots.add(ca.clone()).map_err(|e| tls::tls_err(ca_cert, &format!("not a usable CA certificate: {e}")))?;
    }
    let verifier = tls::client_verifier(roots, Arc::clone(provider), ca_cert)?;
    let mut chain = tls::parse_certs(&server.cert, &bytes.cert)?;
    if let Some(cross_bytes) = &bytes.cross {
        chain.extend(tls::parse_certs(cross, cross_bytes)?);
    }
    for ca in cas.iter() {
        if !chain.contains(ca) {
            chain.push(ca.clone());
        }
    }
    let key = tls::parse_key(&server.key, &bytes.key)?;
    let certified = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| tls::tls_err(&server.cert, &format!("certificate and key do not fit: {e}")))?;
    Ok(Loaded { fingerprint: fingerprint(bytes), verifier, certified: Arc::new(certified), cas: cas.len() })
}

impl ResolvesServerCert for ServerTrust {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current().certified))
    }
}

impl ClientCertVerifier for ServerTrust {
    fn offer_client_auth(&self) -> bool {
        self.current().verifier.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.current().verifier.client_auth_mandatory()
    }

    /// No hints: the names would have to outlive a reload. Clients present their one
    /// certificate regardless.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.current().verifier.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The CAs a worker accepts the coordinator's certificate from, replaceable while its
/// connections use them (a renewal during a CA rotation brings the new bundle).
pub struct WorkerTrust {
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<WebPkiServerVerifier>>,
}

impl std::fmt::Debug for WorkerTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerTrust").finish_non_exhaustive()
    }
}

impl WorkerTrust {
    /// Trusts the CAs in `cas` (`source` names where they came from, for errors).
    pub fn new(cas: &[CertificateDer<'static>], source: &Path, provider: Arc<CryptoProvider>) -> Result<Arc<Self>> {
        let verifier = server_verifier(cas, source, &provider)?;
        Ok(Arc::new(WorkerTrust { provider, current: RwLock::new(verifier) }))
    }

    /// Trusts `cas` from now on (the next handshake).
    pub fn replace(&self, cas: &[CertificateDer<'static>], source: &Path) -> Result<()> {
        let verifier = server_verifier(cas, source, &self.provider)?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = verifier;
        Ok(())
    }

    fn current(&self) -> Arc<WebPkiServerVerifier> {
        Arc::clone(&self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

fn server_verifier(
    cas: &[CertificateDer<'static>],
    source: &Path,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone()).map_err(|e| tls::tls_err(source, &format!("not a usable CA certificate: {e}")))?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(provider))
        .build()
        .map_err(|e| Error::internal(format!("building the server verifier from {}: {e}", source.display())))
}

impl ServerCertVerifier for WorkerTrust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.current().verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
