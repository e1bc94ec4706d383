//! Token records on the coordinator's disk: create, list, revoke, claim.

use super::*;

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

pub(super) fn tokens_dir(tls_dir: &Path) -> Result<PathBuf> {
    let dir = tls_dir.join(TOKENS_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| tls::io_err("creating directory", &dir, &e))?;
    Ok(dir)
}

pub(super) fn prune_expired(dir: &Path, now: SystemTime) {
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

pub(super) fn read_record(path: &Path) -> Result<TokenRecord> {
    let text = tls::read_text(path)?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Fatal(Fatal::Corrupt { path: path.to_owned(), reason: format!("not a token record: {e}") }))
}

pub(super) fn read_use(path: &Path) -> Result<Option<TokenUse>> {
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
pub(super) fn claim(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    if let Some(parent) = path.parent() {
        fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}
