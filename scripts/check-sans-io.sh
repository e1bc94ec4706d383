#!/usr/bin/env bash
# The state machines must stay sans-IO: no clock, no OS randomness, no spawning, no
# network stack in their dependency graph. Fails (exit 1) naming each offence.
set -euo pipefail
cd "$(dirname "$0")/.."

machines=(system/coordinator system/worker)
forbidden_calls='Instant::now|SystemTime::now|thread_rng|OsRng|rand::rng\(|getrandom|from_entropy|tokio::spawn|std::thread|tokio::time|std::net|HashMap|HashSet'
forbidden_crates='tonic|turmoil|tokio|hyper|h2|mio|rand|getrandom|socket2'

status=0
for dir in "${machines[@]}"; do
    [ -d "$dir/src" ] || continue
    # Comments may mention what is forbidden; code may not.
    if hits=$(grep -rnE "$forbidden_calls" "$dir/src" | grep -vE '^[^:]+:[0-9]+:\s*//'); then
        echo "sans-io: $dir calls something a state machine must not:" >&2
        echo "$hits" >&2
        status=1
    fi
    crate="rollout-$(basename "$dir")"
    if deps=$(cargo tree --offline -q -p "$crate" -e normal --prefix none 2>/dev/null | awk '{print $1}' | sort -u | grep -xE "$forbidden_crates"); then
        echo "sans-io: $crate depends on a runtime or network crate: $(echo $deps)" >&2
        status=1
    fi
done
[ "$status" -eq 0 ] && echo "sans-io: ${machines[*]} read no clock, spawn nothing and depend on no runtime"
exit "$status"
