//! Prewarming: the one operation that fills pools without a request (the seed's
//! `PreAllocatePool`).
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;

use super::device::DevicePool;
use super::{thread_shard, PoolManager};
use crate::error::PoolError;
use crate::kind::{MemoryKind, StreamId};
use crate::pools::large_arena;
use crate::pools::pending::{Pending, StreamFence};
use crate::pools::record::{BlockRecord, IdleBlock};

impl PoolManager {
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
            if slot == pool.virtual_slot && pool.virtual_arena.is_some() {
                return self.prewarm_virtual(pool, bytes, count, stream);
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
            if !pool.upstream.budget.try_reserve(class_bytes as u64) {
                break;
            }
            let block = match pool.upstream.allocate(class_bytes, kind) {
                Ok(block) => block,
                Err(error) => {
                    pool.upstream.budget.unreserve(class_bytes as u64);
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
                pool.backend().make_purgeable(&idle.block);
            }
            if let Err(mut idle) = cache.add_prewarmed(shard, idle) {
                // Drops filled the class meanwhile: this block goes back, counted.
                drop(idle.owner.take());
                pool.upstream.release_now(idle.into_block());
                cache.record_unused_allocation(shard, false);
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
        let block_bytes = large_arena::block_bytes_for(bytes);
        let segment_bytes = block_bytes
            .and_then(|block_bytes| block_bytes.checked_mul(count))
            .and_then(large_arena::segment_bytes_for)
            .ok_or(PoolError::TooLarge {
                requested_bytes: (bytes as u64).saturating_mul(count as u64),
                limit_bytes: usize::MAX as u64,
            })?;
        if !pool.upstream.budget.try_reserve(segment_bytes as u64) {
            return Err(PoolError::BudgetExceeded {
                requested_bytes: segment_bytes as u64,
                reserved_bytes: pool.reserved_now(),
                budget_bytes: pool.upstream.budget.limit(),
            });
        }
        match pool.upstream.allocate(segment_bytes, kind) {
            Ok(segment) => {
                let epoch = self.epoch.load(Ordering::Relaxed);
                pool.large[slot].add_free_segment(segment, stream, epoch);
                Ok(count)
            }
            Err(error) => {
                pool.upstream.budget.unreserve(segment_bytes as u64);
                Err(self.allocation_error(pool, error, segment_bytes))
            }
        }
    }
}
