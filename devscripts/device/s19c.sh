#!/usr/bin/env bash
# Session 19, device call 3: ResNet-50 training step times, PyTorch's allocator and gpupool's
# default interleaved in separate processes (per-step times in the JSON), then expandable.
set -u
cd "$(dirname "$0")/../.." || exit 2
FINAL=${OUT:-devbin/out}; O=/tmp/s19c; rm -rf $O; mkdir -p $O/d; trap "tar czf $FINAL/results.tgz -C /tmp s19c" EXIT
PY=devbin/py; rm -rf "$PY"
pip install --quiet --no-index --no-deps --target "$PY" devbin/wheels/gpupool-*manylinux*.whl 2>/dev/null || exit 2
export PYTHONPATH=$PWD/$PY${PYTHONPATH:+:$PYTHONPATH}
n=0
for a in ${ALLOCATORS:-default gpupool default gpupool gpupool default expandable}; do
  n=$((n+1))
  timeout 120 python3 benches/pytorch/real_workloads.py --allocator $a --workload resnet50_train --steps 40 --out $O/d/resnet_${n}_$a.json > $O/d/resnet_${n}_$a.log 2>&1
  echo "$n $a exit $?: $(python3 -c "import json; r=json.load(open('$O/d/resnet_${n}_$a.json')); print(round(r['step_ms_median'],2), 'ms', round(r['peak_device_bytes']/2**30,4), 'GiB', [round(x) for x in r['step_ms']])" 2>&1 | tail -1)"
done
