//! The C ABI of gpupool: a shared library that C, C++ and PyTorch load.
//!
//! **What.** `gpupool_alloc` and `gpupool_free` have exactly the signatures PyTorch's
//! `CUDAPluggableAllocator` loads (`void* alloc(ssize_t size, int device, cudaStream_t stream)`,
//! `void free(void* ptr, ssize_t size, int device, cudaStream_t stream)`), so
//! `torch.cuda.memory.CUDAPluggableAllocator("libgpupool_ffi.so", "gpupool_alloc",
//! "gpupool_free")` puts gpupool under every CUDA tensor; the `gpupool_torch_*` functions have
//! the signatures of that allocator's optional hooks (`empty_cache`, `record_stream`,
//! `set_per_process_memory_fraction`). Around them: configuration, statistics (JSON, the
//! dashboard), trace recording in the format `gpupool replay` reads, and errors as codes plus
//! a thread-local message. The header `include/gpupool.h` is generated from this file by
//! cbindgen (a test keeps it current); `python/gpupool` is the Python package over it.
//!
//! **Why it is shaped so.** C frees by address and PyTorch calls plain functions with no
//! handle, while the library's API is ownership (`PooledBuffer` returns its block on drop). So
//! the boundary keeps one pool per device in process-wide slots created on first use
//! (`registry`), and every buffer it hands out in a sharded pointer map (`pointers`) until
//! `gpupool_free` drops it. Misuse that C makes easy (double frees, unknown pointers, negative
//! sizes, bad strings) is reported, never undefined: a return code or NULL with the message in
//! `gpupool_last_error`; frees of pointers that are not live are also counted in the
//! statistics and logged as `tracing` warnings.
//!
//! **Unsafe code** lives here because this is the FFI boundary: reading C strings, giving C
//! strings back and taking them back to free, calling C's callback (`oom`), and registering
//! C's CUDA streams with the backend (`streams`: the driver must only ever see live streams,
//! which only the caller can promise). Every exported function runs its body under
//! `catch_unwind` (`boundary`), so no panic unwinds into C. The modules that need no unsafe
//! code forbid it.
//!
//! Modules: `boundary` (the panic guard), `errors` (codes, last error), `registry` (settings,
//! per-device pools), `device` (one pool as C uses it), `pointers` (the pointer map),
//! `streams`, `counters`, `report` (JSON, dashboard), `config_string`, `trace`, `oom`,
//! `backend_choice`.
#![deny(missing_docs, unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod backend_choice;
mod boundary;
mod config_string;
mod counters;
mod device;
mod errors;
mod oom;
mod pointers;
mod registry;
mod report;
mod streams;
mod trace;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;

pub use errors::{
    GPUPOOL_ERR_BACKEND, GPUPOOL_ERR_CONFIG, GPUPOOL_ERR_INTERNAL, GPUPOOL_ERR_INVALID_ARGUMENT,
    GPUPOOL_ERR_IO, GPUPOOL_ERR_OUT_OF_MEMORY, GPUPOOL_ERR_TOO_LATE, GPUPOOL_ERR_UNKNOWN_POINTER,
    GPUPOOL_OK,
};
pub use registry::GPUPOOL_MAX_DEVICES;

use backend_choice::BackendKind;

use boundary::{code, guarded, value};
use errors::{report, FfiError};

/// Reads a C string argument as UTF-8.
///
/// # Safety
/// `text` is null or points to a NUL-terminated string that stays valid during the call.
unsafe fn text_argument<'a>(text: *const c_char, what: &str) -> Result<&'a str, FfiError> {
    if text.is_null() {
        return Err(FfiError::InvalidArgument(format!("{what} is NULL")));
    }
    // SAFETY: non-null, and NUL-terminated and valid for the call by the caller's promise.
    let text = unsafe { CStr::from_ptr(text) };
    text.to_str()
        .map_err(|_| FfiError::InvalidArgument(format!("{what} is not UTF-8")))
}

/// Hands `text` to C, to be freed with `gpupool_string_free`.
fn c_string(text: String) -> Result<*mut c_char, FfiError> {
    CString::new(text)
        .map(CString::into_raw)
        .map_err(|_| FfiError::Internal("a report contains a NUL byte".into()))
}

/// Allocates `size` bytes on `device`, ordered on `stream`; returns NULL on failure.
///
/// PyTorch's pluggable-allocator signature. `size` 0 returns NULL without an error, as
/// PyTorch's own allocators do for empty tensors (they never free that NULL; freeing it is a
/// no-op here too). A negative size, a bad device, or a refusal of the pool returns NULL and
/// sets the last error; when the pool refused or could not serve the request, the
/// out-of-memory callback, if any, is told first.
/// The last error of an out-of-memory failure is the pool's message: what was asked, what the
/// pool holds, what the device has free. The pool of `device` is created at its first
/// allocation (with the backend, configuration and budget in force then).
///
/// # Safety
/// With the CUDA backend, `stream` is NULL (the legacy default stream) or a live
/// `cudaStream_t` of the device's primary context that stays alive for as long as the process
/// uses gpupool: the pool records events and queues work on it later, whenever a buffer of that
/// stream is freed or reused. PyTorch's streams qualify (they come from its stream pools and
/// are never destroyed). Other backends treat `stream` as an id only.
#[no_mangle]
pub unsafe extern "C" fn gpupool_alloc(
    size: libc::ssize_t,
    device: c_int,
    stream: *mut c_void,
) -> *mut c_void {
    let result = guarded(|| {
        let index = registry::device_index(device)?;
        let counters = registry::counters(index)?;
        let bytes = usize::try_from(size).map_err(|_| {
            counters.failed_allocation(false);
            FfiError::InvalidArgument(format!("size {size}: a size cannot be negative"))
        })?;
        if bytes == 0 {
            counters.zero_size_allocation();
            return Ok(std::ptr::null_mut());
        }
        let pool = registry::pool(index);
        // SAFETY: `stream`'s promise is this function's contract.
        let allocated =
            pool.and_then(|pool| unsafe { pool.allocate(bytes, stream as usize as u64, counters) });
        match allocated {
            Ok(address) => Ok(address as usize as *mut c_void),
            Err(error) => {
                counters.failed_allocation(device::is_out_of_memory(&error));
                report(&error);
                oom::notify(index, bytes, &error.to_string());
                Ok(std::ptr::null_mut())
            }
        }
    });
    result.unwrap_or_else(|error| {
        report(&error);
        std::ptr::null_mut()
    })
}

/// Frees what `gpupool_alloc` returned. NULL is a no-op.
///
/// PyTorch's pluggable-allocator signature. `size` should be the size allocated (a different
/// one is logged and counted, and the allocation is freed anyway); `stream` is ignored (the
/// allocation keeps the stream it was made on). A pointer that is not live (a double free, a
/// pointer gpupool never returned, one of another device) changes nothing: it is reported in
/// the last error, counted in the statistics (`unknown_frees`, `double_frees`) and logged.
#[no_mangle]
pub extern "C" fn gpupool_free(
    ptr: *mut c_void,
    size: libc::ssize_t,
    device: c_int,
    stream: *mut c_void,
) {
    let _ = stream;
    if ptr.is_null() {
        return;
    }
    let result = guarded(|| {
        let index = registry::device_index(device)?;
        let counters = registry::counters(index)?;
        let address = ptr as usize as u64;
        match registry::existing_pool(index)? {
            Some(pool) => pool.free(address, size as i64, counters),
            None => {
                counters.unknown_free();
                Err(device::unknown_pointer(address, index, "free"))
            }
        }
    });
    if let Err(error) = result {
        tracing::warn!("gpupool_free: {error}");
        report(&error);
    }
}

/// Declares that work queued on `stream` uses the allocation at `ptr`, like PyTorch's
/// `Tensor.record_stream`: when it is freed, its memory goes to no other stream before that
/// work is done. Returns `GPUPOOL_OK`, or `GPUPOOL_ERR_UNKNOWN_POINTER` when `ptr` is not the
/// start of a live allocation.
///
/// # Safety
/// As `gpupool_alloc`, for `stream`.
#[no_mangle]
pub unsafe extern "C" fn gpupool_record_stream(ptr: *mut c_void, stream: *mut c_void) -> c_int {
    code(|| {
        let address = ptr as usize as u64;
        for pool in registry::pools() {
            // SAFETY: `stream`'s promise is this function's contract.
            if unsafe { pool.record_stream(address, stream as usize as u64) } {
                return Ok(());
            }
        }
        Err(FfiError::UnknownPointer(format!(
            "record_stream on unknown pointer {address:#x}: no live allocation starts there"
        )))
    })
}

/// Gives every idle block of every pool back to its device (a trim at the aggressive level).
/// Live allocations are untouched. Returns `GPUPOOL_OK`.
#[no_mangle]
pub extern "C" fn gpupool_empty_cache() -> c_int {
    code(|| {
        registry::pools().for_each(device::DevicePool::empty_cache);
        Ok(())
    })
}

/// Caps what `device`'s pool may hold at `bytes`. A pool's budget is fixed when the pool is
/// made (at the device's first allocation), so this works only before that:
/// `GPUPOOL_ERR_TOO_LATE` afterwards. It overrides `budget_bytes` of the configuration for
/// this device.
#[no_mangle]
pub extern "C" fn gpupool_set_budget_bytes(device: c_int, bytes: u64) -> c_int {
    code(|| registry::set_budget(registry::device_index(device)?, bytes))
}

/// Caps what `device`'s pool may hold at `fraction` (in (0, 1]) of the device's total memory,
/// as the backend reports it (for CUDA, `cuMemGetInfo`'s total). Like
/// `gpupool_set_budget_bytes`, only before the device's first allocation. The argument order
/// is PyTorch's `set_per_process_memory_fraction`'s.
#[no_mangle]
pub extern "C" fn gpupool_set_memory_fraction(fraction: f64, device: c_int) -> c_int {
    code(|| registry::set_memory_fraction(registry::device_index(device)?, fraction).map(drop))
}

/// The statistics of `device` as JSON: the pool's `PoolStats`, plus `"schema_version"` (the
/// document's layout), `"device"`, `"created"` and `"ffi"` (live pointers, unknown and double
/// frees, peaks and running totals). Asking does not create the pool. Free the string with
/// `gpupool_string_free`; NULL on failure.
#[no_mangle]
pub extern "C" fn gpupool_stats_json(device: c_int) -> *mut c_char {
    value(std::ptr::null_mut(), || {
        c_string(report::stats_json(registry::device_index(device)?)?)
    })
}

/// The library's text dashboard of `device`'s pool (overall figures, per-class table, health,
/// recommendations), without colour. Free it with `gpupool_string_free`; NULL on failure.
#[no_mangle]
pub extern "C" fn gpupool_dashboard(device: c_int) -> *mut c_char {
    value(std::ptr::null_mut(), || {
        c_string(report::dashboard(registry::device_index(device)?)?)
    })
}

/// Frees a string from `gpupool_stats_json` or `gpupool_dashboard`. NULL is a no-op.
///
/// # Safety
/// `text` is NULL or a string those functions returned, not freed before.
#[no_mangle]
pub unsafe extern "C" fn gpupool_string_free(text: *mut c_char) {
    if text.is_null() {
        return;
    }
    let result = guarded(|| {
        // SAFETY: `text` came from `CString::into_raw` in `c_string` and is freed once (the
        // caller's promise).
        drop(unsafe { CString::from_raw(text) });
        Ok(())
    });
    if let Err(error) = result {
        report(&error);
    }
}

/// Applies a configuration string: `key=value` pairs separated by commas, one key per
/// `PoolConfigBuilder` setter (`min_class_bytes`, `max_class_bytes`, `steps_per_doubling`,
/// `max_idle_per_class`, `max_idle_bytes_per_class`, `min_idle_per_class`,
/// `maintenance_interval`, `budget_bytes`, `pooling`, `zero_on_reuse`, `shards`,
/// `large_threshold_bytes`, `virtual_memory_pages`, `reclaim_at_peak`,
/// `release_idle_at_peak`, `carve_class_blocks`, `shared_class_pages`); `none` for the
/// optional ones, sizes with an optional `KiB`..`TiB` suffix, durations in seconds or with
/// `ms`/`s`. Settings add to earlier
/// ones and to `GPUPOOL_CONFIG` (read at first use). Returns `GPUPOOL_ERR_CONFIG` naming the bad key or
/// value (nothing of the string applies), or `GPUPOOL_ERR_TOO_LATE` once any pool exists.
///
/// # Safety
/// `config` is NULL or a NUL-terminated string valid during the call.
#[no_mangle]
pub unsafe extern "C" fn gpupool_configure(config: *const c_char) -> c_int {
    code(|| {
        // SAFETY: the caller's promise about `config`.
        let text = unsafe { text_argument(config, "the configuration string") }?;
        registry::configure(text)
    })
}

/// This thread's last error message, or NULL if no call on this thread has failed. Like
/// `errno`, a successful call leaves it as it was; the string stays valid until the next
/// failure on this thread. Do not free it.
#[no_mangle]
pub extern "C" fn gpupool_last_error() -> *const c_char {
    errors::last_error_ptr()
}

/// The code of this thread's last error (a `GPUPOOL_ERR_*`), or `GPUPOOL_OK` if no call on
/// this thread has failed: after `gpupool_alloc` returned NULL, `GPUPOOL_ERR_OUT_OF_MEMORY`
/// tells that the device or the budget could not hold the request.
#[no_mangle]
pub extern "C" fn gpupool_last_error_code() -> c_int {
    errors::last_error_code()
}

/// Chooses the backend: `"cuda"`, `"host"`, `"sim"` or `"auto"` (CUDA when a driver and a
/// device exist, else host). Without this call, `GPUPOOL_BACKEND` or `auto` decides. Choosing
/// another backend once a pool exists is `GPUPOOL_ERR_TOO_LATE`; choosing the same is fine.
///
/// # Safety
/// `backend` is NULL or a NUL-terminated string valid during the call.
#[no_mangle]
pub unsafe extern "C" fn gpupool_init(backend: *const c_char) -> c_int {
    code(|| {
        // SAFETY: the caller's promise about `backend`.
        let name = unsafe { text_argument(backend, "the backend name") }?;
        registry::init(BackendKind::parse(name)?)
    })
}

/// The backend the pools use: `"cuda"`, `"host"` or `"sim"` (a static string), deciding it now
/// if nothing has; NULL, with the last error set, if `GPUPOOL_BACKEND` names no backend.
#[no_mangle]
pub extern "C" fn gpupool_backend() -> *const c_char {
    value(std::ptr::null(), || {
        Ok(registry::backend()?.c_name().as_ptr())
    })
}

/// Installs the function told about every allocation the pool refused or could not serve
/// (out of memory, over budget, larger than the device, or a driver failure: the message says
/// which), or removes it with NULL. Invalid arguments (a negative size, a bad device) and size
/// 0 do not call it. It gets the device, the bytes asked for and the message (valid during
/// the call only), on the allocating thread, before `gpupool_alloc` returns.
///
/// # Safety
/// `callback` is NULL or a function of this signature that stays callable while installed
/// and does not unwind (no C++ exception, no `longjmp` out of it).
#[no_mangle]
pub unsafe extern "C" fn gpupool_set_oom_callback(
    callback: Option<
        unsafe extern "C" fn(device: c_int, requested: libc::size_t, message: *const c_char),
    >,
) {
    let result = guarded(|| {
        oom::set(callback);
        Ok(())
    });
    if let Err(error) = result {
        report(&error);
    }
}

/// Starts recording every allocation and free into a new file at `path`, in the trace format
/// `gpupool replay` reads (`op,id,size,stream` CSV). `GPUPOOL_ERR_IO` if the file cannot be
/// created, `GPUPOOL_ERR_TOO_LATE` while a recording runs.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string valid during the call.
#[no_mangle]
pub unsafe extern "C" fn gpupool_record_trace_start(path: *const c_char) -> c_int {
    code(|| {
        // SAFETY: the caller's promise about `path`.
        let path = unsafe { text_argument(path, "the trace path") }?;
        trace::start(Path::new(path))
    })
}

/// Stops recording and flushes the file; `GPUPOOL_ERR_IO` if a write failed (the recording
/// stopped there). Stopping when nothing records is `GPUPOOL_OK`.
#[no_mangle]
pub extern "C" fn gpupool_record_trace_stop() -> c_int {
    code(trace::stop)
}

/// `gpupool_empty_cache` with the `void()` signature of PyTorch's pluggable-allocator
/// `set_reset_fn` hook (`torch.cuda.empty_cache()`).
#[no_mangle]
pub extern "C" fn gpupool_torch_empty_cache() {
    gpupool_empty_cache();
}

/// `gpupool_record_stream` with the `void(void*, cudaStream_t)` signature of PyTorch's
/// pluggable-allocator `set_record_stream_fn` hook (`Tensor.record_stream`). A failure is
/// logged and left in the last error.
///
/// # Safety
/// As `gpupool_record_stream`.
#[no_mangle]
pub unsafe extern "C" fn gpupool_torch_record_stream(ptr: *mut c_void, stream: *mut c_void) {
    // SAFETY: the same contract.
    if unsafe { gpupool_record_stream(ptr, stream) } != GPUPOOL_OK {
        log_last_error("record_stream");
    }
}

/// `gpupool_set_memory_fraction` with the `void(double, int)` signature of PyTorch's
/// pluggable-allocator `set_memory_fraction_fn` hook
/// (`torch.cuda.set_per_process_memory_fraction`). A failure (after the device's first
/// allocation the budget is fixed) is logged and left in the last error.
#[no_mangle]
pub extern "C" fn gpupool_torch_set_memory_fraction(fraction: f64, device: c_int) {
    if gpupool_set_memory_fraction(fraction, device) != GPUPOOL_OK {
        log_last_error("set_per_process_memory_fraction");
    }
}

fn log_last_error(action: &str) {
    let message = errors::last_error_text().unwrap_or_default();
    tracing::warn!("gpupool ({action} from PyTorch): {message}");
}
