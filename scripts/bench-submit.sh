#!/usr/bin/env bash
# `make bench-submit`: one job of BENCH_TASKS (default 1,000,000) small tasks through
# `rollout submit` and the real coordinator (release builds, loopback mTLS, fsync'd redb),
# with no worker, so what is measured is submission alone. Prints, each against a
# baseline from the same run:
#   - the submit's wall time and tasks/s, and the client's peak RSS against the size of
#     the JSONL file it streamed (bounded memory: far below the file);
#   - the coordinator's peak RSS after the job, against its own RSS idle before it;
#   - a restart of the coordinator on that database: time until it answers status with
#     the job's million queued tasks, and its peak RSS.
# Usage: scripts/bench-submit.sh   (ROLLOUT=path/to/release/rollout, BENCH_TASKS=N, KEEP=1)
set -euo pipefail
cd "$(dirname "$0")/.."
ROLLOUT=${ROLLOUT:-${CARGO_TARGET_DIR:-$HOME/.cache/rollout/target}/release/rollout}
TASKS=${BENCH_TASKS:-1000000}
LOG_PREFIX=bench-submit
source scripts/lib/cluster.sh
[[ -x $ROLLOUT ]] || die "no rollout binary at $ROLLOUT (make bench-submit builds it)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/rollout-bench-submit.XXXXXX")
cfg=$tmp/bench.toml
pids=()
ok=0
on_exit() {
    stop_pids
    finish_tmp bench-submit "${KEEP:-}" "config, logs"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

hwm_kib() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

port=$(free_port)
cluster_config "$port" "$tmp" >"$cfg"
"$ROLLOUT" certs init --config "$cfg" >/dev/null
start_coordinator() {
    "$ROLLOUT" coordinator --config "$cfg" --history /dev/null 2>>"$tmp/coordinator.log" &
    coordinator=$!
    pids=("$coordinator")
}
wait_status() {
    local deadline=$(($(now_ms) + 120000))
    until "$ROLLOUT" status --config "$cfg" --json >"$tmp/status.json" 2>/dev/null; do
        (($(now_ms) < deadline)) || die "the coordinator did not answer within 120s"
        sleep 0.05
    done
}
start_coordinator
wait_status
idle_kib=$(rss_kib "$coordinator")

python3 - "$tmp/tasks.jsonl" "$TASKS" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        f.write('{"plugin":"echo","payload":"task-%08d"}\n' % i)
PY
file_bytes=$(stat -c %s "$tmp/tasks.jsonl")
say "submitting $TASKS tasks ($((file_bytes / 1048576)) MiB of JSONL) with rollout submit"
read -r secs client_kib < <(python3 - "$ROLLOUT" "$cfg" "$tmp/tasks.jsonl" "$tmp/submit.out" <<'PY'
import resource, subprocess, sys, time
rollout, cfg, tasks, out = sys.argv[1:5]
started = time.monotonic()
with open(out, "w") as f:
    subprocess.run([rollout, "submit", "--config", cfg, "--no-wait", tasks], stdout=f, stderr=subprocess.DEVNULL, check=True)
elapsed = time.monotonic() - started
print("%.3f %d" % (elapsed, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
PY
)
grep -q "$TASKS tasks queued" "$tmp/submit.out" || die "unexpected submit output: $(cat "$tmp/submit.out")"
coordinator_kib=$(hwm_kib "$coordinator")
wait_status
python3 - "$tmp/status.json" "$TASKS" <<'PY' || die "the job is not there with all its tasks"
import json, sys
jobs = json.load(open(sys.argv[1]))["jobs"]
assert any(j["tasks"] == int(sys.argv[2]) and j["queued"] == int(sys.argv[2]) for j in jobs), jobs
PY
say "submit: $TASKS tasks in ${secs}s ($(python3 -c "print('%.0f' % ($TASKS / $secs))") tasks/s); client peak RSS $((client_kib / 1024)) MiB for a $((file_bytes / 1048576)) MiB file ($(python3 -c "print('%.2f' % ($client_kib * 1024 / $file_bytes))")x its size)"
say "coordinator: peak RSS $((coordinator_kib / 1024)) MiB with the job queued; idle before it $((idle_kib / 1024)) MiB"

kill -INT "$coordinator"; wait "$coordinator" 2>/dev/null || true
db_bytes=$(stat -c %s "$tmp/data/rollout.db")
restarted_at=$(now_ms)
start_coordinator
wait_status
answered_ms=$(($(now_ms) - restarted_at))
say "restart: status answered ${answered_ms} ms after the start, $TASKS queued tasks recovered from a $((db_bytes / 1048576)) MiB database; peak RSS $(($(hwm_kib "$coordinator") / 1024)) MiB"
ok=1
