//! Statistics snapshots and docs/design.md's derived metrics.
//!
//! A [`PoolStats`] is taken with every shard of every class locked at once, so its figures
//! describe one instant and satisfy the identities exactly:
//! `reserved = in use + cached` and `backend allocations − backend releases = blocks held`.
//! Derived metrics use the definitions of docs/design.md, never the seed's (its "allocation
//! reduction" was the hit rate renamed):
//!
//! | metric | formula |
//! |---|---|
//! | hit rate | hits / (hits + misses) |
//! | allocation reduction | 1 − backend allocations / requests |
//! | internal fragmentation | 1 − requested live bytes / in-use bytes |
//! | idle fraction | cached / reserved |
//! | memory efficiency | requested live bytes / reserved |
//! | memory pressure | reserved / budget (else device capacity) |
//!
//! Every ratio of an empty denominator is 0, never NaN.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

use crate::kind::MemoryKind;
pub use crate::latency::LatencySummary;

/// One consistent snapshot of the whole pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolStats {
    /// The backend's name.
    pub backend: String,
    /// Whether pooling was on.
    pub pooling: bool,
    /// One entry per device the manager serves.
    pub devices: Vec<DeviceStats>,
    /// Sums over all devices (pressure is the highest of any device).
    pub totals: Totals,
}

/// The figures of one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceStats {
    /// The device index.
    pub device: usize,
    /// The device's name, as the backend reports it.
    pub device_name: String,
    /// The configured budget for this device, if any.
    pub budget_bytes: Option<u64>,
    /// Total device memory, where the backend can tell.
    pub capacity_bytes: Option<u64>,
    /// Free device memory, where the backend can tell.
    pub device_free_bytes: Option<u64>,
    /// One row per size class and kind that has seen any activity.
    pub classes: Vec<ClassStats>,
    /// Requests served by the large-block arena (split segments).
    pub large: LargeStats,
    /// Requests outside the pooled range or made with pooling off.
    pub bypass: BypassStats,
    /// Sums for this device.
    pub totals: Totals,
}

/// The figures of one size class and memory kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassStats {
    /// The block size of the class.
    pub class_bytes: u64,
    /// The memory kind.
    pub kind: MemoryKind,
    /// Allocate calls routed to this class.
    pub requests: u64,
    /// Requests served from the cache.
    pub hits: u64,
    /// Requests that needed a backend allocation.
    pub misses: u64,
    /// Blocks allocated from the backend (misses and prewarming).
    pub backend_allocations: u64,
    /// Blocks given back to the backend (caps, trims, pooling off).
    pub backend_releases: u64,
    /// Blocks carved out of the virtual-memory arena's mapped pages instead of allocated from
    /// the backend (device memory on a backend with virtual memory).
    #[serde(default)]
    pub arena_blocks: u64,
    /// Carved blocks given back to the arena (their space becomes its free space).
    #[serde(default)]
    pub arena_returns: u64,
    /// Drops released because the class already held its cap of idle blocks.
    pub releases_at_cap: u64,
    /// Blocks allocated by `prewarm`.
    pub prewarmed_blocks: u64,
    /// Blocks owned by live buffers.
    pub in_use_blocks: u64,
    /// Idle blocks in the cache.
    pub cached_blocks: u64,
    /// `in_use_blocks × class_bytes`.
    pub in_use_bytes: u64,
    /// `cached_blocks × class_bytes`.
    pub cached_bytes: u64,
    /// Bytes the owners of live buffers asked for.
    pub requested_live_bytes: u64,
    /// hits / (hits + misses).
    pub hit_rate: f64,
    /// Sampled latency of hits (one in 64 per thread).
    pub hit_latency: LatencySummary,
    /// Latency of misses (every miss, backend allocation included).
    pub miss_latency: LatencySummary,
}

/// Figures of the large-block arena: segments from the backend (or, with virtual memory, pages
/// mapped into one reserved range), split into best-fit blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LargeStats {
    /// Requests served by the arena.
    pub requests: u64,
    /// Served from free space in a segment.
    pub hits: u64,
    /// Needed a new segment.
    pub misses: u64,
    /// Segments allocated from the backend.
    pub backend_allocations: u64,
    /// Segments released to the backend.
    pub backend_releases: u64,
    /// Blocks the virtual-memory arena lent to the class caches, in use or idle there: their
    /// bytes count in the classes' figures, not in this arena's in-use or free bytes.
    #[serde(default)]
    pub class_blocks: u64,
    /// Their bytes.
    #[serde(default)]
    pub class_bytes: u64,
    /// Live large buffers.
    pub in_use_blocks: u64,
    /// Bytes of live large blocks.
    pub in_use_bytes: u64,
    /// Bytes the owners of live large buffers asked for.
    pub requested_live_bytes: u64,
    /// Free bytes inside segments (reusable, or waiting for fences).
    pub free_bytes: u64,
    /// Segments held.
    pub segments: u64,
    /// Their bytes: in use + free.
    pub segment_bytes: u64,
    /// Blocks split to fit a request.
    pub splits: u64,
    /// Freed blocks merged with a free neighbour.
    pub merges: u64,
    /// Segments allocated by `prewarm`, before any request.
    #[serde(default)]
    pub prewarmed_segments: u64,
    /// Address space reserved by the virtual-memory arena (not memory: only mapped pages,
    /// counted in `segment_bytes`, are).
    #[serde(default)]
    pub address_space_bytes: u64,
    /// Of `free_bytes`: free space on mapped pages that also hold blocks (virtual-memory arena:
    /// the cost of mapping whole pages).
    #[serde(default)]
    pub page_granularity_bytes: u64,
    /// Of `free_bytes`: wholly free pages held for one stream (until a fence lets any stream
    /// use them) and space of freed blocks still waiting for their fences.
    #[serde(default)]
    pub held_for_streams_bytes: u64,
}

impl LargeStats {
    pub(crate) fn accumulate(&mut self, counters: &LargeStats) {
        self.requests += counters.requests;
        self.hits += counters.hits;
        self.misses += counters.misses;
        self.backend_allocations += counters.backend_allocations;
        self.backend_releases += counters.backend_releases;
        self.class_blocks += counters.class_blocks;
        self.class_bytes += counters.class_bytes;
        self.in_use_blocks += counters.in_use_blocks;
        self.in_use_bytes += counters.in_use_bytes;
        self.requested_live_bytes += counters.requested_live_bytes;
        self.free_bytes += counters.free_bytes;
        self.segments += counters.segments;
        self.segment_bytes += counters.segment_bytes;
        self.splits += counters.splits;
        self.merges += counters.merges;
        self.prewarmed_segments += counters.prewarmed_segments;
        self.address_space_bytes += counters.address_space_bytes;
        self.page_granularity_bytes += counters.page_granularity_bytes;
        self.held_for_streams_bytes += counters.held_for_streams_bytes;
    }
}

/// Figures of requests that bypass the classes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BypassStats {
    /// Bypassed requests.
    pub requests: u64,
    /// Live bypass buffers.
    pub in_use_blocks: u64,
    /// Bytes of live bypass blocks.
    pub in_use_bytes: u64,
    /// Bytes the owners of live bypass buffers asked for.
    pub requested_live_bytes: u64,
    /// Backend allocations made for bypassed requests.
    pub backend_allocations: u64,
    /// Bypass blocks released.
    pub backend_releases: u64,
}

/// Where reserved memory beyond the requested live bytes goes, at one instant: the parts add up
/// to `reserved − requested live` exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WasteBreakdown {
    /// Rounding inside blocks handed out: in use − requested live (class sizes, the arenas'
    /// 512-byte rounding, the bypass's alignment).
    pub rounding_bytes: u64,
    /// Idle blocks in the class caches.
    pub class_cache_bytes: u64,
    /// Free space inside the large arena that no stream holds and no page rounding explains:
    /// free space between blocks of segments, or wholly free mapped pages (fragmentation).
    pub fragmentation_bytes: u64,
    /// Free space on mapped pages that also hold blocks (page granularity).
    pub page_granularity_bytes: u64,
    /// Free space held for one stream, or waiting for fences (other streams' holdings).
    pub held_for_streams_bytes: u64,
}

impl WasteBreakdown {
    /// The sum of the parts: reserved − requested live.
    pub fn total_bytes(&self) -> u64 {
        self.rounding_bytes
            + self.class_cache_bytes
            + self.fragmentation_bytes
            + self.page_granularity_bytes
            + self.held_for_streams_bytes
    }
}

/// Totals and the derived metrics, for a device or the whole pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// Allocate calls that succeeded (hits + misses + bypasses).
    pub requests: u64,
    /// Requests served from a cache.
    pub hits: u64,
    /// Pooled requests that needed a backend allocation.
    pub misses: u64,
    /// Requests outside the pooled range or made with pooling off.
    pub bypasses: u64,
    /// Allocate calls that returned an error.
    pub failed_requests: u64,
    /// Allocations tried a second time after out of memory or the budget made the pool
    /// release its idle memory (PyTorch's `num_alloc_retries`).
    pub alloc_retries: u64,
    /// Every backend allocation (misses, bypasses, prewarming).
    pub backend_allocations: u64,
    /// Every backend release.
    pub backend_releases: u64,
    /// Blocks held from the backend: allocations − releases.
    pub blocks_held: u64,
    /// Block bytes of live buffers.
    pub in_use_bytes: u64,
    /// Block bytes idle in caches.
    pub cached_bytes: u64,
    /// in use + cached: everything held from the backend.
    pub reserved_bytes: u64,
    /// Bytes the owners of live buffers asked for.
    pub requested_live_bytes: u64,
    /// The most bytes ever reserved (including allocations in flight).
    pub peak_reserved_bytes: u64,
    /// Blocks out of the pool's accounting that wait for GPU work before going back to the
    /// device (still held from it until then).
    pub pending_release_blocks: u64,
    /// Their bytes.
    pub pending_release_bytes: u64,
    /// hits / (hits + misses).
    pub hit_rate: f64,
    /// 1 − backend allocations / requests.
    pub allocation_reduction: f64,
    /// 1 − requested live bytes / in-use bytes.
    pub internal_fragmentation: f64,
    /// cached / reserved.
    pub idle_fraction: f64,
    /// requested live bytes / reserved.
    pub memory_efficiency: f64,
    /// reserved / budget, else reserved / device capacity; 0 when neither is known.
    pub memory_pressure: f64,
}

/// `numerator / denominator`, or 0 for an empty denominator.
pub fn ratio(numerator: u64, denominator: u64) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

impl Totals {
    /// Fills in the derived metrics from the counters.
    pub(crate) fn derive(&mut self, pressure_basis: Option<u64>) {
        self.blocks_held = self.backend_allocations - self.backend_releases;
        self.reserved_bytes = self.in_use_bytes + self.cached_bytes;
        self.hit_rate = ratio(self.hits, self.hits + self.misses);
        self.allocation_reduction = if self.requests == 0 {
            0.0
        } else {
            1.0 - ratio(self.backend_allocations, self.requests)
        };
        self.internal_fragmentation = if self.in_use_bytes == 0 {
            0.0
        } else {
            1.0 - ratio(self.requested_live_bytes, self.in_use_bytes)
        };
        self.idle_fraction = ratio(self.cached_bytes, self.reserved_bytes);
        self.memory_efficiency = ratio(self.requested_live_bytes, self.reserved_bytes);
        self.memory_pressure =
            pressure_basis.map_or(0.0, |basis| ratio(self.reserved_bytes, basis));
    }

    /// Adds another device's counters (not its derived metrics).
    pub(crate) fn accumulate(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.hits += other.hits;
        self.misses += other.misses;
        self.bypasses += other.bypasses;
        self.failed_requests += other.failed_requests;
        self.alloc_retries += other.alloc_retries;
        self.backend_allocations += other.backend_allocations;
        self.backend_releases += other.backend_releases;
        self.in_use_bytes += other.in_use_bytes;
        self.cached_bytes += other.cached_bytes;
        self.requested_live_bytes += other.requested_live_bytes;
        self.peak_reserved_bytes += other.peak_reserved_bytes;
        self.pending_release_blocks += other.pending_release_blocks;
        self.pending_release_bytes += other.pending_release_bytes;
    }
}

impl PoolStats {
    /// Where reserved memory beyond the requested live bytes goes, over every device.
    pub fn waste(&self) -> WasteBreakdown {
        let mut waste = WasteBreakdown::default();
        for device in &self.devices {
            let totals = &device.totals;
            waste.rounding_bytes += totals.in_use_bytes - totals.requested_live_bytes;
            waste.class_cache_bytes += device
                .classes
                .iter()
                .map(|class| class.cached_bytes)
                .sum::<u64>();
            let large = &device.large;
            waste.page_granularity_bytes += large.page_granularity_bytes;
            waste.held_for_streams_bytes += large.held_for_streams_bytes;
            waste.fragmentation_bytes +=
                large.free_bytes - large.page_granularity_bytes - large.held_for_streams_bytes;
        }
        waste
    }

    /// The row of `class_bytes` and `kind` on device 0, if it has seen activity.
    pub fn class(&self, class_bytes: u64, kind: MemoryKind) -> Option<&ClassStats> {
        self.devices.first().and_then(|device| {
            device
                .classes
                .iter()
                .find(|row| row.class_bytes == class_bytes && row.kind == kind)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_totals_derive_zeros_not_nan() {
        let mut totals = Totals::default();
        totals.derive(None);
        for value in [
            totals.hit_rate,
            totals.allocation_reduction,
            totals.internal_fragmentation,
            totals.idle_fraction,
            totals.memory_efficiency,
            totals.memory_pressure,
        ] {
            assert_eq!(value, 0.0);
        }
    }

    #[test]
    fn derived_metrics_follow_the_design_formulas() {
        let mut totals = Totals {
            requests: 1000,
            hits: 999,
            misses: 1,
            backend_allocations: 1,
            in_use_bytes: 4096,
            cached_bytes: 4096,
            requested_live_bytes: 3072,
            ..Totals::default()
        };
        totals.derive(Some(16384));
        assert_eq!(totals.reserved_bytes, 8192);
        assert!((totals.hit_rate - 0.999).abs() < 1e-12);
        assert!((totals.allocation_reduction - 0.999).abs() < 1e-12);
        assert!((totals.internal_fragmentation - 0.25).abs() < 1e-12);
        assert!((totals.idle_fraction - 0.5).abs() < 1e-12);
        assert!((totals.memory_efficiency - 0.375).abs() < 1e-12);
        assert!((totals.memory_pressure - 0.5).abs() < 1e-12);
        assert_eq!(totals.blocks_held, 1);
    }
}
