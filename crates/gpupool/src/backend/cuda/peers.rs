//! Benchmark peers, not part of the pool: the CUDA driver's own allocators, which
//! `gpupool bench --backend cuda` measures beside the pool on the same device.
//!
//! - [`DirectAllocator`]: `cuMemAlloc` / `cuMemFree` for every request, what a program without
//!   a pool pays.
//! - [`StreamOrderedPool`]: CUDA's stream-ordered allocator (`cuMemAllocFromPoolAsync` /
//!   `cuMemFreeAsync`) on a private memory pool whose release threshold is `u64::MAX`, so freed
//!   memory stays in the pool instead of going back to the device at each synchronisation:
//!   the driver's best caching configuration, which DESIGN.md quotes at about 1.7 µs per op.
//!
//! Both are safe to call: each remembers the pointers it handed out (a mutex-protected map,
//! tens of nanoseconds against the microseconds of the driver calls they time), so freeing a
//! pointer twice, or one it did not hand out, is an error rather than a corrupted heap, and
//! whatever is still allocated is freed when the peer drops. Stream ids are checked like the
//! backend's: the default stream or one made by the peer's [`StreamOrderedPool::create_stream`].

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

use super::driver::{self, describe, pool_error, HeldContext, StreamRegistry};
use crate::backend::StreamId;
use crate::error::PoolError;

/// Live pointers and their sizes.
#[derive(Default)]
struct Ledger {
    live: Mutex<HashMap<u64, usize>>,
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, usize>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn insert(&self, ptr: u64, bytes: usize) {
        self.lock().insert(ptr, bytes);
    }

    /// Removes `ptr`, or says it is not live.
    fn remove(&self, ptr: u64) -> Result<usize, PoolError> {
        self.lock().remove(&ptr).ok_or_else(|| PoolError::Backend {
            backend: driver::BACKEND.to_string(),
            message: format!("{ptr:#x} is not a live allocation of this peer"),
        })
    }

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
    ctx: HeldContext,
    ledger: Ledger,
}

impl DirectAllocator {
    /// Opens device `ordinal` (its primary context, shared with any `CudaBackend` on it).
    pub fn new(ordinal: usize) -> Result<DirectAllocator, PoolError> {
        Ok(DirectAllocator {
            ctx: driver::open_context(ordinal)?,
            ledger: Ledger::default(),
        })
    }

    /// Allocates `bytes` bytes of device memory; returns its device address.
    pub fn alloc(&self, bytes: usize) -> Result<u64, PoolError> {
        let _bound = driver::bind(&self.ctx).map_err(pool_error)?;
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
        let _bound = driver::bind(&self.ctx).map_err(pool_error)?;
        // SAFETY: the ledger proves `ptr` came from `cuMemAlloc` in this context and has not
        // been freed; removing it first means it is freed once.
        unsafe { result::free_sync(ptr) }.map_err(pool_error)
    }

    /// Bytes allocated and not yet freed.
    pub fn live_bytes(&self) -> u64 {
        self.ledger.live_bytes()
    }
}

impl Drop for DirectAllocator {
    fn drop(&mut self) {
        let Ok(_bound) = driver::bind(&self.ctx) else {
            return;
        };
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
    ctx: HeldContext,
    pool: sys::CUmemoryPool,
    ledger: Ledger,
    streams: StreamRegistry,
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
        let ctx = driver::open_context(ordinal)?;
        if !ctx.has_async_alloc() {
            return Err(PoolError::Backend {
                backend: driver::BACKEND.to_string(),
                message: format!("device {ordinal} does not support stream-ordered memory pools"),
            });
        }
        let _bound = driver::bind(&ctx).map_err(pool_error)?;
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
            streams: StreamRegistry::default(),
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
        let _bound = driver::bind(&self.ctx).map_err(pool_error)?;
        self.streams.create().map_err(pool_error)
    }

    /// Allocates `bytes` bytes, ordered on `stream` (the default stream or one of
    /// [`StreamOrderedPool::create_stream`]); returns the device address.
    pub fn alloc(&self, bytes: usize, stream: StreamId) -> Result<u64, PoolError> {
        let handle = self.stream(stream)?;
        let _bound = driver::bind(&self.ctx).map_err(pool_error)?;
        // SAFETY: the pool is live, `handle` is the default stream or a live stream of this
        // context (the registry checked it), and the context is current. The memory is
        // uninitialised and only its address leaves this call.
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
        let _bound = driver::bind(&self.ctx).map_err(pool_error)?;
        // SAFETY: the ledger proves `ptr` came from this pool and has not been freed; removing
        // it first means it is freed once. `handle` is checked as in `alloc`.
        unsafe { result::free_async(ptr, handle) }.map_err(pool_error)
    }

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

    fn attribute(&self, attribute: sys::CUmemPool_attribute) -> Result<u64, PoolError> {
        let _bound = driver::bind(&self.ctx).map_err(pool_error)?;
        let mut value: u64 = 0;
        // SAFETY: the pool is live; the `*_MEM_*` attributes are `cuuint64_t`, which `value`
        // is, and it outlives the call.
        unsafe {
            result::mem_pool::get_attribute(self.pool, attribute, (&mut value as *mut u64).cast())
        }
        .map_err(pool_error)?;
        Ok(value)
    }

    fn stream(&self, stream: StreamId) -> Result<sys::CUstream, PoolError> {
        self.streams
            .handle(stream)
            .map_err(|error| PoolError::Backend {
                backend: driver::BACKEND.to_string(),
                message: format!("{error:?}"),
            })
    }
}

impl Drop for StreamOrderedPool {
    fn drop(&mut self) {
        let Ok(_bound) = driver::bind(&self.ctx) else {
            tracing::warn!("could not bind the CUDA context; the stream-ordered pool is leaked");
            return;
        };
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
        self.streams.destroy_owned();
        // SAFETY: the pool was created in `new`, is destroyed once, here, and nothing is
        // allocated from it any more (all frees above completed at the synchronisation).
        if let Err(error) = unsafe { result::mem_pool::destroy(self.pool) } {
            tracing::warn!(error = %describe(error), "cuMemPoolDestroy failed");
        }
    }
}
