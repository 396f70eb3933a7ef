//! The `host` backend: aligned, zeroed host memory from the global allocator.
//!
//! It is the default when no GPU driver is found and the fake device the pool is tested
//! against. Blocks are aligned to [`BLOCK_ALIGN`] and zeroed at allocation, so every block is
//! initialised memory from the start.

use std::alloc::Layout;
use std::ptr::NonNull;

use super::{Backend, BackendError, Block, MemoryInfo, MemoryKind};
use crate::size_class::BLOCK_ALIGN;

/// Aligned host memory; its only kind is [`MemoryKind::HostVisible`].
#[derive(Debug, Clone)]
pub struct HostBackend {
    /// Tags this backend's block tokens, so a foreign block is refused instead of freed.
    tag: u64,
}

impl Default for HostBackend {
    fn default() -> Self {
        HostBackend::new()
    }
}

impl HostBackend {
    /// A host backend.
    pub fn new() -> HostBackend {
        // Any fixed odd pattern would do; host memory has one owner, the global allocator,
        // so every HostBackend shares the tag and may release each other's blocks.
        HostBackend {
            tag: 0x686f_7374_b10c,
        }
    }
}

const KINDS: [MemoryKind; 1] = [MemoryKind::HostVisible];

impl Backend for HostBackend {
    fn name(&self) -> &str {
        "host"
    }

    fn device_name(&self) -> String {
        format!("host memory ({})", std::env::consts::ARCH)
    }

    fn kinds(&self) -> &[MemoryKind] {
        &KINDS
    }

    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        if kind != MemoryKind::HostVisible {
            return Err(BackendError::UnsupportedKind(kind));
        }
        let layout = Layout::from_size_align(bytes.max(1), BLOCK_ALIGN).map_err(|_| {
            BackendError::TooLarge {
                limit: (isize::MAX as usize - BLOCK_ALIGN + 1) as u64,
            }
        })?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or(BackendError::OutOfMemory)?;
        let address = ptr.as_ptr() as u64;
        // SAFETY: `ptr` is a fresh, zeroed (so initialised), `BLOCK_ALIGN`-aligned allocation of
        // `bytes` bytes that only this block refers to.
        Ok(unsafe { Block::new(address, Some(ptr), bytes, kind, self.tag) })
    }

    fn release(&self, block: Block) {
        let Some(ptr) = block.host_ptr().filter(|_| block.token() == self.tag) else {
            tracing::error!(?block, "host backend refused a block it did not allocate");
            return;
        };
        let layout = Layout::from_size_align(block.bytes().max(1), BLOCK_ALIGN)
            .expect("the layout was valid at allocation");
        // SAFETY: the block was allocated by `allocate` above with this very layout, and the
        // pool releases each block once, when nothing refers to it.
        unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
    }

    fn memory_info(&self) -> Option<MemoryInfo> {
        system_memory()
    }
}

/// Total and available physical memory from `/proc/meminfo` (Linux); `None` elsewhere.
fn system_memory() -> Option<MemoryInfo> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|line| line.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some(MemoryInfo {
        total_bytes: field("MemTotal:")?,
        free_bytes: field("MemAvailable:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_zeroed_and_released() {
        let backend = HostBackend::new();
        let block = backend.allocate(4096, MemoryKind::HostVisible).unwrap();
        let ptr = block.host_ptr().unwrap();
        assert_eq!(ptr.as_ptr() as usize % BLOCK_ALIGN, 0);
        // SAFETY: the block owns 4096 initialised bytes.
        let bytes = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), 4096) };
        assert!(bytes.iter().all(|&byte| byte == 0));
        backend.release(block);
    }

    #[test]
    fn device_memory_and_impossible_sizes_are_refused() {
        let backend = HostBackend::new();
        assert_eq!(
            backend.allocate(256, MemoryKind::Device).unwrap_err(),
            BackendError::UnsupportedKind(MemoryKind::Device)
        );
        assert!(matches!(
            backend.allocate(usize::MAX - 10, MemoryKind::HostVisible),
            Err(BackendError::TooLarge { .. })
        ));
    }
}
