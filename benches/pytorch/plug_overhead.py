#!/usr/bin/env python3
"""What one tensor allocation + free costs through each allocator (issue 12: PyTorch wraps a
pluggable allocator in its own mutex and hash map; this measures the whole path as a program
sees it). One allocator per process:

    python3 benches/pytorch/plug_overhead.py default|expandable|gpupool
Prints ns per `torch.empty(n, device="cuda")` + `del`, for a few sizes, median of 5 rounds.
"""
import os
import statistics
import sys
import time

allocator = sys.argv[1]
os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
if allocator == "expandable":
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
if allocator == "gpupool":
    import gpupool.torch

    gpupool.torch.enable()
import torch  # noqa: E402

torch.empty(1, device="cuda")
for size in (4096, 1 << 20, 16 << 20):
    rounds = []
    for _ in range(5):
        count = 10000
        start = time.perf_counter_ns()
        for _ in range(count):
            tensor = torch.empty(size, dtype=torch.uint8, device="cuda")
            del tensor
        rounds.append((time.perf_counter_ns() - start) / count)
    print(f"{allocator} {size} bytes: {statistics.median(rounds):.0f} ns per empty + del")
