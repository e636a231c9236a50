# Shared by seed.sh, ci.sh and campaign.sh (sourced, not run).
#
# Fuzzing runs on the stable toolchain: `cargo fuzz` with RUSTC_BOOTSTRAP=1 (it needs a few -Z
# flags) and, by default, no sanitizer (safe Rust already traps out-of-bounds accesses, and the
# builds keep overflow checks and debug assertions). FUZZ_SANITIZER=address selects ASan, whose
# runtime the stable toolchain ships; it costs a separate build and is slower.
#
# Environment:
#   FUZZ_TARGET_DIR  cargo target directory for instrumented builds (default: <repo>/target/fuzz-run;
#                    its own directory because the compiler flags differ from a normal build)
#   FUZZ_SANITIZER   none (default) or address
#   FUZZ_JOBS        parallel fuzzing processes (default: number of CPUs)
#   FUZZ_NO_BUILD    set to 1 to use the binaries already built

FUZZ_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$FUZZ_DIR/.." && pwd)
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$REPO_DIR/target/fuzz-run}"
FUZZ_SANITIZER="${FUZZ_SANITIZER:-none}"
FUZZ_JOBS="${FUZZ_JOBS:-$(nproc)}"

# Every fuzz target declared in Cargo.toml (the `name` of each `[[bin]]`), in file order.
fuzz_targets() {
    awk '/^\[\[bin\]\]/ { bin = 1; next }
         /^\[/ { bin = 0 }
         bin && /^name *=/ { gsub(/^name *= *"|".*$/, ""); print }' "$FUZZ_DIR/Cargo.toml"
}

# Install cargo-fuzz when it is missing.
ensure_cargo_fuzz() {
    command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked cargo-fuzz
}

# Build every target (or those given) with coverage instrumentation.
fuzz_build() {
    [ "${FUZZ_NO_BUILD:-0}" != 1 ] || return 0
    (cd "$FUZZ_DIR" && cargo fuzz build --sanitizer "$FUZZ_SANITIZER" "$@")
}

# The instrumented binary of a target.
fuzz_bin() {
    local triple
    triple=$(rustc -vV | awk '/^host:/ { print $2 }')
    echo "$CARGO_TARGET_DIR/$triple/release/$1"
}

# libFuzzer options for a target: VHDX needs room for qemu-img's smallest image (3 MiB: regions are
# 1 MiB aligned), everything else stays within libFuzzer's default 1 MiB.
fuzz_opts() {
    case "$1" in
    vhdx) echo "-max_len=$((4 << 20)) -rss_limit_mb=4096 -timeout=20" ;;
    *) echo "-max_len=$((1 << 20)) -rss_limit_mb=4096 -timeout=20" ;;
    esac
}
