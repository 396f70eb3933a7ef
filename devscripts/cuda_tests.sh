#!/usr/bin/env bash
# Runs gpupool's CUDA tests on a GPU machine that has no Rust toolchain, from prebuilt test
# binaries in devbin/.
#
#   devscripts/cuda_tests.sh build   # here, with cargo: builds the release test binaries of the
#                                    # gpupool crate, and the unit tests of the gpupool command
#                                    # (the CUDA driver peers live there), into devbin/
#   devscripts/cuda_tests.sh         # on the GPU machine, from the repository root
#
# The run mode executes every devbin/all-* binary (the integration-test binary, tests/all) with
# `--test-threads=1 --nocapture cuda`, then every devbin/gpupool-* binary (the library's unit
# tests), then every devbin/cli-* binary (the command's unit tests) with
# `--test-threads=1 --nocapture driver_peers`. The whole output goes to $OUT/cuda_tests.log ($OUT defaults to devbin/out). It exits
# non-zero when a binary fails, when no binary is found, or when a GPU is visible
# (nvidia-smi lists one) but a test printed "skipped: no CUDA driver": on the GPU machine a
# skipped test is a failure, not a pass.
set -u

cd "$(dirname "$0")/.." || exit 2
BIN_DIR=devbin

build() {
    command -v cargo >/dev/null 2>&1 || { echo "cargo not found" >&2; exit 2; }
    mkdir -p "$BIN_DIR"
    rm -f "$BIN_DIR"/all-* "$BIN_DIR"/gpupool-* "$BIN_DIR"/cli-*
    local executables
    executables=$(cargo test --release -p gpupool --features cuda-12080,prometheus,json --no-run --message-format=json 2>/dev/null \
        | grep -o '"executable":"[^"]*"' | sed 's/^"executable":"//; s/"$//') || true
    if [ -z "$executables" ]; then
        echo "cargo built no test executable; run 'cargo test --release -p gpupool --features cuda-12080,prometheus,json --no-run' to see why" >&2
        exit 1
    fi
    local exe name
    for exe in $executables; do
        name=$(basename "$exe")
        case "$name" in
            all-*|gpupool-*)
                cp "$exe" "$BIN_DIR/$name"
                # Symbols stay (backtraces name functions); DWARF goes, to keep the copy small.
                if command -v strip >/dev/null 2>&1; then
                    strip --strip-debug "$BIN_DIR/$name" 2>/dev/null || true
                fi
                echo "devbin: $name ($(du -h "$BIN_DIR/$name" | cut -f1))"
                ;;
        esac
    done
    # The command's unit tests (binary `gpupool`, so its test executable is also gpupool-*):
    # copied as cli-gpupool-*, so that the run mode can tell it from the library's.
    executables=$(cargo test --release -p gpupool-cli --bin gpupool --no-run --message-format=json 2>/dev/null \
        | grep -o '"executable":"[^"]*"' | sed 's/^"executable":"//; s/"$//') || true
    if [ -z "$executables" ]; then
        echo "cargo built no test executable of the command; run 'cargo test --release -p gpupool-cli --bin gpupool --no-run' to see why" >&2
        exit 1
    fi
    for exe in $executables; do
        name=cli-$(basename "$exe")
        cp "$exe" "$BIN_DIR/$name"
        if command -v strip >/dev/null 2>&1; then
            strip --strip-debug "$BIN_DIR/$name" 2>/dev/null || true
        fi
        echo "devbin: $name ($(du -h "$BIN_DIR/$name" | cut -f1))"
    done
}

run() {
    local out_dir=${OUT:-$BIN_DIR/out}
    mkdir -p "$out_dir"
    local log=$out_dir/cuda_tests.log
    : >"$log"

    local gpu=no
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        gpu=yes
    fi
    {
        echo "== cuda_tests.sh on $(hostname) at $(date -u '+%Y-%m-%dT%H:%M:%SZ')"
        if [ "$gpu" = yes ]; then
            nvidia-smi -L
            nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
        else
            echo "no GPU visible (nvidia-smi missing or lists none)"
        fi
    } 2>&1 | tee -a "$log"

    local failures=0 binaries=0 bin status
    local -a summary=()
    for bin in "$BIN_DIR"/all-* "$BIN_DIR"/gpupool-* "$BIN_DIR"/cli-*; do
        [ -f "$bin" ] && [ -x "$bin" ] || continue
        binaries=$((binaries + 1))
        case "$(basename "$bin")" in
            all-*) set -- --test-threads=1 --nocapture cuda ;;
            cli-*) set -- --test-threads=1 --nocapture driver_peers ;;
            *) set -- --test-threads=1 ;;
        esac
        echo "== $bin $*" | tee -a "$log"
        RUST_BACKTRACE=1 "$bin" "$@" 2>&1 | tee -a "$log"
        status=${PIPESTATUS[0]}
        if [ "$status" -ne 0 ]; then
            failures=$((failures + 1))
            summary+=("FAIL $(basename "$bin") (exit $status)")
        else
            summary+=("ok   $(basename "$bin")")
        fi
    done

    local skipped
    skipped=$(grep -c 'skipped: no CUDA driver' "$log")
    {
        echo "== summary"
        if [ "$binaries" -eq 0 ]; then
            echo "no test binary in $BIN_DIR/ (expected all-*, gpupool-* and cli-*; build them with: devscripts/cuda_tests.sh build)"
        fi
        local line
        for line in "${summary[@]}"; do
            echo "$line"
        done
        grep -E '^test result:' "$log" || true
        echo "tests that skipped for lack of a driver: $skipped"
        if [ "$gpu" = yes ] && [ "$skipped" -gt 0 ]; then
            echo "FAIL: a GPU is visible but $skipped test(s) found no CUDA driver"
        fi
        echo "log: $log"
    } 2>&1 | tee -a "$log"

    if [ "$binaries" -eq 0 ] || [ "$failures" -gt 0 ]; then
        exit 1
    fi
    if [ "$gpu" = yes ] && [ "$skipped" -gt 0 ]; then
        exit 1
    fi
    exit 0
}

case "${1:-run}" in
    build) build ;;
    run) run ;;
    *) echo "usage: $0 [build|run]" >&2; exit 2 ;;
esac
