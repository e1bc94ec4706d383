#!/usr/bin/env bash
# End-to-end smoke test of the real binaries (what `make smoke` runs after the build):
#
#   1 coordinator + 2 workers (w1, w2) on loopback under mutual TLS, each worker running
#   two configured plugins: the Rust cdylib examples/plugins/echo ("echo-rs") and the
#   Python sidecar python/examples/echo_plugin.py ("echo-py", in ./.venv). One job with
#   tasks on both plugins; w1 is killed with SIGKILL while it runs tasks. Asserts, from
#   the coordinator's history (JSON lines) and status:
#   - both workers advertised exactly their plugins (configured + built-in echo, sleep);
#   - w1 is declared failed once, at once (its kernel's FIN closes the connection, and
#     the coordinator ends the incarnation without waiting for the deadline rule):
#     within 1 s of the kill, before its failure deadline
#     due_at (of w1's last beat) + max(coordinator_failure_timeout, clock_skew_budget);
#   - every task is committed exactly once (one `committed` event per task), with the
#     right result bytes, and at least one task w1 held was re-queued.
#   Then shuts everything down cleanly (SIGINT), verifies the audit chain, and runs
#   `rollout check --complete` (the simulator's invariant checker) over the histories.
#
# Everything lives in a fresh temp dir (config, certificates, database, logs, histories)
# on a free port, so it does not disturb ./data or a `make run` cluster. The dir is
# removed on success and kept (path printed) on failure or with KEEP_SMOKE=1.
#
# Usage: scripts/smoke.sh   (ROLLOUT=path/to/rollout, ECHO_SO=path/to/librollout_example_echo.so)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

ROLLOUT=${ROLLOUT:-${CARGO_TARGET_DIR:-$HOME/.cache/rollout/target}/debug/rollout}
ECHO_SO=${ECHO_SO:-$(dirname "$ROLLOUT")/librollout_example_echo.so}
TASKS_PER_PLUGIN=${TASKS_PER_PLUGIN:-32}
TASK_MS=300
# HEARTBEAT_MS, SELF_FENCE_MS, ...: the test cluster's health settings; say, die, now_ms.
LOG_PREFIX=smoke
source scripts/lib/cluster.sh

[[ -x $ROLLOUT ]] || die "no rollout binary at $ROLLOUT (run \`make build\` first, or set ROLLOUT)"
[[ -f $ECHO_SO ]] || die "no example cdylib at $ECHO_SO (built by \`make build\`; or set ECHO_SO)"
scripts/python-venv.sh || die "scripts/python-venv.sh failed (the sidecar plugin needs ./.venv)"
PY=$root/.venv/bin/python

tmp=$(mktemp -d "${TMPDIR:-/tmp}/rollout-smoke.XXXXXX")
cfg=$tmp/smoke.toml
history=$tmp/coordinator.history.jsonl
pids=()
ok=0

on_exit() {
    stop_pids
    finish_tmp smoke "${KEEP_SMOKE:-}" "config, logs, histories"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

port=$(free_port)
# The sidecar's script is given relative to the config file's directory (resolved there,
# not against the worker's working directory).
ln -s "$root/python/examples" "$tmp/py-plugins"
cluster_config "$port" "$tmp" >"$cfg"
cat >>"$cfg" <<EOF

[[plugins]]
name = "echo-rs"
mode = "cdylib"
path = "$ECHO_SO"

[[plugins]]
name = "echo-py"
mode = "sidecar"
script = "py-plugins/echo_plugin.py"
python = "$PY"
startup_timeout = "30s"
EOF

say "config $cfg (heartbeat ${HEARTBEAT_MS}ms, self-fence ${SELF_FENCE_MS}ms, failure timeout ${FAILURE_TIMEOUT_MS}ms, skew budget ${SKEW_BUDGET_MS}ms, scan ${SCAN_MS}ms)"
"$ROLLOUT" plan --config "$cfg" >"$tmp/plan.txt" || die "rollout plan rejected the smoke config: $(cat "$tmp/plan.txt")"

say "certificates"
"$ROLLOUT" certs init --config "$cfg" >/dev/null
for w in w1 w2; do "$ROLLOUT" certs issue --config "$cfg" --worker "$w" >/dev/null; done

say "coordinator on 127.0.0.1:$port, workers w1 and w2 (4 slots each)"
"$ROLLOUT" coordinator --config "$cfg" --history "$history" 2>"$tmp/coordinator.log" &
pids+=($!)
declare -A worker_pid
for w in w1 w2; do
    "$ROLLOUT" worker --config "$cfg" --id "$w" --slots 4 --history "$tmp/$w.history.jsonl" 2>"$tmp/$w.log" &
    worker_pid[$w]=$!
    pids+=($!)
done

status_json() { "$ROLLOUT" status --config "$cfg" --all --json 2>/dev/null; }

# Both workers active, each advertising exactly the configured plugins plus the built-ins.
deadline=$(($(now_ms) + 60000))
until status_json | python3 -c '
import json, sys
want = ["echo", "echo-py", "echo-rs", "sleep"]
try:
    workers = {w["worker_id"]: w for w in json.load(sys.stdin)["workers"]}
except ValueError:
    sys.exit(1)  # the coordinator is not answering yet
ready = all(w in workers and workers[w]["state"] == "active" for w in ("w1", "w2"))
for w in workers.values():
    if sorted(w["plugins"]) != want:
        sys.exit("worker %s advertises %s, expected %s" % (w["worker_id"], sorted(w["plugins"]), want))
sys.exit(0 if ready else 1)
' 2>"$tmp/ready.err"; do
    [[ -s $tmp/ready.err ]] && die "$(cat "$tmp/ready.err")"
    for w in w1 w2; do kill -0 "${worker_pid[$w]}" 2>/dev/null || die "worker $w exited during start-up"; done
    (($(now_ms) < deadline)) || die "the workers did not register within 60s"
    sleep 0.2
done
say "both workers registered with plugins echo, echo-py, echo-rs, sleep"

tasks=$tmp/tasks.jsonl
: >"$tasks"
for i in $(seq 1 "$TASKS_PER_PLUGIN"); do
    for plugin in echo-rs echo-py; do
        echo "{\"plugin\":\"$plugin\",\"method\":\"sleep\",\"payload\":\"$TASK_MS\",\"job\":\"smoke\"}" >>"$tasks"
    done
done
total=$((2 * TASKS_PER_PLUGIN))
say "submitting $total tasks (${TASKS_PER_PLUGIN} per plugin, ${TASK_MS}ms each)"
"$ROLLOUT" submit --config "$cfg" --no-wait "$tasks" >"$tmp/submit.out"

# Kill w1 once it has committed a few results and holds leases.
deadline=$(($(now_ms) + 30000))
until python3 - "$history" <<'PY'; do
import json, sys
held, committed = set(), 0
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        break  # a line still being written
    if r["event"] == "leased":
        held.add(r["task"]) if r["worker"] == "w1" else held.discard(r["task"])
    elif r["event"] in ("committed", "requeued"):
        held.discard(r["task"])
        committed += r["event"] == "committed" and r["worker"] == "w1"
sys.exit(0 if committed >= 2 and held else 1)
PY
    (($(now_ms) < deadline)) || die "w1 did not start running tasks within 30s"
    sleep 0.05
done
disown "${worker_pid[w1]}" # no "Killed" job notice from bash
kill_ms=$(now_ms)
kill -KILL "${worker_pid[w1]}"
for _ in $(seq 1 100); do
    kill -0 "${worker_pid[w1]}" 2>/dev/null || break
    sleep 0.01
done
alive=()
for pid in "${pids[@]}"; do [[ $pid == "${worker_pid[w1]}" ]] || alive+=("$pid"); done
pids=("${alive[@]}")
say "killed w1 (SIGKILL) while it ran tasks"

# Every task finishes (on w2).
deadline=$(($(now_ms) + 60000))
until status_json | python3 -c '
import json, sys
try:
    jobs = [j for j in json.load(sys.stdin)["jobs"] if j["name"] == "smoke"]
except ValueError:
    sys.exit(1)
if any(j["dead_lettered"] or j["cancelled"] for j in jobs):
    sys.exit("tasks were dead-lettered or cancelled: %s" % jobs)
sys.exit(0 if jobs and sum(j["committed"] for j in jobs) == sum(j["tasks"] for j in jobs) else 1)
' 2>"$tmp/done.err"; do
    [[ -s $tmp/done.err ]] && die "$(cat "$tmp/done.err")"
    (($(now_ms) < deadline)) || die "the job did not finish within 60s of the kill"
    sleep 0.2
done

status_json >"$tmp/status.json"
job=$(python3 -c 'import json, sys; print(min(j["job"] for j in json.load(open(sys.argv[1]))["jobs"] if j["name"] == "smoke"))' "$tmp/status.json")
"$ROLLOUT" results --config "$cfg" --bytes "$job" >"$tmp/results.jsonl"
# A blob up and back through the CLI (content id = SHA-256; stored once; verified).
head -c 3000000 /dev/urandom >"$tmp/blob.bin"
blob_id=$("$ROLLOUT" blob put --config "$cfg" "$tmp/blob.bin" 2>/dev/null) || die "blob put failed"
[[ $blob_id == $(sha256sum "$tmp/blob.bin" | cut -c1-64) ]] || die "blob put printed $blob_id, not the file's SHA-256"
[[ $("$ROLLOUT" blob put --config "$cfg" "$tmp/blob.bin" 2>/dev/null) == "$blob_id" ]] || die "the same bytes got another id"
"$ROLLOUT" blob get --config "$cfg" "$blob_id" --out "$tmp/blob.back" || die "blob get failed"
cmp -s "$tmp/blob.bin" "$tmp/blob.back" || die "the blob came back different"
[[ $("$ROLLOUT" blob ls --config "$cfg" --json | grep -c "$blob_id") == 1 ]] || die "blob ls does not list the blob once"
say "blob: 3,000,000 bytes up as $blob_id (twice: stored once), back identical, listed once"
# The same job followed (WatchResults): every task once, in the order they ended.
"$ROLLOUT" results --config "$cfg" --follow "$job" >"$tmp/follow.jsonl" || die "results --follow failed"
python3 - "$tmp/follow.jsonl" "$total" <<'PY' || die "results --follow did not give every task once in order"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
seqs = [l["seq"] for l in lines]
assert len(lines) == int(sys.argv[2]) and len({l["task"] for l in lines}) == len(lines), len(lines)
assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
print(f"smoke: results --follow: {len(lines)} tasks, each once, in the order they ended (seq {seqs[0]}..{seqs[-1]})")
PY

python3 - "$history" "$tmp/status.json" "$tmp/results.jsonl" "$kill_ms" "$total" "$TASK_MS" \
    "$HEARTBEAT_MS" "$FAILURE_TIMEOUT_MS" "$SKEW_BUDGET_MS" <<'PY' || die "assertions failed"
import collections, json, sys

history, status, results = sys.argv[1:4]
kill_ms, total, task_ms, heartbeat_ms, failure_timeout_ms, skew_budget_ms = map(int, sys.argv[4:10])
records = [json.loads(line) for line in open(history)]
failures = []

# Detection: w1's connection closed with its process, so it is declared failed at once,
# before the deadline rule (for a silent worker) could have fired.
w1 = next(w for w in json.load(open(status))["workers"] if w["worker_id"] == "w1")
due_at = w1["due_at_unix_ms"]
declared = [r for r in records if r["event"] == "declared_failed" and r["worker"] == "w1"]
if not declared:
    sys.exit("w1 was never declared failed")
declared_ms = declared[0]["wall_unix_ms"]
deadline = due_at + max(failure_timeout_ms, skew_budget_ms)
print(f"smoke: kill -> declared_failed: {declared_ms - kill_ms} ms "
      f"(the deadline rule would have waited until {deadline - kill_ms} ms after the kill: w1's last due_at "
      f"+ {max(failure_timeout_ms, skew_budget_ms)} ms; allowed: at most 1000 ms)")
if declared_ms - kill_ms > 1000:
    failures.append(f"w1 declared failed {declared_ms - kill_ms} ms after the kill (> 1000 ms): its connection's close was missed")
if len(declared) != 1:
    failures.append(f"w1 declared failed {len(declared)} times")

# Exactly once: one `committed` event per task, for every task of the job.
accepted = sum(r["tasks"] for r in records if r["event"] == "job_accepted")
commits = collections.Counter(r["task"] for r in records if r["event"] == "committed")
if accepted != total:
    failures.append(f"the coordinator accepted {accepted} tasks, {total} were submitted")
if len(commits) != total:
    failures.append(f"{len(commits)} distinct tasks committed, expected {total}")
twice = {t: n for t, n in commits.items() if n != 1}
if twice:
    failures.append(f"tasks committed more than once: {twice}")
lines = [json.loads(line) for line in open(results)]
wrong = [l for l in lines if l["state"] != "committed" or l.get("result") != str(task_ms)]
if len(lines) != total or wrong:
    failures.append(f"{len(lines)} results, not all committed with result {task_ms!r}: {wrong[:3]}")

# The kill hit running tasks: some of w1's leases were re-queued and finished on w2.
requeued = {r["task"] for r in records if r["event"] == "requeued" and "w1" in r["error"]}
late = [r for r in records if r["event"] == "committed" and r["worker"] == "w1" and r["wall_unix_ms"] > declared_ms]
if not requeued:
    failures.append("no task of w1 was re-queued: the kill did not hit running tasks")
if late:
    failures.append(f"w1 committed after it was declared failed: {late[:3]}")
by_worker = collections.Counter(r["worker"] for r in records if r["event"] == "committed")
print(f"smoke: {total} tasks committed exactly once ({dict(sorted(by_worker.items()))}); "
      f"{len(requeued)} of w1's tasks re-queued after its failure")
if failures:
    sys.exit("\n".join(failures))
PY

say "stopping the coordinator and w2 (SIGINT)"
stop_pids
"$ROLLOUT" audit verify --config "$cfg" >"$tmp/audit.out" 2>&1 || die "audit verify failed: $(cat "$tmp/audit.out")"
say "audit chain verified"
"$ROLLOUT" check --complete --states "$tmp/results.jsonl" "$history" "$tmp/w1.history.jsonl" "$tmp/w2.history.jsonl" \
    >"$tmp/check.out" 2>&1 || die "rollout check found a violation: $(cat "$tmp/check.out")"
say "rollout check: $(tail -n 1 "$tmp/check.out")"
ok=1
say "passed"
