//! The router: picks the pool for each request and composes the layers below it (docs/design.md:
//! manager → router → pools → adaptors → backend). Per device it holds the pools (class
//! caches, large arenas, the bypass: `crate::pools`) over an upstream that counts every
//! backend allocation against the budget and defers releases GPU work may still use
//! (`upstream`, `budget`). What crosses pools lives here: the route, the out-of-memory retry
//! (`backend_calls`), trims and maintenance (`upkeep`), prewarming (`prewarm`) and the
//! statistics (`snapshot`).
//!
//! The hit path is `allocate` → `allocate_in_class` → `ClassCache::take` and `give_back` →
//! `give_back_to_class` → `ClassCache::give_back`: one shard lock each way, no driver call, no
//! clock, no global lock, no reference count. Everything else (checks, misses, the arena,
//! bypasses, releases) is out of line, in `classes`, `large` and `backend_calls`.
#![forbid(unsafe_code)]

mod backend_calls;
mod budget;
mod classes;
mod device;
mod large;
mod peak_guard;
mod prewarm;
mod route;
mod snapshot;
mod upkeep;
mod upstream;
mod virtual_arena;

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use self::device::DevicePool;
pub(crate) use self::route::{Route, Target};
use crate::backend::Backend;
use crate::config::PoolConfig;
use crate::error::PoolError;
use crate::kind::{MemoryKind, StreamId};
use crate::latency;
use crate::pools::class_cache::ClassCache;
use crate::pools::pending::Pending;
use crate::pools::record::{BlockRecord, IdleBlock};
use crate::pools::Request;

/// What a block record's owner is: the pool it came from (see `BlockRecord::owner`).
pub(crate) type Owner = Arc<PoolManager>;
/// A block record of this pool.
pub(crate) type Record = BlockRecord<Owner>;
type Idle = IdleBlock<Owner>;

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
    pub record: Box<Record>,
    pub route: Route,
}

/// Routes requests to pools on each device; see the module documentation.
pub struct PoolManager {
    config: PoolConfig,
    devices: Box<[DevicePool]>,
    /// Whether returned blocks are cached (the `sync` facade's type: loom models share it
    /// with the class caches).
    pooling: crate::sync::atomic::AtomicBool,
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
    let current = state.get();
    if current != usize::MAX {
        return current;
    }
    let assigned = crate::pools::class_cache::next_thread_number();
    state.set(assigned);
    assigned
}

/// Records a sampled hit's time, out of line so the hit path's code stays compact.
#[cold]
#[inline(never)]
fn record_hit_latency(cache: &ClassCache<Owner>, start: Instant) {
    cache.hit_latency.record(start.elapsed().as_nanos() as u64);
}

/// This thread's shard number.
#[inline(always)]
fn thread_shard() -> usize {
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
            match DevicePool::new(backend, &config, shards) {
                Ok(device) => devices.push(device),
                Err(error) => {
                    // The devices opened so far give their address space back.
                    devices.iter().for_each(DevicePool::close_virtual_arena);
                    return Err(error);
                }
            }
        }
        Ok(Arc::new_cyclic(|this| PoolManager {
            pooling: crate::sync::atomic::AtomicBool::new(config.pooling),
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
        self.devices[device].backend()
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

    pub(crate) fn peak_reserved_bytes(&self) -> u64 {
        self.devices
            .iter()
            .map(|pool| pool.upstream.budget.peak())
            .sum()
    }

    #[inline(always)]
    fn device(&self, device: usize) -> Result<&DevicePool, PoolError> {
        self.devices.get(device).ok_or(PoolError::NoSuchDevice {
            device,
            devices: self.devices.len(),
        })
    }

    /// The pool for a request of `bytes` bytes of kind slot `slot` on `stream`.
    #[inline(always)]
    fn route(&self, pool: &DevicePool, bytes: usize, slot: usize, stream: StreamId) -> Target {
        if !self.pooling.load(Ordering::Relaxed) {
            return Target::Bypass;
        }
        if bytes > pool.large_threshold {
            // The arena keys free space by stream id and tags its keys with the top bits; a
            // stream with such an id (no real handle has one) uses segments instead.
            if slot == pool.virtual_slot
                && pool.virtual_arena.is_some()
                && crate::pools::vm_arena::serves(stream)
            {
                return Target::Virtual;
            }
            return Target::Large(slot as u32);
        }
        match self.config.classes.class_for(bytes) {
            Some(class) => Target::Class((class * pool.kinds.len() + slot) as u32),
            None => Target::Bypass,
        }
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
        let result = match self.route(pool, bytes, slot, stream) {
            Target::Class(index) => self.allocate_in_class(pool, index, bytes, kind, stream),
            Target::Large(slot) => self.allocate_large(pool, slot, bytes, kind, stream),
            Target::Virtual => self.allocate_virtual(pool, bytes, stream),
            Target::Bypass => self.allocate_bypass(pool, bytes, kind),
        };
        if result.is_err() {
            pool.failed_requests.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// The hit path: a cached block of the class, else a miss.
    #[inline(always)]
    fn allocate_in_class(
        &self,
        pool: &DevicePool,
        index: u32,
        bytes: usize,
        kind: MemoryKind,
        stream: StreamId,
    ) -> Result<Allocation, PoolError> {
        let cache = &pool.caches[index as usize];
        let (shard, sampled) = thread_shard_and_sample();
        if pool.hits_need_checks {
            let request = Request {
                requested_bytes: bytes,
                block_bytes: cache.class_bytes(),
                stream,
                shard,
                served: false,
            };
            return self.allocate_checked(pool, index, &request, kind);
        }
        let sample_start = sampled.then(Instant::now);
        // The concrete cache's `take` (what `Pool::take` does, without building a request).
        match cache.take(shard, stream, bytes, true) {
            Some(idle) => {
                if let Some(start) = sample_start {
                    record_hit_latency(cache, start);
                }
                Ok(Allocation {
                    record: idle.record,
                    route: Route::class(index),
                })
            }
            None => self.class_miss(pool, index, shard, bytes, kind, stream),
        }
    }

    /// A miss on the class path, out of line so the hit path stays short.
    #[cold]
    #[inline(never)]
    fn class_miss(
        &self,
        pool: &DevicePool,
        index: u32,
        shard: usize,
        bytes: usize,
        kind: MemoryKind,
        stream: StreamId,
    ) -> Result<Allocation, PoolError> {
        let request = Request {
            requested_bytes: bytes,
            block_bytes: pool.caches[index as usize].class_bytes(),
            stream,
            shard,
            served: true,
        };
        self.allocate_miss(pool, index, &request, kind)
    }

    /// Takes a block back from a dropped buffer (its pending state already filled in). If the
    /// block is not cached, its reference to the pool comes back to the caller, which must drop
    /// it only after this call returns: it may be the pool's last.
    #[inline(always)]
    pub(crate) fn give_back(
        &self,
        device: usize,
        route: Route,
        record: Box<Record>,
        pending: Pending,
        requested_bytes: usize,
    ) -> Option<Owner> {
        let pool = &self.devices[device];
        match route.target() {
            Target::Class(index) => {
                self.give_back_to_class(pool, index, record, pending, requested_bytes)
            }
            Target::Large(slot) => {
                self.give_back_large(pool, slot, record, pending, requested_bytes)
            }
            Target::Virtual => self.give_back_virtual(pool, record, pending, requested_bytes),
            Target::Bypass => self.give_back_bypass(pool, record, pending, requested_bytes),
        }
    }

    #[inline(always)]
    fn give_back_to_class(
        &self,
        pool: &DevicePool,
        index: u32,
        record: Box<Record>,
        pending: Pending,
        requested_bytes: usize,
    ) -> Option<Owner> {
        // Metal's purgeable memory (tested everywhere with a fake Metal backend): one branch on
        // a flag read once per device; the allocation hit path has none (see `check_hit`).
        if pool.purgeable && pending.gates.is_none() {
            // Before the block becomes visible to other threads, never after; and never while
            // GPU work may still read it (whether the OS may discard such pages is undocumented).
            pool.backend().make_purgeable(&record.block);
        }
        // The concrete cache's `give_back` (what `Pool::give_back` does, without the struct).
        let idle = IdleBlock::new(record, pending, self.epoch.load(Ordering::Relaxed));
        let cache = &pool.caches[index as usize];
        let released = cache.give_back(thread_shard(), idle, requested_bytes, &self.pooling)?;
        self.release_uncached(pool, released)
    }

    /// Releases a block no pool keeps, returning its reference to the pool for the caller to
    /// drop after the call.
    #[cold]
    fn release_uncached(&self, pool: &DevicePool, mut idle: Idle) -> Option<Owner> {
        let owner = idle.owner.take();
        self.release_blocks(pool, vec![idle]);
        owner
    }

    /// Releases blocks the pools let go of: class blocks carved out of the virtual-memory
    /// arena go back into it (their space becomes free there, no driver call); the others go
    /// to the backend through the upstream (deferred while GPU work may still use them).
    /// The caller holds a reference to the pool (the records' own may be dropped here).
    fn release_blocks(&self, pool: &DevicePool, blocks: Vec<Idle>) -> ReleaseReport {
        let (carved, others): (Vec<Idle>, Vec<Idle>) =
            blocks.into_iter().partition(|idle| idle.carved);
        let mut report = ReleaseReport::default();
        if let Some(arena) = pool.carving_arena() {
            let epoch = self.epoch.load(Ordering::Relaxed);
            for mut idle in carved {
                report.blocks += 1;
                report.bytes += idle.block.bytes() as u64;
                idle.owner = None;
                let returned = crate::pools::Returned {
                    record: idle.record,
                    pending: idle.pending,
                    requested_bytes: 0,
                    shard: 0,
                    epoch,
                };
                let kept = crate::pools::Pool::give_back(arena, returned, &self.pooling);
                debug_assert!(kept.is_none(), "the arena keeps every block");
            }
            if !self.pooling() {
                self.unmap_free_pages(pool, false);
            }
        } else {
            debug_assert!(carved.is_empty(), "carved blocks exist only with an arena");
        }
        report.add(pool.upstream.release(others));
        report
    }
}

impl Drop for PoolManager {
    /// The last owner (a manager handle or a buffer that outlived them) releases everything.
    fn drop(&mut self) {
        for pool in self.devices.iter() {
            self.release_everything(pool);
            // No buffer is alive any more: segments with gated blocks go too, after a wait.
            let segments: Vec<Idle> = pool
                .large
                .iter()
                .flat_map(|large| large.remove_all_segments())
                .collect();
            if !segments.is_empty() || pool.virtual_arena.is_some() {
                let _ = pool.backend().wait_for_all();
                for segment in segments {
                    pool.upstream.release_now(segment.into_block());
                }
                pool.close_virtual_arena();
            }
            // Blocks still deferred (a wait above failed) go back now: no one is left to reap.
            pool.upstream.release_all_at_end();
        }
    }
}
