"""gpupool.torch's PyTorch-named statistics, checked against real statistics of the C library.

No torch and no GPU needed: the library runs on its host backend, allocations are made through
ctypes as PyTorch's pluggable allocator makes them, and the torch parts are checked with a
stand-in module where they need one. Build the library first::

    cargo build -p gpupool-ffi            # or --release; or point GPUPOOL_LIB at a build
    python3 python/tests/test_stats_mapping.py      # or: python3 -m pytest python/tests

Each test uses device indices of its own (the host backend serves any index below 64): the
library's pools are process-wide.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import types
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["GPUPOOL_BACKEND"] = "host"  # read by the library at its first use

import gpupool  # noqa: E402
import gpupool.torch as gpupool_torch  # noqa: E402
from gpupool import _lib  # noqa: E402

MiB = 1 << 20


def alloc(size: int, device: int) -> int:
    pointer = _lib.lib().gpupool_alloc(size, device, None)
    if not pointer:
        raise AssertionError(f"allocation of {size} failed: {_lib.last_error()}")
    return pointer


def free(pointer: int, size: int, device: int) -> None:
    _lib.lib().gpupool_free(pointer, size, device, None)


class TorchKeyMapping(unittest.TestCase):
    def test_keys_follow_the_pools_figures(self) -> None:
        device = 1
        small = alloc(1000, device)  # the 1 KiB class
        large = alloc(3 * MiB, device)  # the large arena
        medium = alloc(5000, device)  # the 8 KiB class
        free(large, 3 * MiB, device)

        stats = gpupool_torch.memory_stats(device)
        document = gpupool.stats(device)
        totals = document["totals"]
        block_bytes = 1024 + 8192
        self.assertEqual(stats["allocated_bytes.all.current"], block_bytes)
        self.assertEqual(stats["allocated_bytes.all.peak"], block_bytes + 3 * MiB)
        self.assertEqual(stats["allocated_bytes.all.allocated"], block_bytes + 3 * MiB)
        self.assertEqual(stats["allocated_bytes.all.freed"], 3 * MiB)
        self.assertEqual(stats["allocated_bytes.all.current"], totals["in_use_bytes"])
        self.assertEqual(stats["requested_bytes.all.current"], 6000)
        self.assertEqual(stats["requested_bytes.all.peak"], 6000 + 3 * MiB)
        self.assertEqual(stats["active_bytes.all.current"], block_bytes)
        self.assertEqual(stats["active_bytes.all.peak"], block_bytes + 3 * MiB)
        self.assertEqual(stats["allocation.all.current"], 2)
        self.assertEqual(stats["allocation.all.peak"], 3)
        self.assertEqual(stats["allocation.all.allocated"], 3)
        self.assertEqual(stats["allocation.all.freed"], 1)
        self.assertEqual(stats["active.all.current"], 2)
        reserved = totals["reserved_bytes"] + totals["pending_release_bytes"]
        self.assertEqual(stats["reserved_bytes.all.current"], reserved)
        self.assertGreaterEqual(stats["reserved_bytes.all.current"], block_bytes + 3 * MiB)
        self.assertEqual(stats["reserved_bytes.all.peak"], totals["peak_reserved_bytes"])
        self.assertEqual(stats["segment.all.current"], totals["blocks_held"])
        self.assertEqual(stats["segment.all.current"], 3, "two class blocks and one segment")
        arena = document["devices"][0]["large"]
        self.assertEqual(stats["inactive_split_bytes.all.current"], arena["free_bytes"])
        self.assertEqual(arena["free_bytes"], arena["segment_bytes"], "the segment is free")
        self.assertEqual(stats["num_device_alloc"], totals["backend_allocations"])
        self.assertEqual(stats["num_device_free"], totals["backend_releases"])
        self.assertEqual(stats["num_ooms"], 0)
        self.assertEqual(stats["num_alloc_retries"], 0)
        self.assertEqual(list(stats), sorted(stats), "sorted, as torch.cuda.memory_stats()")

        self.assertEqual(gpupool_torch.memory_allocated(device), block_bytes)
        self.assertEqual(gpupool_torch.max_memory_allocated(device), block_bytes + 3 * MiB)
        self.assertEqual(gpupool_torch.memory_reserved(device), reserved)
        self.assertEqual(gpupool_torch.max_memory_reserved(device), totals["peak_reserved_bytes"])
        self.assertEqual(gpupool_torch.memory_stats(f"cuda:{device}"), stats)

        free(small, 1000, device)
        free(medium, 5000, device)
        gpupool_torch.empty_cache()
        after = gpupool_torch.memory_stats(device)
        self.assertEqual(after["allocated_bytes.all.current"], 0)
        self.assertEqual(after["reserved_bytes.all.current"], 0)
        self.assertEqual(after["segment.all.current"], 0)

    def test_refusals_are_counted_as_ooms(self) -> None:
        device = 2
        gpupool.set_budget_bytes(device, 1 * MiB)
        told = []
        _lib.set_oom_callback(lambda *failure: told.append(failure))
        try:
            self.assertFalse(_lib.lib().gpupool_alloc(2 * MiB, device, None))
        finally:
            _lib.set_oom_callback(None)
        self.assertEqual(_lib.last_error_code(), _lib.GPUPOOL_ERR_OUT_OF_MEMORY)
        self.assertIn("budget exceeded", _lib.last_error())
        self.assertEqual(len(told), 1)
        self.assertEqual(told[0][:2], (device, 2 * MiB))
        self.assertEqual(gpupool_torch.memory_stats(device)["num_ooms"], 1)
        # Above the whole budget: refused without emptying the cache, so no retry.
        self.assertEqual(gpupool_torch.memory_stats(device)["num_alloc_retries"], 0)
        # A cached 512 KiB block and a new 1 MiB one do not fit the budget together: the
        # cached block is released and the allocation retried, once.
        lib = _lib.lib()
        small = lib.gpupool_alloc(512 * 1024, device, None)
        self.assertTrue(small)
        lib.gpupool_free(small, 512 * 1024, device, None)
        larger = lib.gpupool_alloc(1 * MiB, device, None)
        self.assertTrue(larger)
        self.assertEqual(gpupool_torch.memory_stats(device)["num_alloc_retries"], 1)
        lib.gpupool_free(larger, 1 * MiB, device, None)
        with self.assertRaises(gpupool.GpupoolError) as raised:
            gpupool.set_budget_bytes(device, 4 * MiB)
        self.assertEqual(raised.exception.code, _lib.GPUPOOL_ERR_TOO_LATE)

    def test_a_device_without_a_pool_reports_zeros(self) -> None:
        stats = gpupool_torch.memory_stats(9)
        self.assertTrue(all(value == 0 for value in stats.values()), stats)
        self.assertFalse(gpupool.stats(9)["created"])


class PythonSide(unittest.TestCase):
    def test_config_strings_from_keywords(self) -> None:
        text = gpupool.config_string(
            steps_per_doubling=4, budget_bytes=1 << 30, large_threshold_bytes=None, pooling=True
        )
        self.assertEqual(
            text,
            "steps_per_doubling=4,budget_bytes=1073741824,large_threshold_bytes=none,pooling=true",
        )
        with self.assertRaises(TypeError):
            gpupool.config_string(colour="blue")
        self.assertEqual(len(gpupool.CONFIG_KEYS), 17)
        with self.assertRaises(gpupool.GpupoolError) as raised:
            gpupool.configure("steps_per_doubling=four")
        self.assertEqual(raised.exception.code, _lib.GPUPOOL_ERR_CONFIG)

    def test_dashboard_and_trace_recording(self) -> None:
        device = 3
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "trace.csv"
            with gpupool_torch.record_trace(path):
                pointer = alloc(4096, device)
                free(pointer, 4096, device)
            self.assertEqual(
                path.read_text().splitlines(),
                ["op,id,size,stream", "a,0,4096,0", "f,0,4096,0"],
            )
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            gpupool_torch.dashboard(device)
        self.assertIn("Overall Statistics", printed.getvalue())
        self.assertEqual(gpupool_torch.stats(device)["ffi"]["allocations"], 1)


@contextlib.contextmanager
def stand_in_torch(cuda_initialized: bool):
    """A `torch` module with just what gpupool.torch.enable() touches, recording the calls."""
    calls = []

    class Allocator:
        def __init__(self, path, alloc_name, free_name):
            calls.append(("CUDAPluggableAllocator", path, alloc_name, free_name))
            self.hooks = types.SimpleNamespace(
                set_reset_fn=lambda address: calls.append(("set_reset_fn", address)),
                set_record_stream_fn=lambda address: calls.append(("set_record_stream_fn", address)),
                set_memory_fraction_fn=lambda address: calls.append(("set_memory_fraction_fn", address)),
            )

        def allocator(self):
            return self.hooks

    memory = types.SimpleNamespace(
        CUDAPluggableAllocator=Allocator,
        change_current_allocator=lambda allocator: calls.append(("change_current_allocator",)),
    )
    cuda = types.SimpleNamespace(is_initialized=lambda: cuda_initialized, memory=memory)
    module = types.ModuleType("torch")
    module.cuda = cuda
    saved = sys.modules.get("torch")
    sys.modules["torch"] = module
    try:
        yield module, calls
    finally:
        if saved is None:
            del sys.modules["torch"]
        else:
            sys.modules["torch"] = saved


class EnableWithoutAGpu(unittest.TestCase):
    def test_enable_refuses_once_cuda_is_initialised(self) -> None:
        with stand_in_torch(cuda_initialized=True):
            with self.assertRaisesRegex(RuntimeError, "before CUDA is initialised"):
                gpupool_torch.enable()
        self.assertFalse(gpupool_torch.is_enabled())

    def test_enable_needs_the_cuda_backend(self) -> None:
        with stand_in_torch(cuda_initialized=False) as (_, calls):
            with self.assertRaisesRegex(RuntimeError, "backend is 'host'"):
                gpupool_torch.enable(oom="null")
        self.assertEqual(calls, [])

    def test_bad_arguments_fail_before_anything_changes(self) -> None:
        with self.assertRaises(ValueError):
            gpupool_torch.enable(oom="sometimes")
        with self.assertRaises(TypeError):
            gpupool_torch.enable(colour="blue")

    def test_the_pluggable_allocator_gets_gpupools_functions_and_hooks(self) -> None:
        with stand_in_torch(cuda_initialized=False) as (torch, calls):
            path, alloc_name, free_name, raises = gpupool_torch._allocation_functions(torch, "null")
            allocator = torch.cuda.memory.CUDAPluggableAllocator(path, alloc_name, free_name)
            gpupool_torch._install_hooks(allocator.allocator())
        self.assertEqual(path, _lib.library_path())
        self.assertFalse(raises)
        self.assertEqual(calls[0], ("CUDAPluggableAllocator", path, "gpupool_alloc", "gpupool_free"))
        hooks = dict(call for call in calls[1:])
        self.assertEqual(hooks["set_reset_fn"], _lib.address("gpupool_torch_empty_cache"))
        self.assertEqual(hooks["set_record_stream_fn"], _lib.address("gpupool_torch_record_stream"))
        self.assertEqual(
            hooks["set_memory_fraction_fn"], _lib.address("gpupool_torch_set_memory_fraction")
        )

    def test_without_a_shim_auto_falls_back_to_null_and_raise_refuses(self) -> None:
        # The stand-in has no torch.utils.cpp_extension: the shim cannot be built.
        with stand_in_torch(cuda_initialized=False) as (torch, _):
            with self.assertWarnsRegex(RuntimeWarning, "falling back to oom='null'"):
                path, alloc_name, _, raises = gpupool_torch._allocation_functions(torch, "auto")
            self.assertEqual((path, alloc_name, raises), (_lib.library_path(), "gpupool_alloc", False))
            with self.assertRaisesRegex(RuntimeError, "oom='raise' needs the out-of-memory shim"):
                gpupool_torch._allocation_functions(torch, "raise")

    def test_check_oom_raises_for_a_failure_pytorch_got_as_null(self) -> None:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            gpupool_torch._remember_oom(0, 123, "out of memory: test")
        self.assertIn("receives a NULL pointer", stderr.getvalue())
        self.assertEqual(gpupool_torch.last_oom(), (0, 123, "out of memory: test"))
        with stand_in_torch(cuda_initialized=False) as (torch, _):
            torch.OutOfMemoryError = type("OutOfMemoryError", (RuntimeError,), {})
            with self.assertRaisesRegex(torch.OutOfMemoryError, "123 bytes"):
                gpupool_torch.check_oom()
            gpupool_torch.check_oom()  # reported once


if __name__ == "__main__":
    unittest.main(verbosity=2)
