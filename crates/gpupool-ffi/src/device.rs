//! One device's pool as C uses it: allocate by size, free by address, record streams.
//!
//! A [`DevicePool`] is a `MemoryManager` serving one backend instance (so inside it the device
//! is always index 0), the pointer map of the buffers it handed to C, and the backend handle
//! that registers foreign streams.

use gpupool::{AllocOptions, MemoryManager, PoolError, PoolStats, TrimLevel};

use crate::backend_choice::DeviceBackend;
use crate::counters::Counters;
use crate::errors::FfiError;
use crate::pointers::{Entry, PointerMap, Removal};
use crate::streams::stream_id;
use crate::trace;

/// One device's pool, its live allocations and its backend.
pub struct DevicePool {
    index: usize,
    backend: DeviceBackend,
    manager: MemoryManager,
    pointers: PointerMap,
}

/// Whether the pool refused a request for lack of memory (rather than for a bad argument or a
/// driver error).
pub fn is_out_of_memory(error: &FfiError) -> bool {
    matches!(
        error,
        FfiError::Pool(
            PoolError::OutOfMemory { .. }
                | PoolError::BudgetExceeded { .. }
                | PoolError::TooLarge { .. }
        )
    )
}

impl DevicePool {
    /// A pool for device `index` over `backend`.
    pub fn new(index: usize, backend: DeviceBackend, manager: MemoryManager) -> DevicePool {
        DevicePool {
            index,
            backend,
            manager,
            pointers: PointerMap::default(),
        }
    }

    /// Allocates `bytes` (non-zero) ordered on the stream `stream_handle`; returns the address.
    ///
    /// # Safety
    /// As [`stream_id`]: on CUDA a non-null `stream_handle` is a live stream of this device's
    /// primary context that outlives the pool's use of it.
    pub unsafe fn allocate(
        &self,
        bytes: usize,
        stream_handle: u64,
        counters: &Counters,
    ) -> Result<u64, FfiError> {
        // SAFETY: the caller's promise, passed on.
        let stream = unsafe { stream_id(&self.backend, self.index, stream_handle) };
        let options = AllocOptions {
            stream,
            ..AllocOptions::default()
        };
        let buffer = self.manager.allocate_with::<u8>(bytes, options)?;
        let address = buffer.device_address();
        let block_bytes = buffer.block_bytes();
        let trace = trace::allocated(bytes, stream_handle);
        if let Err(entry) = self.pointers.insert(address, Entry { buffer, trace }) {
            // The pool handed out a block that is still live: giving this one back would return
            // the block twice. Leak its record instead, and say so.
            std::mem::forget(entry);
            return Err(FfiError::Internal(format!(
                "device {}: the pool handed out {address:#x} while it was still live",
                self.index
            )));
        }
        counters.allocated(block_bytes, bytes);
        Ok(address)
    }

    /// Frees the allocation at `address`; `bytes` is what C says it asked for.
    pub fn free(&self, address: u64, bytes: i64, counters: &Counters) -> Result<(), FfiError> {
        let entry = match self.pointers.remove(address) {
            Removal::Live(entry) => entry,
            Removal::DoubleFree => {
                counters.double_free();
                return Err(FfiError::UnknownPointer(format!(
                    "double free of {address:#x} on device {}: it was freed already and not \
                     allocated since (ignored)",
                    self.index
                )));
            }
            Removal::Unknown => {
                counters.unknown_free();
                return Err(unknown_pointer(address, self.index, "free"));
            }
        };
        let requested = entry.buffer.requested_bytes();
        let block_bytes = entry.buffer.block_bytes();
        if u64::try_from(bytes).ok() != Some(requested as u64) {
            counters.size_mismatched_free();
            tracing::warn!(
                address = format_args!("{address:#x}"),
                device = self.index,
                freed_with = bytes,
                allocated = requested,
                "gpupool_free: size differs from the allocation's; freed anyway"
            );
        }
        if let Some(tag) = entry.trace {
            trace::freed(tag, requested, entry.buffer.stream().0);
        }
        counters.freed(block_bytes, requested);
        drop(entry);
        Ok(())
    }

    /// Declares that work on `stream_handle` uses the allocation at `address` (PyTorch's
    /// `record_stream`). Returns false if no live allocation of this device starts there.
    ///
    /// # Safety
    /// As [`DevicePool::allocate`], for `stream_handle`.
    pub unsafe fn record_stream(&self, address: u64, stream_handle: u64) -> bool {
        let held = self.pointers.with_entry(address, |_| ()).is_some();
        if !held {
            return false;
        }
        // SAFETY: the caller's promise, passed on.
        let stream = unsafe { stream_id(&self.backend, self.index, stream_handle) };
        self.pointers
            .with_entry(address, |entry| entry.buffer.record_stream(stream))
            .is_some()
    }

    /// Releases every idle block.
    pub fn empty_cache(&self) {
        self.manager.trim(TrimLevel::Aggressive);
    }

    /// The pool's statistics.
    pub fn stats(&self) -> PoolStats {
        self.manager.stats()
    }

    /// Allocations handed to C and not freed yet.
    pub fn live_pointers(&self) -> u64 {
        self.pointers.len() as u64
    }
}

/// The error of a pointer no pool holds.
pub fn unknown_pointer(address: u64, device: usize, action: &str) -> FfiError {
    FfiError::UnknownPointer(format!(
        "{action} of unknown pointer {address:#x} on device {device}: gpupool did not allocate \
         it (or it was freed long ago); ignored"
    ))
}
