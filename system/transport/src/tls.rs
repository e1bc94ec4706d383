//! Certificates and TLS settings: a development CA (rcgen), server, worker and
//! operator certificates signed by it, and the rustls configurations that enforce
//! mutual TLS with the ring provider (no OpenSSL).
//!
//! Layout of a TLS directory (default `./data/tls`):
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key.pem` | the CA (key mode 0600), created once by [`ensure_dev_ca`]; during a rotation `ca.pem` is the bundle `[current, previous]` and the key the current one's (`crate::rotation`) |
//! | `ca.cross.pem` | during a rotation: the current CA cross-signed by the previous one |
//! | `coordinator.pem`, `coordinator.key.pem` | the coordinator's server certificate |
//! | `workers/<id>/cert.pem`, `workers/<id>/key.pem` | a worker's client certificate (CN = worker id) |
//! | `operators/<name>/cert.pem`, `operators/<name>/key.pem` | an operator's client certificate |
//! | `tokens/<id>.json`, `tokens/<id>.used` | bootstrap token records and their use (see `crate::enroll`) |
//! | `enrolled/<id>.pem` | certificates the coordinator issued through Enroll (public part) |
//!
//! Roles: a client certificate's organizational unit says what it may do
//! ([`WORKER_OU`] or [`OPERATOR_OU`]); server certificates carry EKU ServerAuth only,
//! client certificates EKU ClientAuth only, so neither can stand in for the other.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rollout_core::config::TransportConfig;
use rollout_core::{Error, Fatal, Result, WorkerId};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The TLS directory when none is configured.
pub const DEFAULT_TLS_DIR: &str = "./data/tls";
/// Organizational unit of worker client certificates.
pub const WORKER_OU: &str = "rollout-worker";
/// Organizational unit of operator client certificates.
pub const OPERATOR_OU: &str = "rollout-operator";
/// Organizational unit of the coordinator's server certificate.
pub const SERVER_OU: &str = "rollout-coordinator";
/// Common-name prefix of operator certificates (a worker id cannot contain ':').
pub const OPERATOR_CN_PREFIX: &str = "operator:";
/// ALPN protocol spoken on every connection.
pub const ALPN_H2: &[u8] = b"h2";

/// Where workers' certificates live in a TLS directory, one directory per id.
pub const WORKERS_DIR: &str = "workers";
/// Where operators' certificates live in a TLS directory, one directory per name.
pub const OPERATORS_DIR: &str = "operators";

/// A certificate and its private key, as files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM PKCS#8 private key (mode 0600).
    pub key: PathBuf,
}

impl CertFiles {
    fn in_dir(dir: &Path, stem: &str) -> Self {
        CertFiles { cert: dir.join(format!("{stem}.pem")), key: dir.join(format!("{stem}.key.pem")) }
    }

    /// The CA's files in `dir`.
    pub fn ca(dir: &Path) -> Self {
        Self::in_dir(dir, "ca")
    }

    /// The coordinator's server certificate in `dir`.
    pub fn coordinator(dir: &Path) -> Self {
        Self::in_dir(dir, "coordinator")
    }

    /// A worker's client certificate in `dir`: `workers/<id>/cert.pem` and `key.pem`.
    /// One directory per identity, so no id can name another's file.
    pub fn worker(dir: &Path, worker: &WorkerId) -> Self {
        Self::of_identity(&dir.join(WORKERS_DIR).join(worker.as_str()))
    }

    /// An operator's client certificate in `dir`: `operators/<name>/cert.pem` and `key.pem`.
    pub fn operator(dir: &Path, name: &str) -> Self {
        Self::of_identity(&dir.join(OPERATORS_DIR).join(name))
    }

    fn of_identity(dir: &Path) -> Self {
        CertFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem") }
    }

    /// Whether both files exist.
    pub fn exist(&self) -> bool {
        self.cert.exists() && self.key.exists()
    }
}

/// How long the certificates this module makes are valid (`transport.*_cert_lifetime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// The CA.
    pub ca: Duration,
    /// The coordinator's server certificate.
    pub server: Duration,
    /// A worker's client certificate.
    pub worker: Duration,
    /// An operator's client certificate.
    pub operator: Duration,
}

impl Lifetimes {
    /// The lifetimes a config sets.
    pub fn of(transport: &TransportConfig) -> Self {
        Lifetimes {
            ca: transport.ca_cert_lifetime,
            server: transport.server_cert_lifetime,
            worker: transport.worker_cert_lifetime,
            operator: transport.operator_cert_lifetime,
        }
    }
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self::of(&TransportConfig::default())
    }
}

/// How far before its issue a certificate's validity starts, so that a verifier whose
/// clock is behind the issuer's accepts it (the clock skew tolerated at issue).
pub const NOT_BEFORE_SLACK: Duration = rollout_core::config::CERT_NOT_BEFORE_SLACK;

/// Sets `params` valid from [`NOT_BEFORE_SLACK`] before `now` for `lifetime`, with a
/// random 128-bit serial number (never chosen by the requester, unlike rcgen's default
/// of a hash of the subject's key).
pub(crate) fn set_validity(params: &mut CertificateParams, now: SystemTime, lifetime: Duration) -> Result<()> {
    let at = |t: SystemTime| {
        let secs = rollout_core::time::unix_millis(t) / 1000;
        time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
            .map_err(|e| Error::invalid_input(format!("certificate validity date: {e}")))
    };
    params.not_before = at(now.checked_sub(NOT_BEFORE_SLACK).unwrap_or(SystemTime::UNIX_EPOCH))?;
    params.not_after = at(now + lifetime)?;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    Ok(())
}

/// `N` bytes from the system's random source.
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::internal("the system's random source failed (certificate serial or name)"))?;
    Ok(bytes)
}

/// 16 random bytes, the first below 0x80 and not zero (a positive DER integer of
/// exactly 16 bytes).
fn random_serial() -> Result<[u8; 16]> {
    let mut serial = random_bytes::<16>()?;
    serial[0] = (serial[0] & 0x7f).max(1);
    Ok(serial)
}

/// What a certificate file says about itself, for `rollout certs list` and the checks
/// a worker makes of its own certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, hex.
    pub serial: String,
    /// The rollout role, if it has one.
    pub role: Option<PeerRole>,
    /// The subject's common name.
    pub common_name: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// SHA-256 of the issuer's distinguished name (DER), hex: which CA signed it.
    pub issuer: String,
    /// SHA-256 of the subject's distinguished name (DER), hex: for a CA, what the
    /// `issuer` of the certificates it signed says.
    pub subject: String,
}

impl CertInfo {
    /// Reads the first certificate of a DER blob.
    pub fn of_der(der: &[u8]) -> Option<CertInfo> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let unix = |t: x509_parser::time::ASN1Time| {
            rollout_core::time::from_unix_millis(u64::try_from(t.timestamp()).unwrap_or(0).saturating_mul(1000))
        };
        let validity = cert.validity();
        Some(CertInfo {
            serial: hex::encode(cert.raw_serial()),
            role: peer_role(der),
            common_name: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|c| c.as_str().ok())
                .unwrap_or("")
                .to_owned(),
            not_before: unix(validity.not_before),
            not_after: unix(validity.not_after),
            issuer: hex::encode(ring::digest::digest(&ring::digest::SHA256, cert.issuer().as_raw()).as_ref()),
            subject: hex::encode(ring::digest::digest(&ring::digest::SHA256, cert.subject().as_raw()).as_ref()),
        })
    }

    /// Reads the first certificate of a PEM file.
    pub fn of_file(path: &Path) -> Result<CertInfo> {
        let certs = load_certs(path)?;
        CertInfo::of_der(&certs[0]).ok_or_else(|| tls_err(path, "not a readable X.509 certificate"))
    }

    /// Reads every certificate of a PEM file (a CA bundle), in order.
    pub fn all_of_file(path: &Path) -> Result<Vec<CertInfo>> {
        load_certs(path)?
            .iter()
            .enumerate()
            .map(|(i, der)| {
                CertInfo::of_der(der)
                    .ok_or_else(|| tls_err(path, &format!("certificate {} is not readable X.509", i + 1)))
            })
            .collect()
    }

    /// Whether it has expired at `now`.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        now > self.not_after
    }
}

/// A client's own certificate, checked before it is used: an expired one is an error
/// naming the file and the expiry, and what to do about it (`remedy`). Returns its
/// facts otherwise.
pub fn check_own_certificate(files: &CertFiles, now: SystemTime, remedy: &str) -> Result<CertInfo> {
    let info = CertInfo::of_file(&files.cert)?;
    if info.expired_at(now) {
        return Err(Error::config_invalid(
            "transport.tls_dir",
            format!(
                "the certificate {} expired at {} (it is {} now); {remedy}",
                files.cert.display(),
                crate::enroll::utc_text(info.not_after),
                crate::enroll::utc_text(now)
            ),
        ));
    }
    Ok(info)
}

/// What [`ensure_dev_ca`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevCa {
    /// The CA's files.
    pub files: CertFiles,
    /// True when this call created them; false when they already existed.
    pub created: bool,
}

/// Creates `dir/ca.pem` and `dir/ca.key.pem` (mode 0600) unless both exist.
/// Idempotent: a second call changes nothing. A lone certificate or lone key is an
/// error naming the file (it is never overwritten). Emits `mtls_handshake_bootstrap`.
pub fn ensure_dev_ca(dir: &Path) -> Result<DevCa> {
    ensure_ca(dir, Lifetimes::default().ca)
}

/// [`ensure_dev_ca`] with a CA valid for `lifetime` when it is created.
pub fn ensure_ca(dir: &Path, lifetime: Duration) -> Result<DevCa> {
    ensure_ca_at(dir, SystemTime::now(), lifetime)
}

/// [`ensure_ca`] as if created at `at` (a simulation whose clocks start at a fixed
/// date issues its certificates at that date).
pub fn ensure_ca_at(dir: &Path, at: SystemTime, lifetime: Duration) -> Result<DevCa> {
    let files = CertFiles::ca(dir);
    crate::renewal::finish_pending_renewal(&files)?;
    match (files.cert.exists(), files.key.exists()) {
        (true, true) => {
            // Prove they load, so a broken CA is reported here rather than at first use.
            load_issuer(dir)?;
            tracing::info!(channel = "tls", event = "mtls_handshake_bootstrap", dir = %dir.display(), created = false,
                "mtls_handshake_bootstrap: development CA already present");
            return Ok(DevCa { files, created: false });
        }
        (true, false) => return Err(missing_pair(&files.key, &files.cert)),
        (false, true) => return Err(missing_pair(&files.cert, &files.key)),
        (false, false) => {}
    }
    fs::create_dir_all(dir).map_err(|e| io_err("creating TLS directory", dir, &e))?;
    let key = KeyPair::generate().map_err(|e| rcgen_err("generating the CA key", &e))?;
    let params = ca_params("rollout development CA", at, lifetime)?;
    let cert = params.self_signed(&key).map_err(|e| rcgen_err("self-signing the CA", &e))?;
    write_pair(&files, &key.serialize_pem(), &cert.pem())?;
    tracing::info!(channel = "tls", event = "mtls_handshake_bootstrap", dir = %dir.display(), created = true,
        "mtls_handshake_bootstrap: created development CA");
    Ok(DevCa { files, created: true })
}

/// Issues the coordinator's server certificate (EKU ServerAuth) for `names` (DNS names
/// or IP addresses; `localhost` and `127.0.0.1` are always included), signed by the CA
/// in `dir`. Overwrites an earlier one.
pub fn issue_server_cert(dir: &Path, names: &[String]) -> Result<CertFiles> {
    issue_server_cert_for(dir, names, Lifetimes::default().server)
}

/// [`issue_server_cert`], valid for `lifetime`.
pub fn issue_server_cert_for(dir: &Path, names: &[String], lifetime: Duration) -> Result<CertFiles> {
    issue_server_cert_at(dir, names, SystemTime::now(), lifetime)
}

/// [`issue_server_cert`] as if issued at `at`, valid for `lifetime`.
pub fn issue_server_cert_at(dir: &Path, names: &[String], at: SystemTime, lifetime: Duration) -> Result<CertFiles> {
    let mut all: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    for n in names {
        if !all.contains(n) {
            all.push(n.clone());
        }
    }
    let mut params =
        CertificateParams::new(all.clone()).map_err(|e| Error::invalid_input(format!("server names {all:?}: {e}")))?;
    params.distinguished_name = name("rollout coordinator", SERVER_OU);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, at, lifetime)?;
    issue(dir, params, CertFiles::coordinator(dir))
}

/// Issues a worker's client certificate (EKU ClientAuth, CN and DNS SAN = the worker
/// id, OU [`WORKER_OU`]), signed by the CA in `dir`.
pub fn issue_client_cert(dir: &Path, worker: &WorkerId) -> Result<CertFiles> {
    issue_client_cert_for(dir, worker, Lifetimes::default().worker)
}

/// [`issue_client_cert`], valid for `lifetime`.
pub fn issue_client_cert_for(dir: &Path, worker: &WorkerId, lifetime: Duration) -> Result<CertFiles> {
    issue_client_cert_at(dir, worker, SystemTime::now(), lifetime)
}

/// [`issue_client_cert`] as if issued at `at` (its validity starts
/// [`NOT_BEFORE_SLACK`] before), valid for `lifetime`: tests make expired ones with it.
pub fn issue_client_cert_at(dir: &Path, worker: &WorkerId, at: SystemTime, lifetime: Duration) -> Result<CertFiles> {
    let mut params = worker_cert_params(worker)?;
    set_validity(&mut params, at, lifetime)?;
    issue(dir, params, CertFiles::worker(dir, worker))
}

/// What every worker certificate says, whoever made its key: CN and DNS SAN = the
/// worker id, OU [`WORKER_OU`], EKU ClientAuth only. [`issue_client_cert`] and
/// enrollment (`crate::enroll`, which signs a worker's own public key) both use it.
pub(crate) fn worker_cert_params(worker: &WorkerId) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(worker.as_str(), WORKER_OU);
    let san = worker.as_str().to_owned().try_into().map_err(|e| rcgen_err("worker id as a DNS name", &e))?;
    params.subject_alt_names = vec![SanType::DnsName(san)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// Issues an operator's client certificate (EKU ClientAuth, CN `operator:<name>`, OU
/// [`OPERATOR_OU`]). `name` follows the worker id rules (letters, digits, `._-`).
pub fn issue_operator_cert(dir: &Path, operator: &str) -> Result<CertFiles> {
    issue_operator_cert_for(dir, operator, Lifetimes::default().operator)
}

/// [`issue_operator_cert`], valid for `lifetime`.
pub fn issue_operator_cert_for(dir: &Path, operator: &str, lifetime: Duration) -> Result<CertFiles> {
    issue_operator_cert_at(dir, operator, SystemTime::now(), lifetime)
}

/// [`issue_operator_cert`] as if issued at `at`, valid for `lifetime`.
pub fn issue_operator_cert_at(dir: &Path, operator: &str, at: SystemTime, lifetime: Duration) -> Result<CertFiles> {
    WorkerId::new(operator).map_err(|e| Error::invalid_input(format!("operator name: {e}")))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("{OPERATOR_CN_PREFIX}{operator}"), OPERATOR_OU);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, at, lifetime)?;
    issue(dir, params, CertFiles::operator(dir, operator))
}

fn issue(dir: &Path, params: CertificateParams, files: CertFiles) -> Result<CertFiles> {
    let issuer = ca_issuer(dir)?;
    let key = KeyPair::generate().map_err(|e| rcgen_err("generating a key", &e))?;
    let cert = params.signed_by(&key, &issuer).map_err(|e| rcgen_err("signing a certificate", &e))?;
    write_pair(&files, &key.serialize_pem(), &cert.pem())?;
    crate::revocation::archive_issued(dir, &cert.pem(), SystemTime::now())?;
    Ok(files)
}

/// Replaces a key and its certificate as a pair: both are staged beside their final
/// names (`*.next`), then renamed, key first. A crash in between is finished at the
/// next start by [`crate::renewal::finish_pending_renewal`] (the certificate staged:
/// roll forward; only the key: discard it), so the pair on disk always fits, and a
/// coordinator reading them meanwhile sees the old pair or the new one (or, for the
/// instant between the two renames, a pair that does not fit, which it refuses and
/// reads again).
pub(crate) fn write_pair(files: &CertFiles, key_pem: &str, cert_pem: &str) -> Result<()> {
    let next = crate::renewal::staged(files);
    write_private(&next.key, key_pem.as_bytes())?;
    write_public(&next.cert, cert_pem.as_bytes())?;
    crate::renewal::finish_pending_renewal(files)?;
    Ok(())
}

/// The CA in `dir` as an rcgen issuer (needs `ca.key.pem`): the first certificate of
/// `ca.pem` (the current CA; after `rollout certs rotate-ca` the previous one follows it,
/// trusted but no longer signing).
pub(crate) fn ca_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let (ca_key, ca_der) = load_issuer(dir)?;
    Issuer::from_ca_cert_der(&ca_der, ca_key)
        .map_err(|e| Error::Fatal(Fatal::Corrupt { path: CertFiles::ca(dir).cert, reason: e.to_string() }))
}

/// The current CA's key and certificate (the first of `ca.pem`), checked to fit.
pub(crate) fn load_issuer(dir: &Path) -> Result<(KeyPair, CertificateDer<'static>)> {
    let files = CertFiles::ca(dir);
    let key_pem = read_text(&files.key)?;
    let key = KeyPair::from_pem(&key_pem)
        .map_err(|e| Error::Fatal(Fatal::Corrupt { path: files.key.clone(), reason: format!("not a key: {e}") }))?;
    let ca = load_certs(&files.cert)?.swap_remove(0);
    let fits = x509_parser::parse_x509_certificate(&ca)
        .is_ok_and(|(_, cert)| cert.public_key().raw == rcgen::PublicKeyData::subject_public_key_info(&key).as_slice());
    if !fits {
        return Err(Error::Fatal(Fatal::Corrupt {
            path: files.key.clone(),
            reason: format!("is not the key of the first certificate in {}", files.cert.display()),
        }));
    }
    Ok((key, ca))
}

fn name(common_name: &str, unit: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "rollout");
    dn.push(DnType::OrganizationalUnitName, unit);
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The parameters of a CA certificate named `common_name`, valid from `at` for `lifetime`.
pub(crate) fn ca_params(common_name: &str, at: SystemTime, lifetime: Duration) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(common_name, "rollout-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    set_validity(&mut params, at, lifetime)?;
    Ok(params)
}

pub(crate) fn generate_key(what: &str) -> Result<KeyPair> {
    KeyPair::generate().map_err(|e| rcgen_err(what, &e))
}

// ------------------------------------------------------------------ rustls configs

/// The coordinator's rustls configuration: its certificate from `server`, followed by
/// the CA at `ca_cert` (so a joining worker can check the CA against its token's pin),
/// HTTP/2 only. A client certificate, when presented, must verify against the CA, or
/// the handshake fails. A client without one is let in so that it can call
/// `Enrollment/Enroll`, and nothing else: its connection carries no [`PeerRole`], and
/// every other service refuses it (`crate::enroll::require_client_certificate`, and
/// each handler's own identity check).
pub fn server_config(ca_cert: &Path, server: &CertFiles) -> Result<Arc<ServerConfig>> {
    server_config_denying(ca_cert, server, crate::revocation::DenyList::empty())
}

/// [`server_config`] refusing, at the handshake, client certificates `deny` lists.
pub fn server_config_denying(
    ca_cert: &Path,
    server: &CertFiles,
    deny: Arc<crate::revocation::DenyList>,
) -> Result<Arc<ServerConfig>> {
    Ok(server_config_reloading(ca_cert, server, deny)?.0)
}

/// [`server_config_denying`] whose CAs and certificate are read again when their files
/// change ([`crate::trust::ServerTrust::spawn_poll`] on the handle returned): a CA
/// rotation or a new server certificate takes effect on the next handshake.
pub fn server_config_reloading(
    ca_cert: &Path,
    server: &CertFiles,
    deny: Arc<crate::revocation::DenyList>,
) -> Result<(Arc<ServerConfig>, Arc<crate::trust::ServerTrust>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let trust = crate::trust::ServerTrust::load(ca_cert, server, Arc::clone(&provider))?;
    let verifier = Arc::new(crate::revocation::DenyingVerifier::new(
        Arc::clone(&trust) as Arc<dyn rustls::server::danger::ClientCertVerifier>,
        deny,
    ));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&server.cert, &e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::clone(&trust) as Arc<dyn rustls::server::ResolvesServerCert>);
    // No session resumption: a resumed TLS session is not authenticated again, so a
    // client certificate revoked or expired since its first handshake would get back in
    // on the old session. Connections are long-lived; a full handshake per connection is cheap.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok((Arc::new(config), trust))
}

/// The client-certificate verifier of a coordinator trusting the CAs in `roots`: a
/// certificate, when presented, must chain to one of them; a client without one is let
/// in for `Enrollment/Enroll` only.
pub(crate) fn client_verifier(
    roots: RootCertStore,
    provider: Arc<rustls::crypto::CryptoProvider>,
    ca_cert: &Path,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls_err(ca_cert, &format!("building the client verifier: {e}")))
}

/// A client's rustls configuration: trusts only the CA at `ca_cert`, presents the
/// certificate in `client`, HTTP/2 only.
pub fn client_config(ca_cert: &Path, client: &CertFiles) -> Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = root_store(ca_cert)?;
    let (chain, key) = load_pair(client)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(&client.cert, &e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls_err(&client.cert, &format!("certificate and key do not fit: {e}")))?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The name a client checks the coordinator's certificate against: the host part of
/// `addr` (`host:port`, `[v6]:port` or a bare host).
pub fn server_name_of(addr: &str) -> Result<ServerName<'static>> {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) && !host.is_empty() => host,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|e| Error::config_invalid("transport.coordinator_addr", format!("{addr:?}: not a host name: {e}")))
}

pub(crate) fn root_store(ca_cert: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(ca_cert)? {
        roots.add(cert).map_err(|e| tls_err(ca_cert, &format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

pub(crate) fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    parse_certs(path, read_text(path)?.as_bytes())
}

/// The PEM certificates in `bytes`, read from `path` (named in errors); at least one.
pub(crate) fn parse_certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(bytes)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| tls_err(path, &format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(tls_err(path, "holds no certificate"));
    }
    Ok(certs)
}

/// The PEM private key in `bytes`, read from `path` (named in errors).
pub(crate) fn parse_key(path: &Path, bytes: &[u8]) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| tls_err(path, &format!("not a PEM private key: {e}")))
}

pub(crate) fn load_pair(files: &CertFiles) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let chain = load_certs(&files.cert)?;
    let key = parse_key(&files.key, read_text(&files.key)?.as_bytes())?;
    Ok((chain, key))
}

// ------------------------------------------------------------------ peer identity

/// Who is on the other end of a connection, by its client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRole {
    /// A worker; it may only speak for this id.
    Worker(WorkerId),
    /// An operator, by name.
    Operator(String),
}

/// Reads the role from a verified client certificate (DER). `None` when the
/// certificate carries no rollout role or an invalid name.
pub fn peer_role(cert_der: &[u8]) -> Option<PeerRole> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let subject = cert.subject();
    let unit = subject.iter_organizational_unit().next()?.as_str().ok()?;
    let common_name = subject.iter_common_name().next()?.as_str().ok()?;
    match unit {
        WORKER_OU => WorkerId::new(common_name).ok().map(PeerRole::Worker),
        OPERATOR_OU => common_name.strip_prefix(OPERATOR_CN_PREFIX).map(|n| PeerRole::Operator(n.to_owned())),
        _ => None,
    }
}

// ------------------------------------------------------------------ files

pub(crate) fn read_text(path: &Path) -> Result<String> {
    // Certificates and keys are a few KiB; anything larger is the wrong file.
    rollout_core::text::read_text_bounded(path, 1 << 20).map_err(|e| io_err("reading", path, &e))
}

pub(crate) fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes, 0o644)
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, bytes, 0o600)
}

/// Writes to a sibling temporary file created with `mode`, syncs, renames, then syncs
/// the directory (so the rename itself survives a power loss: `--join` spends its token
/// on these files), so a crash never leaves a half-written key and a key is never
/// readable by others. The
/// temporary name is unique to the call, so two writers of one path (two enrollments
/// of one worker id) cannot trip over each other's file: the last rename wins whole.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    static NEXT_TMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| io_err("creating directory", parent, &e))?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let unique = NEXT_TMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.{}.{unique}.tmp", std::process::id()));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io_err("creating", &tmp, &e))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| io_err("writing", &tmp, &e))?;
    fs::rename(&tmp, path).map_err(|e| io_err("renaming into place", path, &e))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::File::open(parent).and_then(|d| d.sync_all()).map_err(|e| io_err("syncing directory", parent, &e))?;
    }
    Ok(())
}

/// The certificate files of every worker and operator identity directory in `dir`
/// (`workers/*/cert.pem`, `operators/*/cert.pem`), in name order.
pub fn identity_certs(dir: &Path) -> Vec<PathBuf> {
    let mut certs = Vec::new();
    for kind in [WORKERS_DIR, OPERATORS_DIR] {
        let Ok(entries) = fs::read_dir(dir.join(kind)) else { continue };
        for entry in entries.flatten() {
            let cert = entry.path().join("cert.pem");
            if cert.is_file() {
                certs.push(cert);
            }
        }
    }
    certs.sort();
    certs
}

/// Moves worker and operator certificates of the flat layout of earlier releases
/// (`worker.<id>.pem`, `worker.<id>.key.pem`, `operator.<name>.*`, and renewals staged
/// as `*.next`) into the per-identity layout ([`CertFiles::worker`]). Each file moves
/// on its own (a rename, the directories synced), so a migration a crash cut short
/// goes on at the next call; a file whose new place is taken is left where it is, with
/// a warning. Returns how many files moved. Every process that reads identity files
/// calls it first: the coordinator, a worker, `--join`, the CLI.
pub fn migrate_layout(dir: &Path) -> Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_err("listing", dir, &e)),
    };
    let mut moves = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((kind, rest)) = name
            .strip_prefix("worker.")
            .map(|rest| (WORKERS_DIR, rest))
            .or_else(|| name.strip_prefix("operator.").map(|rest| (OPERATORS_DIR, rest)))
        else {
            continue;
        };
        // Longest suffix first: ids of the flat layout could not end in ".key".
        let parsed = [
            (".key.pem.next", "key.pem.next"),
            (".pem.next", "cert.pem.next"),
            (".key.pem", "key.pem"),
            (".pem", "cert.pem"),
        ]
        .into_iter()
        .find_map(|(suffix, file)| rest.strip_suffix(suffix).map(|id| (id, file)));
        let Some((id, file)) = parsed else { continue };
        if WorkerId::new(id).is_err() || !entry.path().is_file() {
            continue;
        }
        moves.push((entry.path(), dir.join(kind).join(id).join(file)));
    }
    moves.sort();
    let mut moved = 0;
    for (from, to) in &moves {
        if to.exists() {
            tracing::warn!(channel = "tls", event = "layout_migration_skipped", from = %from.display(), to = %to.display(),
                "not moving {} into the per-identity layout: {} exists already (remove the one that is stale)",
                from.display(), to.display());
            continue;
        }
        let parent = to.parent().unwrap_or(dir);
        fs::create_dir_all(parent).map_err(|e| io_err("creating directory", parent, &e))?;
        fs::rename(from, to).map_err(|e| io_err("moving into the per-identity layout", from, &e))?;
        for d in [parent, dir] {
            fs::File::open(d).and_then(|f| f.sync_all()).map_err(|e| io_err("syncing directory", d, &e))?;
        }
        moved += 1;
    }
    if moved > 0 {
        tracing::info!(channel = "tls", event = "layout_migrated", dir = %dir.display(), files = moved,
            "moved {moved} certificate file(s) into the per-identity layout (workers/<id>/, operators/<name>/)");
    }
    Ok(moved)
}

/// Removes the temporary files of [`write_atomic`] (`.<name>.<pid>.<n>.tmp`) last modified
/// more than `older_than` ago, in `dir` and its subdirectories two levels down (enrolled,
/// revoked, issued, tokens, workers/<id>, operators/<name>): writes a crash cut short. Returns how many went.
pub fn remove_stale_tmp(dir: &Path, older_than: std::time::Duration) -> Result<usize> {
    let cutoff = std::time::SystemTime::now().checked_sub(older_than).unwrap_or(std::time::UNIX_EPOCH);
    let mut removed = 0;
    let mut dirs = vec![(dir.to_path_buf(), 0)];
    while let Some((current, depth)) = dirs.pop() {
        let entries = match fs::read_dir(&current) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("listing", &current, &e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_err("listing", &current, &e))?;
            let path = entry.path();
            let meta = entry.metadata().map_err(|e| io_err("reading", &path, &e))?;
            if meta.is_dir() {
                if depth < 2 {
                    dirs.push((path, depth + 1));
                }
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let ours = name.starts_with('.') && name.ends_with(".tmp");
            if ours && meta.modified().is_ok_and(|m| m <= cutoff) {
                match fs::remove_file(&path) {
                    Ok(()) => removed += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("removing", &path, &e)),
                }
            }
        }
    }
    Ok(removed)
}

pub(crate) fn io_err(what: &str, path: &Path, e: &std::io::Error) -> Error {
    Error::config_invalid(path.display().to_string(), format!("{what}: {e}"))
}

pub(crate) fn tls_err(path: &Path, reason: &str) -> Error {
    Error::Fatal(Fatal::Corrupt { path: path.to_owned(), reason: reason.to_owned() })
}

pub(crate) fn rcgen_err(what: &str, e: &rcgen::Error) -> Error {
    Error::internal(format!("{what}: {e}"))
}

fn missing_pair(missing: &Path, present: &Path) -> Error {
    Error::config_invalid(
        missing.display().to_string(),
        format!(
            "missing while {} exists; refusing to overwrite a half CA (restore the file or remove both)",
            present.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_server_resumes_no_session_so_every_connection_authenticates_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        ensure_dev_ca(dir.path()).expect("CA");
        issue_server_cert(dir.path(), &[]).expect("server cert");
        let worker = issue_client_cert(dir.path(), &WorkerId::new("w1").expect("id")).expect("worker cert");
        let server =
            server_config(&CertFiles::ca(dir.path()).cert, &CertFiles::coordinator(dir.path())).expect("server");
        // The client keeps sessions (rustls's default): only the server's refusal makes it a full handshake.
        let client = client_config(&CertFiles::ca(dir.path()).cert, &worker).expect("client");
        for round in 0..3 {
            let name = ServerName::try_from("localhost").expect("name");
            let mut c = rustls::ClientConnection::new(Arc::clone(&client), name).expect("client connection");
            let mut s = rustls::ServerConnection::new(Arc::clone(&server)).expect("server connection");
            // Handshake, then a few more flights for any session ticket.
            for _ in 0..6 {
                let mut wire = Vec::new();
                c.write_tls(&mut wire).expect("client writes");
                s.read_tls(&mut wire.as_slice()).expect("server reads");
                s.process_new_packets().expect("server handshake");
                let mut wire = Vec::new();
                s.write_tls(&mut wire).expect("server writes");
                c.read_tls(&mut wire.as_slice()).expect("client reads");
                c.process_new_packets().expect("client handshake");
            }
            assert!(!c.is_handshaking() && !s.is_handshaking(), "round {round}: the handshake completes");
            assert_eq!(c.handshake_kind(), Some(rustls::HandshakeKind::Full), "round {round}");
            assert!(
                s.peer_certificates().is_some_and(|chain| !chain.is_empty()),
                "round {round}: the client authenticated"
            );
        }
    }

    #[test]
    fn stale_temporary_files_go_and_young_ones_and_real_files_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        let make = |rel: &str, aged: bool| {
            let path = dir.path().join(rel);
            fs::create_dir_all(path.parent().expect("parent")).expect("dir");
            let file = fs::File::create(&path).expect("create");
            if aged {
                file.set_modified(old).expect("age it");
            }
            path
        };
        let stale = [
            make(".worker.w1.key.pem.41.0.tmp", true),
            make("enrolled/.w2.pem.41.1.tmp", true),
            make("workers/w3/.key.pem.41.2.tmp", true),
        ];
        let kept = [
            make(".ca.pem.42.0.tmp", false),
            make("workers/w1/cert.pem", true),
            make("a/b/c/.deep.pem.1.0.tmp", true),
            make("notes.tmp", true),
        ];
        assert_eq!(remove_stale_tmp(dir.path(), std::time::Duration::from_secs(3600)).expect("sweep"), 3);
        assert!(stale.iter().all(|p| !p.exists()), "the crashed writes are gone");
        assert!(kept.iter().all(|p| p.exists()), "young, real, too deep or not ours: kept");
        assert_eq!(remove_stale_tmp(&dir.path().join("absent"), std::time::Duration::ZERO).expect("no dir"), 0);
    }

    #[test]
    fn ids_cannot_name_each_others_files_and_the_flat_layout_is_migrated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path();
        ensure_dev_ca(dir).expect("ca");
        // "w1.key" was refused once because worker.w1.key.pem was w1's key; now each id
        // has a directory of its own.
        let w1 = WorkerId::new("w1").expect("id");
        let w1_key = WorkerId::new("w1.key").expect("any id is a directory name");
        let a = issue_client_cert(dir, &w1).expect("w1");
        let b = issue_client_cert(dir, &w1_key).expect("w1.key");
        let files = [&a.cert, &a.key, &b.cert, &b.key];
        for (i, x) in files.iter().enumerate() {
            assert!(files[i + 1..].iter().all(|y| x != y), "{x:?} is used twice");
        }
        assert_eq!(CertInfo::of_file(&a.cert).expect("w1").role, Some(PeerRole::Worker(w1.clone())));
        load_pair(&a).expect("w1's key is still w1's");

        // The flat layout of earlier releases, with a renewal staged, moves on first use.
        let w2 = WorkerId::new("w2").expect("id");
        let new = issue_client_cert(dir, &w2).expect("w2");
        let ops = issue_operator_cert(dir, "ops").expect("ops");
        let flat = |stem: &str, suffix: &str| dir.join(format!("{stem}{suffix}"));
        for (files, stem) in [(&new, "worker.w2"), (&ops, "operator.ops")] {
            fs::rename(&files.cert, flat(stem, ".pem")).expect("flat cert");
            fs::rename(&files.key, flat(stem, ".key.pem")).expect("flat key");
        }
        fs::write(flat("worker.w2", ".pem.next"), b"staged").expect("staged");
        fs::write(dir.join("worker.bad id.pem"), b"not an id").expect("junk");
        assert_eq!(migrate_layout(dir).expect("migrate"), 5);
        assert_eq!(CertInfo::of_file(&new.cert).expect("moved").role, Some(PeerRole::Worker(w2.clone())));
        load_pair(&new).expect("w2's pair fits");
        load_pair(&ops).expect("ops's pair fits");
        assert_eq!(fs::read(crate::renewal::staged(&new).cert).expect("staged moved"), b"staged");
        assert!(dir.join("worker.bad id.pem").exists(), "what is not an identity's file stays");
        assert_eq!(migrate_layout(dir).expect("again"), 0, "idempotent");
    }

    #[test]
    fn dev_ca_is_created_once_with_a_private_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ensure_dev_ca(dir.path()).expect("created");
        assert!(first.created);
        let mode = fs::metadata(&first.files.key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let before = fs::read(&first.files.cert).expect("cert");
        let second = ensure_dev_ca(dir.path()).expect("idempotent");
        assert!(!second.created);
        assert_eq!(fs::read(&first.files.cert).expect("cert"), before);
    }

    #[test]
    fn a_lone_ca_file_is_named_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ensure_dev_ca(dir.path()).expect("created");
        fs::remove_file(&ca.files.key).expect("remove");
        let err = ensure_dev_ca(dir.path()).expect_err("half a CA");
        assert!(err.to_string().contains("ca.key.pem"), "{err}");
    }

    #[test]
    fn issued_certificates_carry_their_role() {
        let dir = tempfile::tempdir().expect("tempdir");
        ensure_dev_ca(dir.path()).expect("ca");
        let w1 = WorkerId::new("w1").expect("id");
        let worker = issue_client_cert(dir.path(), &w1).expect("worker");
        let operator = issue_operator_cert(dir.path(), "alice").expect("operator");
        let server = issue_server_cert(dir.path(), &["coord.example".into()]).expect("server");
        let der = |p: &Path| load_certs(p).expect("loads").remove(0);
        assert_eq!(peer_role(&der(&worker.cert)), Some(PeerRole::Worker(w1)));
        assert_eq!(peer_role(&der(&operator.cert)), Some(PeerRole::Operator("alice".into())));
        assert_eq!(peer_role(&der(&server.cert)), None);
        let ca = CertFiles::ca(dir.path()).cert;
        server_config(&ca, &server).expect("server config");
        client_config(&ca, &worker).expect("client config");
    }

    #[test]
    fn missing_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = issue_client_cert(dir.path(), &WorkerId::new("w1").expect("id")).expect_err("no CA");
        assert!(err.to_string().contains("ca.key.pem"), "{err}");
    }

    #[test]
    fn server_names_come_from_addresses() {
        assert!(matches!(server_name_of("127.0.0.1:7450"), Ok(ServerName::IpAddress(_))));
        assert!(matches!(server_name_of("localhost:7450"), Ok(ServerName::DnsName(_))));
        assert!(matches!(server_name_of("[::1]:7450"), Ok(ServerName::IpAddress(_))));
    }
}
