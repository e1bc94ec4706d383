#![no_main]
//! `stored_records`: see `rollout_fuzz::stored_records`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollout_fuzz::stored_records(data));
