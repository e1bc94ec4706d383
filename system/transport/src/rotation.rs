//! CA rotation with overlap: `rollout certs rotate-ca`, `status` and `retire-ca`.
//!
//! `ca.pem` is a bundle: the current CA first (the one `ca.key.pem` belongs to, which
//! signs everything from now on and which new bootstrap tokens pin), then, while a
//! rotation overlaps, the previous CA, still trusted. The steps:
//!
//! 1. [`rotate_ca`] makes a new CA, the new CA cross-signed by the previous one
//!    (`ca.cross.pem`), and a new server certificate from the new CA, then writes the
//!    bundle `[new, previous]`. The coordinator reads its files again within
//!    [`crate::trust::TRUST_POLL`] and from then on trusts client certificates from
//!    either CA and presents `server, cross, new, previous`: a client that trusts only
//!    the previous CA verifies the server through the cross certificate, one that
//!    trusts only the new CA (a worker joining with a new token) directly. The previous
//!    CA's key is gone: nothing is signed with it again.
//! 2. Workers get a certificate from the new CA, and the bundle, at their next renewal
//!    (`crate::renewal`); operators get one with `rollout certs issue --operator`.
//!    [`trust_status`] counts who still hangs on the previous CA.
//! 3. [`retire_ca`] drops the previous CA and the cross certificate once nobody does
//!    (refusing, with the list, while somebody does).
//!
//! One rotation at a time: a second `rotate-ca` before `retire-ca` is refused. Every
//! write is atomic and the CA's key and bundle are replaced as a pair
//! ([`tls::write_pair`]), so a crash leaves either the old state or the new one
//! (finished by [`tls::ensure_ca_at`] or the coordinator's start); a crash between the
//! CA and the server certificate leaves a server certificate from the previous CA,
//! which [`trust_status`] reports with the command that mends it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use rollout_core::{Error, Result};

use crate::enroll::utc_text;
use crate::renewal::finish_pending_renewal;
use crate::revocation;
use crate::tls::{self, CertFiles, CertInfo, Lifetimes, PeerRole};
use crate::trust::CROSS_FILE;

/// What [`rotate_ca`] made.
#[derive(Debug, Clone)]
pub struct Rotated {
    /// The CA that signed until now (still trusted).
    pub previous: CertInfo,
    /// The new CA.
    pub current: CertInfo,
    /// The coordinator's new server certificate, from the new CA.
    pub server: CertInfo,
}

/// Someone with a certificate: a worker, an operator, or the coordinator's server
/// certificate, by its newest unexpired, unrevoked certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `worker w1`, `operator admin`, `server coordinator`.
    pub who: String,
    /// That certificate.
    pub cert: CertInfo,
}

/// One CA of the bundle and who holds a certificate from it.
#[derive(Debug, Clone)]
pub struct CaEntry {
    /// The CA's certificate.
    pub info: CertInfo,
    /// Whether it is the current CA (the first of the bundle, the one that signs).
    pub current: bool,
    /// The identities whose certificate it signed.
    pub identities: Vec<Identity>,
}

/// Where the identities of a TLS directory stand against its CAs.
#[derive(Debug, Clone)]
pub struct TrustStatus {
    /// The bundle, current CA first.
    pub cas: Vec<CaEntry>,
    /// Identities whose certificate no CA of the bundle signed (they cannot connect).
    pub untrusted: Vec<Identity>,
}

impl TrustStatus {
    /// The identities on CAs other than the current one.
    pub fn on_previous(&self) -> Vec<&Identity> {
        self.cas.iter().filter(|ca| !ca.current).flat_map(|ca| ca.identities.iter()).collect()
    }
}

fn who(info: &CertInfo) -> Option<String> {
    match &info.role {
        Some(PeerRole::Worker(id)) => Some(format!("worker {id}")),
        Some(PeerRole::Operator(name)) => Some(format!("operator {name}")),
        None => None,
    }
}

/// Who holds a certificate from which CA of `dir`'s bundle, at `now`.
pub fn trust_status(dir: &Path, now: SystemTime) -> Result<TrustStatus> {
    let ca_files = CertFiles::ca(dir);
    let cas = tls::load_certs(&ca_files.cert)?;
    let denied = revocation::load_denied(dir, now)?;
    let current_subject = CertInfo::of_der(&cas[0]).map(|c| c.subject).unwrap_or_default();
    // Newest by validity; two issued in the same second (validity has whole seconds)
    // are told apart by the CA, the current one's being the later.
    let rank = |c: &CertInfo| (c.not_before, c.not_after, c.issuer == current_subject);
    let mut newest: BTreeMap<String, CertInfo> = BTreeMap::new();
    for (_, (_, info)) in revocation::known_certificates(dir)? {
        let Some(who) = who(&info) else { continue };
        if info.expired_at(now) || denied.contains(&info.serial) {
            continue;
        }
        let newer = newest.get(&who).is_none_or(|n| rank(&info) > rank(n));
        if newer {
            newest.insert(who, info);
        }
    }
    let mut identities: Vec<Identity> = newest.into_iter().map(|(who, cert)| Identity { who, cert }).collect();
    let server = CertFiles::coordinator(dir);
    if server.cert.exists() {
        identities.push(Identity { who: "server coordinator".into(), cert: CertInfo::of_file(&server.cert)? });
    }
    let mut entries = Vec::with_capacity(cas.len());
    for (i, der) in cas.iter().enumerate() {
        let info = CertInfo::of_der(der).ok_or_else(|| tls::tls_err(&ca_files.cert, "not a readable X.509 CA"))?;
        entries.push(CaEntry { info, current: i == 0, identities: Vec::new() });
    }
    let mut untrusted = Vec::new();
    for identity in identities {
        match entries.iter_mut().find(|ca| ca.info.subject == identity.cert.issuer) {
            Some(ca) => ca.identities.push(identity),
            None => untrusted.push(identity),
        }
    }
    Ok(TrustStatus { cas: entries, untrusted })
}

/// Starts a rotation in `dir` at `now` (see the module docs): a new CA valid for
/// `lifetimes.ca`, the cross certificate, and a server certificate valid for
/// `lifetimes.server` for the names the present one carries. Refused while a previous
/// CA is still trusted, and when the current one has expired (there is nothing to
/// overlap with; make a new CA in a fresh directory).
pub fn rotate_ca(dir: &Path, now: SystemTime, lifetimes: &Lifetimes) -> Result<Rotated> {
    let ca_files = CertFiles::ca(dir);
    finish_pending_renewal(&ca_files)?;
    let bundle = tls::load_certs(&ca_files.cert)?;
    if bundle.len() > 1 {
        let previous: Vec<String> = bundle[1..]
            .iter()
            .filter_map(|c| CertInfo::of_der(c))
            .map(|i| format!("{} (serial {})", i.common_name, i.serial))
            .collect();
        return Err(Error::invalid_input(format!(
            "{}: the previous CA {} is still trusted; one rotation at a time: retire it first \
             (rollout certs status shows who still holds a certificate from it, rollout certs retire-ca drops it)",
            ca_files.cert.display(),
            previous.join(", ")
        )));
    }
    let (_, previous_der) = tls::load_issuer(dir)?;
    let previous = CertInfo::of_der(&previous_der).ok_or_else(|| tls::tls_err(&ca_files.cert, "not a readable CA"))?;
    let overlap = previous.not_after.duration_since(now).unwrap_or_default();
    if overlap < rollout_core::config::CERT_LIFETIME_MIN {
        return Err(Error::invalid_input(format!(
            "{}: the CA expires at {} ({}): too late for an overlapping rotation; nothing it signed verifies any more. \
             Make a new CA with rollout certs init in a fresh transport.tls_dir and enroll the workers again",
            ca_files.cert.display(),
            utc_text(previous.not_after),
            if overlap.is_zero() { "already expired" } else { "within a minute" }
        )));
    }
    let server_names = server_names(&CertFiles::coordinator(dir).cert)?;
    let previous_issuer = tls::ca_issuer(dir)?;

    let key = tls::generate_key("generating the new CA key")?;
    let name = format!("rollout CA {}", hex::encode(tls::random_bytes::<4>()?));
    let cert = tls::ca_params(&name, now, lifetimes.ca)?
        .self_signed(&key)
        .map_err(|e| tls::rcgen_err("self-signing the new CA", &e))?;
    // The new CA's name and key, vouched for by the previous CA, for clients that trust
    // only the previous one; valid no longer than that CA.
    let cross = tls::ca_params(&name, now, lifetimes.ca.min(overlap))?
        .signed_by(&key, &previous_issuer)
        .map_err(|e| tls::rcgen_err("cross-signing the new CA", &e))?;
    let current = CertInfo::of_der(cert.der()).ok_or_else(|| Error::internal("the new CA does not parse"))?;

    tls::write_public(&dir.join(CROSS_FILE), cross.pem().as_bytes())?;
    let previous_pem = tls::read_text(&ca_files.cert)?;
    tls::write_pair(&ca_files, &key.serialize_pem(), &format!("{}{previous_pem}", cert.pem()))?;
    let server = tls::issue_server_cert_at(dir, &server_names, now, lifetimes.server)?;
    let server = CertInfo::of_file(&server.cert)?;
    tracing::info!(channel = "tls", event = "ca_rotated", previous = %previous.serial, current = %current.serial,
        "rotated the CA: {} (serial {}) signs from now on, {} (serial {}) stays trusted until rollout certs retire-ca",
        current.common_name, current.serial, previous.common_name, previous.serial);
    Ok(Rotated { previous, current, server })
}

/// Ends a rotation: drops every CA but the current one from the bundle, and the cross
/// certificate. Refused, naming them, while identities still hold certificates from a
/// CA it would drop. Returns the CAs dropped.
pub fn retire_ca(dir: &Path, now: SystemTime) -> Result<Vec<CertInfo>> {
    let ca_files = CertFiles::ca(dir);
    finish_pending_renewal(&ca_files)?;
    let status = trust_status(dir, now)?;
    if status.cas.len() < 2 {
        return Err(Error::invalid_input(format!(
            "{}: only one CA is trusted ({}); nothing to retire (rollout certs rotate-ca starts a rotation)",
            ca_files.cert.display(),
            status.cas.first().map_or_else(String::new, |c| format!("serial {}", c.info.serial))
        )));
    }
    let hanging = status.on_previous();
    if !hanging.is_empty() {
        let list: Vec<String> = hanging
            .iter()
            .map(|i| format!("{} (serial {}, expires {})", i.who, i.cert.serial, utc_text(i.cert.not_after)))
            .collect();
        return Err(Error::invalid_input(format!(
            "{} identit{} still hold a certificate from the previous CA: {}. Workers move at their next renewal \
             (about 2/3 of their certificate's lifetime); operators with rollout certs issue --operator NAME, \
             the coordinator with rollout certs issue --server; or revoke them (rollout certs revoke)",
            hanging.len(),
            if hanging.len() == 1 { "y" } else { "ies" },
            list.join(", ")
        )));
    }
    let text = tls::read_text(&ca_files.cert)?;
    let current = first_pem_block(&text);
    let check = tls::parse_certs(&ca_files.cert, current.as_bytes())?;
    if check.len() != 1 || CertInfo::of_der(&check[0]).map(|c| c.serial) != Some(status.cas[0].info.serial.clone()) {
        return Err(tls::tls_err(&ca_files.cert, "its first PEM block is not the current CA; edit the bundle by hand"));
    }
    tls::write_public(&ca_files.cert, current.as_bytes())?;
    let cross = dir.join(CROSS_FILE);
    match std::fs::remove_file(&cross) {
        Ok(()) => sync_dir(dir)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(tls::io_err("removing", &cross, &e)),
    }
    let retired: Vec<CertInfo> = status.cas.into_iter().filter(|c| !c.current).map(|c| c.info).collect();
    for ca in &retired {
        tracing::info!(channel = "tls", event = "ca_retired", serial = %ca.serial,
            "retired the CA {} (serial {}): certificates it signed are refused from now on", ca.common_name, ca.serial);
    }
    Ok(retired)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| tls::io_err("syncing directory", dir, &e))
}

/// The first PEM block of a bundle's text (already checked to parse, with its first
/// certificate the one wanted), with its line end.
fn first_pem_block(text: &str) -> &str {
    const END: &str = "-----END CERTIFICATE-----";
    text.find(END).map_or(text, |at| {
        let end = at + END.len();
        &text[..end + usize::from(text[end..].starts_with('\n'))]
    })
}

/// The DNS names and IP addresses a server certificate is for.
fn server_names(cert: &Path) -> Result<Vec<String>> {
    let der = tls::load_certs(cert)?.swap_remove(0);
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| tls::tls_err(cert, &format!("does not parse: {e}")))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                x509_parser::extensions::GeneralName::IPAddress(bytes) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*bytes) {
                        names.push(std::net::Ipv4Addr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*bytes) {
                        names.push(std::net::Ipv6Addr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollout_core::WorkerId;
    use std::time::Duration;

    fn setup() -> (tempfile::TempDir, Lifetimes) {
        let dir = tempfile::tempdir().expect("tempdir");
        let lifetimes = Lifetimes::default();
        tls::ensure_ca(dir.path(), lifetimes.ca).expect("ca");
        tls::issue_server_cert_for(dir.path(), &["coord.example".into(), "10.0.0.7".into()], lifetimes.server)
            .expect("server");
        (dir, lifetimes)
    }

    #[test]
    fn a_rotation_moves_signing_keeps_trust_and_retires_only_when_nobody_hangs_on_the_old_ca() {
        let (dir, lifetimes) = setup();
        let dir = dir.path();
        let now = SystemTime::now();
        let w1 = WorkerId::new("w1").expect("id");
        tls::issue_client_cert(dir, &w1).expect("w1");
        tls::issue_operator_cert(dir, "admin").expect("admin");
        let before = trust_status(dir, now).expect("status");
        assert_eq!(before.cas.len(), 1);
        assert_eq!(before.cas[0].identities.len(), 3, "{:?}", before.cas[0].identities);

        let rotated = rotate_ca(dir, now, &lifetimes).expect("rotate");
        assert_ne!(rotated.previous.serial, rotated.current.serial);
        assert_ne!(rotated.previous.subject, rotated.current.subject, "the two CAs need distinct names");
        assert_eq!(rotated.server.issuer, rotated.current.subject, "the server certificate is from the new CA");
        let names = server_names(&CertFiles::coordinator(dir).cert).expect("names");
        assert!(names.contains(&"coord.example".to_owned()) && names.contains(&"10.0.0.7".to_owned()), "{names:?}");
        let pin = crate::enroll::CaPin::of_file(&CertFiles::ca(dir).cert).expect("pin");
        assert_eq!(pin, crate::enroll::CaPin::of(&tls::load_issuer(dir).expect("issuer").1), "tokens pin the new CA");

        let again = rotate_ca(dir, now, &lifetimes).expect_err("one rotation at a time");
        assert!(again.to_string().contains("retire it first"), "{again}");

        let during = trust_status(dir, now).expect("status");
        assert_eq!(during.cas.len(), 2);
        let hanging: Vec<&str> = during.on_previous().iter().map(|i| i.who.as_str()).collect();
        assert_eq!(hanging, ["operator admin", "worker w1"]);
        let refused = retire_ca(dir, now).expect_err("w1 and admin hang on the old CA");
        for name in ["worker w1", "operator admin", &before.cas[0].identities[1].cert.serial] {
            assert!(refused.to_string().contains(name), "{refused} should name {name}");
        }

        tls::issue_client_cert(dir, &w1).expect("w1 again, from the new CA");
        tls::issue_operator_cert(dir, "admin").expect("admin again");
        let retired = retire_ca(dir, now).expect("retire");
        assert_eq!(retired.len(), 1);
        assert_eq!(retired[0].serial, rotated.previous.serial);
        assert_eq!(tls::load_certs(&CertFiles::ca(dir).cert).expect("bundle").len(), 1);
        assert!(!dir.join(CROSS_FILE).exists());
        let after = trust_status(dir, now).expect("status");
        assert_eq!(after.cas[0].identities.len(), 3);
        let nothing = retire_ca(dir, now).expect_err("nothing to retire");
        assert!(nothing.to_string().contains("nothing to retire"), "{nothing}");
        rotate_ca(dir, now, &lifetimes).expect("a second rotation once the first is retired");
    }

    #[test]
    fn a_rotation_cut_short_between_key_and_bundle_is_finished_at_the_next_start() {
        let (dir, lifetimes) = setup();
        let dir = dir.path();
        let ca = CertFiles::ca(dir);
        let before = std::fs::read(&ca.cert).expect("ca");
        rotate_ca(dir, SystemTime::now(), &lifetimes).expect("rotate");
        let after_cert = std::fs::read(&ca.cert).expect("bundle");
        let after_key = std::fs::read(&ca.key).expect("key");
        // Replay the crash: the key renamed into place, the bundle still staged.
        let staged = crate::renewal::staged(&ca);
        std::fs::write(&staged.cert, &after_cert).expect("stage");
        std::fs::write(&ca.cert, &before).expect("old bundle back");
        assert!(tls::load_issuer(dir).is_err(), "a key that does not fit the first CA is refused, not used");
        tls::ensure_ca(dir, lifetimes.ca).expect("finishes the rotation");
        assert_eq!(std::fs::read(&ca.cert).expect("bundle"), after_cert);
        assert_eq!(std::fs::read(&ca.key).expect("key"), after_key);
        tls::load_issuer(dir).expect("fits again");
    }

    #[test]
    fn the_first_pem_block_is_cut_with_its_line_end() {
        assert_eq!(
            first_pem_block("a\n-----END CERTIFICATE-----\nb\n-----END CERTIFICATE-----\n"),
            "a\n-----END CERTIFICATE-----\n"
        );
        assert_eq!(first_pem_block("a\n-----END CERTIFICATE-----"), "a\n-----END CERTIFICATE-----");
    }

    #[test]
    fn an_expired_ca_cannot_be_rotated_with_overlap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lifetimes = Lifetimes::default();
        let long_ago = SystemTime::now() - Duration::from_secs(30 * 86_400);
        tls::ensure_ca_at(dir.path(), long_ago, Duration::from_secs(86_400)).expect("ca");
        tls::issue_server_cert_at(dir.path(), &[], long_ago, Duration::from_secs(3600)).expect("server");
        let e = rotate_ca(dir.path(), SystemTime::now(), &lifetimes).expect_err("expired");
        assert!(e.to_string().contains("already expired"), "{e}");
    }
}
