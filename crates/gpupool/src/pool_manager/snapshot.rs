//! One consistent snapshot of the pool: every lock of every device is held while the counters
//! are read, so the figures agree with each other exactly (see `stats.rs` for the identities).

#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;

use super::PoolManager;
use crate::stats::{BypassStats, ClassStats, DeviceStats, LargeStats, PoolStats, Totals};

impl PoolManager {
    /// One consistent snapshot: every shard of every device is locked while it is read.
    pub(crate) fn stats(&self) -> PoolStats {
        let mut devices = Vec::with_capacity(self.devices.len());
        let mut totals = Totals::default();
        let mut highest_pressure: f64 = 0.0;
        let infos: Vec<_> = self
            .devices
            .iter()
            .map(|pool| pool.backend().memory_info())
            .collect();
        // Hold every lock of every device until all counters are read.
        let bypass_guards: Vec<_> = self.devices.iter().map(|pool| pool.bypass.lock()).collect();
        let deferred_guards: Vec<_> = self
            .devices
            .iter()
            .map(|pool| pool.upstream.deferred_list())
            .collect();
        let large_guards: Vec<Vec<_>> = self
            .devices
            .iter()
            .map(|pool| pool.large.iter().map(|large| large.lock()).collect())
            .collect();
        let virtual_guards: Vec<_> = self
            .devices
            .iter()
            .map(|pool| pool.arenas().map(|arena| arena.lock()).collect::<Vec<_>>())
            .collect();
        let shard_guards: Vec<Vec<_>> = self
            .devices
            .iter()
            .map(|pool| pool.caches.iter().map(|cache| cache.lock_all()).collect())
            .collect();
        for (device, pool) in self.devices.iter().enumerate() {
            let bypass_counters = *bypass_guards[device];
            let mut device_totals = Totals {
                requests: bypass_counters.requests,
                bypasses: bypass_counters.requests,
                failed_requests: pool.failed_requests.load(Ordering::Relaxed),
                alloc_retries: pool.alloc_retries.load(Ordering::Relaxed),
                backend_allocations: bypass_counters.backend_allocations,
                backend_releases: bypass_counters.backend_releases,
                in_use_bytes: bypass_counters.in_use_bytes,
                requested_live_bytes: bypass_counters.requested_live_bytes,
                peak_reserved_bytes: pool.upstream.budget.peak(),
                pending_release_blocks: deferred_guards[device].len() as u64,
                pending_release_bytes: deferred_guards[device]
                    .iter()
                    .map(|record| record.block.bytes() as u64)
                    .sum(),
                ..Totals::default()
            };
            let mut classes = Vec::new();
            for (index, shards) in shard_guards[device].iter().enumerate() {
                let mut counters = crate::pools::class_cache::CacheCounters::default();
                for shard in shards {
                    counters.add(&shard.counters());
                }
                if counters.requests == 0
                    && counters.backend_allocations == 0
                    && counters.arena_blocks == 0
                {
                    continue;
                }
                let class_bytes = pool.caches[index].class_bytes() as u64;
                let in_use_blocks = counters.in_use_blocks.max(0) as u64;
                let row = ClassStats {
                    class_bytes,
                    kind: pool.kinds[index % pool.kinds.len()],
                    requests: counters.requests,
                    hits: counters.hits,
                    misses: counters.misses,
                    backend_allocations: counters.backend_allocations,
                    backend_releases: counters.backend_releases,
                    arena_blocks: counters.arena_blocks,
                    arena_returns: counters.arena_returns,
                    releases_at_cap: counters.releases_at_cap,
                    prewarmed_blocks: counters.prewarmed,
                    in_use_blocks,
                    cached_blocks: counters.idle_blocks,
                    in_use_bytes: in_use_blocks * class_bytes,
                    cached_bytes: counters.idle_blocks * class_bytes,
                    requested_live_bytes: counters.requested_live_bytes.max(0) as u64,
                    hit_rate: crate::stats::ratio(counters.hits, counters.hits + counters.misses),
                    hit_latency: pool.caches[index].hit_latency.summary(),
                    miss_latency: pool.caches[index].miss_latency.summary(),
                };
                device_totals.requests += row.requests;
                device_totals.hits += row.hits;
                device_totals.misses += row.misses;
                device_totals.backend_allocations += row.backend_allocations;
                device_totals.backend_releases += row.backend_releases;
                device_totals.in_use_bytes += row.in_use_bytes;
                device_totals.cached_bytes += row.cached_bytes;
                device_totals.requested_live_bytes += row.requested_live_bytes;
                classes.push(row);
            }
            let mut large = LargeStats::default();
            for state in &large_guards[device] {
                large.accumulate(state.counters());
            }
            // The virtual-memory arena reports as the large arena does: its pages are the
            // segments (mapped memory); its address space is reported on its own.
            for state in &virtual_guards[device] {
                large.accumulate(&state.counters_with_waste());
            }
            device_totals.requests += large.requests;
            device_totals.hits += large.hits;
            device_totals.misses += large.misses;
            device_totals.backend_allocations += large.backend_allocations;
            device_totals.backend_releases += large.backend_releases;
            device_totals.in_use_bytes += large.in_use_bytes;
            device_totals.cached_bytes += large.free_bytes;
            device_totals.requested_live_bytes += large.requested_live_bytes;
            let info = infos[device];
            let basis = self
                .config
                .budget_bytes
                .or(info.map(|info| info.total_bytes));
            device_totals.derive(basis);
            highest_pressure = highest_pressure.max(device_totals.memory_pressure);
            totals.accumulate(&device_totals);
            devices.push(DeviceStats {
                device,
                device_name: pool.backend().device_name(),
                budget_bytes: self.config.budget_bytes,
                capacity_bytes: info.map(|info| info.total_bytes),
                device_free_bytes: info.map(|info| info.free_bytes),
                classes,
                large,
                bypass: BypassStats {
                    requests: bypass_counters.requests,
                    in_use_blocks: bypass_counters.in_use_blocks,
                    in_use_bytes: bypass_counters.in_use_bytes,
                    requested_live_bytes: bypass_counters.requested_live_bytes,
                    backend_allocations: bypass_counters.backend_allocations,
                    backend_releases: bypass_counters.backend_releases,
                },
                totals: device_totals,
            });
        }
        drop(shard_guards);
        drop(large_guards);
        drop(virtual_guards);
        drop(deferred_guards);
        drop(bypass_guards);
        totals.derive(None);
        totals.memory_pressure = highest_pressure;
        PoolStats {
            backend: self.devices[0].backend().name().to_string(),
            pooling: self.pooling(),
            devices,
            totals,
        }
    }
}
