#!/usr/bin/env bash
# A local cluster from a fresh clone: certificates, one coordinator and two workers on
# loopback (mutual TLS, redb under ./data), a demo job with a progress bar, a results
# summary, a clean shutdown, and the audit chain verified.
#
# Usage: scripts/run-local.sh [TASKS]   (default 200; ROLLOUT=path/to/rollout to pick a binary)
set -euo pipefail
cd "$(dirname "$0")/.."

ROLLOUT=${ROLLOUT:-${CARGO_TARGET_DIR:-$HOME/.cache/rollout/target}/debug/rollout}
TASKS=${1:-200}
DATA=./data
LOGS=$DATA/logs
mkdir -p "$LOGS"
export ROLLOUT_STORAGE__DATA_DIR=$DATA
export ROLLOUT_TRANSPORT__TLS_DIR=$DATA/tls

pids=()
stop_all() {
    # SIGINT: each process shuts down cleanly (workers cancel, the coordinator commits).
    for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}
trap stop_all EXIT

echo "== certificates ($ROLLOUT_TRANSPORT__TLS_DIR)"
"$ROLLOUT" certs init
for w in w1 w2; do
    [ -f "$ROLLOUT_TRANSPORT__TLS_DIR/worker.$w.pem" ] || "$ROLLOUT" certs issue --worker "$w" >/dev/null
done

echo "== coordinator and two workers (logs and histories in $LOGS)"
"$ROLLOUT" coordinator --history "$LOGS/coordinator.history.jsonl" 2>"$LOGS/coordinator.log" &
pids+=($!)
for w in w1 w2; do
    "$ROLLOUT" worker --id "$w" --slots 8 --history "$LOGS/$w.history.jsonl" 2>"$LOGS/$w.log" &
    pids+=($!)
done

echo "== demo job: $TASKS echo tasks and 8 sleep tasks"
demo=$DATA/demo.jsonl
: >"$demo"
for i in $(seq 1 "$TASKS"); do echo "{\"plugin\":\"echo\",\"payload\":\"hello $i\",\"job\":\"demo-echo\"}" >>"$demo"; done
for i in $(seq 1 8); do echo "{\"plugin\":\"sleep\",\"payload\":\"250\",\"job\":\"demo-sleep\"}" >>"$demo"; done
# The coordinator may still be binding its port: retry the submit briefly (it is idempotent).
for attempt in 1 2 3 4 5 6 7 8 9 10; do
    if "$ROLLOUT" submit "$demo"; then break; fi
    [ "$attempt" -lt 10 ] || exit 1
    sleep 0.5
done

echo "== status"
"$ROLLOUT" status

echo "== results (first 3 of the echo job)"
job=$("$ROLLOUT" status --all --json | python3 -c 'import json,sys; print(min(j["job"] for j in json.load(sys.stdin)["jobs"] if j["name"]=="demo-echo"))')
"$ROLLOUT" results "$job" --bytes | head -3 || true

echo "== shutting down"
stop_all
trap - EXIT

echo "== audit chain"
"$ROLLOUT" audit verify

echo "== invariant check of the recorded histories"
"$ROLLOUT" check "$LOGS"/coordinator.history.jsonl "$LOGS"/w1.history.jsonl "$LOGS"/w2.history.jsonl
echo "== done: histories in $LOGS/*.history.jsonl"
