//! What the C boundary counts per device, beside the pool's own statistics.
//!
//! The pool counts requests, blocks and bytes; the boundary adds what only it sees (frees of
//! unknown pointers, double frees, zero-size requests) and the peaks and running totals that
//! PyTorch's `memory_stats` reports and the pool does not keep (peak allocated bytes, bytes
//! allocated and freed over time). Live figures are atomics updated on every allocation and
//! free; a peak is raised with `fetch_max` only when the new figure passes it.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// A live figure and its peak.
struct Gauge {
    current: AtomicU64,
    peak: AtomicU64,
}

impl Gauge {
    const fn new() -> Gauge {
        Gauge {
            current: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    fn add(&self, amount: u64) {
        let now = self.current.fetch_add(amount, Relaxed) + amount;
        if now > self.peak.load(Relaxed) {
            self.peak.fetch_max(now, Relaxed);
        }
    }

    fn subtract(&self, amount: u64) {
        self.current.fetch_sub(amount, Relaxed);
    }
}

/// The counters of one device index (they exist before its pool does, so a bad free naming a
/// device without a pool is counted too).
pub struct Counters {
    live_allocations: Gauge,
    allocated_bytes: Gauge,
    requested_bytes: Gauge,
    allocations: AtomicU64,
    frees: AtomicU64,
    allocated_bytes_total: AtomicU64,
    freed_bytes_total: AtomicU64,
    zero_size_allocations: AtomicU64,
    failed_allocations: AtomicU64,
    out_of_memory: AtomicU64,
    unknown_frees: AtomicU64,
    double_frees: AtomicU64,
    size_mismatched_frees: AtomicU64,
}

/// A reading of [`Counters`], as `gpupool_stats_json` reports it under `"ffi"`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CountersSnapshot {
    /// Allocations handed to C and not freed yet (the pointer map's size).
    pub live_pointers: u64,
    /// The most live allocations at once.
    pub live_pointers_peak: u64,
    /// Block bytes of live allocations (what the pool reserved for them, rounding included).
    pub allocated_bytes: u64,
    /// The most block bytes live at once.
    pub allocated_bytes_peak: u64,
    /// Bytes C asked for in live allocations.
    pub requested_bytes: u64,
    /// The most requested bytes live at once.
    pub requested_bytes_peak: u64,
    /// Successful allocations of a non-zero size.
    pub allocations: u64,
    /// Successful frees.
    pub frees: u64,
    /// Block bytes of every allocation, summed over time.
    pub allocated_bytes_total: u64,
    /// Block bytes of every free, summed over time.
    pub freed_bytes_total: u64,
    /// Requests for zero bytes (answered with NULL, as PyTorch's allocator does).
    pub zero_size_allocations: u64,
    /// Allocations that returned NULL for a non-zero size (for any reason).
    pub failed_allocations: u64,
    /// Of those, the ones refused for memory: out of memory, over budget, too large.
    pub out_of_memory: u64,
    /// Frees of pointers gpupool never handed out (or forgot long ago).
    pub unknown_frees: u64,
    /// Frees of pointers already freed.
    pub double_frees: u64,
    /// Frees whose size differed from the allocation's (the allocation was freed anyway).
    pub size_mismatched_frees: u64,
}

impl Counters {
    /// All zero.
    pub const fn new() -> Counters {
        Counters {
            live_allocations: Gauge::new(),
            allocated_bytes: Gauge::new(),
            requested_bytes: Gauge::new(),
            allocations: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            allocated_bytes_total: AtomicU64::new(0),
            freed_bytes_total: AtomicU64::new(0),
            zero_size_allocations: AtomicU64::new(0),
            failed_allocations: AtomicU64::new(0),
            out_of_memory: AtomicU64::new(0),
            unknown_frees: AtomicU64::new(0),
            double_frees: AtomicU64::new(0),
            size_mismatched_frees: AtomicU64::new(0),
        }
    }

    /// An allocation of `block_bytes` (for `requested_bytes`) was handed out.
    pub fn allocated(&self, block_bytes: usize, requested_bytes: usize) {
        self.live_allocations.add(1);
        self.allocated_bytes.add(block_bytes as u64);
        self.requested_bytes.add(requested_bytes as u64);
        self.allocations.fetch_add(1, Relaxed);
        self.allocated_bytes_total
            .fetch_add(block_bytes as u64, Relaxed);
    }

    /// An allocation of `block_bytes` (for `requested_bytes`) was freed.
    pub fn freed(&self, block_bytes: usize, requested_bytes: usize) {
        self.live_allocations.subtract(1);
        self.allocated_bytes.subtract(block_bytes as u64);
        self.requested_bytes.subtract(requested_bytes as u64);
        self.frees.fetch_add(1, Relaxed);
        self.freed_bytes_total
            .fetch_add(block_bytes as u64, Relaxed);
    }

    /// A request for zero bytes.
    pub fn zero_size_allocation(&self) {
        self.zero_size_allocations.fetch_add(1, Relaxed);
    }

    /// An allocation failed; `for_memory` when the pool refused it for lack of memory.
    pub fn failed_allocation(&self, for_memory: bool) {
        self.failed_allocations.fetch_add(1, Relaxed);
        if for_memory {
            self.out_of_memory.fetch_add(1, Relaxed);
        }
    }

    /// A free of an unknown pointer.
    pub fn unknown_free(&self) {
        self.unknown_frees.fetch_add(1, Relaxed);
    }

    /// A double free.
    pub fn double_free(&self) {
        self.double_frees.fetch_add(1, Relaxed);
    }

    /// A free with a size other than the allocation's.
    pub fn size_mismatched_free(&self) {
        self.size_mismatched_frees.fetch_add(1, Relaxed);
    }

    /// The figures now (each read on its own: concurrent operations may be half counted).
    pub fn snapshot(&self, live_pointers: u64) -> CountersSnapshot {
        CountersSnapshot {
            live_pointers,
            live_pointers_peak: self.live_allocations.peak.load(Relaxed),
            allocated_bytes: self.allocated_bytes.current.load(Relaxed),
            allocated_bytes_peak: self.allocated_bytes.peak.load(Relaxed),
            requested_bytes: self.requested_bytes.current.load(Relaxed),
            requested_bytes_peak: self.requested_bytes.peak.load(Relaxed),
            allocations: self.allocations.load(Relaxed),
            frees: self.frees.load(Relaxed),
            allocated_bytes_total: self.allocated_bytes_total.load(Relaxed),
            freed_bytes_total: self.freed_bytes_total.load(Relaxed),
            zero_size_allocations: self.zero_size_allocations.load(Relaxed),
            failed_allocations: self.failed_allocations.load(Relaxed),
            out_of_memory: self.out_of_memory.load(Relaxed),
            unknown_frees: self.unknown_frees.load(Relaxed),
            double_frees: self.double_frees.load(Relaxed),
            size_mismatched_frees: self.size_mismatched_frees.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peaks_follow_the_live_figures() {
        let counters = Counters::new();
        counters.allocated(1024, 1000);
        counters.allocated(512, 500);
        counters.freed(1024, 1000);
        counters.allocated(256, 200);
        let snapshot = counters.snapshot(2);
        assert_eq!(snapshot.allocated_bytes, 768);
        assert_eq!(snapshot.allocated_bytes_peak, 1536);
        assert_eq!(snapshot.requested_bytes_peak, 1500);
        assert_eq!(snapshot.live_pointers_peak, 2);
        assert_eq!(snapshot.allocated_bytes_total, 1792);
        assert_eq!(snapshot.freed_bytes_total, 1024);
        assert_eq!((snapshot.allocations, snapshot.frees), (3, 1));
    }
}
