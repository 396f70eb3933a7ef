#!/usr/bin/env bash
# Session 19, device call 4: CUDA tests of the final build (upkeep lock, replay's peak moment),
# the main job (`gpupool bench`, README's first command) on the H200, one replay.
set -u
cd "$(dirname "$0")/../.." || exit 2
FINAL=${OUT:-devbin/out}; O=/tmp/s19d; rm -rf $O; mkdir -p $O; trap "tar czf $FINAL/results.tgz -C /tmp s19d" EXIT
OUT=$O timeout 240 devscripts/cuda_tests.sh > $O/cuda_tests_stdout.txt 2>&1; echo "cuda tests exit $?"
grep -E "test result|FAILED|skipped" $O/cuda_tests.log | head -20
timeout 200 devbin/gpupool bench --samples 3 --color never > $O/bench.txt 2>&1; echo "bench exit $?"; head -3 $O/bench.txt; grep -E "Speedup|p50|Pool after|Health" $O/bench.txt | head -12
devbin/gpupool replay devbin/traces/resnet50_train_bf16.csv.gz --runs 3 --backend cuda --color never | sed -n '/Peak live/,/held for/p'
