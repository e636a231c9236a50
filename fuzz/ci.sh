#!/usr/bin/env bash
# CI: a bounded fuzzing run of every target in fuzz/Cargo.toml, starting from the committed
# corpus. Fails on any crash, timeout or out-of-memory, printing the reproducer's path and its
# base64 (paste it into `base64 -d > crash` and run `cargo fuzz run TARGET crash` to reproduce).
#
#   fuzz/ci.sh [TARGET...]     FUZZ_CI_SECONDS=20 per target by default
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

secs="${FUZZ_CI_SECONDS:-20}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(fuzz_targets)

ensure_cargo_fuzz
fuzz_build
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
failed=()
printf '%-12s %12s %8s\n' target executions seconds
for t in "${targets[@]}"; do
    # New inputs go to a scratch directory: the committed corpus is only read.
    mkdir -p "$out/$t/corpus" "$out/$t/crash"
    mkdir -p "$FUZZ_DIR/corpus/$t"
    rc=0
    # shellcheck disable=SC2046
    "$(fuzz_bin "$t")" $(fuzz_opts "$t") -max_total_time="$secs" -print_final_stats=1 \
        -artifact_prefix="$out/$t/crash/" "$out/$t/corpus" "$FUZZ_DIR/corpus/$t" \
        >"$out/$t/log" 2>&1 || rc=$?
    runs=$(awk '/^stat::number_of_executed_units/ { print $NF }' "$out/$t/log" | tail -1)
    printf '%-12s %12s %8s\n' "$t" "${runs:-?}" "$secs"
    if [ $rc -ne 0 ] || [ -n "$(ls -A "$out/$t/crash")" ]; then
        failed+=("$t")
        echo "---- $t failed (exit $rc); the end of its log:"
        tail -40 "$out/$t/log"
        for f in "$out/$t/crash"/*; do
            [ -f "$f" ] || continue
            keep="$FUZZ_DIR/artifacts/$t/$(basename "$f")"
            mkdir -p "$(dirname "$keep")"
            cp "$f" "$keep"
            echo "---- reproducer: $keep ($(wc -c <"$f") bytes), base64:"
            base64 -w 76 "$f"
        done
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzzing found crashes in: ${failed[*]}"
    exit 1
fi
