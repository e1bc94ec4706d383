//! Certificate renewal, the worker's side (issue 18 item 2): a worker renews its own
//! certificate over its authenticated connection before it expires, with no person
//! involved.
//!
//! - **When.** The worker machine decides (`rollout_worker::WorkerSettings::credential`):
//!   at about two thirds of the certificate's validity ([`renew_at`]), less a jitter of
//!   up to a twelfth of it so a fleet issued together does not renew together, it emits
//!   `WorkerOutput::RenewCertificate`; the driver runs [`renew_once`] and reports the
//!   outcome. A failed attempt is retried with jittered exponential backoff (5 s
//!   doubling to 10 min) until the certificate expires; then the machine stops the
//!   worker (`WorkerOutput::CertificateExpired`) and only `rollout worker --join` with a
//!   token gets a new one. Being the machine's, the schedule runs in the simulator too.
//! - **How.** A new key pair is made here and never leaves; its CSR goes to
//!   `Enrollment/Renew` on the worker's connection (the coordinator signs it for the id
//!   in the certificate that connection presents). The answer must verify against the
//!   worker's CA as a client certificate, name this worker and carry this key.
//! - **Atomically and durably.** The new key and certificate are written as
//!   `workers/<id>/key.pem.next` and `workers/<id>/cert.pem.next` (each synced, the directory
//!   too), then the key and then the certificate are renamed into place. A crash in
//!   between is finished at the next start by [`finish_pending_renewal`]: a `.next`
//!   certificate means both were written, so both go into place; a lone `.next` key is
//!   an unfinished attempt and is removed. The old key is gone once the rename lands.
//! - **Live.** The client configuration resolves its certificate through
//!   [`ReloadableClientCert`], so the next handshake presents the new certificate; the
//!   connection open now keeps its session (and its leases) as it is.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rcgen::KeyPair;
use rollout_core::{Error, Result, WorkerId};
use rollout_proto::transport as pb;
use rustls::ClientConfig;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use tonic::transport::Channel;

use crate::tls::{self, ALPN_H2, CertFiles, CertInfo, PeerRole};
use crate::trust::WorkerTrust;

/// The client certificate a worker presents, replaceable while connections use the
/// configuration that holds it.
#[derive(Debug)]
pub struct ReloadableClientCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableClientCert {
    fn certified(
        files: &CertFiles,
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'_>,
    ) -> Result<Arc<CertifiedKey>> {
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider.key_provider.load_private_key(key.clone_key()).map_err(|e| {
            Error::config_invalid(files.key.display().to_string(), format!("not a usable private key: {e}"))
        })?;
        Ok(Arc::new(CertifiedKey::new(chain, signing)))
    }

    /// The certificate now presented.
    pub fn current(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    fn replace(&self, certified: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = certified;
    }
}

impl ResolvesClientCert for ReloadableClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What a worker's connections use: the rustls configuration, the certificate it
/// presents and the CAs it trusts, both replaced by a renewal.
#[derive(Debug, Clone)]
pub struct WorkerTls {
    /// The client configuration (resumption off).
    pub config: Arc<ClientConfig>,
    /// The certificate presented, replaced on renewal.
    pub cert: Arc<ReloadableClientCert>,
    /// The CAs the coordinator's certificate must chain to, replaced when a renewal
    /// brings a new bundle (a CA rotation).
    pub trust: Arc<WorkerTrust>,
}

/// A client configuration trusting the CAs at `ca_cert` and presenting `files`, both
/// replaceable (see [`WorkerTls`]).
pub fn client_config(ca_cert: &Path, files: &CertFiles) -> Result<WorkerTls> {
    let (chain, key) = tls::load_pair(files)?;
    let cert =
        Arc::new(ReloadableClientCert { current: RwLock::new(ReloadableClientCert::certified(files, chain, &key)?) });
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let trust = WorkerTrust::new(&tls::load_certs(ca_cert)?, ca_cert, Arc::clone(&provider))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS versions: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::clone(&trust) as Arc<dyn rustls::client::danger::ServerCertVerifier>)
        .with_client_cert_resolver(Arc::clone(&cert) as Arc<dyn ResolvesClientCert>);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No session resumption: a TLS 1.3 resumption does not authenticate the client again,
    // so a reconnect after a renewal would carry the old certificate's identity (and,
    // once that one is revoked, be refused). A worker reconnects rarely; a full
    // handshake then costs a millisecond.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(WorkerTls { config: Arc::new(config), cert, trust })
}

/// Where a renewal stages its files before renaming them into place.
pub fn staged(files: &CertFiles) -> CertFiles {
    let next = |p: &Path| {
        let mut name = p.as_os_str().to_owned();
        name.push(".next");
        PathBuf::from(name)
    };
    CertFiles { cert: next(&files.cert), key: next(&files.key) }
}

/// What [`finish_pending_renewal`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// No renewal was cut short.
    None,
    /// A renewal's new files were in place but not yet renamed: they are now.
    RolledForward,
    /// A renewal was cut short before its certificate was written: its key is removed.
    Discarded,
}

/// Finishes (or discards) a renewal a crash cut short; run before the files are read.
pub fn finish_pending_renewal(files: &CertFiles) -> Result<Pending> {
    let next = staged(files);
    let io = |what: &str, path: &Path, e: std::io::Error| tls::io_err(what, path, &e);
    let outcome = if next.cert.exists() {
        if next.key.exists() {
            std::fs::rename(&next.key, &files.key).map_err(|e| io("renaming into place", &files.key, e))?;
        }
        std::fs::rename(&next.cert, &files.cert).map_err(|e| io("renaming into place", &files.cert, e))?;
        Pending::RolledForward
    } else if next.key.exists() {
        std::fs::remove_file(&next.key).map_err(|e| io("removing", &next.key, e))?;
        Pending::Discarded
    } else {
        return Ok(Pending::None);
    };
    sync_dir(&files.cert)?;
    Ok(outcome)
}

fn sync_dir(file: &Path) -> Result<()> {
    let dir = file.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| tls::io_err("syncing directory", dir, &e))
}

pub use rollout_worker::renew_at;

/// When a worker whose machine was seeded with `rng_seed` first asks to renew a
/// certificate valid from `not_before` to `not_after` (deterministic in the seed).
pub fn first_renewal_at(not_before: SystemTime, not_after: SystemTime, rng_seed: u64) -> SystemTime {
    rollout_worker::Worker::first_renewal_at(rollout_worker::Credential { not_before, not_after }, rng_seed)
}

/// One renewal: a new key and CSR, `Enrollment/Renew` over `channel`, the answer
/// checked, the files swapped, `tls` updated. The answer carries the coordinator's CA
/// bundle; during a CA rotation it holds a CA this worker does not trust yet, which
/// signed the new certificate. The bundle is taken when it shares a CA with the one at
/// `ca_cert` (it came over a connection that CA authenticated) and the new certificate
/// verifies against it; it is written to `ca_cert` before the certificate is renamed
/// into place, so a crash leaves a bundle that verifies whichever certificate is there.
pub async fn renew_once(
    channel: Channel,
    worker: &WorkerId,
    files: &CertFiles,
    ca_cert: &Path,
    tls: &WorkerTls,
    max_message_bytes: usize,
) -> Result<CertInfo> {
    let (key, csr_pem) = crate::enroll::worker_key_and_csr(worker)?;
    let mut client = pb::enrollment_client::EnrollmentClient::new(channel)
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let answer = client
        .renew(pb::RenewRequest { csr_pem })
        .await
        .map_err(|s| {
            let message = format!("renew: {} ({:?})", s.message(), s.code());
            match s.code() {
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Internal
                | tonic::Code::Unknown
                | tonic::Code::FailedPrecondition => Error::transient(message, rollout_core::RetryHint::Backoff),
                _ => Error::Fatal(rollout_core::Fatal::PermissionDenied(message)),
            }
        })?
        .into_inner();
    let bundle = accepted_bundle(&answer.ca_certificate_pem, ca_cert)?;
    let info = check_renewed(&answer.certificate_pem, worker, &key, &bundle)?;
    let next = staged(files);
    tls::write_private(&next.key, key.serialize_pem().as_bytes())?;
    tls::write_public(&next.cert, answer.certificate_pem.as_bytes())?;
    let bundle_changed = tls::read_text(ca_cert).ok().as_deref() != Some(answer.ca_certificate_pem.as_str());
    if bundle_changed {
        tls::write_public(ca_cert, answer.ca_certificate_pem.as_bytes())?;
    }
    finish_pending_renewal(files)?;
    let (chain, key_der) = tls::load_pair(files)?;
    tls.cert.replace(ReloadableClientCert::certified(files, chain, &key_der)?);
    if bundle_changed {
        tls.trust.replace(&bundle, ca_cert)?;
        tracing::info!(channel = "tls", event = "ca_bundle_updated", %worker, cas = bundle.len(),
            file = %ca_cert.display(), "took the coordinator's CA bundle ({} CA(s)) with the renewal", bundle.len());
    }
    Ok(info)
}

/// The CA bundle of a renewal's answer, if it may replace the one at `ca_cert`: PEM,
/// at most [`crate::trust::BUNDLE_CAS_MAX`] CAs, at least one of them already trusted.
fn accepted_bundle(pem: &str, ca_cert: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let refused = |why: String| {
        Error::Fatal(rollout_core::Fatal::PermissionDenied(format!("renew: the answer's CA bundle {why}")))
    };
    let bundle =
        tls::parse_certs(Path::new("ca_certificate_pem"), pem.as_bytes()).map_err(|e| refused(e.to_string()))?;
    if bundle.len() > crate::trust::BUNDLE_CAS_MAX {
        return Err(refused(format!("holds {} CAs, more than {}", bundle.len(), crate::trust::BUNDLE_CAS_MAX)));
    }
    let trusted = tls::load_certs(ca_cert)?;
    if !bundle.iter().any(|ca| trusted.contains(ca)) {
        return Err(refused(format!("shares no CA with {}; refusing to trust it", ca_cert.display())));
    }
    Ok(bundle)
}

/// The renewed certificate verifies against `cas` as a client certificate, now, names
/// `worker` and holds `key`.
fn check_renewed(pem: &str, worker: &WorkerId, key: &KeyPair, cas: &[CertificateDer<'static>]) -> Result<CertInfo> {
    let refused = |why: String| Error::Fatal(rollout_core::Fatal::PermissionDenied(format!("renew: the answer {why}")));
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| refused(format!("is not a PEM certificate: {e}")))?;
    let info = CertInfo::of_der(&der).ok_or_else(|| refused("does not parse as X.509".into()))?;
    if info.role != Some(PeerRole::Worker(worker.clone())) {
        return Err(refused(format!("names {:?}, not worker {worker}", info.role)));
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| refused(format!("does not parse: {e}")))?;
    if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice() {
        return Err(refused("carries another key than the one this worker made".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone()).map_err(|e| refused(format!("bundle holds an unusable CA: {e}")))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| Error::internal(format!("building the client verifier: {e}")))?;
    verifier
        .verify_client_cert(&der, &[], UnixTime::now())
        .map_err(|e| refused(format!("does not verify against the coordinator's CA bundle: {e}")))?;
    Ok(info)
}

/// What the worker driver needs to carry out `WorkerOutput::RenewCertificate`.
#[derive(Debug, Clone)]
pub struct RenewalContext {
    /// The worker's connection (the renewal is one more call on it).
    pub channel: Channel,
    /// Whose certificate.
    pub worker: WorkerId,
    /// Its files.
    pub files: CertFiles,
    /// The CA bundle the worker trusts (replaced when the answer brings a new one).
    pub ca_cert: PathBuf,
    /// The certificate the connections present and the CAs they trust.
    pub tls: WorkerTls,
    /// Message size limit.
    pub max_message_bytes: usize,
}

impl RenewalContext {
    /// One renewal ([`renew_once`]), logged: the new certificate's facts, or the error.
    pub async fn renew(&self) -> Result<CertInfo> {
        let old = CertInfo::of_file(&self.files.cert).ok();
        let outcome = renew_once(
            self.channel.clone(),
            &self.worker,
            &self.files,
            &self.ca_cert,
            &self.tls,
            self.max_message_bytes,
        )
        .await;
        let worker = &self.worker;
        match &outcome {
            Ok(new) => tracing::info!(channel = "tls", event = "certificate_renewed", %worker, serial = %new.serial,
                old_serial = %old.as_ref().map(|o| o.serial.as_str()).unwrap_or(""),
                expires = %crate::enroll::utc_text(new.not_after),
                "renewed the worker certificate: serial {}, valid until {}", new.serial, crate::enroll::utc_text(new.not_after)),
            Err(e) => tracing::warn!(channel = "tls", event = "renew_failed", %worker, error = %e,
                expires = %old.as_ref().map(|o| crate::enroll::utc_text(o.not_after)).unwrap_or_default(),
                "renewing the worker certificate failed ({e}); it is tried again after a backoff until it expires"),
        }
        outcome
    }
}
