#![no_main]
//! `enroll_request`: see `rollout_fuzz::enroll_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollout_fuzz::enroll_request(data));
