#!/usr/bin/env bash
# Compatibility test: unmodified python-glanceclient and python-openstackclient against a running
# vmi registry, with token authentication (glance CLI, static API token) and password
# authentication (openstack CLI through /v3/auth/tokens and the service catalog).
#
# Steps: create, upload, list, show, set, download (checksum verified), share, accept,
# deactivate, reactivate, delete; then project, user and role administration with the openstack
# CLI (project create, user create --password, role add, role assignment list, role remove).
#
# Usage (from anywhere):  bash crates/vmi-registry/tests/glanceclient.sh
# Environment:
#   VMI_SERVE  command that runs `vmi serve` (default: the `vmi` binary, built here)
#   VENV       virtualenv for the clients (default: target/glanceclient-venv; created if missing)
#   PORT       port to listen on (default: 19393)
set -euo pipefail

root=$(cd "$(dirname "$0")/../../.." && pwd)
venv=${VENV:-$root/target/glanceclient-venv}
port=${PORT:-19393}
url="http://127.0.0.1:$port"

if [ ! -x "$venv/bin/glance" ] || [ ! -x "$venv/bin/openstack" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q python-glanceclient python-openstackclient
fi
if [ -z "${VMI_SERVE:-}" ]; then
    (cd "$root" && cargo build -q -p vmi-cli)
    VMI_SERVE="$root/target/debug/vmi serve"
fi

work=$(mktemp -d)
admin_token=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
VMI_ADMIN_PASSWORD=adminpw VMI_ADMIN_TOKEN=$admin_token \
    $VMI_SERVE --data-dir "$work/data" --listen "127.0.0.1:$port" >"$work/serve.log" 2>&1 &
server=$!
cleanup() {
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
for _ in $(seq 1 100); do
    curl -s -o /dev/null "$url/versions" && break
    sleep 0.1
done

passed=0
failed=0
step() {
    local name=$1
    shift
    if "$@" >"$work/step.out" 2>&1; then
        passed=$((passed + 1))
        echo "ok   $name"
    else
        failed=$((failed + 1))
        echo "FAIL $name"
        sed 's/^/     /' "$work/step.out" | tail -20
    fi
}

# Identity set-up over the Keystone-compatible API: project "beta" with member user "bob".
api() { curl -sf -H "X-Auth-Token: $admin_token" -H 'Content-Type: application/json' "$@"; }
beta=$(api -X POST "$url/v3/projects" -d '{"project": {"name": "beta"}}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["project"]["id"])')
bob=$(api -X POST "$url/v3/users" \
    -d "{\"user\": {\"name\": \"bob\", \"password\": \"bobpw\", \"default_project_id\": \"$beta\"}}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["user"]["id"])')
api -X PUT "$url/v3/projects/$beta/users/$bob/roles/member"
bob_token=$(curl -sf -D - -o /dev/null -H 'Content-Type: application/json' "$url/v3/auth/tokens" -d \
    '{"auth": {"identity": {"methods": ["password"], "password": {"user": {"name": "bob",
      "domain": {"name": "Default"}, "password": "bobpw"}}},
      "scope": {"project": {"name": "beta", "domain": {"name": "Default"}}}}}' |
    awk 'tolower($1) == "x-subject-token:" {print $2}' | tr -d '\r')

head -c $((8 << 20)) /dev/urandom >"$work/disk.raw"
want_md5=$(md5sum "$work/disk.raw" | cut -d' ' -f1)

# --- python-glanceclient with token authentication -------------------------------------------
# (image-create reads image data from a non-terminal stdin, so stdin is closed for it)
glance() { "$venv/bin/glance" --os-image-url "$url" --os-auth-token "$admin_token" "$@"; }
glance_bob() { "$venv/bin/glance" --os-image-url "$url" --os-auth-token "$bob_token" "$@"; }
field() { awk -v k="$1" -F'|' '{gsub(/ /, "", $2)} $2 == k {gsub(/^ +| +$/, "", $3); print $3}'; }

md5_of() { md5sum <"$1" | cut -d' ' -f1; }
g_listed() { glance image-list | grep -c "$1" >/dev/null; }
g_active() {
    [ "$(glance image-show "$1" | field status)" = active ] &&
        [ "$(glance image-show "$1" | field checksum)" = "$want_md5" ]
}
g_update() {
    glance image-update --property os_distro=debian --name renamed "$1" >/dev/null &&
        [ "$(glance image-show "$1" | field os_distro)" = debian ]
}
g_download() { glance image-download --file "$work/out.raw" "$1" && [ "$(md5_of "$work/out.raw")" = "$want_md5" ]; }
g_bob_lists() { glance_bob image-list | grep -c "$1" >/dev/null; }
g_bob_cannot_download() { ! glance_bob image-download --file "$work/x" "$1"; }
g_gone() { ! glance image-show "$1"; }

id=$(glance image-create --name glance-one --disk-format raw --container-format bare \
    --visibility shared <&- | field id)
step "glance image-create" test -n "$id"
step "glance image-upload" glance image-upload --file "$work/disk.raw" "$id"
step "glance image-list" g_listed "$id"
step "glance image-show (active, md5)" g_active "$id"
step "glance image-update --property" g_update "$id"
step "glance image-download (checksum)" g_download "$id"
step "glance member-create" glance member-create "$id" "$beta"
step "glance member-update accepted (by the member)" glance_bob member-update "$id" "$beta" accepted
step "glance image-list shows the accepted share" g_bob_lists "$id"
step "glance image-deactivate" glance image-deactivate "$id"
step "member download of a deactivated image is refused" g_bob_cannot_download "$id"
step "glance image-reactivate" glance image-reactivate "$id"
step "glance image-delete" glance image-delete "$id"
step "deleted image is gone" g_gone "$id"

# Interoperable import (stage + import, glance-direct) as glanceclient drives it.
# (the table wraps long values, so "glance-direct" may be split across lines)
g_import_info() {
    local out
    out=$(glance import-info) && grep -q web-download <<<"$out" && grep -q direct <<<"$out"
}
g_via_import() {
    local iid
    iid=$(glance image-create-via-import --name glance-direct-one --disk-format raw \
        --container-format bare --import-method glance-direct --file "$work/disk.raw" <&- |
        field id)
    [ -n "$iid" ] || return 1
    for _ in $(seq 1 100); do
        [ "$(glance image-show "$iid" | field status)" = active ] && break
        sleep 0.1
    done
    g_active "$iid" && glance image-delete "$iid"
}
step "glance import-info lists the import methods" g_import_info
step "glance image-create-via-import (glance-direct)" g_via_import

# --- openstack CLI with password authentication through /v3 --------------------------------
export OS_AUTH_URL="$url/v3" OS_USERNAME=admin OS_PASSWORD=adminpw OS_PROJECT_NAME=admin \
    OS_USER_DOMAIN_NAME=Default OS_PROJECT_DOMAIN_NAME=Default OS_IDENTITY_API_VERSION=3 \
    OS_IMAGE_API_VERSION=2 OS_REGION_NAME=RegionOne OS_INTERFACE=public
os() { "$venv/bin/openstack" "$@"; }
os_bob() { OS_USERNAME=bob OS_PASSWORD=bobpw OS_PROJECT_NAME=beta "$venv/bin/openstack" "$@"; }
o_listed() { os image list -f value -c ID | grep -c "$1" >/dev/null; }
o_active() {
    [ "$(os image show "$1" -f value -c status)" = active ] &&
        [ "$(os image show "$1" -f value -c checksum)" = "$want_md5" ]
}
o_save() { os image save --file "$work/osc.raw" "$1" && [ "$(md5_of "$work/osc.raw")" = "$want_md5" ]; }
o_bob_lists() { os_bob image list -f value -c ID | grep -c "$1" >/dev/null; }

step "openstack token issue" os token issue
oid=$(os image create --disk-format raw --container-format bare --file "$work/disk.raw" \
    --shared osc-one -f value -c id) || true
step "openstack image create --file" test -n "$oid"
step "openstack image list" o_listed "$oid"
step "openstack image show (active, md5)" o_active "$oid"
step "openstack image set --property" os image set --property hw_disk_bus=virtio --min-ram 128 "$oid"
step "openstack image save (checksum)" o_save "$oid"
step "openstack image add project" os image add project "$oid" "$beta"
step "openstack image set --accept (as the member)" os_bob image set --accept "$oid"
step "openstack image list (as the member)" o_bob_lists "$oid"
step "openstack image set --deactivate" os image set --deactivate "$oid"
step "openstack image set --activate" os image set --activate "$oid"
step "openstack image delete" os image delete "$oid"

# A missing image: "not found", never a 400 about the os_hidden=True lookup the client makes.
o_missing() {
    local out
    out=$(os image show no-such-image 2>&1) && return 1
    ! grep -qi 'os_hidden\|bad request' <<<"$out"
}
step "openstack image show of a missing image says not found" o_missing

# --- identity administration with the openstack CLI ---------------------------------------
o_assigned() { os role assignment list --project gamma --user carol --names -f value | grep -q member; }
o_carol_lists() {
    OS_USERNAME=carol OS_PASSWORD=carolpw OS_PROJECT_NAME=gamma "$venv/bin/openstack" image list
}
o_carol_refused() {
    ! OS_USERNAME=carol OS_PASSWORD=carolpw OS_PROJECT_NAME=gamma "$venv/bin/openstack" image list
}
step "openstack project create" os project create gamma
step "openstack project show" os project show gamma
step "openstack user create --password --project" \
    os user create --project gamma --password carolpw carol
step "openstack role add --project --user member" os role add --project gamma --user carol member
step "openstack role assignment list" o_assigned
step "the new user lists images in the new project" o_carol_lists
step "openstack role remove" os role remove --project gamma --user carol member
step "without a role the user's login is refused" o_carol_refused

# --- the same with `vmi admin` -----------------------------------------------------------------
vmi_bin=${VMI_SERVE% serve}
vadmin() { "$vmi_bin" admin --url "$url" --token "$admin_token" "$@"; }
v_user_create() { echo davepw | vadmin user create dave --project delta --password-stdin; }
v_assigned() { vadmin role list --project delta --user dave | grep -q 'delta  dave  reader'; }
v_dave_lists() {
    OS_USERNAME=dave OS_PASSWORD=davepw OS_PROJECT_NAME=delta "$vmi_bin" image --url "$url" list
}
step "vmi admin project create" vadmin project create delta
step "vmi admin user create --password-stdin" v_user_create
step "vmi admin role add" vadmin role add --project delta --user dave reader
step "vmi admin role list" v_assigned
step "the new reader lists images with vmi image" v_dave_lists
step "vmi admin role remove" vadmin role remove --project delta --user dave reader

echo "glanceclient compatibility: $passed passed, $failed failed"
if [ "$failed" -ne 0 ]; then
    echo "--- server log"; tail -30 "$work/serve.log"
    exit 1
fi
