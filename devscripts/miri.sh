#!/usr/bin/env bash
# Miri (issue 13): the gpupool library's unit tests and its integration tests (tests/all) on
# the host and sim backends (and the fake Metal device), interpreted and checked for undefined
# behaviour: out-of-bounds and use-after-free accesses, leaks, data races, invalid values,
# Stacked Borrows aliasing violations, pointers rebuilt from integers.
#
#   devscripts/miri.sh                      # from anywhere; 9 minutes on 2 cores
#   devscripts/miri.sh core::the_budget     # only the integration tests these filters name
#
# What Miri leaves out, each with its reason next to it (`cfg(miri)` in the sources):
# - tests that need something Miri cannot emulate: the CUDA driver (`dlopen`; under Miri the
#   backend finds no driver, so the CUDA tests print "skipped: no CUDA driver"), files read
#   from disk or /proc, integer-to-pointer casts of CUDA stream handles;
# - tests/all/observability.rs, text rendering in code that forbids `unsafe` (10+ minutes
#   interpreted);
# - long loops, shortened under `cfg!(miri)` (threads, steps, proptest cases).
#
# MIRIFLAGS (unless set by the caller):
# -Zmiri-strict-provenance     no pointer may be made from an integer. The pool passes host
#                              memory around as `Block`s (a pointer and a `u64` device address)
#                              and splits views out of blocks; this checks every host pointer
#                              it hands out is derived from the allocation, never rebuilt from
#                              the address.
# -Zmiri-isolation-error=warn-nobacktrace
#                              isolation stays on (a deterministic virtual clock and scheduler:
#                              a failure replays exactly), but the host backend's read of
#                              /proc/meminfo fails with an error (and a one-line warning)
#                              instead of stopping the run: the backend then reports no memory
#                              figures, its documented behaviour off Linux.
# The default aliasing model (Stacked Borrows), preemption rate and seed are kept.
#
# The two halves of the integration tests run in two Miri processes at once (Miri interprets
# on one core); the output of each is prefixed with its name.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    rustup toolchain install nightly --profile minimal
fi
if ! rustup +nightly component list --installed | grep -q '^miri'; then
    rustup +nightly component add miri rust-src
fi
cargo +nightly miri setup

export MIRIFLAGS="${MIRIFLAGS:--Zmiri-strict-provenance -Zmiri-isolation-error=warn-nobacktrace}"
echo "MIRIFLAGS=$MIRIFLAGS"

# The library's features are opt-in: the CUDA backend's code is interpreted too (its tests
# skip: Miri has no driver), with the version the command and the C library bind.
FEATURES=(--features cuda-12080)

# Build once; the runs below then only interpret.
cargo +nightly miri test -p gpupool "${FEATURES[@]}" --lib --test all --no-run

if [ "$#" -gt 0 ]; then
    exec cargo +nightly miri test -p gpupool "${FEATURES[@]}" --test all -- "$@"
fi

# Two halves of about equal interpretation time (7 to 8 minutes each on an idle 2-core
# machine): core and the stress module in one; the unit tests and the other modules in the
# other.
FIRST=(core:: stress::)
run_first() {
    local status=0
    cargo +nightly miri test -p gpupool "${FEATURES[@]}" --test all -- "${FIRST[@]}" || status=1
    echo "first half: $SECONDS s"
    return "$status"
}
run_second() {
    local status=0 skips=()
    cargo +nightly miri test -p gpupool "${FEATURES[@]}" --lib || status=1
    for module in "${FIRST[@]}"; do skips+=(--skip "$module"); done
    cargo +nightly miri test -p gpupool "${FEATURES[@]}" --test all -- "${skips[@]}" || status=1
    echo "second half: $SECONDS s"
    return "$status"
}

run_first 2>&1 | sed -u 's/^/[miri 1] /' &
first=$!
run_second 2>&1 | sed -u 's/^/[miri 2] /' &
second=$!
status=0
wait "$first" || status=1
wait "$second" || status=1
if [ "$status" -ne 0 ]; then
    echo "miri: FAILED (see above)"
    exit 1
fi
echo "miri: passed"
