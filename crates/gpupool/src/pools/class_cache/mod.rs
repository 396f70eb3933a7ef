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
#![forbid(unsafe_code)]

mod shard;

use crate::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};

use crossbeam_utils::CachePadded;

use crate::backend::Fence;
use crate::kind::StreamId;
use crate::latency::Histogram;
use crate::pools::pending::StreamFence;
use crate::pools::record::{BlockRecord, IdleBlock};
use crate::pools::{Pool, Request, Returned};
use crate::sync::{Mutex, ShardGuard, ShardLock};
pub(crate) use shard::{CacheCounters, Shard};

/// Quota a shard takes from the class reserve at a time.
const QUOTA_CHUNK: usize = 4;

/// Thread numbers handed out so far, one per thread that used any pool: a thread's number
/// picks its shard in every class (`number & (shards - 1)`), so shards from this count on
/// (when it is below the shard count) never held a block or quota.
static THREADS_SEEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A number for a thread that uses a pool for the first time.
pub(crate) fn next_thread_number() -> usize {
    THREADS_SEEN.fetch_add(1, Ordering::Relaxed)
}

/// How many shards of a class may hold blocks or quota: one per thread numbered so far (a
/// stale reading only skips a shard a new thread just started using: a missed reuse, or quota
/// left where it is, never an error).
pub(crate) fn shards_in_use() -> usize {
    THREADS_SEEN.load(Ordering::Relaxed)
}

/// The idle blocks of one class and kind, in lock shards.
pub(crate) struct ClassCache<O> {
    class_bytes: usize,
    shard_mask: usize,
    shards: Box<[CachePadded<ShardLock<Shard<O>>>]>,
    /// Cap quota not assigned to any shard. Lock order: this, then shards.
    reserve: Mutex<usize>,
    /// Sampled hit latencies.
    pub hit_latency: Histogram,
    /// Miss latencies (every miss).
    pub miss_latency: Histogram,
}

impl<O> ClassCache<O> {
    /// `shards` must be a power of two.
    pub fn new(class_bytes: usize, max_idle: usize, shards: usize) -> ClassCache<O> {
        debug_assert!(shards.is_power_of_two());
        ClassCache {
            class_bytes,
            shard_mask: shards - 1,
            shards: (0..shards)
                .map(|_| CachePadded::new(ShardLock::new(Shard::new())))
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
    fn shard(&self, index: usize) -> ShardGuard<'_, Shard<O>> {
        self.shards[index & self.shard_mask].lock()
    }

    /// The hit path: a usable block from this thread's shard, counted as in use, and as a
    /// served request too when `served` (else the caller calls `Pool::record_served` once the
    /// block passed its checks).
    #[inline(always)]
    pub fn take(
        &self,
        shard: usize,
        stream: StreamId,
        requested_bytes: usize,
        served: bool,
    ) -> Option<IdleBlock<O>> {
        self.shard(shard)
            .take_usable(stream, requested_bytes, served)
    }

    /// The first step of a miss: a usable block from another thread's shard, with the shard
    /// that counted it. Threads get shard numbers in order, so only the first `shards_in_use`
    /// shards can hold blocks: the others are not locked (with four shards per core, each miss
    /// of a single-threaded program locked 63 empty shards twice on a 16-core machine, here
    /// and in the fence walk: 1.3 µs).
    pub fn steal(
        &self,
        shard: usize,
        shards_in_use: usize,
        stream: StreamId,
        requested_bytes: usize,
        served: bool,
    ) -> Option<(IdleBlock<O>, usize)> {
        self.other_shards(shard, shards_in_use).find_map(|index| {
            self.take(index, stream, requested_bytes, served)
                .map(|idle| (idle, index))
        })
    }

    /// The shards other than `shard` that may hold blocks or quota, starting after it: the
    /// first `shards_in_use` (all of them when `shard` is not among those: a caller outside
    /// the thread numbering).
    fn other_shards(&self, shard: usize, shards_in_use: usize) -> impl Iterator<Item = usize> {
        let own = shard & self.shard_mask;
        let shards = self.shard_mask + 1;
        let in_use = match shards_in_use.min(shards) {
            used if used > own => used,
            _ => shards,
        };
        (1..in_use).map(move |offset| (own + offset) % in_use)
    }

    /// Counts a request served by a new block: a backend allocation, or (`carved`) a block
    /// carved out of the virtual-memory arena.
    pub fn record_miss(&self, shard: usize, requested_bytes: usize, carved: bool) {
        let mut shard = self.shard(shard);
        shard.counters.block_allocated(carved);
        shard.counters.block_in_use(requested_bytes);
        shard.counters.request_served(false);
    }

    /// Counts a block the backend allocated for this class that served no request and went
    /// straight back (its zeroing failed, or the class was full when it was prewarmed), so
    /// that allocations minus releases stays the number of blocks held.
    pub fn record_unused_allocation(&self, shard: usize, carved: bool) {
        let mut locked = self.shard(shard);
        locked.counters.block_allocated(carved);
        locked.counters.block_released(carved, false);
    }

    /// Counts the release of a block taken for a request that could not use it (the OS
    /// purged it): it goes from in use straight to the backend.
    pub fn record_release_in_use(&self, shard: usize, requested_bytes: usize, carved: bool) {
        let mut locked = self.shard(shard);
        locked.counters.block_returned(requested_bytes);
        locked.counters.block_released(carved, false);
    }

    /// Gives shard `shard` more quota: from the reserve, else the unused quota of other shards.
    /// Returns whether any was found.
    #[cold]
    fn grow_quota(&self, shard: usize) -> bool {
        let mut reserve = self.reserve.lock().unwrap_or_else(PoisonError::into_inner);
        let mut found = (*reserve).min(QUOTA_CHUNK);
        *reserve -= found;
        if found == 0 {
            for index in self.other_shards(shard, shards_in_use()) {
                found += self.shard(index).give_up_unused_quota();
            }
        }
        self.shard(shard).quota += found;
        found > 0
    }

    /// Makes blocks idle on other streams usable on `stream` once their own stream's work is
    /// done: attaches to each a fence recorded on its stream after it was dropped, one fence per
    /// stream. `record` records a fence on a stream now (`None`: it could not).
    ///
    /// The order matters (see `pools::pending`): blocks are marked with a promised fence under
    /// their shard's lock first, and the fences are recorded only after every mark, with no
    /// lock held. A fence recorded earlier would miss the work of blocks dropped into a shard
    /// the walk had not reached yet; holding every shard lock across the driver calls instead
    /// would stall every thread's hit path on this class.
    ///
    /// Only the first `shards_in_use` shards are walked (see [`ClassCache::steal`]): a block
    /// in a shard a new thread just started using waits for a later walk.
    pub fn fence_foreign_blocks(
        &self,
        stream: StreamId,
        shards_in_use: usize,
        mut record: impl FnMut(StreamId) -> Option<Arc<dyn Fence>>,
    ) {
        let mut promises: Vec<(StreamId, Arc<StreamFence>)> = Vec::new();
        for index in 0..shards_in_use.clamp(1, self.shards.len()) {
            for idle in self.shard(index).idle.iter_mut() {
                if !idle.pending.wants_stream_fence(stream) {
                    continue;
                }
                let owner = idle.pending.stream;
                let promise = match promises.iter().find(|(on, _)| *on == owner) {
                    Some((_, promise)) => promise.clone(),
                    None => {
                        let promise = StreamFence::promised();
                        promises.push((owner, promise.clone()));
                        promise
                    }
                };
                idle.pending.set_stream_fence(promise);
            }
        }
        for (owner, promise) in promises {
            match record(owner) {
                Some(fence) => promise.fulfil(fence),
                None => promise.abandon(),
            }
        }
    }

    /// Takes a block back from its owner: caches it if pooling is on and the class is under
    /// its cap, else hands it back to be released (counted as released here). A block taken
    /// for a request that then failed comes back the same way: nothing was counted for the
    /// request, so nothing needs taking back.
    #[inline(always)]
    pub fn give_back(
        &self,
        shard: usize,
        idle: IdleBlock<O>,
        requested_bytes: usize,
        pooling: &AtomicBool,
    ) -> Option<IdleBlock<O>> {
        // `pooling` is read under the shard lock: turning pooling off and then trimming takes
        // every shard lock, so a block is either cached before that trim (which releases it)
        // or sees pooling off; it can never be cached after the last handle's final trim.
        {
            let mut locked = self.shard(shard);
            let on = pooling.load(Ordering::Relaxed);
            if !on || locked.has_room() {
                return locked.admit(idle, requested_bytes, on, false);
            }
        }
        // At this shard's quota: find more, then decide with the counters updated in one go.
        let grown = self.grow_quota(shard);
        let mut locked = self.shard(shard);
        let on = pooling.load(Ordering::Relaxed);
        let room = on && grown && locked.has_room();
        locked.admit(idle, requested_bytes, room, on)
    }

    /// Caches a freshly allocated block without a request (prewarming). Returns it back if the
    /// class is already at its cap.
    pub fn add_prewarmed(&self, shard: usize, idle: IdleBlock<O>) -> Result<(), IdleBlock<O>> {
        let mut locked = self.shard(shard);
        if !locked.has_room() {
            drop(locked);
            if !self.grow_quota(shard) {
                return Err(idle);
            }
            locked = self.shard(shard);
            if !locked.has_room() {
                return Err(idle);
            }
        }
        locked.counters.block_allocated(idle.record.carved);
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
                .map(|shard| shard.quota.saturating_sub(shard.idle.len()))
                .sum::<usize>()
    }

    /// Removes idle blocks, oldest first, keeping at least `keep` in the class; only blocks
    /// dropped in an epoch `<= idle_since` are taken when it is given. The removed blocks are
    /// counted as released here; the caller gives them to the backend.
    pub fn remove_idle(&self, keep: usize, idle_since: Option<u64>) -> Vec<IdleBlock<O>> {
        self.remove_some(keep, usize::MAX, idle_since, false)
    }

    /// Removes at most `blocks` idle blocks carved out of the virtual-memory arena, oldest
    /// first (see [`ClassCache::remove_idle`]).
    pub fn remove_oldest_carved(&self, blocks: usize) -> Vec<IdleBlock<O>> {
        self.remove_some(0, blocks, None, true)
    }

    fn remove_some(
        &self,
        keep: usize,
        at_most: usize,
        idle_since: Option<u64>,
        only_carved: bool,
    ) -> Vec<IdleBlock<O>> {
        let mut shards = self.lock_all();
        let cached: usize = shards.iter().map(|shard| shard.idle.len()).sum();
        let mut budget = cached.saturating_sub(keep).min(at_most);
        let mut removed = Vec::new();
        for shard in shards.iter_mut() {
            if budget == 0 {
                break;
            }
            let mut kept = Vec::with_capacity(shard.idle.len());
            let before = removed.len();
            for idle in shard.idle.drain(..) {
                let old_enough = idle_since.is_none_or(|epoch| idle.epoch <= epoch);
                if budget > 0 && old_enough && (!only_carved || idle.record.carved) {
                    budget -= 1;
                    removed.push(idle);
                } else {
                    kept.push(idle);
                }
            }
            shard.idle = kept;
            for idle in &removed[before..] {
                shard.counters.block_released(idle.record.carved, false);
            }
        }
        removed
    }

    /// Locks every shard, in index order (the only order in which several are ever held).
    pub fn lock_all(&self) -> Vec<ShardGuard<'_, Shard<O>>> {
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

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_models;

impl<O> Pool<O> for ClassCache<O> {
    #[inline(always)]
    fn take(&self, request: &Request) -> Option<Box<BlockRecord<O>>> {
        ClassCache::take(
            self,
            request.shard,
            request.stream,
            request.requested_bytes,
            request.served,
        )
        .map(|idle| idle.record)
    }

    fn record_served(&self, request: &Request, hit: bool) {
        let mut shard = self.shard(request.shard);
        shard.counters.request_served(hit);
    }

    #[inline(always)]
    fn give_back(&self, returned: Returned<O>, pooling: &AtomicBool) -> Option<IdleBlock<O>> {
        let Returned {
            record,
            pending,
            requested_bytes,
            shard,
            epoch,
        } = returned;
        ClassCache::give_back(
            self,
            shard,
            IdleBlock::new(record, pending, epoch),
            requested_bytes,
            pooling,
        )
    }

    fn release_idle(&self, keep: usize, idle_since: Option<u64>) -> Vec<IdleBlock<O>> {
        self.remove_idle(keep, idle_since)
    }
}
