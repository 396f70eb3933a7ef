//! `PooledBuffer<T>`: ownership is the API.
//!
//! A buffer owns its block; dropping it gives the block back to its class (or releases it).
//! There is no `free` call and so no double return. Each buffer keeps the pool alive through
//! the `Arc` inside its block record (the reference moves with the record between cache and
//! buffer, so the hit path never touches a reference count); buffers may outlive every
//! `MemoryManager` handle, and the last owner releases everything.
//!
//! Host access hands out `&[T]` only for `T: bytemuck::Pod` (every bit pattern valid), over
//! memory backends promise is initialised, so reading a reused block is never undefined
//! behaviour. Whether a new owner may see the previous owner's data is the
//! `zero_on_reuse` setting's business.
//!
//! A block is handed out at once on the stream its previous owner used, in stream order: the
//! previous owner's kernels, and the zeroing of `zero_on_reuse`, may still be queued there. The
//! device sees them in order; the host does not. So the first host access of a buffer waits
//! for its stream (`StreamOrdered::wait_for_stream`; synchronous backends have none), once; after
//! that, host access and the owner's own queued work are the owner's to order, as with any
//! pinned memory.

use std::fmt;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[cfg(feature = "cuda")]
use crate::backend::cuda::{
    cudarc::driver::CudaStream, CudaBackend, CudaBufferView, CudaBufferViewMut,
};
#[cfg(all(feature = "metal", target_vendor = "apple"))]
use crate::backend::metal::{MetalBackend, MetalBuffer};
use crate::backend::{DeviceAddress, Fence};
use crate::error::PoolError;
use crate::kind::{MemoryKind, StreamId};
use crate::pool_manager::{Allocation, PoolManager, Record, Route, Target};
use crate::pools::pending::{LateFence, Pending};

#[derive(Default)]
struct BufferGates {
    fences: Vec<Arc<dyn Fence>>,
    extra_streams: Vec<StreamId>,
}

/// A typed buffer handed out by a [`crate::MemoryManager`]; returns its block on drop.
///
/// ```
/// use gpupool::{backend::host::HostBackend, MemoryManager};
/// let manager = MemoryManager::new(HostBackend::new());
/// let mut buffer = manager.allocate::<f32>(1000).unwrap();
/// buffer.as_mut_slice().unwrap().fill(1.5);
/// assert_eq!(buffer.len(), 1000);
/// assert_eq!(buffer.block_bytes(), 4096); // the class that holds 4,000 bytes
/// drop(buffer); // back to the 4 KiB class, ready for the next request
/// ```
pub struct PooledBuffer<T> {
    record: ManuallyDrop<Box<Record>>,
    len: usize,
    requested_bytes: usize,
    device: u32,
    route: Route,
    stream: StreamId,
    /// Fences and extra streams, boxed because almost no buffer has any.
    gates: Option<Box<BufferGates>>,
    /// Whether the work queued on the stream before the hand-out is known to be done, so the
    /// host may touch the memory (see the module documentation).
    host_ready: AtomicBool,
    _element: PhantomData<T>,
}

// SAFETY: the buffer exclusively owns its block (no other buffer or cache refers to it while
// it is alive), so moving it to another thread moves that ownership; elements cross threads
// only if `T: Send`. The pool it points to is `Send + Sync`.
unsafe impl<T: Send> Send for PooledBuffer<T> {}
// SAFETY: shared access gives only `&[T]` (needs `T: Sync`) and plain reads of addresses.
unsafe impl<T: Sync> Sync for PooledBuffer<T> {}

impl<T> PooledBuffer<T> {
    pub(crate) fn new(
        allocation: Allocation,
        len: usize,
        requested_bytes: usize,
        device: usize,
        stream: StreamId,
    ) -> Self {
        PooledBuffer {
            record: ManuallyDrop::new(allocation.record),
            len,
            requested_bytes,
            device: device as u32,
            route: allocation.route,
            stream,
            gates: None,
            host_ready: AtomicBool::new(false),
            _element: PhantomData,
        }
    }

    /// The number of elements requested.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: zero-length requests are refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes requested (`len × size_of::<T>()`).
    pub fn requested_bytes(&self) -> usize {
        self.requested_bytes
    }

    /// The size of the block actually held (its class size), never less than requested.
    pub fn block_bytes(&self) -> usize {
        self.record.block.bytes()
    }

    /// The memory kind of the block.
    pub fn kind(&self) -> MemoryKind {
        self.record.block.kind()
    }

    /// The device index the block belongs to.
    pub fn device(&self) -> usize {
        self.device as usize
    }

    /// The stream this buffer is ordered on.
    pub fn stream(&self) -> StreamId {
        self.stream
    }

    /// Whether the request went straight to the backend (above every pooled size, or with
    /// pooling off).
    pub fn is_bypass(&self) -> bool {
        self.route == Route::BYPASS
    }

    /// Whether the block came from the large arena (split out of a segment, or placed in the
    /// virtual-memory arena's range).
    pub fn is_large(&self) -> bool {
        matches!(self.route.target(), Target::Large(_) | Target::Virtual)
    }

    /// The address device code uses (a `CUdeviceptr`, a Metal GPU address, a host address).
    pub fn device_address(&self) -> u64 {
        self.record.block.device_address()
    }

    /// The host pointer to the first element, for host-visible memory. Unlike `as_slice`, it
    /// does not wait for work queued on the buffer's stream: the caller orders its accesses.
    pub fn host_ptr(&self) -> Option<*mut T> {
        self.record.block.host_ptr().map(|ptr| ptr.as_ptr().cast())
    }

    /// Declares that GPU work up to `fence` uses this buffer: after the drop, its block goes
    /// to no new owner until the fence completes (Metal: a command buffer's completion).
    pub fn used_by(&mut self, fence: Arc<dyn Fence>) {
        self.gates
            .get_or_insert_with(Box::default)
            .fences
            .push(fence);
    }

    /// Declares that work on `stream` (besides the buffer's own) uses this buffer, like
    /// PyTorch's `record_stream`: at drop, a fence is recorded on `stream`, and the block is
    /// reused only after it completes.
    pub fn record_stream(&mut self, stream: StreamId) {
        if stream == self.stream {
            return;
        }
        let gates = self.gates.get_or_insert_with(Box::default);
        if !gates.extra_streams.contains(&stream) {
            gates.extra_streams.push(stream);
        }
    }
}

/// Interop with cudarc: the buffer as device memory for cudarc's API (see the `cuda` backend's
/// module documentation, "cudarc interop", for the ordering and soundness rules).
#[cfg(feature = "cuda")]
impl<T> PooledBuffer<T> {
    /// The buffer as device memory for cudarc (`DevicePtr`, `PushKernelArg`), lent to the
    /// buffer's own stream as a cudarc stream: `stream.memcpy_dtoh(&buffer.cuda_view()?, &mut
    /// host)`, `launch_builder(&f).arg(&view)` on that stream.
    ///
    /// Errors: [`PoolError::NotDeviceMemory`] for a buffer of another backend or of a
    /// host-visible kind; [`PoolError::Backend`] when the buffer's stream is a raw handle lent
    /// through `register_stream` (adopt the cudarc stream instead, or use
    /// [`PooledBuffer::cuda_view_on`]).
    ///
    /// ```no_run
    /// use gpupool::backend::cuda::CudaBackend;
    /// use gpupool::{AllocOptions, MemoryManager};
    ///
    /// let backend = CudaBackend::new(0)?;
    /// let stream = backend.context().new_stream().expect("a cudarc stream");
    /// let options = AllocOptions { stream: backend.adopt_stream(&stream)?, ..AllocOptions::default() };
    /// let manager = MemoryManager::new(backend);
    ///
    /// let host: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    /// let mut buffer = manager.allocate_with::<f32>(host.len(), options)?;
    /// stream.memcpy_htod(&host, &mut buffer.cuda_view_mut()?).expect("copy in");
    /// let mut back = vec![0.0f32; host.len()];
    /// stream.memcpy_dtoh(&buffer.cuda_view()?, &mut back).expect("copy out");
    /// stream.synchronize().expect("the copies ran");
    /// assert_eq!(back, host);
    /// # Ok::<(), gpupool::PoolError>(())
    /// ```
    /// The example `crates/gpupool/examples/cudarc_kernel.rs` also launches a kernel on pooled
    /// buffers.
    pub fn cuda_view(&self) -> Result<CudaBufferView<'_, T>, PoolError> {
        self.cuda_backend()?
            .lend_view(&self.record.block, self.len, self.stream, None)
    }

    /// [`PooledBuffer::cuda_view`], lent to another cudarc `stream` of the buffer's context:
    /// the stream waits (on the device) for the work queued on the buffer's stream first, and
    /// when the view is dropped the buffer's stream waits for the stream's work, so the pool
    /// reuses the block only after it. A stream of another context is refused
    /// ([`PoolError::Backend`]).
    pub fn cuda_view_on(
        &self,
        stream: &Arc<CudaStream>,
    ) -> Result<CudaBufferView<'_, T>, PoolError> {
        self.cuda_backend()?
            .lend_view(&self.record.block, self.len, self.stream, Some(stream))
    }

    /// The buffer as writable device memory for cudarc (`DevicePtrMut`): `stream.memcpy_htod(&host,
    /// &mut buffer.cuda_view_mut()?)`. Errors as [`PooledBuffer::cuda_view`].
    pub fn cuda_view_mut(&mut self) -> Result<CudaBufferViewMut<'_, T>, PoolError> {
        self.cuda_view_mut_with(None)
    }

    /// [`PooledBuffer::cuda_view_mut`] lent to another cudarc `stream`, ordered as
    /// [`PooledBuffer::cuda_view_on`] describes.
    pub fn cuda_view_mut_on(
        &mut self,
        stream: &Arc<CudaStream>,
    ) -> Result<CudaBufferViewMut<'_, T>, PoolError> {
        self.cuda_view_mut_with(Some(stream))
    }

    fn cuda_view_mut_with(
        &mut self,
        stream: Option<&Arc<CudaStream>>,
    ) -> Result<CudaBufferViewMut<'_, T>, PoolError> {
        let (len, pool_stream, device, kind) = (self.len, self.stream, self.device, self.kind());
        // The record's fields are borrowed apart: the pool (for its backend) shared, the block
        // exclusively.
        let Record { block, owner, .. } = &mut **self.record;
        let pool = owner
            .as_deref()
            .expect("a live buffer's record always holds its pool");
        cuda_backend_of(pool, device as usize, kind)?.lend_view_mut(block, len, pool_stream, stream)
    }

    /// The CUDA backend of the buffer's device, or the error for a buffer of another backend.
    fn cuda_backend(&self) -> Result<&CudaBackend, PoolError> {
        cuda_backend_of(self.pool(), self.device as usize, self.kind())
    }
}

/// The CUDA backend of `device`, or [`PoolError::NotDeviceMemory`] for another backend.
#[cfg(feature = "cuda")]
fn cuda_backend_of(
    pool: &PoolManager,
    device: usize,
    kind: MemoryKind,
) -> Result<&CudaBackend, PoolError> {
    let backend = pool.backend(device);
    backend
        .downcast_ref::<CudaBackend>()
        .ok_or_else(|| PoolError::NotDeviceMemory {
            backend: backend.name().to_string(),
            kind,
            wanted: "CUDA",
        })
}

/// Interop with Metal: the `MTLBuffer` a buffer's block lives in.
#[cfg(all(feature = "metal", target_vendor = "apple"))]
impl<T> PooledBuffer<T> {
    /// The `MTLBuffer` holding this buffer's block, and the block's byte offset inside it, for
    /// `setBuffer:offset:atIndex:` or a residency set: `let metal = buffer.metal_buffer()?;
    /// encoder.setBuffer_offset_atIndex(Some(metal.buffer()), metal.offset(), 0)`. `None` for a
    /// buffer of another backend.
    ///
    /// The handle keeps the Metal object alive, not the block: once this buffer is dropped the
    /// memory may go to a new owner, so encode it only while the buffer lives, and tie the
    /// command buffer to the buffer with [`PooledBuffer::used_by`] (a `CommandBufferFence`)
    /// before dropping it (see the `metal` backend's module documentation).
    pub fn metal_buffer(&self) -> Option<MetalBuffer> {
        self.pool()
            .backend(self.device as usize)
            .downcast_ref::<MetalBackend>()?
            .metal_buffer_at(self.device_address())
    }
}

impl<T: bytemuck::Pod> PooledBuffer<T> {
    /// The elements, for host-visible memory. The first host access waits for the work queued
    /// on the buffer's stream before it was handed out (see the module documentation).
    pub fn as_slice(&self) -> Result<&[T], PoolError> {
        let ptr = self.host_access()?;
        // SAFETY: the block is host-visible, holds at least `len × size_of::<T>()` initialised
        // bytes (backends hand out initialised host memory, see `Block::new`), is aligned to
        // `BLOCK_ALIGN` which the manager checked against `align_of::<T>()`, and is owned by
        // this buffer alone; the pool's own queued work on it (the previous owner's, the
        // zeroing) is finished (`host_access`); `T: Pod` accepts any bit pattern.
        Ok(unsafe { std::slice::from_raw_parts(ptr, self.len) })
    }

    /// The elements, mutably, for host-visible memory; waits as `as_slice` does.
    pub fn as_mut_slice(&mut self) -> Result<&mut [T], PoolError> {
        let ptr = self.host_access()?;
        // SAFETY: as in `as_slice`; `&mut self` makes the access exclusive.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, self.len) })
    }

    /// The host pointer, once the work queued before the hand-out has finished.
    fn host_access(&self) -> Result<*mut T, PoolError> {
        let ptr = self
            .host_ptr()
            .ok_or(PoolError::NotHostVisible { kind: self.kind() })?;
        if !self.host_ready.load(Ordering::Acquire) {
            let backend = self.pool().backend(self.device as usize);
            backend
                .wait_for(self.stream)
                .map_err(|error| PoolError::Backend {
                    backend: backend.name().to_string(),
                    message: format!("waiting for the buffer's stream before host access: {error}"),
                })?;
            self.host_ready.store(true, Ordering::Release);
        }
        Ok(ptr)
    }
}

impl<T> DeviceAddress for PooledBuffer<T> {
    fn device_address(&self) -> u64 {
        self.record.block.device_address()
    }
}

impl<T> fmt::Debug for PooledBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledBuffer")
            .field("len", &self.len)
            .field("requested_bytes", &self.requested_bytes)
            .field("block_bytes", &self.record.block.bytes())
            .field("kind", &self.record.block.kind())
            .field("device", &self.device)
            .field(
                "device_address",
                &format_args!("{:#x}", self.record.block.device_address()),
            )
            .finish()
    }
}

impl<T> PooledBuffer<T> {
    /// The pool this buffer's block belongs to.
    fn pool(&self) -> &PoolManager {
        self.record
            .owner
            .as_deref()
            .expect("a live buffer's record always holds its pool")
    }

    /// Turns the buffer's fences and extra streams into the cached block's pending state.
    #[cold]
    fn settle_gates(&self, gates: BufferGates) -> Pending {
        let BufferGates {
            mut fences,
            extra_streams,
        } = gates;
        let backend = self.pool().backend(self.device as usize);
        for stream in extra_streams {
            let Some(streams) = backend.stream_ordered() else {
                continue; // nothing asynchronous to wait for
            };
            match streams.record_fence(stream) {
                Ok(fence) => fences.push(fence),
                Err(error) => {
                    // Without a fence the block could be reused too early: wait instead. A
                    // failed wait proves nothing: the fence is then recorded later.
                    tracing::warn!(?error, "record_fence failed at drop; synchronising");
                    if let Err(error) = streams.synchronize() {
                        tracing::warn!(?error, "synchronize failed too; fencing later");
                        fences.push(Arc::new(LateFence::new(backend.clone(), stream)));
                    }
                }
            }
        }
        Pending::with_fences(self.stream, fences)
    }
}

impl<T> Drop for PooledBuffer<T> {
    #[inline(always)]
    fn drop(&mut self) {
        // Fences first: `settle_gates` reads the record.
        let pending = match self.gates.take() {
            None => Pending::on(self.stream),
            Some(gates) => self.settle_gates(*gates),
        };
        // SAFETY: `record` is taken exactly once, here, and never read again.
        let record = unsafe { ManuallyDrop::take(&mut self.record) };
        let device = self.device as usize;
        let pool: *const PoolManager = record
            .owner
            .as_deref()
            .expect("a live buffer's record always holds its pool");
        // SAFETY: the record moved into `give_back` holds an `Arc` of the pool. Until the call
        // returns, either that `Arc` is still in our record, or it sits in a cache, where only
        // a handle-holding caller (trim, maintenance: they own an `Arc` themselves) or the last
        // handle's drop (which holds its own `Arc` meanwhile, and turns pooling off so nothing
        // is cached after it) can take it out; or `give_back` hands it back to us. The cache's
        // lock release is the last access `give_back` makes to the pool after caching, as with
        // any mutex another thread may free once it is unlocked.
        let owner =
            unsafe { &*pool }.give_back(device, self.route, record, pending, self.requested_bytes);
        // Possibly the pool's last reference: dropped only now that `give_back` has returned.
        drop(owner);
    }
}
