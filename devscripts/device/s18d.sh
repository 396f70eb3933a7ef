#!/usr/bin/env bash
# Session 18, device call 4: record real programs' allocations through gpupool, replay them through the peers.
set -u
cd "$(dirname "$0")/../.." || exit 2
FINAL=${OUT:-devbin/out}; O=/tmp/s18d; rm -rf $O; mkdir -p $O/traces; trap "tar czf $FINAL/results.tgz -C /tmp s18d" EXIT
PY=devbin/py; rm -rf "$PY"
pip install --quiet --no-index --no-deps --target "$PY" devbin/wheels/gpupool-*manylinux*.whl 2>/dev/null || exit 2
export PYTHONPATH=$PWD/$PY${PYTHONPATH:+:$PYTHONPATH}
for spec in "gpt2_train 60 torch_gpt2_train" "resnet50_train 30 torch_resnet50_train" "llm_generate 3 torch_llm_generate"; do
  set -- $spec
  timeout 150 python3 benches/pytorch/real_workloads.py --allocator gpupool --workload $1 --steps $2 --out $O/$3.json --record-trace $O/traces/$3.csv > $O/$3.log 2>&1
  echo "$3 exit $?: $(tail -1 $O/$3.log)"; gzip -9 $O/traces/$3.csv
done
ls -la $O/traces
RUNS=3 TIMEOUT=120 OUT=$O devscripts/run_peers.sh $O/traces/*.csv.gz > $O/peers_stdout.txt 2>&1; echo "peers exit $?"
cat $O/peers.md
for t in $O/traces/*.csv.gz; do timeout 100 devbin/gpupool replay $t --runs 3 --backend cuda --format json > $O/replay_$(basename $t .csv.gz).json 2>&1; done
echo done
