#![no_main]
//! `register_request`: see `rollout_fuzz::register_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollout_fuzz::register_request(data));
