//! The `metal` backend: `MTLBuffer`s on Apple GPUs through `objc2-metal`.
//!
//! This is the system the seed described (a Metal buffer pool), behind the same [`Backend`]
//! trait as every other backend: it allocates whole buffers, releases them, reports the
//! device's working set, and marks idle buffers purgeable. Classes, caches, statistics and
//! budgets live above the trait and are tested on every platform; what is here is the FFI and
//! the reasoning that makes it sound.
//!
//! # Memory kinds
//!
//! | [`MemoryKind`] | resource options | host slice |
//! |---|---|---|
//! | `HostVisible` | `StorageModeShared`, default CPU cache | `contents()`, zero-copy on unified memory |
//! | `HostVisibleWriteCombined` | `StorageModeShared` + `CPUCacheModeWriteCombined` | `contents()`; fast to write, very slow to read |
//! | `Device` | `StorageModePrivate` | none |
//! | `Managed` | `StorageModeManaged` (only where the device lacks unified memory: Intel Macs with a discrete GPU) | `contents()`, the CPU copy; after writing it, call `didModifyRange:` on [`MetalBackend::metal_buffer`] |
//!
//! On unified memory `HostVisible` comes first (the default kind); otherwise `Device` does.
//! The kind is the storage and CPU cache mode, and the pool keys its caches by kind, so a
//! request is never served a buffer of another mode (the seed's pool put such buffers back and
//! retried forever).
//!
//! Host-visible buffers are zeroed when they are created: Apple documents that
//! `newBufferWithLength:options:` clears the buffer, and [`Block::new`] needs initialised host
//! memory, so the backend writes the zeros itself rather than rest soundness on a sentence of
//! documentation. It costs one pass over each new buffer, on the miss path only.
//!
//! # Addresses and binding
//!
//! A block's `device_address` is the buffer's `gpuAddress` (Metal 3: macOS 13, iOS 16; the
//! backend refuses older systems and GPUs without the `Metal3` family, so the address is always
//! real). To bind a pooled buffer with `setBuffer:offset:atIndex:`, or to add it to a residency
//! set, look its `MTLBuffer` up with [`MetalBackend::metal_buffer`] and pass
//! [`MetalBuffer::offset`]; the offset is zero unless the buffer had to be padded to align
//! its host pointer to [`BLOCK_ALIGN`].
//!
//! # GPU lifetime
//!
//! Metal has no stream the pool could mark, so [`Backend::stream_ordered`] is `None`
//! and [`StreamId`] is only a label here (use [`StreamId::DEFAULT`]). What keeps a block from a
//! new owner while queued work still uses it is a [`CommandBufferFence`] the user attaches with
//! `PooledBuffer::used_by`; it must be created before the command buffer is committed (it
//! installs a completed handler, which Metal accepts only before `commit`). A buffer dropped
//! without such a fence is reused at once: on Metal every buffer that committed GPU work uses
//! must be tied to that work with `used_by`.
//!
//! Nothing needs waiting for at release: a command buffer created with `commandBuffer` keeps a
//! strong reference to every buffer encoded into it until it completes, so releasing a block
//! that queued work still uses drops only the pool's reference and the memory lives on until
//! the GPU is done. Command buffers made with `commandBufferWithUnretainedReferences` do not,
//! and are unsupported: with them, a pooled buffer must outlive the command buffer (and no
//! trim may release it earlier). Likewise a buffer reached only through its GPU address (from
//! an argument buffer) is not retained by the command buffer; keep its `PooledBuffer` alive
//! until the work completes.
//!
//! # Purgeable idle blocks
//!
//! An idle cached block is marked `Volatile`, so under memory pressure the OS may take its
//! pages instead of pushing the app out; a block leaving the cache is made `NonVolatile`
//! again, and if its previous state was `Empty` (the OS discarded it) the pool releases it and
//! serves the request as a miss. This applies to `Shared` and `Private` buffers; `Managed`
//! buffers are left alone. Each transition is a driver call, made on the hit path, of a cost
//! this project has not measured; [`MetalBackend::with_purgeable_idle_blocks`] turns it off.
//! The pool marks a block volatile as it enters the cache even when its `used_by` fences are
//! still pending (see the core's `give_back`); whether Metal ever discards the pages of a
//! volatile buffer that committed work still reads is not documented by Apple, so if in doubt,
//! turn purgeability off for buffers shared with long-running work.
//!
//! # Why no `MTLHeap` sub-allocation
//!
//! Heaps would make a miss cheaper for small buffers, but the pool already makes misses rare,
//! and heaps cost more than they give here: resources from a heap default to *untracked*
//! hazard tracking (users would have to add fences where device buffers need none),
//! purgeability applies to a whole heap (one live buffer pins every idle one), the heap's
//! memory is committed up front (the budget would count bytes no buffer holds), and placing
//! and freeing ranges inside it is a second allocator with its own fragmentation. The class
//! caches sit above the `Backend` trait, so a heap-backed backend can be added later without
//! changing the API.
//!
//! # Threads and autorelease pools
//!
//! The pool calls the backend from any thread, including threads with no autorelease pool,
//! where Metal's release paths leak (they autorelease). Every call that creates or releases an
//! Objective-C object runs inside [`autoreleasepool`]; the hit-path calls
//! (`setPurgeableState:`) create no objects and skip it.
//!
//! # Verified and not
//!
//! This module is type-checked and clippy-clean for `aarch64-apple-darwin`, and the pool logic
//! it relies on (kind-keyed caches, fence gating, purgeable reclaim) is tested on Linux through
//! a fake Metal-like backend (`tests/all/metal_like.rs`). It has not been run on Apple
//! hardware by this project: the Objective-C calls, the alignment of `contents()`, the cost of
//! purgeable transitions and the behaviour of completed handlers are unobserved.

mod buffer;
mod capabilities;
mod fence;

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use objc2::rc::{autoreleasepool, Retained};
use objc2::runtime::ProtocolObject;
use objc2_foundation::NSRange;
use objc2_metal::{
    MTLBlitCommandEncoder, MTLBuffer, MTLCommandBuffer, MTLCommandBufferStatus, MTLCommandEncoder,
    MTLCommandQueue, MTLCopyAllDevices, MTLCreateSystemDefaultDevice, MTLDevice, MTLGPUFamily,
    MTLPurgeableState, MTLResource, MTLResourceOptions,
};

pub use buffer::MetalBuffer;
pub use fence::CommandBufferFence;
/// The Objective-C runtime crate this backend is built on, so callers use the same version.
pub use objc2;
/// The Metal bindings this backend is built on, so callers use the same version.
pub use objc2_metal;

use super::{
    Backend, BackendError, Block, DeviceAddress, MemoryInfo, MemoryKind, Purgeable, StreamId,
    StreamOrdered, Zeroing,
};
use crate::error::PoolError;
use crate::size_class::BLOCK_ALIGN;

// `MTLCreateSystemDefaultDevice` returns no device unless CoreGraphics is linked (objc2-metal's
// documentation).
#[link(name = "CoreGraphics", kind = "framework")]
extern "C" {}

/// The kinds on unified memory (Apple silicon, Intel integrated GPUs): `Shared` first.
const UNIFIED_KINDS: [MemoryKind; 3] = [
    MemoryKind::HostVisible,
    MemoryKind::Device,
    MemoryKind::HostVisibleWriteCombined,
];

/// The kinds on a discrete GPU (Intel Macs): `Private` first, and `Managed`.
const DISCRETE_KINDS: [MemoryKind; 4] = [
    MemoryKind::Device,
    MemoryKind::HostVisible,
    MemoryKind::HostVisibleWriteCombined,
    MemoryKind::Managed,
];

/// Lock shards of the table of live buffers.
const LIVE_SHARDS: usize = 16;

/// The storage and CPU cache mode of each kind.
fn resource_options(kind: MemoryKind) -> MTLResourceOptions {
    match kind {
        MemoryKind::HostVisible => {
            MTLResourceOptions::StorageModeShared | MTLResourceOptions::CPUCacheModeDefaultCache
        }
        MemoryKind::HostVisibleWriteCombined => {
            MTLResourceOptions::StorageModeShared | MTLResourceOptions::CPUCacheModeWriteCombined
        }
        MemoryKind::Device => MTLResourceOptions::StorageModePrivate,
        MemoryKind::Managed => MTLResourceOptions::StorageModeManaged,
    }
}

/// Whether Metal lets buffers of this kind be purgeable (`Shared` and `Private`).
fn purgeable_kind(kind: MemoryKind) -> bool {
    !matches!(kind, MemoryKind::Managed)
}

fn backend_error(message: impl Into<String>) -> PoolError {
    PoolError::Backend {
        backend: "metal".to_string(),
        message: message.into(),
    }
}

/// The token stored in a [`Block`]: the pointer of a retained `MTLBuffer`.
fn token_of(raw: *mut ProtocolObject<dyn MTLBuffer>) -> u64 {
    raw as usize as u64
}

/// A Metal device whose buffers the pool caches. See the module documentation.
///
/// Cloning is cheap and shares the device and its table of live buffers: keep a clone after
/// handing one to [`crate::MemoryManager::new`] to look buffers up with
/// [`MetalBackend::metal_buffer`].
#[derive(Clone)]
pub struct MetalBackend {
    shared: Arc<Shared>,
    purgeable: bool,
}

/// What clones of one backend share.
struct Shared {
    device: Retained<ProtocolObject<dyn MTLDevice>>,
    device_name: String,
    unified_memory: bool,
    max_buffer_bytes: usize,
    /// Every live buffer by block device address: lookups for binding, and the check that a
    /// block handed to this backend is one it allocated.
    live: Box<[Mutex<HashMap<u64, MetalBuffer>>]>,
    /// A queue for zeroing `Private` blocks, made on first use.
    blit_queue: OnceLock<Option<Retained<ProtocolObject<dyn MTLCommandQueue>>>>,
}

impl std::fmt::Debug for MetalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetalBackend")
            .field("device", &self.shared.device_name)
            .field("unified_memory", &self.shared.unified_memory)
            .field("purgeable_idle_blocks", &self.purgeable)
            .finish()
    }
}

impl MetalBackend {
    /// The system's default Metal device (`MTLCreateSystemDefaultDevice`), or the first of
    /// `MTLCopyAllDevices` when there is no default (e.g. a headless Mac).
    ///
    /// Errors when there is no Metal device, or it cannot give buffers GPU addresses (before
    /// macOS 13 / iOS 16, or a GPU outside the `Metal3` family).
    pub fn new() -> Result<MetalBackend, PoolError> {
        let device = autoreleasepool(|_| {
            MTLCreateSystemDefaultDevice().or_else(|| MTLCopyAllDevices().firstObject())
        })
        .ok_or_else(|| backend_error("no Metal device found"))?;
        MetalBackend::with_device(device)
    }

    /// A backend for a device the caller chose (e.g. one of `MTLCopyAllDevices`), with the
    /// same requirements as [`MetalBackend::new`].
    pub fn with_device(
        device: Retained<ProtocolObject<dyn MTLDevice>>,
    ) -> Result<MetalBackend, PoolError> {
        if !objc2::available!(macos = 13.0, ios = 16.0, tvos = 16.0, visionos = 1.0) {
            return Err(backend_error(
                "the Metal backend needs MTLBuffer.gpuAddress (macOS 13, iOS 16, tvOS 16)",
            ));
        }
        autoreleasepool(|_| {
            let device_name = device.name().to_string();
            if !device.supportsFamily(MTLGPUFamily::Metal3) {
                return Err(backend_error(format!(
                    "{device_name} is not in the Metal3 GPU family, so its buffers have no GPU address"
                )));
            }
            let unified_memory = device.hasUnifiedMemory();
            let max_buffer_bytes = device.maxBufferLength();
            Ok(MetalBackend {
                shared: Arc::new(Shared {
                    device_name,
                    unified_memory,
                    max_buffer_bytes,
                    live: (0..LIVE_SHARDS).map(|_| Mutex::default()).collect(),
                    blit_queue: OnceLock::new(),
                    device,
                }),
                purgeable: true,
            })
        })
    }

    /// Whether idle cached blocks are marked purgeable (on by default). Set it before handing
    /// the backend to a manager, which reads it once.
    #[must_use]
    pub fn with_purgeable_idle_blocks(mut self, enabled: bool) -> MetalBackend {
        self.purgeable = enabled;
        self
    }

    /// The Metal device, to create command queues and pipelines on.
    pub fn device(&self) -> &ProtocolObject<dyn MTLDevice> {
        &self.shared.device
    }

    /// Whether the device shares memory with the CPU (Apple silicon).
    pub fn has_unified_memory(&self) -> bool {
        self.shared.unified_memory
    }

    /// The `MTLBuffer` holding `buffer`'s block, with the block's offset inside it; `None` if
    /// this backend did not allocate it (ask the backend of the buffer's device).
    ///
    /// The returned handle keeps the Metal object alive, not the block: once the
    /// `PooledBuffer` is dropped, the memory may go to a new owner.
    pub fn metal_buffer(&self, buffer: &impl DeviceAddress) -> Option<MetalBuffer> {
        self.metal_buffer_at(buffer.device_address())
    }

    /// [`MetalBackend::metal_buffer`] by the block's device address: the buffer registered at
    /// that address, or, for a block the pool carved out of a larger buffer (a large-arena
    /// segment), the live buffer whose range holds the address, with the offset moved to the
    /// block's start. The second case scans the live buffers: call it on slow paths (binding),
    /// not per element.
    pub fn metal_buffer_at(&self, device_address: u64) -> Option<MetalBuffer> {
        let exact = self
            .shared
            .live_shard(device_address)
            .get(&device_address)
            .cloned();
        exact.or_else(|| self.shared.containing(device_address))
    }

    /// Runs `f` on the block's buffer if this backend allocated the block (its device address
    /// is registered with its token's pointer); `None` otherwise.
    fn with_registered<R>(
        &self,
        block: &Block,
        f: impl FnOnce(&ProtocolObject<dyn MTLBuffer>, usize) -> R,
    ) -> Option<R> {
        let live = self.shared.live_shard(block.device_address());
        let entry = live.get(&block.device_address())?;
        (token_of(entry.as_ptr()) == block.token()).then(|| f(entry.buffer(), entry.offset()))
    }
}

impl Shared {
    /// The live buffer whose bytes hold `device_address` (inside, not at its start), with the
    /// offset of that address in it.
    fn containing(&self, device_address: u64) -> Option<MetalBuffer> {
        self.live.iter().find_map(|shard| {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.iter().find_map(|(&start, entry)| {
                // The block registered at `start` runs to the end of the buffer.
                let usable = entry.buffer().length().saturating_sub(entry.offset()) as u64;
                let inside = device_address > start && device_address - start < usable;
                inside.then(|| {
                    let offset = entry.offset() + (device_address - start) as usize;
                    MetalBuffer::new(entry.retained(), offset)
                })
            })
        })
    }

    fn live_shard(&self, device_address: u64) -> MutexGuard<'_, HashMap<u64, MetalBuffer>> {
        let hash = (device_address >> 8) ^ (device_address >> 16) ^ (device_address >> 24);
        self.live[hash as usize % LIVE_SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `newBufferWithLength:options:`; no buffer means the device is out of memory (lengths
    /// above `maxBufferLength` are refused before this).
    fn new_buffer(
        &self,
        bytes: usize,
        options: MTLResourceOptions,
    ) -> Result<Retained<ProtocolObject<dyn MTLBuffer>>, BackendError> {
        self.device
            .newBufferWithLength_options(bytes, options)
            .ok_or(BackendError::OutOfMemory)
    }

    /// Creates, zeroes and registers one buffer. Runs inside an autorelease pool.
    fn new_block(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        let options = resource_options(kind);
        let too_large = BackendError::TooLarge {
            limit: self.max_buffer_bytes as u64,
        };
        let mut buffer = self.new_buffer(bytes, options)?;
        let mut host = None;
        let mut offset = 0;
        if kind.is_host_visible() {
            // Only host-visible buffers have `contents`; `Private` ones return null.
            let mut contents = buffer.contents().cast::<u8>();
            let misalignment = contents.as_ptr() as usize % BLOCK_ALIGN;
            if misalignment != 0 {
                // Blocks promise BLOCK_ALIGN-aligned host memory. Apple does not document the
                // alignment of `contents`, so pad rather than hand out a misaligned block.
                let padded = bytes
                    .checked_add(BLOCK_ALIGN)
                    .filter(|&padded| padded <= self.max_buffer_bytes)
                    .ok_or(too_large)?;
                buffer = self.new_buffer(padded, options)?;
                contents = buffer.contents().cast::<u8>();
                let address = contents.as_ptr() as usize;
                offset = (BLOCK_ALIGN - address % BLOCK_ALIGN) % BLOCK_ALIGN;
            }
            // SAFETY: `contents` is the CPU mapping of a buffer at least `offset + bytes` long
            // (`bytes`, or `bytes + BLOCK_ALIGN` with `offset < BLOCK_ALIGN`), so the offset
            // stays inside it and the result is not null.
            let start = unsafe { NonNull::new_unchecked(contents.as_ptr().add(offset)) };
            // SAFETY: `start .. start + bytes` lies inside the buffer's CPU mapping (as above),
            // which lives as long as `buffer`; the buffer is new, so nothing else reads or
            // writes it.
            unsafe { std::ptr::write_bytes(start.as_ptr(), 0, bytes) };
            if kind == MemoryKind::Managed {
                // The CPU copy changed; tell Metal so the GPU copy is refreshed.
                buffer.didModifyRange(NSRange::new(offset, bytes));
            }
            host = Some(start);
        }
        let device_address = buffer.gpuAddress() + offset as u64;
        let registered = MetalBuffer::new(buffer.clone(), offset);
        let token = token_of(Retained::into_raw(buffer));
        if let Some(stale) = self
            .live_shard(device_address)
            .insert(device_address, registered)
        {
            // Live buffers have disjoint GPU ranges, so this is a Metal or backend bug; keep
            // the new entry and say so rather than abort.
            tracing::error!(
                device_address,
                stale_token = token_of(stale.as_ptr()),
                "two live Metal buffers report the same GPU address"
            );
        }
        // SAFETY: the block owns the `bytes` bytes at `offset` in a new buffer of the kind's
        // storage mode, which nothing else uses: the table's clone only keeps the object alive
        // for lookups. The token carries the +1 reference from `into_raw`, given up only in
        // `release`, so the memory outlives the block. `host`, where given, points at
        // `bytes` zeroed (initialised) bytes of the buffer's CPU mapping, aligned to
        // BLOCK_ALIGN (checked or padded above).
        Ok(unsafe { Block::new(device_address, host, bytes, kind, token) })
    }

    /// Fills a `Private` buffer with zeros on the GPU and waits for it.
    fn blit_zero(
        &self,
        buffer: &ProtocolObject<dyn MTLBuffer>,
        offset: usize,
        bytes: usize,
    ) -> Result<(), BackendError> {
        autoreleasepool(|_| {
            let queue = self
                .blit_queue
                .get_or_init(|| self.device.newCommandQueue())
                .as_ref()
                .ok_or_else(|| BackendError::Driver("could not create a command queue".into()))?;
            let commands = queue
                .commandBuffer()
                .ok_or_else(|| BackendError::Driver("could not create a command buffer".into()))?;
            let encoder = commands
                .blitCommandEncoder()
                .ok_or_else(|| BackendError::Driver("could not create a blit encoder".into()))?;
            encoder.fillBuffer_range_value(buffer, NSRange::new(offset, bytes), 0);
            encoder.endEncoding();
            commands.commit();
            commands.waitUntilCompleted();
            if commands.status() == MTLCommandBufferStatus::Completed {
                Ok(())
            } else {
                let reason = commands
                    .error()
                    .map(|error| error.localizedDescription().to_string())
                    .unwrap_or_else(|| "unknown error".to_string());
                Err(BackendError::Driver(format!("zero fill failed: {reason}")))
            }
        })
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The table's references and the queue are released here, on whatever thread drops
        // the last clone: inside a pool so Metal's autoreleased objects do not leak.
        autoreleasepool(|_| {
            for shard in self.live.iter_mut() {
                shard
                    .get_mut()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clear();
            }
            self.blit_queue.take();
        });
    }
}
