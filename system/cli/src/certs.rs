//! `rollout certs init|issue|revoke|rotate-ca|retire-ca|status|list`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rollout_core::{Error, WorkerId};
use rollout_transport::enroll::{ENROLLED_DIR, utc_text};
use rollout_transport::tls::{self, CertFiles, CertInfo, Lifetimes, PeerRole};
use rollout_transport::{revocation, rotation};

use crate::{CertsCommand, load_config};

/// The operator certificate `certs init` creates, and the default of `--operator`.
pub const DEFAULT_OPERATOR: &str = "admin";

pub fn run(command: CertsCommand) -> Result<(), Error> {
    let common = match &command {
        CertsCommand::Init { common, .. }
        | CertsCommand::Issue { common, .. }
        | CertsCommand::Revoke { common, .. }
        | CertsCommand::RotateCa { common }
        | CertsCommand::RetireCa { common }
        | CertsCommand::Status { common, .. }
        | CertsCommand::List { common, .. } => common,
    };
    tls::migrate_layout(&load_config(common)?.transport.tls_dir)?;
    match command {
        CertsCommand::Init { common, sans } => {
            let config = load_config(&common)?;
            let lifetimes = Lifetimes::of(&config.transport);
            let dir = &config.transport.tls_dir;
            let ca = tls::ensure_ca(dir, lifetimes.ca)?;
            report(if ca.created { "created" } else { "kept   " }, &ca.files.cert);
            let server = CertFiles::coordinator(dir);
            if server.exist() && sans.is_empty() {
                report("kept   ", &server.cert);
            } else {
                let mut names = sans;
                if let Some((host, _)) = config.transport.listen_addr.rsplit_once(':') {
                    names.push(host.trim_matches(['[', ']']).to_owned());
                }
                report("issued ", &tls::issue_server_cert_for(dir, &names, lifetimes.server)?.cert);
            }
            let operator = CertFiles::operator(dir, DEFAULT_OPERATOR);
            if operator.exist() {
                report("kept   ", &operator.cert);
            } else {
                report("issued ", &tls::issue_operator_cert_for(dir, DEFAULT_OPERATOR, lifetimes.operator)?.cert);
            }
            Ok(())
        }
        CertsCommand::Issue { common, worker, operator, server, sans, valid_for } => {
            let config = load_config(&common)?;
            let lifetimes = Lifetimes::of(&config.transport);
            let dir = &config.transport.tls_dir;
            if let Some(d) = valid_for {
                check_valid_for(d, lifetimes.ca)?;
            }
            let files = match (worker, operator, server) {
                (Some(id), _, _) => {
                    let id = WorkerId::new(id).map_err(|e| Error::invalid_input(format!("--worker: {e}")))?;
                    tls::issue_client_cert_for(dir, &id, valid_for.unwrap_or(lifetimes.worker))?
                }
                (None, Some(name), _) => {
                    tls::issue_operator_cert_for(dir, &name, valid_for.unwrap_or(lifetimes.operator))?
                }
                (None, None, true) => tls::issue_server_cert_for(dir, &sans, valid_for.unwrap_or(lifetimes.server))?,
                (None, None, false) => {
                    return Err(Error::invalid_input("say what to issue: --worker ID, --operator NAME or --server"));
                }
            };
            report("issued ", &files.cert);
            println!("key     {}", files.key.display());
            Ok(())
        }
        CertsCommand::Revoke { common, worker, operator, serial } => {
            let config = load_config(&common)?;
            let dir = &config.transport.tls_dir;
            let now = SystemTime::now();
            let revoked = match (worker, operator, serial) {
                (Some(id), _, _) => {
                    let id = WorkerId::new(id).map_err(|e| Error::invalid_input(format!("--worker: {e}")))?;
                    revocation::revoke_identity(dir, &PeerRole::Worker(id), None, now)?
                }
                (None, Some(name), _) => revocation::revoke_identity(dir, &PeerRole::Operator(name), None, now)?,
                (None, None, Some(serial)) => {
                    let serial = serial.to_ascii_lowercase();
                    let known = revocation::known_certificates(dir)?;
                    let Some((_, info)) = known.get(&serial) else {
                        return Err(Error::invalid_input(format!(
                            "--serial {serial}: no certificate with that serial in {} (see rollout certs list)",
                            dir.display()
                        )));
                    };
                    revocation::revoke(dir, info, now)?;
                    vec![info.clone()]
                }
                (None, None, None) => {
                    return Err(Error::invalid_input(
                        "say what to revoke: --worker ID, --operator NAME or --serial HEX",
                    ));
                }
            };
            if revoked.is_empty() {
                return Err(Error::invalid_input(format!(
                    "no unexpired certificate of that identity in {} (see rollout certs list)",
                    dir.display()
                )));
            }
            for info in &revoked {
                println!("revoked {} (expires {})", info.serial, utc_text(info.not_after));
            }
            Ok(())
        }
        CertsCommand::RotateCa { common } => {
            let config = load_config(&common)?;
            let dir = &config.transport.tls_dir;
            let rotated = rotation::rotate_ca(dir, SystemTime::now(), &Lifetimes::of(&config.transport))?;
            println!(
                "new CA      {} (serial {}, expires {}) signs from now on; new tokens pin it",
                rotated.current.common_name,
                rotated.current.serial,
                utc_text(rotated.current.not_after)
            );
            println!(
                "old CA      {} (serial {}, expires {}) stays trusted until rollout certs retire-ca",
                rotated.previous.common_name,
                rotated.previous.serial,
                utc_text(rotated.previous.not_after)
            );
            println!(
                "server      {} (serial {}, from the new CA; cross-signed for clients of the old one)",
                CertFiles::coordinator(dir).cert.display(),
                rotated.server.serial
            );
            println!(
                "next        workers move at their next renewal; operators: rollout certs issue --operator NAME; \
                 watch rollout certs status, then rollout certs retire-ca"
            );
            Ok(())
        }
        CertsCommand::RetireCa { common } => {
            let config = load_config(&common)?;
            for ca in rotation::retire_ca(&config.transport.tls_dir, SystemTime::now())? {
                println!(
                    "retired {} (serial {}): certificates it signed are refused from now on",
                    ca.common_name, ca.serial
                );
            }
            Ok(())
        }
        CertsCommand::Status { common, json } => {
            let config = load_config(&common)?;
            let now = SystemTime::now();
            let status = rotation::trust_status(&config.transport.tls_dir, now)?;
            let identity = |i: &rotation::Identity| serde_json::json!({"who": i.who, "serial": i.cert.serial, "not_after": utc_text(i.cert.not_after)});
            if json {
                let cas: Vec<_> = status
                    .cas
                    .iter()
                    .map(|ca| {
                        serde_json::json!({
                            "name": ca.info.common_name,
                            "serial": ca.info.serial,
                            "not_after": utc_text(ca.info.not_after),
                            "current": ca.current,
                            "identities": ca.identities.iter().map(identity).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                let untrusted: Vec<_> = status.untrusted.iter().map(identity).collect();
                println!(
                    "{}",
                    serde_json::json!({"cas": cas, "on_previous": status.on_previous().len(), "untrusted": untrusted})
                );
                return Ok(());
            }
            for ca in &status.cas {
                println!(
                    "{} CA {} (serial {}, expires {}): {} identit{}",
                    if ca.current { "current " } else { "previous" },
                    ca.info.common_name,
                    ca.info.serial,
                    utc_text(ca.info.not_after),
                    ca.identities.len(),
                    if ca.identities.len() == 1 { "y" } else { "ies" }
                );
                if !ca.current {
                    for i in &ca.identities {
                        println!("    {:<28} serial {} expires {}", i.who, i.cert.serial, utc_text(i.cert.not_after));
                    }
                }
            }
            for i in &status.untrusted {
                println!(
                    "untrusted   {:<28} serial {} (no trusted CA signed it; it cannot connect)",
                    i.who, i.cert.serial
                );
            }
            match status.on_previous().len() {
                _ if status.cas.len() < 2 => println!("no rotation under way (rollout certs rotate-ca starts one)"),
                0 => println!(
                    "nobody holds a certificate from the previous CA: rollout certs retire-ca ends the rotation"
                ),
                n => println!("{n} identit{} still on the previous CA", if n == 1 { "y" } else { "ies" }),
            }
            Ok(())
        }
        CertsCommand::List { common, json } => {
            let config = load_config(&common)?;
            let now = SystemTime::now();
            let rows = list(&config.transport.tls_dir)?;
            let denied = revocation::load_denied(&config.transport.tls_dir, now)?;
            if json {
                for (path, info) in &rows {
                    println!("{}", row_json(path, info, now, denied.contains(&info.serial)));
                }
            } else {
                println!("{:<10} {:<24} {:<34} {:<21} STATE", "KIND", "NAME", "SERIAL", "EXPIRES");
                for (path, info) in &rows {
                    let (kind, name) = kind_and_name(path, info);
                    println!(
                        "{kind:<10} {name:<24} {:<34} {:<21} {}",
                        info.serial,
                        utc_text(info.not_after),
                        state(info, now, denied.contains(&info.serial))
                    );
                }
            }
            Ok(())
        }
    }
}

/// `issued  data/tls/workers/w1/cert.pem (serial …, expires …)`.
fn report(verb: &str, cert: &Path) {
    match CertInfo::of_file(cert) {
        Ok(info) => {
            println!("{verb} {} (serial {}, expires {})", cert.display(), info.serial, utc_text(info.not_after))
        }
        Err(_) => println!("{verb} {}", cert.display()),
    }
}

fn check_valid_for(d: Duration, ca: Duration) -> Result<(), Error> {
    let min = rollout_core::config::CERT_LIFETIME_MIN;
    if d < min || d > ca {
        return Err(Error::invalid_input(format!(
            "--valid-for: {}s is outside {}s..={}s (at least a minute, at most transport.ca_cert_lifetime)",
            d.as_secs(),
            min.as_secs(),
            ca.as_secs()
        )));
    }
    Ok(())
}

/// Every certificate file of the TLS directory (not keys), in name order, with what it
/// says. A file that does not parse is an error naming it.
fn list(dir: &Path) -> Result<Vec<(PathBuf, CertInfo)>, Error> {
    let mut paths = Vec::new();
    for d in [dir.to_path_buf(), dir.join(ENROLLED_DIR)] {
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && d != dir => continue,
            Err(e) => return Err(Error::invalid_input(format!("reading {}: {e}", d.display()))),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".pem") && !name.ends_with(".key.pem") {
                paths.push(path);
            }
        }
    }
    paths.extend(tls::identity_certs(dir));
    paths.sort();
    let mut rows = Vec::with_capacity(paths.len() + 1);
    for path in paths {
        if path == CertFiles::ca(dir).cert {
            // The bundle: the current CA, then (during a rotation) the previous one.
            for info in CertInfo::all_of_file(&path)? {
                rows.push((path.clone(), info));
            }
        } else {
            rows.push((path.clone(), CertInfo::of_file(&path)?));
        }
    }
    Ok(rows)
}

fn kind_and_name(path: &Path, info: &CertInfo) -> (&'static str, String) {
    let enrolled = path.parent().and_then(Path::file_name).is_some_and(|n| n == ENROLLED_DIR);
    match &info.role {
        Some(PeerRole::Worker(id)) => (if enrolled { "enrolled" } else { "worker" }, id.to_string()),
        Some(PeerRole::Operator(name)) => ("operator", name.clone()),
        None if path.file_name().is_some_and(|n| n == "ca.pem") && info.issuer == info.subject => {
            (if is_current_ca(path, info) { "ca" } else { "ca-old" }, info.common_name.clone())
        }
        None if path.file_name().is_some_and(|n| n == rollout_transport::trust::CROSS_FILE) => {
            ("ca-cross", info.common_name.clone())
        }
        None => ("server", info.common_name.clone()),
    }
}

/// Whether `info` is the first certificate of the bundle at `path`.
fn is_current_ca(path: &Path, info: &CertInfo) -> bool {
    CertInfo::of_file(path).is_ok_and(|first| first.serial == info.serial)
}

fn state(info: &CertInfo, now: SystemTime, revoked: bool) -> String {
    if revoked {
        return "revoked".to_owned();
    }
    match info.not_after.duration_since(now) {
        Err(_) => "expired".to_owned(),
        Ok(left) if left.as_secs() >= 2 * 86_400 => format!("valid, {} days left", left.as_secs() / 86_400),
        Ok(left) => format!("valid, {}h {}m left", left.as_secs() / 3600, left.as_secs() % 3600 / 60),
    }
}

fn row_json(path: &Path, info: &CertInfo, now: SystemTime, revoked: bool) -> serde_json::Value {
    let (kind, name) = kind_and_name(path, info);
    serde_json::json!({
        "kind": kind,
        "name": name,
        "file": path.display().to_string(),
        "serial": info.serial,
        "not_before": utc_text(info.not_before),
        "not_after": utc_text(info.not_after),
        "not_after_unix_ms": rollout_core::time::unix_millis(info.not_after),
        "expired": info.expired_at(now),
        "revoked": revoked,
    })
}
