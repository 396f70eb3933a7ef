//! The bottom layer: where blocks really come from.
//!
//! A [`Backend`] allocates and releases whole blocks and reports device memory; nothing else.
//! Everything that can be tested without a GPU (classes, caches, statistics, budgets) lives
//! above this trait, so the `host` and `sim` backends exercise the same pool code that runs on
//! CUDA and Metal. A backend module holds only the FFI calls and the reasoning that makes them
//! safe.

pub mod host;
pub mod sim;

#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(all(feature = "metal", target_vendor = "apple"))]
pub mod metal;

use std::ptr::NonNull;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::PoolError;
use crate::fence::Fence;

/// Where a block lives and who may touch it. Part of every cache key: a request is never
/// served a block of another kind (the seed's storage-mode mix-up hung forever).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MemoryKind {
    /// Memory only the device reads and writes (CUDA `cuMemAlloc`, Metal `Private`).
    Device,
    /// Memory the host reads and writes and the device can address: pinned mapped host memory
    /// on CUDA, `Shared` (unified) memory on Metal, plain aligned memory on the host backend.
    HostVisible,
    /// Host-visible memory mapped write-combined: fast for the host to write and the device to
    /// read, very slow for the host to read.
    HostVisibleWriteCombined,
    /// Metal `Managed` storage (Intel Macs): separate host and device copies kept in sync.
    Managed,
}

impl MemoryKind {
    /// Every kind, in a fixed order used for dense cache indices.
    pub const ALL: [MemoryKind; 4] = [
        MemoryKind::Device,
        MemoryKind::HostVisible,
        MemoryKind::HostVisibleWriteCombined,
        MemoryKind::Managed,
    ];

    /// Whether buffers of this kind expose a host slice.
    pub fn is_host_visible(self) -> bool {
        !matches!(self, MemoryKind::Device)
    }

    /// A short lowercase name for reports and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            MemoryKind::Device => "device",
            MemoryKind::HostVisible => "host-visible",
            MemoryKind::HostVisibleWriteCombined => "host-visible-wc",
            MemoryKind::Managed => "managed",
        }
    }
}

/// An ordered queue of GPU work (a CUDA stream, a Metal command queue). `StreamId(0)` is the
/// backend's default stream; host and sim only ever use it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamId(pub u64);

impl StreamId {
    /// The backend's default stream.
    pub const DEFAULT: StreamId = StreamId(0);
}

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

/// Free and total bytes of a device, as the driver reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Bytes the device could still allocate.
    pub free_bytes: u64,
    /// All bytes of the device.
    pub total_bytes: u64,
}

/// A backend's failure, classified so the pool knows whether releasing idle blocks may help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The device is out of memory now; releasing cached blocks and retrying may succeed.
    #[error("device out of memory")]
    OutOfMemory,
    /// The request can never be served by this backend (e.g. above its largest buffer).
    #[error("larger than the backend's limit of {limit} bytes")]
    TooLarge {
        /// The largest single allocation the backend can make.
        limit: u64,
    },
    /// The backend does not offer this memory kind.
    #[error("{0:?} memory is not offered")]
    UnsupportedKind(MemoryKind),
    /// Any other driver failure, with the driver's words.
    #[error("driver error: {0}")]
    Driver(String),
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

    /// Marks "all work queued on `stream` so far"; the fence completes when that work has.
    /// `None` means work on this backend is never asynchronous.
    fn record_fence(&self, _stream: StreamId) -> Result<Option<Arc<dyn Fence>>, BackendError> {
        Ok(None)
    }

    /// Waits until all queued work that may use pool memory has finished. Called before
    /// releasing blocks whose fences are still pending (out-of-memory recovery, `clear`).
    fn synchronize(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Waits until the work queued on `stream` so far has finished. The pool calls it before a
    /// buffer's first host access (`as_slice`, `as_mut_slice`), because the block's previous
    /// owner's work on that stream and its zeroing (queued in stream order) may still be
    /// pending, and the host would race them. Synchronous backends have nothing to wait for.
    fn wait_for_stream(&self, _stream: StreamId) -> Result<(), BackendError> {
        Ok(())
    }

    /// Whether idle blocks may be handed to the OS while cached (Metal purgeable state). When
    /// true, the pool calls [`Backend::make_purgeable`] before a block enters a cache and
    /// [`Backend::reclaim`] when it leaves one.
    fn purgeable_idle_blocks(&self) -> bool {
        false
    }

    /// Marks an idle block's contents as discardable (Metal: `Volatile`).
    fn make_purgeable(&self, _block: &Block) {}

    /// Makes a cached block's memory stable again (Metal: `NonVolatile`). Returns false if the
    /// OS discarded it meanwhile; the pool then releases it and serves the request as a miss.
    fn reclaim(&self, _block: &Block) -> bool {
        true
    }

    /// Fills a block with zeros in stream order (for `zero_on_reuse`).
    fn zero(&self, block: &Block, _stream: StreamId) -> Result<(), BackendError> {
        match block.host_ptr {
            Some(ptr) => {
                // SAFETY: `ptr` points to `block.bytes` bytes owned by the block, which the
                // caller holds exclusively while zeroing.
                unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, block.bytes) };
                Ok(())
            }
            None => Err(BackendError::Driver(format!(
                "{} cannot zero device memory",
                self.name()
            ))),
        }
    }
}

impl PoolError {
    /// Turns a backend failure during an allocation into the user-facing error.
    pub(crate) fn from_backend(
        backend: &str,
        error: BackendError,
        requested_bytes: usize,
        reserved_bytes: u64,
        device_free_bytes: Option<u64>,
    ) -> PoolError {
        match error {
            BackendError::OutOfMemory => PoolError::OutOfMemory {
                requested_bytes: requested_bytes as u64,
                reserved_bytes,
                device_free_bytes,
            },
            BackendError::TooLarge { limit } => PoolError::TooLarge {
                requested_bytes: requested_bytes as u64,
                limit_bytes: limit,
            },
            BackendError::UnsupportedKind(kind) => PoolError::UnsupportedKind {
                kind,
                backend: backend.to_string(),
            },
            BackendError::Driver(message) => PoolError::Backend {
                backend: backend.to_string(),
                message,
            },
        }
    }
}
