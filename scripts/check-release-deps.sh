#!/usr/bin/env bash
# The release binary carries no simulation machinery: turmoil (layer 2 of the simulator,
# a dev-dependency of `sim` only) and tokio's `test-util` feature (which turmoil turns on:
# a pausable, steerable clock) must never enter the normal dependency graph of `rollout`
# (rollout-cli takes the checker from rollout-history, not from `sim`). Fails (exit 1) naming
# each offender and who pulls it in.
set -euo pipefail
cd "$(dirname "$0")/.."

package=rollout-cli
tree=$(cargo tree -p "$package" -e normal,build -f '{p} {f}' --prefix none 2>/dev/null | sort -u)
if [ -z "$tree" ]; then
    echo "release-deps: cargo tree printed nothing; cannot check" >&2
    exit 1
fi
fail=0
if echo "$tree" | grep -qE '^turmoil v'; then
    echo "release-deps: turmoil is in the dependency graph of $package, pulled in by:" >&2
    cargo tree -p "$package" -e normal,build -i turmoil >&2 || true
    fail=1
fi
if echo "$tree" | grep -E '^tokio v' | grep -qE '[ ,]test-util(,|$)'; then
    echo "release-deps: tokio's test-util feature is on in the dependency graph of $package, enabled by:" >&2
    cargo tree -p "$package" -e features -i tokio >&2 || true
    fail=1
fi
if [ "$fail" -ne 0 ]; then
    exit 1
fi
echo "release-deps: no turmoil and no tokio test-util in $package's dependency graph"
