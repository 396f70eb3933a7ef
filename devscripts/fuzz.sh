#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ (libFuzzer, AddressSanitizer) for a number of seconds
# each, one after the other, installing the nightly toolchain and cargo-fuzz if missing.
#
#   devscripts/fuzz.sh [SECONDS] [TARGET...]    (default: 60 seconds, every target)
#
# Each target starts from its committed seeds (fuzz/seeds/TARGET) and the corpus it grew on
# earlier runs (fuzz/corpus/TARGET, not committed). A crash, a timeout (a single input over
# 20 s; 10 s for the trace parser) or memory over the limit (4 GiB; 2 GiB for the trace parser)
# stops that target and leaves the input in fuzz/artifacts/TARGET/; the script goes on with the
# next target and exits non-zero at the end. Logs: fuzz/logs/TARGET.log (not committed).
# Reproduce a finding:  cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...
set -u
cd "$(dirname "$0")/.." || exit 2

seconds=${1:-60}
shift || true
case $seconds in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS] [TARGET...]" >&2; exit 2 ;;
esac

if ! cargo +nightly --version >/dev/null 2>&1; then
  rustup toolchain install nightly --profile minimal || exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked || cargo +nightly install cargo-fuzz --locked || exit 2
fi

targets=${*:-$(cargo +nightly fuzz list)}
mkdir -p fuzz/logs
cargo +nightly fuzz build || exit 2

failed=""
for target in $targets; do
  case $target in
    trace_parser) limits="-rss_limit_mb=2048 -timeout=10" ;;
    *) limits="-rss_limit_mb=4096 -timeout=20" ;;
  esac
  mkdir -p "fuzz/corpus/$target"
  seeds=()
  [ -d "fuzz/seeds/$target" ] && seeds=("fuzz/seeds/$target")
  log="fuzz/logs/$target.log"
  echo "== $target: $seconds s ($limits)"
  # shellcheck disable=SC2086 # the limits are separate arguments
  cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "${seeds[@]}" -- \
    -max_total_time="$seconds" $limits -print_final_stats=1 >"$log" 2>&1
  status=$?
  # The last status line (runs, coverage, features, corpus) and the run count.
  grep -E '^#[0-9]+' "$log" | tail -1
  grep -E '^Done [0-9]+ runs' "$log" | tail -1
  if [ $status -ne 0 ]; then
    echo "$target FAILED (exit $status): see $log and fuzz/artifacts/$target/"
    failed="$failed $target"
  fi
done

if [ -n "$failed" ]; then
  echo "fuzzing found problems in:$failed"
  exit 1
fi
echo "fuzzing: no findings"
