//! The layer between the front door and the caches: routes each request to a size class and
//! kind on its device (or, above `large_threshold_bytes`, to the large arena), and owns
//! everything that crosses classes: the budget, out-of-memory recovery, and (in `upkeep`)
//! deferred releases, prewarming, trims, defragmentation and maintenance ticks, and (in
//! `snapshot`) the statistics.
//!
//! The hit path is `allocate` → `ClassCache::take` and `give_back` → `ClassCache::give_back`:
//! one shard lock each way, no driver call, no clock, no global lock, no reference count.
//! Everything else (misses, the arena, bypasses, releases) is out of line.
//!
//! Budget accounting uses one atomic per device, `committed_bytes`, that is raised *before* a
//! backend allocation by compare-and-swap, so concurrent misses can never take the pool over
//! its budget. Reported `reserved` bytes are instead derived from the shard counters, so that
//! a snapshot is exactly consistent; the two differ only by allocations in flight.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crossbeam_utils::CachePadded;
use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError, Block, MemoryKind, StreamId};
use crate::class_cache::{BlockRecord, ClassCache, GiveBack, IdleBlock};
use crate::config::PoolConfig;
use crate::error::PoolError;
use crate::fence::{CompletedFence, Pending};
use crate::large_pool::{self, LargePool};
use crate::latency;
use crate::size_class::BLOCK_ALIGN;
mod snapshot;
mod upkeep;

/// The cache index that marks a bypass block.
pub(crate) const BYPASS: u32 = u32::MAX;
/// Cache indices from here (plus the kind slot) mark blocks of the large pool.
pub(crate) const LARGE_BASE: u32 = u32::MAX - 8;

/// How much a trim gives back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrimLevel {
    /// Keep the configured minimum of idle blocks per class (the seed's 4).
    Normal,
    /// Release every idle block.
    Aggressive,
}

/// What a trim, clear or defragmentation released.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseReport {
    /// Blocks given back to the backend.
    pub blocks: u64,
    /// Their bytes.
    pub bytes: u64,
}

impl ReleaseReport {
    fn add(&mut self, other: ReleaseReport) {
        self.blocks += other.blocks;
        self.bytes += other.bytes;
    }
}

/// A block handed to a new owner.
pub(crate) struct Allocation {
    pub record: Box<BlockRecord>,
    pub cache: u32,
}

#[derive(Clone, Copy, Default)]
struct BypassCounters {
    requests: u64,
    backend_allocations: u64,
    backend_releases: u64,
    in_use_blocks: u64,
    in_use_bytes: u64,
    requested_live_bytes: u64,
}

/// The caches and accounting of one device.
struct DevicePool {
    backend: Arc<dyn Backend>,
    kinds: Vec<MemoryKind>,
    /// Index `class * kinds.len() + kind slot`.
    caches: Box<[ClassCache]>,
    /// The backend's `purgeable_idle_blocks`, read once.
    purgeable: bool,
    /// One large-block arena per kind slot.
    large: Box<[LargePool]>,
    /// Requests above this many bytes go to `large` (`usize::MAX`: never).
    large_threshold: usize,
    bypass: Mutex<BypassCounters>,
    committed_bytes: CachePadded<AtomicU64>,
    /// Bytes the backend really handed over and the pool has not released yet: what
    /// `peak_reserved_bytes` follows. (`committed_bytes` also counts allocations in flight,
    /// and a refused one must not leave a peak behind.)
    held_bytes: AtomicU64,
    peak_reserved_bytes: AtomicU64,
    failed_requests: AtomicU64,
    /// Requests per cache at the previous `defragment`.
    defragment_marks: Mutex<Vec<u64>>,
    /// Blocks out of every cache whose GPU work had not finished when they were released:
    /// each waits for a fence recorded on its stream, so no drop blocks on the GPU.
    deferred: Mutex<Vec<IdleBlock>>,
    /// `deferred.len()`, readable without the lock.
    deferred_count: AtomicUsize,
}

impl DevicePool {
    #[inline(always)]
    fn kind_slot(&self, kind: Option<MemoryKind>) -> Result<(MemoryKind, usize), PoolError> {
        match kind {
            None => Ok((self.kinds[0], 0)),
            Some(kind) => self
                .kinds
                .iter()
                .position(|&offered| offered == kind)
                .map(|slot| (kind, slot))
                .ok_or_else(|| PoolError::UnsupportedKind {
                    kind,
                    backend: self.backend.name().to_string(),
                }),
        }
    }

    fn reserved_now(&self) -> u64 {
        self.committed_bytes.load(Ordering::Relaxed)
    }
}

/// Routes requests to classes on each device; see the module documentation.
pub struct PoolManager {
    config: PoolConfig,
    devices: Box<[DevicePool]>,
    pooling: AtomicBool,
    /// Advanced by each maintenance tick; cached blocks remember the epoch they went idle in.
    epoch: AtomicU64,
    /// This pool, for the records of blocks it allocates (see `BlockRecord::owner`).
    this: std::sync::Weak<PoolManager>,
}

thread_local! {
    /// This thread's shard number (assigned round-robin on first use, so threads spread over
    /// the shards of every class) and its countdown to the next timed hit; one thread-local
    /// so the hit path looks it up once.
    static THREAD_STATE: (Cell<usize>, Cell<u32>) = const { (Cell::new(usize::MAX), Cell::new(0)) };
}

#[inline(always)]
fn shard_of(state: &Cell<usize>) -> usize {
    static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);
    let current = state.get();
    if current != usize::MAX {
        return current;
    }
    let assigned = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
    state.set(assigned);
    assigned
}

/// Records a sampled hit's time, out of line so the hit path's code stays compact.
#[cold]
#[inline(never)]
fn record_hit_latency(cache: &ClassCache, start: Instant) {
    cache.hit_latency.record(start.elapsed().as_nanos() as u64);
}

/// This thread's shard number.
#[inline(always)]
pub(crate) fn thread_shard() -> usize {
    THREAD_STATE.with(|(shard, _)| shard_of(shard))
}

/// This thread's shard number, and whether to time this request.
#[inline(always)]
fn thread_shard_and_sample() -> (usize, bool) {
    THREAD_STATE
        .with(|(shard, countdown)| (shard_of(shard), latency::countdown_to_sample(countdown)))
}

impl PoolManager {
    pub(crate) fn new(
        backends: Vec<Arc<dyn Backend>>,
        config: PoolConfig,
    ) -> Result<Arc<PoolManager>, PoolError> {
        if backends.is_empty() {
            return Err(PoolError::InvalidConfig("no device to pool".into()));
        }
        let shards = config.shards.next_power_of_two();
        let mut devices = Vec::with_capacity(backends.len());
        for backend in backends {
            let kinds = backend.kinds().to_vec();
            if kinds.is_empty() {
                return Err(PoolError::InvalidConfig(format!(
                    "backend {} offers no memory kind",
                    backend.name()
                )));
            }
            let caches: Box<[ClassCache]> = config
                .classes
                .sizes()
                .iter()
                .flat_map(|&class_bytes| {
                    let cap = config.idle_cap(class_bytes);
                    kinds
                        .iter()
                        .map(move |_| ClassCache::new(class_bytes, cap, shards))
                })
                .collect();
            let marks = vec![0; caches.len()];
            let purgeable = backend.purgeable_idle_blocks();
            // Purgeable state belongs to a whole backend buffer (Metal), so blocks carved out of
            // one segment cannot be purged one by one: such backends keep large requests in
            // the classes.
            let large_threshold = match config.large_threshold_bytes {
                Some(threshold) if !purgeable => threshold,
                _ => usize::MAX,
            };
            devices.push(DevicePool {
                purgeable,
                large: kinds.iter().map(|_| LargePool::default()).collect(),
                large_threshold,
                backend,
                kinds,
                caches,
                bypass: Mutex::new(BypassCounters::default()),
                committed_bytes: CachePadded::new(AtomicU64::new(0)),
                held_bytes: AtomicU64::new(0),
                peak_reserved_bytes: AtomicU64::new(0),
                failed_requests: AtomicU64::new(0),
                defragment_marks: Mutex::new(marks),
                deferred: Mutex::new(Vec::new()),
                deferred_count: AtomicUsize::new(0),
            });
        }
        Ok(Arc::new_cyclic(|this| PoolManager {
            pooling: AtomicBool::new(config.pooling),
            config,
            devices: devices.into_boxed_slice(),
            epoch: AtomicU64::new(0),
            this: this.clone(),
        }))
    }

    pub(crate) fn config(&self) -> &PoolConfig {
        &self.config
    }

    pub(crate) fn device_count(&self) -> usize {
        self.devices.len()
    }

    pub(crate) fn backend(&self, device: usize) -> &Arc<dyn Backend> {
        &self.devices[device].backend
    }

    pub(crate) fn set_pooling(&self, enabled: bool) {
        self.pooling.store(enabled, Ordering::Relaxed);
        if !enabled {
            self.trim(TrimLevel::Aggressive);
        }
    }

    pub(crate) fn pooling(&self) -> bool {
        self.pooling.load(Ordering::Relaxed)
    }

    #[inline(always)]
    fn device(&self, device: usize) -> Result<&DevicePool, PoolError> {
        self.devices.get(device).ok_or(PoolError::NoSuchDevice {
            device,
            devices: self.devices.len(),
        })
    }

    /// Serves one request of `bytes` bytes.
    #[inline(always)]
    pub(crate) fn allocate(
        &self,
        device: usize,
        bytes: usize,
        kind: Option<MemoryKind>,
        stream: StreamId,
    ) -> Result<Allocation, PoolError> {
        if bytes == 0 {
            return Err(PoolError::ZeroSize);
        }
        let pool = self.device(device)?;
        let (kind, slot) = pool.kind_slot(kind)?;
        let pooling = self.pooling.load(Ordering::Relaxed);
        if pooling && bytes > pool.large_threshold {
            let result = self.allocate_large(pool, slot, bytes, kind, stream);
            if result.is_err() {
                pool.failed_requests.fetch_add(1, Ordering::Relaxed);
            }
            return result;
        }
        let class = if pooling {
            self.config.classes.class_for(bytes)
        } else {
            None
        };
        let result = match class {
            Some(class) => {
                let index = class * pool.kinds.len() + slot;
                let (shard, sampled) = thread_shard_and_sample();
                let sample_start = sampled.then(Instant::now);
                match pool.caches[index].take(shard, stream, bytes) {
                    Some(idle) if !pool.purgeable || pool.backend.reclaim(&idle.block) => {
                        if let Some(start) = sample_start {
                            record_hit_latency(&pool.caches[index], start);
                        }
                        self.hand_out(pool, idle, index, shard, bytes, stream)
                    }
                    Some(purged) => {
                        self.drop_purged(pool, index, shard, purged, bytes);
                        self.allocate_miss(pool, index, shard, bytes, kind, stream)
                    }
                    None => self.allocate_miss(pool, index, shard, bytes, kind, stream),
                }
            }
            None => self.allocate_bypass(pool, bytes, kind),
        };
        if result.is_err() {
            pool.failed_requests.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    #[inline(always)]
    fn hand_out(
        &self,
        pool: &DevicePool,
        idle: IdleBlock,
        index: usize,
        counted_in: usize,
        requested_bytes: usize,
        stream: StreamId,
    ) -> Result<Allocation, PoolError> {
        if let Err(error) = self.zero_if_asked(pool, &idle.block, requested_bytes, stream) {
            self.return_unserved(pool, index, counted_in, idle, requested_bytes);
            return Err(error);
        }
        Ok(Allocation {
            record: idle.record,
            cache: index as u32,
        })
    }

    /// Puts a block back whose request failed after it was taken; releases it if its shard
    /// has no room left.
    #[cold]
    fn return_unserved(
        &self,
        pool: &DevicePool,
        index: usize,
        shard: usize,
        idle: IdleBlock,
        requested_bytes: usize,
    ) {
        if let GiveBack::Release(mut idle) =
            pool.caches[index].return_unserved(shard, idle, requested_bytes)
        {
            // The caller holds a handle, so this is never the pool's last reference.
            drop(idle.owner.take());
            self.release_blocks(pool, vec![idle]);
        }
    }

    /// A cached block whose contents the OS discarded: undo the hit, release it, and let the
    /// request go on as a miss.
    #[cold]
    fn drop_purged(
        &self,
        pool: &DevicePool,
        index: usize,
        shard: usize,
        purged: IdleBlock,
        requested_bytes: usize,
    ) {
        pool.caches[index].undo_hit_for_release(shard, requested_bytes);
        tracing::debug!(index, "cached block was purged by the OS; releasing it");
        self.release_blocks(pool, vec![purged]);
    }

    /// Zeroes a block about to be handed out, when `zero_on_reuse` is set.
    fn zero_if_asked(
        &self,
        pool: &DevicePool,
        block: &Block,
        requested_bytes: usize,
        stream: StreamId,
    ) -> Result<(), PoolError> {
        if !self.config.zero_on_reuse {
            return Ok(());
        }
        pool.backend.zero(block, stream).map_err(|error| {
            PoolError::from_backend(
                pool.backend.name(),
                error,
                requested_bytes,
                pool.reserved_now(),
                None,
            )
        })
    }

    #[cold]
    #[inline(never)]
    fn allocate_miss(
        &self,
        pool: &DevicePool,
        index: usize,
        shard: usize,
        requested_bytes: usize,
        kind: MemoryKind,
        stream: StreamId,
    ) -> Result<Allocation, PoolError> {
        let start = Instant::now();
        self.reap_deferred(pool, false);
        let cache = &pool.caches[index];
        if let Some((idle, counted_in)) = cache.steal(shard, stream, requested_bytes) {
            if !pool.purgeable || pool.backend.reclaim(&idle.block) {
                return self.hand_out(pool, idle, index, counted_in, requested_bytes, stream);
            }
            self.drop_purged(pool, index, counted_in, idle, requested_bytes);
        }
        self.fence_foreign_blocks(pool, cache, stream);
        let block = self.allocate_from_backend(pool, cache.class_bytes(), requested_bytes, kind)?;
        // Drivers do not promise zeroed fresh memory, and it may be memory this pool freed.
        if let Err(error) = self.zero_if_asked(pool, &block, requested_bytes, stream) {
            self.release_to_backend(pool, block);
            cache.record_unused_allocation(shard);
            return Err(error);
        }
        cache.record_miss(shard, requested_bytes);
        cache.miss_latency.record(start.elapsed().as_nanos() as u64);
        tracing::debug!(
            class_bytes = cache.class_bytes(),
            requested_bytes,
            "pool miss: allocated from the backend"
        );
        Ok(Allocation {
            record: BlockRecord::boxed(block, self.this.upgrade()),
            cache: index as u32,
        })
    }

    /// Blocks idle on other streams become usable on this one once a fence recorded on their
    /// stream completes; record those fences now so later requests can reuse them.
    fn fence_foreign_blocks(&self, pool: &DevicePool, cache: &ClassCache, stream: StreamId) {
        cache.fence_foreign_blocks(stream, |owner| match pool.backend.record_fence(owner) {
            Ok(Some(fence)) => Some(fence),
            Ok(None) => Some(Arc::new(CompletedFence)),
            Err(error) => {
                tracing::warn!(?error, "could not record a stream fence");
                None
            }
        });
    }

    /// A request for the large-block arena: a best fit from its free blocks, else a new segment.
    #[cold]
    #[inline(never)]
    fn allocate_large(
        &self,
        pool: &DevicePool,
        slot: usize,
        requested_bytes: usize,
        kind: MemoryKind,
        stream: StreamId,
    ) -> Result<Allocation, PoolError> {
        let too_large = || PoolError::TooLarge {
            requested_bytes: requested_bytes as u64,
            limit_bytes: (usize::MAX - large_pool::LARGE_ROUNDING + 1) as u64,
        };
        let bytes = large_pool::block_bytes_for(requested_bytes).ok_or_else(too_large)?;
        let large = &pool.large[slot];
        let cache = LARGE_BASE + slot as u32;
        let mut was_hit = true;
        let record = match large.take(bytes, requested_bytes, stream, self.this.upgrade()) {
            Ok(record) => record,
            Err(owner) => {
                was_hit = false;
                // No free block of this stream fits: give back enough of its entirely free
                // segments (all too small for this request) to make room for the new one.
                // Other streams' segments stay: they are not stranded for their stream.
                let segment_bytes = large_pool::segment_bytes_for(bytes).ok_or_else(too_large)?;
                let stranded = large.remove_stranded(stream, segment_bytes);
                if !stranded.is_empty() {
                    self.release_blocks(pool, stranded);
                }
                self.reap_deferred(pool, false);
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
                large.add_segment(segment, bytes, requested_bytes, stream, owner)
            }
        };
        if let Err(error) = self.zero_if_asked(pool, &record.block, requested_bytes, stream) {
            // The caller holds a handle, so this is never the pool's last reference.
            let mut record = record;
            drop(record.owner.take());
            large.return_unserved(record, requested_bytes, stream, was_hit);
            return Err(error);
        }
        Ok(Allocation { record, cache })
    }

    #[cold]
    fn allocate_bypass(
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
        let mut bypass = pool.bypass.lock().unwrap_or_else(PoisonError::into_inner);
        bypass.requests += 1;
        bypass.backend_allocations += 1;
        bypass.in_use_blocks += 1;
        bypass.in_use_bytes += block.bytes() as u64;
        bypass.requested_live_bytes += requested_bytes as u64;
        drop(bypass);
        Ok(Allocation {
            record: BlockRecord::boxed(block, self.this.upgrade()),
            cache: BYPASS,
        })
    }

    /// A backend allocation within the budget, with one retry after releasing idle blocks
    /// when the budget or the device is exhausted.
    fn allocate_from_backend(
        &self,
        pool: &DevicePool,
        block_bytes: usize,
        requested_bytes: usize,
        kind: MemoryKind,
    ) -> Result<Block, PoolError> {
        self.reserve(pool, block_bytes)?;
        let first = self.backend_allocate(pool, block_bytes, kind);
        let outcome = match first {
            Err(BackendError::OutOfMemory) => {
                let released = self.release_everything(pool);
                tracing::info!(
                    block_bytes,
                    released_blocks = released.blocks,
                    released_bytes = released.bytes,
                    "device out of memory: released idle blocks, retrying once"
                );
                self.backend_allocate(pool, block_bytes, kind)
            }
            other => other,
        };
        outcome.map_err(|error| {
            self.unreserve(pool, block_bytes as u64);
            let error = self.allocation_error(pool, error, block_bytes.max(requested_bytes));
            tracing::warn!(%error, "allocation failed");
            error
        })
    }

    /// The user-facing error of a failed backend allocation of `bytes`, with the numbers.
    fn allocation_error(&self, pool: &DevicePool, error: BackendError, bytes: usize) -> PoolError {
        let device_free = pool.backend.memory_info().map(|info| info.free_bytes);
        PoolError::from_backend(
            pool.backend.name(),
            error,
            bytes,
            pool.reserved_now(),
            device_free,
        )
    }

    /// Raises `committed_bytes` by `bytes` unless that would pass the budget; on refusal,
    /// releases idle blocks and tries once more.
    fn reserve(&self, pool: &DevicePool, bytes: usize) -> Result<(), PoolError> {
        let bytes = bytes as u64;
        if self.try_reserve(pool, bytes) {
            return Ok(());
        }
        let released = self.release_everything(pool);
        tracing::info!(
            bytes,
            released_blocks = released.blocks,
            "budget reached: released idle blocks, retrying once"
        );
        if self.try_reserve(pool, bytes) {
            return Ok(());
        }
        Err(PoolError::BudgetExceeded {
            requested_bytes: bytes,
            reserved_bytes: pool.reserved_now(),
            budget_bytes: self.config.budget_bytes.unwrap_or(u64::MAX),
        })
    }

    fn try_reserve(&self, pool: &DevicePool, bytes: u64) -> bool {
        let committed = &pool.committed_bytes;
        let Some(budget) = self.config.budget_bytes else {
            committed.fetch_add(bytes, Ordering::Relaxed);
            return true;
        };
        let mut current = committed.load(Ordering::Relaxed);
        loop {
            let Some(wanted) = current.checked_add(bytes).filter(|&total| total <= budget) else {
                return false;
            };
            match committed.compare_exchange_weak(
                current,
                wanted,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    fn unreserve(&self, pool: &DevicePool, bytes: u64) {
        pool.committed_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// One backend allocation of bytes already reserved; the peak follows what the backend
    /// really handed over, so a refused request leaves no peak behind (issue 9's B4).
    fn backend_allocate(
        &self,
        pool: &DevicePool,
        bytes: usize,
        kind: MemoryKind,
    ) -> Result<Block, BackendError> {
        let block = pool.backend.allocate(bytes, kind)?;
        let held = pool
            .held_bytes
            .fetch_add(block.bytes() as u64, Ordering::Relaxed)
            + block.bytes() as u64;
        pool.peak_reserved_bytes.fetch_max(held, Ordering::Relaxed);
        Ok(block)
    }

    /// Gives a block back to the backend and its bytes back to the budget: the one place
    /// where both happen, so they cannot come apart.
    fn release_to_backend(&self, pool: &DevicePool, block: Block) {
        let bytes = block.bytes() as u64;
        pool.backend.release(block);
        pool.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.unreserve(pool, bytes);
    }

    /// Takes a block back from a dropped buffer (its pending state already filled in). If the
    /// block is not cached, its reference to the pool comes back to the caller, which must drop
    /// it only after this call returns: it may be the pool's last.
    #[inline(always)]
    pub(crate) fn give_back(
        &self,
        device: usize,
        cache: u32,
        mut record: Box<BlockRecord>,
        pending: Pending,
        requested_bytes: usize,
    ) -> Option<Arc<PoolManager>> {
        let pool = &self.devices[device];
        if cache >= LARGE_BASE {
            let owner = record.owner.take();
            if cache == BYPASS {
                self.give_back_bypass(pool, IdleBlock::new(record, pending, 0), requested_bytes);
            } else {
                let epoch = self.epoch.load(Ordering::Relaxed);
                let large = &pool.large[(cache - LARGE_BASE) as usize];
                large.give_back(record, requested_bytes, pending, epoch);
                if !self.pooling.load(Ordering::Relaxed) {
                    // Pooling off: a segment this drop left entirely free goes back now.
                    self.release_blocks(pool, large.remove_free_segments(None));
                }
            }
            return owner;
        }
        let record = IdleBlock::new(record, pending, self.epoch.load(Ordering::Relaxed));
        if pool.purgeable && record.pending.gates.is_none() {
            // Before the block becomes visible to other threads, never after; and never while
            // GPU work may still read it (whether the OS may discard such pages is undocumented).
            pool.backend.make_purgeable(&record.block);
        }
        let outcome = pool.caches[cache as usize].give_back(
            thread_shard(),
            record,
            requested_bytes,
            &self.pooling,
        );
        match outcome {
            GiveBack::Cached => None,
            GiveBack::Release(mut record) => {
                let owner = record.owner.take();
                self.release_blocks(pool, vec![record]);
                owner
            }
        }
    }

    #[cold]
    fn give_back_bypass(&self, pool: &DevicePool, record: IdleBlock, requested_bytes: usize) {
        {
            let mut bypass = pool.bypass.lock().unwrap_or_else(PoisonError::into_inner);
            bypass.in_use_blocks -= 1;
            bypass.in_use_bytes -= record.block.bytes() as u64;
            bypass.requested_live_bytes -= requested_bytes as u64;
            bypass.backend_releases += 1;
        }
        self.release_blocks(pool, vec![record]);
    }
}

impl Drop for PoolManager {
    /// The last owner (a manager handle or a buffer that outlived them) releases everything.
    fn drop(&mut self) {
        for pool in self.devices.iter() {
            self.release_everything(pool);
            // No buffer is alive any more: segments with gated blocks go too, after a wait.
            let segments: Vec<IdleBlock> = pool
                .large
                .iter()
                .flat_map(|large| large.remove_all_segments())
                .collect();
            if !segments.is_empty() {
                let _ = pool.backend.synchronize();
                for segment in segments {
                    self.release_to_backend(pool, segment.into_block());
                }
            }
        }
    }
}
