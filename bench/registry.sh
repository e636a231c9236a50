#!/usr/bin/env bash
# Upload and download throughput of the vmi registry over loopback, measured with curl and
# printed in MB/s (10^6 bytes per second). The upload figure includes hashing (MD5, SHA-256,
# SHA-512), the safety inspection and the catalog update; the download streams from the
# local image store.
#
# Usage: bash bench/registry.sh
# Environment:
#   SIZE_MIB   image size (default 1024)
#   PROFILE    release (default), or dev: the dev profile with this crate at opt-level 3, which
#              reuses the dev build of the dependencies (they already build at opt-level 2)
#   PORT       port (default 19494)
#   BENCH_DIR  where the image file and the registry data go (default: a new temp dir)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
size_mib=${SIZE_MIB:-1024}
profile=${PROFILE:-release}
port=${PORT:-19494}
url="http://127.0.0.1:$port"
token=bench-token

case "$profile" in
release) (cd "$root" && cargo build -q --release -p vmi-registry --example serve); bin="$root/target/release/examples/serve" ;;
dev)
    (cd "$root" && cargo build -q --config 'profile.dev.package.vmi-registry.opt-level=3' \
        -p vmi-registry --example serve)
    bin="$root/target/debug/examples/serve"
    ;;
*) echo "PROFILE must be release or dev" >&2; exit 2 ;;
esac

work=${BENCH_DIR:-$(mktemp -d)}
mkdir -p "$work"
VMI_ADMIN_TOKEN=$token VMI_ADMIN_PASSWORD=bench "$bin" --data-dir "$work/data" \
    --listen "127.0.0.1:$port" >"$work/serve.log" 2>&1 &
server=$!
cleanup() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    [ -n "${BENCH_DIR:-}" ] || rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
    curl -s -o /dev/null "$url/versions" && break
    sleep 0.1
done

file="$work/bench.raw"
head -c $((size_mib << 20)) /dev/urandom >"$file"
bytes=$((size_mib << 20))

id=$(curl -sf -H "X-Auth-Token: $token" -H 'Content-Type: application/json' "$url/v2/images" \
    -d '{"name": "bench", "disk_format": "raw", "container_format": "bare"}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

mbps() { python3 -c "import sys; print(f'{$bytes / float(sys.argv[1]) / 1e6:.0f}')" "$1"; }

up=$(curl -sf -o /dev/null -w '%{time_total}' -X PUT -H "X-Auth-Token: $token" \
    -H 'Content-Type: application/octet-stream' -T "$file" "$url/v2/images/$id/file")
down=$(curl -sf -o /dev/null -w '%{time_total}' -H "X-Auth-Token: $token" \
    "$url/v2/images/$id/file")

want=$(md5sum <"$file" | cut -d' ' -f1)
got=$(curl -sf -H "X-Auth-Token: $token" "$url/v2/images/$id" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["checksum"])')
[ "$want" = "$got" ] || { echo "checksum mismatch: $got != $want" >&2; exit 1; }

echo "registry loopback, ${size_mib} MiB, profile $profile"
echo "upload:   $(mbps "$up") MB/s (${up}s, hashing md5+sha256+sha512)"
echo "download: $(mbps "$down") MB/s (${down}s)"
