#![no_main]
//! `history_jsonl`: see `rollout_fuzz::history_jsonl`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| rollout_fuzz::history_jsonl(data));
