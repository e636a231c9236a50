#!/usr/bin/env bash
# Conversion benchmarks: vmi against qemu-img (and `cp --sparse=always` as the floor) on the same
# inputs. Measured, not asserted: prints a table of median wall times over RUNS runs, the ratio
# vmi/qemu-img, output sizes (allocated bytes) and peak RSS. vmi's output is checked against the
# source with `qemu-img compare` (a wrong result reads MISMATCH instead of a time).
#
# Usage: bench/convert.sh                      # every case on every input
#        BENCH_SIZE_MIB=256 BENCH_CASES=raw-raw BENCH_INPUTS=zero,random,half bench/convert.sh
#
# Environment:
#   BENCH_SIZE_MIB   size of the synthetic inputs (default 1024)
#   BENCH_CASES      comma-separated case names (default: all; see CASES below)
#   BENCH_INPUTS     comma-separated inputs: zero, random, half, debian (default: all available)
#   BENCH_RUNS       runs per measurement (default 3; the median is reported)
#   BENCH_FLAGS      flags given to both tools (default "-m 16 -W")
#   BENCH_QEMU_FSYNC also time qemu-img followed by an fsync of its output (default 1): vmi makes
#                    its output durable before renaming it into place, qemu-img leaves it in the
#                    page cache, so this column is the like-for-like comparison
#   VMI              the vmi binary (default: target/release/vmi, built here with cargo --release)
#
# Inputs are cached under bench/cache/ (delete it to regenerate). The Debian 12 image (a ~2 GiB ext4
# file system holding a minimal Debian installed with debootstrap, built with `mkfs.ext4 -d`) is
# built only when debootstrap is available (as root, or through fakeroot + fakechroot).
# Times are with a warm page cache: the inputs were just written or read.
set -u

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cache="$here/cache"
out="$cache/out"
size_mib=${BENCH_SIZE_MIB:-1024}
runs=${BENCH_RUNS:-3}
flags=${BENCH_FLAGS:-"-m 16 -W"}
mkdir -p "$cache" "$out"

log() { printf '%s\n' "$*" >&2; }

# --- the vmi binary ----------------------------------------------------------------------------
# Build vmi in release once. Until the command line exists, fall back to the engine's own minimal
# front end (crates/vmi-convert/examples/convert.rs), which takes the same options.
vmi_label=vmi
if [ -z "${VMI:-}" ]; then
    vmi="$root/target/release/vmi"
    log "building vmi (release)..."
    (cd "$root" && cargo build --release -q -p vmi-cli) >&2 || true
else
    vmi=$VMI
fi
if [ -x "$vmi" ] && "$vmi" convert --help 2>&1 | grep -q -- '-O'; then
    vmi_cmd=("$vmi" convert)
else
    log "vmi convert not available; building the engine's example front end instead"
    if (cd "$root" && cargo build --release -q -p vmi-convert --example convert) >&2; then
        vmi_cmd=("$root/target/release/examples/convert")
        vmi_label="vmi(engine)"
    else
        log "could not build any vmi binary: vmi columns will read 'failed'"
        vmi_cmd=(false)
    fi
fi

# --- inputs ------------------------------------------------------------------------------------
make_zero() { # written zero bytes (not holes): exercises zero detection
    dd if=/dev/zero of="$1.tmp" bs=1M count="$size_mib" status=none && mv "$1.tmp" "$1"
}
make_random() {
    dd if=/dev/urandom of="$1.tmp" bs=1M count="$size_mib" status=none && mv "$1.tmp" "$1"
}
make_half() { # 1 MiB of random data, 1 MiB hole, repeated
    rm -f "$1.tmp" && truncate -s "${size_mib}M" "$1.tmp" || return 1
    local i=0
    while [ "$i" -lt "$size_mib" ]; do
        dd if=/dev/urandom of="$1.tmp" bs=1M count=1 seek="$i" conv=notrunc status=none || return 1
        i=$((i + 2))
    done
    mv "$1.tmp" "$1"
}
make_debian() { # a bootable-size ext4 image with a minimal Debian 12 inside
    command -v debootstrap >/dev/null || { log "debootstrap not installed: skipping the Debian input"; return 1; }
    command -v mkfs.ext4 >/dev/null || { log "mkfs.ext4 not installed: skipping the Debian input"; return 1; }
    local rootfs="$cache/debian12-rootfs"
    rm -rf "$rootfs"
    if [ "$(id -u)" = 0 ]; then
        debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >&2 || return 1
    elif command -v fakeroot >/dev/null && command -v fakechroot >/dev/null; then
        fakechroot fakeroot debootstrap --variant=fakechroot bookworm "$rootfs" \
            http://deb.debian.org/debian >&2 || return 1
    else
        log "debootstrap needs root (or fakeroot + fakechroot): skipping the Debian input"
        return 1
    fi
    rm -f "$1.tmp"
    mkfs.ext4 -q -F -L debian12 -d "$rootfs" "$1.tmp" 2G >&2 || return 1
    mv "$1.tmp" "$1" && rm -rf "$rootfs"
}

inputs=${BENCH_INPUTS:-zero,random,half,debian}
declare -a have_inputs=()
for name in ${inputs//,/ }; do
    case $name in
        debian) f="$cache/debian12.raw" ;;
        *) f="$cache/$name-${size_mib}M.raw" ;;
    esac
    if [ ! -f "$f" ]; then
        log "creating input $f"
        "make_$name" "$f" || { log "input $name unavailable"; continue; }
    fi
    have_inputs+=("$name=$f")
done

# Inputs in other formats, made once by qemu-img from the raw input (cached beside it).
derived() { # derived RAW FMT [qemu-img convert options...] -> path
    local raw=$1 fmt=$2 ext=$2
    shift 2
    local tag
    tag=$(printf '%s' "$*" | tr -c 'a-zA-Z0-9' '_')
    [ "$fmt" = vpc ] && ext=vhd
    local f="${raw%.raw}${tag:+.$tag}.$ext"
    if [ ! -f "$f" ]; then
        qemu-img convert -f raw -O "$fmt" "$@" "$raw" "$f.tmp" >&2 && mv "$f.tmp" "$f" || return 1
    fi
    printf '%s\n' "$f"
}

# --- measurement -------------------------------------------------------------------------------
# Cases: name | source format | how the source is derived from the raw input | output format | options
CASES=(
    "raw-raw|raw||raw|"
    "raw-qcow2|raw||qcow2|"
    "raw-qcow2-c|raw||qcow2|-c"
    "raw-qcow2-zstd|raw||qcow2|-c -o compression_type=zstd"
    "qcow2c-raw|qcow2|-c|raw|"
    "raw-vmdk-stream|raw||vmdk|-o subformat=streamOptimized"
    "qcow2-vmdk|qcow2||vmdk|"
    "raw-vhdx|raw||vhdx|"
    "raw-vhd|raw||vpc|"
    "vmdk-qcow2|vmdk||qcow2|"
)
wanted=${BENCH_CASES:-}

# time_it LABEL OUTFILE cmd... -> prints "median_seconds peak_rss_kib", or "failed"
time_it() {
    local dst=$1
    shift
    local i times=() rss=0 t m
    for ((i = 0; i < runs; i++)); do
        rm -rf "$dst" "$out"/.??* 2>/dev/null
        if ! /usr/bin/time -f '%e %M' -o "$out/time" "$@" >/dev/null 2>"$out/err"; then
            log "  failed: $* ($(tail -n 1 "$out/err"))"
            echo failed
            return
        fi
        read -r t m <"$out/time"
        times+=("$t")
        [ "$m" -gt "$rss" ] && rss=$m
    done
    printf '%s %s\n' "$(printf '%s\n' "${times[@]}" | sort -n | sed -n "$(((runs + 1) / 2))p")" "$rss"
}

alloc() { # allocated bytes of a file (0 when missing)
    [ -e "$1" ] && echo $(($(stat -c '%b * %B' "$1"))) || echo 0
}

human() { awk -v b="$1" 'BEGIN { printf "%.1fM", b / 1048576 }'; }

printf '# %s, %s, qemu-img %s, %s MiB synthetic inputs, %s runs (median), flags "%s"\n' \
    "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc) CPUs" \
    "$(qemu-img --version | head -n 1 | awk '{print $3}')" "$size_mib" "$runs" "$flags"
qemu_fsync=${BENCH_QEMU_FSYNC:-1}
row() { printf '%-16s %-8s %11s %9s %6s %10s %10s %9s %9s %9s\n' "$@"; }
row case input "$vmi_label" qemu-img ratio qemu+fsync vmi-out qemu-out vmi-rss qemu-rss
for entry in "${have_inputs[@]}"; do
    input=${entry%%=*}
    raw=${entry#*=}
    # The floor: a sparse-aware copy of the raw input.
    r=$(time_it "$out/cp.raw" cp --sparse=always "$raw" "$out/cp.raw")
    row "cp --sparse" "$input" "${r%% *}" - - - "$(human "$(alloc "$out/cp.raw")")" - "${r##* }K" -
    for c in "${CASES[@]}"; do
        IFS='|' read -r name sfmt sderive dfmt dopts <<<"$c"
        if [ -n "$wanted" ] && [[ ",$wanted," != *",$name,"* ]]; then continue; fi
        src=$raw
        if [ "$sfmt" != raw ]; then
            # shellcheck disable=SC2086
            src=$(derived "$raw" "$sfmt" $sderive) || {
                printf '%-16s %-8s %s\n' "$name" "$input" "failed (making the $sfmt input)"
                continue
            }
        fi
        ext=$dfmt
        [ "$dfmt" = vpc ] && ext=vhd
        # shellcheck disable=SC2086
        v=$(time_it "$out/vmi.$ext" "${vmi_cmd[@]}" -f "$sfmt" -O "$dfmt" $flags $dopts "$src" "$out/vmi.$ext")
        vsize=$(alloc "$out/vmi.$ext")
        # A fast wrong answer is no answer: check vmi's output against the source with qemu-img.
        if [ "${v%% *}" != failed ] && ! qemu-img compare -q -f "$sfmt" -F "$dfmt" "$src" "$out/vmi.$ext"; then
            log "  MISMATCH: vmi's $name output differs from the source"
            v="MISMATCH ${v##* }"
        fi
        # shellcheck disable=SC2086
        q=$(time_it "$out/qemu.$ext" qemu-img convert -f "$sfmt" -O "$dfmt" $flags $dopts "$src" "$out/qemu.$ext")
        qsize=$(alloc "$out/qemu.$ext")
        qs=-
        if [ "$qemu_fsync" = 1 ]; then
            # shellcheck disable=SC2086
            qs=$(time_it "$out/qemu.$ext" bash -c '"$@" && sync "${@: -1}"' _ \
                qemu-img convert -f "$sfmt" -O "$dfmt" $flags $dopts "$src" "$out/qemu.$ext")
            qs=${qs%% *}
        fi
        vt=${v%% *}
        qt=${q%% *}
        ratio=-
        if [ "$vt" != failed ] && [ "$vt" != MISMATCH ] && [ "$qt" != failed ]; then
            ratio=$(awk -v a="$vt" -v b="$qt" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }')
        fi
        vrss=-
        qrss=-
        [ "$vt" != failed ] && vrss="${v##* }K"
        [ "$qt" != failed ] && qrss="${q##* }K"
        [ "$vt" = failed ] && vsize=0
        [ "$vt" = MISMATCH ] && ratio=-
        row "$name" "$input" "$vt" "$qt" "$ratio" "$qs" "$(human "$vsize")" "$(human "$qsize")" \
            "$vrss" "$qrss"
        rm -f "$out"/vmi.* "$out"/qemu.*
    done
    rm -f "$out/cp.raw"
done
