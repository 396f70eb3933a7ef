//! [`MetalBuffer`]: a retained `MTLBuffer` that may cross threads.
//!
//! objc2 declares `MTLBuffer` neither `Send` nor `Sync`, so `Retained<ProtocolObject<dyn
//! MTLBuffer>>` cannot sit in a `Send + Sync` backend or be handed to another thread. This
//! newtype is the one audited place that asserts otherwise; the reasons are on the `unsafe
//! impl`s below.

use std::fmt;
use std::mem::ManuallyDrop;

use objc2::rc::{autoreleasepool, Retained};
use objc2::runtime::ProtocolObject;
use objc2::Message;
use objc2_metal::MTLBuffer;

/// A strong reference to the `MTLBuffer` that holds a pooled block, and the block's byte
/// offset inside it (pass it to `setBuffer:offset:atIndex:`).
///
/// It keeps the Metal object alive, not the block's ownership: the memory belongs to the
/// `PooledBuffer` it was looked up for, and to the next owner after that one is dropped.
pub struct MetalBuffer {
    /// Dropped inside an autorelease pool, see `Drop`.
    buffer: ManuallyDrop<Retained<ProtocolObject<dyn MTLBuffer>>>,
    offset: usize,
}

// SAFETY: objc2 leaves `MTLBuffer` `!Send + !Sync` because its `contents()` memory is not
// synchronised, not because the object is tied to a thread: Metal resources are created on one
// thread and encoded, labelled and released on others as a matter of course (Apple's threading
// guidance restricts command buffers and encoders, not resources), and retain/release are
// atomic in the Objective-C runtime. What this handle exposes across threads is the object
// (`buffer()`), whose safe methods read immutable properties or make synchronised driver calls,
// and the offset. The unsynchronised part, `contents()`, is a raw pointer that is `unsafe` to
// dereference; access to that memory is governed by the pool's ownership of the block.
unsafe impl Send for MetalBuffer {}
// SAFETY: as for `Send`: shared access only reaches `&ProtocolObject<dyn MTLBuffer>`, whose
// methods are callable from several threads at once for the same reasons.
unsafe impl Sync for MetalBuffer {}

impl MetalBuffer {
    /// Wraps a buffer and the block's offset in it.
    pub(super) fn new(buffer: Retained<ProtocolObject<dyn MTLBuffer>>, offset: usize) -> Self {
        MetalBuffer {
            buffer: ManuallyDrop::new(buffer),
            offset,
        }
    }

    /// Takes a new strong reference to `buffer` (offset zero).
    pub(super) fn retain(buffer: &ProtocolObject<dyn MTLBuffer>) -> Self {
        MetalBuffer::new(buffer.retain(), 0)
    }

    /// The `MTLBuffer`.
    pub fn buffer(&self) -> &ProtocolObject<dyn MTLBuffer> {
        &self.buffer
    }

    /// Another strong reference to the `MTLBuffer`, for APIs that take ownership.
    pub fn retained(&self) -> Retained<ProtocolObject<dyn MTLBuffer>> {
        Retained::clone(&self.buffer)
    }

    /// Where the block starts inside the buffer, in bytes.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// The object pointer, to compare with a block's token.
    pub(super) fn as_ptr(&self) -> *mut ProtocolObject<dyn MTLBuffer> {
        Retained::as_ptr(&self.buffer).cast_mut()
    }
}

impl Clone for MetalBuffer {
    fn clone(&self) -> Self {
        MetalBuffer::new(self.retained(), self.offset)
    }
}

impl fmt::Debug for MetalBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetalBuffer")
            .field("object", &self.as_ptr())
            .field("offset", &self.offset)
            .finish()
    }
}

impl Drop for MetalBuffer {
    fn drop(&mut self) {
        // The last release may run Metal's deallocation, which autoreleases; the dropping
        // thread may have no pool of its own.
        autoreleasepool(|_| {
            // SAFETY: `buffer` is dropped exactly once, here, and not used afterwards.
            unsafe { ManuallyDrop::drop(&mut self.buffer) }
        });
    }
}
