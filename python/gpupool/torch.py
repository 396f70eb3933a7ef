"""gpupool as PyTorch's CUDA allocator.

Usage::

    import gpupool.torch
    gpupool.torch.enable(steps_per_doubling=4)      # before the first CUDA tensor
    ...
    gpupool.torch.memory_stats()["allocated_bytes.all.peak"]
    gpupool.torch.dashboard()

``enable`` hands ``gpupool_alloc``/``gpupool_free`` to
``torch.cuda.memory.CUDAPluggableAllocator`` and ``change_current_allocator``, and wires the
allocator's optional hooks to gpupool: ``torch.cuda.empty_cache()`` (``set_reset_fn``),
``Tensor.record_stream`` (``set_record_stream_fn``) and
``torch.cuda.set_per_process_memory_fraction`` (``set_memory_fraction_fn``; like
:func:`set_memory_fraction` it only works before the device's first allocation).
``torch.cuda.memory_stats()`` raises under a pluggable allocator
(``CUDAPluggableAllocator::getDeviceStats`` is ``TORCH_CHECK(false, ...)``); use
:func:`memory_stats` here, which reports the same keys (mapping: ``gpupool/_memory_stats.py``).
This module imports torch only inside the functions that need it.

Out of memory: what PyTorch 2.11 does with a NULL from a pluggable allocator
----------------------------------------------------------------------------

Read in PyTorch's source (pytorch/pytorch at commit 5815a9e45ab5, the version of
``torch/csrc/cuda/CUDAPluggableAllocator.cpp`` in the code index used; line numbers are that
file's) and checked against the 2.11.0 wheel itself (``torch-2.11.0+cu130``, git
70d99e99: the disassembly of ``libtorch_cuda.so``, its headers and ``torch/cuda/memory.py``):

1. ``CUDAPluggableAllocator::malloc`` (CUDAPluggableAllocator.cpp lines 83-93) calls
   ``alloc_fn_(size, device, stream)``, inserts the result, NULL included, into
   ``allocation_metadata_`` under its mutex, and returns it. No check. In the 2.11.0 binary the
   function's only throws are ``std::bad_function_call`` (no ``alloc_fn_``) and
   ``std::system_error`` (the mutex): nothing tests the returned pointer.
2. ``CUDAPluggableAllocator::allocate`` (lines 95-103; ``C10_CUDA_CHECK`` of ``GetDevice`` at
   line 97, the line the 2.11.0 binary passes to ``c10_cuda_check_implementation``) wraps that
   pointer in a ``DataPtr`` unchecked, and ``c10::StorageImpl``'s allocating constructor
   (``c10/core/StorageImpl.h`` lines 76-88 in 2.11.0: ``allocator->allocate(size_bytes...)``)
   and ``at::detail::_empty_generic`` (``aten/src/ATen/EmptyTensor.cpp``) build the tensor
   from it unchecked too.

   So ``torch.empty(n, device="cuda")`` with an ``alloc_fn`` returning NULL gives a tensor
   whose ``data_ptr()`` is 0, and no error. The first kernel that touches it faults
   (``cudaErrorIllegalAddress``, which poisons the CUDA context for the rest of the process)
   or a host copy crashes. That is the "not reliable" part: nothing turns NULL into an
   exception on this path.
3. PyTorch's own allocators *throw*: ``TORCH_CHECK_WITH(OutOfMemoryError, ...)`` inside their
   ``malloc``/``allocate`` (``c10/cuda/CUDACachingAllocator.cpp``;
   ``c10/cuda/CUDAMallocAsyncAllocator.cpp``'s ``allocate`` checks
   ``size < one_exa_bytes`` the same way, then ``void* r = nullptr; if (size != 0)
   mallocAsync(...)``, which is also why a size-0 request gets NULL). A
   ``c10::OutOfMemoryError`` thrown below a Python binding becomes ``torch.OutOfMemoryError``
   (``torch/csrc/Exceptions.h``: ``_CATCH_GENERIC_ERROR(OutOfMemoryError,
   THPException_OutOfMemoryError, ...)``).
4. ``torch._C._cuda_customAllocator(malloc_ptr, free_ptr)`` (``torch/csrc/cuda/Module.cpp``)
   wraps the raw function pointers in ``std::function<void*(size_t, int, cudaStream_t)>``, so
   an exception thrown by the allocation function travels up through ``alloc_fn_`` exactly
   like the native allocator's, before ``malloc`` touches its map (the call is its first
   statement).
5. The other route that does turn NULL into an exception: a ``torch.cuda.MemPool`` whose
   allocator is a pluggable one. There the *native* caching allocator calls it for segments
   (``allocPrimitive`` in ``CUDACachingAllocator.cpp``: ``*ptr = ...->allocator()->
   raw_alloc(size); return *ptr ? cudaSuccess : cudaErrorMemoryAllocation;``) and runs its own
   out-of-memory path (free cached blocks, retry, ``OutOfMemoryError``); 2.11's
   ``torch.cuda._use_uvm`` relies on it ("CUDACachingAllocator will raise an OOM error").
   But then PyTorch's caching allocator splits and caches segments on top of gpupool, which
   defeats gpupool's own placement and statistics, so ``enable`` does not use it.

Size 0: ``gpupool_alloc(0, ...)`` returns NULL without an error, as PyTorch's own allocators
do (point 3). Through the pluggable path that NULL goes into ``allocation_metadata_`` and a
``DataPtr`` whose deleter never runs for a NULL context, so PyTorch never frees it (and
``gpupool_free(NULL, ...)`` is a no-op if anything did).

What ``enable`` does about a NULL for a non-zero size, per ``oom=``:

- ``"raise"``: compiles ``_oom_shim.cpp`` (a few lines of C++) against the installed torch's
  headers and ``libc10`` with the system C++ compiler (``$CXX`` or ``c++``; cached in
  ``$GPUPOOL_SHIM_DIR`` or ``~/.cache/gpupool``, keyed by torch version and source) and gives
  PyTorch the shim's ``gpupool_torch_alloc``/``gpupool_torch_free``. They call gpupool and, on
  NULL for a non-zero size, throw ``c10::OutOfMemoryError`` when gpupool's last error code is
  ``GPUPOOL_ERR_OUT_OF_MEMORY`` (``torch.OutOfMemoryError`` in Python, message "CUDA out of
  memory (gpupool): " and gpupool's own, which states what was asked and what the pool
  holds), else ``c10::Error`` (``RuntimeError``). The exception starts in C++ after gpupool
  returned; it never unwinds through Rust. Failing to build the shim is an error.
- ``"auto"`` (default): as ``"raise"``; if the shim cannot be built (no compiler, no
  headers), warns and falls back to ``"null"``.
- ``"null"``: PyTorch gets ``gpupool_alloc`` itself; an allocation failure gives it NULL
  (point 2). The out-of-memory callback writes gpupool's message to stderr at once, keeps it
  for :func:`last_oom`, and :func:`check_oom` raises ``torch.OutOfMemoryError`` for it after
  the fact.

In every mode :func:`last_oom` returns the latest failure ``(device, bytes, message)`` and
``memory_stats()["num_ooms"]`` counts them.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

from . import _lib
from ._config import config_string
from ._memory_stats import torch_memory_stats

__all__ = [
    "enable",
    "is_enabled",
    "memory_stats",
    "memory_allocated",
    "max_memory_allocated",
    "memory_reserved",
    "max_memory_reserved",
    "empty_cache",
    "dashboard",
    "stats",
    "record_trace",
    "set_memory_fraction",
    "last_oom",
    "check_oom",
]

_OOM_MODES = ("auto", "raise", "null")


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.allocator: Any = None
        self.raises_oom = False
        self.last_oom: Optional[Tuple[int, int, str]] = None
        self.unchecked_oom: Optional[Tuple[int, int, str]] = None


_state = _State()


def _remember_oom(device: int, requested: int, message: str) -> None:
    failure = (device, requested, message)
    _state.last_oom = failure
    if not _state.raises_oom:
        _state.unchecked_oom = failure
        sys.stderr.write(
            f"gpupool: allocation of {requested} bytes on device {device} failed, and PyTorch "
            f"receives a NULL pointer (oom='null'): {message}\n"
        )


def _device_index(device: Any) -> int:
    """A device index from an int, ``"cuda:N"`` or a ``torch.device`` (None: 0)."""
    if device is None:
        return 0
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    if isinstance(device, str):
        kind, _, number = device.partition(":")
        if kind == "cuda":
            return int(number or 0)
    elif getattr(device, "type", None) == "cuda":
        return getattr(device, "index", None) or 0
    raise TypeError(f"gpupool: not a CUDA device: {device!r}")


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as error:
        raise ImportError("gpupool.torch.enable() needs PyTorch (pip install torch)") from error
    return torch


def _shim_path(torch: Any) -> str:
    """Builds (once per torch version and source) the out-of-memory shim; returns its path."""
    from torch.utils import cpp_extension

    source = Path(__file__).with_name("_oom_shim.cpp")
    compiler = os.environ.get("CXX", "c++")
    abi = int(bool(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True)))
    includes = cpp_extension.include_paths()
    libraries = cpp_extension.library_paths()
    identity = "\0".join([torch.__version__, str(abi), compiler, *includes])
    key = hashlib.sha256(source.read_bytes() + identity.encode()).hexdigest()[:16]
    cache = Path(
        os.environ.get("GPUPOOL_SHIM_DIR")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpupool"
    )
    target = cache / f"gpupool_torch_shim_{key}.so"
    if target.is_file():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".gpupool_torch_shim_{key}.{os.getpid()}.so"
    command = [
        compiler,
        "-O2",
        "-std=c++17",
        "-shared",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *[f"-I{path}" for path in includes],
        str(source),
        "-o",
        str(partial),
        *[f"-L{path}" for path in libraries],
        "-lc10",
        *[f"-Wl,-rpath,{path}" for path in libraries],
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as error:
        raise RuntimeError(f"cannot run the C++ compiler {compiler!r}: {error}") from error
    if result.returncode != 0:
        raise RuntimeError(
            f"compiling gpupool's out-of-memory shim failed:\n  {' '.join(command)}\n"
            f"{result.stderr[-4000:]}"
        )
    os.replace(partial, target)
    return str(target)


def _bind_shim(path: str) -> None:
    shim = ctypes.CDLL(path)
    bind = shim.gpupool_torch_shim_bind
    bind.argtypes = [ctypes.c_void_p] * 4
    bind.restype = None
    bind(
        _lib.address("gpupool_alloc"),
        _lib.address("gpupool_free"),
        _lib.address("gpupool_last_error"),
        _lib.address("gpupool_last_error_code"),
    )


def _allocation_functions(torch: Any, oom: str) -> Tuple[str, str, str, bool]:
    """(library path, alloc name, free name, whether out of memory raises)."""
    plain = (_lib.library_path(), "gpupool_alloc", "gpupool_free", False)
    if oom == "null":
        return plain
    try:
        path = _shim_path(torch)
        _bind_shim(path)
    except Exception as error:
        if oom == "raise":
            raise RuntimeError(f"gpupool: oom='raise' needs the out-of-memory shim: {error}") from error
        warnings.warn(
            f"gpupool: the out-of-memory shim could not be built ({error}); falling back to "
            "oom='null': an allocation failure gives PyTorch a NULL pointer instead of "
            "torch.OutOfMemoryError (see gpupool.torch's documentation)",
            RuntimeWarning,
            stacklevel=3,
        )
        return plain
    return path, "gpupool_torch_alloc", "gpupool_torch_free", True


def _install_hooks(allocator: Any) -> None:
    """Wires PyTorch's optional pluggable-allocator hooks to gpupool, where this torch has them."""
    hooks = {
        "set_reset_fn": "gpupool_torch_empty_cache",
        "set_record_stream_fn": "gpupool_torch_record_stream",
        "set_memory_fraction_fn": "gpupool_torch_set_memory_fraction",
    }
    for setter, function in hooks.items():
        if hasattr(allocator, setter):
            getattr(allocator, setter)(_lib.address(function))


def enable(*, oom: str = "auto", **config: Any) -> None:
    """Makes gpupool PyTorch's CUDA allocator, with ``config`` as its configuration.

    ``config`` takes the ``PoolConfigBuilder`` setter names (``steps_per_doubling=4``,
    ``budget_bytes=8 << 30``, ``large_threshold_bytes=None``, ...). ``oom`` chooses what an
    allocation failure does (module documentation): ``"auto"``, ``"raise"`` or ``"null"``.

    Must run before CUDA is initialised (before the first CUDA tensor, ``torch.cuda.init()``,
    ``torch.cuda.current_stream()`` and the like): PyTorch refuses to swap an allocator that
    has served memory, so this raises ``RuntimeError`` when ``torch.cuda.is_initialized()``.
    """
    if oom not in _OOM_MODES:
        raise ValueError(f"gpupool: oom={oom!r}: expected one of {', '.join(_OOM_MODES)}")
    text = config_string(**config)
    torch = _import_torch()
    with _state.lock:
        if _state.allocator is not None:
            raise RuntimeError("gpupool.torch.enable() was called already")
        if torch.cuda.is_initialized():
            raise RuntimeError(
                "gpupool.torch.enable() must run before CUDA is initialised (before the first "
                "CUDA tensor or torch.cuda call that touches the device): PyTorch cannot swap "
                "an allocator that has served memory"
            )
        if text:
            _lib.configure(text)
        backend = _lib.backend()
        if backend != "cuda":
            raise RuntimeError(
                f"gpupool's backend is {backend!r}, and PyTorch needs 'cuda': no CUDA driver "
                "was found, or GPUPOOL_BACKEND chose another backend"
            )
        path, alloc_name, free_name, raises = _allocation_functions(torch, oom)
        _state.raises_oom = raises
        _lib.set_oom_callback(_remember_oom)
        allocator = torch.cuda.memory.CUDAPluggableAllocator(path, alloc_name, free_name)
        _install_hooks(allocator.allocator())
        torch.cuda.memory.change_current_allocator(allocator)
        _state.allocator = allocator


def is_enabled() -> bool:
    """Whether :func:`enable` installed gpupool in this process."""
    return _state.allocator is not None


def stats(device: Any = 0) -> Dict[str, Any]:
    """gpupool's raw statistics document of ``device`` (``gpupool_stats_json``)."""
    return _lib.stats(_device_index(device))


def memory_stats(device: Any = 0) -> Dict[str, int]:
    """``torch.cuda.memory_stats()``'s keys, computed from gpupool's statistics."""
    return torch_memory_stats(stats(device))


def memory_allocated(device: Any = 0) -> int:
    """Bytes of live allocations (``allocated_bytes.all.current``)."""
    return memory_stats(device)["allocated_bytes.all.current"]


def max_memory_allocated(device: Any = 0) -> int:
    """The most bytes allocated at once (``allocated_bytes.all.peak``)."""
    return memory_stats(device)["allocated_bytes.all.peak"]


def memory_reserved(device: Any = 0) -> int:
    """Bytes held from the device (``reserved_bytes.all.current``)."""
    return memory_stats(device)["reserved_bytes.all.current"]


def max_memory_reserved(device: Any = 0) -> int:
    """The most bytes held from the device at once (``reserved_bytes.all.peak``)."""
    return memory_stats(device)["reserved_bytes.all.peak"]


def empty_cache() -> None:
    """Gives every idle block back to the devices (what ``torch.cuda.empty_cache()`` does)."""
    _lib.empty_cache()


def dashboard(device: Any = 0) -> None:
    """Prints gpupool's dashboard of ``device``'s pool."""
    print(_lib.dashboard(_device_index(device)), end="")


def set_memory_fraction(fraction: float, device: Any = 0) -> None:
    """Caps ``device``'s pool at ``fraction`` of its memory; only before its first allocation.

    Raises :class:`gpupool.GpupoolError` (code ``GPUPOOL_ERR_TOO_LATE``) afterwards: a
    pool's budget is fixed when the pool is made.
    """
    _lib.set_memory_fraction(fraction, _device_index(device))


@contextlib.contextmanager
def record_trace(path: "os.PathLike[str] | str") -> Iterator[None]:
    """Records every allocation and free inside the block into ``path``, a trace
    ``gpupool replay`` reads (``op,id,size,stream`` CSV)."""
    _lib.record_trace_start(os.fspath(path))
    try:
        yield
    finally:
        _lib.record_trace_stop()


def last_oom() -> Optional[Tuple[int, int, str]]:
    """The latest allocation failure as ``(device, bytes, message)``, or None."""
    return _state.last_oom


def check_oom() -> None:
    """With ``oom="null"``: raises ``torch.OutOfMemoryError`` for a failure PyTorch received as
    NULL since the last check (the tensor it made has no memory; do not use it)."""
    failure, _state.unchecked_oom = _state.unchecked_oom, None
    if failure is not None:
        device, requested, message = failure
        error = getattr(_import_torch(), "OutOfMemoryError", MemoryError)
        raise error(f"CUDA out of memory (gpupool, device {device}, {requested} bytes): {message}")
