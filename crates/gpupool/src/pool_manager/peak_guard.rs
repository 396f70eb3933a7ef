//! The pool does not grow past its peak while class caches hold idle blocks carved out of
//! virtual memory: before a mapping for class blocks (any mapping, when class blocks share the
//! large blocks' pages) would take the device's held bytes above the most it ever held, idle
//! carved blocks worth the excess go back into their arena first (largest classes first,
//! oldest blocks first: the fewest blocks, and those least likely to be wanted soon), and the
//! placement is tried again. When class blocks have an arena of their own, a large block's
//! mapping leaves them cached: their space would be free only for class blocks.
//!
//! Why a rule at the peak and not a cap on idle bytes: a cap fitted to one workload is too
//! large for the next (the traces' idle class blocks were 10–35 MB at their peaks, 0.3–7 % of
//! the live bytes), and a small cap turns hits into misses everywhere. Below the peak idle
//! blocks cost nothing the pool did not already hold; only growth past it is what the device
//! pays for. Carved blocks go back into the arena with no driver call, their space merging with
//! its free neighbours. Blocks from the backend (`carve_class_blocks` off, or other memory
//! kinds) are left alone: giving them back is a `cuMemFree`, which synchronises the device and
//! cost the H200 replays more time than the peak was worth (gpt2_train 568 → 804–1,144 ns per
//! operation).
#![forbid(unsafe_code)]

use super::device::DevicePool;
use super::PoolManager;

impl PoolManager {
    /// Whether mappings are guarded: there may be carved class blocks to give back.
    pub(super) fn guards_peak(&self) -> bool {
        self.config.release_idle_at_peak && self.config.carve_class_blocks
    }

    /// Releases idle carved class blocks worth at least `excess_bytes` (or all there are).
    pub(super) fn release_idle_before_peak(&self, pool: &DevicePool, excess_bytes: u64) {
        let mut released = 0u64;
        let mut blocks = Vec::new();
        // The device-memory caches, the only ones the arena carves for, largest class first.
        let carved = pool
            .caches
            .iter()
            .skip(pool.virtual_slot)
            .step_by(pool.kinds.len());
        for cache in carved.rev() {
            if released >= excess_bytes {
                break;
            }
            let class_bytes = cache.class_bytes() as u64;
            let wanted = (excess_bytes - released).div_ceil(class_bytes) as usize;
            let removed = cache.remove_oldest_carved(wanted);
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
