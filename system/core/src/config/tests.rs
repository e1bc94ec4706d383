use std::io::Write;

use proptest::prelude::*;

use super::*;
use crate::error::Fatal;

const NO_ENV: [(&str, &str); 0] = [];

fn field_of(err: &Error) -> &str {
    match err {
        Error::Fatal(Fatal::ConfigInvalid { field, .. }) => field,
        other => panic!("expected ConfigInvalid, got {other:?}"),
    }
}

fn file_with(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(text.as_bytes()).expect("write temp config");
    f
}

#[test]
fn defaults_are_the_seed_values_and_valid() {
    let c = Config::default();
    assert_eq!(c.health.heartbeat_interval, Duration::from_millis(500));
    assert_eq!(c.health.worker_self_fence_timeout, Duration::from_secs(4));
    assert_eq!(c.health.coordinator_failure_timeout, Duration::from_secs(5));
    assert_eq!(c.health.clock_skew_budget, Duration::from_millis(250));
    c.validate().expect("defaults validate");
}

#[test]
fn file_overrides_defaults_and_env_overrides_file() {
    let f = file_with("[health]\nheartbeat_interval = \"400ms\"\nclock_skew_budget = \"100ms\"\n");
    let env = [("ROLLOUT_HEALTH__CLOCK_SKEW_BUDGET", "200ms"), ("ROLLOUT_TASKS__MAX_ATTEMPTS", "5"), ("PATH", "/bin")];
    let c = Config::load(Some(f.path()), env).expect("valid");
    assert_eq!(c.health.heartbeat_interval, Duration::from_millis(400));
    assert_eq!(c.health.clock_skew_budget, Duration::from_millis(200));
    assert_eq!(c.tasks.max_attempts, 5);
    assert_eq!(c.health.coordinator_failure_timeout, Duration::from_secs(5), "untouched keys keep defaults");
}

#[test]
fn self_fence_at_or_above_failure_timeout_is_rejected_naming_the_field() {
    let f = file_with("[health]\nworker_self_fence_timeout = \"6s\"\n");
    let err = Config::load(Some(f.path()), NO_ENV).expect_err("6s >= 5s");
    assert_eq!(field_of(&err), "health.worker_self_fence_timeout");
    assert!(err.to_string().contains("6s") && err.to_string().contains("5s"), "{err}");
}

#[test]
fn skew_budget_at_two_beats_is_rejected_naming_the_field() {
    let err = Config::load(None, [("ROLLOUT_HEALTH__CLOCK_SKEW_BUDGET", "1s")]).expect_err("1s >= 2 × 500ms");
    assert_eq!(field_of(&err), "health.clock_skew_budget");
}

#[test]
fn unknown_key_in_file_is_named_with_a_suggestion() {
    let f = file_with("[health]\nheartbeat_intervl = \"1s\"\n");
    let err = Config::load(Some(f.path()), NO_ENV).expect_err("typo");
    let field = field_of(&err);
    assert!(field.starts_with("health.heartbeat_intervl"), "{field}");
    assert!(field.contains(&f.path().display().to_string()), "names the file: {field}");
    assert!(err.to_string().contains("did you mean health.heartbeat_interval"), "{err}");
}

#[test]
fn unknown_section_and_env_key_are_named() {
    let f = file_with("[helth]\nheartbeat_interval = \"1s\"\n");
    let err = Config::load(Some(f.path()), NO_ENV).expect_err("unknown section");
    assert!(field_of(&err).starts_with("helth"), "{err}");

    let err = Config::load(None, [("ROLLOUT_HEALTH__BEAT", "1s")]).expect_err("unknown env key");
    assert!(field_of(&err).contains("ROLLOUT_HEALTH__BEAT"), "names the variable: {err}");
}

#[test]
fn plugins_tables_are_left_to_the_plugin_host() {
    let text = "[health]\nheartbeat_interval = \"400ms\"\nclock_skew_budget = \"100ms\"\n\n\
                [[plugins]]\nname = \"echo\"\nmode = \"cdylib\"\npath = \"libecho.so\"\n\n\
                [[plugins]]\nname = \"py\"\nmode = \"sidecar\"\nscript = \"echo.py\"\n";
    let f = file_with(text);
    let c = Config::load(Some(f.path()), NO_ENV).expect("[[plugins]] is accepted");
    assert_eq!(c.health.heartbeat_interval, Duration::from_millis(400));
    assert_eq!(Config::from_toml_str(text).expect("from text too"), c);
    assert!(!c.to_toml_string().contains("[[plugins]]"), "not part of the effective core config");

    // Its shape is still checked: a plugins key that is not [[plugins]] tables is an error.
    for bad in ["plugins = 3\n", "plugins = [\"echo\"]\n", "[plugins]\nname = \"echo\"\n"] {
        let f = file_with(bad);
        let err = Config::load(Some(f.path()), NO_ENV).expect_err(bad);
        assert!(field_of(&err).starts_with("plugins (in "), "{bad}: {err}");
    }
    // And it cannot come from the environment.
    let err = Config::load(None, [("ROLLOUT_PLUGINS__NAME", "echo")]).expect_err("plugins from env");
    assert!(field_of(&err).contains("ROLLOUT_PLUGINS__NAME"), "{err}");
}

#[test]
fn env_without_separator_is_not_an_override() {
    // ROLLOUT_SECRET_<NAME> belongs to the secret store, not to config.
    Config::load(None, [("ROLLOUT_SECRET_TOKEN", "x")]).expect("ignored");
}

#[test]
fn missing_file_names_the_path() {
    let err = Config::load(Some(Path::new("/nonexistent/rollout.toml")), NO_ENV).expect_err("missing");
    assert_eq!(field_of(&err), "/nonexistent/rollout.toml");
}

#[test]
fn bad_values_name_the_field() {
    let f = file_with("[health]\nheartbeat_interval = \"5 parsecs\"\n");
    let err = Config::load(Some(f.path()), NO_ENV).expect_err("bad duration");
    assert!(field_of(&err).starts_with("health.heartbeat_interval"), "{err}");

    let err = Config::load(None, [("ROLLOUT_TASKS__MAX_ATTEMPTS", "many")]).expect_err("bad int");
    assert!(field_of(&err).contains("tasks.max_attempts"), "{err}");
    assert!(field_of(&err).contains("ROLLOUT_TASKS__MAX_ATTEMPTS"), "{err}");

    let f = file_with("health = 3\n");
    let err = Config::load(Some(f.path()), NO_ENV).expect_err("section not a table");
    assert!(field_of(&err).starts_with("health"), "{err}");

    let f = file_with("[health\n");
    let err = Config::load(Some(f.path()), NO_ENV).expect_err("not toml");
    assert!(err.to_string().contains("not valid TOML"), "{err}");
}

#[test]
fn single_field_rules() {
    let err = Config::from_toml_str("[tasks]\nmax_attempts = 0\n").expect_err("zero attempts");
    assert_eq!(field_of(&err), "tasks.max_attempts");
    let err = Config::from_toml_str("[limits]\nmax_payload_bytes = 9999999999\n").expect_err("u32 overflow");
    assert!(field_of(&err).starts_with("limits.max_payload_bytes"), "{err}");
    let err = Config::from_toml_str("[limits]\nmax_message_bytes = 10\n").expect_err("payload exceeds message");
    assert_eq!(field_of(&err), "limits.max_payload_bytes");
    let err = Config::from_toml_str("[health]\nheartbeat_interval = \"0s\"\n").expect_err("zero beat");
    assert_eq!(field_of(&err), "health.heartbeat_interval");
}

#[test]
fn printed_config_loads_back_identically() {
    let c = Config::default();
    assert_eq!(Config::from_toml_str(&c.to_toml_string()).expect("own output parses"), c);
}

fn millis(max: u64) -> impl Strategy<Value = Duration> {
    (1..=max).prop_map(Duration::from_millis)
}

proptest! {
    #[test]
    fn validate_cross_fields_accepts_exactly_the_safe_configs(
        beat in millis(5_000),
        fence in millis(20_000),
        fail in millis(20_000),
        skew in millis(10_000),
    ) {
        let mut c = Config::default();
        c.health.heartbeat_interval = beat;
        c.health.worker_self_fence_timeout = fence;
        c.health.coordinator_failure_timeout = fail;
        c.health.clock_skew_budget = skew;
        let safe = fence < fail && skew < 2 * beat;
        let verdict = c.validate_cross_fields();
        prop_assert_eq!(verdict.is_ok(), safe, "fence {:?} fail {:?} skew {:?} beat {:?}", fence, fail, skew, beat);
        if let Err(err) = verdict {
            let expected = if fence >= fail { "health.worker_self_fence_timeout" } else { "health.clock_skew_budget" };
            prop_assert_eq!(field_of(&err), expected);
        }
    }

    #[test]
    fn any_valid_config_round_trips_through_toml(beat in millis(5_000), attempts in 1u32..100) {
        let mut c = Config::default();
        c.health.heartbeat_interval = beat;
        c.health.clock_skew_budget = beat; // < 2 × beat
        c.tasks.max_attempts = attempts;
        prop_assert_eq!(Config::from_toml_str(&c.to_toml_string()).expect("valid"), c);
    }
}

#[test]
fn edit_distance_is_levenshtein() {
    assert_eq!(edit_distance("kitten", "sitting"), 3);
    assert_eq!(edit_distance("", "abc"), 3);
    assert_eq!(edit_distance("same", "same"), 0);
}

#[test]
fn the_fast_failure_detection_preset_is_valid_and_faster() {
    let fast = Config::fast_failure_detection();
    fast.validate().expect("valid");
    let default = Config::default();
    assert!(fast.health.coordinator_failure_timeout < default.health.coordinator_failure_timeout);
    assert!(fast.health.heartbeat_interval < default.health.heartbeat_interval);
}

#[test]
fn certificate_lifetimes_are_bounded_naming_the_field() {
    let c = Config::default();
    assert_eq!(c.transport.worker_cert_lifetime, Duration::from_secs(7 * 86_400));
    assert_eq!(c.transport.operator_cert_lifetime, Duration::from_secs(90 * 86_400));
    let err = Config::load(None, [("ROLLOUT_TRANSPORT__WORKER_CERT_LIFETIME", "10s")]).expect_err("under a minute");
    assert_eq!(field_of(&err), "transport.worker_cert_lifetime");
    let err = Config::load(None, [("ROLLOUT_TRANSPORT__OPERATOR_CERT_LIFETIME", "1000d")]).expect_err("beyond the CA");
    assert_eq!(field_of(&err), "transport.operator_cert_lifetime");
    assert!(err.to_string().contains("transport.ca_cert_lifetime"), "{err}");
}

#[test]
fn the_write_ahead_log_is_off_or_between_a_mebibyte_and_a_gibibyte() {
    assert_eq!(Config::default().storage.wal_bytes, 0, "off unless turned on");
    for ok in ["0", "1048576", "1073741824"] {
        let c = Config::load(None, [("ROLLOUT_STORAGE__WAL_BYTES", ok)]).expect(ok);
        assert_eq!(c.storage.wal_bytes.to_string(), ok);
    }
    for bad in ["1000", "2147483648"] {
        let err = Config::load(None, [("ROLLOUT_STORAGE__WAL_BYTES", bad)]).expect_err(bad);
        assert_eq!(field_of(&err), "storage.wal_bytes");
        assert!(err.to_string().contains(bad), "{err}");
    }
}
