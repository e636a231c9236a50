#!/usr/bin/env bash
# Runs the registry's API test suite on PostgreSQL: starts a throwaway PostgreSQL cluster on
# 127.0.0.1 (Debian's postgresql package: `apt-get install postgresql`), then runs
# `tests/api.rs` and `tests/signing.rs` with the `postgres` feature, each test on a fresh
# database, plus the two-node test. The cluster has TLS on (`ssl=on`) with a certificate for
# localhost issued by a throwaway CA made here with openssl, so the signing suite also checks
# `sslmode=verify-full|require|disable` against it; the other tests connect with the default
# `sslmode=prefer`, i.e. over TLS. `tests/lifecycle.rs` runs as well (two-node lease tests). A
# role `vmi_cert` logs in with a client certificate only (`cert` in pg_hba.conf; the server
# trusts the same CA), for the `sslcert`/`sslkey` test.
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
# A throwaway CA; it issues the server's certificate (localhost, 127.0.0.1) and a client
# certificate for role vmi_cert, which may log in over TLS with a certificate only (`cert` in
# pg_hba.conf, the first matching line).
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
openssl req -x509 "${ec[@]}" -days 2 -keyout "$dir/ca.key" -out "$dir/ca.crt" \
    -subj /CN=vmi-test-ca 2>/dev/null
issue() { # issue NAME CN EXTENSIONS: NAME.key and NAME.crt (X.509 v3) from the CA
    openssl req "${ec[@]}" -keyout "$dir/$1.key" -out "$dir/$1.csr" -subj "/CN=$2" 2>/dev/null
    printf '%b' "$3" >"$dir/$1.ext"
    openssl x509 -req -in "$dir/$1.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 2 -extfile "$dir/$1.ext" -out "$dir/$1.crt" 2>/dev/null
    chmod 600 "$dir/$1.key"
}
issue server localhost 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n'
issue client vmi_cert 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n'
if [ "$(id -u)" = 0 ]; then
    chown postgres "$dir/server.key" "$dir/server.crt"
fi
sed -i '1i hostssl all vmi_cert all cert' "$dir/data/pg_hba.conf"
"${as[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c ssl=on \
        -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key \
        -c ssl_ca_file=$dir/ca.crt" start >/dev/null
cleanup() {
    "${as[@]}" "$pg_bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT
"$pg_bin/psql" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres \
    -c "CREATE ROLE vmi_cert LOGIN" -c "CREATE DATABASE vmi_cert OWNER vmi_cert" >/dev/null
cd "$root"
VMI_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port" \
VMI_TEST_POSTGRES_TLS_URL="postgres://postgres@localhost:$port" \
VMI_TEST_POSTGRES_TLS_ROOT="$dir/ca.crt" \
VMI_TEST_POSTGRES_CERT_URL="postgres://vmi_cert@localhost:$port/vmi_cert" \
VMI_TEST_POSTGRES_CLIENT_CERT="$dir/client.crt" \
VMI_TEST_POSTGRES_CLIENT_KEY="$dir/client.key" \
VMI_TEST_POSTGRES_SOCKET="host=$dir port=$port" \
    cargo test -p vmi-registry --features postgres --test api --test signing --test lifecycle \
        --test hardening \
        --test import --test lineage
