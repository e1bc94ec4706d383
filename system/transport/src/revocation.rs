//! Revocation: a durable deny list of certificate serial numbers, enforced at the
//! handshake, on every RPC, and on the connections already open.
//!
//! The list lives in the TLS directory, beside the tokens, as one file per revoked
//! certificate (`revoked/<serial>.json`, 0600, written atomically and the directory
//! synced), so `rollout certs revoke` works where the CA is whether or not the
//! coordinator runs, and the coordinator picks a new entry up within
//! [`DENY_LIST_POLL`]. An entry is kept until the certificate it names has expired
//! (the handshake refuses it then anyway), so the list is bounded by the lifetimes.
//!
//! Every certificate the CA signs is also kept, public part only, as
//! `issued/<serial>.pem` (removed once expired), so `certs revoke --worker ID` finds the
//! certificates of an id that were issued again since (a re-enrollment, a lost disk).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::task::AtomicWaker;
use rollout_core::time::{from_unix_millis, unix_millis};
use rollout_core::{Error, Result};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::{Deserialize, Serialize};

use crate::tls::{self, CertInfo, PeerRole};

/// Revocation records under the TLS directory.
pub const REVOKED_DIR: &str = "revoked";
/// Copies of every certificate the CA issued, by serial, under the TLS directory.
pub const ISSUED_DIR: &str = "issued";
/// How often the coordinator reads the deny list again.
pub const DENY_LIST_POLL: Duration = Duration::from_millis(200);
/// The largest revocation record read.
const RECORD_BYTES_MAX: u64 = 4096;

/// One revoked certificate, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationRecord {
    /// Serial number, hex.
    pub serial: String,
    /// Whom it named (`worker w1`, `operator admin`).
    pub subject: String,
    /// When the certificate expires; the record is dropped after that.
    pub not_after_unix_ms: u64,
    /// When it was revoked.
    pub revoked_at_unix_ms: u64,
}

fn subject_of(info: &CertInfo) -> String {
    match &info.role {
        Some(PeerRole::Worker(id)) => format!("worker {id}"),
        Some(PeerRole::Operator(name)) => format!("operator {name}"),
        None => info.common_name.clone(),
    }
}

fn record_path(tls_dir: &Path, serial: &str) -> PathBuf {
    tls_dir.join(REVOKED_DIR).join(format!("{serial}.json"))
}

fn is_serial(text: &str) -> bool {
    !text.is_empty() && text.len() <= 64 && text.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Adds `cert` to the deny list in `tls_dir`. `Ok(false)`: it was there already.
pub fn revoke(tls_dir: &Path, cert: &CertInfo, now: SystemTime) -> Result<bool> {
    let path = record_path(tls_dir, &cert.serial);
    if path.exists() {
        return Ok(false);
    }
    let record = RevocationRecord {
        serial: cert.serial.clone(),
        subject: subject_of(cert),
        not_after_unix_ms: unix_millis(cert.not_after),
        revoked_at_unix_ms: unix_millis(now),
    };
    let json = serde_json::to_vec(&record).map_err(|e| Error::internal(format!("revocation record: {e}")))?;
    tls::write_private(&path, &json)?;
    tracing::info!(channel = "tls", event = "certificate_revoked", serial = %record.serial,
        subject = %record.subject, "certificate_revoked");
    Ok(true)
}

/// The serials revoked in `tls_dir` whose certificates have not expired at `now`.
/// Records of expired certificates are removed; a record that does not read is an
/// error naming it (a deny list read in part would let a revoked key in).
pub fn load_denied(tls_dir: &Path, now: SystemTime) -> Result<BTreeSet<String>> {
    let dir = tls_dir.join(REVOKED_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(tls::io_err("reading the deny list", &dir, &e)),
    };
    let mut denied = BTreeSet::new();
    for entry in entries {
        let entry = entry.map_err(|e| tls::io_err("reading the deny list", &dir, &e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(serial) = name.strip_suffix(".json").filter(|s| is_serial(s)) else { continue };
        let path = entry.path();
        let text = rollout_core::text::read_text_bounded(&path, RECORD_BYTES_MAX)
            .map_err(|e| tls::io_err("reading a revocation record", &path, &e))?;
        let record: RevocationRecord = serde_json::from_str(&text)
            .map_err(|e| Error::config_invalid(path.display().to_string(), format!("not a revocation record: {e}")))?;
        if record.serial != serial {
            return Err(Error::config_invalid(
                path.display().to_string(),
                format!("names serial {} in a file for {serial}", record.serial),
            ));
        }
        if now > from_unix_millis(record.not_after_unix_ms) {
            let _ = fs::remove_file(&path);
            continue;
        }
        denied.insert(record.serial);
    }
    Ok(denied)
}

/// Keeps a copy of a certificate the CA just signed (`issued/<serial>.pem`), and drops
/// the copies of expired ones.
pub(crate) fn archive_issued(tls_dir: &Path, cert_pem: &str, now: SystemTime) -> Result<()> {
    let der = CertificateDer::from(
        rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map(|c: CertificateDer<'_>| c.to_vec())
            .map_err(|e| Error::internal(format!("an issued certificate is not PEM: {e}")))?,
    );
    let info = CertInfo::of_der(&der).ok_or_else(|| Error::internal("an issued certificate does not parse"))?;
    tls::write_public(&tls_dir.join(ISSUED_DIR).join(format!("{}.pem", info.serial)), cert_pem.as_bytes())?;
    for (path, old) in issued(tls_dir)? {
        if old.expired_at(now) {
            let _ = fs::remove_file(path);
        }
    }
    Ok(())
}

/// Every certificate the TLS directory knows of (the archive of issued ones, the
/// files in the directory itself, and enrollment's records), by serial.
pub fn known_certificates(tls_dir: &Path) -> Result<BTreeMap<String, (PathBuf, CertInfo)>> {
    let mut known = BTreeMap::new();
    let mut add = |path: PathBuf, info: CertInfo| {
        known.entry(info.serial.clone()).or_insert((path, info));
    };
    for (path, info) in issued(tls_dir)? {
        add(path, info);
    }
    for path in tls::identity_certs(tls_dir) {
        if let Ok(info) = CertInfo::of_file(&path) {
            add(path, info);
        }
    }
    for dir in [tls_dir.to_path_buf(), tls_dir.join(crate::enroll::ENROLLED_DIR)] {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".pem")
                && !name.ends_with(".key.pem")
                && !name.starts_with('.')
                && let Ok(info) = CertInfo::of_file(&entry.path())
            {
                add(entry.path(), info);
            }
        }
    }
    Ok(known)
}

fn issued(tls_dir: &Path) -> Result<Vec<(PathBuf, CertInfo)>> {
    let dir = tls_dir.join(ISSUED_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(tls::io_err("reading", &dir, &e)),
    };
    Ok(entries
        .flatten()
        .filter(|e| {
            e.file_name().to_string_lossy().ends_with(".pem") && !e.file_name().to_string_lossy().starts_with('.')
        })
        .filter_map(|e| CertInfo::of_file(&e.path()).ok().map(|info| (e.path(), info)))
        .collect())
}

/// Revokes every unexpired certificate the TLS directory knows for `role`, except
/// `keep` (a serial). Returns what it revoked (newly or already).
pub fn revoke_identity(tls_dir: &Path, role: &PeerRole, keep: Option<&str>, now: SystemTime) -> Result<Vec<CertInfo>> {
    let mut revoked = Vec::new();
    for (_, (_, info)) in known_certificates(tls_dir)? {
        if info.role.as_ref() == Some(role) && !info.expired_at(now) && keep != Some(info.serial.as_str()) {
            revoke(tls_dir, &info, now)?;
            revoked.push(info);
        }
    }
    Ok(revoked)
}

// ------------------------------------------------------------------ enforcement

/// Set when the certificate of a live connection is revoked; the connection's reads
/// and writes fail from then on.
#[derive(Debug, Default)]
pub struct RevokeFlag {
    revoked: AtomicBool,
    waker: AtomicWaker,
}

impl RevokeFlag {
    /// Whether the connection's certificate has been revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Registers the reader to be woken on revocation.
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    fn set(&self) {
        self.revoked.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// The coordinator's deny list in memory, and the live connections it may have to cut.
#[derive(Debug, Default)]
pub struct DenyList {
    tls_dir: Option<PathBuf>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    denied: BTreeSet<String>,
    /// Live connections by registration id: their serial and flag.
    live: BTreeMap<u64, (String, Arc<RevokeFlag>)>,
    next: u64,
}

/// A live connection's place in the [`DenyList`]; leaving it (drop) forgets the
/// connection.
#[derive(Debug)]
pub struct LiveCert {
    list: Arc<DenyList>,
    id: u64,
    /// Shared with the connection's [`crate::net::PeerInfo`].
    pub flag: Arc<RevokeFlag>,
}

impl Drop for LiveCert {
    fn drop(&mut self) {
        self.list.lock().live.remove(&self.id);
    }
}

impl DenyList {
    /// A list that denies nothing and reads nothing (tests, the simulator).
    pub fn empty() -> Arc<Self> {
        Arc::new(DenyList::default())
    }

    /// The list stored in `tls_dir`, read now.
    pub fn load(tls_dir: &Path) -> Result<Arc<Self>> {
        let denied = load_denied(tls_dir, SystemTime::now())?;
        Ok(Arc::new(DenyList {
            tls_dir: Some(tls_dir.to_path_buf()),
            inner: Mutex::new(Inner { denied, ..Inner::default() }),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether `serial` (hex) is revoked.
    pub fn is_denied(&self, serial: &str) -> bool {
        self.lock().denied.contains(serial)
    }

    /// How many serials are denied.
    pub fn len(&self) -> usize {
        self.lock().denied.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers a live connection presenting `serial`; it is cut if that serial is
    /// revoked later (or already is).
    pub fn register(self: &Arc<Self>, serial: String) -> LiveCert {
        let flag = Arc::new(RevokeFlag::default());
        let mut inner = self.lock();
        if inner.denied.contains(&serial) {
            flag.set();
        }
        let id = inner.next;
        inner.next += 1;
        inner.live.insert(id, (serial, Arc::clone(&flag)));
        LiveCert { list: Arc::clone(self), id, flag }
    }

    /// Replaces the list with `denied` and cuts the live connections it now names.
    /// Returns how many connections were cut.
    pub fn replace(&self, denied: BTreeSet<String>) -> usize {
        let mut inner = self.lock();
        let mut cut = 0;
        for (serial, flag) in inner.live.values() {
            if denied.contains(serial) && !flag.is_revoked() {
                tracing::warn!(channel = "tls", event = "revoked_connection_closed", %serial,
                    "closing a connection whose certificate was revoked");
                flag.set();
                cut += 1;
            }
        }
        inner.denied = denied;
        cut
    }

    /// Reads the stored list again (when it has a directory) and applies it.
    pub fn refresh(&self) -> Result<usize> {
        match &self.tls_dir {
            Some(dir) => Ok(self.replace(load_denied(dir, SystemTime::now())?)),
            None => Ok(0),
        }
    }

    /// Refreshes every [`DENY_LIST_POLL`] until `stop` turns true. A list that fails to
    /// read keeps the last one read (and says so, once per failure streak).
    pub fn spawn_poll(self: &Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        let list = Arc::clone(self);
        crate::trust::spawn_refresh(DENY_LIST_POLL, stop, "the deny list", move || list.refresh().map(drop));
    }
}

/// A client-certificate verifier that refuses revoked serials, then asks `inner`.
#[derive(Debug)]
pub struct DenyingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    list: Arc<DenyList>,
}

impl DenyingVerifier {
    /// `inner` with `list` in front of it.
    pub fn new(inner: Arc<dyn ClientCertVerifier>, list: Arc<DenyList>) -> Self {
        DenyingVerifier { inner, list }
    }
}

/// The hex serial of a DER certificate.
pub fn serial_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(hex::encode(cert.raw_serial()))
}

impl ClientCertVerifier for DenyingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        if serial_of(end_entity).is_some_and(|s| self.list.is_denied(&s)) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        self.inner.verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollout_core::WorkerId;

    #[test]
    fn a_revoked_serial_is_kept_until_its_certificate_expires() {
        let dir = tempfile::tempdir().expect("tempdir");
        tls::ensure_dev_ca(dir.path()).expect("ca");
        let w1 = WorkerId::new("w1").expect("id");
        let files = tls::issue_client_cert(dir.path(), &w1).expect("cert");
        let info = CertInfo::of_file(&files.cert).expect("info");
        let now = SystemTime::now();
        assert!(revoke(dir.path(), &info, now).expect("revoke"));
        assert!(!revoke(dir.path(), &info, now).expect("again"), "already revoked");
        assert!(load_denied(dir.path(), now).expect("load").contains(&info.serial));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(record_path(dir.path(), &info.serial)).expect("meta").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // Past the certificate's expiry the record goes.
        let later = info.not_after + Duration::from_secs(1);
        assert!(load_denied(dir.path(), later).expect("load").is_empty());
        assert!(!record_path(dir.path(), &info.serial).exists());
    }

    #[test]
    fn revoking_an_identity_finds_every_certificate_issued_to_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        tls::ensure_dev_ca(dir.path()).expect("ca");
        let w1 = WorkerId::new("w1").expect("id");
        let first = CertInfo::of_file(&tls::issue_client_cert(dir.path(), &w1).expect("cert").cert).expect("info");
        // Issued again: the file now holds the second, the archive both.
        let second = CertInfo::of_file(&tls::issue_client_cert(dir.path(), &w1).expect("cert").cert).expect("info");
        tls::issue_client_cert(dir.path(), &WorkerId::new("w2").expect("id")).expect("w2");
        let revoked = revoke_identity(dir.path(), &PeerRole::Worker(w1), None, SystemTime::now()).expect("revoke");
        let serials: BTreeSet<_> = revoked.iter().map(|i| i.serial.clone()).collect();
        assert_eq!(serials, BTreeSet::from([first.serial, second.serial]));
        assert_eq!(load_denied(dir.path(), SystemTime::now()).expect("load").len(), 2, "w2 keeps its certificate");
    }

    #[test]
    fn a_live_connection_is_flagged_when_its_serial_is_revoked() {
        let list = DenyList::empty();
        let a = list.register("aa".into());
        let b = list.register("bb".into());
        assert_eq!(list.replace(BTreeSet::from(["bb".to_owned()])), 1);
        assert!(!a.flag.is_revoked());
        assert!(b.flag.is_revoked());
        assert!(list.register("bb".into()).flag.is_revoked(), "registered after its revocation");
        drop(a);
        assert_eq!(list.lock().live.len(), 1, "a dropped connection is forgotten");
    }
}
