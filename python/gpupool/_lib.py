"""ctypes bindings of the gpupool C library (``crates/gpupool-ffi``, header ``gpupool.h``).

The library is found, in order, at ``$GPUPOOL_LIB``; inside the installed package
(``gpupool/gpupool_ffi/libgpupool_ffi.so``, where the wheel puts it); in a source checkout's
``target/release`` or ``target/debug`` (the newer of the two). It is loaded once, on first use, and every function's
signature is declared here, so a wrong argument type fails in Python instead of in C.

Errors: the C functions return a code (``GPUPOOL_OK`` = 0) or NULL and leave a thread-local
message; the wrappers here raise :class:`GpupoolError` with both.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Optional

GPUPOOL_OK = 0
GPUPOOL_ERR_INVALID_ARGUMENT = -1
GPUPOOL_ERR_CONFIG = -2
GPUPOOL_ERR_TOO_LATE = -3
GPUPOOL_ERR_UNKNOWN_POINTER = -4
GPUPOOL_ERR_BACKEND = -5
GPUPOOL_ERR_IO = -6
GPUPOOL_ERR_INTERNAL = -7
GPUPOOL_ERR_OUT_OF_MEMORY = -8

#: ``void (*)(int device, size_t requested, const char *message)``
OOM_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_size_t, ctypes.c_char_p)


class GpupoolError(RuntimeError):
    """A gpupool C function failed; ``code`` is its ``GPUPOOL_ERR_*`` code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _library_file_name() -> str:
    return "libgpupool_ffi.dylib" if sys.platform == "darwin" else "libgpupool_ffi.so"


def library_path() -> str:
    """The path of the gpupool C library this package loads (see the module documentation)."""
    override = os.environ.get("GPUPOOL_LIB")
    if override:
        if not Path(override).is_file():
            raise OSError(f"GPUPOOL_LIB={override!r} is not a file")
        return str(Path(override).resolve())
    name = _library_file_name()
    package = Path(__file__).resolve().parent
    bundled = package / "gpupool_ffi" / name
    if bundled.is_file():
        return str(bundled)
    checkout = package.parent.parent
    built = [checkout / "target" / profile / name for profile in ("release", "debug")]
    existing = [candidate for candidate in built if candidate.is_file()]
    if existing:
        # The newer build: a stale release library must not shadow a fresh debug one.
        return str(max(existing, key=lambda candidate: candidate.stat().st_mtime))
    candidates = [bundled, *built]
    searched = ", ".join(str(candidate) for candidate in candidates)
    raise OSError(
        f"gpupool: {name} not found (searched {searched}); build it with "
        "`cargo build --release -p gpupool-ffi` or set GPUPOOL_LIB"
    )


_SIGNATURES = {
    "gpupool_alloc": ([ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p),
    "gpupool_free": ([ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p], None),
    "gpupool_record_stream": ([ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
    "gpupool_empty_cache": ([], ctypes.c_int),
    "gpupool_set_budget_bytes": ([ctypes.c_int, ctypes.c_uint64], ctypes.c_int),
    "gpupool_set_memory_fraction": ([ctypes.c_double, ctypes.c_int], ctypes.c_int),
    # Strings to free come back as void pointers, so ctypes does not copy and lose them.
    "gpupool_stats_json": ([ctypes.c_int], ctypes.c_void_p),
    "gpupool_dashboard": ([ctypes.c_int], ctypes.c_void_p),
    "gpupool_string_free": ([ctypes.c_void_p], None),
    "gpupool_configure": ([ctypes.c_char_p], ctypes.c_int),
    "gpupool_last_error": ([], ctypes.c_char_p),
    "gpupool_last_error_code": ([], ctypes.c_int),
    "gpupool_init": ([ctypes.c_char_p], ctypes.c_int),
    "gpupool_backend": ([], ctypes.c_char_p),
    "gpupool_set_oom_callback": ([OOM_CALLBACK], None),
    "gpupool_record_trace_start": ([ctypes.c_char_p], ctypes.c_int),
    "gpupool_record_trace_stop": ([], ctypes.c_int),
    "gpupool_torch_empty_cache": ([], None),
    "gpupool_torch_record_stream": ([ctypes.c_void_p, ctypes.c_void_p], None),
    "gpupool_torch_set_memory_fraction": ([ctypes.c_double, ctypes.c_int], None),
}

_loaded: Optional[ctypes.CDLL] = None
_load_lock = threading.Lock()


def lib() -> ctypes.CDLL:
    """The loaded library, with every function's signature declared."""
    global _loaded
    if _loaded is None:
        with _load_lock:
            if _loaded is None:
                library = ctypes.CDLL(library_path())
                for name, (arguments, result) in _SIGNATURES.items():
                    function = getattr(library, name)
                    function.argtypes = arguments
                    function.restype = result
                _loaded = library
    return _loaded


def address(name: str) -> int:
    """The address of the exported function ``name`` (for PyTorch's allocator hooks)."""
    value = ctypes.cast(getattr(lib(), name), ctypes.c_void_p).value
    if value is None:
        raise OSError(f"gpupool: {name} has no address")
    return value


def last_error() -> Optional[str]:
    """This thread's last error message, or None."""
    message = lib().gpupool_last_error()
    return message.decode("utf-8", "replace") if message is not None else None


def last_error_code() -> int:
    """The ``GPUPOOL_ERR_*`` code of this thread's last error, or ``GPUPOOL_OK``."""
    return lib().gpupool_last_error_code()


def _check(code: int, action: str) -> None:
    if code != GPUPOOL_OK:
        raise GpupoolError(code, f"gpupool: {action}: {last_error()}")


def _take_string(pointer: Optional[int], action: str) -> str:
    if not pointer:
        raise GpupoolError(last_error_code(), f"gpupool: {action}: {last_error()}")
    try:
        return ctypes.string_at(pointer).decode("utf-8")
    finally:
        lib().gpupool_string_free(pointer)


def init(backend: str) -> None:
    """Chooses the backend (``cuda``, ``host``, ``sim``, ``auto``) before the first allocation."""
    _check(lib().gpupool_init(backend.encode()), f"init({backend!r})")


def backend() -> str:
    """The backend the pools use (decided now if nothing decided it)."""
    name = lib().gpupool_backend()
    if name is None:
        raise GpupoolError(last_error_code(), f"gpupool: backend: {last_error()}")
    return name.decode()


def configure(text: str) -> None:
    """Applies a configuration string (``key=value,...``) before the first allocation."""
    _check(lib().gpupool_configure(text.encode()), f"configure({text!r})")


def set_budget_bytes(device: int, budget: int) -> None:
    """Caps ``device``'s pool at ``budget`` bytes; only before its first allocation."""
    _check(lib().gpupool_set_budget_bytes(device, budget), f"set_budget_bytes({device}, {budget})")


def set_memory_fraction(fraction: float, device: int) -> None:
    """Caps ``device``'s pool at ``fraction`` of its memory; only before its first allocation."""
    _check(
        lib().gpupool_set_memory_fraction(float(fraction), device),
        f"set_memory_fraction({fraction}, {device})",
    )


def empty_cache() -> None:
    """Gives every idle block of every pool back to its device."""
    _check(lib().gpupool_empty_cache(), "empty_cache()")


def stats(device: int = 0) -> Dict[str, Any]:
    """The statistics document of ``device`` (the pool's ``PoolStats`` plus ``ffi`` counters)."""
    return json.loads(_take_string(lib().gpupool_stats_json(device), f"stats({device})"))


def dashboard(device: int = 0) -> str:
    """The library's text dashboard of ``device``'s pool."""
    return _take_string(lib().gpupool_dashboard(device), f"dashboard({device})")


def record_trace_start(path: str) -> None:
    """Starts recording allocations and frees into ``path`` (``gpupool replay``'s format)."""
    _check(lib().gpupool_record_trace_start(os.fsencode(path)), f"record_trace_start({path!r})")


def record_trace_stop() -> None:
    """Stops recording and flushes the trace file."""
    _check(lib().gpupool_record_trace_stop(), "record_trace_stop()")


_callback_keepalive: Optional[Any] = None


def set_oom_callback(callback: Optional[Callable[[int, int, str], None]]) -> None:
    """Calls ``callback(device, requested_bytes, message)`` on every allocation the pool refuses.

    It runs on the allocating thread, inside the allocation; exceptions it raises are printed
    and dropped (ctypes cannot carry them through C).
    """
    global _callback_keepalive
    if callback is None:
        lib().gpupool_set_oom_callback(OOM_CALLBACK())
        _callback_keepalive = None
        return

    def trampoline(device: int, requested: int, message: bytes) -> None:
        callback(device, requested, message.decode("utf-8", "replace"))

    function = OOM_CALLBACK(trampoline)
    lib().gpupool_set_oom_callback(function)
    # The C side keeps only the address: the ctypes object must live as long as it is installed.
    _callback_keepalive = function
