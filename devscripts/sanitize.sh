#!/usr/bin/env bash
# Sanitizers (issue 13): the gpupool library's unit tests and its integration tests
# (tests/all, which hold every multi-threaded test: the budget and the ownership checks under
# eight threads, the stream-safety stress, the last handle racing buffer drops, trims racing
# mappings, the maintenance thread, the stress module), built with a sanitizer and run.
# SANITIZER picks which (default `thread`, what .ci/run runs):
#
# - thread: ThreadSanitizer, `-Zsanitizer=thread`; any data race TSan sees fails the run
#   (TSan's exit code 66).
# - address: AddressSanitizer with LeakSanitizer, `-Zsanitizer=address`; any heap, stack or
#   global out-of-bounds access, use-after-free, double free or (at each test binary's exit)
#   leaked heap allocation fails the run.
#
#   devscripts/sanitize.sh                          # TSan; 3 to 5 minutes on 2 cores
#   SANITIZER=address devscripts/sanitize.sh        # ASan + LSan; about 2 minutes on 2 cores
#   devscripts/sanitize.sh stream_safety core::     # only the integration tests these name
#
# - `-Zbuild-std` rebuilds std with the sanitizer: an uninstrumented std hides the
#   happens-before edges of its own locks and atomics from TSan (false reports), and std's
#   `Arc` only uses a TSan-visible acquire load instead of a fence when built for TSan; for
#   ASan it instruments std's own accesses too. `--target` is required with it; proc macros
#   then build for the host, uninstrumented.
# - Each sanitizer builds into its own directory (target/tsan, target/asan), so neither
#   invalidates the normal build or the other.
# - TSan: nothing is suppressed. crossbeam-utils (only `CachePadded` is used) switches itself
#   to TSan-friendly code from the sanitizer cfg; the shard spin lock is plain std atomics (an
#   acquire compare-exchange to lock, a release store to unlock), which TSan models exactly.
# - ASan: nothing is suppressed either; ASAN_OPTIONS (unless set by the caller) turn leak
#   detection on, and no test leaks (the libtest harness and std's thread-locals included).
#   The host backend's blocks under 1 MiB come from the (instrumented) global allocator and
#   get redzones; blocks it maps with mmap are invisible to ASan (no redzones, and
#   LeakSanitizer neither tracks nor scans mappings), so an access just past a mapped block
#   or a mapping never unmapped goes unreported here.
# - The CUDA tests are left out: without a driver they only print "skipped".
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! rustup +nightly component list --installed | grep -q '^rust-src'; then
    rustup +nightly component add rust-src
fi

SANITIZER="${SANITIZER:-thread}"
case "$SANITIZER" in
thread)
    export CARGO_TARGET_DIR=target/tsan
    # second_deadlock_stack: both stacks of a lock-order report. Exit code 66 on any report.
    export TSAN_OPTIONS="${TSAN_OPTIONS:-second_deadlock_stack=1}"
    ;;
address)
    export CARGO_TARGET_DIR=target/asan
    # detect_leaks: LeakSanitizer at each test binary's exit. detect_stack_use_after_return:
    # references to a returned frame's locals. Exit code 1 on any report.
    export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:detect_stack_use_after_return=1}"
    ;;
*)
    echo "sanitize: SANITIZER must be thread or address, not '$SANITIZER'" >&2
    exit 2
    ;;
esac
export RUSTFLAGS="-Zsanitizer=$SANITIZER"
export RUSTDOCFLAGS="-Zsanitizer=$SANITIZER"
# The library's features are opt-in: the CUDA backend is compiled in (its tests skip).
RUN=(cargo +nightly test -Zbuild-std --target x86_64-unknown-linux-gnu -p gpupool --features cuda-12080)

"${RUN[@]}" --lib --test all --no-run
if [ "$#" -gt 0 ]; then
    exec "${RUN[@]}" --test all -- "$@"
fi
"${RUN[@]}" --lib
"${RUN[@]}" --test all -- --skip cuda::
echo "sanitize ($SANITIZER): passed"
