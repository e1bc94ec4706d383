//! The bootstrap token's text form.

use super::*;

/// A bootstrap token, as `rollout token create` prints it and `--join` reads it.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    /// Names the record (hex, public: it appears in logs).
    pub id: String,
    pub(super) secret: [u8; SECRET_BYTES],
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
