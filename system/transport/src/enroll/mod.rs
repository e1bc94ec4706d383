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
//!   signs the CSR's public key as worker w7   ──▶  ca.pem, workers/w7/{cert,key}.pem
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
//! this CA (`enrolled/<id>.pem`, or `workers/<id>/cert.pem` in the TLS directory); replacing
//! one (a worker whose disk was lost) needs a token bound to that id. An unbound token
//! also claims the id (`enrolled/<id>.claimed`, `O_EXCL`) before the token itself, so
//! two unbound tokens racing for one new id cannot both win.

mod join;
mod pin;
mod records;
mod server;
mod token;

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

pub use join::*;
pub use pin::*;
pub use records::*;
pub use server::*;
pub use token::*;

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
    fn the_enrollment_decision_checks_each_fact_and_names_the_way_out() {
        let now = from_unix_millis(1_700_000_000_000);
        let secret = [5; SECRET_BYTES];
        let token = BootstrapToken {
            id: "00000000000000aa".into(),
            secret,
            ca_pin: CaPin([1; 32]),
            expires_at: now + Duration::from_secs(60),
            worker: None,
        };
        let record = TokenRecord {
            id: token.id.clone(),
            secret_sha256: hex::encode(sha256(&secret)),
            ca_sha256: hex::encode([1; 32]),
            created_at_unix_ms: 0,
            expires_at_unix_ms: unix_millis(now + Duration::from_secs(60)),
            worker: None,
        };
        let w7 = worker("w7");
        let facts = |record| EnrollmentFacts {
            token: &token,
            worker: &w7,
            record,
            ca_pin: CaPin([1; 32]),
            used: None,
            id_taken: false,
            now,
        };
        assert_eq!(judge_enrollment(&facts(Some(&record))).expect("granted"), Grant::Unbound);
        let refused = |f: EnrollmentFacts<'_>| judge_enrollment(&f).expect_err("refused").message().to_owned();
        assert!(refused(facts(None)).contains("unknown token"));
        let wrong = TokenRecord { secret_sha256: hex::encode(sha256(b"other")), ..record.clone() };
        assert!(refused(facts(Some(&wrong))).contains("wrong secret"));
        assert!(refused(EnrollmentFacts { ca_pin: CaPin([2; 32]), ..facts(Some(&record)) }).contains("another CA"));
        let late = EnrollmentFacts { now: now + Duration::from_secs(61), ..facts(Some(&record)) };
        assert!(refused(late).contains("expired"));
        let used = TokenUse { worker: "w3".into(), used_at_unix_ms: 0 };
        assert!(refused(EnrollmentFacts { used: Some(&used), ..facts(Some(&record)) }).contains("w3"));
        assert!(refused(EnrollmentFacts { id_taken: true, ..facts(Some(&record)) }).contains("w7"));
        let bound = TokenRecord { worker: Some("w7".into()), ..record.clone() };
        let taken_but_bound = EnrollmentFacts { id_taken: true, ..facts(Some(&bound)) };
        assert_eq!(judge_enrollment(&taken_but_bound).expect("a bound token may replace"), Grant::Bound);
        let other = TokenRecord { worker: Some("w8".into()), ..record.clone() };
        assert!(refused(facts(Some(&other))).contains("bound to worker w8"));
    }

    #[test]
    fn utc_text_is_rfc3339() {
        assert_eq!(utc_text(from_unix_millis(0)), "1970-01-01T00:00:00Z");
        assert_eq!(utc_text(from_unix_millis(1_709_210_096_000)), "2024-02-29T12:34:56Z");
    }
}
