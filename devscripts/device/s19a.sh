#!/usr/bin/env bash
# Session 19, device call 1: CUDA tests of this build, then gpupool (class blocks from their own
# arena = the new default, one cuMemAlloc each = the old default, shared small pages) and the
# peers on the nine traces, same machine, a second gpupool round after the peers.
set -u
cd "$(dirname "$0")/../.." || exit 2
FINAL=${OUT:-devbin/out}; O=/tmp/s19a; rm -rf $O; mkdir -p $O; trap "tar czf $FINAL/results.tgz -C /tmp s19a" EXIT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/gpu.txt
OUT=$O timeout 240 devscripts/cuda_tests.sh > $O/cuda_tests_stdout.txt 2>&1; echo "cuda tests exit $?"
grep -E "test result|FAILED|panicked" $O/cuda_tests.log | head -20
replays() {
  for trace in devbin/traces/*.csv.gz; do
    name=$(basename "$trace" .csv.gz)
    for v in arena backend shared-pages; do
      [ "$2" = short ] && [ $v = shared-pages ] && continue
      timeout 100 devbin/gpupool replay $trace --class-blocks $v --runs 3 --backend cuda --format json > $O/replay_${name}_${v}_$1.json 2> $O/replay_${name}_${v}_$1.err
    done
  done
}
replays r1 full; echo "round 1 done"
RUNS=3 TIMEOUT=120 OUT=$O devscripts/run_peers.sh devbin/traces/*.csv.gz > $O/peers_stdout.txt 2>&1; echo "peers exit $?"
cat $O/peers.md
replays r2 short; echo "round 2 done"
for v in arena backend; do devbin/gpupool replay devbin/traces/gpt2_train.csv.gz --class-blocks $v --runs 3 --backend cuda --color never | tail -14; done
