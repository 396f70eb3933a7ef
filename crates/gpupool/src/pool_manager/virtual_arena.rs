//! The virtual-memory arena's paths through the router: requests above the class range on a
//! backend with virtual memory, their returns, and the pages it maps and unmaps. The arena
//! decides placement (`pools::vm_arena`); the router does the backend calls, each page counted
//! against the budget like any allocation.
#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;

use super::device::DevicePool;
use super::{Allocation, Owner, PoolManager, Record, Route};
use crate::backend::PoolAccess;
use crate::error::{BackendError, PoolError};
use crate::kind::StreamId;
use crate::pools::pending::Pending;
use crate::pools::vm_arena::{Placed, VmArena, VM_ROUNDING};
use crate::pools::{Pool, Request, Returned};

/// Why a mapping was not made.
enum MapRefusal {
    /// The backend (or the budget, as `TooLarge`) refused it.
    Backend(BackendError),
    /// It would have taken the device this many bytes past its peak while class caches may
    /// hold idle blocks.
    PastPeak { excess_bytes: u64 },
}

impl MapRefusal {
    /// The refusal of an attempt made without the peak guard.
    fn into_backend(self) -> BackendError {
        match self {
            MapRefusal::Backend(error) => error,
            // Only guarded attempts refuse at the peak; were one not, it would read as full.
            MapRefusal::PastPeak { .. } => BackendError::OutOfMemory,
        }
    }
}

impl PoolManager {
    /// A block of the arena by best fit, mapping the pages it lands on; after out of memory or
    /// the budget, the pools give back what they can and the request is tried once more.
    #[cold]
    #[inline(never)]
    pub(super) fn allocate_virtual(
        &self,
        pool: &DevicePool,
        requested_bytes: usize,
        stream: StreamId,
    ) -> Result<Allocation, PoolError> {
        let arena = pool
            .virtual_arena
            .as_ref()
            .expect("routed here only with an arena");
        let too_large = || PoolError::TooLarge {
            requested_bytes: requested_bytes as u64,
            limit_bytes: arena.lock().counters().address_space_bytes,
        };
        let block_bytes = requested_bytes
            .checked_next_multiple_of(VM_ROUNDING)
            .ok_or_else(too_large)?;
        let request = Request {
            requested_bytes,
            block_bytes,
            stream,
            shard: 0,
            // With zeroing, the request is counted once the block is zeroed.
            served: !self.config.zero_on_reuse,
        };
        let (record, hit) = self.place_in_arena(pool, arena, &request, false)?;
        if !request.served {
            if let Err(error) = self.zero_if_asked(pool, &record.block, requested_bytes, stream) {
                // Back like any returned block; the caller holds a handle, so the reference
                // given back is never the pool's last.
                drop(self.give_back_virtual(pool, record, Pending::on(stream), requested_bytes));
                return Err(error);
            }
            Pool::record_served(arena, &request, hit);
        }
        Ok(Allocation {
            record,
            route: Route::VIRTUAL,
        })
    }

    /// A block of `request.block_bytes` placed in the arena (`for_class`: lent to a class
    /// cache), with the out-of-memory and budget retry: after a refusal the pools give back
    /// what they can and the placement is tried once more.
    pub(super) fn place_in_arena(
        &self,
        pool: &DevicePool,
        arena: &VmArena<Owner>,
        request: &Request,
        for_class: bool,
    ) -> Result<Placed<Owner>, PoolError> {
        let (requested_bytes, block_bytes) = (request.requested_bytes, request.block_bytes);
        if let Some(capacity) = pool
            .capacity_bytes
            .filter(|&total| block_bytes as u64 > total)
        {
            // Larger than the device: no release could make it fit.
            return Err(PoolError::TooLarge {
                requested_bytes: requested_bytes as u64,
                limit_bytes: capacity,
            });
        }
        let mut taken = self.take_mapping_below_peak(pool, arena, request, for_class);
        if matches!(
            taken,
            Ok(None) | Err(BackendError::OutOfMemory) | Err(BackendError::TooLarge { .. })
        ) {
            pool.alloc_retries.fetch_add(1, Ordering::Relaxed);
            let released = self.release_everything(pool);
            tracing::info!(
                requested_bytes,
                released_bytes = released.bytes,
                "virtual-memory arena out of memory: released idle memory, retrying once"
            );
            taken = self
                .take_mapping(pool, arena, request, for_class, false)
                .map_err(MapRefusal::into_backend);
        }
        match taken {
            Ok(Some(taken)) => Ok(taken),
            // No free range of the address space fits even after the release: larger than the
            // device, or the space is too fragmented now.
            Ok(None) => {
                let device = pool.backend().memory_info();
                Err(match device {
                    Some(info) if block_bytes as u64 > info.total_bytes => PoolError::TooLarge {
                        requested_bytes: requested_bytes as u64,
                        limit_bytes: info.total_bytes,
                    },
                    _ => PoolError::OutOfMemory {
                        requested_bytes: block_bytes as u64,
                        reserved_bytes: pool.reserved_now(),
                        device_free_bytes: device.map(|info| info.free_bytes),
                    },
                })
            }
            Err(BackendError::TooLarge { .. }) => Err(PoolError::BudgetExceeded {
                requested_bytes: block_bytes as u64,
                reserved_bytes: pool.reserved_now(),
                budget_bytes: pool.upstream.budget.limit(),
            }),
            Err(error) => Err(self.allocation_error(pool, error, block_bytes)),
        }
    }

    /// One attempt that will not map past the device's peak while class caches hold idle
    /// blocks: when it would, those go back to the arena first (see `peak_guard`) and the
    /// placement is tried again, mapping what it still needs.
    fn take_mapping_below_peak(
        &self,
        pool: &DevicePool,
        arena: &VmArena<Owner>,
        request: &Request,
        for_class: bool,
    ) -> Result<Option<Placed<Owner>>, BackendError> {
        // Idle class blocks given back to an arena of their own free no memory for large blocks.
        let guard = self.guards_peak() && (for_class || pool.class_arena.is_none());
        match self.take_mapping(pool, arena, request, for_class, guard) {
            Err(MapRefusal::PastPeak { excess_bytes }) => {
                self.release_idle_before_peak(pool, excess_bytes);
                self.take_mapping(pool, arena, request, for_class, false)
                    .map_err(MapRefusal::into_backend)
            }
            other => other.map_err(MapRefusal::into_backend),
        }
    }

    /// One attempt: best fit, each new page committed to the budget and mapped. A page the
    /// budget refuses reads as `TooLarge` (no driver call was made). With `guard_peak`, a page
    /// that would take the device past its peak is refused instead (`PastPeak`).
    fn take_mapping(
        &self,
        pool: &DevicePool,
        arena: &VmArena<Owner>,
        request: &Request,
        for_class: bool,
        guard_peak: bool,
    ) -> Result<Option<Placed<Owner>>, MapRefusal> {
        let memory = pool
            .backend()
            .virtual_memory()
            .expect("the arena exists only over virtual memory");
        let budget = &pool.upstream.budget;
        let backend = pool.backend();
        let fence_after = |stream| {
            backend
                .fence_after(stream)
                .inspect_err(|error| tracing::warn!(?error, "no fence to retire free space"))
                .ok()
        };
        let map = |address, bytes: usize| {
            if guard_peak {
                let excess = (budget.held() + bytes as u64).saturating_sub(budget.peak());
                if excess > 0 {
                    return Err(MapRefusal::PastPeak {
                        excess_bytes: excess,
                    });
                }
            }
            if !budget.try_reserve(bytes as u64) {
                return Err(MapRefusal::Backend(BackendError::TooLarge {
                    limit: budget.limit(),
                }));
            }
            match memory.map(address, bytes, &PoolAccess::new()) {
                Ok(()) => {
                    budget.allocated(bytes as u64);
                    Ok(())
                }
                Err(error) => {
                    budget.unreserve(bytes as u64);
                    Err(MapRefusal::Backend(error))
                }
            }
        };
        let unmap = |address, bytes: usize| {
            memory.unmap(address, bytes, &PoolAccess::new());
            budget.released(bytes as u64);
        };
        arena.take_or_map(
            request,
            for_class,
            self.this.upgrade(),
            fence_after,
            map,
            unmap,
        )
    }

    /// Maps the pages for `count` blocks of `bytes` on `stream` (one range, taken and given
    /// back: the pages stay mapped and the space free on the stream). Counts no request.
    pub(super) fn prewarm_virtual(
        &self,
        pool: &DevicePool,
        bytes: usize,
        count: usize,
        stream: StreamId,
    ) -> Result<usize, PoolError> {
        let arena = pool
            .virtual_arena
            .as_ref()
            .expect("routed here only with an arena");
        let total = bytes
            .checked_next_multiple_of(VM_ROUNDING)
            .and_then(|block| block.checked_mul(count))
            .ok_or(PoolError::TooLarge {
                requested_bytes: (bytes as u64).saturating_mul(count as u64),
                limit_bytes: usize::MAX as u64,
            })?;
        let request = Request {
            requested_bytes: total,
            block_bytes: total,
            stream,
            shard: 0,
            served: false,
        };
        let taken = self
            .take_mapping(pool, arena, &request, false, false)
            .map_err(MapRefusal::into_backend);
        let (record, _) = match taken {
            Ok(Some(taken)) => taken,
            Ok(None) => {
                return Err(PoolError::TooLarge {
                    requested_bytes: total as u64,
                    limit_bytes: arena.lock().counters().address_space_bytes,
                })
            }
            Err(BackendError::TooLarge { .. }) => {
                return Err(PoolError::BudgetExceeded {
                    requested_bytes: total as u64,
                    reserved_bytes: pool.reserved_now(),
                    budget_bytes: pool.upstream.budget.limit(),
                })
            }
            Err(error) => return Err(self.allocation_error(pool, error, total)),
        };
        // No work ever touched it: any order of reuse on `stream` is fine.
        drop(self.give_back_virtual(pool, record, Pending::on(stream), total));
        Ok(count)
    }

    #[cold]
    pub(super) fn give_back_virtual(
        &self,
        pool: &DevicePool,
        mut record: Box<Record>,
        pending: Pending,
        requested_bytes: usize,
    ) -> Option<Owner> {
        let owner = record.owner.take();
        let arena = pool.virtual_arena.as_ref().expect("a block of the arena");
        let returned = Returned {
            record,
            pending,
            requested_bytes,
            shard: 0,
            epoch: self.epoch.load(Ordering::Relaxed),
        };
        let kept = Pool::give_back(arena, returned, &self.pooling);
        debug_assert!(kept.is_none(), "the arena keeps every block");
        if !self.pooling.load(Ordering::Relaxed) {
            self.unmap_free_pages(pool, false);
        }
        owner
    }

    /// Unmaps the arena's handles no block uses once the work that used them is done. With
    /// `wait`, waits for all work first, so every handle freed before the wait goes. Returns
    /// the bytes unmapped.
    pub(super) fn unmap_free_pages(&self, pool: &DevicePool, wait: bool) -> u64 {
        let arenas: Vec<&VmArena<Owner>> = pool.arenas().collect();
        if arenas.is_empty() {
            return 0;
        }
        let backend = pool.backend();
        let waited = if wait {
            let before: Vec<u64> = arenas.iter().map(|arena| arena.free_count()).collect();
            match backend.wait_for_all() {
                Ok(()) => Some(before),
                Err(error) => {
                    tracing::warn!(?error, "waiting before unmapping failed; fences instead");
                    None
                }
            }
        } else {
            None
        };
        let memory = backend
            .virtual_memory()
            .expect("the arena exists only over it");
        let budget = &pool.upstream.budget;
        let mut unmapped = 0;
        for (index, arena) in arenas.iter().enumerate() {
            unmapped += arena.unmap_free_handles(
                waited.as_ref().map(|before| before[index]),
                |stream| {
                    backend
                        .fence_after(stream)
                        .inspect_err(|error| tracing::warn!(?error, "no fence for an unmap"))
                        .ok()
                },
                |address, bytes| {
                    memory.unmap(address, bytes, &PoolAccess::new());
                    budget.released(bytes as u64);
                },
            );
        }
        unmapped
    }
}
