#!/usr/bin/env bash
# Compatibility test: OpenStack Tempest's image API v2 suite (the tests Glance itself is held to)
# against a running vmi registry, with vmi as the Keystone v3 endpoint too.
#
# The script starts `vmi serve` on loopback with a fresh data directory, creates the accounts
# Tempest's pre-provisioned credentials need through the Keystone-compatible API (an admin, a
# member and a reader in each of two projects, a member of a third project), serves a small image
# over a loopback HTTP server for web-download (allowed by the registry's import filter, which
# refuses loopback otherwise), writes tempest.conf, runs
# `tempest run --regex tempest.api.image.v2 --concurrency 1` and fails on any failed test.
#
# Usage (from anywhere):  bash crates/vmi-registry/tests/tempest.sh
# Environment:
#   VMI_SERVE  command that runs `vmi serve` (default: the `vmi` binary, built here)
#   VENV       virtualenv for Tempest (default: target/tempest-venv; created if missing)
#   PORT       registry port (default: 19494); PORT+1 serves the web-download source
#   REGEX      tests to run (default: tempest.api.image.v2)
#   KEEP       when set, the work directory (logs, tempest.conf) is kept and printed
set -euo pipefail

root=$(cd "$(dirname "$0")/../../.." && pwd)
venv=${VENV:-$root/target/tempest-venv}
port=${PORT:-19494}
web_port=$((port + 1))
url="http://127.0.0.1:$port"
regex=${REGEX:-tempest.api.image.v2}

if [ ! -x "$venv/bin/tempest" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'tempest==47.0.0'
fi
if [ -z "${VMI_SERVE:-}" ]; then
    (cd "$root" && cargo build -q -p vmi-cli)
    VMI_SERVE="${CARGO_TARGET_DIR:-$root/target}/debug/vmi serve"
fi

work=$(mktemp -d)
server=
web=
cleanup() {
    local pid
    for pid in $server $web; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "${KEEP:-}" ]; then
        echo "work directory kept: $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# Two file stores (so the multi-store tests, copy-image among them, run), and web-download from
# the loopback source only.
cat >"$work/vmi.toml" <<EOF
[import.filtering]
allowed_schemes = ["http"]
allowed_hosts = ["127.0.0.1"]
allowed_networks = ["127.0.0.1/32"]
allowed_ports = [$web_port]

EOF

admin_token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
VMI_ADMIN_PASSWORD=adminpw VMI_ADMIN_TOKEN=$admin_token \
    $VMI_SERVE --config "$work/vmi.toml" --data-dir "$work/data" --listen "127.0.0.1:$port" \
    >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 100); do
    curl -s -o /dev/null "$url/versions" && break
    sleep 0.1
done

# The web-download source: a small image on a loopback HTTP server.
mkdir "$work/www"
head -c $((1 << 20)) /dev/urandom >"$work/www/image.raw"
qemu-img create -q -f qcow2 "$work/www/image.qcow2" 64M
"$venv/bin/python" -m http.server --bind 127.0.0.1 --directory "$work/www" "$web_port" \
    >"$work/web.log" 2>&1 &
web=$!

# Accounts over the Keystone-compatible API.
api() { curl -sf -H "X-Auth-Token: $admin_token" -H 'Content-Type: application/json' "$@"; }
json_id() { "$venv/bin/python" -c "import json,sys; print(json.load(sys.stdin)['$1']['id'])"; }
project() { api -X POST "$url/v3/projects" -d "{\"project\": {\"name\": \"$1\"}}" | json_id project; }
user() { # user NAME PROJECT_ID ROLE
    local uid
    uid=$(api -X POST "$url/v3/users" -d "{\"user\": {\"name\": \"$1\", \"password\": \"$1-pw\",
        \"default_project_id\": \"$2\"}}" | json_id user)
    api -X PUT "$url/v3/projects/$2/users/$uid/roles/$3"
}
p1=$(project tempest-one)
p2=$(project tempest-two)
p3=$(project tempest-three)
user one-member "$p1" member
user one-reader "$p1" reader
user two-member "$p2" member
user two-reader "$p2" reader
user three-member "$p3" member

# Tempest hands out "alt" credentials in file order, "primary" and "project_reader" from the
# project with the most roles: the third project's member comes first so that alt is never in
# the primary project.
cat >"$work/accounts.yaml" <<EOF
- username: three-member
  project_name: tempest-three
  password: three-member-pw
  roles: [member]
- username: admin
  project_name: admin
  password: adminpw
  roles: [admin]
- username: one-member
  project_name: tempest-one
  password: one-member-pw
  roles: [member]
- username: one-reader
  project_name: tempest-one
  password: one-reader-pw
  roles: [reader]
- username: two-member
  project_name: tempest-two
  password: two-member-pw
  roles: [member]
- username: two-reader
  project_name: tempest-two
  password: two-reader-pw
  roles: [reader]
EOF

"$venv/bin/tempest" init --workspace-path "$work/workspaces.yaml" --name vmi "$work/tempest" >/dev/null
cat >"$work/tempest/etc/tempest.conf" <<EOF
[DEFAULT]
log_dir = $work
log_file = tempest.log

[oslo_concurrency]
lock_path = $work/locks

[auth]
use_dynamic_credentials = false
test_accounts_file = $work/accounts.yaml
default_credentials_domain_name = Default
create_isolated_networks = false
admin_username = admin
admin_password = adminpw
admin_project_name = admin
admin_domain_name = Default

[identity]
uri_v3 = $url/v3
auth_version = v3
region = RegionOne
v3_endpoint_type = public

[identity-feature-enabled]
security_compliance = false

[service_available]
glance = true
nova = false
neutron = false
cinder = false
swift = false

[image]
endpoint_type = public
http_image = http://127.0.0.1:$web_port/image.raw
http_qcow2_image = http://127.0.0.1:$web_port/image.qcow2
build_timeout = 60

[image-feature-enabled]
import_image = true
os_glance_reserved = true
manage_locations = false
image_caching_enabled = false

[validation]
run_validation = false
EOF

echo "tempest $("$venv/bin/tempest" --version 2>&1 | awk '{print $NF}') against vmi at $url: $regex"
set +e
(cd "$work/tempest" && "$venv/bin/tempest" run --regex "$regex" --concurrency 1) \
    >"$work/run.log" 2>&1
rc=$?
set -e
grep -E '^\{0\} |^tempest\.' "$work/run.log" | grep -E '\.\.\. (ok|FAILED|SKIPPED)' \
    | sed -E 's/^\{0\} //' || true
sed -n '/^======/,$p' "$work/run.log" | grep -E '^ - (Passed|Failed|Skipped)|^Totals' || true
passed=$(sed -nE 's/^ - Passed: ([0-9]+)/\1/p' "$work/run.log" | tail -1)
failed=$(sed -nE 's/^ - Failed: ([0-9]+)/\1/p' "$work/run.log" | tail -1)
skipped=$(sed -nE 's/^ - Skipped: ([0-9]+)/\1/p' "$work/run.log" | tail -1)
echo "tempest image v2: ${passed:-0} passed, ${failed:-?} failed, ${skipped:-0} skipped"
if [ "$rc" -ne 0 ] || [ "${failed:-1}" != 0 ] || [ "${passed:-0}" = 0 ]; then
    echo "--- failures"
    sed -n '/^==============================$/,/^======$/p' "$work/run.log" | tail -200
    echo "--- server log"
    tail -30 "$work/serve.log"
    exit 1
fi
exit 0
