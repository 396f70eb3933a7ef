//! The idle blocks of one size class and memory kind on one device: the seed's `MemoryPool`.
//!
//! This is the hit path, so it is sharded: each thread works on its own lock shard (picked once
//! per thread), and takes exactly one atomic instruction per operation. Three choices get it
//! there:
//!
//! - Shards use a spin lock (the `spin` crate) whose unlock is a plain release store; std's
//!   `Mutex` needs a second atomic read-modify-write to unlock (it must know about sleepers).
//!   A waiter yields the CPU, so a preempted holder is not spun against for long.
//! - Counters live inside the shard beside the blocks they describe and change under the same
//!   lock, so a snapshot that holds every shard sees figures that agree with each other exactly.
//! - The cap on idle blocks is per class (the seed's 32) and exact, without a shared counter:
//!   it is split into per-shard quotas. A shard caches a block only below its quota; a shard at
//!   its quota takes more from the class's unassigned reserve, or from other shards' unused
//!   quota, on a slow path under a class-level lock. The sum of quotas never exceeds the cap, so
//!   the cap can never be exceeded, even momentarily.
//!
//! Blocks are kept as a stack: the most recently dropped block is reused first (warm in caches
//! and TLBs); the oldest sit at the bottom, where trims take them from.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crossbeam_utils::CachePadded;
use spin::mutex::{SpinMutex, SpinMutexGuard};
use spin::relax::Yield;

use crate::backend::{Block, StreamId};
use crate::fence::Pending;
use crate::latency::Histogram;
use crate::pool_manager::PoolManager;

/// A block and the pool it belongs to. Boxed once, when the block comes from the backend, so
/// cache and buffer pass one pointer back and forth and the hit path never reads the record.
pub(crate) struct BlockRecord {
    pub block: Block,
    /// Keeps the pool alive for as long as the block is owned or cached. The reference moves
    /// with the record between cache and buffer, so the hit path never touches a reference
    /// count. (Cached records form a cycle with the pool; the last manager handle breaks it by
    /// turning pooling off, which empties every cache.)
    pub owner: Option<Arc<PoolManager>>,
}

impl BlockRecord {
    /// A fresh record for a block just allocated.
    pub fn boxed(block: Block, owner: Option<Arc<PoolManager>>) -> Box<BlockRecord> {
        Box::new(BlockRecord { block, owner })
    }
}

/// A cached block: its record, what still holds it back, and when it went idle. The
/// reuse checks read these fields from the cache's own vector, not through the record.
pub(crate) struct IdleBlock {
    pub record: Box<BlockRecord>,
    pub pending: Pending,
    /// The maintenance epoch in which the block was last dropped.
    pub epoch: u64,
}

impl IdleBlock {
    pub fn new(record: Box<BlockRecord>, pending: Pending, epoch: u64) -> IdleBlock {
        IdleBlock {
            record,
            pending,
            epoch,
        }
    }

    /// The block, for release.
    pub fn into_block(self) -> Block {
        self.record.block
    }
}

impl std::ops::Deref for IdleBlock {
    type Target = BlockRecord;
    fn deref(&self) -> &BlockRecord {
        &self.record
    }
}

impl std::ops::DerefMut for IdleBlock {
    fn deref_mut(&mut self) -> &mut BlockRecord {
        &mut self.record
    }
}

/// Counters of one shard. In-use figures may go negative in one shard (a block allocated on
/// one thread and dropped on another); only their sum over shards means something.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CacheCounters {
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub backend_allocations: u64,
    pub backend_releases: u64,
    pub releases_at_cap: u64,
    pub prewarmed: u64,
    pub in_use_blocks: i64,
    pub requested_live_bytes: i64,
    pub idle_blocks: u64,
}

impl CacheCounters {
    pub fn add(&mut self, other: &CacheCounters) {
        self.requests += other.requests;
        self.hits += other.hits;
        self.misses += other.misses;
        self.backend_allocations += other.backend_allocations;
        self.backend_releases += other.backend_releases;
        self.releases_at_cap += other.releases_at_cap;
        self.prewarmed += other.prewarmed;
        self.in_use_blocks += other.in_use_blocks;
        self.requested_live_bytes += other.requested_live_bytes;
        self.idle_blocks += other.idle_blocks;
    }
}

pub(crate) struct Shard {
    idle: Vec<IdleBlock>,
    counters: CacheCounters,
    /// How many idle blocks this shard may hold (its part of the class cap).
    quota: usize,
}

type ShardLock = SpinMutex<Shard, Yield>;

/// Quota a shard takes from the class reserve at a time.
const QUOTA_CHUNK: usize = 4;

impl Shard {
    /// The counters with the idle count filled in.
    pub fn counters(&self) -> CacheCounters {
        CacheCounters {
            idle_blocks: self.idle.len() as u64,
            ..self.counters
        }
    }

    /// Counts a returned block and caches it (`cache`) or marks it for release.
    #[inline(always)]
    fn admit(
        &mut self,
        idle: IdleBlock,
        requested_bytes: usize,
        cache: bool,
        pooling: bool,
    ) -> GiveBack {
        self.counters.in_use_blocks -= 1;
        self.counters.requested_live_bytes -= requested_bytes as i64;
        if cache {
            self.idle.push(idle);
            GiveBack::Cached
        } else {
            self.counters.backend_releases += 1;
            if pooling {
                self.counters.releases_at_cap += 1;
            }
            GiveBack::Release(idle)
        }
    }

    /// The most recent usable block below the top (the top is held back by a fence).
    #[cold]
    fn take_buried(&mut self, stream: StreamId) -> Option<IdleBlock> {
        let position = self
            .idle
            .iter_mut()
            .rposition(|idle| idle.pending.usable_on(stream))?;
        Some(self.idle.remove(position))
    }

    /// Takes the most recent block usable on `stream` and counts the hit.
    #[inline(always)]
    fn pop_usable(&mut self, stream: StreamId, requested_bytes: usize) -> Option<IdleBlock> {
        let top = self.idle.last_mut()?;
        let idle = if top.pending.usable_on(stream) {
            self.idle.pop()?
        } else {
            self.take_buried(stream)?
        };
        self.counters.requests += 1;
        self.counters.hits += 1;
        self.counters.in_use_blocks += 1;
        self.counters.requested_live_bytes += requested_bytes as i64;
        Some(idle)
    }
}

/// What happened to a block given back to its class.
pub(crate) enum GiveBack {
    /// Cached for reuse.
    Cached,
    /// Not cached (class at its cap, or pooling off): the caller releases it.
    Release(IdleBlock),
}

/// The idle blocks of one class and kind, in lock shards.
pub(crate) struct ClassCache {
    class_bytes: usize,
    shard_mask: usize,
    shards: Box<[CachePadded<ShardLock>]>,
    /// Cap quota not assigned to any shard. Lock order: this, then shards.
    reserve: Mutex<usize>,
    /// Sampled hit latencies.
    pub hit_latency: Histogram,
    /// Miss latencies (every miss).
    pub miss_latency: Histogram,
}

impl ClassCache {
    /// `shards` must be a power of two.
    pub fn new(class_bytes: usize, max_idle: usize, shards: usize) -> ClassCache {
        debug_assert!(shards.is_power_of_two());
        ClassCache {
            class_bytes,
            shard_mask: shards - 1,
            shards: (0..shards)
                .map(|_| {
                    CachePadded::new(SpinMutex::new(Shard {
                        idle: Vec::new(),
                        counters: CacheCounters::default(),
                        quota: 0,
                    }))
                })
                .collect(),
            reserve: Mutex::new(max_idle),
            hit_latency: Histogram::default(),
            miss_latency: Histogram::default(),
        }
    }

    pub fn class_bytes(&self) -> usize {
        self.class_bytes
    }

    #[inline(always)]
    fn shard(&self, index: usize) -> SpinMutexGuard<'_, Shard, Yield> {
        self.shards[index & self.shard_mask].lock()
    }

    /// The hit path: a usable block from this thread's shard, counted as a request and a hit.
    #[inline(always)]
    pub fn take(
        &self,
        shard: usize,
        stream: StreamId,
        requested_bytes: usize,
    ) -> Option<IdleBlock> {
        self.shard(shard).pop_usable(stream, requested_bytes)
    }

    /// The first step of a miss: a usable block from another thread's shard, with the shard
    /// that counted the hit.
    pub fn steal(
        &self,
        shard: usize,
        stream: StreamId,
        requested_bytes: usize,
    ) -> Option<(IdleBlock, usize)> {
        (1..=self.shard_mask).find_map(|offset| {
            self.take(shard + offset, stream, requested_bytes)
                .map(|idle| (idle, shard + offset))
        })
    }

    /// Gives shard `shard` more quota: from the reserve, else the unused quota of other shards.
    /// Returns whether any was found.
    #[cold]
    fn grow_quota(&self, shard: usize) -> bool {
        let mut reserve = self.reserve.lock().unwrap_or_else(PoisonError::into_inner);
        let mut found = (*reserve).min(QUOTA_CHUNK);
        *reserve -= found;
        if found == 0 {
            for offset in 1..=self.shard_mask {
                let mut other = self.shard(shard + offset);
                let unused = other.quota - other.idle.len();
                other.quota -= unused;
                found += unused;
            }
        }
        self.shard(shard).quota += found;
        found > 0
    }

    /// Runs `visit` on every idle block of every shard (used to attach stream fences).
    pub fn for_each_idle(&self, mut visit: impl FnMut(&mut IdleBlock)) {
        for index in 0..self.shards.len() {
            for idle in self.shard(index).idle.iter_mut() {
                visit(idle);
            }
        }
    }

    /// Takes back a hit whose block turns out unusable (purged by the OS) and counts the
    /// block's release, so the request can be served and counted again as a miss.
    pub fn undo_hit_for_release(&self, shard: usize, requested_bytes: usize) {
        let mut shard = self.shard(shard);
        shard.counters.requests -= 1;
        shard.counters.hits -= 1;
        shard.counters.in_use_blocks -= 1;
        shard.counters.requested_live_bytes -= requested_bytes as i64;
        shard.counters.backend_releases += 1;
    }

    /// Counts a request served by a new backend allocation.
    pub fn record_miss(&self, shard: usize, requested_bytes: usize) {
        let mut shard = self.shard(shard);
        shard.counters.requests += 1;
        shard.counters.misses += 1;
        shard.counters.backend_allocations += 1;
        shard.counters.in_use_blocks += 1;
        shard.counters.requested_live_bytes += requested_bytes as i64;
    }

    /// Takes a block back from its owner: caches it if pooling is on and the class is under
    /// its cap, else hands it back to be released (counted as released here).
    #[inline(always)]
    pub fn give_back(
        &self,
        shard: usize,
        idle: IdleBlock,
        requested_bytes: usize,
        pooling: &AtomicBool,
    ) -> GiveBack {
        // `pooling` is read under the shard lock: turning pooling off and then trimming takes
        // every shard lock, so a block is either cached before that trim (which releases it)
        // or sees pooling off; it can never be cached after the last handle's final trim.
        {
            let mut locked = self.shard(shard);
            let on = pooling.load(Ordering::Relaxed);
            if !on || locked.idle.len() < locked.quota {
                return locked.admit(idle, requested_bytes, on, on);
            }
        }
        // At this shard's quota: find more, then decide with the counters updated in one go.
        let grown = self.grow_quota(shard);
        let mut locked = self.shard(shard);
        let on = pooling.load(Ordering::Relaxed);
        let room = on && grown && locked.idle.len() < locked.quota;
        locked.admit(idle, requested_bytes, room, on)
    }

    /// Puts back a block that was taken for a request that then failed (zeroing it failed):
    /// the hit is withdrawn, as if the request had never found it.
    pub fn return_unserved(&self, shard: usize, idle: IdleBlock, requested_bytes: usize) {
        let mut locked = self.shard(shard);
        locked.counters.requests -= 1;
        locked.counters.hits -= 1;
        locked.counters.in_use_blocks -= 1;
        locked.counters.requested_live_bytes -= requested_bytes as i64;
        // Its quota slot is still free: taking the block did not give the slot away.
        locked.idle.push(idle);
    }

    /// Caches a freshly allocated block without a request (prewarming). Returns it back if the
    /// class is already at its cap.
    pub fn add_prewarmed(&self, shard: usize, idle: IdleBlock) -> Result<(), IdleBlock> {
        let mut locked = self.shard(shard);
        if locked.idle.len() >= locked.quota {
            drop(locked);
            if !self.grow_quota(shard) {
                return Err(idle);
            }
            locked = self.shard(shard);
            if locked.idle.len() >= locked.quota {
                return Err(idle);
            }
        }
        locked.counters.backend_allocations += 1;
        locked.counters.prewarmed += 1;
        locked.idle.push(idle);
        Ok(())
    }

    /// Room left under the cap.
    pub fn free_slots(&self) -> usize {
        let reserve = *self.reserve.lock().unwrap_or_else(PoisonError::into_inner);
        reserve
            + self
                .lock_all()
                .iter()
                .map(|shard| shard.quota - shard.idle.len())
                .sum::<usize>()
    }

    /// Removes idle blocks, oldest first, keeping at least `keep` in the class; only blocks
    /// dropped in an epoch `<= idle_since` are taken when it is given. The removed blocks are
    /// counted as released here; the caller gives them to the backend.
    pub fn remove_idle(&self, keep: usize, idle_since: Option<u64>) -> Vec<IdleBlock> {
        let mut shards = self.lock_all();
        let cached: usize = shards.iter().map(|shard| shard.idle.len()).sum();
        let mut budget = cached.saturating_sub(keep);
        let mut removed = Vec::new();
        for shard in shards.iter_mut() {
            if budget == 0 {
                break;
            }
            let before = removed.len();
            let mut kept = Vec::with_capacity(shard.idle.len());
            for idle in shard.idle.drain(..) {
                let old_enough = idle_since.is_none_or(|epoch| idle.epoch <= epoch);
                if budget > 0 && old_enough {
                    budget -= 1;
                    removed.push(idle);
                } else {
                    kept.push(idle);
                }
            }
            shard.idle = kept;
            shard.counters.backend_releases += (removed.len() - before) as u64;
        }
        removed
    }

    /// Locks every shard, in index order (the only order in which several are ever held).
    pub fn lock_all(&self) -> Vec<SpinMutexGuard<'_, Shard, Yield>> {
        (0..self.shards.len())
            .map(|index| self.shard(index))
            .collect()
    }

    /// Sums the counters of every shard.
    pub fn counters(&self) -> CacheCounters {
        let mut total = CacheCounters::default();
        for shard in self.lock_all() {
            total.add(&shard.counters());
        }
        total
    }
}
