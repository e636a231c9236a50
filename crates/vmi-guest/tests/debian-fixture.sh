#!/usr/bin/env bash
# Builds the Debian 12 minbase tree the guest tests inspect, once, as a tar at a fixed path
# (VMI_TEST_DEBIAN_TAR, default /var/cache/vmi-test/debian-bookworm-minbase.tar). Needs root and
# debootstrap; the mirror is the one apt is configured with.
set -euo pipefail
out="${VMI_TEST_DEBIAN_TAR:-/var/cache/vmi-test/debian-bookworm-minbase.tar}"
[ -s "$out" ] && exit 0
mirror=$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | head -1 | grep -oE 'https?://[^ ]+' || true)
mirror="${mirror:-http://deb.debian.org/debian}"
mkdir -p "$(dirname "$out")"
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
debootstrap --variant=minbase bookworm "$tree" "$mirror" >"$tree.log" 2>&1 || { tail -20 "$tree.log"; exit 1; }
rm -f "$tree.log"
tar -C "$tree" --numeric-owner -cf "$out.tmp" .
mv "$out.tmp" "$out"
