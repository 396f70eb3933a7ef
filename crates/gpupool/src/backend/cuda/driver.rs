//! Driver plumbing shared by the backend and its fences: whether libcuda
//! can be used at all, opening a device's primary context, binding that context for the length
//! of one call, and turning driver errors into the crate's errors. (The streams a backend may
//! name are in `streams.rs`.)
//!
//! cudarc loads libcuda on the first call of each driver function and *panics* when the
//! library is missing, so nothing here calls the driver before [`driver_available`] said yes.

use std::sync::{Arc, OnceLock};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::{sys, CudaContext};

use crate::backend::{BackendError, StreamId};
use crate::error::PoolError;

/// The backend name used in errors.
pub(super) const BACKEND: &str = "cuda";

/// Whether libcuda can be loaded, initialises, and reports at least one device. Probed once.
pub(super) fn driver_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(probe_driver)
}

fn probe_driver() -> bool {
    // Miri cannot load a shared library (`dlopen` is a foreign call it does not emulate), so
    // under Miri there is no driver, as on a machine without one.
    if cfg!(miri) {
        return false;
    }
    if !libcuda_loadable() {
        tracing::debug!("no CUDA driver library (libcuda) found");
        return false;
    }
    match result::init().and_then(|()| result::device::get_count()) {
        Ok(count) => count > 0,
        Err(error) => {
            // A stub libcuda (from a toolkit without a driver) fails here, for example.
            tracing::debug!(error = %describe(error), "CUDA driver present but unusable");
            false
        }
    }
}

/// Whether libcuda opens under one of the names cudarc's dynamic loading tries for every CUDA
/// version (the unversioned name, the `.1` soname every driver installs, and Windows' nvcuda),
/// so that cudarc, which panics when it finds none, finds one too.
///
/// cudarc's own guard, `sys::is_culib_present`, exists only in its `dynamic-loading` mode, and
/// the mode is the application's choice (the `cuda` feature): with `dynamic-linking` libcuda is
/// already loaded when this runs, and opening it again succeeds. Asking fewer names than cudarc
/// does can only report a driver missing where cudarc might have found one, never the reverse.
fn libcuda_loadable() -> bool {
    use std::env::consts::{DLL_PREFIX, DLL_SUFFIX};
    let names = [
        format!("{DLL_PREFIX}cuda{DLL_SUFFIX}"),
        format!("{DLL_PREFIX}cuda{DLL_SUFFIX}.1"),
        format!("{DLL_PREFIX}nvcuda{DLL_SUFFIX}"),
    ];
    names.iter().any(|name| {
        // SAFETY: opening libcuda runs its initialisers, as cudarc's own loading of it (and any
        // CUDA use) does; they have no precondition on the caller. The handle is closed again
        // when dropped, and no symbol is taken from it.
        unsafe { libloading::Library::new(name) }.is_ok()
    })
}

/// Devices the driver reports; 0 without a usable driver.
pub(super) fn device_count() -> usize {
    if !driver_available() {
        return 0;
    }
    result::device::get_count().map_or(0, |count| count.max(0) as usize)
}

/// A device's primary context as the backend and its fences hold it.
///
/// cudarc's `CudaContext`, when its last `Arc` drops, binds itself to the dropping thread for
/// good (and then releases the primary context). This holder gives the thread back the exact
/// context it had before that drop, so dropping a backend, a fence or a peer never leaves a
/// thread pointed at another context. Fields drop in order: `ctx` first, then `restore`.
pub(super) struct HeldContext {
    ctx: Arc<CudaContext>,
    restore: RestoreCurrent,
}

/// Sets the thread's current context back to the one recorded when dropped: `Some(0)` for
/// none, `Some(handle)` for a context, `None` to leave the thread as it is. The handle is kept
/// as an address so that the holder stays `Send + Sync`; it is recorded and used within one
/// drop on one thread.
struct RestoreCurrent(Option<usize>);

impl HeldContext {
    fn new(ctx: Arc<CudaContext>) -> HeldContext {
        HeldContext {
            ctx,
            restore: RestoreCurrent(None),
        }
    }

    /// The shared cudarc context.
    pub fn arc(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
}

impl Clone for HeldContext {
    fn clone(&self) -> Self {
        HeldContext::new(self.ctx.clone())
    }
}

impl std::ops::Deref for HeldContext {
    type Target = CudaContext;

    fn deref(&self) -> &CudaContext {
        &self.ctx
    }
}

impl Drop for HeldContext {
    fn drop(&mut self) {
        // Runs before the fields drop: remember the thread's context for `restore`, unless it
        // is this very context (cudarc leaves it current anyway, and it may be released now).
        self.restore = match result::ctx::get_current() {
            Ok(Some(current)) if current == self.ctx.cu_ctx() => RestoreCurrent(None),
            Ok(current) => RestoreCurrent(Some(current.map_or(0, |context| context as usize))),
            Err(_) => RestoreCurrent(None),
        };
    }
}

impl Drop for RestoreCurrent {
    fn drop(&mut self) {
        if let Some(previous) = self.0 {
            let previous = previous as sys::CUcontext;
            // SAFETY: `previous` is null (no context) or another context than the one just
            // dropped, current on this thread before that drop: the thread's own code made it
            // current and so keeps it alive. This only restores that state.
            if let Err(error) = unsafe { result::ctx::set_current(previous) } {
                tracing::debug!(error = %describe(error), "could not restore the thread's CUDA context");
            }
        }
    }
}

/// Retains the primary context of device `ordinal`, with errors a user can act on.
pub(super) fn open_context(ordinal: usize) -> Result<HeldContext, PoolError> {
    if !driver_available() {
        return Err(PoolError::Backend {
            backend: BACKEND.to_string(),
            message:
                "no CUDA driver: libcuda is missing, does not initialise, or reports no device"
                    .to_string(),
        });
    }
    let devices = device_count();
    if ordinal >= devices {
        return Err(PoolError::NoSuchDevice {
            device: ordinal,
            devices,
        });
    }
    // `CudaContext::new` leaves the primary context current on this thread for good; give
    // the thread back the context it had, as every other call here does.
    let _restore = Bound {
        restore: result::ctx::get_current().ok().flatten(),
    };
    CudaContext::new(ordinal)
        .map(HeldContext::new)
        .map_err(pool_error)
}

/// A context made current on this thread for the length of one driver call.
///
/// Unlike `CudaContext::bind_to_thread`, which leaves its context current for good, the guard
/// gives the thread back the context it had when that was another one: a user who drives
/// device 1 on this thread must not find device 0's context current after a pool call. A thread
/// with no current context keeps ours, as the runtime API would leave it. The guard holds a raw
/// pointer, so it is neither `Send` nor `Sync` and is dropped on the thread that made it.
pub(super) struct Bound {
    restore: Option<sys::CUcontext>,
}

/// Makes `ctx` current on this thread until the returned guard drops.
pub(super) fn bind(ctx: &CudaContext) -> Result<Bound, DriverError> {
    let wanted = ctx.cu_ctx();
    let current = result::ctx::get_current()?;
    if current == Some(wanted) {
        return Ok(Bound { restore: None });
    }
    // SAFETY: `wanted` is the primary context that `ctx` retains; it stays valid while `ctx`
    // lives, and the caller holds `ctx` for longer than the guard.
    unsafe { result::ctx::set_current(wanted) }?;
    Ok(Bound { restore: current })
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Some(previous) = self.restore.take() {
            // SAFETY: `previous` was this thread's current context a moment ago, made current
            // by the thread's own code, which therefore keeps it alive; making it current again
            // only restores that state.
            if let Err(error) = unsafe { result::ctx::set_current(previous) } {
                tracing::warn!(error = %describe(error), "could not restore the thread's CUDA context");
            }
        }
    }
}

/// The driver's name and words for an error, e.g. `CUDA_ERROR_INVALID_VALUE: invalid argument`.
pub(super) fn describe(error: DriverError) -> String {
    let name = error
        .error_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", error.0));
    match error.error_string() {
        Ok(text) => format!("{name}: {}", text.to_string_lossy()),
        Err(_) => name,
    }
}

/// Out of memory stays retryable (the pool releases idle blocks and tries again); every other
/// failure carries the driver's words.
pub(super) fn backend_error(error: DriverError) -> BackendError {
    if error.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        BackendError::OutOfMemory
    } else {
        BackendError::Driver(describe(error))
    }
}

/// A driver failure outside an allocation (opening a device, creating a stream).
pub(super) fn pool_error(error: DriverError) -> PoolError {
    PoolError::Backend {
        backend: BACKEND.to_string(),
        message: describe(error),
    }
}

/// The `CUstream` a [`StreamId`] stands for: `StreamId(0)` is the legacy default stream (the
/// null handle), any other id is a `CUstream` handle cast to `u64`.
pub(super) fn stream_handle(stream: StreamId) -> sys::CUstream {
    stream.0 as usize as sys::CUstream
}
