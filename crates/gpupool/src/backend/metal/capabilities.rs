//! What the pool asks of the Metal backend: the `Backend` trait, and the `Zeroing` and
//! `Purgeable` capabilities (the device's state and the FFI helpers are in the parent module).

use super::*;

impl Backend for MetalBackend {
    fn name(&self) -> &str {
        "metal"
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn device_name(&self) -> String {
        self.shared.device_name.clone()
    }

    fn kinds(&self) -> &[MemoryKind] {
        if self.shared.unified_memory {
            &UNIFIED_KINDS
        } else {
            &DISCRETE_KINDS
        }
    }

    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        if !self.kinds().contains(&kind) {
            return Err(BackendError::UnsupportedKind(kind));
        }
        if bytes == 0 {
            return Err(BackendError::Driver(
                "Metal buffers cannot be empty".to_string(),
            ));
        }
        if bytes > self.shared.max_buffer_bytes {
            return Err(BackendError::TooLarge {
                limit: self.shared.max_buffer_bytes as u64,
            });
        }
        autoreleasepool(|_| self.shared.new_block(bytes, kind))
    }

    fn release(&self, block: Block) {
        autoreleasepool(|_| {
            let registered = self
                .shared
                .live_shard(block.device_address())
                .remove(&block.device_address());
            let Some(registered) = registered else {
                tracing::error!(
                    device_address = block.device_address(),
                    "release of a block this Metal backend did not allocate; leaking it"
                );
                return;
            };
            if token_of(registered.as_ptr()) != block.token() {
                tracing::error!(
                    device_address = block.device_address(),
                    "release of a block whose token does not match its buffer; leaking it"
                );
                // Put the real owner's entry back; the foreign block is forgotten.
                self.shared
                    .live_shard(block.device_address())
                    .insert(block.device_address(), registered);
                return;
            }
            let raw = block.token() as usize as *mut ProtocolObject<dyn MTLBuffer>;
            // SAFETY: the token is the pointer `Retained::into_raw` gave in `new_block` for
            // this block (checked against the table just now), carrying one +1 reference.
            // `release` takes the block by value and blocks are never copied, so this is the
            // only time that reference is reclaimed.
            let owned = unsafe { Retained::from_raw(raw) };
            drop(owned);
            drop(registered);
        });
    }

    fn memory_info(&self) -> Option<MemoryInfo> {
        let total_bytes = self.shared.device.recommendedMaxWorkingSetSize();
        if total_bytes == 0 {
            return None;
        }
        let allocated = self.shared.device.currentAllocatedSize() as u64;
        Some(MemoryInfo {
            free_bytes: total_bytes.saturating_sub(allocated),
            total_bytes,
        })
    }

    /// `None`: Metal has no stream the pool could put a marker on (command buffers belong to
    /// the caller's queues, and their completion order is not the pool's to assume), so
    /// [`StreamId`]s are labels only. GPU lifetime comes from [`CommandBufferFence`]s attached
    /// with `PooledBuffer::used_by`. Nor is there anything to wait for at release: a command
    /// buffer created with `commandBuffer` holds a strong reference to every buffer encoded
    /// into it until it completes, so releasing a block that queued work still uses only drops
    /// the pool's reference, and Metal frees the memory after the GPU is done. Command buffers
    /// with unretained references are unsupported (see the module documentation).
    fn stream_ordered(&self) -> Option<&dyn StreamOrdered> {
        None
    }

    fn zeroing(&self) -> Option<&dyn Zeroing> {
        Some(self)
    }

    fn purgeable(&self) -> Option<&dyn Purgeable> {
        self.purgeable.then_some(self as &dyn Purgeable)
    }
}

impl Purgeable for MetalBackend {
    fn make_purgeable(&self, block: &Block) {
        if purgeable_kind(block.kind()) {
            let marked = self.with_registered(block, |buffer, _| {
                buffer.setPurgeableState(MTLPurgeableState::Volatile);
            });
            if marked.is_none() {
                tracing::error!(
                    device_address = block.device_address(),
                    "make_purgeable on a block this Metal backend did not allocate"
                );
            }
        }
    }

    fn reclaim(&self, block: &Block) -> bool {
        if !purgeable_kind(block.kind()) {
            return true;
        }
        self.with_registered(block, |buffer, _| {
            buffer.setPurgeableState(MTLPurgeableState::NonVolatile)
        })
        // A foreign block is never handed out.
        .is_some_and(|previous| previous != MTLPurgeableState::Empty)
    }
}

impl Zeroing for MetalBackend {
    fn zero(&self, block: &Block, _stream: StreamId) -> Result<(), BackendError> {
        let entry = self
            .with_registered(block, |buffer, offset| {
                (MetalBuffer::retain(buffer), offset)
            })
            .ok_or_else(|| {
                BackendError::Driver("zero of a block this backend did not allocate".into())
            })?;
        let (buffer, offset) = entry;
        let bytes = block.bytes();
        match block.host_ptr() {
            None => self.shared.blit_zero(buffer.buffer(), offset, bytes),
            Some(host) => {
                // SAFETY: the block is this backend's (checked above), so `host` points at
                // `bytes` bytes of the buffer's CPU mapping, kept alive by the block; the
                // caller holds the block exclusively while zeroing, and no GPU work uses it
                // (the pool hands out only blocks whose fences completed).
                unsafe { std::ptr::write_bytes(host.as_ptr(), 0, bytes) };
                if block.kind() == MemoryKind::Managed {
                    buffer.buffer().didModifyRange(NSRange::new(offset, bytes));
                }
                Ok(())
            }
        }
    }
}
