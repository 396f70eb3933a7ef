#!/usr/bin/env bash
# Session 18, device call 3: PyTorch programs, allocators alternating, peak device memory and step times.
#   ROUNDS (default 3) of GPT-2 small training (60 steps); then generation (STEPS_GEN generations).
set -u
cd "$(dirname "$0")/../.." || exit 2
FINAL=${OUT:-devbin/out}; O=/tmp/s18c; rm -rf $O; mkdir -p $O/d; trap "tar czf $FINAL/results.tgz -C /tmp s18c" EXIT
PY=devbin/py; rm -rf "$PY"
pip install --quiet --no-index --no-deps --target "$PY" devbin/wheels/gpupool-*manylinux*.whl || exit 2
export PYTHONPATH=$PWD/$PY${PYTHONPATH:+:$PYTHONPATH}
run() { # workload allocator-label steps round
  local w=$1 label=$2 steps=$3 r=$4 alloc=$2 cfg=""
  case $label in gpupool-carve) alloc=gpupool; cfg="carve_class_blocks=true";; esac
  local t0=$(date +%s.%N)
  GPUPOOL_CONFIG=$cfg timeout 150 python3 benches/pytorch/real_workloads.py --allocator $alloc --workload $w --steps $steps --out $O/d/${w}_${label}_$r.json > $O/d/${w}_${label}_$r.log 2>&1
  echo "$w $label r$r exit $? wall $(python3 -c "import time;print(round(time.time()-$t0,1))") s: $(python3 -c "import json; r=json.load(open('$O/d/${w}_${label}_$r.json')); print(round(r['step_ms_median'],2), 'ms', round(r['peak_device_bytes']/2**30,4), 'GiB', 'outputs', len(r['outputs']))" 2>&1 | tail -1)"
}
for r in $(seq 1 ${ROUNDS:-3}); do
  for a in default expandable gpupool gpupool-carve; do run gpt2_train $a 60 $r; done
done
for a in default expandable gpupool gpupool-carve; do run llm_generate $a ${STEPS_GEN:-3} 1; done
