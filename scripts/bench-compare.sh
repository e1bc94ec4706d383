#!/usr/bin/env bash
# `make bench-compare`: the same no-op workload through Redis Streams and through
# rollout, in one run, with the disk's fsync cost measured beside them.
#
# - Redis 7 (Debian's redis-server, installed here if missing), on loopback in a temp
#   dir with `appendonly yes`, `appendfsync always`, driven by a Rust client
#   (bench/redis-streams: a consumer group, two worker threads on their own
#   connections, a durable result per task, then XACK), stopped by its own pid.
# - rollout's real release binaries as separate processes: `rollout coordinator`, two
#   `rollout worker` (the built-in echo, 1024 slots each: limits.max_slots_per_worker, the default bound) and `rollout submit` of one job
#   of BENCH_TASKS tasks, which returns when every task is committed (it polls a
#   twentieth of the time waited so far apart: it sees the end within about 5%);
#   loopback mTLS, fsync'd redb.
#
# Each system runs BENCH_RUNS times (default 3), alternating, each run on a fresh
# server and data dir; medians are printed with the ratio rollout/Redis. Latency one
# task at a time: Redis's from its client (just before XADD to the worker's read);
# rollout's from the coordinator's `job_accepted` record to the worker's `task_started`
# (their history lines carry microseconds; the same machine's clock), BENCH_SAMPLES
# (default 200) one-task jobs submitted one after another with `rollout submit`. The
# half-load latency is Redis's only here; rollout's is `make bench-e2e`'s.
#
# rollout also runs each round with its write-ahead log turned on (storage.wal_bytes =
# 64 MiB; off by default), the same binary: the ratio with/without is what the log buys
# (or costs) on this disk, in the same run.
#
# Usage: scripts/bench-compare.sh   (ROLLOUT=..., REDIS_BENCH=..., BENCH_TASKS=N, BENCH_RUNS=N, KEEP=1)
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${CARGO_TARGET_DIR:-$HOME/.cache/rollout/target}
ROLLOUT=${ROLLOUT:-$TARGET/release/rollout}
REDIS_BENCH=${REDIS_BENCH:-$TARGET/release/redis-streams-bench}
TASKS=${BENCH_TASKS:-200000}
SAMPLES=${BENCH_SAMPLES:-200}
RUNS=${BENCH_RUNS:-3}
LOG_PREFIX=bench-compare
source scripts/lib/cluster.sh
[[ -x $ROLLOUT ]] || die "no rollout binary at $ROLLOUT (make bench-compare builds it)"
[[ -x $REDIS_BENCH ]] || die "no redis-streams-bench at $REDIS_BENCH (make bench-compare builds it)"

if ! command -v redis-server >/dev/null; then
    say "installing Debian's redis-server (once)"
    if [[ $(id -u) -ne 0 ]]; then die "redis-server is missing and installing it needs root (apt-get install redis-server)"; fi
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null \
        || die "apt-get install redis-server failed"
fi
# Debian starts a system-wide instance on install; this script uses its own.
redis_version=$(redis-server --version | sed -n 's/.*v=\([0-9.]*\).*/\1/p')

tmp=$(mktemp -d "${TMPDIR:-/tmp}/rollout-bench-compare.XXXXXX")
pids=()
redis_pid=
ok=0
on_exit() {
    stop_pids
    if [[ -n $redis_pid ]]; then kill "$redis_pid" 2>/dev/null || true; fi
    finish_tmp bench-compare "${KEEP:-}" "configs, logs"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# The same run's baseline: one 4 KiB write + fsync in the temp dir, median of 200.
fsync_us=$(python3 - "$tmp" <<'PY'
import os, statistics, sys, time
path = os.path.join(sys.argv[1], "fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
samples = []
for _ in range(200):
    os.write(fd, b"x" * 4096)
    t = time.perf_counter()
    os.fsync(fd)
    samples.append(time.perf_counter() - t)
os.close(fd)
print("%.0f" % (statistics.median(samples) * 1e6))
PY
)
say "fsync baseline (4 KiB write + fsync, median of 200) on this disk: ${fsync_us} us"

python3 - "$tmp/tasks.jsonl" "$TASKS" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(int(sys.argv[2])):
        f.write('{"plugin":"echo","payload":"task-%08d"}\n' % i)
PY

redis_run() {
    local n=$1 dir=$tmp/redis-$1 port
    mkdir -p "$dir"
    port=$(free_port)
    redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --appendonly yes --appendfsync always \
        --save "" --daemonize no --logfile "$dir/redis.log" &
    redis_pid=$!
    local deadline=$(($(now_ms) + 10000))
    until redis-cli -p "$port" ping >/dev/null 2>&1; do
        (($(now_ms) < deadline)) || die "redis-server did not answer within 10s: $(tail -3 "$dir/redis.log")"
        sleep 0.05
    done
    "$REDIS_BENCH" --port "$port" --tasks "$TASKS" >"$dir/out.txt" 2>"$dir/err.txt" \
        || die "redis run $n failed: $(cat "$dir/err.txt")"
    kill "$redis_pid"; wait "$redis_pid" 2>/dev/null || true
    redis_pid=
    cat "$dir/out.txt"
}

# A fresh rollout cluster under $1 (a coordinator and workers w1, w2 with 1024 slots,
# history lines to $2/<node>.jsonl, or nowhere when $2 is empty), waited for until
# both workers are active; sets `cfg` and `pids`. $3 names the run in errors.
start_cluster() {
    local dir=$1 history_dir=$2 what=$3 port history
    mkdir -p "$dir"
    port=$(free_port)
    cfg=$dir/bench.toml
    cluster_config "$port" "$dir" >"$cfg"
    "$ROLLOUT" certs init --config "$cfg" >/dev/null
    for w in w1 w2; do "$ROLLOUT" certs issue --config "$cfg" --worker "$w" >/dev/null; done
    history=/dev/null
    if [[ -n $history_dir ]]; then history=$history_dir/coordinator.jsonl; fi
    "$ROLLOUT" coordinator --config "$cfg" --history "$history" >/dev/null 2>"$dir/coordinator.log" &
    pids=($!)
    for w in w1 w2; do
        if [[ -n $history_dir ]]; then history=$history_dir/$w.jsonl; fi
        "$ROLLOUT" worker --config "$cfg" --id "$w" --slots 1024 --history "$history" >/dev/null 2>"$dir/$w.log" &
        pids+=($!)
    done
    wait_active "$cfg" 2 "$what"
}

# (Each run below is a process substitution, a subshell of its own: its processes are
# stopped when it ends, however it ends, and none holds its output pipe open.)
rollout_run() {
    trap stop_pids EXIT
    local n=$1 dir=$tmp/rollout-$1${2:+-wal$2} cfg
    if [[ -n ${2:-} ]]; then export ROLLOUT_STORAGE__WAL_BYTES=$2; fi
    start_cluster "$dir" "" "rollout run $n"
    python3 - "$ROLLOUT" "$cfg" "$tmp/tasks.jsonl" "$TASKS" "$dir/submit.out" <<'PY' || die "rollout run $n: submit failed: $(tail -3 "$dir/submit.out")"
import subprocess, sys, time
rollout, cfg, tasks, n, out = sys.argv[1:6]
started = time.monotonic()
with open(out, "w") as f:
    subprocess.run([rollout, "submit", "--config", cfg, tasks], stdout=f, stderr=subprocess.STDOUT, check=True)
print("throughput %.0f" % (int(n) / (time.monotonic() - started)))
PY
    stop_pids
    pids=()
}

# One-task jobs, one after another, on a fresh cluster that keeps its histories:
# prints "latency_one <p50 ms> <p99 ms>".
rollout_latency_run() {
    trap stop_pids EXIT
    local n=$1 dir=$tmp/rollout-latency-$1${2:+-wal$2} cfg
    if [[ -n ${2:-} ]]; then export ROLLOUT_STORAGE__WAL_BYTES=$2; fi
    start_cluster "$dir" "$dir" "rollout latency run $n"
    mkdir -p "$dir/jobs"
    python3 - "$ROLLOUT" "$cfg" "$dir" "$SAMPLES" <<'PY' || die "rollout latency run $n failed"
import json, os, subprocess, sys
rollout, cfg, d, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
for i in range(n):
    # A file of its own each: the same file again would be the same job (its key).
    job = os.path.join(d, "jobs", "one-%d.jsonl" % i)
    with open(job, "w") as f:
        f.write('{"plugin":"echo","payload":"one-%d"}\n' % i)
    subprocess.run([rollout, "submit", "--config", cfg, "--json", job], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
PY
    stop_pids
    pids=()
    python3 - "$dir" "$SAMPLES" <<'PY' || die "rollout latency run $n: the histories do not pair up"
import json, os, sys
d, n = sys.argv[1], int(sys.argv[2])
accepted, started = {}, {}
for line in open(os.path.join(d, "coordinator.jsonl")):
    r = json.loads(line)
    if r.get("event") == "job_accepted":
        accepted["job-%s" % r["job"]] = r["wall_unix_us"]
for w in ("w1", "w2"):
    for line in open(os.path.join(d, w + ".jsonl")):
        r = json.loads(line)
        if r.get("event") == "task_started":
            job = r["task"].rsplit(".", 1)[0]
            started.setdefault(job, r["wall_unix_us"])
lat = sorted((started[j] - accepted[j]) / 1000 for j in accepted if j in started)
assert len(accepted) == n and len(lat) == n, ("jobs accepted", len(accepted), "started", len(lat), "of", n)
print("latency_one %.3f %.3f" % (lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]))
PY
}

declare -a redis_tp redis_one50 redis_one99 redis_load_rate redis_load50 redis_load99 rollout_tp rollout_one50 rollout_one99
declare -a log_tp log_one50 log_one99
for run in $(seq 1 "$RUNS"); do
    while read -r key a b c; do
        case $key in
            throughput) redis_tp+=("$a") ;;
            latency_one) redis_one50+=("$a"); redis_one99+=("$b") ;;
            latency_load) redis_load_rate+=("$a"); redis_load50+=("$b"); redis_load99+=("$c") ;;
        esac
    done < <(redis_run "$run")
    say "run $run: redis ${redis_tp[-1]} tasks/s"
    read -r _ tp < <(rollout_run "$run")
    rollout_tp+=("$tp")
    say "run $run: rollout ${rollout_tp[-1]} tasks/s"
    read -r _ p50 p99 < <(rollout_latency_run "$run")
    rollout_one50+=("$p50"); rollout_one99+=("$p99")
    say "run $run: rollout submit->start one at a time p50 $p50 ms, p99 $p99 ms"
    read -r _ tp < <(rollout_run "$run" 67108864)
    log_tp+=("$tp")
    read -r _ p50 p99 < <(rollout_latency_run "$run" 67108864)
    log_one50+=("$p50"); log_one99+=("$p99")
    say "run $run: rollout with its write-ahead log: ${log_tp[-1]} tasks/s, one at a time p50 $p50 ms, p99 $p99 ms"
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
r_tp=$(median "${redis_tp[@]}")
o_tp=$(median "${rollout_tp[@]}")
say "medians of $RUNS runs, $TASKS no-op tasks, 2 workers, durable results; fsync ${fsync_us} us on this disk"
say "  Redis $redis_version Streams, appendfsync always:  $r_tp tasks/s"
say "  rollout, real binaries (separate processes):  $o_tp tasks/s"
say "  ratio rollout/Redis: $(python3 -c "print('%.2f' % ($o_tp / $r_tp))")"
say "  Redis submit->start, one task at a time: p50 $(median "${redis_one50[@]}") ms, p99 $(median "${redis_one99[@]}") ms"
say "  Redis submit->start at 50% load ($(median "${redis_load_rate[@]}") tasks/s): p50 $(median "${redis_load50[@]}") ms, p99 $(median "${redis_load99[@]}") ms"
say "  rollout submit->start, one task at a time: p50 $(median "${rollout_one50[@]}") ms, p99 $(median "${rollout_one99[@]}") ms (from job_accepted)"
say "  (rollout at 50% load: make bench-e2e)"
l_tp=$(median "${log_tp[@]}")
l50=$(median "${log_one50[@]}")
say "  rollout with its write-ahead log (storage.wal_bytes = 64 MiB): $l_tp tasks/s, one at a time p50 $l50 ms, p99 $(median "${log_one99[@]}") ms"
say "  ratio with/without the log: throughput $(python3 -c "print('%.2f' % ($l_tp / $o_tp))"), one-at-a-time p50 $(python3 -c "print('%.2f' % ($l50 / $(median "${rollout_one50[@]}")))")"
ok=1
