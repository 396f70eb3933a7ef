//! The compact one-line summary for logs, in the seed's shape:
//! `Pool Stats: N allocs, X% hit rate, Y% reduction, Peak: Z, Health: H`.
//!
//! N is the number of requests, X the hit rate, Y docs/design.md's allocation reduction (not the
//! hit rate again, as in the seed), Z the peak reserved bytes and H the health status.
#![forbid(unsafe_code)]

use super::format::{bytes, percent, thousands};
use super::health::HealthAssessment;
use crate::stats::PoolStats;

/// The one-line summary of `stats`.
///
/// ```
/// use gpupool::backend::sim::SimBackend;
/// use gpupool::MemoryManager;
///
/// let manager = MemoryManager::new(SimBackend::default());
/// for _ in 0..1000 {
///     drop(manager.allocate_bytes(4096).unwrap());
/// }
/// assert_eq!(
///     gpupool::dashboard::summary(&manager.stats()),
///     "Pool Stats: 1,000 allocs, 99.9% hit rate, 99.9% reduction, Peak: 4.00 KiB, Health: Healthy"
/// );
/// ```
pub fn summary(stats: &PoolStats) -> String {
    let totals = &stats.totals;
    format!(
        "Pool Stats: {} allocs, {} hit rate, {} reduction, Peak: {}, Health: {}",
        thousands(totals.requests),
        percent(totals.hit_rate),
        percent(totals.allocation_reduction),
        bytes(totals.peak_reserved_bytes),
        HealthAssessment::of(totals).status
    )
}
