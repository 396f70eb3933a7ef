//! The large arena's and the bypass's paths through the router: requests above the class
//! range (or with pooling off), and their returns.
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;

use super::device::DevicePool;
use super::{Allocation, Owner, PoolManager, Record, Route};
use crate::error::PoolError;
use crate::kind::{MemoryKind, StreamId};
use crate::pools::large_arena;
use crate::pools::pending::Pending;
use crate::pools::record::BlockRecord;
use crate::pools::{Pool, Request, Returned};
use crate::size_class::BLOCK_ALIGN;

impl PoolManager {
    /// A request for the large-block arena: a best fit from its free blocks, else a new segment.
    #[cold]
    #[inline(never)]
    pub(super) fn allocate_large(
        &self,
        pool: &DevicePool,
        slot: u32,
        requested_bytes: usize,
        kind: MemoryKind,
        stream: StreamId,
    ) -> Result<Allocation, PoolError> {
        let too_large = || PoolError::TooLarge {
            requested_bytes: requested_bytes as u64,
            limit_bytes: (usize::MAX - large_arena::LARGE_ROUNDING + 1) as u64,
        };
        let bytes = large_arena::block_bytes_for(requested_bytes).ok_or_else(too_large)?;
        let large = &pool.large[slot as usize];
        let request = Request {
            requested_bytes,
            block_bytes: bytes,
            stream,
            shard: 0,
            // With zeroing, the request is counted once the block is zeroed.
            served: !self.config.zero_on_reuse,
        };
        let served = request.served;
        let (record, hit) = match Pool::take(large, &request) {
            Some(mut record) => {
                record.owner = self.this.upgrade();
                (record, true)
            }
            None => {
                // No free block of this stream fits: give back enough of its entirely free
                // segments (all too small for this request) to make room for the new one.
                // Other streams' segments stay: they are not stranded for their stream.
                let segment_bytes = large_arena::segment_bytes_for(bytes).ok_or_else(too_large)?;
                let stranded = large.remove_stranded(stream, segment_bytes);
                if !stranded.is_empty() {
                    pool.upstream.release(stranded);
                }
                pool.upstream.reap(false);
                let segment =
                    match self.allocate_from_backend(pool, segment_bytes, requested_bytes, kind) {
                        Ok(segment) => segment,
                        // A shared 20 MiB segment did not fit: try one of just this block.
                        Err(PoolError::OutOfMemory { .. } | PoolError::BudgetExceeded { .. })
                            if segment_bytes > bytes =>
                        {
                            self.allocate_from_backend(pool, bytes, requested_bytes, kind)?
                        }
                        Err(error) => return Err(error),
                    };
                let owner = self.this.upgrade();
                let record =
                    large.add_segment(segment, bytes, requested_bytes, stream, owner, served);
                (record, false)
            }
        };
        if served {
            return Ok(Allocation {
                record,
                route: Route::large(slot),
            });
        }
        if let Err(error) = self.zero_if_asked(pool, &record.block, requested_bytes, stream) {
            // Back like any returned block; the caller holds a handle, so the reference
            // given back is never the pool's last.
            drop(self.give_back_large(pool, slot, record, Pending::on(stream), requested_bytes));
            return Err(error);
        }
        Pool::record_served(large, &request, hit);
        Ok(Allocation {
            record,
            route: Route::large(slot),
        })
    }

    #[cold]
    pub(super) fn give_back_large(
        &self,
        pool: &DevicePool,
        slot: u32,
        mut record: Box<Record>,
        pending: Pending,
        requested_bytes: usize,
    ) -> Option<Owner> {
        let owner = record.owner.take();
        let large = &pool.large[slot as usize];
        let returned = Returned {
            record,
            pending,
            requested_bytes,
            shard: 0,
            epoch: self.epoch.load(Ordering::Relaxed),
        };
        let kept = Pool::give_back(large, returned, &self.pooling);
        debug_assert!(kept.is_none(), "the arena keeps every block");
        if !self.pooling.load(Ordering::Relaxed) {
            // Pooling off: a segment this drop left entirely free goes back now.
            pool.upstream.release(large.remove_free_segments(None));
        }
        owner
    }

    #[cold]
    pub(super) fn allocate_bypass(
        &self,
        pool: &DevicePool,
        requested_bytes: usize,
        kind: MemoryKind,
    ) -> Result<Allocation, PoolError> {
        let block_bytes = requested_bytes
            .checked_next_multiple_of(BLOCK_ALIGN)
            .ok_or(PoolError::TooLarge {
                requested_bytes: requested_bytes as u64,
                limit_bytes: (usize::MAX - BLOCK_ALIGN + 1) as u64,
            })?;
        let block = self.allocate_from_backend(pool, block_bytes, requested_bytes, kind)?;
        pool.bypass.served(block.bytes(), requested_bytes);
        Ok(Allocation {
            record: BlockRecord::boxed(block, self.this.upgrade()),
            route: Route::BYPASS,
        })
    }

    #[cold]
    pub(super) fn give_back_bypass(
        &self,
        pool: &DevicePool,
        mut record: Box<Record>,
        pending: Pending,
        requested_bytes: usize,
    ) -> Option<Owner> {
        let owner = record.owner.take();
        let returned = Returned {
            record,
            pending,
            requested_bytes,
            shard: 0,
            epoch: 0,
        };
        let released = Pool::give_back(&pool.bypass, returned, &self.pooling);
        pool.upstream.release(released.into_iter().collect());
        owner
    }
}
