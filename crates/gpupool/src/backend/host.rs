//! The `host` backend: aligned, zeroed host memory from the global allocator.
//!
//! It is the default when no GPU driver is found and the fake device the pool is tested
//! against. Blocks are aligned to [`BLOCK_ALIGN`] and zeroed at allocation, so every block is
//! initialised memory from the start.
//!
//! Blocks of [`MAPPED_FROM_BYTES`] and more come straight from the OS as anonymous mappings
//! (on Unix): the kernel hands out zeroed pages on first touch, so a 16 GiB block costs a
//! system call instead of writing 16 GiB of zeros up front (68 s, issue 9), and its memory is
//! committed only as it is used. The global allocator cannot do this for us: with an
//! alignment above its minimum, `alloc_zeroed` allocates and then writes the zeros itself.
//! Smaller blocks use the global allocator, which is faster for them. Whether a block was
//! mapped follows from its size alone, so `release` needs no extra record.

use std::alloc::Layout;
use std::ptr::NonNull;

use super::{Backend, BackendError, Block, MemoryInfo, MemoryKind};
use crate::size_class::BLOCK_ALIGN;

/// Blocks of at least this many bytes are mapped from the OS (on Unix); see the module docs.
pub const MAPPED_FROM_BYTES: usize = 1 << 20;

/// Whether a block of `bytes` is an anonymous mapping.
fn is_mapped(bytes: usize) -> bool {
    cfg!(unix) && bytes >= MAPPED_FROM_BYTES
}

/// Maps `bytes` of zeroed, page-aligned memory from the OS.
#[cfg(unix)]
fn map_zeroed(bytes: usize) -> Result<NonNull<u8>, BackendError> {
    // SAFETY: an anonymous private mapping at an address of the kernel's choice touches no
    // existing memory; the arguments are the documented ones for that.
    let address = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANON,
            -1,
            0,
        )
    };
    if address == libc::MAP_FAILED {
        return Err(BackendError::OutOfMemory);
    }
    NonNull::new(address.cast::<u8>()).ok_or(BackendError::OutOfMemory)
}

#[cfg(not(unix))]
fn map_zeroed(_bytes: usize) -> Result<NonNull<u8>, BackendError> {
    unreachable!("blocks are mapped only on Unix")
}

/// Unmaps a block made by `map_zeroed`.
#[cfg(unix)]
fn unmap(ptr: NonNull<u8>, bytes: usize) {
    // SAFETY: `ptr` and `bytes` describe exactly one mapping made by `map_zeroed`, released
    // once (the pool releases each block once), that nothing refers to any more.
    if unsafe { libc::munmap(ptr.as_ptr().cast(), bytes) } != 0 {
        tracing::warn!(bytes, "munmap of a host block failed");
    }
}

#[cfg(not(unix))]
fn unmap(_ptr: NonNull<u8>, _bytes: usize) {
    unreachable!("blocks are mapped only on Unix")
}

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

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
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
        let ptr = if is_mapped(bytes) {
            map_zeroed(bytes)?
        } else {
            // SAFETY: `layout` has a non-zero size.
            let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
            NonNull::new(ptr).ok_or(BackendError::OutOfMemory)?
        };
        let address = ptr.as_ptr() as u64;
        // SAFETY: `ptr` is a fresh, zeroed (so initialised), `BLOCK_ALIGN`-aligned allocation of
        // `bytes` bytes that only this block refers to (a mapping is page-aligned, and pages
        // above `BLOCK_ALIGN` in size are what every Unix has).
        Ok(unsafe { Block::new(address, Some(ptr), bytes, kind, self.tag) })
    }

    fn release(&self, block: Block) {
        let Some(ptr) = block.host_ptr().filter(|_| block.token() == self.tag) else {
            tracing::error!(?block, "host backend refused a block it did not allocate");
            return;
        };
        if is_mapped(block.bytes()) {
            unmap(ptr, block.bytes());
            return;
        }
        let Ok(layout) = Layout::from_size_align(block.bytes().max(1), BLOCK_ALIGN) else {
            tracing::error!(?block, "host backend: a block with an impossible layout");
            return;
        };
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

    /// Resident memory of this process, from `/proc/self/statm` (Linux).
    fn resident_bytes() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/self/statm").ok()?;
        let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
        Some(pages * 4096)
    }

    /// Issue 9: a 16 GiB request took 68 s because the whole block was zeroed up front. Mapped
    /// blocks come zeroed from the OS and take memory only where touched.
    #[test]
    #[cfg_attr(
        miri,
        ignore = "about the OS's lazy zeroing: reads resident memory from /proc, which Miri isolates"
    )]
    fn a_huge_host_block_is_not_zeroed_up_front() {
        if !cfg!(target_os = "linux") {
            println!("skipped: resident memory is read from /proc");
            return;
        }
        let backend = HostBackend::new();
        let bytes = 4usize << 30;
        let before = resident_bytes().unwrap();
        let block = backend.allocate(bytes, MemoryKind::HostVisible).unwrap();
        let ptr = block.host_ptr().unwrap();
        assert_eq!(ptr.as_ptr() as usize % BLOCK_ALIGN, 0);
        // SAFETY: the block owns `bytes` initialised bytes; read the first and the last.
        let (first, last) = unsafe { (*ptr.as_ptr(), *ptr.as_ptr().add(bytes - 1)) };
        assert_eq!((first, last), (0, 0));
        let grown = resident_bytes().unwrap().saturating_sub(before);
        assert!(
            grown < 1 << 30,
            "allocating 4 GiB made {grown} bytes resident: it was written up front"
        );
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
