#!/usr/bin/env bash
# Session 18, device call 1: driver footprint of cuMemAlloc, CUDA tests, examples, gpupool replays.
set -u
cd "$(dirname "$0")/../.." || exit 2
FINAL=${OUT:-devbin/out}; O=/tmp/s18a; rm -rf $O; mkdir -p $O; trap "tar czf $FINAL/results.tgz -C /tmp s18a" EXIT
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $O/gpu.txt
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a $O/gpu.txt
timeout 60 python3 devscripts/cumemalloc_footprint.py 2>&1 | tee $O/footprint.txt
OUT=$O/t timeout 280 devscripts/cuda_tests.sh > $O/cuda_tests_stdout.txt 2>&1; echo "cuda tests exit $?"
grep -hE "test result|FAILED|panicked" $O/cuda_tests_stdout.txt $O/t/cuda_tests.log 2>/dev/null | sort | uniq -c | head -12
timeout 60 devbin/examples/cudarc_kernel > $O/cudarc_kernel.txt 2>&1; echo "cudarc example exit $?"; tail -2 $O/cudarc_kernel.txt
timeout 120 devbin/ffi-cuda --nocapture > $O/ffi_cuda.txt 2>&1; echo "ffi cuda tests exit $?"; grep -E "test result|FAILED" $O/ffi_cuda.txt
GPUPOOL_LIB_DIR=$PWD/devbin/ffi OUT=$PWD/devbin/ffi examples/c/build.sh > $O/c_build.txt 2>&1; echo "c build exit $?"
GPUPOOL_BACKEND=cuda timeout 60 devbin/ffi/basic > $O/c_example.txt 2>&1; echo "c example exit $?"
for trace in devbin/traces/*.csv.gz; do
  name=$(basename "$trace" .csv.gz)
  for v in default carve; do
    extra=""; [ $v = carve ] && extra="--carve-class-blocks"
    timeout 100 devbin/gpupool replay $trace $extra --runs 3 --backend cuda --format json > $O/replay_${name}_${v}.json 2> $O/replay_${name}_${v}.err
    timeout 100 devbin/gpupool replay $trace $extra --runs 1 --backend sim --format json > $O/replay_${name}_${v}_sim.json 2>/dev/null
  done
done
echo replays done
