#!/usr/bin/env python3
"""Real PyTorch programs on one allocator: issue 12's comparison of PyTorch's caching
allocator, the same with expandable segments, and gpupool plugged in through
``gpupool.torch.enable()``.

One workload and one allocator per process (the allocator must be chosen before CUDA starts):

    python3 benches/pytorch/real_workloads.py --allocator gpupool --workload gpt2_train --out r.json

Workloads (random weights, no downloads, every input from a fixed seed):
  gpt2_train      GPT-2 small (124 M) training, AdamW, bf16 autocast, batch and sequence length
                  varying per step from a seeded schedule (default 200 steps)
  resnet50_train  torchvision ResNet-50 training, SGD, bf16 autocast, batch 64 or 96 at 224x224
                  (default 60 steps)
  llm_generate    GPT-2 medium (355 M) greedy generation with a KV cache, batches of 1-16
                  prompts of 32-256 tokens, 256 new tokens each (default 12 generations)

Reported per run (JSON): the loss (or a checksum of the generated tokens) of every step, the
median time per step after warm-up (CUDA synchronised at each step end), and the peak device
memory the process used, read from the driver (``cudaMemGetInfo``: total - free, sampled every
0.5 ms by a thread and at each step end, minus the reading after CUDA started and before the
workload). Deterministic algorithms are on, so every allocator must give bitwise equal losses.
"""
import argparse
import json
import os
import statistics
import threading
import time

WARMUP_STEPS = 5


def choose_allocator(name):
    os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    os.environ.pop("PYTORCH_ALLOC_CONF", None)
    if name == "expandable":
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    import torch

    if name == "gpupool":
        import gpupool.torch

        gpupool.torch.enable()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return torch


class DeviceMemory:
    """Peak of (total - free) device memory, polled by a thread, above a starting reading."""

    def __init__(self, torch):
        self.torch = torch
        free, total = torch.cuda.mem_get_info()
        self.total = total
        self.start = total - free
        self.peak = self.start
        self.running = True
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def read(self):
        free, _ = self.torch.cuda.mem_get_info()
        used = self.total - free
        if used > self.peak:
            self.peak = used
        return used

    def poll(self):
        while self.running:
            self.read()
            time.sleep(0.0005)

    def stop(self):
        self.running = False
        self.thread.join()
        self.read()
        return self.peak - self.start


def gpt2_train(torch, steps):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config()).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = torch.Generator().manual_seed(1)
    for step in range(steps):
        batch = int(torch.randint(4, 17, (1,), generator=schedule))
        length = int(torch.randint(128, 1025, (1,), generator=schedule))
        tokens = torch.randint(0, 50257, (batch, length), generator=schedule).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield float(loss)


def resnet50_train(torch, steps):
    import torchvision

    model = torchvision.models.resnet50(weights=None).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    schedule = torch.Generator().manual_seed(2)
    for step in range(steps):
        batch = 64 if step % 3 else 96
        images = torch.randn(batch, 3, 224, 224, generator=schedule).cuda()
        labels = torch.randint(0, 1000, (batch,), generator=schedule).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield float(loss)


def llm_generate(torch, steps):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=24, n_head=16, n_embd=1024)
    model = GPT2LMHeadModel(config).cuda().eval().to(torch.bfloat16)
    schedule = torch.Generator().manual_seed(3)
    batches = [1, 4, 8, 16]
    for step in range(steps):
        batch = batches[step % len(batches)]
        length = int(torch.randint(32, 257, (1,), generator=schedule))
        prompt = torch.randint(0, 50257, (batch, length), generator=schedule).cuda()
        with torch.no_grad():
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=256,
                min_new_tokens=256,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        # A checksum of the tokens stands in for a loss: equal outputs, equal sums.
        yield int((out.long() * torch.arange(1, out.shape[1] + 1, device=out.device)).sum())


WORKLOADS = {
    "gpt2_train": (gpt2_train, 200),
    "resnet50_train": (resnet50_train, 60),
    "llm_generate": (llm_generate, 12),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allocator", choices=["default", "expandable", "gpupool"], required=True)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--record-trace",
        help="gpupool only: record the run's allocations here (replay them with `gpupool replay`)",
    )
    args = parser.parse_args()
    torch = choose_allocator(args.allocator)
    torch.cuda.init()
    torch.cuda.synchronize()
    memory = DeviceMemory(torch)
    run, default_steps = WORKLOADS[args.workload]
    steps = args.steps or default_steps
    outputs, times = [], []
    recording = None
    if args.record_trace:
        import gpupool.torch

        recording = gpupool.torch.record_trace(args.record_trace)
        recording.__enter__()
    start = time.perf_counter()
    for output in run(torch, steps):
        torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - start)
        start = now
        memory.read()
        outputs.append(output)
    if recording is not None:
        recording.__exit__(None, None, None)
    peak_bytes = memory.stop()
    result = {
        "allocator": args.allocator,
        "workload": args.workload,
        "steps": steps,
        "outputs": outputs,
        "step_ms_median": statistics.median(times[min(WARMUP_STEPS, len(times) - 1) :]) * 1e3,
        "step_ms": [t * 1e3 for t in times],
        "peak_device_bytes": peak_bytes,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
    }
    if args.allocator == "gpupool":
        import gpupool.torch

        result["gpupool_stats"] = gpupool.torch.memory_stats()
    else:
        result["torch_stats"] = {
            key: value
            for key, value in torch.cuda.memory_stats().items()
            if key in ("allocated_bytes.all.peak", "reserved_bytes.all.peak", "num_alloc_retries")
        }
    with open(args.out, "w") as handle:
        json.dump(result, handle)
    print(
        f"{args.workload} {args.allocator}: {result['step_ms_median']:.1f} ms/step, "
        f"peak device memory {peak_bytes / 2**30:.3f} GiB"
    )


if __name__ == "__main__":
    main()
