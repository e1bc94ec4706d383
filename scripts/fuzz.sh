#!/usr/bin/env bash
# `make fuzz`: every cargo-fuzz target of fuzz/ for FUZZ_SECONDS each (default 180), on
# the nightly toolchain, under libFuzzer with a memory bound (-rss_limit_mb) and a time
# bound per input (-timeout). New inputs that find new coverage are added to
# fuzz/corpus/<target>/ (commit the interesting ones; `make test` replays them all on
# stable); a crash is written to fuzz/artifacts/<target>/ and fails the run, naming the
# file to reproduce it with:
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/<file>
# fault_schedule (the coverage-guided explorer of fault schedules) also writes each
# finding, shrunk, as a regression scenario to fuzz/artifacts/fault_schedule/*.toml
# (move it to scenarios/regressions/ once fixed); ROLLOUT_FUZZ_PLANT=release_before_durable
# plants a simulator bug to watch it being found.
#
# Needs a nightly toolchain (rustup toolchain install nightly) and cargo-fuzz (installed
# here from crates.io if missing). Without nightly, the corpora still run as ordinary
# tests: cargo test -p rollout-fuzz.
#
# Usage: scripts/fuzz.sh [TARGET...]   (FUZZ_SECONDS=600 scripts/fuzz.sh stored_records)
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZ_SECONDS=${FUZZ_SECONDS:-180}
RSS_LIMIT_MB=${RSS_LIMIT_MB:-1024}
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$HOME/.cache/rollout/fuzz-target}

say() { echo "fuzz: $*"; }
if ! cargo +nightly --version >/dev/null 2>&1; then
    say "no nightly toolchain: install one (rustup toolchain install nightly), or run the corpora on stable with"
    say "  cargo test -p rollout-fuzz"
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz (once)"
    cargo install cargo-fuzz --locked
fi
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(ls fuzz/fuzz_targets | sed 's/\.rs$//')
fi
failed=()
for t in "${targets[@]}"; do
    case $t in
        histogram) max_len=70000 ;;
        stored_records | history_jsonl | scenario_toml | config_toml) max_len=16384 ;;
        fault_schedule) max_len=200 ;; # 8 seed bytes + 24 faults of 8
        *) max_len=65536 ;;
    esac
    # fault_schedule runs whole simulations (safe Rust only): without AddressSanitizer
    # it runs about 8 times as fast (17 against 2 inputs/s here), in a target dir of its
    # own so the two builds do not evict each other.
    sanitizer=(); target_dir=$CARGO_TARGET_DIR
    if [[ $t == fault_schedule ]]; then sanitizer=(-s none); target_dir=$CARGO_TARGET_DIR-nosan; fi
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    say "$t: ${FUZZ_SECONDS}s, rss limit ${RSS_LIMIT_MB} MB, 10 s per input, inputs up to $max_len bytes"
    if ! (cd fuzz && CARGO_TARGET_DIR=$target_dir cargo +nightly fuzz run "${sanitizer[@]}" "$t" "corpus/$t" -- \
        -max_total_time="$FUZZ_SECONDS" -rss_limit_mb="$RSS_LIMIT_MB" -timeout=10 -max_len="$max_len" \
        -print_final_stats=1 2>&1 | tail -n 25); then
        failed+=("$t")
    fi
    if compgen -G "fuzz/artifacts/$t/*" >/dev/null; then
        say "$t: FOUND $(ls "fuzz/artifacts/$t" | wc -l) crashing input(s) in fuzz/artifacts/$t/"
        failed+=("$t")
    fi
done
if ((${#failed[@]} > 0)); then
    say "FAILED: ${failed[*]}"
    exit 1
fi
say "no crash, no memory or time bound exceeded in ${#targets[@]} target(s)"
