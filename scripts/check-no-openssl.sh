#!/usr/bin/env bash
# TLS is rustls with the ring provider everywhere: nothing in the workspace's dependency
# graph (any feature, build and dev dependencies included) may link OpenSSL or a
# native TLS stack. Fails (exit 1) naming each offender and who pulls it in.
set -euo pipefail
cd "$(dirname "$0")/.."

forbidden='openssl-sys|openssl|openssl-src|native-tls|tokio-native-tls|hyper-tls'
tree=$(cargo tree --workspace --all-features -e normal,build,dev --prefix none 2>/dev/null | awk '{print $1}' | sort -u)
if [ -z "$tree" ]; then
    echo "no-openssl: cargo tree printed nothing; cannot check" >&2
    exit 1
fi
if hits=$(echo "$tree" | grep -xE "$forbidden"); then
    for crate in $hits; do
        echo "no-openssl: $crate is in the dependency graph, pulled in by:" >&2
        cargo tree --workspace --all-features -e normal,build,dev -i "$crate" >&2 || true
    done
    exit 1
fi
echo "no-openssl: no OpenSSL or native TLS crate in the dependency graph (rustls + ring only)"
