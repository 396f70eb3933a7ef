#!/usr/bin/env bash
# Session 18, device call 2: the peers on the repo's traces, then gpupool again (a second round).
set -u
cd "$(dirname "$0")/../.." || exit 2
FINAL=${OUT:-devbin/out}; O=/tmp/s18b; rm -rf $O; mkdir -p $O; trap "tar czf $FINAL/results.tgz -C /tmp s18b" EXIT
start=$(date +%s)
RUNS=3 TIMEOUT=120 OUT=$O devscripts/run_peers.sh devbin/traces/*.csv.gz > $O/peers_stdout.txt 2>&1; echo "peers exit $? after $(( $(date +%s) - start )) s"
cat $O/peers.md
for trace in devbin/traces/*.csv.gz; do
  name=$(basename "$trace" .csv.gz)
  for v in default carve; do
    extra=""; [ $v = carve ] && extra="--carve-class-blocks"
    timeout 100 devbin/gpupool replay $trace $extra --runs 3 --backend cuda --format json > $O/replay_${name}_${v}_r2.json 2> $O/replay_${name}_${v}_r2.err
  done
done
echo "replays done after $(( $(date +%s) - start )) s"
