//! Benchmark peers, not part of the pool: the CUDA driver's own allocators, which
//! `gpupool bench --backend cuda` measures beside the pool on the same device.
//!
//! - [`DirectAllocator`]: `cuMemAlloc` / `cuMemFree` for every request, what a program without
//!   a pool pays.
//! - [`StreamOrderedPool`]: CUDA's stream-ordered allocator (`cuMemAllocFromPoolAsync` /
//!   `cuMemFreeAsync`) on a private memory pool whose release threshold is `u64::MAX`, so freed
//!   memory stays in the pool instead of going back to the device at each synchronisation:
//!   the driver's best caching configuration, measured at 1.1–1.8 µs per pair on the H100 and
//!   H200 (BENCHMARKS.md).
//!
//! Both are safe to call: each remembers the pointers it handed out (a mutex-protected map,
//! tens of nanoseconds against the microseconds of the driver calls they time), so freeing a
//! pointer twice, or one it did not hand out, is an error rather than a corrupted heap, and
//! whatever is still allocated is freed when the peer drops. Stream ids are checked as the
//! library's backend checks them: the default stream or one made by the peer's
//! [`StreamOrderedPool::create_stream`].
//!
//! Unlike the library's backend, the peers leave the device's primary context current on the
//! threads that use them (as cudarc's own calls do) instead of giving each thread back the
//! context it had: the bench's threads use no other context.
//!
//! The driver is reached through the library's re-export of `cudarc`
//! (`gpupool::backend::cuda::cudarc`), so this crate uses the very version and linking mode of
//! the backend it measures. This is the only module of the command with `unsafe` code: the raw
//! driver calls, each with its `SAFETY` reasoning.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use gpupool::backend::cuda::cudarc::driver::result::{self, DriverError};
use gpupool::backend::cuda::cudarc::driver::{sys, CudaContext, CudaStream};
use gpupool::backend::cuda::CudaBackend;
use gpupool::{PoolError, StreamId};

/// The backend name in the peers' errors, as the library's CUDA backend names itself.
const BACKEND: &str = "cuda";

/// The driver's name and words for an error, e.g. `CUDA_ERROR_INVALID_VALUE: invalid argument`.
fn describe(error: DriverError) -> String {
    let name = error
        .error_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", error.0));
    match error.error_string() {
        Ok(text) => format!("{name}: {}", text.to_string_lossy()),
        Err(_) => name,
    }
}

/// A peer's failure other than out of memory.
fn backend_error(message: String) -> PoolError {
    PoolError::Backend {
        backend: BACKEND.to_string(),
        message,
    }
}

/// A failed driver call outside an allocation.
fn pool_error(error: DriverError) -> PoolError {
    backend_error(describe(error))
}

/// Retains the primary context of device `ordinal` (the one the library's backend and the
/// runtime API use). Checks for a usable driver first: cudarc panics when libcuda is missing.
fn open_context(ordinal: usize) -> Result<Arc<CudaContext>, PoolError> {
    if !CudaBackend::driver_available() {
        return Err(backend_error(
            "no CUDA driver: libcuda is missing, does not initialise, or reports no device"
                .to_string(),
        ));
    }
    let devices = CudaBackend::device_count();
    if ordinal >= devices {
        return Err(PoolError::NoSuchDevice {
            device: ordinal,
            devices,
        });
    }
    CudaContext::new(ordinal).map_err(pool_error)
}

/// Makes `ctx` current on the calling thread, where it stays: the bench's threads use no other
/// context. A plain check of the current context first, as the library's backend does, so the
/// timed calls pay what the pool's slow paths pay for it.
fn bind(ctx: &CudaContext) -> Result<(), PoolError> {
    let wanted = ctx.cu_ctx();
    if result::ctx::get_current().map_err(pool_error)? != Some(wanted) {
        // SAFETY: `wanted` is the primary context that `ctx` retains, valid while `ctx` lives;
        // every caller holds `ctx` for the driver calls that follow. Leaving it current
        // afterwards is what cudarc's own `bind_to_thread` does.
        unsafe { result::ctx::set_current(wanted) }.map_err(pool_error)?;
    }
    Ok(())
}

/// Live pointers and their sizes.
#[derive(Default)]
struct Ledger {
    /// Device address → bytes, of every allocation not yet freed.
    live: Mutex<HashMap<u64, usize>>,
}

impl Ledger {
    /// The map; a panic elsewhere while it was held does not make it unusable.
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, usize>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a new allocation.
    fn insert(&self, ptr: u64, bytes: usize) {
        self.lock().insert(ptr, bytes);
    }

    /// Removes `ptr`, or says it is not live.
    fn remove(&self, ptr: u64) -> Result<usize, PoolError> {
        self.lock()
            .remove(&ptr)
            .ok_or_else(|| backend_error(format!("{ptr:#x} is not a live allocation of this peer")))
    }

    /// Bytes allocated and not yet freed.
    fn live_bytes(&self) -> u64 {
        self.lock().values().map(|&bytes| bytes as u64).sum()
    }
}

/// A failed peer allocation: out of memory keeps its numbers, like the pool's own error.
fn alloc_error(error: DriverError, requested: usize, ledger: &Ledger) -> PoolError {
    if error.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        PoolError::OutOfMemory {
            requested_bytes: requested as u64,
            reserved_bytes: ledger.live_bytes(),
            device_free_bytes: result::mem_get_info().ok().map(|(free, _)| free as u64),
        }
    } else {
        pool_error(error)
    }
}

/// `cuMemAlloc` and `cuMemFree` on every request, on device `ordinal`.
pub struct DirectAllocator {
    /// The device's primary context, current for every driver call.
    ctx: Arc<CudaContext>,
    /// What is allocated, freed on drop.
    ledger: Ledger,
}

impl DirectAllocator {
    /// Opens device `ordinal` (its primary context, shared with any `CudaBackend` on it).
    pub fn new(ordinal: usize) -> Result<DirectAllocator, PoolError> {
        Ok(DirectAllocator {
            ctx: open_context(ordinal)?,
            ledger: Ledger::default(),
        })
    }

    /// Allocates `bytes` bytes of device memory; returns its device address.
    pub fn alloc(&self, bytes: usize) -> Result<u64, PoolError> {
        bind(&self.ctx)?;
        // SAFETY: the context is current (bound above); `cuMemAlloc` has no other
        // precondition. The memory is uninitialised and only its address leaves this call.
        let ptr = unsafe { result::malloc_sync(bytes) }
            .map_err(|error| alloc_error(error, bytes, &self.ledger))?;
        self.ledger.insert(ptr, bytes);
        Ok(ptr)
    }

    /// Frees an address `alloc` returned. Errors if it is not live (already freed, or never
    /// handed out by this allocator).
    pub fn free(&self, ptr: u64) -> Result<(), PoolError> {
        self.ledger.remove(ptr)?;
        bind(&self.ctx)?;
        // SAFETY: the ledger proves `ptr` came from `cuMemAlloc` in this context and has not
        // been freed; removing it first means it is freed once.
        unsafe { result::free_sync(ptr) }.map_err(pool_error)
    }

    /// Bytes allocated and not yet freed.
    #[cfg_attr(not(test), allow(dead_code, reason = "read by the tests only"))]
    pub fn live_bytes(&self) -> u64 {
        self.ledger.live_bytes()
    }
}

impl Drop for DirectAllocator {
    fn drop(&mut self) {
        if bind(&self.ctx).is_err() {
            return;
        }
        let _ = result::ctx::synchronize();
        for (ptr, _) in self.ledger.lock().drain() {
            // SAFETY: a live pointer of this allocator (see `free`), drained so freed once,
            // after synchronising so no queued work still uses it.
            if let Err(error) = unsafe { result::free_sync(ptr) } {
                tracing::warn!(error = %describe(error), "cuMemFree failed");
            }
        }
    }
}

/// CUDA's stream-ordered allocator on a private memory pool of device `ordinal`.
pub struct StreamOrderedPool {
    /// The device's primary context, current for every driver call.
    ctx: Arc<CudaContext>,
    /// The private memory pool, destroyed on drop.
    pool: sys::CUmemoryPool,
    /// What is allocated from `pool`, freed on drop.
    ledger: Ledger,
    /// The streams this peer created, the only ones besides the default stream it passes to
    /// the driver (a made-up handle is undefined behaviour there). cudarc destroys each when
    /// it drops.
    streams: Mutex<Vec<Arc<CudaStream>>>,
}

// SAFETY: the driver API is thread-safe and a `CUmemoryPool` handle is not tied to a thread:
// `alloc`, `free` and the attribute reads may run concurrently from several threads (the
// stream-ordered allocator locks internally), and the pool is destroyed once, in `Drop`, which
// has exclusive access. The other fields are `Send + Sync` themselves.
unsafe impl Send for StreamOrderedPool {}
// SAFETY: shared access only makes thread-safe driver calls on the pool (see `Send`).
unsafe impl Sync for StreamOrderedPool {}

impl StreamOrderedPool {
    /// Creates a private pool of pinned device memory on device `ordinal`, with a release
    /// threshold of `u64::MAX` (freed memory is kept for reuse until the pool is dropped).
    ///
    /// Errors when the device does not support memory pools.
    pub fn new(ordinal: usize) -> Result<StreamOrderedPool, PoolError> {
        let ctx = open_context(ordinal)?;
        if !ctx.has_async_alloc() {
            return Err(backend_error(format!(
                "device {ordinal} does not support stream-ordered memory pools"
            )));
        }
        bind(&ctx)?;
        // SAFETY: `CUmemPoolProps` is a C struct of integers, a raw pointer, byte arrays and
        // fieldless enums (or integer newtypes) whose value 0 exists (`..._INVALID`, `..._NONE`),
        // so all-zero bytes are a valid value; the fields that matter are set below, and zero
        // is what the driver asks of the reserved bytes.
        let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
        props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
        props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = ordinal as std::ffi::c_int;
        // SAFETY: `props` is a valid, fully initialised description that outlives the call;
        // the context of device `ordinal` is current.
        let pool = unsafe { result::mem_pool::create(&props) }.map_err(pool_error)?;
        let peer = StreamOrderedPool {
            ctx,
            pool,
            ledger: Ledger::default(),
            streams: Mutex::default(),
        };
        let mut threshold: u64 = u64::MAX;
        // SAFETY: `pool` is live; `CU_MEMPOOL_ATTR_RELEASE_THRESHOLD` takes a `cuuint64_t`,
        // which `threshold` is, and it outlives the call. On error `peer` drops and destroys
        // the pool.
        unsafe {
            result::mem_pool::set_attribute(
                peer.pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        }
        .map_err(pool_error)?;
        Ok(peer)
    }

    /// Creates a non-blocking stream for this peer's requests; it lives as long as the peer.
    pub fn create_stream(&self) -> Result<StreamId, PoolError> {
        let stream = self.ctx.new_stream().map_err(pool_error)?;
        let id = StreamId(stream.cu_stream() as usize as u64);
        self.lock_streams().push(stream);
        Ok(id)
    }

    /// Allocates `bytes` bytes, ordered on `stream` (the default stream or one of
    /// [`StreamOrderedPool::create_stream`]); returns the device address.
    pub fn alloc(&self, bytes: usize, stream: StreamId) -> Result<u64, PoolError> {
        let handle = self.stream(stream)?;
        bind(&self.ctx)?;
        // SAFETY: the pool is live, `handle` is the default stream or a live stream of this
        // context (checked against the streams this peer created and holds), and the context
        // is current. The memory is uninitialised and only its address leaves this call.
        let ptr = unsafe { result::mem_pool::alloc_async(self.pool, bytes, handle) }
            .map_err(|error| alloc_error(error, bytes, &self.ledger))?;
        self.ledger.insert(ptr, bytes);
        Ok(ptr)
    }

    /// Frees an address `alloc` returned, ordered on `stream`: the memory may serve a later
    /// `alloc` on the same stream at once, and on other streams once this point is reached.
    pub fn free(&self, ptr: u64, stream: StreamId) -> Result<(), PoolError> {
        let handle = self.stream(stream)?;
        self.ledger.remove(ptr)?;
        bind(&self.ctx)?;
        // SAFETY: the ledger proves `ptr` came from this pool and has not been freed; removing
        // it first means it is freed once. `handle` is checked as in `alloc`.
        unsafe { result::free_async(ptr, handle) }.map_err(pool_error)
    }

    /// The handle of `stream`, if it is the default stream or one this peer created.
    fn stream(&self, stream: StreamId) -> Result<sys::CUstream, PoolError> {
        if stream == StreamId::DEFAULT {
            return Ok(std::ptr::null_mut());
        }
        self.lock_streams()
            .iter()
            .map(|known| known.cu_stream())
            .find(|&handle| handle as usize as u64 == stream.0)
            .ok_or_else(|| {
                backend_error(format!(
                    "stream {:#x} was not created by this stream-ordered pool",
                    stream.0
                ))
            })
    }

    /// The created streams, whatever a panic elsewhere did.
    fn lock_streams(&self) -> MutexGuard<'_, Vec<Arc<CudaStream>>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The pool's own figures, which the tests check (the bench reports times only).
#[cfg_attr(not(test), allow(dead_code, reason = "read by the tests only"))]
impl StreamOrderedPool {
    /// Bytes the driver's pool holds from the device (`CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT`).
    pub fn reserved_bytes(&self) -> Result<u64, PoolError> {
        self.attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
    }

    /// Bytes of the pool handed out and not yet freed (`CU_MEMPOOL_ATTR_USED_MEM_CURRENT`).
    pub fn used_bytes(&self) -> Result<u64, PoolError> {
        self.attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// The most bytes the pool ever held (`CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH`).
    pub fn peak_reserved_bytes(&self) -> Result<u64, PoolError> {
        self.attribute(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)
    }

    /// A `cuuint64_t` attribute of the pool.
    fn attribute(&self, attribute: sys::CUmemPool_attribute) -> Result<u64, PoolError> {
        bind(&self.ctx)?;
        let mut value: u64 = 0;
        // SAFETY: the pool is live; the `*_MEM_*` attributes are `cuuint64_t`, which `value`
        // is, and it outlives the call.
        unsafe {
            result::mem_pool::get_attribute(self.pool, attribute, (&mut value as *mut u64).cast())
        }
        .map_err(pool_error)?;
        Ok(value)
    }
}

impl Drop for StreamOrderedPool {
    fn drop(&mut self) {
        if bind(&self.ctx).is_err() {
            tracing::warn!("could not bind the CUDA context; the stream-ordered pool is leaked");
            return;
        }
        // Wait for every stream (queued frees included), free what the caller left allocated,
        // wait again, then destroy: a pool is destroyed only once nothing is outstanding.
        let _ = result::ctx::synchronize();
        for (ptr, _) in self.ledger.lock().drain() {
            // SAFETY: a live pointer of this pool (see `free`), drained so freed once, after
            // synchronising so no queued work uses it; the default stream of the current
            // context is always valid.
            if let Err(error) = unsafe { result::free_async(ptr, std::ptr::null_mut()) } {
                tracing::warn!(error = %describe(error), "cuMemFreeAsync failed");
            }
        }
        let _ = result::ctx::synchronize();
        // The streams go now (cudarc destroys them), before the pool: nothing is queued on
        // them any more, and no later call can name them.
        self.lock_streams().clear();
        // SAFETY: the pool was created in `new`, is destroyed once, here, and nothing is
        // allocated from it any more (all frees above completed at the synchronisation).
        if let Err(error) = unsafe { result::mem_pool::destroy(self.pool) } {
            tracing::warn!(error = %describe(error), "cuMemPoolDestroy failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const MIB: usize = 1 << 20;

    /// Moved from the library's CUDA integration tests with the peers. Without a driver it
    /// says so (`devscripts/cuda_tests.sh` counts the line: on a GPU machine a skip fails).
    #[test]
    fn the_driver_peers_allocate_and_free() -> TestResult {
        if !CudaBackend::driver_available() {
            eprintln!("skipped: no CUDA driver");
            return Ok(());
        }
        let direct = DirectAllocator::new(0)?;
        let ptr = direct.alloc(MIB)?;
        assert_eq!(direct.live_bytes(), MIB as u64);
        direct.free(ptr)?;
        assert!(
            direct.free(ptr).is_err(),
            "a double free is an error, not a corruption"
        );
        let leaked = direct.alloc(4 * MIB)?; // freed when the allocator drops
        assert_ne!(leaked, 0);
        drop(direct);

        let pool = StreamOrderedPool::new(0)?;
        let stream = pool.create_stream()?;
        let first = pool.alloc(8 * MIB, stream)?;
        assert!(pool.used_bytes()? >= 8 * MIB as u64);
        pool.free(first, stream)?;
        let second = pool.alloc(8 * MIB, stream)?; // left for the pool's drop to free
        assert_ne!(second, 0);
        assert!(pool.reserved_bytes()? >= 8 * MIB as u64);
        assert!(pool.free(0xdead_0000, stream).is_err());
        assert!(pool.alloc(MIB, StreamId(0xdead_0000)).is_err());
        let on_default = pool.alloc(MIB, StreamId::DEFAULT)?;
        pool.free(on_default, StreamId::DEFAULT)?;
        assert!(pool.peak_reserved_bytes()? >= pool.reserved_bytes()?);
        drop(pool); // frees `second` and destroys the pool
        Ok(())
    }

    /// Runs everywhere: without a driver the peers refuse to open (cudarc would panic if they
    /// called it), with one an ordinal past the last device is refused.
    #[test]
    fn the_peers_refuse_a_missing_driver_or_device() {
        if !CudaBackend::driver_available() {
            for error in [
                DirectAllocator::new(0).err(),
                StreamOrderedPool::new(0).err(),
            ] {
                let message = error.expect("no driver, no peer").to_string();
                assert!(message.contains("no CUDA driver"), "{message}");
            }
            return;
        }
        let devices = CudaBackend::device_count();
        assert!(matches!(
            DirectAllocator::new(devices),
            Err(PoolError::NoSuchDevice { device, devices: n }) if device == devices && n == devices
        ));
    }
}
