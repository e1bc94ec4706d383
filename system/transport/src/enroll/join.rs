//! The worker's side: `rollout worker --join`.

use super::*;

/// What a joining worker needs.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// The coordinator (`host:port`); its certificate must name the host.
    pub addr: String,
    /// The bootstrap token.
    pub token: BootstrapToken,
    /// The worker id to enroll as.
    pub worker: WorkerId,
    /// Where `ca.pem`, `workers/<id>/cert.pem` and `workers/<id>/key.pem` are written.
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

/// Obtains a worker certificate through Enroll unless `workers/<id>/cert.pem`, its key and
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
    tls::migrate_layout(&tls_dir)?;
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

    let (key, csr_pem) = worker_key_and_csr(&worker)?;

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
pub(super) fn check_issued(
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
pub(super) fn refused(addr: &str, status: &Status) -> Error {
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

/// A new key pair for `worker` (made here, never sent) and its certificate signing
/// request (PEM, CN = the worker id), for Enroll and Renew.
pub fn worker_key_and_csr(worker: &WorkerId) -> Result<(KeyPair, String)> {
    let key = KeyPair::generate().map_err(|e| Error::internal(format!("generating the worker key: {e}")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, worker.as_str());
    params.distinguished_name = dn;
    let csr_pem = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| Error::internal(format!("making the certificate signing request: {e}")))?;
    Ok((key, csr_pem))
}

/// A seed for retry jitter that differs between machines joining at once.
pub(super) fn jitter_seed() -> u64 {
    let mut bytes = [0u8; 8];
    match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes) {
        Ok(()) => u64::from_le_bytes(bytes),
        Err(_) => u64::from(std::process::id()),
    }
}

/// Where the pinned verifier leaves why it refused a server, so `join` can tell a wrong
/// server (final) from an unreachable one (retried).
#[derive(Debug, Clone, Default)]
pub(super) struct PinRefusal(Arc<std::sync::Mutex<Option<String>>>);

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

pub(super) fn pinned_client_config_reporting(pin: CaPin, refusal: PinRefusal) -> Arc<ClientConfig> {
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
pub(super) struct PinnedCaVerifier {
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
