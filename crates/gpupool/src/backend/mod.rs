//! The bottom layer: where blocks really come from.
//!
//! A [`Backend`] allocates and releases whole blocks and reports device memory. What only some
//! devices can do is an optional capability the pools ask for: [`StreamOrdered`] (work queued
//! in streams: fences, waits), [`Zeroing`] (zeroing in stream order) and [`Purgeable`] (idle
//! blocks the OS may discard); a backend without one gets the plain behaviour (no fences, host
//! zeroing, nothing purged).
//! Everything that can be tested without a GPU (classes, caches, statistics, budgets) lives
//! above this trait, so the `host` and `sim` backends exercise the same pool code that runs on
//! CUDA and Metal. A backend module holds only the FFI calls and the reasoning that makes them
//! safe.

pub mod fence;
pub mod host;
pub mod sim;

#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(all(feature = "metal", target_vendor = "apple"))]
pub mod metal;

use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::error::BackendError;
pub use crate::kind::{MemoryKind, StreamId};
pub use fence::{CompletedFence, Fence};

/// One allocation from a backend: an owned token the pool moves between threads and caches.
///
/// Only a backend creates blocks ([`Block::new`] is `unsafe`), and a block is released by
/// moving it into [`Backend::release`], so it can be released at most once. The backend alone
/// interprets `token` (a Metal object pointer, a host layout, a sim id); the pool only reads
/// the size and the addresses.
#[derive(Debug)]
pub struct Block {
    device_address: u64,
    host_ptr: Option<NonNull<u8>>,
    bytes: usize,
    kind: MemoryKind,
    token: u64,
}

impl Block {
    /// Describes a fresh allocation.
    ///
    /// # Safety
    /// The block must own `bytes` bytes of memory of `kind` that nothing else uses; where
    /// `host_ptr` is given it must be valid for reads and writes of `bytes` bytes, aligned to
    /// [`crate::BLOCK_ALIGN`], and fully initialised, until the block is released by the
    /// backend that created it.
    pub unsafe fn new(
        device_address: u64,
        host_ptr: Option<NonNull<u8>>,
        bytes: usize,
        kind: MemoryKind,
        token: u64,
    ) -> Block {
        Block {
            device_address,
            host_ptr,
            bytes,
            kind,
            token,
        }
    }

    /// The address device code uses (equal to the host address where memory is unified).
    pub fn device_address(&self) -> u64 {
        self.device_address
    }
    /// The host address, for host-visible kinds; `None` otherwise.
    pub fn host_ptr(&self) -> Option<NonNull<u8>> {
        self.host_ptr
    }
    /// The real size of the allocation in bytes (the class size, never less than requested).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
    /// The kind this block was allocated as.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }
    /// Backend-private data needed to release the block.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// A block describing `bytes` bytes at `offset` inside this one, for the pool's large-block
    /// splitting. A view carries its parent's token so the backend can zero it, and never
    /// leaves the crate: the pool releases only whole segments, never a view. `None` if the
    /// range does not lie inside this block.
    pub(crate) fn view(&self, offset: usize, bytes: usize) -> Option<Block> {
        let end = offset.checked_add(bytes)?;
        if end > self.bytes {
            return None;
        }
        Some(Block {
            device_address: self.device_address + offset as u64,
            host_ptr: self
                .host_ptr
                .and_then(|ptr| NonNull::new(ptr.as_ptr().wrapping_add(offset))),
            bytes,
            kind: self.kind,
            token: self.token,
        })
    }
}

// SAFETY: a `Block` is an owned handle to memory that no Rust reference aliases while it sits
// in a cache or moves between threads; the raw pointer is only dereferenced by the one
// `PooledBuffer` that owns the block at a time.
unsafe impl Send for Block {}

/// Anything that stands for a block by its device address (a `PooledBuffer`), so a backend can
/// look its blocks up (Metal's `metal_buffer`) without knowing the buffer type above it.
pub trait DeviceAddress {
    /// The address device code uses for the block's first byte.
    fn device_address(&self) -> u64;
}

/// Free and total bytes of a device, as the driver reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Bytes the device could still allocate.
    pub free_bytes: u64,
    /// All bytes of the device.
    pub total_bytes: u64,
}

/// What a backend does: allocate and release whole blocks, report memory, and mark points in
/// a stream's work so the pool knows when a block is no longer used by the GPU.
pub trait Backend: Send + Sync + 'static {
    /// A short name ("host", "sim", "cuda", "metal").
    fn name(&self) -> &str;

    /// A description of the device for reports (e.g. the GPU's name).
    fn device_name(&self) -> String {
        self.name().to_string()
    }

    /// The memory kinds this backend offers; the first is the default for requests.
    fn kinds(&self) -> &[MemoryKind];

    /// Allocates a block of exactly `bytes` bytes (the pool already rounded to a class).
    /// Host-visible blocks must come back fully initialised (e.g. zeroed), because the pool
    /// hands them out as slices of plain-data types.
    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError>;

    /// Gives a block back to the driver. The pool calls it only with blocks this backend
    /// allocated, once each, after any GPU work using them is complete. Because the method is
    /// safe, a backend must refuse (log and leak) a block it did not make, e.g. by tagging
    /// its tokens.
    fn release(&self, block: Block);

    /// Free and total device memory, where the backend can tell.
    fn memory_info(&self) -> Option<MemoryInfo> {
        None
    }

    /// Work queued in streams that runs after the call returns (CUDA streams, Metal command
    /// queues), or `None` when nothing the backend does outlives the call (host, a synchronous
    /// sim): the pool then needs no fence to reuse a block.
    fn stream_ordered(&self) -> Option<&dyn StreamOrdered> {
        None
    }

    /// Zeroing blocks in stream order (for `zero_on_reuse`), or `None`: the pool then zeroes
    /// host-visible blocks from the host and refuses `zero_on_reuse` for device memory.
    fn zeroing(&self) -> Option<&dyn Zeroing> {
        None
    }

    /// Idle blocks the OS may discard while they are cached (Metal's purgeable state), or
    /// `None`.
    fn purgeable(&self) -> Option<&dyn Purgeable> {
        None
    }

    /// Address space reserved up front and physical memory mapped into it page by page (CUDA's
    /// virtual memory management), or `None`: the pool then takes whole segments instead.
    fn virtual_memory(&self) -> Option<&dyn VirtualMemory> {
        None
    }

    /// The backend as [`Any`], so that code knowing its concrete type can reach it behind a
    /// `dyn Backend`: [`crate::MemoryManager::backend`], and a buffer's own backend for the
    /// interop accessors (`PooledBuffer::cuda_view`, `PooledBuffer::metal_buffer`). The
    /// default, `None`, keeps the type hidden; the crate's backends return `Some(self)`.
    fn as_any(&self) -> Option<&dyn Any> {
        None
    }
}

/// Proof that the caller is a gpupool pool: [`VirtualMemory::map`] and [`VirtualMemory::unmap`]
/// take one, and only this crate can make one. So code outside the pool cannot map or unmap
/// pages of a backend a pool uses (through an `Arc` kept when the manager was made, or
/// `MemoryManager::backend`): unmapping pages live buffers sit on would make their kernels
/// fault. A backend implemented elsewhere receives it, and may pass it on to a backend it wraps.
///
/// ```compile_fail
/// // Outside the crate there is no way to make one.
/// let access = gpupool::backend::PoolAccess { _private: () };
/// ```
#[derive(Debug)]
pub struct PoolAccess {
    _private: (),
}

impl PoolAccess {
    /// Only the pool makes these.
    pub(crate) const fn new() -> PoolAccess {
        PoolAccess { _private: () }
    }
}

/// The capability of reserving device address space and mapping physical memory into it, of
/// [`MemoryKind::Device`], readable and writable by the device.
///
/// With it, the pool keeps one contiguous range per device in which freed neighbours always
/// merge, and holds physical memory only where blocks live (see `pools::vm_arena`).
pub trait VirtualMemory {
    /// Physical memory is created and mapped in multiples of this many bytes, at addresses
    /// that are multiples of it.
    fn granularity(&self) -> usize;

    /// Reserves `bytes` (a multiple of the granularity) of address space: no memory yet. The
    /// block describes the range; the pool hands out views of it and never releases it with
    /// [`Backend::release`], only with [`VirtualMemory::unreserve`].
    fn reserve(&self, bytes: usize) -> Result<Block, BackendError>;

    /// Gives a reservation back; everything in it was unmapped first.
    fn unreserve(&self, reservation: Block);

    /// Creates `bytes` of physical memory and maps it at `address` (inside a reservation,
    /// granularity-aligned), readable and writable by the device. Out of memory is
    /// [`BackendError::OutOfMemory`], so the pool can release and retry.
    fn map(&self, address: u64, bytes: usize, access: &PoolAccess) -> Result<(), BackendError>;

    /// Unmaps what [`VirtualMemory::map`] mapped at `address` and releases its physical
    /// memory. The pool calls it only once no queued work uses the range (and only the pool
    /// can: see [`PoolAccess`]).
    fn unmap(&self, address: u64, bytes: usize, access: &PoolAccess);
}

/// The capability of a backend whose work runs asynchronously, in streams.
pub trait StreamOrdered {
    /// Marks "all work queued on `stream` so far"; the fence completes when that work has.
    fn record_fence(&self, stream: StreamId) -> Result<Arc<dyn Fence>, BackendError>;

    /// Waits until all queued work that may use pool memory has finished. Called before
    /// releasing blocks whose fences are still pending (out-of-memory recovery, `clear`).
    fn synchronize(&self) -> Result<(), BackendError>;

    /// Waits until the work queued on `stream` so far has finished. The pool calls it before a
    /// buffer's first host access (`as_slice`, `as_mut_slice`), because the block's previous
    /// owner's work on that stream and its zeroing (queued in stream order) may still be
    /// pending, and the host would race them.
    fn wait_for_stream(&self, stream: StreamId) -> Result<(), BackendError>;
}

/// The capability of filling blocks with zeros in stream order.
pub trait Zeroing {
    /// Fills `block` with zeros, ordered after the work queued on `stream` before the call.
    fn zero(&self, block: &Block, stream: StreamId) -> Result<(), BackendError>;
}

/// The capability of letting the OS discard idle blocks (Metal: `Volatile`).
pub trait Purgeable {
    /// Marks an idle block's contents as discardable. The pool calls it before a block enters
    /// a cache (never while GPU work may still use it).
    fn make_purgeable(&self, block: &Block);

    /// Makes a cached block's memory stable again. Returns false if the OS discarded it
    /// meanwhile; the pool then releases it and serves the request as a miss.
    fn reclaim(&self, block: &Block) -> bool;
}

/// The capabilities as the pool uses them, with what a backend without one means.
impl dyn Backend {
    /// The backend as its concrete type `B`, where it is one and shows itself
    /// ([`Backend::as_any`]).
    pub(crate) fn downcast_ref<B: Backend>(&self) -> Option<&B> {
        self.as_any()?.downcast_ref::<B>()
    }

    /// A fence after the work queued on `stream` so far; complete at once where no work is
    /// asynchronous.
    pub(crate) fn fence_after(&self, stream: StreamId) -> Result<Arc<dyn Fence>, BackendError> {
        match self.stream_ordered() {
            Some(streams) => streams.record_fence(stream),
            None => Ok(Arc::new(CompletedFence)),
        }
    }

    /// Waits for all queued work; nothing to wait for where no work is asynchronous.
    pub(crate) fn wait_for_all(&self) -> Result<(), BackendError> {
        self.stream_ordered()
            .map_or(Ok(()), |streams| streams.synchronize())
    }

    /// Waits for the work queued on `stream`.
    pub(crate) fn wait_for(&self, stream: StreamId) -> Result<(), BackendError> {
        self.stream_ordered()
            .map_or(Ok(()), |streams| streams.wait_for_stream(stream))
    }

    /// Marks an idle block discardable, where the backend can.
    pub(crate) fn make_purgeable(&self, block: &Block) {
        if let Some(purgeable) = self.purgeable() {
            purgeable.make_purgeable(block);
        }
    }

    /// Zeroes a block in stream order, or from the host where the backend cannot.
    pub(crate) fn zero_block(&self, block: &Block, stream: StreamId) -> Result<(), BackendError> {
        match self.zeroing() {
            Some(zeroing) => zeroing.zero(block, stream),
            None => zero_from_host(self, block),
        }
    }
}

/// Zeroes a host-visible block from the host: what the pool does for backends without the
/// [`Zeroing`] capability.
fn zero_from_host(backend: &dyn Backend, block: &Block) -> Result<(), BackendError> {
    match block.host_ptr {
        Some(ptr) => {
            // SAFETY: `ptr` points to `block.bytes` initialised bytes owned by the block, which
            // the caller holds exclusively while zeroing (it has not handed it out yet).
            unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, block.bytes) };
            Ok(())
        }
        None => Err(BackendError::Driver(format!(
            "{} cannot zero device memory",
            backend.name()
        ))),
    }
}
