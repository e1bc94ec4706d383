#!/usr/bin/env bash
# Checks what building and running rollout needs: cargo, make, a C linker, python3 >= 3.11
# (the Python plugin SDK and the sidecar plugins). Says whether protoc is present; it is
# not needed (the wire schema compiles with protox). Exits 1 naming everything missing.
#
#   scripts/preflight.sh            # PYTHON=/path/to/python3 to check another interpreter
set -uo pipefail

python=${PYTHON:-python3}
missing=()

have() { command -v "$1" >/dev/null 2>&1; }

if have cargo; then
    echo "preflight: cargo   ok ($(cargo --version))"
else
    missing+=("cargo (the Rust toolchain: https://rustup.rs)")
fi
if have make; then
    echo "preflight: make    ok ($(make --version | head -n 1))"
else
    missing+=("make")
fi
if have cc || have gcc; then
    echo "preflight: cc      ok (linker for Rust binaries)"
else
    missing+=("cc/gcc (a C toolchain: Rust uses it to link)")
fi
if have "$python"; then
    version=$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || echo "?")
    if "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
        echo "preflight: python  ok ($python $version)"
        if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
            missing+=("the venv/ensurepip modules of $python (e.g. apt-get install python3-venv): scripts/python-venv.sh needs them")
        fi
    else
        missing+=("python3 >= 3.11 ($python is $version; set PYTHON=/path/to/python3.11+)")
    fi
else
    missing+=("python3 >= 3.11 ($python not found; set PYTHON=/path/to/python3.11+)")
fi
if have protoc; then
    echo "preflight: protoc  present ($(protoc --version)); not needed, the schema compiles with protox"
else
    echo "preflight: protoc  absent; not needed, the schema compiles with protox"
fi

if ((${#missing[@]})); then
    for m in "${missing[@]}"; do echo "preflight: MISSING $m" >&2; done
    exit 1
fi
echo "preflight: ok"
