//! The CA pin a bootstrap token carries: the SHA-256 of the CA certificate.

use super::*;

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

pub(super) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0; 32];
    out.copy_from_slice(digest.as_ref());
    out
}
