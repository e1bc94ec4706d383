//! `rollout certs init|issue`.

use rollout_core::{Error, WorkerId};
use rollout_transport::tls::{self, CertFiles};

use crate::{CertsCommand, load_config};

/// The operator certificate `certs init` creates, and the default of `--operator`.
pub const DEFAULT_OPERATOR: &str = "admin";

pub fn run(command: CertsCommand) -> Result<(), Error> {
    match command {
        CertsCommand::Init { common, sans } => {
            let config = load_config(&common)?;
            let dir = &config.transport.tls_dir;
            let ca = tls::ensure_dev_ca(dir)?;
            println!("{} {}", if ca.created { "created" } else { "kept   " }, ca.files.cert.display());
            let server = CertFiles::coordinator(dir);
            if server.exist() && sans.is_empty() {
                println!("kept    {}", server.cert.display());
            } else {
                let mut names = sans;
                if let Some((host, _)) = config.transport.listen_addr.rsplit_once(':') {
                    names.push(host.trim_matches(['[', ']']).to_owned());
                }
                let files = tls::issue_server_cert(dir, &names)?;
                println!("issued  {}", files.cert.display());
            }
            let operator = CertFiles::operator(dir, DEFAULT_OPERATOR);
            if operator.exist() {
                println!("kept    {}", operator.cert.display());
            } else {
                println!("issued  {}", tls::issue_operator_cert(dir, DEFAULT_OPERATOR)?.cert.display());
            }
            Ok(())
        }
        CertsCommand::Issue { common, worker, operator, server, sans } => {
            let config = load_config(&common)?;
            let dir = &config.transport.tls_dir;
            let files = match (worker, operator, server) {
                (Some(id), _, _) => {
                    let id = WorkerId::new(id).map_err(|e| Error::invalid_input(format!("--worker: {e}")))?;
                    tls::issue_client_cert(dir, &id)?
                }
                (None, Some(name), _) => tls::issue_operator_cert(dir, &name)?,
                (None, None, true) => tls::issue_server_cert(dir, &sans)?,
                (None, None, false) => {
                    return Err(Error::invalid_input("say what to issue: --worker ID, --operator NAME or --server"));
                }
            };
            println!("issued  {}", files.cert.display());
            println!("key     {}", files.key.display());
            Ok(())
        }
    }
}
