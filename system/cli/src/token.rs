//! `rollout token create|list|revoke`: bootstrap tokens for `rollout worker --join`.

use std::time::SystemTime;

use rollout_core::time::from_unix_millis;
use rollout_core::{Error, WorkerId};
use rollout_transport::enroll::{self, utc_text};

use crate::{TokenCommand, load_config};

pub fn run(command: TokenCommand) -> Result<(), Error> {
    match command {
        TokenCommand::Create { common, ttl, worker } => {
            let config = load_config(&common)?;
            let worker = worker
                .map(|w| WorkerId::new(w).map_err(|e| Error::invalid_input(format!("--worker: {e}"))))
                .transpose()?;
            let token = enroll::create_token(&config.transport.tls_dir, ttl, worker, SystemTime::now())?;
            let bound = token.worker.as_ref().map_or_else(|| "any new worker id".to_owned(), |w| format!("worker {w}"));
            eprintln!(
                "token {} for {bound}, single-use, expires {}; pins CA {}",
                token.id,
                utc_text(token.expires_at),
                token.ca_pin
            );
            println!("{token}");
            Ok(())
        }
        TokenCommand::List { common, json } => {
            let config = load_config(&common)?;
            let now = SystemTime::now();
            if !json {
                println!("{:<16}  {:<20}  {:<20}  state", "id", "worker", "expires");
            }
            for (record, used) in enroll::list_tokens(&config.transport.tls_dir)? {
                let expires = from_unix_millis(record.expires_at_unix_ms);
                if json {
                    let state = match &used {
                        Some(_) => "used",
                        None if now >= expires => "expired",
                        None => "unused",
                    };
                    let line = serde_json::json!({
                        "id": record.id,
                        "worker": record.worker,
                        "expires_at_unix_ms": record.expires_at_unix_ms,
                        "state": state,
                        "used_by": used.as_ref().map(|u| u.worker.to_string()),
                        "used_at_unix_ms": used.as_ref().map(|u| u.used_at_unix_ms),
                    });
                    println!("{line}");
                    continue;
                }
                let state = match used {
                    Some(u) => format!("used by {} at {}", u.worker, utc_text(from_unix_millis(u.used_at_unix_ms))),
                    None if now >= expires => "expired".to_owned(),
                    None => "unused".to_owned(),
                };
                let worker = record.worker.as_deref().unwrap_or("(any)");
                println!("{:<16}  {:<20}  {:<20}  {state}", record.id, worker, utc_text(expires));
            }
            Ok(())
        }
        TokenCommand::Revoke { common, id } => {
            let config = load_config(&common)?;
            if enroll::revoke_token(&config.transport.tls_dir, &id)? {
                println!("revoked token {id}");
                Ok(())
            } else {
                Err(Error::invalid_input(format!(
                    "token {id}: no such token in {}",
                    config.transport.tls_dir.display()
                )))
            }
        }
    }
}
