#!/usr/bin/env bash
# Issue 12 on the GPU machine: real PyTorch programs with PyTorch's caching allocator, with
# expandable segments, and with gpupool, then gpupool's checks inside PyTorch. Needs the wheel
# (built here: cd python && maturin build --release) in devbin/wheels/ and the CLI in
# devbin/gpupool. Writes $OUT/real_*.json, $OUT/real_workloads.md and $OUT/checks.txt.
#   devscripts/real_workloads.sh [WORKLOAD...]     (default: all three)
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-devbin/out}; mkdir -p "$OUT"
PY=devbin/py; rm -rf "$PY"
pip install --quiet --no-index --no-deps --target "$PY" devbin/wheels/gpupool-*.whl || exit 2
export PYTHONPATH=$PWD/$PY${PYTHONPATH:+:$PYTHONPATH}
workloads=${*:-gpt2_train resnet50_train llm_generate}
for workload in $workloads; do
  for allocator in default expandable gpupool; do
    timeout 600 python3 benches/pytorch/real_workloads.py --allocator $allocator --workload $workload \
      --out "$OUT/real_${workload}_${allocator}.json" > "$OUT/real_${workload}_${allocator}.log" 2>&1
    echo "$workload $allocator exit $?: $(tail -1 "$OUT/real_${workload}_${allocator}.log")"
  done
done
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
rows = ["| workload | allocator | time per step (median) | peak device memory | outputs vs default |", "|---|---|---|---|---|"]
for workload in ["gpt2_train", "resnet50_train", "llm_generate"]:
    runs = {}
    for allocator in ["default", "expandable", "gpupool"]:
        path = f"{out}/real_{workload}_{allocator}.json"
        if os.path.exists(path):
            runs[allocator] = json.load(open(path))
    base = runs.get("default")
    for allocator, run in runs.items():
        if base is None:
            same = "-"
        elif run["outputs"] == base["outputs"]:
            same = f"bitwise equal ({len(run['outputs'])} steps)"
        else:
            diffs = [abs(a - b) for a, b in zip(run["outputs"], base["outputs"])]
            same = f"largest difference {max(diffs):.3g}"
        ratio = run["step_ms_median"] / base["step_ms_median"] if base else 1
        mem = run["peak_device_bytes"] / base["peak_device_bytes"] if base else 1
        rows.append(f"| {workload} | {allocator} | {run['step_ms_median']:.1f} ms ({ratio:.3f}x) | {run['peak_device_bytes']/2**30:.3f} GiB ({mem:.3f}x) | {same} |")
text = "\n".join(rows)
print(text)
open(f"{out}/real_workloads.md", "w").write(text + "\n")
PY
if [ -z "${SKIP_CHECKS:-}" ]; then
  timeout 300 python3 benches/pytorch/gpupool_checks.py "$OUT/recorded_trace.csv" > "$OUT/checks.txt" 2>&1
  echo "checks exit $?" >> "$OUT/checks.txt"
  timeout 120 devbin/gpupool replay "$OUT/recorded_trace.csv" --backend cuda >> "$OUT/checks.txt" 2>&1
  echo "replay of the recorded trace exit $?" >> "$OUT/checks.txt"
  cat "$OUT/checks.txt"
fi
