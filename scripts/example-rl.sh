#!/usr/bin/env bash
# The RL example on a local cluster (what `make example-rl` runs): a coordinator and two
# workers serving the CartPole sidecar plugin (examples/rl/cartpole_plugin.py), then
# examples/rl/train.py improving a policy over ITERATIONS (default 30) iterations. Writes
# the learning curve to $OUT (default ./data/rl/learning_curve.png) and prints the time
# per iteration and what each worker ran. Everything else in a temp dir.
#
# Usage: scripts/example-rl.sh   (ROLLOUT=path/to/rollout, ITERATIONS, OUT, KEEP_RL=1)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
ROLLOUT=${ROLLOUT:-${CARGO_TARGET_DIR:-$HOME/.cache/rollout/target}/debug/rollout}
ITERATIONS=${ITERATIONS:-30}
OUT=${OUT:-$root/data/rl/learning_curve.png}
LOG_PREFIX=example-rl
source scripts/lib/cluster.sh

[[ -x $ROLLOUT ]] || die "no rollout binary at $ROLLOUT (run \`make build\` first, or set ROLLOUT)"
scripts/python-venv.sh || die "scripts/python-venv.sh failed"
PY=$root/.venv/bin/python
if ! "$PY" -c 'import numpy, matplotlib' 2>/dev/null; then
    say "installing numpy and matplotlib into ./.venv"
    if ! "$PY" -m pip install -q numpy matplotlib >/tmp/rollout-rl-pip.log 2>&1; then
        echo "example-rl: SKIPPED: pip install numpy matplotlib failed (see /tmp/rollout-rl-pip.log; no network?)" >&2
        exit 0
    fi
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/rollout-rl.XXXXXX")
cfg=$tmp/cluster.toml
pids=()
ok=0
on_exit() {
    stop_pids
    finish_tmp example-rl "${KEEP_RL:-}" "config, logs"
}
trap on_exit EXIT
trap 'exit 130' INT TERM

port=$(free_port)
ln -s "$root/examples/rl" "$tmp/rl"
cluster_config "$port" "$tmp" >"$cfg"
cat >>"$cfg" <<CFG

[[plugins]]
name = "cartpole"
mode = "sidecar"
script = "rl/cartpole_plugin.py"
python = "$PY"
startup_timeout = "30s"
CFG
"$ROLLOUT" certs init --config "$cfg" >/dev/null
for w in w1 w2; do "$ROLLOUT" certs issue --config "$cfg" --worker "$w" >/dev/null; done
"$ROLLOUT" coordinator --config "$cfg" --history /dev/null 2>"$tmp/coordinator.log" &
pids+=($!)
declare -A maddr=([w1]=127.0.0.1:$(free_port) [w2]=127.0.0.1:$(free_port))
for w in w1 w2; do
    "$ROLLOUT" worker --config "$cfg" --id "$w" --slots 4 --metrics-addr "${maddr[$w]}" --history /dev/null \
        2>"$tmp/$w.log" &
    pids+=($!)
done
wait_active "$cfg" 2 "example-rl"
say "cluster up: a coordinator and workers w1, w2 with the cartpole sidecar plugin"
mkdir -p "$(dirname "$OUT")"
"$PY" examples/rl/train.py --addr "127.0.0.1:$port" --tls-dir "$tmp/tls" --iterations "$ITERATIONS" --out "$OUT" \
    --worker-metrics "w1=${maddr[w1]},w2=${maddr[w2]}" || die "the policy did not improve (see above)"
ok=1
say "passed: the learning curve is in $OUT"
