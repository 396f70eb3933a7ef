"""gpupool's statistics under the key names of ``torch.cuda.memory_stats()``.

Under a pluggable allocator PyTorch's own ``torch.cuda.memory_stats()`` raises
(``CUDAPluggableAllocator::getDeviceStats`` is ``TORCH_CHECK(false, ...)``), so
``gpupool.torch.memory_stats()`` computes the same keys from gpupool's statistics document
(``gpupool_stats_json``: the pool's ``PoolStats``, and the C boundary's counters under
``ffi``). Only the ``all`` pool is reported: gpupool's classes and large arena are not PyTorch's
small and large pools. The mapping (PyTorch key: gpupool figure):

- ``allocated_bytes.all.current``: ``ffi.allocated_bytes``, block bytes of live allocations
  (PyTorch too counts the rounded sizes); ``.peak``: ``ffi.allocated_bytes_peak``;
  ``.allocated`` / ``.freed``: ``ffi.allocated_bytes_total`` / ``ffi.freed_bytes_total``
  (block bytes over all time).
- ``requested_bytes.all.current`` / ``.peak``: ``ffi.requested_bytes`` /
  ``ffi.requested_bytes_peak``, the bytes asked for.
- ``reserved_bytes.all.current``: ``totals.reserved_bytes + totals.pending_release_bytes``,
  everything held from the device, blocks waiting for GPU work before their release included;
  ``.peak``: ``totals.peak_reserved_bytes`` (never below the current figure).
- ``active_bytes.all.current`` / ``.peak``: as ``allocated_bytes`` (gpupool counts a freed
  block whose stream work is still pending as cached, not active).
- ``allocation.all.current`` / ``.peak``: ``ffi.live_pointers`` / ``ffi.live_pointers_peak``;
  ``.allocated`` / ``.freed``: ``ffi.allocations`` / ``ffi.frees``. ``active.all.current`` /
  ``.peak``: the same.
- ``segment.all.current``: ``totals.blocks_held``, backend allocations not released (class
  blocks, arena segments, mapped handles: each one ``cuMemAlloc`` or one mapping).
- ``inactive_split_bytes.all.current``: ``devices[*].large.free_bytes``, free space inside the
  large arena's segments or mapped pages. PyTorch counts only free pieces of segments that
  also hold live blocks; this figure also holds wholly free segments a trim would return, so
  it is an upper bound of PyTorch's.
- ``num_device_alloc`` / ``num_device_free``: ``totals.backend_allocations`` /
  ``totals.backend_releases``.
- ``num_ooms``: ``ffi.out_of_memory``, allocations refused for lack of memory or budget.
- ``num_alloc_retries``: ``totals.alloc_retries``, allocations tried again after out of
  memory or the budget made the pool release its idle memory.
"""

from __future__ import annotations

from typing import Any, Dict


def torch_memory_stats(document: Dict[str, Any]) -> Dict[str, int]:
    """``torch.cuda.memory_stats()``'s keys from a gpupool statistics document, sorted."""
    totals = document["totals"]
    ffi = document["ffi"]
    reserved = totals["reserved_bytes"] + totals["pending_release_bytes"]
    arena_free = sum(device["large"]["free_bytes"] for device in document["devices"])
    stats = {
        "allocated_bytes.all.current": ffi["allocated_bytes"],
        "allocated_bytes.all.peak": ffi["allocated_bytes_peak"],
        "allocated_bytes.all.allocated": ffi["allocated_bytes_total"],
        "allocated_bytes.all.freed": ffi["freed_bytes_total"],
        "requested_bytes.all.current": ffi["requested_bytes"],
        "requested_bytes.all.peak": ffi["requested_bytes_peak"],
        "reserved_bytes.all.current": reserved,
        "reserved_bytes.all.peak": max(totals["peak_reserved_bytes"], reserved),
        "active_bytes.all.current": ffi["allocated_bytes"],
        "active_bytes.all.peak": ffi["allocated_bytes_peak"],
        "allocation.all.current": ffi["live_pointers"],
        "allocation.all.peak": ffi["live_pointers_peak"],
        "allocation.all.allocated": ffi["allocations"],
        "allocation.all.freed": ffi["frees"],
        "active.all.current": ffi["live_pointers"],
        "active.all.peak": ffi["live_pointers_peak"],
        "segment.all.current": totals["blocks_held"],
        "inactive_split_bytes.all.current": arena_free,
        "num_device_alloc": totals["backend_allocations"],
        "num_device_free": totals["backend_releases"],
        "num_ooms": ffi["out_of_memory"],
        "num_alloc_retries": totals["alloc_retries"],
    }
    return dict(sorted(stats.items()))
