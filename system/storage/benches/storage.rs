//! Storage throughput on the file backend: committed single-put transactions per second (each
//! one fsync) against puts per second batched 1000 to a transaction, as medians over several
//! runs, each with the write-ahead log (`storage.wal_bytes`, the default) and without it
//! (every commit a durable redb commit), alternating in one run, with their ratios. Run with
//! `make bench-storage` (`cargo bench -p rollout-storage --bench storage`).
//!
//! The database goes in a fresh temporary directory (under `ROLLOUT_BENCH_DIR` when set, so a
//! run can target the disk a deployment would use; a tmpfs would make fsync free and the
//! numbers meaningless).

use std::time::{Duration, Instant};

use rollout_core::traits::Storage;
use rollout_storage::{OpenOptions, RedbStorage};

const RUNS: usize = 5;
const SINGLE_PUT_COMMITS_PER_RUN: u64 = 200;
const BATCHED_COMMITS_PER_RUN: u64 = 20;
const PUTS_PER_BATCH: u64 = 1000;
const VALUE_BYTES: usize = 100;
/// Commits before timing starts, so that file growth and first-touch costs stay out of the runs.
const WARM_UP_COMMITS: u64 = 20;

fn key(index: u64) -> [u8; 14] {
    let mut key = *b"bench/\0\0\0\0\0\0\0\0";
    key[6..].copy_from_slice(&index.to_be_bytes());
    key
}

fn commit_puts(storage: &RedbStorage, first_key: u64, puts: u64) {
    let value = [0xa5; VALUE_BYTES];
    let mut txn = storage.begin_write().expect("begin");
    for index in first_key..first_key + puts {
        txn.put(&key(index), &value).expect("put");
    }
    txn.commit().expect("commit");
}

/// Runs `commits` transactions of `puts_per_commit` puts on a fresh database; returns the
/// elapsed time of the timed part.
fn timed_run(commits: u64, puts_per_commit: u64, wal_bytes: u64) -> Duration {
    let dir = match std::env::var_os("ROLLOUT_BENCH_DIR") {
        Some(base) => tempfile::tempdir_in(base),
        None => tempfile::tempdir(),
    }
    .expect("temporary directory");
    let options = OpenOptions { wal_bytes, ..OpenOptions::default() };
    let storage = RedbStorage::open_with(dir.path().join("bench.db"), options).expect("open");
    let mut next_key = 0;
    for _ in 0..WARM_UP_COMMITS {
        commit_puts(&storage, next_key, puts_per_commit);
        next_key += puts_per_commit;
    }
    let started = Instant::now();
    for _ in 0..commits {
        commit_puts(&storage, next_key, puts_per_commit);
        next_key += puts_per_commit;
    }
    started.elapsed()
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Medians of `RUNS` runs with the log and without it, alternating.
fn compare(commits: u64, puts_per_commit: u64) -> (f64, f64) {
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        let rate = |wal_bytes| {
            (commits * puts_per_commit) as f64 / timed_run(commits, puts_per_commit, wal_bytes).as_secs_f64()
        };
        with.push(rate(rollout_storage::wal::SUGGESTED_WAL_BYTES));
        without.push(rate(0));
    }
    let runs = |rates: &[f64]| rates.iter().map(|rate| format!("{rate:.0}")).collect::<Vec<_>>().join(", ");
    println!("  runs with the log: {}; without: {}", runs(&with), runs(&without));
    (median(with), median(without))
}

fn main() {
    let location = std::env::var("ROLLOUT_BENCH_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    println!(
        "rollout-storage: redb file backend, {VALUE_BYTES}-byte values, under {location}; with the write-ahead log \
         ({} MiB) and without it (Durability::Immediate on every commit), {RUNS} runs each",
        rollout_storage::wal::SUGGESTED_WAL_BYTES >> 20
    );
    let (single_wal, single) = compare(SINGLE_PUT_COMMITS_PER_RUN, 1);
    println!(
        "single-put transactions: {single_wal:.0} txn/s with the log, {single:.0} without: {:.2}x (medians of runs of \
         {SINGLE_PUT_COMMITS_PER_RUN} commits)",
        single_wal / single
    );
    let (batched_wal, batched) = compare(BATCHED_COMMITS_PER_RUN, PUTS_PER_BATCH);
    println!(
        "batched puts ({PUTS_PER_BATCH} per txn): {batched_wal:.0} puts/s with the log, {batched:.0} without: {:.2}x \
         (medians of runs of {BATCHED_COMMITS_PER_RUN} commits)",
        batched_wal / batched
    );
    println!("batched puts/s / single-put txn/s, with the log: {:.1}x", batched_wal / single_wal);
}
