#!/usr/bin/env bash
# Runs the registry's tests with the S3 image store against a local S3 server (moto, from PyPI,
# in a virtualenv), listening on 127.0.0.1 only.
#
# Usage: bash crates/vmi-registry/tests/s3.sh
# Environment: VENV (default target/moto-venv), PORT (default 19595)
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
venv=${VENV:-$root/target/moto-venv}
port=${PORT:-19595}
if [ ! -x "$venv/bin/moto_server" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'moto[server]'
fi
log=$(mktemp)
"$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true; wait $server 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$port/" && break
    sleep 0.1
done
cd "$root"
VMI_TEST_S3_ENDPOINT="http://127.0.0.1:$port" AWS_EC2_METADATA_DISABLED=true \
    cargo test -p vmi-registry --features s3 --test api -- s3_ --nocapture
