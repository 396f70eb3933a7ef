#!/usr/bin/env python3
"""Records real PyTorch workloads on a CUDA GPU as gpupool allocation traces.

    python3 devscripts/record_workloads.py --out DIR [--only NAME ...] [--scale S]
    python3 devscripts/record_workloads.py --self-test      # no GPU or torch needed

Each workload runs with random weights built from a config (nothing is downloaded) while
PyTorch's CUDA caching allocator records its history
(``torch.cuda.memory._record_memory_history(enabled="all", context=None, ...)``); then
``torch.cuda.memory._snapshot()["device_traces"][0]`` (device 0) is converted into gpupool's
trace format and written to ``DIR/NAME.csv.gz``:

    op,id,size,stream
    a,ID,SIZE,STREAM     allocate buffer ID of SIZE bytes on STREAM (0 = default stream)
    f,ID,SIZE,STREAM     free it

Workloads (each a few seconds to ~a minute on an H200, 10k-200k events at --scale 1):

  gpt2_generate      GPT-2-small-sized LM (12 layers, 768 wide, bf16) generating with a growing
                     KV cache: a manual decode loop over past_key_values (transformers'
                     DynamicCache, which grows by concatenation), sampling, four requests of
                     batch 1-8, prompts of 48-400 tokens, 40-128 new tokens each (280 decoding
                     steps; each step costs ~650 allocator events).
  effnet_prefetch    EfficientNet-B0 training (fp32, SGD, 40 steps) on uint8 image batches copied to the
                     GPU on a side stream one step ahead, handed to the compute stream with
                     wait_stream + Tensor.record_stream (so their frees are delayed until the
                     compute stream is done with them), batch 32-96, resolution 160-224.
  bert_serve_2stream BERT-base encoder inference (bf16) serving requests from two threads, each
                     on its own torch.cuda.Stream, 120 requests each, batch 1-32 x sequence
                     16-384 with padding masks, results copied back to the host.
  vit_varres_train   ViT-B/16 training (40 steps) with bf16 autocast and AdamW at varying batch (16-64) and
                     resolution (160-288): timm's vit_base_patch16_224 with dynamic_img_size
                     when timm is there, else torchvision's vit_b_16 at 224 with varying batch.

Conversion (``convert_device_trace``, a pure function tested by --self-test):

* ``alloc`` -> ``a`` with a fresh dense id (ids are never reused). The allocator reuses an
  address after a free, so the converter keeps address -> current id of the live block.
* ``free_completed`` -> ``f``. PyTorch records two events per free: ``free_requested`` when the
  tensor dies, ``free_completed`` when the block is really back in the allocator's pool. They
  differ only for blocks used on other streams (``record_stream``): the allocator keeps such a
  block until the other streams' events complete. The replay peers have no knowledge of
  cross-stream use, so the moment the memory becomes reusable (``free_completed``) is the one
  that reproduces the allocator's real live set; ``free_requested`` would let a replay reuse
  memory that a kernel on another stream may still touch. Where a history has no
  ``free_completed`` at all (older PyTorch), ``free_requested`` is used instead.
* The size of an ``f`` line is the size of its ``a`` line (gpupool's parser requires it); the
  event's own size is only compared and counted. The stream is the event's stream (a CUDA
  stream handle as an integer, 0 = the default stream).
* Segment events (segment_alloc, segment_free, segment_map, segment_unmap), ``snapshot``,
  ``oom`` and the other free kind are skipped: only block allocations are kept.
* A free of an address with no live block (allocated before recording began) is skipped; an
  ``alloc`` at an address that is still live (a lost free) first frees the old id.
* Blocks live at the end are never freed. With --max-events the trace is cut after that many
  lines (then also some blocks stay live).
"""

import argparse
import collections
import gzip
import io
import json
import os
import sys
import time

FREE_COMPLETED = "free_completed"
FREE_REQUESTED = "free_requested"


# ------------------------------------------------------------------------------------------------
# Conversion (pure)

def convert_device_trace(events, free_action=None):
    """Converts one device's snapshot trace entries to trace rows.

    events: iterable of dicts with keys 'action', 'addr', 'size', 'stream' (as in
    torch.cuda.memory._snapshot()['device_traces'][device]).
    free_action: 'free_completed' or 'free_requested'; None picks free_completed when the
    history has any, else free_requested.

    Returns (rows, info): rows is a list of (op, id, size, stream) tuples with op 'a' or 'f';
    info a dict of counts (actions seen, frees skipped, size mismatches, ...).
    """
    events = list(events)
    actions = collections.Counter(e.get("action") for e in events)
    if free_action is None:
        free_action = FREE_COMPLETED if actions.get(FREE_COMPLETED) else FREE_REQUESTED
    if free_action not in (FREE_COMPLETED, FREE_REQUESTED):
        raise ValueError(f"free_action must be {FREE_COMPLETED} or {FREE_REQUESTED}")
    live = {}  # address -> (id, size)
    rows = []
    next_id = 0
    info = {
        "free_action": free_action,
        "actions": dict(actions),
        "frees_of_unknown_address": 0,
        "lost_frees": 0,
        "free_size_mismatches": 0,
        "free_stream_differs": 0,
        "zero_size_allocs": 0,
    }
    alloc_stream = {}
    for e in events:
        action = e.get("action")
        if action == "alloc":
            addr = int(e["addr"])
            size = int(e["size"])
            stream = int(e.get("stream", 0)) & 0xFFFFFFFFFFFFFFFF
            if addr in live:
                old_id, old_size = live.pop(addr)
                rows.append(("f", old_id, old_size, alloc_stream.pop(old_id)))
                info["lost_frees"] += 1
            if size <= 0:
                info["zero_size_allocs"] += 1
                continue
            live[addr] = (next_id, size)
            alloc_stream[next_id] = stream
            rows.append(("a", next_id, size, stream))
            next_id += 1
        elif action == free_action:
            addr = int(e["addr"])
            block = live.pop(addr, None)
            if block is None:
                info["frees_of_unknown_address"] += 1
                continue
            block_id, size = block
            if int(e.get("size", size)) != size:
                info["free_size_mismatches"] += 1
            a_stream = alloc_stream.pop(block_id)
            stream = int(e.get("stream", a_stream)) & 0xFFFFFFFFFFFFFFFF
            if stream != a_stream:
                info["free_stream_differs"] += 1
            rows.append(("f", block_id, size, stream))
        # Everything else (segment_*, snapshot, oom, the other free kind) is skipped.
    return rows, info


def delayed_frees(events):
    """Counts blocks whose free_completed came after another event than their free_requested
    (frees that waited for another stream, i.e. record_stream at work)."""
    pending = {}
    delayed = 0
    for i, e in enumerate(events):
        a = e.get("action")
        if a == FREE_REQUESTED:
            pending[e.get("addr")] = i
        elif a == FREE_COMPLETED:
            j = pending.pop(e.get("addr"), None)
            if j is not None and j != i - 1:
                delayed += 1
    return delayed


def truncate(rows, max_events):
    """The first max_events rows (the buffers live at the cut stay live)."""
    return rows if max_events is None or len(rows) <= max_events else rows[:max_events]


def trace_stats(rows):
    """Checks rows as gpupool's parser does and returns events, allocations, frees, peak live
    bytes, live at end and the distinct streams. Raises ValueError on an invalid trace."""
    live = {}
    live_bytes = peak = 0
    allocs = frees = 0
    streams = []
    seen_streams = set()
    for n, (op, i, size, stream) in enumerate(rows, start=1):
        if stream not in seen_streams:
            seen_streams.add(stream)
            streams.append(stream)
        if op == "a":
            if size <= 0:
                raise ValueError(f"row {n}: allocation of {size} bytes")
            if i in live:
                raise ValueError(f"row {n}: id {i} allocated while live")
            live[i] = size
            live_bytes += size
            peak = max(peak, live_bytes)
            allocs += 1
        elif op == "f":
            if i not in live:
                raise ValueError(f"row {n}: free of unknown id {i}")
            if live[i] != size:
                raise ValueError(f"row {n}: free of id {i} with size {size} != {live[i]}")
            live_bytes -= live.pop(i)
            frees += 1
        else:
            raise ValueError(f"row {n}: bad op {op!r}")
    return {
        "events": len(rows),
        "allocations": allocs,
        "frees": frees,
        "live_at_end": len(live),
        "peak_live_bytes": peak,
        "streams": streams,
    }


def format_rows(rows):
    """The trace as CSV text, header first."""
    out = io.StringIO()
    out.write("op,id,size,stream\n")
    for op, i, size, stream in rows:
        out.write(f"{op},{i},{size},{stream}\n")
    return out.getvalue()


def write_trace(path, rows):
    """Writes rows gzip-compressed (mtime 0, so the same rows give the same bytes)."""
    data = format_rows(rows).encode()
    with open(path, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as g:
            g.write(data)


def read_trace(path):
    with gzip.open(path, "rt") as f:
        lines = f.read().splitlines()
    assert lines[0] == "op,id,size,stream"
    rows = []
    for line in lines[1:]:
        op, i, size, stream = line.split(",")
        rows.append((op, int(i), int(size), int(stream)))
    return rows


# ------------------------------------------------------------------------------------------------
# Self-test (no torch needed)

def self_test():
    import tempfile
    S = 0x55550000AAAA  # a side stream handle
    snapshot = {
        "segments": [],
        "device_traces": [[
            {"action": "segment_alloc", "addr": 0x1000, "size": 2 << 20, "stream": 0},
            {"action": "free_requested", "addr": 0x7000, "size": 512, "stream": 0},  # before recording
            {"action": "free_completed", "addr": 0x7000, "size": 512, "stream": 0},
            {"action": "alloc", "addr": 0x1000, "size": 512, "stream": 0},           # id 0
            {"action": "alloc", "addr": 0x2000, "size": 1024, "stream": S},          # id 1
            {"action": "free_requested", "addr": 0x1000, "size": 512, "stream": 0},
            {"action": "free_completed", "addr": 0x1000, "size": 512, "stream": 0},
            {"action": "alloc", "addr": 0x1000, "size": 2048, "stream": 0},          # id 2, reused address
            {"action": "free_requested", "addr": 0x2000, "size": 1024, "stream": S},  # record_stream: delayed
            {"action": "alloc", "addr": 0x3000, "size": 4096, "stream": 0},          # id 3
            {"action": "segment_map", "addr": 0x9000, "size": 2 << 20, "stream": 0},
            {"action": "free_completed", "addr": 0x2000, "size": 1024, "stream": S},
            {"action": "oom", "addr": 123, "size": 1 << 40, "stream": 0},
            {"action": "alloc", "addr": 0x2000, "size": 1536, "stream": S},          # id 4
            {"action": "snapshot", "addr": 0, "size": 0, "stream": 0},
            {"action": "free_requested", "addr": 0x1000, "size": 2048, "stream": 0},
            {"action": "free_completed", "addr": 0x1000, "size": 2048, "stream": 0},
            {"action": "segment_free", "addr": 0x1000, "size": 2 << 20, "stream": 0},
        ]],
    }
    events = snapshot["device_traces"][0]
    rows, info = convert_device_trace(events)
    expect = [
        ("a", 0, 512, 0), ("a", 1, 1024, S), ("f", 0, 512, 0), ("a", 2, 2048, 0),
        ("a", 3, 4096, 0), ("f", 1, 1024, S), ("a", 4, 1536, S), ("f", 2, 2048, 0),
    ]
    assert rows == expect, rows
    assert info["free_action"] == FREE_COMPLETED
    assert info["frees_of_unknown_address"] == 1
    assert info["lost_frees"] == 0 and info["free_size_mismatches"] == 0
    assert delayed_frees(events) == 1
    st = trace_stats(rows)
    assert st == {"events": 8, "allocations": 5, "frees": 3, "live_at_end": 2,
                  "peak_live_bytes": 2048 + 4096 + 1536, "streams": [0, S]}, st

    # free_requested only: frees happen at request time (the side-stream block earlier).
    rq = [e for e in events if e["action"] != FREE_COMPLETED]
    rows_rq, info_rq = convert_device_trace(rq)
    assert info_rq["free_action"] == FREE_REQUESTED
    assert rows_rq == [
        ("a", 0, 512, 0), ("a", 1, 1024, S), ("f", 0, 512, 0), ("a", 2, 2048, 0),
        ("f", 1, 1024, S), ("a", 3, 4096, 0), ("a", 4, 1536, S), ("f", 2, 2048, 0),
    ], rows_rq
    # Asking for free_requested explicitly on the full history gives the same.
    assert convert_device_trace(events, FREE_REQUESTED)[0] == rows_rq

    # A lost free: an address allocated again while live frees the old id first.
    lost = [
        {"action": "alloc", "addr": 1, "size": 512, "stream": 0},
        {"action": "alloc", "addr": 1, "size": 1024, "stream": 0},
        {"action": "free_completed", "addr": 1, "size": 1000, "stream": 0},
    ]
    rows_l, info_l = convert_device_trace(lost)
    assert rows_l == [("a", 0, 512, 0), ("f", 0, 512, 0), ("a", 1, 1024, 0), ("f", 1, 1024, 0)]
    assert info_l["lost_frees"] == 1 and info_l["free_size_mismatches"] == 1
    trace_stats(rows_l)

    # Truncation keeps a valid trace.
    assert trace_stats(truncate(rows, 5))["live_at_end"] == 3
    # Invalid traces are refused.
    for bad in ([("f", 0, 512, 0)], [("a", 0, 512, 0), ("a", 0, 512, 0)],
                [("a", 0, 512, 0), ("f", 0, 1024, 0)], [("a", 0, 0, 0)]):
        try:
            trace_stats(bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"accepted {bad}")

    # Round trip through the file format, byte-stable.
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "t.csv.gz")
        write_trace(p, rows)
        assert read_trace(p) == rows
        first = open(p, "rb").read()
        write_trace(p, rows)
        assert open(p, "rb").read() == first
        with gzip.open(p, "rt") as f:
            assert f.readline() == "op,id,size,stream\n"
            assert f.readline() == "a,0,512,0\n"
    print("self-test: 7 passed, 0 failed")


# ------------------------------------------------------------------------------------------------
# Workloads (torch imported lazily, so --self-test runs without it)

def wl_gpt2_generate(scale):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
    model = GPT2LMHeadModel(cfg).to("cuda", dtype=torch.bfloat16).eval()
    # (batch, prompt tokens, new tokens)
    # About 650 trace events per decoding step: 280 steps give ~180k events.
    requests = [(1, 48, 128), (4, 200, 56), (8, 96, 40), (2, 400, 56)]
    done = 0
    with torch.inference_mode():
        for bs, plen, new in requests:
            new = max(4, int(new * scale))
            ids = torch.randint(0, cfg.vocab_size, (bs, plen), device="cuda")
            out = model(input_ids=ids, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1, :].argmax(-1, keepdim=True)
            generated = [tok]
            for _ in range(new - 1):
                out = model(input_ids=tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                probs = torch.softmax(out.logits[:, -1, :].float() / 0.8, dim=-1)
                tok = torch.multinomial(probs, 1)
                generated.append(tok)
            text = torch.cat(generated, dim=1).cpu()
            done += text.numel()
            del out, past, tok, generated, ids, probs
    return {"tokens_generated": done}


def wl_effnet_prefetch(scale):
    import torch
    import torch.nn.functional as F
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(weights=None, num_classes=1000).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                          weight_decay=1e-5)
    plan_cycle = [(64, 224), (32, 224), (96, 160), (48, 192), (80, 176)]
    steps = max(3, int(40 * scale))  # ~2.5k events a step
    plan = [plan_cycle[i % len(plan_cycle)] for i in range(steps)]
    host_x = {}
    host_y = {}
    for bs, res in set(plan):
        host_x[(bs, res)] = torch.randint(0, 256, (bs, 3, res, res), dtype=torch.uint8).pin_memory()
        host_y[bs] = torch.randint(0, 1000, (bs,), dtype=torch.int64).pin_memory()
    mean = torch.tensor([0.485, 0.456, 0.406], device="cuda").view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(1, 3, 1, 1) * 255
    copy_stream = torch.cuda.Stream()
    compute = torch.cuda.current_stream()

    def prefetch(i):
        bs, res = plan[i]
        with torch.cuda.stream(copy_stream):
            x = host_x[(bs, res)].to("cuda", non_blocking=True)
            y = host_y[bs].to("cuda", non_blocking=True)
        return x, y

    nxt = prefetch(0)
    for i in range(steps):
        compute.wait_stream(copy_stream)
        x8, y = nxt
        x8.record_stream(compute)
        y.record_stream(compute)
        if i + 1 < steps:
            nxt = prefetch(i + 1)  # the next copy overlaps this step's compute
        x = (x8.float() - mean) / std
        out = model(x)
        loss = F.cross_entropy(out, y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        del x8, y, x, out, loss
    torch.cuda.synchronize()
    return {"steps": steps}


def wl_bert_serve_2stream(scale):
    import random
    import threading
    import torch
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig()  # BERT-base: 12 layers, 768 wide, 12 heads
    model = BertModel(cfg, add_pooling_layer=False).to("cuda", dtype=torch.bfloat16).eval()
    n_requests = max(4, int(120 * scale))  # ~600 events a request
    errors = []
    served = [0, 0]

    def worker(k):
        try:
            rng = random.Random(100 + k)
            stream = torch.cuda.Stream()
            torch.cuda.set_device(0)
            with torch.inference_mode(), torch.cuda.stream(stream):
                for _ in range(n_requests):
                    bs = rng.choice([1, 2, 4, 8, 16, 32])
                    seq = rng.choice([16, 32, 64, 128, 192, 256, 384])
                    ids = torch.randint(0, cfg.vocab_size, (bs, seq), device="cuda")
                    lens = torch.randint(seq // 4, seq + 1, (bs,), device="cuda")
                    mask = (torch.arange(seq, device="cuda")[None, :] < lens[:, None]).long()
                    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
                    m = mask.unsqueeze(-1).to(hidden.dtype)
                    emb = (hidden * m).sum(1) / m.sum(1)
                    emb = torch.nn.functional.normalize(emb.float(), dim=-1)
                    result = emb.cpu()  # waits for this stream only
                    served[k] += result.shape[0]
        except Exception as exc:  # reported by the caller
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    torch.cuda.synchronize()
    if errors:
        raise RuntimeError("serving thread failed: " + "; ".join(errors))
    return {"requests_per_thread": n_requests, "sequences_served": served}


def wl_vit_varres_train(scale):
    import torch
    import torch.nn.functional as F
    torch.manual_seed(0)
    source = None
    try:
        import timm
        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=1000,
                                  dynamic_img_size=True)
        plan_cycle = [(32, 224), (64, 160), (16, 288), (48, 192), (24, 256)]
        source = f"timm {timm.__version__} vit_base_patch16_224 dynamic_img_size"
    except Exception as exc:
        import torchvision
        model = torchvision.models.vit_b_16(weights=None)
        plan_cycle = [(32, 224), (64, 224), (16, 224), (48, 224), (24, 224)]
        source = f"torchvision vit_b_16, fixed 224 (timm unavailable: {exc!r})"
    model = model.cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    steps = max(3, int(40 * scale))  # ~2.6k events a step
    for i in range(steps):
        bs, res = plan_cycle[i % len(plan_cycle)]
        x = torch.randn(bs, 3, res, res, device="cuda")
        y = torch.randint(0, 1000, (bs,), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
            loss = F.cross_entropy(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        del x, y, out, loss
    torch.cuda.synchronize()
    return {"steps": steps, "model": source}


WORKLOADS = {
    "gpt2_generate": wl_gpt2_generate,
    "effnet_prefetch": wl_effnet_prefetch,
    "bert_serve_2stream": wl_bert_serve_2stream,
    "vit_varres_train": wl_vit_varres_train,
}


def record(name, fn, scale, out_dir, max_entries, max_events):
    import gc
    import torch
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.memory._record_memory_history(enabled=None)
    torch.cuda.memory._record_memory_history(
        enabled="all", context=None, stacks="python", max_entries=max_entries,
        clear_history=True)
    t0 = time.time()
    extra = fn(scale)
    torch.cuda.synchronize()
    seconds = time.time() - t0
    gc.collect()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    traces = snap.get("device_traces", [])
    events = traces[0] if traces else []
    if len(events) >= max_entries:
        print(f"{name}: WARNING: history has {len(events)} entries = max_entries; the start "
              "was overwritten", file=sys.stderr)
    rows, info = convert_device_trace(events)
    full = len(rows)
    rows = truncate(rows, max_events)
    stats = trace_stats(rows)
    path = os.path.join(out_dir, f"{name}.csv.gz")
    write_trace(path, rows)
    summary = {
        "trace": name,
        "file": path,
        "bytes_gz": os.path.getsize(path),
        "seconds": round(seconds, 2),
        "events": stats["events"],
        "events_before_cut": full,
        "allocations": stats["allocations"],
        "frees": stats["frees"],
        "live_at_end": stats["live_at_end"],
        "peak_live_bytes": stats["peak_live_bytes"],
        "peak_live_gib": round(stats["peak_live_bytes"] / 2**30, 3),
        "streams": len(stats["streams"]),
        "stream_values": stats["streams"],
        "delayed_frees": delayed_frees(events),
        "history_entries": len(events),
        "torch_max_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
        **{k: v for k, v in info.items()},
        **(extra or {}),
    }
    del snap, events
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="directory for NAME.csv.gz")
    ap.add_argument("--only", nargs="*", choices=sorted(WORKLOADS), help="workloads to run")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiplies each workload's steps / tokens / requests (default 1)")
    ap.add_argument("--max-entries", type=int, default=3_000_000,
                    help="allocator history ring size (default 3,000,000)")
    ap.add_argument("--max-events", type=int, default=250_000,
                    help="cut each trace after this many lines (default 250,000)")
    ap.add_argument("--self-test", action="store_true", help="test the conversion and exit")
    args = ap.parse_args()
    if args.self_test:
        self_test()
        return 0
    if not args.out:
        ap.error("--out is required")
    try:
        import torch
    except ImportError as exc:
        print(f"record_workloads.py: PyTorch is needed to record: {exc}", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print("record_workloads.py: no CUDA device", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    try:
        import transformers
        print(f"transformers {transformers.__version__}", flush=True)
    except Exception as exc:
        print(f"transformers unavailable: {exc!r}", flush=True)
    failures = 0
    names = args.only or list(WORKLOADS)
    for name in names:
        try:
            s = record(name, WORKLOADS[name], args.scale, args.out, args.max_entries,
                       args.max_events)
            print(json.dumps(s), flush=True)
            print(f"{name}: {s['events']:,} events, peak live {s['peak_live_gib']} GiB, "
                  f"{s['streams']} stream(s), {s['seconds']} s, {s['bytes_gz'] / 1e6:.2f} MB",
                  flush=True)
        except Exception:
            import traceback
            failures += 1
            print(f"{name}: FAILED", flush=True)
            traceback.print_exc()
            try:
                torch.cuda.memory._record_memory_history(enabled=None)
            except Exception:
                pass
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
