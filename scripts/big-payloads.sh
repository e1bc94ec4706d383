#!/usr/bin/env bash
# The real binaries with the largest payloads and results the default limits allow
# (what `make smoke` runs after the crash test):
#
#   1 coordinator + 1 worker with 6 slots; one job of 6 `echo` tasks of 1,000,000 bytes
#   each (a 6 MB job: more than one 4 MiB message, so `rollout submit` streams it), all
#   leased to the worker at once (6 MB of assignments for one worker) and echoed back (6
#   MB of results). Asserts that every task commits on its first attempt with its payload
#   as its result, that the worker's Work stream never broke (no "too large" in its log,
#   no re-registration), and that `rollout check` holds over the histories, no_lost_task
#   against the coordinator's states included.
#
# Usage: scripts/big-payloads.sh   (ROLLOUT=path/to/rollout; KEEP=1 keeps the temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."

ROLLOUT=${ROLLOUT:-${CARGO_TARGET_DIR:-$HOME/.cache/rollout/target}/debug/rollout}
TASKS=6
PAYLOAD_BYTES=1000000
LOG_PREFIX=big-payloads
source scripts/lib/cluster.sh

[[ -x $ROLLOUT ]] || die "no rollout binary at $ROLLOUT (run \`make build\` first, or set ROLLOUT)"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/rollout-big.XXXXXX")
cfg=$tmp/big.toml
pids=()
ok=0
on_exit() {
    stop_pids
    finish_tmp big-payloads "${KEEP:-}" "config, logs, histories"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

port=$(free_port)
cluster_config "$port" "$tmp" >"$cfg"
"$ROLLOUT" plan --config "$cfg" >/dev/null || die "rollout plan rejected the config"
"$ROLLOUT" certs init --config "$cfg" >/dev/null
"$ROLLOUT" certs issue --config "$cfg" --worker w1 >/dev/null

# The job first, then the worker: all six are leased in one batch, one frame's worth
# and more for one worker.
"$ROLLOUT" coordinator --config "$cfg" --history "$tmp/coordinator.history.jsonl" 2>"$tmp/coordinator.log" &
pids+=($!)
python3 - "$tmp/tasks.jsonl" "$TASKS" "$PAYLOAD_BYTES" <<'PY'
import sys
path, tasks, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "w") as f:
    for i in range(tasks):
        f.write('{"plugin":"echo","payload":"%s","job":"big"}\n' % (chr(ord("a") + i) * size))
PY
say "submitting $TASKS tasks of $PAYLOAD_BYTES bytes each"
deadline=$(($(now_ms) + 30000))
until "$ROLLOUT" submit --config "$cfg" --no-wait "$tmp/tasks.jsonl" >"$tmp/submit.out" 2>"$tmp/submit.err"; do
    (($(now_ms) < deadline)) || die "submit failed: $(cat "$tmp/submit.err")"
    sleep 0.2
done
job=$(grep -o 'job-[0-9]*' "$tmp/submit.out" | head -n 1)
[[ -n $job ]] || die "no job id in the submit output: $(cat "$tmp/submit.out")"
say "queued as $job; starting w1 with $TASKS slots"
"$ROLLOUT" worker --config "$cfg" --id w1 --slots "$TASKS" --history "$tmp/w1.history.jsonl" 2>"$tmp/w1.log" &
pids+=($!)

deadline=$(($(now_ms) + 60000))
until "$ROLLOUT" results --config "$cfg" "$job" 2>/dev/null | python3 -c '
import json, sys
states = [json.loads(l)["state"] for l in sys.stdin]
sys.exit(0 if len(states) == int(sys.argv[1]) and all(s in ("committed", "dead_lettered") for s in states) else 1)
' "$TASKS"; do
    (($(now_ms) < deadline)) || die "the job did not finish within 60s"
    sleep 0.2
done
"$ROLLOUT" results --config "$cfg" --bytes "$job" >"$tmp/results.jsonl"
python3 - "$tmp/results.jsonl" "$TASKS" "$PAYLOAD_BYTES" <<'PY' || die "assertions failed"
import json, sys
path, tasks, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
results = [json.loads(l) for l in open(path)]
failures = []
for i, r in enumerate(results):
    want = chr(ord("a") + i) * size
    if r["state"] != "committed" or r["attempts"] != 1 or r.get("result") != want:
        failures.append("%s: %s after %d attempt(s), errors %s" % (r["task"], r["state"], r["attempts"], r["errors"][:2]))
if len(results) != tasks:
    failures.append("%d results for %d tasks" % (len(results), tasks))
if failures:
    sys.exit("\n".join(failures))
PY
! grep -qi "too large" "$tmp/w1.log" "$tmp/coordinator.log" || die "a message was too large: $(grep -i 'too large' "$tmp"/*.log | head -n 3)"
registrations=$(grep -c '"event":"registered"' "$tmp/coordinator.history.jsonl" || true)
[[ $registrations == 1 ]] || die "w1 registered $registrations times: its Work stream broke"
say "$TASKS tasks of $PAYLOAD_BYTES bytes committed on the first attempt, results echoed; one registration"

for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
pids=()
"$ROLLOUT" check --complete --states "$tmp/results.jsonl" "$tmp/coordinator.history.jsonl" "$tmp/w1.history.jsonl" \
    >"$tmp/check.out" 2>&1 || die "rollout check: $(cat "$tmp/check.out")"
say "rollout check: $(sed -n 2p "$tmp/check.out")"
ok=1
say "passed"
