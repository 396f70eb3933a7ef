#!/usr/bin/env bash
# ThreadSanitizer (issue 13): the gpupool library's unit tests and its integration tests
# (tests/all, which hold every multi-threaded test: the budget and the ownership checks under
# eight threads, the stream-safety stress, the last handle racing buffer drops, trims racing
# mappings, the maintenance thread, the stress module), built with `-Zsanitizer=thread` and
# run; any data race TSan sees fails the run (TSan's exit code 66).
#
#   devscripts/sanitize.sh                       # from anywhere; about 6 minutes on 2 cores
#   devscripts/sanitize.sh stream_safety core::  # only the integration tests these name
#
# - `-Zbuild-std` rebuilds std with the sanitizer: an uninstrumented std hides the
#   happens-before edges of its own locks and atomics from TSan (false reports), and std's
#   `Arc` only uses a TSan-visible acquire load instead of a fence when built for TSan.
#   `--target` is required with it; proc macros then build for the host, uninstrumented.
# - The build goes to target/tsan, so it never invalidates the normal build.
# - Nothing is suppressed. crossbeam-utils (only `CachePadded` is used) switches itself to
#   TSan-friendly code from the sanitizer cfg; the shard spin lock is plain std atomics (an
#   acquire compare-exchange to lock, a release store to unlock), which TSan models exactly.
# - The CUDA tests are left out: without a driver they only print "skipped".
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! rustup +nightly component list --installed | grep -q '^rust-src'; then
    rustup +nightly component add rust-src
fi

export RUSTFLAGS="-Zsanitizer=thread"
export RUSTDOCFLAGS="-Zsanitizer=thread"
export CARGO_TARGET_DIR=target/tsan
# second_deadlock_stack: both stacks of a lock-order report. Exit code 66 on any report.
export TSAN_OPTIONS="${TSAN_OPTIONS:-second_deadlock_stack=1}"
# The library's features are opt-in: the CUDA backend is compiled in (its tests skip).
TSAN=(cargo +nightly test -Zbuild-std --target x86_64-unknown-linux-gnu -p gpupool --features cuda-12080)

"${TSAN[@]}" --lib --test all --no-run
if [ "$#" -gt 0 ]; then
    exec "${TSAN[@]}" --test all -- "$@"
fi
"${TSAN[@]}" --lib
"${TSAN[@]}" --test all -- --skip cuda::
echo "sanitize: passed"
