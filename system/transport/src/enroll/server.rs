//! The coordinator's side: the Enrollment service.

use super::*;

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
    worker_cert_lifetime: Duration,
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
            worker_cert_lifetime: tls::Lifetimes::default().worker,
            failures: Arc::new(WindowCounter::new(Duration::from_secs(60))),
            refusals: Arc::new(LogLimiter::new(crate::net::REFUSAL_LOG_INTERVAL)),
        }
    }

    /// Certificates it issues are valid for `lifetime` (`transport.worker_cert_lifetime`).
    pub fn with_worker_cert_lifetime(mut self, lifetime: Duration) -> Self {
        self.worker_cert_lifetime = lifetime;
        self
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
        let (tls_dir, lifetime) = (self.tls_dir.clone(), self.worker_cert_lifetime);
        let req = req.into_inner();
        // File I/O, fsyncs and signing: off the async threads.
        let outcome = tokio::task::spawn_blocking(move || enroll(&tls_dir, &req, SystemTime::now(), lifetime))
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

    async fn renew(&self, req: Request<pb::RenewRequest>) -> std::result::Result<Response<pb::EnrollResponse>, Status> {
        let peer = req.extensions().get::<PeerInfo>().cloned();
        let worker = match &peer {
            Some(PeerInfo { revoked, .. }) if revoked.is_revoked() => {
                return Err(Status::permission_denied("this connection's client certificate has been revoked"));
            }
            Some(PeerInfo { role: Some(PeerRole::Worker(worker)), .. }) => worker.clone(),
            Some(PeerInfo { role: Some(PeerRole::Operator(name)), .. }) => {
                return Err(Status::permission_denied(format!(
                    "renew: operator {name} called it; only a worker renews its own certificate"
                )));
            }
            _ => {
                return Err(Status::unauthenticated(
                    "renew: no worker certificate on this connection; a worker without a valid certificate \
                     re-enrolls with a token (rollout worker --join ADDR --token T)",
                ));
            }
        };
        // The handshake refuses an expired certificate, but a connection outlives it: one
        // that expired since may not renew itself (only a token gets a new one then).
        if let Some(cert) = peer.as_ref().and_then(|p| p.cert.as_ref())
            && cert.not_after <= SystemTime::now()
        {
            return Err(Status::unauthenticated(format!(
                "renew: worker {worker}'s certificate (serial {}) expired at {}; an expired certificate is not \
                 renewed: re-enroll with a token (rollout worker --join ADDR --token T)",
                cert.serial,
                utc_text(cert.not_after)
            )));
        }
        let remote = peer.map(|p| p.remote).unwrap_or_default();
        let (tls_dir, lifetime) = (self.tls_dir.clone(), self.worker_cert_lifetime);
        let csr_pem = req.into_inner().csr_pem;
        let for_worker = worker.clone();
        let outcome =
            tokio::task::spawn_blocking(move || renew(&tls_dir, &for_worker, &csr_pem, SystemTime::now(), lifetime))
                .await
                .map_err(|e| Status::internal(format!("renewal task: {e}")))?;
        match &outcome {
            Ok((serial, _)) => {
                tracing::info!(channel = "tls", event = "certificate_renewed", %worker, %serial, %remote,
                "renewed the certificate of worker {worker} (new serial {serial})")
            }
            Err(status) => tracing::warn!(channel = "tls", event = "renew_refused", %worker, %remote,
                code = ?status.code(), reason = status.message(), "renew_refused"),
        }
        outcome.map(|(_, response)| Response::new(response))
    }
}

/// Signs a renewing worker's CSR: a new certificate for the same id, valid for
/// `lifetime`, kept in `enrolled/<id>.pem` and archived like every certificate the CA
/// signs. The caller has checked the worker's certificate; the earlier one is not
/// revoked (its connection is the one asking), it expires on its own.
pub(super) fn renew(
    tls_dir: &Path,
    worker: &WorkerId,
    csr_pem: &str,
    now: SystemTime,
    lifetime: Duration,
) -> std::result::Result<(String, pb::EnrollResponse), Status> {
    let csr = parse_csr(csr_pem)?;
    let issuer = tls::ca_issuer(tls_dir)
        .map_err(|e| Status::failed_precondition(format!("renewal needs the CA key on the coordinator ({e})")))?;
    let (cert_pem, serial) = sign_worker_cert(tls_dir, worker, &csr, &issuer, now, lifetime)?;
    let serial = serial.unwrap_or_default();
    let ca_pem = tls::read_text(&CertFiles::ca(tls_dir).cert).map_err(|e| Status::internal(e.to_string()))?;
    Ok((serial, pb::EnrollResponse { certificate_pem: cert_pem, ca_certificate_pem: ca_pem }))
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
pub(super) fn enroll(
    tls_dir: &Path,
    req: &pb::EnrollRequest,
    now: SystemTime,
    lifetime: Duration,
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
    let record = match record_path.exists() {
        true => Some(read_record(&record_path).map_err(|e| Status::internal(e.to_string()))?),
        false => None,
    };
    let ca = CertFiles::ca(tls_dir);
    let ca_pin = CaPin::of_file(&ca.cert).map_err(|e| Status::failed_precondition(e.to_string()))?;
    let used_path = dir.join(format!("{id}.used"));
    let used = read_use(&used_path).map_err(|e| Status::internal(e.to_string()))?;
    let taken = tls_dir.join(ENROLLED_DIR).join(format!("{worker}.pem")).exists()
        || id_claim_path(tls_dir, &worker).exists()
        || CertFiles::worker(tls_dir, &worker).cert.exists();
    let facts = EnrollmentFacts {
        token: &token,
        worker: &worker,
        record: record.as_ref(),
        ca_pin,
        used: used.as_ref(),
        id_taken: taken,
        now,
    };
    let grant = judge_enrollment(&facts)?;
    let csr = parse_csr(&req.csr_pem)?;
    let issuer = tls::ca_issuer(tls_dir)
        .map_err(|e| Status::failed_precondition(format!("enrollment needs the CA key on the coordinator ({e})")))?;
    // The claim comes last among the checks and before the signature: a refused request
    // leaves the token usable, and of two concurrent requests only one gets here.
    let used = TokenUse { worker: worker.to_string(), used_at_unix_ms: unix_millis(now) };
    let used_json = serde_json::to_vec(&used).map_err(|e| Status::internal(format!("token use record: {e}")))?;
    // An unbound token claims the new worker id as well (first), so two of them racing
    // for one id cannot both get a certificate for it.
    let id_claim = match grant {
        Grant::Bound => None,
        Grant::Unbound => {
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
    let (cert_pem, new_serial) = sign_worker_cert(tls_dir, &worker, &csr, &issuer, now, lifetime)?;
    // Re-enrolling an id revokes what it held before: a worker that re-enrolls because
    // its key was lost or stolen leaves nothing behind that still gets in.
    let replaced =
        crate::revocation::revoke_identity(tls_dir, &PeerRole::Worker(worker.clone()), new_serial.as_deref(), now)
            .map_err(|e| Status::internal(e.to_string()))?;
    for old in &replaced {
        tracing::info!(channel = "tls", event = "certificate_revoked", %worker, serial = %old.serial,
            reason = "re-enrolled", "the earlier certificate of worker {worker} is revoked");
    }
    let ca_pem = tls::read_text(&ca.cert).map_err(|e| Status::internal(e.to_string()))?;
    Ok((worker, id.clone(), pb::EnrollResponse { certificate_pem: cert_pem, ca_certificate_pem: ca_pem }))
}

/// Signs `worker`'s certificate for the CSR's key, valid for `lifetime` from `now`, and
/// keeps it (`enrolled/<id>.pem`, the `issued/` archive); its PEM and serial. Only the
/// CSR's public key is used (its signature was checked by the parser); the name, usages
/// and role are the ones every worker certificate has.
fn sign_worker_cert(
    tls_dir: &Path,
    worker: &WorkerId,
    csr: &CertificateSigningRequestParams,
    issuer: &rcgen::Issuer<'static, KeyPair>,
    now: SystemTime,
    lifetime: Duration,
) -> std::result::Result<(String, Option<String>), Status> {
    let cert = tls::worker_cert_params(worker)
        .and_then(|mut params| {
            tls::set_validity(&mut params, now, lifetime)?;
            params.signed_by(&csr.public_key, issuer).map_err(|e| Error::internal(format!("signing: {e}")))
        })
        .map_err(|e| Status::internal(format!("signing the certificate of worker {worker}: {e}")))?;
    let cert_pem = cert.pem();
    let record = tls_dir.join(ENROLLED_DIR).join(format!("{worker}.pem"));
    tls::write_public(&record, cert_pem.as_bytes()).map_err(|e| Status::internal(e.to_string()))?;
    crate::revocation::archive_issued(tls_dir, &cert_pem, now).map_err(|e| Status::internal(e.to_string()))?;
    Ok((cert_pem, tls::CertInfo::of_der(cert.der()).map(|i| i.serial)))
}

/// What an enrollment is judged on, read from the request and the TLS directory.
#[derive(Debug)]
pub struct EnrollmentFacts<'a> {
    /// The token presented.
    pub token: &'a BootstrapToken,
    /// The worker id asked for.
    pub worker: &'a WorkerId,
    /// The token's record; `None`: unknown (not made for this CA, revoked, or pruned).
    pub record: Option<&'a TokenRecord>,
    /// This coordinator's CA.
    pub ca_pin: CaPin,
    /// The token's use, if it has been used.
    pub used: Option<&'a TokenUse>,
    /// Whether the id already has a certificate from this CA, or is claimed.
    pub id_taken: bool,
    /// Now, on the coordinator's wall clock.
    pub now: SystemTime,
}

/// How a granted enrollment goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// The token is bound to this worker id (it may replace an earlier certificate).
    Bound,
    /// The token names no worker: the new id is claimed first, then the token.
    Unbound,
}

/// The enrollment decision, without I/O: the token's record must exist, match the
/// secret (compared in constant time) and this CA, be unexpired and unused, and either
/// be bound to this worker id or name none while the id is free. Every refusal names
/// the field and the way out.
pub fn judge_enrollment(f: &EnrollmentFacts<'_>) -> std::result::Result<Grant, Status> {
    let id = &f.token.id;
    let Some(record) = f.record else {
        return Err(Status::unauthenticated(format!(
            "enroll.bootstrap_token: unknown token {id} (not made for this coordinator's CA, revoked, or pruned \
             after it expired); create one with `rollout token create`"
        )));
    };
    if !equal_in_constant_time(hex::encode(sha256(&f.token.secret)).as_bytes(), record.secret_sha256.as_bytes()) {
        return Err(Status::unauthenticated(format!("enroll.bootstrap_token: wrong secret for token {id}")));
    }
    if record.ca_sha256 != hex::encode(f.ca_pin.0) {
        return Err(Status::failed_precondition(format!(
            "enroll.bootstrap_token: token {id} was made for another CA (sha256:{}); this coordinator's CA is {}; \
             create a new token",
            record.ca_sha256, f.ca_pin
        )));
    }
    let expires_at = from_unix_millis(record.expires_at_unix_ms);
    if f.now >= expires_at {
        let ago = f.now.duration_since(expires_at).unwrap_or_default();
        return Err(Status::unauthenticated(format!(
            "enroll.bootstrap_token: token {id} expired at {} ({} ago); create a new one with `rollout token create`",
            utc_text(expires_at),
            duration_text::format(Duration::from_secs(ago.as_secs()))
        )));
    }
    if let Some(used) = f.used {
        return Err(used_status(id, used));
    }
    match &record.worker {
        Some(bound) if bound != f.worker.as_str() => Err(Status::permission_denied(format!(
            "enroll.worker_id: token {id} is bound to worker {bound}; it cannot enroll worker {}",
            f.worker
        ))),
        Some(_) => Ok(Grant::Bound),
        None if f.id_taken => Err(id_taken(f.worker)),
        None => Ok(Grant::Unbound),
    }
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
pub(super) fn id_claim_path(tls_dir: &Path, worker: &WorkerId) -> PathBuf {
    tls_dir.join(ENROLLED_DIR).join(format!("{worker}.claimed"))
}

pub(super) fn id_taken(worker: &WorkerId) -> Status {
    Status::already_exists(format!(
        "enroll.worker_id: worker {worker} already has a certificate from this CA; to replace it, use a token bound \
         to it (`rollout token create --worker {worker}`)"
    ))
}

pub(super) fn used_status(id: &str, used: &TokenUse) -> Status {
    Status::unauthenticated(format!(
        "enroll.bootstrap_token: token {id} was already used (by worker {} at {}); tokens are single-use",
        used.worker,
        utc_text(from_unix_millis(used.used_at_unix_ms))
    ))
}

/// Compares without an early exit (the inputs are hashes of secrets, so this is belt
/// and braces).
pub(super) fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A tonic interceptor for every service but Enrollment: refuses a connection that
/// presented no client certificate with a rollout role (`UNAUTHENTICATED`), before the
/// request reaches a handler. The handlers check the role again.
pub fn require_client_certificate(req: Request<()>) -> std::result::Result<Request<()>, Status> {
    match req.extensions().get::<PeerInfo>() {
        Some(PeerInfo { revoked, .. }) if revoked.is_revoked() => {
            Err(Status::permission_denied("this connection's client certificate has been revoked"))
        }
        Some(PeerInfo { role: Some(_), .. }) => Ok(req),
        _ => Err(Status::unauthenticated(
            "no client certificate with a rollout role on this connection; without one only Enrollment/Enroll may \
             be called (get one with `rollout worker --join ADDR --token T` or `rollout certs issue`)",
        )),
    }
}
