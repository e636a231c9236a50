#!/usr/bin/env bash
# Long fuzzing runs: every target (or those named) for a time or execution budget each, JOBS
# targets at a time. A run that crashes is restarted until its budget is spent, so one finding does
# not end the campaign; reproducers are collected in fuzz/artifacts/<target>/. At the end the new
# inputs are merged back into fuzz/corpus/<target>/ (only those adding coverage) and a table of
# executions per target is printed and appended to fuzz/artifacts/campaign.tsv.
#
#   fuzz/campaign.sh [-t SECONDS] [-n EXECUTIONS] [-j JOBS] [--no-merge] [TARGET...]
#
# -t is the time per target (default 600), -n stops a target after that many executions (time
# still bounds it when both are given), -j defaults to FUZZ_JOBS (the CPU count).
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

secs=
runs=0
jobs=$FUZZ_JOBS
merge=1
while [ $# -gt 0 ]; do
    case "$1" in
    -t) secs=$2; shift 2 ;;
    -n) runs=$2; shift 2 ;;
    -j) jobs=$2; shift 2 ;;
    --no-merge) merge=0; shift ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) break ;;
    esac
done
[ -n "$secs" ] || secs=$([ "$runs" -gt 0 ] && echo 86400 || echo 600)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(fuzz_targets)

ensure_cargo_fuzz
fuzz_build
work="$CARGO_TARGET_DIR/campaign"
rm -rf "$work"
mkdir -p "$work"
touch "$work/.start"

# One target for its whole budget, restarting after crashes. Writes $work/$t/{runs,secs,crashes}.
run_target() {
    local t=$1 start now left total=0 rc n opts
    local dir="$work/$t" arts="$FUZZ_DIR/artifacts/$t/"
    mkdir -p "$dir/corpus" "$arts" "$FUZZ_DIR/corpus/$t"
    opts=$(fuzz_opts "$t")
    start=$(date +%s)
    while :; do
        now=$(date +%s)
        left=$((secs - (now - start)))
        [ $left -gt 0 ] || break
        local budget=()
        [ "$runs" -eq 0 ] || budget=(-runs=$((runs - total)))
        rc=0
        # shellcheck disable=SC2086
        "$(fuzz_bin "$t")" $opts -max_total_time=$left "${budget[@]}" -print_final_stats=1 \
            -artifact_prefix="$arts" "$dir/corpus" "$FUZZ_DIR/corpus/$t" >>"$dir/log" 2>&1 || rc=$?
        n=$(awk '/^stat::number_of_executed_units/ { print $NF }' "$dir/log" | tail -1)
        total=$((total + ${n:-0}))
        echo "== exit $rc after ${n:-0} executions" >>"$dir/log"
        [ $rc -ne 0 ] || break
        [ "$runs" -eq 0 ] || [ $total -lt "$runs" ] || break
    done
    echo $total >"$dir/runs"
    echo $(($(date +%s) - start)) >"$dir/secs"
}

pids=()
for t in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
    echo "fuzzing $t"
    run_target "$t" &
    pids+=($!)
done
wait "${pids[@]}"

if [ $merge = 1 ]; then
    for t in "${targets[@]}"; do
        # shellcheck disable=SC2046
        "$(fuzz_bin "$t")" -merge=1 $(fuzz_opts "$t") "$FUZZ_DIR/corpus/$t" "$work/$t/corpus" \
            >"$work/$t/merge.log" 2>&1 || echo "merging $t failed: see $work/$t/merge.log"
    done
fi

stamp=$(date -u +%Y-%m-%dT%H:%M:%SZ)
rev=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)
printf '%-12s %14s %8s %10s %8s\n' target executions seconds exec/s crashes
for t in "${targets[@]}"; do
    r=$(cat "$work/$t/runs") s=$(cat "$work/$t/secs")
    c=$(find "$FUZZ_DIR/artifacts/$t" -type f -newer "$work/.start" | wc -l)
    printf '%-12s %14s %8s %10s %8s\n' "$t" "$r" "$s" $((r / (s > 0 ? s : 1))) "$c"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$stamp" "$rev" "$t" "$r" "$s" "$c" >>"$FUZZ_DIR/artifacts/campaign.tsv"
done
if find "$FUZZ_DIR/artifacts" -type f ! -name campaign.tsv -newer "$work/.start" | grep -q .; then
    echo "new reproducers:"
    find "$FUZZ_DIR/artifacts" -type f ! -name campaign.tsv -newer "$work/.start"
fi
