//! The `cuda` backend: device memory and pinned, mapped host memory of one NVIDIA GPU, through
//! the CUDA driver API (`cudarc`, with libcuda loaded at run time, so the crate builds and its
//! tests run on machines without a toolkit or a driver).
//!
//! It is a thin layer (docs/design.md: backends hold only the FFI calls and their safety reasoning):
//!
//! - **Raw driver calls.** Blocks come from `cudarc::driver::result` (`cuMemAlloc`,
//!   `cuMemHostAlloc`), not from `CudaSlice`, whose `Drop` would free memory behind the pool's
//!   back. A block is a [`Block`] token that the pool moves between owners and caches and hands
//!   back to [`Backend::release`] once.
//! - **Kinds.** [`MemoryKind::Device`] is `cuMemAlloc` memory. [`MemoryKind::HostVisible`] is
//!   pinned host memory mapped into the device's address space (`cuMemHostAlloc` with
//!   `DEVICEMAP | PORTABLE`): the host uses the block's host pointer, kernels and copies use its
//!   device address. [`MemoryKind::HostVisibleWriteCombined`] adds `WRITECOMBINED`: fast for
//!   the host to write and the device to read over PCIe, very slow for the host to read. Host
//!   memory is zeroed once at allocation, because the pool hands it out as `&[T]`.
//! - **Contexts.** The backend retains the device's primary context (the one the runtime API
//!   and PyTorch use), and binds it on the calling thread for each driver call of the slow
//!   paths (allocate, release, fences, synchronize, zero, memory info). The binding gives the
//!   thread back its previous context afterwards, if it had another, so a pool call never
//!   leaves a thread pointed at the wrong device. The hit path never reaches this module.
//! - **Streams.** `StreamId(0)` is the legacy default stream (the null `CUstream`); any other
//!   id is a `CUstream` handle cast to `u64`. Ids come from [`CudaBackend::create_stream`]
//!   (non-blocking cudarc streams that live at least as long as the backend), from
//!   [`CudaBackend::adopt_stream`] for a cudarc `Arc<CudaStream>` (the backend keeps a clone),
//!   or from the `unsafe` [`CudaBackend::register_stream`] for raw handles made elsewhere; an
//!   unknown id is refused rather than passed to the driver, because a made-up handle is
//!   undefined behaviour there. [`CudaBackend::cudarc_stream`] turns an id back into a cudarc
//!   stream.
//! - **GPU lifetime.** [`StreamOrdered::record_fence`] records a CUDA event on a stream; the pool
//!   reuses a block on another stream only after that event completed (see `crate::fence`).
//!   [`StreamOrdered::synchronize`] is `cuCtxSynchronize`, and [`Zeroing::zero`] is a
//!   `cuMemsetD8Async` on the requesting stream, so it runs after the previous owner's work on
//!   that stream and before the new owner's. Because both may still be queued when a
//!   host-visible buffer is handed out, its first host access waits for the stream
//!   ([`StreamOrdered::wait_for_stream`], `cuStreamSynchronize`).
//! - **cudarc interop.** A pooled buffer of `Device` memory is lent to cudarc's API as a
//!   [`CudaBufferView`] or [`CudaBufferViewMut`] (`PooledBuffer::cuda_view`,
//!   `cuda_view_mut`, and the `_on` forms for another stream), which implement cudarc's
//!   `DevicePtr`, `DevicePtrMut` and `PushKernelArg`: `stream.memcpy_htod(&host, &mut
//!   buffer.cuda_view_mut()?)` works, no raw address needed. A view borrows its buffer, is
//!   refused for host kinds, other backends and streams of other contexts, and when it is lent
//!   to a stream other than the buffer's own, it orders the two streams on the device with
//!   events, so the pool does not reuse the block before the work cudarc queued through the
//!   view (copies on any stream of the context, kernels on the view's stream) has finished;
//!   [`CudaBufferView`] gives the rules and what they do not cover. The example
//!   `examples/cudarc_kernel.rs` copies in, launches a kernel on pooled buffers, and copies
//!   out.
//! - **Errors.** `CUDA_ERROR_OUT_OF_MEMORY` becomes [`BackendError::OutOfMemory`] (the pool
//!   releases idle blocks and retries); a device request above the device's total memory is
//!   [`BackendError::TooLarge`]; everything else is [`BackendError::Driver`] with the driver's
//!   name and words for the error.

mod call_profile;
mod capabilities;
mod driver;
mod fence;
mod interop;
mod streams;
mod virtual_memory;

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The `cudarc` this backend is built on, for raw driver calls on its device addresses and
/// streams (its `driver::sys` types are the ones [`CudaBackend::stream_handle`] returns).
pub use call_profile::{driver_call_profile, DriverCall, DriverCallCount};
pub use cudarc;
pub use interop::{CudaBufferView, CudaBufferViewMut};

use cudarc::driver::result;
use cudarc::driver::{sys, CudaContext, CudaStream};

use self::call_profile::timed;
use self::driver::{backend_error, pool_error, Bound, HeldContext};
use self::fence::EventFence;
use self::streams::StreamRegistry;
use super::{
    Backend, BackendError, Block, Fence, MemoryInfo, MemoryKind, StreamId, StreamOrdered, Zeroing,
};
use crate::error::PoolError;
use crate::size_class::BLOCK_ALIGN;

/// High bits of every block token this backend makes. The low bits number the backend
/// instance, so a block handed to the wrong backend (another device's, or a host block) is
/// recognised and refused instead of freed by the wrong call. Host tokens are 0, sim tokens
/// count up from 1 and Metal tokens are user-space pointers (below 2^57): none has these bits.
const TOKEN_TAG: u64 = 0xC0DA << 48;

/// `cuda.h`'s `CU_STREAM_LEGACY` and `CU_STREAM_PER_THREAD`: special handles that name the
/// legacy default stream, and the calling thread's per-thread default stream (cudarc's
/// `per_thread_stream`). cudarc's bindings do not define them.
const CU_STREAM_LEGACY: usize = 0x1;
const CU_STREAM_PER_THREAD: usize = 0x2;

/// Numbers backend instances for their tokens.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

/// One CUDA device: device memory and pinned, mapped host memory; see the module documentation.
///
/// ```no_run
/// use gpupool::backend::cuda::CudaBackend;
/// use gpupool::{AllocOptions, MemoryManager};
///
/// if CudaBackend::driver_available() {
///     let backend = CudaBackend::new(0)?;
///     let stream = backend.create_stream()?;
///     let manager = MemoryManager::new(backend);
///     let options = AllocOptions { stream, ..AllocOptions::default() };
///     let buffer = manager.allocate_with::<f32>(1 << 20, options)?;
///     // Hand `buffer.device_address()` to kernels queued on `stream`.
/// #   drop(buffer);
/// }
/// # Ok::<(), gpupool::PoolError>(())
/// ```
pub struct CudaBackend {
    ctx: HeldContext,
    device_name: String,
    kinds: Vec<MemoryKind>,
    total_bytes: u64,
    token: u64,
    streams: StreamRegistry,
    /// A 256-byte allocation held for the backend's lifetime. The driver carves small
    /// allocations out of 2 MiB pages and unmaps a page when its last allocation is freed;
    /// the next small `cuMemAlloc` then maps a new page: 50–150 µs instead of 2–4 µs
    /// (measured on an H100, driver 580). Holding one allocation keeps that page mapped, so a
    /// pool that trims, or a new manager after an old one released everything, pays the
    /// cheap allocation. 0 if the driver refused it (nothing depends on it).
    keep_mapped: sys::CUdeviceptr,
    /// Virtual memory management: the device's granularity and the handles of mapped pages.
    mappings: virtual_memory::Mappings,
}

impl CudaBackend {
    /// Whether a CUDA driver is installed, initialises, and reports at least one device.
    /// Probed once per process; never panics (cudarc itself panics when libcuda is missing, so
    /// call this before anything else CUDA).
    pub fn driver_available() -> bool {
        driver::driver_available()
    }

    /// The number of CUDA devices; 0 without a driver.
    pub fn device_count() -> usize {
        driver::device_count()
    }

    /// Opens device `ordinal`: retains its primary context and reads its name and memory.
    ///
    /// Errors: [`PoolError::Backend`] without a usable driver or when the driver refuses,
    /// [`PoolError::NoSuchDevice`] for an ordinal the driver does not report.
    pub fn new(ordinal: usize) -> Result<CudaBackend, PoolError> {
        let ctx = driver::open_context(ordinal)?;
        let _bound = driver::bind(&ctx).map_err(pool_error)?;
        let device_name = ctx.name().map_err(pool_error)?;
        let total_bytes = ctx.total_mem().map_err(pool_error)? as u64;
        let can_map_host = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)
            .map_err(pool_error)?
            != 0;
        let kinds = if can_map_host {
            vec![
                MemoryKind::Device,
                MemoryKind::HostVisible,
                MemoryKind::HostVisibleWriteCombined,
            ]
        } else {
            tracing::info!(
                ordinal,
                "device cannot map host memory: only Device memory is offered"
            );
            vec![MemoryKind::Device]
        };
        // SAFETY: the context is current (bound above); `cuMemAlloc` has no other
        // precondition, and the address is only ever freed, once, in `Drop`.
        let keep_mapped = unsafe { result::malloc_sync(256) }.unwrap_or(0);
        let mappings = virtual_memory::Mappings::new(virtual_memory::probe(&ctx));
        Ok(CudaBackend {
            ctx,
            device_name,
            kinds,
            total_bytes,
            token: TOKEN_TAG | (NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed) & 0xFFFF_FFFF),
            streams: StreamRegistry::default(),
            keep_mapped,
            mappings,
        })
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The device's primary context, for raw driver calls (copies, kernel launches) on the
    /// pool's memory. Clone it before moving the backend into a manager.
    pub fn context(&self) -> &Arc<CudaContext> {
        self.ctx.arc()
    }

    /// Creates a non-blocking stream (it does not synchronise with the legacy default stream).
    /// The backend keeps it alive until the backend is dropped, that is, until the last manager
    /// handle and buffer using this backend are gone; it is destroyed then, or later when the
    /// last clone taken with [`CudaBackend::cudarc_stream`] drops.
    ///
    /// The stream is a cudarc `CudaStream` ([`CudaBackend::cudarc_stream`] hands it out), so
    /// cudarc learns that the context has several streams: its own `CudaSlice`s then record
    /// their uses with events, and the first such stream makes cudarc synchronise the context
    /// once.
    pub fn create_stream(&self) -> Result<StreamId, PoolError> {
        let _bound = self.bind().map_err(pool_error)?;
        self.streams.create(self.ctx.arc()).map_err(pool_error)
    }

    /// Lets the pool use a cudarc stream: the safe counterpart of
    /// [`CudaBackend::register_stream`]. The backend keeps a clone of the `Arc`, so the stream
    /// stays alive at least as long as the backend, whatever the caller does with its own
    /// clones. Adopting the same stream again returns the same id; a null stream
    /// (`ctx.default_stream()`) is [`StreamId::DEFAULT`].
    ///
    /// Errors ([`PoolError::Backend`]): a stream of another context than this backend's (its
    /// handle means nothing here), and cudarc's per-thread default stream, whose handle names a
    /// different stream on each thread, so a fence the pool records on it from another thread
    /// would not follow the work.
    ///
    /// ```no_run
    /// use gpupool::backend::cuda::CudaBackend;
    /// use gpupool::{AllocOptions, MemoryManager};
    ///
    /// let backend = CudaBackend::new(0)?;
    /// let stream = backend.context().new_stream().expect("a cudarc stream");
    /// let options = AllocOptions { stream: backend.adopt_stream(&stream)?, ..AllocOptions::default() };
    /// let manager = MemoryManager::new(backend);
    /// let buffer = manager.allocate_with::<f32>(1024, options)?;
    /// # drop(buffer);
    /// # Ok::<(), gpupool::PoolError>(())
    /// ```
    pub fn adopt_stream(&self, stream: &Arc<CudaStream>) -> Result<StreamId, PoolError> {
        self.check_stream_context(stream)?;
        let handle = stream.cu_stream() as usize;
        if handle == 0 {
            return Ok(StreamId::DEFAULT);
        }
        if handle == CU_STREAM_LEGACY || handle == CU_STREAM_PER_THREAD {
            return Err(PoolError::Backend {
                backend: driver::BACKEND.to_string(),
                message: format!(
                    "the special stream handle {handle:#x} (per-thread or legacy default stream) \
                     cannot be adopted; use the null stream (StreamId::DEFAULT) or a stream of \
                     its own"
                ),
            });
        }
        Ok(self.streams.adopt(stream))
    }

    /// The cudarc stream a pool stream id stands for: the default stream (a fresh
    /// `ctx.default_stream()`), a stream [`CudaBackend::create_stream`] made, or one
    /// [`CudaBackend::adopt_stream`] took. `None` for ids the backend does not know, and for
    /// raw handles lent through [`CudaBackend::register_stream`], because the `Arc` could
    /// outlive the promise that keeps them alive (adopt the cudarc stream instead).
    pub fn cudarc_stream(&self, stream: StreamId) -> Option<Arc<CudaStream>> {
        if stream == StreamId::DEFAULT {
            return Some(self.ctx.arc().default_stream());
        }
        self.streams.cudarc(stream)
    }

    /// Refuses a cudarc stream of another context than this backend's.
    fn check_stream_context(&self, stream: &CudaStream) -> Result<(), PoolError> {
        if stream.context() == self.ctx.arc() {
            return Ok(());
        }
        Err(PoolError::Backend {
            backend: driver::BACKEND.to_string(),
            message: format!(
                "the cudarc stream belongs to another CUDA context (device {}) than this \
                 backend's (device {})",
                stream.context().ordinal(),
                self.ctx.ordinal()
            ),
        })
    }

    /// Lets the pool use a stream made elsewhere (by `cudarc`, another library, or the user's
    /// own code). The null handle is the default stream, [`StreamId::DEFAULT`].
    ///
    /// # Safety
    /// `stream` must be the null handle or a live stream of this device's primary context, and
    /// it must stay alive until this backend is dropped: the pool may record events on it or
    /// queue zeroing on it whenever a buffer of that stream is allocated or dropped.
    pub unsafe fn register_stream(&self, stream: sys::CUstream) -> StreamId {
        self.streams.register(stream)
    }

    /// The `CUstream` a stream id stands for: null for [`StreamId::DEFAULT`] (the legacy
    /// default stream), else the handle the id was made from. A plain conversion: it does not
    /// check that the stream exists.
    pub fn stream_handle(stream: StreamId) -> sys::CUstream {
        driver::stream_handle(stream)
    }

    fn bind(&self) -> Result<Bound, cudarc::driver::DriverError> {
        driver::bind(&self.ctx)
    }

    fn allocate_device(&self, bytes: usize) -> Result<Block, BackendError> {
        if bytes as u64 > self.total_bytes {
            return Err(BackendError::TooLarge {
                limit: self.total_bytes,
            });
        }
        // SAFETY: the backend's context is current (the caller bound it); `cuMemAlloc` has no
        // other precondition. The memory is uninitialised, which is allowed for device memory:
        // the pool never reads it from the host.
        let address = timed(DriverCall::Allocate, || unsafe {
            result::malloc_sync(bytes)
        })
        .map_err(backend_error)?;
        if address % BLOCK_ALIGN as u64 != 0 {
            // cuMemAlloc aligns to at least 256 bytes; the pool promises BLOCK_ALIGN.
            // SAFETY: `address` came from `cuMemAlloc` just before and was never handed out.
            let _ = unsafe { result::free_sync(address) };
            return Err(BackendError::Driver(format!(
                "cuMemAlloc returned {address:#x}, which is not {BLOCK_ALIGN}-byte aligned"
            )));
        }
        // SAFETY: `address` is a fresh allocation of `bytes` bytes of device memory that
        // nothing else refers to, and stays valid until `release` frees it; a device block
        // has no host pointer, so no host-side initialisation is promised.
        Ok(unsafe { Block::new(address, None, bytes, MemoryKind::Device, self.token) })
    }

    fn allocate_host(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        let mut flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        if kind == MemoryKind::HostVisibleWriteCombined {
            flags |= sys::CU_MEMHOSTALLOC_WRITECOMBINED;
        }
        // SAFETY: the backend's context is current (the caller bound it) and `flags` holds only
        // documented `cuMemHostAlloc` flags; the device can map host memory (checked in `new`,
        // else these kinds are not offered).
        let raw = unsafe { result::malloc_host(bytes, flags) }.map_err(backend_error)?;
        let host = match NonNull::new(raw.cast::<u8>()) {
            Some(host) if (host.as_ptr() as usize).is_multiple_of(BLOCK_ALIGN) => host,
            _ => {
                free_host(raw);
                return Err(BackendError::Driver(format!(
                    "cuMemHostAlloc returned {raw:p}, which is not {BLOCK_ALIGN}-byte aligned"
                )));
            }
        };
        // SAFETY: `host` points to `bytes` writable bytes, just allocated and owned here alone.
        // Zeroing makes them initialised, as `Block::new` requires of host memory.
        unsafe { std::ptr::write_bytes(host.as_ptr(), 0, bytes) };
        let mut address: sys::CUdeviceptr = 0;
        // SAFETY: `raw` was allocated with `DEVICEMAP` in the current context; the flags
        // argument must be 0; `address` is a valid place for the result.
        let mapped = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut address, raw, 0) }.result();
        if let Err(error) = mapped {
            free_host(raw);
            return Err(backend_error(error));
        }
        // SAFETY: `host` is valid for reads and writes of `bytes` bytes, aligned to
        // `BLOCK_ALIGN` (checked above), zeroed, and owned by this block alone until `release`
        // frees it; `address` is the same memory as the device sees it.
        Ok(unsafe { Block::new(address, Some(host), bytes, kind, self.token) })
    }
}

/// Frees pinned host memory on an error path of `allocate_host`.
fn free_host(raw: *mut std::ffi::c_void) {
    // SAFETY: `raw` came from `cuMemHostAlloc` just before and was never handed out.
    if let Err(error) = unsafe { result::free_host(raw) } {
        tracing::warn!(error = %driver::describe(error), "cuMemFreeHost failed");
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        driver::BACKEND
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn device_name(&self) -> String {
        self.device_name.clone()
    }

    fn kinds(&self) -> &[MemoryKind] {
        &self.kinds
    }

    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        if !self.kinds.contains(&kind) {
            return Err(BackendError::UnsupportedKind(kind));
        }
        let _bound = self.bind().map_err(backend_error)?;
        match kind {
            MemoryKind::Device => self.allocate_device(bytes),
            _ => self.allocate_host(bytes, kind),
        }
    }

    fn release(&self, block: Block) {
        if block.token() != self.token {
            // Not ours: freeing it with our calls could free someone else's memory. Leaking it
            // is the only safe answer to a caller that broke the trait's contract.
            tracing::error!(
                token = block.token(),
                "a block from another backend was released to this CUDA backend; leaking it"
            );
            return;
        }
        // A failed bind is logged and the free tried anyway: with unified addressing the
        // driver finds the allocation's context from the address.
        let _bound = self.bind().inspect_err(
            |error| tracing::warn!(error = %driver::describe(*error), "bind before release failed"),
        );
        // Both arms: the token shows this backend allocated the block, with `cuMemAlloc` for
        // Device blocks (no host pointer) and `cuMemHostAlloc` for the host kinds (with one).
        // Moving the block in means it is released once, and the pool releases it only when no
        // buffer owns it and no GPU work uses it any more (it synchronises first when it cannot
        // prove that).
        let outcome = timed(DriverCall::Free, || match block.host_ptr() {
            // SAFETY: a Device block of ours, released once, unused (see above).
            None => unsafe { result::free_sync(block.device_address()) },
            // SAFETY: a pinned host block of ours, released once, unused (see above).
            Some(host) => unsafe { result::free_host(host.as_ptr().cast()) },
        });
        if let Err(error) = outcome {
            tracing::warn!(
                error = %driver::describe(error),
                bytes = block.bytes(),
                kind = block.kind().name(),
                "freeing a CUDA block failed"
            );
        }
    }

    fn memory_info(&self) -> Option<MemoryInfo> {
        let info = timed(DriverCall::MemoryInfo, || {
            self.bind().and_then(|_bound| result::mem_get_info())
        });
        match info {
            Ok((free, total)) => Some(MemoryInfo {
                free_bytes: free as u64,
                total_bytes: total as u64,
            }),
            Err(error) => {
                tracing::debug!(error = %driver::describe(error), "cuMemGetInfo failed");
                None
            }
        }
    }

    fn stream_ordered(&self) -> Option<&dyn StreamOrdered> {
        Some(self)
    }

    fn zeroing(&self) -> Option<&dyn Zeroing> {
        Some(self)
    }

    fn virtual_memory(&self) -> Option<&dyn crate::backend::VirtualMemory> {
        self.mappings
            .granularity
            .is_some()
            .then_some(self as &dyn crate::backend::VirtualMemory)
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Every block is gone by now: the pool, which owns this backend, released them all.
        match self.bind() {
            Ok(_bound) => {
                self.streams.release_all();
                if self.keep_mapped != 0 {
                    // SAFETY: allocated in `new` with `cuMemAlloc` in this context, freed only
                    // here; no work uses it.
                    if let Err(error) = unsafe { result::free_sync(self.keep_mapped) } {
                        tracing::warn!(error = %driver::describe(error), "cuMemFree failed");
                    }
                }
            }
            Err(error) => tracing::warn!(
                error = %driver::describe(error),
                "could not bind the CUDA context to destroy the backend's streams"
            ),
        }
    }
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBackend")
            .field("ordinal", &self.ctx.ordinal())
            .field("device_name", &self.device_name)
            .field("total_bytes", &self.total_bytes)
            .field("kinds", &self.kinds)
            .finish()
    }
}

#[cfg(test)]
mod tests;
