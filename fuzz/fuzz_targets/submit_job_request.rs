#![no_main]
//! `submit_job_request`: see `rollout_fuzz::submit_job_request`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollout_fuzz::submit_job_request(data));
