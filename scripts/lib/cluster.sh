# Shared by the smoke, crash-test, big-payloads and bench-submit scripts (sourced, not run): the fast
# health settings of their test clusters, the config file built from them, and the
# scripts' output helpers. Set LOG_PREFIX (e.g. "smoke") before sourcing.

say() { echo "${LOG_PREFIX:-cluster}: $*"; }
die() {
    echo "${LOG_PREFIX:-cluster}: FAILED: $*" >&2
    exit 1
}
now_ms() { date +%s%3N; }
sleep_ms() { sleep "$(printf '%d.%03d' $(($1 / 1000)) $(($1 % 1000)))"; }

# Health settings (they must pass validate_cross_fields; `rollout plan` checks them).
HEARTBEAT_MS=200
SELF_FENCE_MS=800
FAILURE_TIMEOUT_MS=1000
SKEW_BUDGET_MS=100
SCAN_MS=100

# A free TCP port on loopback.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Prints the config of a test cluster on 127.0.0.1:$1 keeping everything under $2
# (tls/, data/): the health settings above, 50 ms..1 s reconnect and retry backoffs.
cluster_config() {
    local port=$1 dir=$2
    cat <<EOF
[health]
heartbeat_interval = "${HEARTBEAT_MS}ms"
worker_self_fence_timeout = "${SELF_FENCE_MS}ms"
coordinator_failure_timeout = "${FAILURE_TIMEOUT_MS}ms"
clock_skew_budget = "${SKEW_BUDGET_MS}ms"
failure_scan_interval = "${SCAN_MS}ms"

[transport]
listen_addr = "127.0.0.1:$port"
coordinator_addr = "127.0.0.1:$port"
tls_dir = "$dir/tls"
reconnect_backoff_initial = "50ms"
reconnect_backoff_max = "1s"

[storage]
data_dir = "$dir/data"

[tasks]
retry_backoff_initial = "50ms"
retry_backoff_max = "1s"

[metrics]
# Any free port (logged at start), so a test cluster never clashes with \`make run\`'s 9464.
listen_addr = "127.0.0.1:0"
EOF
}

# Waits (at most 60 s) until $2 workers of the cluster of config $1 are active, or dies
# naming $3.
wait_active() {
    local cfg=$1 n=$2 what=$3
    local deadline=$(($(now_ms) + 60000))
    until "$ROLLOUT" status --config "$cfg" --all --json 2>/dev/null | python3 -c '
import json, sys
try:
    workers = json.load(sys.stdin)["workers"]
except ValueError:
    sys.exit(1)
sys.exit(0 if sum(w["state"] == "active" for w in workers) >= int(sys.argv[1]) else 1)' "$n"; do
        (($(now_ms) < deadline)) || die "$what: the workers did not become active within 60s"
        sleep 0.05
    done
}

# The end of a test run's temp dir $tmp: removed when the run passed ($ok is 1) and $2
# (the value of the script's KEEP variable) is empty; otherwise the last lines of every
# log are shown and the dir is kept. $1 names the script in messages, $3 what is kept.
# Waits up to 10 s for `pid` to exit (it was sent SIGINT), then SIGKILLs it.
await_exit() {
    local pid=$1
    for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "${LOG_PREFIX:-cluster}: pid $pid ignored SIGINT for 10s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

# Stops one process (none if the argument is empty): SIGINT, so workers cancel their
# tasks and stop their sidecars and the coordinator commits; SIGKILL after 10 s.
stop_pid() {
    local pid=$1
    [[ -n $pid ]] || return 0
    kill -INT "$pid" 2>/dev/null || true
    await_exit "$pid"
}

# Stops every process in the global array `pids` the same way, all at once.
stop_pids() {
    local pid
    for pid in "${pids[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do await_exit "$pid"; done
    pids=()
}

finish_tmp() {
    local name=$1 keep=$2 what=$3
    if [[ $ok == 1 && -z $keep ]]; then
        rm -rf "$tmp"
    else
        local log
        for log in "$tmp"/*.log; do
            [[ -f $log ]] || continue
            echo "---- last lines of $log" >&2
            tail -n 15 "$log" >&2
        done
        echo "$name: kept $tmp ($what)" >&2
    fi
}
