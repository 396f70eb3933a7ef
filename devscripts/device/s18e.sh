#!/usr/bin/env bash
# Session 18, device call: gpupool (this build: frontier sparing, driver-call profile) and the
# peers on the nine traces, same machine, two gpupool rounds around the peers.
set -u
cd "$(dirname "$0")/../.." || exit 2
FINAL=${OUT:-devbin/out}; O=/tmp/s18e; rm -rf $O; mkdir -p $O; trap "tar czf $FINAL/results.tgz -C /tmp s18e" EXIT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $O/gpu.txt
replays() {
  for trace in devbin/traces/*.csv.gz; do
    name=$(basename "$trace" .csv.gz)
    for v in default carve; do
      extra=""; [ $v = carve ] && extra="--carve-class-blocks"
      timeout 100 devbin/gpupool replay $trace $extra --runs 3 --backend cuda --format json > $O/replay_${name}_${v}_$1.json 2> $O/replay_${name}_${v}_$1.err
    done
  done
}
replays r1; echo "round 1 done"
RUNS=3 TIMEOUT=120 OUT=$O devscripts/run_peers.sh devbin/traces/*.csv.gz > $O/peers_stdout.txt 2>&1; echo "peers exit $?"
cat $O/peers.md
replays r2; echo "round 2 done"
devbin/gpupool replay devbin/traces/gpt2_train.csv.gz --runs 3 --backend cuda --color never | tail -12
