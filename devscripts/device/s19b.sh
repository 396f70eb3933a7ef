#!/usr/bin/env bash
# Session 19, device call 2: the three PyTorch programs under PyTorch's allocator, expandable
# segments, gpupool's default (class blocks from their own arena) and gpupool with shared small
# pages; peak device memory (driver) and step time, one process each.
set -u
cd "$(dirname "$0")/../.." || exit 2
O=${OUT:-devbin/out}/s19b; rm -rf $O; mkdir -p $O/d
PY=devbin/py; rm -rf "$PY"
pip install --quiet --no-index --no-deps --target "$PY" devbin/wheels/gpupool-*manylinux*.whl 2>/dev/null || exit 2
export PYTHONPATH=$PWD/$PY${PYTHONPATH:+:$PYTHONPATH}
run() { # workload label steps
  local w=$1 label=$2 steps=$3 alloc=$2 cfg=""
  case $label in gpupool-shared) alloc=gpupool; cfg="shared_class_pages=true";; gpupool-backend) alloc=gpupool; cfg="carve_class_blocks=false";; esac
  GPUPOOL_CONFIG=$cfg timeout 150 python3 benches/pytorch/real_workloads.py --allocator $alloc --workload $w --steps $steps --out $O/d/${w}_${label}.json > $O/d/${w}_${label}.log 2>&1
  echo "$w $label exit $?: $(python3 -c "import json; r=json.load(open('$O/d/${w}_${label}.json')); s=r.get('torch_stats') or r.get('gpupool_stats'); print(round(r['step_ms_median'],2), 'ms', round(r['peak_device_bytes']/2**30,4), 'GiB reserved peak', s.get('reserved_bytes.all.peak'))" 2>&1 | tail -1)"
}
for a in ${ALLOCATORS:-default expandable gpupool gpupool-shared}; do run llm_generate $a 3; done
for a in ${ALLOCATORS:-default expandable gpupool gpupool-shared}; do run resnet50_train $a 30; done
for a in ${ALLOCATORS:-default expandable gpupool gpupool-shared}; do run gpt2_train $a 60; done
