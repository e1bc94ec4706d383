#![no_main]
//! `config_toml`: see `rollout_fuzz::config_toml`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollout_fuzz::config_toml(data));
