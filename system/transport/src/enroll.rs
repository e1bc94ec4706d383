//! Enrollment: a worker without a certificate trades a short-lived bootstrap token and
//! a certificate signing request for a worker client certificate.
//!
//! ```text
//! operator (where the CA key is)          worker (no certificate yet)
//!   rollout token create --worker w7  ──▶   rollout worker --join ADDR --token T --id w7
//!     writes tokens/<id>.json                 key pair + CSR made here; the key never leaves
//!                                             TLS without a client certificate; the server's
//!                                             chain must contain the CA the token pins
//! coordinator  ◀──────── Enrollment/Enroll(token, w7, CSR) ─────────
//!   checks the token, claims it (tokens/<id>.used),
//!   signs the CSR's public key as worker w7   ──▶  ca.pem, worker.w7.pem, worker.w7.key.pem
//! ```
//!
//! # The token
//!
//! `rollout-token-v1.<id>.<secret>.<ca sha256>.<expires unix s>[.<worker>]`, all hex but
//! the worker id. The id (64 random bits) names the token's record, the secret (128
//! random bits, from ring's `SystemRandom`) proves possession, the CA hash is the pin a
//! joining worker checks the server against before it sends anything, and the expiry
//! and worker id are copies the worker uses to fail early without a round trip.
//!
//! Why a stored record rather than an HMAC over the fields: single use needs durable
//! state on the coordinator's side anyway, and a record lets an operator see and revoke
//! tokens by looking at files. The record (`<tls_dir>/tokens/<id>.json`, mode 0600, in a
//! 0700 directory) holds only the SHA-256 of the secret, so reading the directory does
//! not let anyone enroll; the record, not the token text, is the authority for expiry,
//! binding and pin (a token whose copies were edited is refused by the record). There
//! is no key to keep: an HMAC key would be one more secret whose leak lets anyone mint
//! tokens.
//!
//! Single use: the coordinator claims a token by creating `tokens/<id>.used` with
//! `O_EXCL` (and fsyncs it and the directory) before it signs, so two concurrent Enroll
//! calls with one token cannot both succeed, and a used token stays used across
//! restarts. Two processes may share the directory (`rollout token create` writes new
//! records while the coordinator claims old ones); no file is ever rewritten in place.
//!
//! An unbound token cannot take over a worker id that already has a certificate from
//! this CA (`enrolled/<id>.pem`, or `worker.<id>.pem` in the TLS directory); replacing
//! one (a worker whose disk was lost) needs a token bound to that id. An unbound token
//! also claims the id (`enrolled/<id>.claimed`, `O_EXCL`) before the token itself, so
//! two unbound tokens racing for one new id cannot both win.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, KeyPair};
use rollout_core::config::duration_text;
use rollout_core::time::{from_unix_millis, unix_millis};
use rollout_core::{Error, Fatal, Result, RetryHint, WorkerId};
use rollout_proto::transport as pb;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::limiter::{LogLimiter, WindowCounter, source_of};
use crate::net::{PeerInfo, TcpDialer, TlsConnector, lazy_channel};
use crate::tls::{self, ALPN_H2, CertFiles, PeerRole};

/// What every token text starts with.
pub const TOKEN_PREFIX: &str = "rollout-token-v1";
/// The lifetime of a token when none is asked for.
pub const TOKEN_TTL_DEFAULT: Duration = Duration::from_secs(3600);
/// The longest lifetime a token may have: bootstrap tokens are meant to be short-lived.
pub const TOKEN_TTL_MAX: Duration = Duration::from_secs(7 * 24 * 3600);
/// Token records under the TLS directory.
pub const TOKENS_DIR: &str = "tokens";
/// Certificates issued by enrollment (public parts, for the record) under the TLS directory.
pub const ENROLLED_DIR: &str = "enrolled";
/// The longest token text Enroll reads.
pub const TOKEN_TEXT_BYTES_MAX: usize = 512;
/// The largest CSR Enroll reads.
pub const CSR_PEM_BYTES_MAX: usize = 16 * 1024;
/// Records of tokens expired longer than this are removed by the next `create_token`
/// (until then a late attempt is told "expired", not "unknown").
const PRUNE_AFTER_EXPIRY: Duration = Duration::from_secs(24 * 3600);

const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 16;

// ------------------------------------------------------------------ the pin

/// The SHA-256 of a CA certificate (DER): what a token pins.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CaPin(pub [u8; 32]);

impl CaPin {
    /// The pin of a certificate (DER).
    pub fn of(cert_der: &[u8]) -> Self {
        CaPin(sha256(cert_der))
    }

    /// The pin of the first certificate in the PEM file `ca_cert`.
    pub fn of_file(ca_cert: &Path) -> Result<Self> {
        let certs = tls::load_certs(ca_cert)?;
        Ok(CaPin::of(&certs[0]))
    }
}

impl fmt::Display for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for CaPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

// ------------------------------------------------------------------ the token

/// A bootstrap token, as `rollout token create` prints it and `--join` reads it.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    /// Names the record (hex, public: it appears in logs).
    pub id: String,
    secret: [u8; SECRET_BYTES],
    /// The CA the worker must find in the server's chain.
    pub ca_pin: CaPin,
    /// A copy of the record's expiry (whole seconds), for an early check on the worker.
    pub expires_at: SystemTime,
    /// A copy of the record's binding: only this worker id may enroll with it.
    pub worker: Option<WorkerId>,
}

impl fmt::Debug for BootstrapToken {
    // The secret never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapToken")
            .field("id", &self.id)
            .field("ca_pin", &self.ca_pin)
            .field("expires_at", &utc_text(self.expires_at))
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let expires_s = unix_millis(self.expires_at) / 1000;
        write!(
            f,
            "{TOKEN_PREFIX}.{}.{}.{}.{expires_s}",
            self.id,
            hex::encode(self.secret),
            hex::encode(self.ca_pin.0)
        )?;
        if let Some(worker) = &self.worker {
            write!(f, ".{worker}")?;
        }
        Ok(())
    }
}

impl FromStr for BootstrapToken {
    type Err = String;

    /// Parses a token's text; the error says which part is wrong (never echoing the secret).
    fn from_str(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        if text.len() > TOKEN_TEXT_BYTES_MAX {
            return Err(format!("longer than {TOKEN_TEXT_BYTES_MAX} bytes"));
        }
        // The worker id may contain '.', so it is the sixth part and takes the rest.
        let parts: Vec<&str> = text.splitn(6, '.').collect();
        if parts.len() < 5 || parts[0] != TOKEN_PREFIX {
            return Err(format!(
                "not a rollout bootstrap token (expected {TOKEN_PREFIX}.<id>.<secret>.<ca sha256>.<expiry>[.<worker>], \
                 as printed by `rollout token create`)"
            ));
        }
        let id = parts[1];
        if id.len() != 2 * ID_BYTES || hex::decode(id).is_err() {
            return Err(format!("the id part is not {} hex digits", 2 * ID_BYTES));
        }
        let secret: [u8; SECRET_BYTES] = hex::decode(parts[2])
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("token {id}: the secret part is not {} hex digits", 2 * SECRET_BYTES))?;
        let pin: [u8; 32] = hex::decode(parts[3])
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("token {id}: the CA hash part is not 64 hex digits"))?;
        let expires_s: u64 =
            parts[4].parse().map_err(|_| format!("token {id}: the expiry part is not a number of seconds"))?;
        let worker = match parts.get(5) {
            Some(w) => Some(WorkerId::new(*w).map_err(|e| format!("token {id}: the worker part: {e}"))?),
            None => None,
        };
        Ok(BootstrapToken {
            id: id.to_owned(),
            secret,
            ca_pin: CaPin(pin),
            expires_at: from_unix_millis(expires_s.saturating_mul(1000)),
            worker,
        })
    }
}

/// What the coordinator keeps of a token (`tokens/<id>.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The token's id.
    pub id: String,
    /// SHA-256 of the secret, hex; the secret itself is never stored.
    pub secret_sha256: String,
    /// The CA it was made for, hex.
    pub ca_sha256: String,
    /// Only this worker may enroll with it.
    pub worker: Option<String>,
    /// When it was made.
    pub created_at_unix_ms: u64,
    /// When it stops working.
    pub expires_at_unix_ms: u64,
}

/// What `tokens/<id>.used` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    /// The worker that enrolled with it.
    pub worker: String,
    /// When.
    pub used_at_unix_ms: u64,
}

/// Makes a token for the CA in `tls_dir` valid for `ttl` from `now`, optionally bound
/// to `worker`, and writes its record. Needs only `ca.pem` (the coordinator that
/// serves Enroll needs the CA key). Removes records that expired over a day ago.
pub fn create_token(
    tls_dir: &Path,
    ttl: Duration,
    worker: Option<WorkerId>,
    now: SystemTime,
) -> Result<BootstrapToken> {
    if ttl.is_zero() || ttl > TOKEN_TTL_MAX {
        return Err(Error::invalid_input(format!(
            "--ttl: {} is outside 1s..={} (bootstrap tokens are short-lived)",
            duration_text::format(ttl),
            duration_text::format(TOKEN_TTL_MAX)
        )));
    }
    let ca_pin = CaPin::of_file(&CertFiles::ca(tls_dir).cert)?;
    let dir = tokens_dir(tls_dir)?;
    prune_expired(&dir, now);
    let random = ring::rand::SystemRandom::new();
    let mut id = [0u8; ID_BYTES];
    let mut secret = [0u8; SECRET_BYTES];
    ring::rand::SecureRandom::fill(&random, &mut id)
        .and_then(|()| ring::rand::SecureRandom::fill(&random, &mut secret))
        .map_err(|_| Error::internal("the operating system's random number generator failed"))?;
    // Whole seconds, so the token's copy of the expiry equals the record's.
    let expires_at = from_unix_millis((unix_millis(now + ttl) / 1000) * 1000);
    let token = BootstrapToken { id: hex::encode(id), secret, ca_pin, expires_at, worker };
    let record = TokenRecord {
        id: token.id.clone(),
        secret_sha256: hex::encode(sha256(&secret)),
        ca_sha256: hex::encode(ca_pin.0),
        worker: token.worker.as_ref().map(|w| w.to_string()),
        created_at_unix_ms: unix_millis(now),
        expires_at_unix_ms: unix_millis(expires_at),
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| Error::internal(format!("token record: {e}")))?;
    tls::write_private(&dir.join(format!("{}.json", token.id)), &json)?;
    tracing::info!(channel = "tls", event = "token_created", id = %token.id, worker = ?token.worker,
        expires_at = %utc_text(expires_at), "token_created");
    Ok(token)
}

/// Every token record in `tls_dir`, with its use if it was used, oldest first.
pub fn list_tokens(tls_dir: &Path) -> Result<Vec<(TokenRecord, Option<TokenUse>)>> {
    let dir = tls_dir.join(TOKENS_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(tls::io_err("listing", &dir, &e)),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            let record = read_record(&path)?;
            let used = read_use(&dir.join(format!("{}.used", record.id)))?;
            out.push((record, used));
        }
    }
    out.sort_by(|a, b| (a.0.created_at_unix_ms, &a.0.id).cmp(&(b.0.created_at_unix_ms, &b.0.id)));
    Ok(out)
}

/// Removes a token's record, so it can no longer be used. `Ok(false)` when there was none.
pub fn revoke_token(tls_dir: &Path, id: &str) -> Result<bool> {
    if id.len() != 2 * ID_BYTES || hex::decode(id).is_err() {
        return Err(Error::invalid_input(format!("token id {id:?}: not {} hex digits", 2 * ID_BYTES)));
    }
    let path = tls_dir.join(TOKENS_DIR).join(format!("{id}.json"));
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(tls::io_err("removing", &path, &e)),
    }
}

fn tokens_dir(tls_dir: &Path) -> Result<PathBuf> {
    let dir = tls_dir.join(TOKENS_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| tls::io_err("creating directory", &dir, &e))?;
    Ok(dir)
}

fn prune_expired(dir: &Path, now: SystemTime) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        if let Ok(record) = read_record(&path)
            && from_unix_millis(record.expires_at_unix_ms) + PRUNE_AFTER_EXPIRY < now
        {
            let _ = fs::remove_file(dir.join(format!("{}.used", record.id)));
            let _ = fs::remove_file(&path);
        }
    }
}

fn read_record(path: &Path) -> Result<TokenRecord> {
    let text = tls::read_text(path)?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Fatal(Fatal::Corrupt { path: path.to_owned(), reason: format!("not a token record: {e}") }))
}

fn read_use(path: &Path) -> Result<Option<TokenUse>> {
    match rollout_core::text::read_text_bounded(path, 64 * 1024) {
        // A marker cut short by a crash still means "used".
        Ok(text) => Ok(Some(
            serde_json::from_str(&text).unwrap_or(TokenUse { worker: "(unrecorded)".into(), used_at_unix_ms: 0 }),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(tls::io_err("reading", path, &e)),
    }
}

/// Creates `path` only if it does not exist (the claim), durably.
fn claim(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

// ------------------------------------------------------------------ the server side

/// Largest Enroll request decoded: a token, a worker id and a CSR fit in far less.
/// The request comes from a peer without a certificate, so it is bounded tightly.
pub const ENROLL_MESSAGE_BYTES_MAX: usize = 2 * CSR_PEM_BYTES_MAX;

/// The `Enrollment` service: checks a bootstrap token and signs a worker's CSR with the
/// CA in its TLS directory. Reachable without a client certificate (it is how a worker
/// gets one); every other service refuses such connections. A source address whose
/// enrollments failed `limits.max_failed_enrollments_per_minute` times in a minute is
/// refused (`RESOURCE_EXHAUSTED`) for the rest of that minute, without a token check.
#[derive(Debug, Clone)]
pub struct EnrollmentApi {
    tls_dir: PathBuf,
    failures_per_minute_max: u32,
    failures: Arc<WindowCounter>,
    refusals: Arc<LogLimiter>,
}

impl EnrollmentApi {
    /// Enrollment against the CA, tokens and records in `tls_dir`, with the default limits.
    pub fn new(tls_dir: impl Into<PathBuf>) -> Self {
        let limits = rollout_core::config::LimitsConfig::default();
        Self::with_limits(tls_dir, &limits)
    }

    /// Enrollment against `tls_dir`, with `limits.max_failed_enrollments_per_minute`.
    pub fn with_limits(tls_dir: impl Into<PathBuf>, limits: &rollout_core::config::LimitsConfig) -> Self {
        EnrollmentApi {
            tls_dir: tls_dir.into(),
            failures_per_minute_max: limits.max_failed_enrollments_per_minute,
            failures: Arc::new(WindowCounter::new(Duration::from_secs(60))),
            refusals: Arc::new(LogLimiter::new(crate::net::REFUSAL_LOG_INTERVAL)),
        }
    }

    /// The service, with message size limits ([`ENROLL_MESSAGE_BYTES_MAX`] in,
    /// `max_message_bytes` out), ready for a tonic router.
    pub fn into_service(self, max_message_bytes: usize) -> pb::enrollment_server::EnrollmentServer<EnrollmentApi> {
        pb::enrollment_server::EnrollmentServer::new(self)
            .max_decoding_message_size(ENROLL_MESSAGE_BYTES_MAX.min(max_message_bytes))
            .max_encoding_message_size(max_message_bytes)
    }
}

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for EnrollmentApi {
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> std::result::Result<Response<pb::EnrollResponse>, Status> {
        let remote = req.extensions().get::<PeerInfo>().map(|p| p.remote.clone()).unwrap_or_default();
        let source = source_of(&remote).to_owned();
        let (failed, left) = self.failures.current(&source, tokio::time::Instant::now());
        if failed >= self.failures_per_minute_max {
            let status = Status::resource_exhausted(format!(
                "{failed} enrollments from {source} failed within a minute \
                 (limits.max_failed_enrollments_per_minute = {}); retry in {}s",
                self.failures_per_minute_max,
                left.as_secs().max(1)
            ));
            self.log_refusal(&source, &remote, &status);
            return Err(status);
        }
        let tls_dir = self.tls_dir.clone();
        let req = req.into_inner();
        // File I/O, fsyncs and signing: off the async threads.
        let outcome = tokio::task::spawn_blocking(move || enroll(&tls_dir, &req, SystemTime::now()))
            .await
            .map_err(|e| Status::internal(format!("enrollment task: {e}")))?;
        match &outcome {
            Ok((worker, token_id, _)) => {
                tracing::info!(channel = "tls", event = "worker_enrolled", %worker, token = %token_id, %remote,
                    "worker_enrolled");
            }
            Err(status) => {
                if status.code() != tonic::Code::Internal {
                    self.failures.count(&source, tokio::time::Instant::now());
                }
                self.log_refusal(&source, &remote, status);
            }
        }
        outcome.map(|(_, _, response)| Response::new(response))
    }
}

impl EnrollmentApi {
    /// Logs a refused enrollment, once per source per interval.
    fn log_refusal(&self, source: &str, remote: &str, status: &Status) {
        if let Some(suppressed) = self.refusals.admit(source, tokio::time::Instant::now()) {
            tracing::warn!(channel = "tls", event = "enroll_refused", %remote, code = ?status.code(),
                reason = status.message(), suppressed, "enroll_refused");
        }
    }
}

/// Checks the request and the token, claims the token, signs. Nothing is claimed or
/// written unless every check passed.
fn enroll(
    tls_dir: &Path,
    req: &pb::EnrollRequest,
    now: SystemTime,
) -> std::result::Result<(WorkerId, String, pb::EnrollResponse), Status> {
    let token: BootstrapToken =
        req.bootstrap_token.parse().map_err(|e| Status::invalid_argument(format!("enroll.bootstrap_token: {e}")))?;
    let worker = rollout_proto::worker_id("enroll.worker_id", &req.worker_id)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    if req.csr_pem.len() > CSR_PEM_BYTES_MAX {
        return Err(Status::invalid_argument(format!(
            "enroll.csr_pem: {} bytes, over the limit of {CSR_PEM_BYTES_MAX}",
            req.csr_pem.len()
        )));
    }
    let id = &token.id;
    let dir = tls_dir.join(TOKENS_DIR);
    let record_path = dir.join(format!("{id}.json"));
    if !record_path.exists() {
        return Err(Status::unauthenticated(format!(
            "enroll.bootstrap_token: unknown token {id} (not made for this coordinator's CA, revoked, or pruned \
             after it expired); create one with `rollout token create`"
        )));
    }
    let record = read_record(&record_path).map_err(|e| Status::internal(e.to_string()))?;
    if !equal_in_constant_time(hex::encode(sha256(&token.secret)).as_bytes(), record.secret_sha256.as_bytes()) {
        return Err(Status::unauthenticated(format!("enroll.bootstrap_token: wrong secret for token {id}")));
    }
    let ca = CertFiles::ca(tls_dir);
    let ca_pin = CaPin::of_file(&ca.cert).map_err(|e| Status::failed_precondition(e.to_string()))?;
    if record.ca_sha256 != hex::encode(ca_pin.0) {
        return Err(Status::failed_precondition(format!(
            "enroll.bootstrap_token: token {id} was made for another CA (sha256:{}); this coordinator's CA is {ca_pin}; \
             create a new token",
            record.ca_sha256
        )));
    }
    let expires_at = from_unix_millis(record.expires_at_unix_ms);
    if now >= expires_at {
        let ago = now.duration_since(expires_at).unwrap_or_default();
        return Err(Status::unauthenticated(format!(
            "enroll.bootstrap_token: token {id} expired at {} ({} ago); create a new one with `rollout token create`",
            utc_text(expires_at),
            duration_text::format(Duration::from_secs(ago.as_secs()))
        )));
    }
    let used_path = dir.join(format!("{id}.used"));
    if let Some(used) = read_use(&used_path).map_err(|e| Status::internal(e.to_string()))? {
        return Err(used_status(id, &used));
    }
    match &record.worker {
        Some(bound) if bound != worker.as_str() => {
            return Err(Status::permission_denied(format!(
                "enroll.worker_id: token {id} is bound to worker {bound}; it cannot enroll worker {worker}"
            )));
        }
        Some(_) => {}
        None => {
            let enrolled = tls_dir.join(ENROLLED_DIR).join(format!("{worker}.pem"));
            if enrolled.exists()
                || id_claim_path(tls_dir, &worker).exists()
                || CertFiles::worker(tls_dir, &worker).cert.exists()
            {
                return Err(id_taken(&worker));
            }
        }
    }
    let csr = parse_csr(&req.csr_pem)?;
    let issuer = tls::ca_issuer(tls_dir)
        .map_err(|e| Status::failed_precondition(format!("enrollment needs the CA key on the coordinator ({e})")))?;
    // The claim comes last among the checks and before the signature: a refused request
    // leaves the token usable, and of two concurrent requests only one gets here.
    let used = TokenUse { worker: worker.to_string(), used_at_unix_ms: unix_millis(now) };
    let used_json = serde_json::to_vec(&used).map_err(|e| Status::internal(format!("token use record: {e}")))?;
    // An unbound token claims the new worker id as well (first), so two of them racing
    // for one id cannot both get a certificate for it.
    let id_claim = match &record.worker {
        Some(_) => None,
        None => {
            let path = id_claim_path(tls_dir, &worker);
            let created =
                path.parent().map_or(Ok(()), |dir| fs::DirBuilder::new().recursive(true).mode(0o700).create(dir));
            match created.and_then(|()| claim(&path, &used_json)) {
                Ok(()) => Some(path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(id_taken(&worker)),
                Err(e) => {
                    return Err(Status::internal(format!("claiming worker id {worker} ({}): {e}", path.display())));
                }
            }
        }
    };
    if let Err(e) = claim(&used_path, &used_json) {
        // The token was not ours to use: neither is the id.
        if let Some(path) = &id_claim {
            let _ = fs::remove_file(path);
        }
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            let used = read_use(&used_path).ok().flatten().unwrap_or(used);
            return Err(used_status(id, &used));
        }
        return Err(Status::internal(format!("claiming token {id} ({}): {e}", used_path.display())));
    }
    // Only the CSR's public key is used (its signature was checked by the parser); the
    // name, usages and role are the ones every worker certificate has.
    let cert = tls::worker_cert_params(&worker)
        .and_then(|params| {
            params.signed_by(&csr.public_key, &issuer).map_err(|e| Error::internal(format!("signing: {e}")))
        })
        .map_err(|e| Status::internal(format!("issuing the certificate of worker {worker}: {e}")))?;
    let cert_pem = cert.pem();
    let record = tls_dir.join(ENROLLED_DIR).join(format!("{worker}.pem"));
    tls::write_public(&record, cert_pem.as_bytes()).map_err(|e| Status::internal(e.to_string()))?;
    let ca_pem = tls::read_text(&ca.cert).map_err(|e| Status::internal(e.to_string()))?;
    Ok((worker, id.clone(), pb::EnrollResponse { certificate_pem: cert_pem, ca_certificate_pem: ca_pem }))
}

/// A signing request from a peer: at most [`CSR_PEM_BYTES_MAX`], PEM PKCS#10, its
/// signature checked. The error names the field.
pub fn parse_csr(pem: &str) -> std::result::Result<CertificateSigningRequestParams, Status> {
    if pem.len() > CSR_PEM_BYTES_MAX {
        return Err(Status::invalid_argument(format!(
            "enroll.csr_pem: {} bytes, over the limit of {CSR_PEM_BYTES_MAX}",
            pem.len()
        )));
    }
    CertificateSigningRequestParams::from_pem(pem).map_err(|e| {
        Status::invalid_argument(format!("enroll.csr_pem: not a valid PEM PKCS#10 certificate signing request: {e}"))
    })
}

/// `enrolled/<worker>.claimed`: created (`O_EXCL`) by the first unbound-token
/// enrollment of a worker id. It stays: the id is taken from then on, even if that
/// enrollment failed after its claim (a token bound to the id can still enroll it).
fn id_claim_path(tls_dir: &Path, worker: &WorkerId) -> PathBuf {
    tls_dir.join(ENROLLED_DIR).join(format!("{worker}.claimed"))
}

fn id_taken(worker: &WorkerId) -> Status {
    Status::already_exists(format!(
        "enroll.worker_id: worker {worker} already has a certificate from this CA; to replace it, use a token bound \
         to it (`rollout token create --worker {worker}`)"
    ))
}

fn used_status(id: &str, used: &TokenUse) -> Status {
    Status::unauthenticated(format!(
        "enroll.bootstrap_token: token {id} was already used (by worker {} at {}); tokens are single-use",
        used.worker,
        utc_text(from_unix_millis(used.used_at_unix_ms))
    ))
}

/// Compares without an early exit (the inputs are hashes of secrets, so this is belt
/// and braces).
fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A tonic interceptor for every service but Enrollment: refuses a connection that
/// presented no client certificate with a rollout role (`UNAUTHENTICATED`), before the
/// request reaches a handler. The handlers check the role again.
pub fn require_client_certificate(req: Request<()>) -> std::result::Result<Request<()>, Status> {
    match req.extensions().get::<PeerInfo>() {
        Some(PeerInfo { role: Some(_), .. }) => Ok(req),
        _ => Err(Status::unauthenticated(
            "no client certificate with a rollout role on this connection; without one only Enrollment/Enroll may \
             be called (get one with `rollout worker --join ADDR --token T` or `rollout certs issue`)",
        )),
    }
}

// ------------------------------------------------------------------ the worker side

/// What a joining worker needs.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The coordinator (`host:port`); its certificate must name the host.
    pub addr: String,
    /// The bootstrap token.
    pub token: BootstrapToken,
    /// The worker id to enroll as.
    pub worker: WorkerId,
    /// Where `ca.pem`, `worker.<id>.pem` and `worker.<id>.key.pem` are written.
    pub tls_dir: PathBuf,
    /// Message size limit.
    pub max_message_bytes: usize,
    /// First delay before retrying a coordinator that could not be reached; doubles
    /// per failure (with jitter) up to `retry_max`. A refusal is never retried.
    pub retry_initial: Duration,
    /// Upper bound of the retry delay.
    pub retry_max: Duration,
    /// Give up after this many failed attempts to reach the coordinator (`None`: keep
    /// trying, like a worker reconnecting; stop it with Ctrl-C).
    pub attempts_max: Option<u32>,
}

/// What [`join`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// The certificate files were there already; nothing was sent.
    AlreadyEnrolled(CertFiles),
    /// A certificate was obtained and written.
    Enrolled(CertFiles),
}

/// Obtains a worker certificate through Enroll unless `worker.<id>.pem`, its key and
/// `ca.pem` are already in the TLS directory (then it does nothing: `--join` is
/// idempotent).
///
/// The key pair is made here and never sent. The connection presents no client
/// certificate, and the server's certificate is accepted only if the chain it sends
/// contains the CA whose SHA-256 is the token's pin and verifies against it (names
/// included), so the token and the CSR go to no one else. The answer is checked too:
/// the CA must be the pinned one and the certificate must verify against it, name this
/// worker and hold this key. Only then are `ca.pem`, the key (0600) and the certificate
/// written, in that order (the certificate last: its presence means "done").
///
/// A coordinator that cannot be reached (down, restarting, not yet listening) is tried
/// again with jittered exponential backoff; a refusal (bad token, wrong id, a server
/// without the pinned CA) ends it at once with the reason.
pub async fn join(opts: JoinOptions) -> Result<Joined> {
    let JoinOptions { addr, token, worker, tls_dir, max_message_bytes, retry_initial, retry_max, attempts_max } = opts;
    let files = CertFiles::worker(&tls_dir, &worker);
    let ca_files = CertFiles::ca(&tls_dir);
    if files.exist() && ca_files.cert.exists() {
        return Ok(Joined::AlreadyEnrolled(files));
    }
    if let Some(bound) = &token.worker
        && bound != &worker
    {
        return Err(Error::invalid_input(format!("--id: token {} is bound to worker {bound}, not {worker}", token.id)));
    }
    if ca_files.cert.exists() {
        let existing = CaPin::of_file(&ca_files.cert)?;
        if existing != token.ca_pin {
            return Err(Error::config_invalid(
                ca_files.cert.display().to_string(),
                format!(
                    "holds CA {existing}, but token {} pins {}; remove the file or use a token from that CA",
                    token.id, token.ca_pin
                ),
            ));
        }
    }
    if SystemTime::now() >= token.expires_at {
        // The coordinator's clock decides; this one may be off.
        tracing::warn!(channel = "tls", token = %token.id, expires_at = %utc_text(token.expires_at),
            "the bootstrap token looks expired by this machine's clock; trying anyway");
    }

    let key = KeyPair::generate().map_err(|e| Error::internal(format!("generating the worker key: {e}")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, worker.as_str());
    params.distinguished_name = dn;
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| Error::internal(format!("making the certificate signing request: {e}")))?;

    let pin_refusal = PinRefusal::default();
    let connector = TlsConnector::new(
        TcpDialer::new(addr.clone()),
        pinned_client_config_reporting(token.ca_pin, pin_refusal.clone()),
        tls::server_name_of(&addr)?,
    );
    let mut client = pb::enrollment_client::EnrollmentClient::new(lazy_channel(connector))
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let request = pb::EnrollRequest { bootstrap_token: token.to_string(), worker_id: worker.to_string(), csr_pem };
    let mut backoff = rollout_worker::Backoff::new(retry_initial, retry_max);
    let mut rng = rollout_core::rng::SplitMix64::new(jitter_seed());
    let mut failures = 0u32;
    let response = loop {
        let status = match client.enroll(request.clone()).await {
            Ok(response) => break response.into_inner(),
            Err(status) => status,
        };
        if let Some(reason) = pin_refusal.take() {
            // The server is not the pinned CA's: never retried, and the token never left.
            return Err(Error::Fatal(Fatal::PermissionDenied(format!("enroll at {addr} refused ({reason})"))));
        }
        let err = refused(&addr, &status);
        if !matches!(err, Error::Recoverable { .. }) {
            return Err(err);
        }
        failures += 1;
        if attempts_max.is_some_and(|max| failures >= max) {
            return Err(err);
        }
        let delay = backoff.next_delay(&mut rng);
        tracing::warn!(channel = "tls", %addr, attempt = failures, retry_in = ?delay, error = %err,
            "--join: the coordinator cannot be reached yet; retrying");
        tokio::time::sleep(delay).await;
    };

    let ca_der = CertificateDer::from_pem_slice(response.ca_certificate_pem.as_bytes()).map_err(|e| {
        Error::invalid_input(format!("enroll answer from {addr}: ca_certificate_pem: not a PEM certificate: {e}"))
    })?;
    if CaPin::of(&ca_der) != token.ca_pin {
        return Err(Error::invalid_input(format!(
            "enroll answer from {addr}: ca_certificate_pem is CA {}, not the pinned {}",
            CaPin::of(&ca_der),
            token.ca_pin
        )));
    }
    let cert_der = CertificateDer::from_pem_slice(response.certificate_pem.as_bytes()).map_err(|e| {
        Error::invalid_input(format!("enroll answer from {addr}: certificate_pem: not a PEM certificate: {e}"))
    })?;
    check_issued(&cert_der, &ca_der, &worker, &key)
        .map_err(|reason| Error::invalid_input(format!("enroll answer from {addr}: certificate_pem: {reason}")))?;
    tls::write_public(&ca_files.cert, response.ca_certificate_pem.as_bytes())?;
    tls::write_private(&files.key, key.serialize_pem().as_bytes())?;
    tls::write_public(&files.cert, response.certificate_pem.as_bytes())?;
    tracing::info!(channel = "tls", event = "worker_enrolled", %worker, token = %token.id, %addr,
        cert = %files.cert.display(), "worker_enrolled: certificate written");
    Ok(Joined::Enrolled(files))
}

/// The issued certificate verifies against the CA as a client certificate, names
/// `worker` as a worker, and certifies `key`.
fn check_issued(
    cert: &CertificateDer<'static>,
    ca: &CertificateDer<'static>,
    worker: &WorkerId,
    key: &KeyPair,
) -> std::result::Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| format!("the CA is not usable: {e}"))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("building a verifier: {e}"))?;
    verifier
        .verify_client_cert(cert, &[], UnixTime::now())
        .map_err(|e| format!("does not verify against the CA: {e}"))?;
    match tls::peer_role(cert) {
        Some(PeerRole::Worker(w)) if &w == worker => {}
        other => return Err(format!("names {other:?}, not worker {worker}")),
    }
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).map_err(|e| format!("unparsable: {e}"))?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err("certifies another key than the one this worker made".into());
    }
    Ok(())
}

/// A refused or failed Enroll call as an error that says why (a TLS failure, such as a
/// pin mismatch, hides in the source chain of tonic's "transport error").
fn refused(addr: &str, status: &Status) -> Error {
    let mut reason = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let text = e.to_string();
        if !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        source = e.source();
    }
    let message = format!("enroll at {addr} refused ({:?}): {reason}", status.code());
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded => {
            Error::transient(message, RetryHint::After(Duration::from_secs(1)))
        }
        tonic::Code::InvalidArgument => Error::invalid_input(message),
        _ => Error::Fatal(Fatal::PermissionDenied(message)),
    }
}

/// A seed for retry jitter that differs between machines joining at once.
fn jitter_seed() -> u64 {
    let mut bytes = [0u8; 8];
    match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => u64::from(std::process::id()),
    }
}

/// Where the pinned verifier leaves why it refused a server, so `join` can tell a wrong
/// server (final) from an unreachable one (retried).
#[derive(Debug, Clone, Default)]
struct PinRefusal(Arc<std::sync::Mutex<Option<String>>>);

impl PinRefusal {
    fn set(&self, reason: String) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(reason);
    }

    fn take(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take()
    }
}

/// A client configuration without a client certificate that accepts the server only if
/// its chain holds the CA with hash `pin` and verifies against that CA.
pub fn pinned_client_config(pin: CaPin) -> Arc<ClientConfig> {
    pinned_client_config_reporting(pin, PinRefusal::default())
}

fn pinned_client_config_reporting(pin: CaPin, refusal: PinRefusal) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCaVerifier { pin, provider: Arc::clone(&provider), refusal });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(config)
}

/// Trusts exactly one CA, found by its hash among the certificates the server sends.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: CaPin,
    provider: Arc<CryptoProvider>,
    refusal: PinRefusal,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let verified = (|| {
            let Some(ca) = intermediates.iter().find(|c| CaPin::of(c) == self.pin) else {
                return Err(rustls::Error::General(format!(
                    "the server's certificate chain does not contain the CA the bootstrap token pins ({}); \
                     refusing to send the token",
                    self.pin
                )));
            };
            let mut roots = RootCertStore::empty();
            roots.add(ca.clone().into_owned()).map_err(|e| rustls::Error::General(format!("the pinned CA: {e}")))?;
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::clone(&self.provider),
            )
            .build()
            .map_err(|e| rustls::Error::General(format!("building the pinned verifier: {e}")))?;
            inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        })();
        if let Err(e) = &verified {
            self.refusal.set(e.to_string());
        }
        verified
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

// ------------------------------------------------------------------ time text

/// `2025-01-02T03:04:05Z` (UTC, whole seconds).
pub fn utc_text(at: SystemTime) -> String {
    let secs = unix_millis(at) / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(id: &str) -> WorkerId {
        WorkerId::new(id).expect("id")
    }

    #[test]
    fn a_token_reads_back_as_written_and_hides_its_secret() {
        let token = BootstrapToken {
            id: "0123456789abcdef".into(),
            secret: [7; SECRET_BYTES],
            ca_pin: CaPin([9; 32]),
            expires_at: from_unix_millis(1_700_000_000_000),
            worker: Some(worker("gpu.node-1")),
        };
        let text = token.to_string();
        assert_eq!(text.parse::<BootstrapToken>().expect("parses"), token);
        let debug = format!("{token:?}");
        assert!(!debug.contains(&hex::encode([7u8; SECRET_BYTES])), "{debug}");
        let unbound = BootstrapToken { worker: None, ..token };
        assert_eq!(unbound.to_string().parse::<BootstrapToken>().expect("parses"), unbound);
    }

    #[test]
    fn a_malformed_token_names_the_part() {
        let err = "hello".parse::<BootstrapToken>().expect_err("garbage");
        assert!(err.contains("not a rollout bootstrap token"), "{err}");
        let err = format!("{TOKEN_PREFIX}.0123456789abcdef.zz.{}.1", "00".repeat(32))
            .parse::<BootstrapToken>()
            .expect_err("bad secret");
        assert!(err.contains("secret"), "{err}");
        let err = format!("{TOKEN_PREFIX}.0123456789abcdef.{}.{}.x", "00".repeat(16), "00".repeat(32))
            .parse::<BootstrapToken>()
            .expect_err("bad expiry");
        assert!(err.contains("expiry"), "{err}");
    }

    #[test]
    fn records_keep_a_hash_of_the_secret_in_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        tls::ensure_dev_ca(dir.path()).expect("ca");
        let token = create_token(dir.path(), Duration::from_secs(60), None, SystemTime::now()).expect("token");
        let path = dir.path().join(TOKENS_DIR).join(format!("{}.json", token.id));
        let text = fs::read_to_string(&path).expect("record");
        assert!(!text.contains(&hex::encode(token.secret)), "{text}");
        assert_eq!(fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
        let listed = list_tokens(dir.path()).expect("list");
        assert_eq!(listed.len(), 1);
        assert!(revoke_token(dir.path(), &token.id).expect("revoke"));
        assert!(list_tokens(dir.path()).expect("list").is_empty());
        let err = create_token(dir.path(), TOKEN_TTL_MAX * 2, None, SystemTime::now()).expect_err("too long");
        assert!(err.to_string().contains("--ttl"), "{err}");
    }

    #[test]
    fn utc_text_is_rfc3339() {
        assert_eq!(utc_text(from_unix_millis(0)), "1970-01-01T00:00:00Z");
        assert_eq!(utc_text(from_unix_millis(1_709_210_096_000)), "2024-02-29T12:34:56Z");
    }
}
