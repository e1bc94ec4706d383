#![no_main]
//! `histogram`: see `rollout_fuzz::histogram`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollout_fuzz::histogram(data));
