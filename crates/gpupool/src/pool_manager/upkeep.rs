//! Giving memory back: trims, maintenance ticks and defragmentation. None of it is on the
//! allocation hit path; the releases themselves go through the upstream adaptor, which defers
//! those GPU work may still use.
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::device::DevicePool;
use super::{PoolManager, ReleaseReport, TrimLevel};
use crate::pools::Pool;

impl PoolManager {
    /// Everything idle goes back to the device now (out-of-memory and budget recovery). Waits
    /// for a trim or maintenance tick under way first (see `DevicePool::upkeep`), so the
    /// retry that follows also sees the memory that one was giving back.
    pub(super) fn release_everything(&self, pool: &DevicePool) -> ReleaseReport {
        let _upkeep = pool.upkeep();
        let mut report = self.release_idle(pool, 0, None);
        pool.upstream.reap(true);
        if pool.virtual_arena.is_some() {
            // The one place the pool waits for the device: out of memory or budget.
            report.add(self.unmapped_report(pool, true));
        }
        report
    }

    /// Unmaps the virtual-memory arena's free pages whose work is done, as a report.
    fn unmapped_report(&self, pool: &DevicePool, wait: bool) -> ReleaseReport {
        let bytes = self.unmap_free_pages(pool, wait);
        let page_bytes = pool
            .virtual_arena
            .as_ref()
            .map_or(1, |arena| arena.page_bytes());
        ReleaseReport {
            blocks: bytes / page_bytes as u64,
            bytes,
        }
    }

    /// Releases idle blocks of every class on one device down to `keep` per class.
    fn release_idle(
        &self,
        pool: &DevicePool,
        keep: usize,
        idle_since: Option<u64>,
    ) -> ReleaseReport {
        let blocks = pool
            .pools()
            .flat_map(|each| each.release_idle(keep, idle_since))
            .collect();
        self.release_blocks(pool, blocks)
    }

    pub(crate) fn trim(&self, level: TrimLevel) -> ReleaseReport {
        let keep = match level {
            TrimLevel::Normal => self.config.min_idle_per_class,
            TrimLevel::Aggressive => 0,
        };
        let mut report = ReleaseReport::default();
        for pool in self.devices.iter() {
            // Releases another thread has under way (a maintenance tick) finish first: when the
            // trim returns, they are back with the device or deferred (`DevicePool::upkeep`).
            let _upkeep = pool.upkeep();
            report.add(self.release_idle(pool, keep, None));
            report.add(self.unmapped_report(pool, false));
            pool.upstream.reap(false);
        }
        tracing::info!(?level, blocks = report.blocks, bytes = report.bytes, "trim");
        report
    }

    /// One maintenance tick: releases blocks idle for over one interval, down to the minimum.
    pub(crate) fn maintain(&self) -> ReleaseReport {
        let now = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let mut report = ReleaseReport::default();
        if now < 2 {
            for pool in self.devices.iter() {
                let _upkeep = pool.upkeep();
                pool.upstream.reap(false);
            }
            return report;
        }
        for pool in self.devices.iter() {
            let _upkeep = pool.upkeep();
            report.add(self.release_idle(pool, self.config.min_idle_per_class, Some(now - 2)));
            report.add(self.unmapped_report(pool, false));
            pool.upstream.reap(false);
        }
        if report.blocks > 0 {
            tracing::info!(
                blocks = report.blocks,
                bytes = report.bytes,
                "maintenance released idle blocks"
            );
        }
        report
    }

    /// Releases every idle block of each class that saw no request since the previous call.
    pub(crate) fn defragment(&self) -> ReleaseReport {
        let mut report = ReleaseReport::default();
        for pool in self.devices.iter() {
            let _upkeep = pool.upkeep();
            let mut marks = pool
                .defragment_marks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut cold = Vec::new();
            for (index, cache) in pool.caches.iter().enumerate() {
                let requests = cache.counters().requests;
                if requests == marks[index] {
                    cold.extend(Pool::release_idle(cache, 0, None));
                }
                marks[index] = requests;
            }
            report.add(self.release_blocks(pool, cold));
        }
        tracing::info!(blocks = report.blocks, bytes = report.bytes, "defragment");
        report
    }
}
