"""gpupool: a GPU memory pool with exact statistics, from Python.

``import gpupool`` loads nothing heavy: the C library (``libgpupool_ffi``, bundled in the wheel)
is loaded on first use through ctypes, and PyTorch only by :mod:`gpupool.torch`, which makes
gpupool PyTorch's CUDA allocator (``gpupool.torch.enable()``).

Without PyTorch, the C API works as it is (``host`` and ``sim`` backends need no GPU;
``GPUPOOL_BACKEND`` or :func:`init` choose)::

    import gpupool
    gpupool.init("host")
    print(gpupool.stats(0)["totals"]["reserved_bytes"])
    print(gpupool.dashboard(0))
"""

from ._config import KEYS as CONFIG_KEYS
from ._config import config_string
from ._lib import (
    GpupoolError,
    backend,
    configure,
    dashboard,
    empty_cache,
    init,
    last_error,
    library_path,
    record_trace_start,
    record_trace_stop,
    set_budget_bytes,
    set_memory_fraction,
    stats,
)
from ._memory_stats import torch_memory_stats

__version__ = "0.1.0"

__all__ = [
    "CONFIG_KEYS",
    "GpupoolError",
    "backend",
    "config_string",
    "configure",
    "dashboard",
    "empty_cache",
    "init",
    "last_error",
    "library_path",
    "record_trace_start",
    "record_trace_stop",
    "set_budget_bytes",
    "set_memory_fraction",
    "stats",
    "torch_memory_stats",
]
