#!/usr/bin/env bash
# Runs the registry's API test suite on PostgreSQL: starts a throwaway PostgreSQL cluster on
# 127.0.0.1 (Debian's postgresql package: `apt-get install postgresql`), then runs
# `tests/api.rs` with the `postgres` feature, each test on a fresh database, plus the two-node
# test.
#
# Usage: bash crates/vmi-registry/tests/postgres.sh
# Environment: PG_BIN (default: the newest /usr/lib/postgresql/*/bin), PORT (default 19696)
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
port=${PORT:-19696}
pg_bin=${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
    echo "PostgreSQL server binaries not found (apt-get install postgresql, or set PG_BIN)" >&2
    exit 1
fi
dir=$(mktemp -d)
as=()
if [ "$(id -u)" = 0 ]; then
    # initdb refuses to run as root.
    chown postgres "$dir"
    as=(runuser -u postgres --)
fi
"${as[@]}" "$pg_bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null
"${as[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
cleanup() {
    "${as[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
cd "$root"
VMI_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port" \
    cargo test -p vmi-registry --features postgres --test api
