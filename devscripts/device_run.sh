#!/usr/bin/env bash
# One device session: CUDA tests, then the benchmark on CUDA (text and JSON), then the trace
# replays on CUDA. Output under $OUT.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-devbin/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$OUT/gpu.txt"
OUT=$OUT devscripts/cuda_tests.sh > "$OUT/tests_stdout.txt" 2>&1; echo "cuda tests exit $?" | tee -a "$OUT/gpu.txt"
for bin in devbin/all-*; do "$bin" --test-threads=2 core > "$OUT/core_tests.txt" 2>&1; echo "core tests exit $?" | tee -a "$OUT/gpu.txt"; done
devbin/gpupool bench --backend cuda > "$OUT/bench_cuda.txt" 2>&1; echo "bench text exit $?" | tee -a "$OUT/gpu.txt"
devbin/gpupool bench --backend cuda --format json > "$OUT/bench_cuda.json" 2>"$OUT/bench_cuda_json.err"; echo "bench json exit $?" | tee -a "$OUT/gpu.txt"
for trace in devbin/traces/*.csv.gz; do
  name=$(basename "$trace" .csv.gz)
  for steps in 1 4; do
    timeout 120 devbin/gpupool replay "$trace" --backend cuda --steps-per-doubling $steps --format json > "$OUT/replay_${name}_cuda_k${steps}.json" 2>&1; echo "replay $name k=$steps exit $?" | tee -a "$OUT/gpu.txt"
  done
done
