#![no_main]
//! `worker_frame`: see `rollout_fuzz::worker_frame`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollout_fuzz::worker_frame(data));
