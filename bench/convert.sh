#!/usr/bin/env bash
# Conversion benchmarks: vmi against qemu-img (and `cp --sparse=always` as the floor) on the same
# inputs. Measured, not asserted: prints a table of median wall and CPU (user + system) times over
# RUNS interleaved runs, the ratios vmi/qemu-img and vmi/cp, output sizes (allocated bytes) and
# their ratio, and peak RSS. Every case is timed twice per round: writing a new output file, and
# writing over the output the previous run left ("exists" columns; qemu-img then truncates and
# rewrites it, vmi replaces it). On a loaded machine the CPU times are the steadier measure; the
# wall times include waiting for a CPU. vmi's output is checked against the source with
# `qemu-img compare` (a wrong result reads MISMATCH instead of a time).
#
# Usage: bench/convert.sh                      # every case on every input
#        BENCH_SIZE_MIB=256 BENCH_CASES=raw-raw BENCH_INPUTS=zero,random,half bench/convert.sh
#
# Environment:
#   BENCH_SIZE_MIB   size of the synthetic inputs (default 1024)
#   BENCH_CASES      comma-separated case names (default: all; see CASES below)
#   BENCH_INPUTS     comma-separated inputs: zero, random, half, dense, debian (default: all
#                    available). dense: a 2 GiB ext4 file system holding ~1.1 GB of real files
#                    (`mkfs.ext4 -d /usr`, or a part of /usr when all of it does not fit)
#   BENCH_RUNS       runs per measurement (default 5; the median is reported). The runs of a case are
#                    interleaved (vmi, qemu-img, vmi, qemu-img, ...) so a load change on a shared
#                    machine hits both tools alike
#   BENCH_FLAGS      flags given to both tools (default "-m 16 -W")
#   BENCH_VMI_FLAGS  flags given to vmi instead of BENCH_FLAGS (default: BENCH_FLAGS). vmi's -m
#                    starts that many threads where qemu-img's -m sets requests in flight on one
#                    thread, so on a small machine vmi's best flags are "-W" (one worker per CPU)
#   BENCH_QEMU_FSYNC also time the durable variants (default 1): vmi with its default `-t writeback`
#                    (fsync before the rename) against qemu-img followed by `sync FILE`. The main
#                    columns run vmi with `-t unsafe`, which like qemu-img's default leaves the
#                    output in the page cache
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
runs=${BENCH_RUNS:-5}
flags=${BENCH_FLAGS:-"-m 16 -W"}
vflags=${BENCH_VMI_FLAGS:-$flags}
mkdir -p "$cache" "$out"

log() { printf '%s\n' "$*" >&2; }

# --- the vmi binary ----------------------------------------------------------------------------
# Build vmi in release once. Until the command line exists, fall back to the engine's own minimal
# front end (crates/vmi-convert/examples/convert.rs), which takes the same options.
vmi_label=vmi
if [ -z "${VMI:-}" ]; then
    vmi="${CARGO_TARGET_DIR:-$root/target}/release/vmi"
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
        vmi_cmd=("${CARGO_TARGET_DIR:-$root/target}/release/examples/convert")
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

make_dense() { # a 2 GiB ext4 file system full of real files (binaries, libraries, text)
    command -v mkfs.ext4 >/dev/null || { log "mkfs.ext4 not installed: skipping the dense input"; return 1; }
    rm -f "$1.tmp" && truncate -s 2G "$1.tmp" || return 1
    if mkfs.ext4 -q -F -d /usr "$1.tmp" >/dev/null 2>&1; then
        mv "$1.tmp" "$1"
        return
    fi
    # /usr is larger than the file system: ~1.1 GB of it (hard links, or copies across devices).
    local stage="$cache/dense-stage"
    rm -rf "$stage" && mkdir -p "$stage/lib" || return 1
    local d
    for d in /usr/bin /usr/share /usr/include; do
        cp -al "$d" "$stage/" 2>/dev/null || cp -a "$d" "$stage/" || return 1
    done
    cp -al /usr/lib/gcc "$stage/lib/" 2>/dev/null || cp -a /usr/lib/gcc "$stage/lib/" 2>/dev/null
    log "dense input: $(du -sh "$stage" | cut -f1) of /usr"
    rm -f "$1.tmp" && truncate -s 2G "$1.tmp" &&
        mkfs.ext4 -q -F -d "$stage" "$1.tmp" >&2 && mv "$1.tmp" "$1"
    local rc=$?
    rm -rf "$stage"
    return $rc
}

inputs=${BENCH_INPUTS:-zero,random,half,dense,debian}
declare -a have_inputs=()
for name in ${inputs//,/ }; do
    case $name in
        debian) f="$cache/debian12.raw" ;;
        dense) f="$cache/dense-ext4.raw" ;;
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

# run_once DST cmd... -> prints "wall_seconds cpu_seconds peak_rss_kib", or "failed". DST (and
# leftover temporary files) are removed first, unless KEEP_DST=1 (the "exists" runs).
run_once() {
    local dst=$1
    shift
    if [ "${KEEP_DST:-0}" = 1 ]; then
        rm -rf "$out"/.??* 2>/dev/null
    else
        rm -rf "$dst" "$out"/.??* 2>/dev/null
    fi
    if ! /usr/bin/time -f '%e %U %S %M' -o "$out/time" "$@" >/dev/null 2>"$out/err"; then
        log "  failed: $* ($(tail -n 1 "$out/err"))"
        echo failed
        return
    fi
    awk '{ printf "%s %.2f %s\n", $1, $2 + $3, $4 }' "$out/time"
}

median() { # numbers on stdin -> their median (or "failed" when any run failed)
    sort -n | awk '{ v[NR] = $1 } END {
        if (NR == 0) { print "failed"; exit }
        for (i = 1; i <= NR; i++) if (v[i] == "failed") { print "failed"; exit }
        print v[int((NR + 1) / 2)] }'
}

# Results of one tool over the runs of a case: files $out/res.<tag> with one "wall cpu rss" line
# per run. summary TAG -> "median_wall median_cpu max_rss"
summary() {
    local f="$out/res.$1"
    if grep -q failed "$f"; then
        echo "failed failed 0"
        return
    fi
    printf '%s %s %s\n' "$(cut -d' ' -f1 "$f" | median)" "$(cut -d' ' -f2 "$f" | median)" \
        "$(cut -d' ' -f3 "$f" | sort -n | tail -n 1)"
}

ratio() { # a b -> a/b with two decimals, or "-"
    awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 == a && b + 0 == b && b > 0) printf "%.2f", a / b; else print "-" }'
}

alloc() { # allocated bytes of a file (0 when missing)
    [ -e "$1" ] && echo $(($(stat -c '%b * %B' "$1"))) || echo 0
}

human() { awk -v b="$1" 'BEGIN { printf "%.1fM", b / 1048576 }'; }

printf '# %s, %s, load %s, qemu-img %s, %s MiB synthetic inputs, %s runs interleaved (median), flags "%s", vmi flags "%s"\n' \
    "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc) CPUs" "$(cut -d' ' -f1-3 /proc/loadavg)" \
    "$(qemu-img --version | head -n 1 | awk '{print $3}')" "$size_mib" "$runs" "$flags" "$vflags"
printf '# vmi runs with -t unsafe (no fsync, as qemu-img convert by default). new: output file absent;\n'
printf '# exists: written over the previous run'"'"'s output. /q: vmi/qemu-img, /cp: vmi/(cp --sparse=always);\n'
printf '# cpu: user+system seconds of the "new" runs; sync: vmi with its default -t writeback (fsync)\n'
printf '# against qemu-img followed by sync FILE; size: allocated bytes of the outputs, vmi/qemu-img\n'
qemu_fsync=${BENCH_QEMU_FSYNC:-1}
row() { printf '%-16s %-6s %6s %6s %5s %5s  %6s %6s %5s %5s  %5s %5s %5s  %6s %6s %5s  %8s %8s %6s  %7s %7s\n' "$@"; }
row case input new q-new /q /cp exist q-exist /q /cp v-cpu q-cpu /q sync q+sync /q vmi-out q-out size v-rss q-rss
kib() { case ${1:-} in '' | failed | 0) echo - ;; *) echo "$(($1 / 1024))M" ;; esac; }
for entry in "${have_inputs[@]}"; do
    input=${entry%%=*}
    raw=${entry#*=}
    # The floor: a sparse-aware copy of the raw input, to a new file and over an existing one (and
    # to a new file followed by sync).
    rm -f "$out"/res.*
    for ((i = 0; i < runs; i++)); do
        run_once "$out/cp.raw" cp --sparse=always "$raw" "$out/cp.raw" >>"$out/res.cp"
        KEEP_DST=1 run_once "$out/cp.raw" cp --sparse=always "$raw" "$out/cp.raw" >>"$out/res.cpx"
        run_once "$out/cp.raw" bash -c 'cp --sparse=always "$1" "$2" && sync "$2"' _ "$raw" \
            "$out/cp.raw" >>"$out/res.cps"
    done
    read -r ct cc cr <<<"$(summary cp)"
    read -r cxt _ _ <<<"$(summary cpx)"
    read -r cst _ _ <<<"$(summary cps)"
    row "cp --sparse" "$input" "$ct" - - - "$cxt" - - - "$cc" - - "$cst" - - \
        "$(human "$(alloc "$out/cp.raw")")" - - "$(kib "$cr")" -
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
        vdst="$out/vmi.$ext"
        qdst="$out/qemu.$ext"
        rm -f "$out"/res.*
        # Interleaved: every round times each command once, so load changes hit all of them. The
        # "exists" runs write over the output the "new" run just made.
        for ((i = 0; i < runs; i++)); do
            # shellcheck disable=SC2086
            run_once "$vdst" "${vmi_cmd[@]}" -f "$sfmt" -O "$dfmt" $vflags $dopts -t unsafe "$src" \
                "$vdst" >>"$out/res.vmi"
            # shellcheck disable=SC2086
            run_once "$qdst" qemu-img convert -f "$sfmt" -O "$dfmt" $flags $dopts "$src" "$qdst" \
                >>"$out/res.qemu"
            # shellcheck disable=SC2086
            KEEP_DST=1 run_once "$vdst" "${vmi_cmd[@]}" -f "$sfmt" -O "$dfmt" $vflags $dopts \
                -t unsafe "$src" "$vdst" >>"$out/res.vmix"
            # shellcheck disable=SC2086
            KEEP_DST=1 run_once "$qdst" qemu-img convert -f "$sfmt" -O "$dfmt" $flags $dopts \
                "$src" "$qdst" >>"$out/res.qemux"
            if [ "$qemu_fsync" = 1 ]; then
                # shellcheck disable=SC2086
                run_once "$vdst" "${vmi_cmd[@]}" -f "$sfmt" -O "$dfmt" $vflags $dopts "$src" "$vdst" \
                    >>"$out/res.vmis"
                # shellcheck disable=SC2086
                run_once "$qdst" bash -c '"$@" && sync "${@: -1}"' _ \
                    qemu-img convert -f "$sfmt" -O "$dfmt" $flags $dopts "$src" "$qdst" \
                    >>"$out/res.qemus"
            fi
        done
        read -r vt vc vr <<<"$(summary vmi)"
        read -r qt qc qr <<<"$(summary qemu)"
        read -r vxt _ vxr <<<"$(summary vmix)"
        read -r qxt _ _ <<<"$(summary qemux)"
        vst=- qst=-
        if [ "$qemu_fsync" = 1 ]; then
            read -r vst _ _ <<<"$(summary vmis)"
            read -r qst _ _ <<<"$(summary qemus)"
        fi
        [ "$vxr" != failed ] && [ "${vxr:-0}" -gt "${vr:-0}" ] 2>/dev/null && vr=$vxr
        vsize=$(alloc "$vdst")
        qsize=$(alloc "$qdst")
        # A fast wrong answer is no answer: check vmi's output against the source with qemu-img.
        if [ "$vt" != failed ] && ! qemu-img compare -q -f "$sfmt" -F "$dfmt" "$src" "$vdst"; then
            log "  MISMATCH: vmi's $name output differs from the source"
            vt=MISMATCH
        fi
        [ "$vt" = failed ] && vsize=0
        row "$name" "$input" "$vt" "$qt" "$(ratio "$vt" "$qt")" "$(ratio "$vt" "$ct")" \
            "$vxt" "$qxt" "$(ratio "$vxt" "$qxt")" "$(ratio "$vxt" "$cxt")" \
            "$vc" "$qc" "$(ratio "$vc" "$qc")" "$vst" "$qst" "$(ratio "$vst" "$qst")" \
            "$(human "$vsize")" "$(human "$qsize")" "$(ratio "$vsize" "$qsize")" \
            "$(kib "$vr")" "$(kib "$qr")"
        rm -f "$out"/vmi.* "$out"/qemu.*
    done
    rm -f "$out/cp.raw"
done
