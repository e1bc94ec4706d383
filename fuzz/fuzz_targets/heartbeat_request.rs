#![no_main]
//! `heartbeat_request`: see `rollout_fuzz::heartbeat_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollout_fuzz::heartbeat_request(data));
