//! Driver plumbing shared by the backend and its fences: whether libcuda
//! can be used at all, opening a device's primary context, binding that context for the length
//! of one call, the registry of streams a backend may name, and turning driver errors into the
//! crate's errors.
//!
//! cudarc loads libcuda on the first call of each driver function and *panics* when the
//! library is missing, so nothing here calls the driver before [`driver_available`] said yes.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::driver::result::{self, stream::StreamKind, DriverError};
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
    // SAFETY: `is_culib_present` only asks libloading to open libcuda under the names cudarc
    // will later load it by (which runs the library's initialisers, as any CUDA use does) and
    // closes it again; it has no precondition. It is the guard cudarc offers against its own
    // panic when the library is missing.
    if !unsafe { sys::is_culib_present() } {
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

struct RegisteredStream {
    id: u64,
    /// Created here (destroyed with the registry's owner) rather than lent by the user.
    owned: bool,
}

/// The streams a backend (or peer) will pass to the driver.
///
/// A [`StreamId`] is a plain number that safe code can make up, and the driver may dereference
/// a made-up stream handle. So every id other than the default stream is checked against the
/// streams this owner created, or that a user registered through an `unsafe` call promising
/// they are valid. The lookup takes a mutex and scans a few entries; only slow paths (fences,
/// zeroing, host-access waits) do it.
#[derive(Default)]
pub(super) struct StreamRegistry {
    streams: Mutex<Vec<RegisteredStream>>,
}

impl StreamRegistry {
    /// Creates a non-blocking stream in the current context (the caller binds it) and records
    /// it as owned.
    pub fn create(&self) -> Result<StreamId, DriverError> {
        let stream = result::stream::create(StreamKind::NonBlocking)?;
        let id = stream as usize as u64;
        self.lock().push(RegisteredStream { id, owned: true });
        Ok(StreamId(id))
    }

    /// Records a stream the caller vouches for (see `CudaBackend::register_stream`).
    pub fn register(&self, stream: sys::CUstream) -> StreamId {
        let id = stream as usize as u64;
        if id != 0 {
            let mut streams = self.lock();
            if !streams.iter().any(|known| known.id == id) {
                streams.push(RegisteredStream { id, owned: false });
            }
        }
        StreamId(id)
    }

    /// The handle of `stream`, if it is the default stream or a known one.
    pub fn handle(&self, stream: StreamId) -> Result<sys::CUstream, BackendError> {
        if stream == StreamId::DEFAULT || self.lock().iter().any(|known| known.id == stream.0) {
            Ok(stream_handle(stream))
        } else {
            Err(BackendError::Driver(format!(
                "stream {:#x} was neither created nor registered by this CUDA backend",
                stream.0
            )))
        }
    }

    /// Destroys the owned streams; the caller has bound their context.
    pub fn destroy_owned(&self) {
        for stream in self.lock().drain(..).filter(|stream| stream.owned) {
            let handle = stream_handle(StreamId(stream.id));
            // SAFETY: the stream was created by `create` in this context, is destroyed once
            // (drained from the list), and no later call can name it: the registry is empty
            // now. Work still queued on it completes; the driver frees it afterwards.
            let destroyed = unsafe { result::stream::destroy(handle) };
            if let Err(error) = destroyed {
                tracing::warn!(error = %describe(error), "could not destroy a CUDA stream");
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<RegisteredStream>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
