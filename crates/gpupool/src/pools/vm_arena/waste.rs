//! The split of the arena's free space for snapshots: page granularity, space held for other
//! streams or fences, fragmentation (see `PoolStats::waste`).
#![forbid(unsafe_code)]

use super::keys;
use super::state::VmState;
use crate::stats::LargeStats;

impl<O> VmState<O> {
    /// The counters with the split of the free space filled in: a walk over the mapped pages
    /// and the other streams' free ranges (never over the whole reservation, which is twice
    /// the device's memory in pages, most never mapped).
    pub fn counters_with_waste(&self) -> LargeStats {
        let page_bytes = self.page_bytes;
        let mut granularity = 0u64;
        for (&first, handle) in &self.handles {
            for page in &self.pages[first..first + handle.pages] {
                if page.used_bytes > 0 {
                    granularity += (page_bytes - page.used_bytes.min(page_bytes)) as u64;
                }
            }
        }
        // A wholly free mapped page is held for the stream whose free range holds its first
        // byte, unless that is fresh space or the stream of the last request that mapped
        // pages (then it is fragmentation).
        let own = self.last_mapping_stream;
        let mut held = 0u64;
        for (&start, &(bytes, key, _)) in &self.free_at {
            if keys::stream_of(key).is_none_or(|owner| owner == own) {
                continue;
            }
            let offset = (start - self.base) as usize;
            let first_page = offset.div_ceil(page_bytes);
            let end_page = (offset + bytes).div_ceil(page_bytes).min(self.pages.len());
            for page in self.pages.get(first_page..end_page).unwrap_or_default() {
                if page.handle.is_some() && page.used_bytes == 0 {
                    held += page_bytes as u64;
                }
            }
        }
        // Gated blocks count as used on their pages but as free in `free_bytes`: their space
        // is held too (for their fences). Whatever the walk does not explain is fragmentation.
        let free = self.counters.free_bytes;
        let granularity = granularity.min(free);
        let gated: u64 = self
            .gated
            .iter()
            .map(|(address, _, _)| self.live.get(address).copied().unwrap_or(0) as u64)
            .sum();
        LargeStats {
            page_granularity_bytes: granularity,
            held_for_streams_bytes: (held + gated).min(free - granularity),
            ..self.counters.clone()
        }
    }
}
