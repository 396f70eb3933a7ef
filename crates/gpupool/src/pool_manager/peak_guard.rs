//! The pool does not grow past its peak while class caches hold idle blocks: before a mapping
//! would take the device's held bytes above the most it ever held, idle class blocks worth the
//! excess go back first (largest classes first, oldest blocks first: the fewest blocks, and
//! those least likely to be wanted soon), and the placement is tried again.
//!
//! Why a rule at the peak and not a cap on idle bytes: a cap fitted to one workload is too
//! large for the next (the traces' idle class blocks were 10–35 MB at their peaks, 0.3–7 % of
//! the live bytes), and a small cap turns hits into misses everywhere. Below the peak idle
//! blocks cost nothing the pool did not already hold; only growth past it is what the device
//! pays for. Class blocks carved out of the arena go back into it (no driver call, and the
//! space merges with its free neighbours); others are released through the upstream (a
//! fenced, deferred release where GPU work may still use them), never with a wait.
#![forbid(unsafe_code)]

use super::device::DevicePool;
use super::PoolManager;

impl PoolManager {
    /// Gives every idle class block carved out of the arena back to it (a class miss found no
    /// room in the small pages set aside).
    pub(super) fn release_idle_classes_to_arena(&self, pool: &DevicePool) {
        if !self.config.release_idle_at_peak {
            return;
        }
        let blocks: Vec<_> = pool
            .caches
            .iter()
            .skip(pool.virtual_slot)
            .step_by(pool.kinds.len())
            .flat_map(|cache| cache.remove_idle(0, None))
            .collect();
        if !blocks.is_empty() {
            self.release_blocks(pool, blocks);
        }
    }

    /// Releases idle class blocks worth at least `excess_bytes` (or all there are).
    pub(super) fn release_idle_before_peak(&self, pool: &DevicePool, excess_bytes: u64) {
        let mut released = 0u64;
        let mut blocks = Vec::new();
        for cache in pool.caches.iter().rev() {
            if released >= excess_bytes {
                break;
            }
            let class_bytes = cache.class_bytes() as u64;
            let wanted = (excess_bytes - released).div_ceil(class_bytes) as usize;
            let removed = cache.remove_oldest(wanted);
            released += removed.len() as u64 * class_bytes;
            blocks.extend(removed);
        }
        if !blocks.is_empty() {
            let report = self.release_blocks(pool, blocks);
            tracing::debug!(
                excess_bytes,
                released_blocks = report.blocks,
                released_bytes = report.bytes,
                "growing past the peak: released idle class blocks first"
            );
        }
    }
}
