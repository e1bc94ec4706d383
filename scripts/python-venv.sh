#!/usr/bin/env bash
# Creates ./.venv with the Python plugin SDK (python/, editable) and its dependencies
# (grpcio, protobuf; grpcio-tools for the schema check). Idempotent: when the venv is
# already set up for the current python/pyproject.toml it returns at once.
#
#   scripts/python-venv.sh            # uses python3 on PATH (>= 3.11)
#   PYTHON=/path/to/python3 scripts/python-venv.sh
#   ROLLOUT_VENV=/elsewhere scripts/python-venv.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${ROLLOUT_VENV:-$root/.venv}
python=${PYTHON:-python3}
stamp=$venv/.rollout-stamp

# What the venv was built from: change either and it is refreshed.
want=$(cat "$root/python/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)

ready() {
    [[ -f $stamp && $(cat "$stamp") == "$want" ]] &&
        "$venv/bin/python" -c 'import grpc, google.protobuf, grpc_tools, pytest, rollout_plugin, rollout_client' 2>/dev/null
}

if ready; then
    exit 0
fi

# Tests may call this from several processes at once: one builds, the others wait.
mkdir -p "$venv"
exec 9>"$venv/.rollout-lock"
flock 9
if ready; then
    exit 0
fi

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    echo "python-venv: $python is missing or older than 3.11; set PYTHON=/path/to/python3.11+" >&2
    exit 1
fi

echo "python-venv: setting up $venv" >&2
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet \
    grpcio protobuf grpcio-tools pytest -e "$root/python"
echo "$want" >"$stamp"
echo "python-venv: ready ($("$venv/bin/python" --version))" >&2
