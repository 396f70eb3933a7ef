//! The slow paths of the class caches: a cached block that must pass a check before it serves
//! (zeroing on reuse, whether the OS purged it), and the miss.
#![forbid(unsafe_code)]

use std::time::Instant;

use super::device::DevicePool;
use super::{Allocation, PoolManager, Record, Route};
use crate::backend::Block;
use crate::error::PoolError;
use crate::kind::{MemoryKind, StreamId};
use crate::pools::class_cache::shards_in_use;
use crate::pools::pending::Pending;
use crate::pools::record::{BlockRecord, IdleBlock};
use crate::pools::vm_arena;
use crate::pools::{Pool, Request};

impl PoolManager {
    /// The class path when cached blocks must pass checks before they serve: the hit is
    /// counted only after them.
    #[cold]
    #[inline(never)]
    pub(super) fn allocate_checked(
        &self,
        pool: &DevicePool,
        index: u32,
        request: &Request,
        kind: MemoryKind,
    ) -> Result<Allocation, PoolError> {
        match Pool::take(&pool.caches[index as usize], request) {
            Some(record) => self.check_hit(pool, index, request, record, kind),
            None => self.allocate_miss(pool, index, request, kind),
        }
    }

    /// A cached block taken without counting its hit: it serves once it passed its checks,
    /// and goes back (or to the backend) like any returned block if it did not.
    #[cold]
    #[inline(never)]
    fn check_hit(
        &self,
        pool: &DevicePool,
        index: u32,
        request: &Request,
        record: Box<Record>,
        kind: MemoryKind,
    ) -> Result<Allocation, PoolError> {
        let cache = &pool.caches[index as usize];
        let purged = pool
            .backend()
            .purgeable()
            .is_some_and(|purgeable| !purgeable.reclaim(&record.block));
        if purged {
            tracing::debug!(index, "cached block was purged by the OS; releasing it");
            cache.record_release_in_use(request.shard, request.requested_bytes, record.carved);
            let idle = IdleBlock::new(record, Pending::on(request.stream), 0);
            // The caller holds a handle, so this is never the pool's last reference.
            drop(self.release_uncached(pool, idle));
            return self.allocate_miss(pool, index, request, kind);
        }
        let zeroed =
            self.zero_if_asked(pool, &record.block, request.requested_bytes, request.stream);
        if let Err(error) = zeroed {
            // The zeroing may be queued on the stream: the block now follows that stream's order.
            let pending = Pending::on(request.stream);
            drop(self.give_back_to_class(pool, index, record, pending, request.requested_bytes));
            return Err(error);
        }
        Pool::record_served(cache, request, true);
        Ok(Allocation {
            record,
            route: Route::class(index),
        })
    }

    /// Zeroes a block about to be handed out, when `zero_on_reuse` is set.
    pub(super) fn zero_if_asked(
        &self,
        pool: &DevicePool,
        block: &Block,
        requested_bytes: usize,
        stream: StreamId,
    ) -> Result<(), PoolError> {
        if !self.config.zero_on_reuse {
            return Ok(());
        }
        pool.backend().zero_block(block, stream).map_err(|error| {
            PoolError::from_backend(
                pool.backend().name(),
                error,
                requested_bytes,
                pool.reserved_now(),
                None,
            )
        })
    }

    /// No usable block in this thread's shard: another shard's, else a new block.
    #[cold]
    #[inline(never)]
    pub(super) fn allocate_miss(
        &self,
        pool: &DevicePool,
        index: u32,
        request: &Request,
        kind: MemoryKind,
    ) -> Result<Allocation, PoolError> {
        let start = Instant::now();
        pool.upstream.reap(false);
        let cache = &pool.caches[index as usize];
        let (shard, stream, requested_bytes) =
            (request.shard, request.stream, request.requested_bytes);
        if let Some((idle, counted_in)) = cache.steal(
            shard,
            shards_in_use(),
            stream,
            requested_bytes,
            request.served,
        ) {
            if !request.served {
                let request = Request {
                    shard: counted_in,
                    ..*request
                };
                return self.check_hit(pool, index, &request, idle.record, kind);
            }
            return Ok(Allocation {
                record: idle.record,
                route: Route::class(index),
            });
        }
        self.fence_foreign_blocks(pool, index, stream);
        let record = self.new_class_block(pool, index, request, kind)?;
        let carved = record.carved;
        // Drivers do not promise zeroed fresh memory, and it may be memory this pool freed.
        if let Err(error) = self.zero_if_asked(pool, &record.block, requested_bytes, stream) {
            cache.record_unused_allocation(shard, carved);
            // The zeroing may be queued on the stream: the block follows that stream's order.
            let idle = IdleBlock::new(record, Pending::on(stream), 0);
            self.release_blocks(pool, vec![idle]);
            return Err(error);
        }
        cache.record_miss(shard, requested_bytes, carved);
        cache.miss_latency.record(start.elapsed().as_nanos() as u64);
        tracing::debug!(
            class_bytes = cache.class_bytes(),
            requested_bytes,
            "pool miss: allocated from the backend"
        );
        Ok(Allocation {
            record,
            route: Route::class(index),
        })
    }

    /// A new block for class `index`: device memory on a backend with virtual memory is
    /// carved out of the arena's mapped pages (best fit; a driver call only when it needs a new
    /// page), so small blocks share pages instead of each costing a driver allocation, and
    /// go back into the arena's free space when their class lets them go. Otherwise, or when no
    /// page can be mapped any more, a backend allocation.
    fn new_class_block(
        &self,
        pool: &DevicePool,
        index: u32,
        request: &Request,
        kind: MemoryKind,
    ) -> Result<Box<Record>, PoolError> {
        let class_bytes = pool.caches[index as usize].class_bytes();
        let slot = index as usize % pool.kinds.len();
        let arena = pool.carving_arena().filter(|_| {
            self.config.carve_class_blocks
                && slot == pool.virtual_slot
                && vm_arena::serves(request.stream)
        });
        if let Some(arena) = arena {
            let carve = Request {
                block_bytes: class_bytes,
                served: false,
                ..*request
            };
            match self.place_in_arena(pool, arena, &carve, true) {
                Ok((record, _)) => return Ok(record),
                // No page fits any more, but a driver allocation of the block alone may
                // (the device's last bytes): fall through to it.
                Err(PoolError::OutOfMemory { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        let block = self.allocate_from_backend(pool, class_bytes, request.requested_bytes, kind)?;
        Ok(BlockRecord::boxed(block, self.this.upgrade()))
    }

    /// Blocks idle on other streams become usable on this one once a fence recorded on their
    /// stream completes; record those fences now so later requests can reuse them.
    fn fence_foreign_blocks(&self, pool: &DevicePool, index: u32, stream: StreamId) {
        let backend = pool.backend();
        pool.caches[index as usize].fence_foreign_blocks(stream, shards_in_use(), |owner| {
            backend
                .fence_after(owner)
                .inspect_err(|error| tracing::warn!(?error, "could not record a stream fence"))
                .ok()
        });
    }
}
