#!/usr/bin/env bash
# The state machines must stay sans-IO: no clock, no OS randomness, no spawning, no
# files, environment, processes or network, no hash-ordered collections, and no runtime
# or network crate in their dependency graph. Fails (exit 1) naming each offence; fails
# too when it cannot look (cargo tree failing is not a pass).
#
# Test modules (files under #[cfg(test)] in the crate root: *tests.rs) may read the
# environment for their own knobs; they are not part of the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

machines=(system/coordinator system/worker)
forbidden_calls='Instant::now|SystemTime::now|thread_rng|OsRng|rand::rng\(|getrandom|from_entropy|tokio::spawn|std::thread|tokio::time|std::net|std::fs|std::env|std::process|HashMap|HashSet'
forbidden_crates='tonic|turmoil|tokio|hyper|h2|mio|rand|getrandom|socket2'

status=0
for dir in "${machines[@]}"; do
    if [ ! -d "$dir/src" ]; then
        echo "sans-io: $dir/src is missing: nothing to check is not a pass" >&2
        status=1
        continue
    fi
    # Comments may mention what is forbidden; code may not.
    if hits=$(grep -rnE "$forbidden_calls" "$dir/src" --include='*.rs' --exclude='*tests.rs' |
        grep -vE '^[^:]+:[0-9]+:\s*//'); then
        echo "sans-io: $dir calls something a state machine must not:" >&2
        echo "$hits" >&2
        status=1
    fi
    crate="rollout-$(basename "$dir")"
    if ! tree=$(cargo tree --offline -q -p "$crate" -e normal --prefix none 2>&1); then
        echo "sans-io: cargo tree failed for $crate, so its dependencies are unchecked:" >&2
        echo "$tree" >&2
        status=1
        continue
    fi
    if deps=$(echo "$tree" | awk '{print $1}' | sort -u | grep -xE "$forbidden_crates"); then
        echo "sans-io: $crate depends on a runtime or network crate: $(echo $deps)" >&2
        status=1
    fi
done
[ "$status" -eq 0 ] && echo "sans-io: ${machines[*]} read no clock, file or environment, spawn nothing and depend on no runtime"
exit "$status"
