#!/usr/bin/env bash
# Issue 12 on the GPU machine: PyTorch's default allocator and gpupool alternating, several
# rounds, so run-to-run variation shows beside the allocators' difference. Needs the wheel in
# devbin/wheels/ (cd python && maturin build --release). Prints one line per run: workload,
# allocator, round, median step (ms) [, each step], peak device memory (GiB).
#   devscripts/step_time_rounds.sh            # GPT-2 small 3 rounds of 60 steps, generation 2 of 6
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-devbin/out}; mkdir -p "$OUT/d"
PY=devbin/py; rm -rf "$PY"
pip install --quiet --no-index --no-deps --target "$PY" devbin/wheels/gpupool-*.whl 2>/dev/null || exit 2
export PYTHONPATH=$PWD/$PY${PYTHONPATH:+:$PYTHONPATH}
for round in 1 2 3; do
 for a in default gpupool; do
  timeout 100 python3 benches/pytorch/real_workloads.py --allocator $a --workload gpt2_train --steps 60 --out $OUT/d/g_${a}_$round.json > /dev/null 2>&1
  python3 -c "import json; r=json.load(open('$OUT/d/g_${a}_$round.json')); print('gpt2_train $a r$round', round(r['step_ms_median'],2), round(r['peak_device_bytes']/2**30,3))" 2>/dev/null || echo "gpt2 $a failed"
 done
done
for round in 1 2; do
 for a in default gpupool; do
  timeout 120 python3 benches/pytorch/real_workloads.py --allocator $a --workload llm_generate --steps 6 --out $OUT/d/l_${a}_$round.json > /dev/null 2>&1
  python3 -c "import json; r=json.load(open('$OUT/d/l_${a}_$round.json')); print('llm_generate $a r$round', round(r['step_ms_median'],2), [round(x) for x in r['step_ms']], round(r['peak_device_bytes']/2**30,3))" 2>/dev/null || echo "gen $a failed"
 done
done
rm -rf "$OUT/d"
