//! [`EnvSecretStore`]: secrets from `ROLLOUT_SECRET_<NAME>` environment variables,
//! limited to an allowlist of names.
//!
//! The allowlist is the point: a plugin can ask for any name, and without it any
//! `ROLLOUT_SECRET_*` variable of the host (or, with a looser prefix, any variable
//! at all) would be one request away.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt;

use rollout_core::traits::{Secret, SecretStore};
use rollout_core::{Error, Result, RetryHint};

/// The prefix of secret variables: secret `OPENAI_KEY` is read from
/// `ROLLOUT_SECRET_OPENAI_KEY`.
pub const ENV_PREFIX: &str = "ROLLOUT_SECRET_";

/// The config field named in errors about the allowlist itself.
const ALLOWLIST_FIELD: &str = "secrets.allowlist";

type EnvSource = dyn Fn(&str) -> Option<OsString> + Send + Sync;

/// A read-only [`SecretStore`] over environment variables.
///
/// What [`SecretStore::get`] answers:
/// - a name outside the allowlist: [`Fatal::ConfigInvalid`] naming the name;
/// - allowed and set to a non-empty value: the value;
/// - allowed but unset or empty: `Recoverable { kind: Transient, hint: Never }` naming
///   the variable (someone may set it and restart; retrying in-process will not help);
/// - allowed but not UTF-8: [`Fatal::ConfigInvalid`] naming the variable.
///
/// [`SecretStore::put`] is always [`Fatal::ConfigInvalid`] with reason `read-only`.
///
/// [`Fatal::ConfigInvalid`]: rollout_core::Fatal::ConfigInvalid
pub struct EnvSecretStore {
    allowlist: BTreeSet<String>,
    source: Box<EnvSource>,
}

impl fmt::Debug for EnvSecretStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names only: the values are secrets.
        f.debug_struct("EnvSecretStore").field("allowlist", &self.allowlist).finish_non_exhaustive()
    }
}

impl EnvSecretStore {
    /// A store over the process environment that serves the names in `allowlist`.
    /// Names are `[A-Z][A-Z0-9_]*` (they become part of a variable name); anything
    /// else is [`Fatal::ConfigInvalid`](rollout_core::Fatal::ConfigInvalid).
    pub fn new<I, S>(allowlist: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::with_source(allowlist, |var| std::env::var_os(var))
    }

    /// Like [`EnvSecretStore::new`], reading variables through `source` instead of the
    /// process environment (tests, or an environment captured at startup).
    pub fn with_source<I, S, F>(allowlist: I, source: F) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
        F: Fn(&str) -> Option<OsString> + Send + Sync + 'static,
    {
        let allowlist = allowlist.into_iter().map(Into::into).collect::<BTreeSet<String>>();
        for name in &allowlist {
            check_name(name)?;
        }
        Ok(EnvSecretStore { allowlist, source: Box::new(source) })
    }

    /// Like [`EnvSecretStore::new`], reading variables from `vars` (variable name →
    /// value), so tests need not touch the process environment.
    pub fn from_map<I, S>(allowlist: I, vars: BTreeMap<String, String>) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::with_source(allowlist, move |var| vars.get(var).map(OsString::from))
    }

    /// The names this store serves.
    pub fn allowlist(&self) -> impl Iterator<Item = &str> {
        self.allowlist.iter().map(String::as_str)
    }

    /// The variable secret `name` is read from: `ROLLOUT_SECRET_<NAME>`.
    pub fn variable_of(name: &str) -> String {
        format!("{ENV_PREFIX}{name}")
    }
}

impl SecretStore for EnvSecretStore {
    fn get(&self, name: &str) -> Result<Secret> {
        if !self.allowlist.contains(name) {
            let allowed = self.allowlist.iter().map(String::as_str).collect::<Vec<_>>().join(", ");
            return Err(Error::config_invalid(
                ALLOWLIST_FIELD,
                format!("secret {name:?} is not in the allowlist [{allowed}]; add it there to serve it"),
            ));
        }
        let var = Self::variable_of(name);
        match (self.source)(&var) {
            None => Err(Error::transient(
                format!("secret {name:?}: environment variable {var} is not set; set it and restart"),
                RetryHint::Never,
            )),
            Some(value) if value.is_empty() => Err(Error::transient(
                format!("secret {name:?}: environment variable {var} is empty; set it and restart"),
                RetryHint::Never,
            )),
            Some(value) => value.into_string().map(Secret::new).map_err(|_| {
                // Never echo the value: it is a secret even when malformed.
                Error::config_invalid(var, "the value is not valid UTF-8")
            }),
        }
    }

    fn put(&self, name: &str, _value: Secret) -> Result<()> {
        Err(Error::config_invalid(Self::variable_of(name), "read-only"))
    }
}

fn check_name(name: &str) -> Result<()> {
    let mut chars = name.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_uppercase())
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if !well_formed {
        return Err(Error::config_invalid(
            ALLOWLIST_FIELD,
            format!("secret name {name:?} must match [A-Z][A-Z0-9_]* (it becomes {ENV_PREFIX}<NAME>)"),
        ));
    }
    Ok(())
}
