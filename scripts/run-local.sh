#!/usr/bin/env bash
# A local cluster from a fresh clone: certificates, one coordinator and two workers on
# loopback (mutual TLS, redb under ./data), a demo job with a progress bar, a results
# summary, a clean shutdown, and the audit chain verified.
#
# It waits (at most 30 s) until both workers are registered, shows how the demo spread
# over them, shows the status table once latency percentiles are in, and prints where
# each process serves its Prometheus metrics. With KEEP=1 the cluster keeps running
# after the demo until Ctrl-C (scrape it, run `rollout status`, submit more).
#
# Usage: scripts/run-local.sh [TASKS]   (default 200; ROLLOUT=path/to/rollout to pick a binary; KEEP=1)
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
    [ -f "$ROLLOUT_TRANSPORT__TLS_DIR/workers/$w/cert.pem" ] || [ -f "$ROLLOUT_TRANSPORT__TLS_DIR/worker.$w.pem" ] || "$ROLLOUT" certs issue --worker "$w" >/dev/null
done

echo "== coordinator and two workers (logs and histories in $LOGS)"
COORDINATOR_METRICS=${ROLLOUT_METRICS__LISTEN_ADDR:-127.0.0.1:9464}
"$ROLLOUT" coordinator --history "$LOGS/coordinator.history.jsonl" 2>"$LOGS/coordinator.log" &
pids+=($!)
declare -A metrics_addr=([w1]=127.0.0.1:9465 [w2]=127.0.0.1:9466)
for w in w1 w2; do
    "$ROLLOUT" worker --id "$w" --slots 8 --metrics-addr "${metrics_addr[$w]}" \
        --history "$LOGS/$w.history.jsonl" 2>"$LOGS/$w.log" &
    pids+=($!)
done

# Both workers registered before the demo starts, or a clear error saying which is not
# and why (the last lines of its log).
deadline=$((SECONDS + 30))
until "$ROLLOUT" status --all --json 2>/dev/null | python3 -c '
import json, sys
try:
    workers = {w["worker_id"]: w for w in json.load(sys.stdin)["workers"]}
except ValueError:
    sys.exit(1)
# Active and beating: a record recovered from an earlier run is active too, until its
# deadline, but has no beat until this run'"'"'s process registers.
ok = lambda w: w is not None and w["state"] == "active" and w.get("last_beat_unix_ms")
sys.exit(0 if all(ok(workers.get(w)) for w in ("w1", "w2")) else 1)'; do
    for i in 1 2; do
        kill -0 "${pids[$i]}" 2>/dev/null || { echo "error: w$i exited; its log says:" >&2; tail -n 5 "$LOGS/w$i.log" >&2; exit 1; }
    done
    if ((SECONDS >= deadline)); then
        echo "error: the workers did not both register within 30 s; the last lines of their logs:" >&2
        for w in w1 w2; do echo "-- $w" >&2; tail -n 5 "$LOGS/$w.log" >&2; done
        exit 1
    fi
    sleep 0.2
done
echo "   w1 and w2 registered; dashboard: http://$COORDINATOR_METRICS/ (KEEP=1 keeps it up after the demo)"
echo "   metrics: http://$COORDINATOR_METRICS/metrics (coordinator), http://${metrics_addr[w1]}/metrics (w1), http://${metrics_addr[w2]}/metrics (w2)"

echo "== demo job: $TASKS echo tasks and 8 sleep tasks"
demo=$DATA/demo.jsonl
: >"$demo"
# A run of its own each time (the same file again would be the same jobs, already done).
run=$(date +%s)
for i in $(seq 1 "$TASKS"); do echo "{\"plugin\":\"echo\",\"payload\":\"hello $i\",\"job\":\"demo-echo-$run\"}" >>"$demo"; done
for i in $(seq 1 8); do echo "{\"plugin\":\"sleep\",\"payload\":\"250\",\"job\":\"demo-sleep-$run\"}" >>"$demo"; done
# The coordinator may still be binding its port: retry the submit briefly (it is idempotent).
for attempt in 1 2 3 4 5 6 7 8 9 10; do
    if "$ROLLOUT" submit "$demo"; then break; fi
    [ "$attempt" -lt 10 ] || exit 1
    sleep 0.5
done

echo "== how the demo spread over the workers"
"$ROLLOUT" status --all --json | python3 -c '
import collections, json, sys
run, history = sys.argv[1], sys.argv[2]
jobs = {"job-%d" % j["job"] for j in json.load(sys.stdin)["jobs"] if j["name"].endswith("-" + run)}
by_worker = collections.Counter()
for line in open(history):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("event") == "committed" and r["task"].rsplit(".", 1)[0] in jobs:
        by_worker[r["worker"]] += 1
print("   " + ", ".join(f"{w} committed {n} tasks" for w, n in sorted(by_worker.items())))
' "$run" "$LOGS/coordinator.history.jsonl"

# Latency percentiles come from the workers' merged histograms, which travel with their
# beats: wait (at most 5 s) for them before showing the status.
deadline=$((SECONDS + 5))
until "$ROLLOUT" status --json 2>/dev/null | python3 -c 'import json, sys; sys.exit(0 if json.load(sys.stdin).get("latencies") else 1)' || ((SECONDS >= deadline)); do
    sleep 0.2
done
echo "== status"
"$ROLLOUT" status

echo "== results (first 3 of the echo job)"
job=$("$ROLLOUT" status --all --json | python3 -c 'import json,sys; print(max(j["job"] for j in json.load(sys.stdin)["jobs"] if j["name"]=="demo-echo-'"$run"'"))')
"$ROLLOUT" results "$job" --bytes | head -3 || true

if [ -n "${KEEP:-}" ]; then
    echo "== KEEP=1: the cluster keeps running; Ctrl-C stops it"
    echo "   dashboard: http://$COORDINATOR_METRICS/   metrics: curl -s http://$COORDINATOR_METRICS/metrics | grep -v '^#'"
    echo "   ROLLOUT_STORAGE__DATA_DIR=$DATA ROLLOUT_TRANSPORT__TLS_DIR=$DATA/tls $ROLLOUT status"
    trap 'echo; echo "== stopping"' INT
    wait "${pids[0]}" 2>/dev/null || true
    trap - INT
fi

echo "== shutting down"
stop_all
trap - EXIT

echo "== audit chain"
"$ROLLOUT" audit verify

echo "== invariant check of the recorded histories"
"$ROLLOUT" check "$LOGS"/coordinator.history.jsonl "$LOGS"/w1.history.jsonl "$LOGS"/w2.history.jsonl
echo "== done: histories in $LOGS/*.history.jsonl"
