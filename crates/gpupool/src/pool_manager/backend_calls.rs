//! Backend allocations as the router makes them: within the budget, with one retry after
//! emptying the pools when the budget or the device is exhausted (only the router can empty
//! the pools, so this policy lives here rather than in the upstream adaptor).
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;

use super::device::DevicePool;
use super::PoolManager;
use crate::backend::Block;
use crate::error::{BackendError, PoolError};
use crate::kind::MemoryKind;

impl PoolManager {
    /// A backend allocation within the budget, with one retry after releasing idle blocks
    /// when the budget or the device is exhausted.
    pub(super) fn allocate_from_backend(
        &self,
        pool: &DevicePool,
        block_bytes: usize,
        requested_bytes: usize,
        kind: MemoryKind,
    ) -> Result<Block, PoolError> {
        self.reserve(pool, block_bytes)?;
        let outcome = match pool.upstream.allocate(block_bytes, kind) {
            Err(BackendError::OutOfMemory) => {
                pool.alloc_retries.fetch_add(1, Ordering::Relaxed);
                let released = self.release_everything(pool);
                tracing::info!(
                    block_bytes,
                    released_blocks = released.blocks,
                    released_bytes = released.bytes,
                    "device out of memory: released idle blocks, retrying once"
                );
                pool.upstream.allocate(block_bytes, kind)
            }
            other => other,
        };
        outcome.map_err(|error| {
            pool.upstream.budget.unreserve(block_bytes as u64);
            let error = self.allocation_error(pool, error, block_bytes.max(requested_bytes));
            tracing::warn!(%error, "allocation failed");
            error
        })
    }

    /// The user-facing error of a failed backend allocation of `bytes`, with the numbers.
    pub(super) fn allocation_error(
        &self,
        pool: &DevicePool,
        error: BackendError,
        bytes: usize,
    ) -> PoolError {
        let device_free = pool.backend().memory_info().map(|info| info.free_bytes);
        PoolError::from_backend(
            pool.backend().name(),
            error,
            bytes,
            pool.reserved_now(),
            device_free,
        )
    }

    /// Commits `bytes` to the budget; on refusal, releases idle blocks and tries once more.
    fn reserve(&self, pool: &DevicePool, bytes: usize) -> Result<(), PoolError> {
        let bytes = bytes as u64;
        let budget = &pool.upstream.budget;
        if budget.try_reserve(bytes) {
            return Ok(());
        }
        // Above the whole budget: no release could make it fit, so the caches stay.
        if bytes <= budget.limit() {
            pool.alloc_retries.fetch_add(1, Ordering::Relaxed);
            let released = self.release_everything(pool);
            tracing::info!(
                bytes,
                released_blocks = released.blocks,
                "budget reached: released idle blocks, retrying once"
            );
            if budget.try_reserve(bytes) {
                return Ok(());
            }
        }
        Err(PoolError::BudgetExceeded {
            requested_bytes: bytes,
            reserved_bytes: pool.reserved_now(),
            budget_bytes: budget.limit(),
        })
    }
}
