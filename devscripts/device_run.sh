#!/usr/bin/env bash
# One device session: CUDA tests, the virtual-memory mapping costs, the trace replays on CUDA
# and on the sim device (same build: their peak reserved bytes must agree), and the benchmark
# on CUDA and on that machine's CPU. Output under $OUT. Binaries come from this machine:
#   devscripts/cuda_tests.sh build && cargo build --release -p gpupool-cli && cargo bench -p gpupool --bench hit_path --no-run
#   cp target/release/gpupool devbin/ && cp "$(ls -t target/release/deps/hit_path-* | grep -v '\.d$' | head -1)" devbin/hit_path
#   cp ../shared/traces/*.csv.gz devbin/traces/
# and, to compare with an earlier build in the same session, that build's CLI as devbin/baseline/gpupool.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-devbin/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$OUT/gpu.txt"
OUT=$OUT devscripts/cuda_tests.sh > "$OUT/tests_stdout.txt" 2>&1; echo "cuda tests exit $?" | tee -a "$OUT/gpu.txt"
for bin in devbin/gpupool-*; do "$bin" --ignored --nocapture --test-threads=1 virtual_memory_mapping_costs > "$OUT/vmm_costs.txt" 2>&1; done
for trace in devbin/traces/*.csv.gz; do
  name=$(basename "$trace" .csv.gz)
  timeout 150 devbin/gpupool replay "$trace" --runs 5 --backend cuda > "$OUT/replay_${name}_cuda.txt" 2>&1
  timeout 150 devbin/gpupool replay "$trace" --runs 1 --backend sim > "$OUT/replay_${name}_sim.txt" 2>&1
  if [ -x devbin/baseline/gpupool ]; then
    timeout 150 devbin/baseline/gpupool replay "$trace" --runs 5 --backend cuda > "$OUT/replay_${name}_cuda_baseline.txt" 2>&1
  fi
done
timeout 200 devbin/gpupool bench --backend cuda > "$OUT/bench_cuda.txt" 2>&1; echo "bench cuda exit $?" | tee -a "$OUT/gpu.txt"
{ devbin/hit_path --bench; devbin/gpupool bench --backend host; } > "$OUT/bench_host.txt" 2>&1
