#!/usr/bin/env python3
"""Issue 12's checks of gpupool inside a real PyTorch program (on a GPU machine):

1. ``gpupool.torch.memory_stats()`` answers with PyTorch's keys and its values agree with
   gpupool's own statistics;
2. an allocation larger than the device raises ``torch.OutOfMemoryError`` with gpupool's
   message, the program catches it, live tensors keep their data, and a following allocation
   succeeds;
3. a trace recorded with ``gpupool.torch.record_trace`` is written (the caller replays it with
   ``gpupool replay``).

    python3 benches/pytorch/gpupool_checks.py TRACE_PATH
Prints one line per check and exits non-zero when one fails.
"""
import sys

import gpupool.torch

gpupool.torch.enable()
import torch  # noqa: E402

failures = 0


def check(name, ok, detail=""):
    global failures
    print(("ok   " if ok else "FAIL ") + name + (f": {detail}" if detail else ""))
    if not ok:
        failures += 1


# 1. memory_stats against gpupool's own figures.
tensors = [torch.empty(size, dtype=torch.uint8, device="cuda") for size in (1000, 5 << 20, 300 << 20)]
stats = gpupool.torch.memory_stats()
raw = gpupool.torch.stats()
check(
    "memory_stats has PyTorch's keys",
    all(key in stats for key in ("allocated_bytes.all.current", "reserved_bytes.all.peak", "num_alloc_retries", "num_ooms")),
    ", ".join(sorted(stats)[:6]) + ", ...",
)
asked = sum(t.numel() for t in tensors)
check(
    "allocated_bytes.all.current is gpupool's block bytes of live allocations, covering what "
    "the program asked for (PyTorch too counts rounded sizes)",
    stats["allocated_bytes.all.current"] == raw["ffi"]["allocated_bytes"] >= asked,
    f"{stats['allocated_bytes.all.current']} vs {raw['ffi']['allocated_bytes']}, asked {asked}",
)
check(
    "reserved_bytes.all.current is gpupool's reserved bytes",
    stats["reserved_bytes.all.current"] == raw["totals"]["reserved_bytes"],
    f"{stats['reserved_bytes.all.current']} vs {raw['totals']['reserved_bytes']}",
)

# 2. Out of memory: caught, data intact, the next allocation succeeds.
keep = torch.arange(1 << 20, dtype=torch.int32, device="cuda")
total = torch.cuda.mem_get_info()[1]
try:
    huge = torch.empty(total * 2, dtype=torch.uint8, device="cuda")
    check("an allocation twice the device raises", False, "no exception")
except torch.OutOfMemoryError as error:  # noqa: PERF203
    check("an allocation twice the device raises torch.OutOfMemoryError", True, str(error).splitlines()[0][:160])
except Exception as error:  # pragma: no cover - reported as a failure
    check("an allocation twice the device raises torch.OutOfMemoryError", False, repr(error)[:200])
after = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
after.fill_(7)
torch.cuda.synchronize()
check("a 1 GiB allocation after it succeeds", int(after[-1]) == 7)
check("live tensors kept their data", bool((keep == torch.arange(1 << 20, dtype=torch.int32, device="cuda")).all()))
check("num_ooms counts it", gpupool.torch.memory_stats()["num_ooms"] >= 1, str(gpupool.torch.memory_stats()["num_ooms"]))
del after, keep, tensors

# 3. A recorded trace of a few training steps of a small model.
path = sys.argv[1]
model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1024)).cuda()
optimizer = torch.optim.AdamW(model.parameters())
with gpupool.torch.record_trace(path):
    for _ in range(5):
        loss = model(torch.randn(256, 1024, device="cuda")).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.cuda.synchronize()
with open(path) as handle:
    lines = handle.read().splitlines()
check("record_trace wrote a trace", len(lines) > 10 and lines[0].startswith("op,"), f"{len(lines)} lines")
gpupool.torch.dashboard()
sys.exit(1 if failures else 0)
