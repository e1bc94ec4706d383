#![no_main]
//! `bootstrap_token`: see `rollout_fuzz::bootstrap_token`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollout_fuzz::bootstrap_token(data));
