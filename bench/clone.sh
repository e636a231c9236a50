#!/usr/bin/env bash
# Linked clone of a large image vs `qemu-img create -b`: wall-clock milliseconds (median of
# BENCH_RUNS runs). The source is a sparse qcow2 image of BENCH_SIZE (default 10G) with a little
# data at both ends; a linked clone writes a fixed handful of clusters whatever that size.
#
#   VMI=target/debug/vmi bench/clone.sh            # the binary to time (default: target/debug/vmi)
#   BENCH_SIZE=100G BENCH_RUNS=9 bench/clone.sh
set -euo pipefail

VMI=${VMI:-target/debug/vmi}
SIZE=${BENCH_SIZE:-10G}
RUNS=${BENCH_RUNS:-5}
[ -x "$VMI" ] || { echo "no vmi binary at $VMI (cargo build -p vmi-cli)" >&2; exit 1; }
VMI=$(realpath "$VMI")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

qemu-img create -q -f qcow2 src.qcow2 "$SIZE"
qemu-io -f qcow2 -c "write -P 0x5a 0 1M" -c "write -P 0xa5 -- -1M 1M" src.qcow2 >/dev/null 2>&1 ||
    qemu-io -f qcow2 -c "write -P 0x5a 0 1M" src.qcow2 >/dev/null

ms() { # run "$@" once, print elapsed milliseconds
    local t0 t1
    t0=$(date +%s%N)
    "$@" >/dev/null
    t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000000))
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

vmi_runs=() qemu_runs=()
for i in $(seq "$RUNS"); do
    rm -f "l$i.qcow2" "l$i.qcow2.vmi.json" "q$i.qcow2"
    vmi_runs+=("$(ms "$VMI" clone --linked src.qcow2 "l$i.qcow2")")
    qemu_runs+=("$(ms qemu-img create -q -f qcow2 -b src.qcow2 -F qcow2 "q$i.qcow2")")
done
qemu-img check -q "l1.qcow2"
qemu-img compare -q "l1.qcow2" src.qcow2

echo "# $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $(qemu-img --version | head -1), source $SIZE, $RUNS runs (median)"
printf '%-28s %8s %12s\n' case ms clone-bytes
printf '%-28s %8s %12s\n' "vmi clone --linked" "$(printf '%s\n' "${vmi_runs[@]}" | median)" "$(stat -c %s l1.qcow2)"
printf '%-28s %8s %12s\n' "qemu-img create -b" "$(printf '%s\n' "${qemu_runs[@]}" | median)" "$(stat -c %s q1.qcow2)"
