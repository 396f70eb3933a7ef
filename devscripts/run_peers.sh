#!/usr/bin/env bash
# Replays allocation traces through gpupool's peers on the GPU machine:
#
#   devscripts/run_peers.sh TRACE...          # e.g. devscripts/run_peers.sh benches/traces/*.csv.gz
#
# Builds benches/peers/replay_peers.cpp if needed (devscripts/build_peers.sh), then for each
# trace runs three peers, each in its own process, in this order:
#   pytorch             PyTorch's CUDA caching allocator, default settings (PYTORCH_CUDA_ALLOC_CONF
#                       and PYTORCH_ALLOC_CONF removed from the environment)
#   pytorch-expandable  the same with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
#   cuda-pool           cudaMallocFromPoolAsync on a pool with release threshold UINT64_MAX
# Writes under $OUT (default devbin/out): peers.jsonl (one JSON line per trace and peer; a
# failed run gets a line with "error"), peers.md (a markdown table: median ns per operation and
# peak reserved / peak live, per trace and peer) and peers.log (the build, the card, and each
# run's stderr). RUNS (default 5) replays per peer and trace; TIMEOUT (default 300 s) per run.
# Exits non-zero when the build or any run failed.
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-devbin/out}
RUNS=${RUNS:-5}
TIMEOUT=${TIMEOUT:-300}
mkdir -p "$OUT"
LOG=$OUT/peers.log
JSONL=$OUT/peers.jsonl
: >"$JSONL"

if [ $# -eq 0 ]; then
    echo "usage: devscripts/run_peers.sh TRACE..." >&2
    exit 2
fi

{
    echo "== run_peers.sh at $(date -u '+%Y-%m-%dT%H:%M:%SZ') on $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1
} >>"$LOG"

BIN=$(devscripts/build_peers.sh 2>>"$LOG" | tail -1)
if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then
    echo "run_peers.sh: build failed; see $LOG" >&2
    tail -30 "$LOG" >&2
    exit 1
fi

failures=0
run_one() { # label trace cmd...
    local label=$1 trace=$2
    shift 2
    local err=/tmp/run_peers.$$.err
    echo "== $label $(basename "$trace")" >>"$LOG"
    local line status
    line=$(timeout "$TIMEOUT" "$@" 2>"$err")
    status=$?
    cat "$err" >>"$LOG"
    if [ $status -eq 0 ] && [ -n "$line" ]; then
        echo "$line" >>"$JSONL"
        echo "$line" >>"$LOG"
    else
        failures=$((failures + 1))
        local msg
        msg=$(tail -1 "$err" | tr -d '"\\' | cut -c1-300)
        [ $status -eq 124 ] && msg="timed out after ${TIMEOUT}s"
        printf '{"allocator":"%s","trace":"%s","error":"exit %d: %s"}\n' "$label" \
            "$(basename "$trace" .csv.gz)" "$status" "$msg" >>"$JSONL"
        echo "FAILED ($status): $msg" >>"$LOG"
    fi
    rm -f "$err"
}

for trace in "$@"; do
    if [ ! -f "$trace" ]; then
        echo "run_peers.sh: no such trace $trace" | tee -a "$LOG" >&2
        failures=$((failures + 1))
        continue
    fi
    run_one pytorch "$trace" env -u PYTORCH_CUDA_ALLOC_CONF -u PYTORCH_ALLOC_CONF \
        "$BIN" pytorch "$trace" --runs "$RUNS"
    run_one pytorch-expandable "$trace" env -u PYTORCH_ALLOC_CONF \
        PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "$BIN" pytorch "$trace" --runs "$RUNS"
    run_one cuda-pool "$trace" "$BIN" cuda-pool "$trace" --runs "$RUNS"
done

python3 - "$JSONL" "$OUT/peers.md" "$RUNS" <<'EOF'
import json, subprocess, sys
jsonl, md, runs = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(l) for l in open(jsonl) if l.strip()]
peers = ["pytorch", "pytorch-expandable", "cuda-pool"]
titles = {"pytorch": "PyTorch caching allocator",
          "pytorch-expandable": "PyTorch, `expandable_segments:True`",
          "cuda-pool": "CUDA stream-ordered pool (`cudaMallocFromPoolAsync`)"}
traces = []
for r in rows:
    if r["trace"] not in traces:
        traces.append(r["trace"])
by = {(r["trace"], r["allocator"]): r for r in rows}
try:
    card = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()
except Exception:
    card = "unknown"
def gib(b):
    return f"{b / 2**30:.2f} GiB"
out = [f"Card: {card}. Median CPU time per operation of {runs} replays (each from an empty pool), "
       "and peak reserved ÷ peak requested live bytes.", "",
       "| trace | ops | streams | peak live | " + " | ".join(titles[p] for p in peers) + " |",
       "|---|---|---|---|" + "---|" * len(peers)]
for t in traces:
    first = next((by[(t, p)] for p in peers if (t, p) in by and "error" not in by[(t, p)]), None)
    cells = []
    for p in peers:
        r = by.get((t, p))
        if r is None:
            cells.append("not run")
        elif "error" in r:
            cells.append("failed")
        else:
            cells.append(f"{r['ns_per_op_median']:,.0f} ns, {r['ratio']:.3f}")
    ops = f"{first['ops']:,}" if first else "?"
    streams = str(first.get("streams", "?")) if first else "?"
    live = gib(first["peak_live_bytes"]) if first else "?"
    out.append(f"| {t} | {ops} | {streams} | {live} | " + " | ".join(cells) + " |")
errors = [r for r in rows if "error" in r]
if errors:
    out += ["", "Failures:"] + [f"- {r['trace']} / {r['allocator']}: {r['error']}" for r in errors]
open(md, "w").write("\n".join(out) + "\n")
print("\n".join(out))
EOF

echo "run_peers.sh: $failures failure(s); results in $JSONL, $OUT/peers.md, log $LOG" >&2
[ $failures -eq 0 ]
