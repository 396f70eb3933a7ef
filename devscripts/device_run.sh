#!/usr/bin/env bash
# One device session: CUDA tests, then the benchmark on CUDA (text and JSON), then the trace
# replays on CUDA. Output under $OUT.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-devbin/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$OUT/gpu.txt"
OUT=$OUT devscripts/cuda_tests.sh > "$OUT/tests_stdout.txt" 2>&1; echo "cuda tests exit $?" | tee -a "$OUT/gpu.txt"
for bin in devbin/all-*; do "$bin" --test-threads=4 core observability metal_like > "$OUT/core_tests.txt" 2>&1; echo "core tests exit $?" | tee -a "$OUT/gpu.txt"; done
{ devbin/hitpath; devbin/gpupool bench --backend host; } > "$OUT/bench_host.txt" 2>&1; devbin/gpupool bench --backend cuda > "$OUT/bench_cuda.txt" 2>&1; echo "bench text exit $?" | tee -a "$OUT/gpu.txt"
devbin/gpupool bench --backend cuda --format json > "$OUT/bench_cuda.json" 2>"$OUT/bench_cuda_json.err"; echo "bench json exit $?" | tee -a "$OUT/gpu.txt"
for trace in devbin/traces/*.csv.gz; do
  name=$(basename "$trace" .csv.gz)
  for steps in 1 4; do
    timeout 120 devbin/gpupool replay "$trace" --runs 5 --backend cuda --steps-per-doubling $steps --format json > /tmp/replay.json 2>/tmp/replay.err; echo "replay $name k=$steps exit $?" | tee -a "$OUT/gpu.txt"
    python3 -c "import json,sys; d=json.load(open('/tmp/replay.json')); print('$name', 'k=$steps', {k: d[k] for k in d if k not in ('pool_report',)})" >> "$OUT/replay_summary.txt" 2>&1 || { echo "$name k=$steps: unreadable"; tail -5 /tmp/replay.err; } >> "$OUT/replay_summary.txt"
  done
done
