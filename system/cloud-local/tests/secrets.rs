//! EnvSecretStore: the four answers (outside the allowlist, set, unset, put), with the
//! environment injected so the tests never touch the process's own.

use std::collections::BTreeMap;

use rollout_cloud_local::EnvSecretStore;
use rollout_core::traits::{Secret, SecretStore};
use rollout_core::{Error, Fatal, Recoverable, RetryHint};

fn store() -> EnvSecretStore {
    let vars = BTreeMap::from([
        ("ROLLOUT_SECRET_API_KEY".to_owned(), "sk-123".to_owned()),
        ("ROLLOUT_SECRET_EMPTY".to_owned(), String::new()),
        // Set, but not allowlisted: must not be served.
        ("ROLLOUT_SECRET_OTHER".to_owned(), "nope".to_owned()),
    ]);
    EnvSecretStore::from_map(["API_KEY", "HF_TOKEN", "EMPTY"], vars).expect("store")
}

#[test]
fn an_allowed_and_set_secret_is_served() {
    assert_eq!(store().get("API_KEY").expect("secret"), Secret::new("sk-123"));
}

#[test]
fn a_name_outside_the_allowlist_is_a_config_error_naming_it() {
    let err = store().get("OTHER").expect_err("not allowlisted");
    match &err {
        Error::Fatal(Fatal::ConfigInvalid { field, reason }) => {
            assert_eq!(field, "secrets.allowlist");
            assert!(reason.contains("\"OTHER\""), "{reason}");
        }
        other => panic!("expected ConfigInvalid, got {other:?}"),
    }
    assert!(!err.to_string().contains("nope"), "the value never shows: {err}");
}

#[test]
fn an_allowed_but_unset_secret_is_transient_with_no_automatic_retry() {
    for (name, var) in [("HF_TOKEN", "ROLLOUT_SECRET_HF_TOKEN"), ("EMPTY", "ROLLOUT_SECRET_EMPTY")] {
        let err = store().get(name).expect_err("unset");
        match &err {
            Error::Recoverable { kind: Recoverable::Transient(msg), hint: RetryHint::Never } => {
                assert!(msg.contains(var), "{msg}");
            }
            other => panic!("expected Transient/Never, got {other:?}"),
        }
    }
}

#[test]
fn put_is_refused_as_read_only() {
    let err = store().put("API_KEY", Secret::new("new")).expect_err("read-only");
    assert_eq!(
        err,
        Error::Fatal(Fatal::ConfigInvalid {
            field: "ROLLOUT_SECRET_API_KEY".to_owned(),
            reason: "read-only".to_owned()
        })
    );
    assert_eq!(store().get("API_KEY").expect("unchanged"), Secret::new("sk-123"));
}

#[test]
fn malformed_allowlist_names_are_refused_up_front() {
    for bad in ["", "lower", "HAS-DASH", "1STARTS_WITH_DIGIT", "A B"] {
        let err = EnvSecretStore::from_map([bad], BTreeMap::new()).expect_err(bad);
        assert!(err.is_fatal() && err.to_string().contains(&format!("{bad:?}")), "{err}");
    }
}

#[test]
fn a_non_utf8_value_is_a_config_error_that_hides_the_value() {
    use std::os::unix::ffi::OsStringExt;
    let store =
        EnvSecretStore::with_source(["BIN"], |_| Some(std::ffi::OsString::from_vec(vec![0xff, b's']))).expect("store");
    let err = store.get("BIN").expect_err("not utf-8");
    assert!(matches!(&err, Error::Fatal(Fatal::ConfigInvalid { field, .. }) if field == "ROLLOUT_SECRET_BIN"), "{err}");
}

#[test]
fn debug_shows_names_not_values() {
    let text = format!("{:?}", store());
    assert!(text.contains("API_KEY") && !text.contains("sk-123"), "{text}");
}

#[test]
fn the_default_store_reads_the_process_environment() {
    // Reads only: PATH is set in any test environment, and a name that is surely unset
    // exercises the real lookup without mutating the environment.
    let store = EnvSecretStore::new(["ROLLOUT_TEST_SURELY_UNSET_7F3A"]).expect("store");
    assert!(matches!(store.get("ROLLOUT_TEST_SURELY_UNSET_7F3A"), Err(Error::Recoverable { .. })));
}
