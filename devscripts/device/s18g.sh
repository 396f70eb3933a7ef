#!/usr/bin/env bash
set -u
cd "$(dirname "$0")/../.." || exit 2
FINAL=${OUT:-devbin/out}; O=/tmp/s18g; rm -rf $O; mkdir -p $O/d; trap "tar czf $FINAL/results.tgz -C /tmp s18g" EXIT
OUT=$O/t timeout 200 devscripts/cuda_tests.sh > $O/cuda_tests_stdout.txt 2>&1; echo "cuda tests exit $?"
grep -hE "test result|FAILED" $O/cuda_tests_stdout.txt | sort | uniq -c
PY=devbin/py; rm -rf "$PY"
pip install --quiet --no-index --no-deps --target "$PY" devbin/wheels/gpupool-*manylinux*.whl 2>/dev/null || exit 2
export PYTHONPATH=$PWD/$PY${PYTHONPATH:+:$PYTHONPATH}
for r in 1 2; do for a in gpupool default; do
  timeout 100 python3 benches/pytorch/real_workloads.py --allocator $a --workload resnet50_train --steps 30 --out $O/d/r_${a}_$r.json > /dev/null 2>&1
  python3 -c "import json; r=json.load(open('$O/d/r_${a}_$r.json')); print('resnet $a r$r', round(r['step_ms_median'],2), [round(x) for x in r['step_ms'][5:]])"
done; done
