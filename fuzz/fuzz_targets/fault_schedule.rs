#![no_main]
//! `fault_schedule`: see `rollout_fuzz::fault_schedule` (the coverage-guided explorer).

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollout_fuzz::fault_schedule(data));
