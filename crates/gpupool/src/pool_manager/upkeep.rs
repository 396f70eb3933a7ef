//! Giving memory back: releases (deferred while GPU work may still use a block), trims,
//! maintenance ticks, defragmentation, and prewarming, the one operation that fills caches
//! without a request. None of it is on the allocation hit path.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

use super::{thread_shard, DevicePool, PoolManager, ReleaseReport, TrimLevel};
use crate::backend::{MemoryKind, StreamId};
use crate::class_cache::{BlockRecord, IdleBlock};
use crate::error::PoolError;
use crate::fence::{CompletedFence, Fence, Pending, StreamFence};
use crate::large_pool;

impl PoolManager {
    /// Gives blocks (already uncounted from the caches) back to the backend. A block that GPU
    /// work may still use gets a fence recorded on its stream and waits in the deferred list
    /// instead: releasing never blocks on the GPU. The report counts both.
    #[cold]
    pub(super) fn release_blocks(
        &self,
        pool: &DevicePool,
        blocks: Vec<IdleBlock>,
    ) -> ReleaseReport {
        let mut report = ReleaseReport::default();
        let mut stream_fences: Vec<(StreamId, Arc<dyn Fence>)> = Vec::new();
        let mut deferred = Vec::new();
        for mut record in blocks {
            let record_bytes = record.block.bytes() as u64;
            report.blocks += 1;
            report.bytes += record_bytes;
            if !record.pending.is_idle() && !record.pending.has_stream_fence() {
                let stream = record.pending.stream;
                let known = stream_fences.iter().find(|(on, _)| *on == stream);
                let fence = match known {
                    Some((_, fence)) => Some(fence.clone()),
                    None => match pool.backend.record_fence(stream) {
                        Ok(Some(fence)) => {
                            stream_fences.push((stream, fence.clone()));
                            Some(fence)
                        }
                        Ok(None) => Some(Arc::new(CompletedFence) as Arc<dyn Fence>),
                        Err(error) => {
                            tracing::warn!(?error, "no fence for a release; synchronising");
                            let _ = pool.backend.synchronize();
                            None
                        }
                    },
                };
                match fence {
                    Some(fence) => record
                        .pending
                        .set_stream_fence(StreamFence::recorded(fence)),
                    None => record.pending.clear_gates(),
                }
            }
            if record.pending.gates.is_none() || record.pending.is_idle() {
                self.release_to_backend(pool, record.into_block());
            } else {
                // A deferred block keeps no pool reference: the pool's own drop releases it.
                record.owner = None;
                deferred.push(record);
            }
        }
        if !deferred.is_empty() {
            let mut list = pool.deferred.lock().unwrap_or_else(PoisonError::into_inner);
            list.append(&mut deferred);
            pool.deferred_count.store(list.len(), Ordering::Relaxed);
        }
        report
    }

    /// Releases the deferred blocks whose GPU work has finished; with `wait`, synchronises
    /// the device first and releases them all.
    pub(super) fn reap_deferred(&self, pool: &DevicePool, wait: bool) {
        if pool.deferred_count.load(Ordering::Relaxed) == 0 {
            return;
        }
        if wait {
            if let Err(error) = pool.backend.synchronize() {
                tracing::warn!(
                    ?error,
                    "synchronize before releasing deferred blocks failed"
                );
            }
        }
        let ready: Vec<IdleBlock> = {
            let mut list = pool.deferred.lock().unwrap_or_else(PoisonError::into_inner);
            let mut ready = Vec::new();
            for mut record in std::mem::take(&mut *list) {
                if wait || record.pending.is_idle() {
                    ready.push(record);
                } else {
                    list.push(record);
                }
            }
            pool.deferred_count.store(list.len(), Ordering::Relaxed);
            ready
        };
        for record in ready {
            self.release_to_backend(pool, record.into_block());
        }
    }

    /// Everything idle goes back to the device now (out-of-memory and budget recovery).
    pub(super) fn release_everything(&self, pool: &DevicePool) -> ReleaseReport {
        let report = self.release_idle(pool, 0, None);
        self.reap_deferred(pool, true);
        report
    }

    /// Releases idle blocks of every class on one device down to `keep` per class.
    pub(super) fn release_idle(
        &self,
        pool: &DevicePool,
        keep: usize,
        idle_since: Option<u64>,
    ) -> ReleaseReport {
        let blocks = pool
            .caches
            .iter()
            .flat_map(|cache| cache.remove_idle(keep, idle_since))
            .chain(
                pool.large
                    .iter()
                    .flat_map(|large| large.remove_free_segments(idle_since)),
            )
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
            report.add(self.release_idle(pool, keep, None));
            self.reap_deferred(pool, false);
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
                self.reap_deferred(pool, false);
            }
            return report;
        }
        for pool in self.devices.iter() {
            report.add(self.release_idle(pool, self.config.min_idle_per_class, Some(now - 2)));
            self.reap_deferred(pool, false);
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
            let mut marks = pool
                .defragment_marks
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut cold = Vec::new();
            for (index, cache) in pool.caches.iter().enumerate() {
                let requests = cache.counters().requests;
                if requests == marks[index] {
                    cold.extend(cache.remove_idle(0, None));
                }
                marks[index] = requests;
            }
            report.add(self.release_blocks(pool, cold));
        }
        tracing::info!(blocks = report.blocks, bytes = report.bytes, "defragment");
        report
    }

    /// Makes room for `count` requests of `bytes` bytes without a backend call each: fills the
    /// class of `bytes` with up to `count` idle blocks, within the class cap and the budget, or,
    /// for sizes the large arena serves, adds one free segment that holds `count` such blocks
    /// for requests on `stream`. Returns how many requests the prewarmed memory serves.
    pub(crate) fn prewarm(
        &self,
        device: usize,
        bytes: usize,
        count: usize,
        kind: Option<MemoryKind>,
        stream: StreamId,
    ) -> Result<usize, PoolError> {
        if bytes == 0 {
            return Err(PoolError::ZeroSize);
        }
        let pool = self.device(device)?;
        let (kind, slot) = pool.kind_slot(kind)?;
        if bytes > pool.large_threshold {
            if !self.pooling() || count == 0 {
                return Ok(0);
            }
            return self.prewarm_large(pool, slot, bytes, count, kind, stream);
        }
        let class = self
            .config
            .classes
            .class_for(bytes)
            .ok_or(PoolError::NotPooled {
                requested_bytes: bytes as u64,
                max_class_bytes: self.config.classes.max_bytes() as u64,
            })?;
        if !self.pooling() {
            return Ok(0);
        }
        let cache = &pool.caches[class * pool.kinds.len() + slot];
        let class_bytes = cache.class_bytes();
        let wanted = count.min(cache.free_slots());
        let shard = thread_shard();
        let mut added = 0;
        for _ in 0..wanted {
            // Prewarming never evicts cached blocks to make room: no retry after a release.
            if !self.try_reserve(pool, class_bytes as u64) {
                break;
            }
            let block = match self.backend_allocate(pool, class_bytes, kind) {
                Ok(block) => block,
                Err(error) => {
                    self.unreserve(pool, class_bytes as u64);
                    if added == 0 {
                        return Err(self.allocation_error(pool, error, class_bytes));
                    }
                    break;
                }
            };
            let mut idle = IdleBlock::new(
                BlockRecord::boxed(block, self.this.upgrade()),
                Pending::on(StreamId::DEFAULT),
                self.epoch.load(Ordering::Relaxed),
            );
            // No GPU work ever touched a prewarmed block: any stream may take it.
            idle.pending.set_stream_fence(StreamFence::completed());
            if pool.purgeable {
                pool.backend.make_purgeable(&idle.block);
            }
            if let Err(mut idle) = cache.add_prewarmed(shard, idle) {
                // Drops filled the class meanwhile: this block goes back, counted.
                drop(idle.owner.take());
                self.release_to_backend(pool, idle.into_block());
                cache.record_unused_allocation(shard);
                break;
            }
            added += 1;
        }
        Ok(added)
    }

    /// `prewarm` for sizes the large arena serves: one free segment of `count` blocks.
    fn prewarm_large(
        &self,
        pool: &DevicePool,
        slot: usize,
        bytes: usize,
        count: usize,
        kind: MemoryKind,
        stream: StreamId,
    ) -> Result<usize, PoolError> {
        let block_bytes = large_pool::block_bytes_for(bytes);
        let segment_bytes = block_bytes
            .and_then(|block_bytes| block_bytes.checked_mul(count))
            .and_then(large_pool::segment_bytes_for)
            .ok_or(PoolError::TooLarge {
                requested_bytes: (bytes as u64).saturating_mul(count as u64),
                limit_bytes: usize::MAX as u64,
            })?;
        if !self.try_reserve(pool, segment_bytes as u64) {
            return Err(PoolError::BudgetExceeded {
                requested_bytes: segment_bytes as u64,
                reserved_bytes: pool.reserved_now(),
                budget_bytes: self.config.budget_bytes.unwrap_or(u64::MAX),
            });
        }
        match self.backend_allocate(pool, segment_bytes, kind) {
            Ok(segment) => {
                let epoch = self.epoch.load(Ordering::Relaxed);
                pool.large[slot].add_free_segment(segment, stream, epoch);
                Ok(count)
            }
            Err(error) => {
                self.unreserve(pool, segment_bytes as u64);
                Err(self.allocation_error(pool, error, segment_bytes))
            }
        }
    }
}
