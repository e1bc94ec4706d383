#![no_main]
//! `scenario_toml`: see `rollout_fuzz::scenario_toml`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollout_fuzz::scenario_toml(data));
