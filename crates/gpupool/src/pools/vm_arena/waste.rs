//! The split of the arena's free space for snapshots: page granularity, space held for other
//! streams or fences, fragmentation (see `PoolStats::waste`).
#![forbid(unsafe_code)]

use super::keys;
use super::state::VmState;
use crate::stats::LargeStats;

impl<O> VmState<O> {
    /// The counters with the split of the free space filled in (a walk over the mapped
    /// pages: for snapshots, not the allocation path).
    pub fn counters_with_waste(&self) -> LargeStats {
        let mut granularity = 0u64;
        let mut held = 0u64;
        let own = self.last_mapping_stream;
        for (index, page) in self.pages.iter().enumerate() {
            if page.handle.is_none() {
                continue;
            }
            if page.used_bytes > 0 {
                granularity += (self.page_bytes - page.used_bytes.min(self.page_bytes)) as u64;
                continue;
            }
            // A wholly free page: another stream's (held) unless fresh or the stream of the
            // last request that mapped pages (then it is fragmentation).
            let start = self.base + (index * self.page_bytes) as u64;
            let owner = self
                .free_at
                .range(..=start)
                .next_back()
                .and_then(|(_, &(_, key, _))| keys::stream_of(key));
            if owner.is_some_and(|owner| owner != own) {
                held += self.page_bytes as u64;
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
