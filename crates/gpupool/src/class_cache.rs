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
use std::sync::{Arc, PoisonError};

use crossbeam_utils::CachePadded;

use crate::backend::{Block, StreamId};
use crate::fence::{Fence, Pending, StreamFence};
use crate::latency::Histogram;
use crate::pool_manager::PoolManager;
use crate::sync::{Mutex, ShardGuard, ShardLock};

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
    shards: Box<[CachePadded<ShardLock<Shard>>]>,
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
                    CachePadded::new(ShardLock::new(Shard {
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
    fn shard(&self, index: usize) -> ShardGuard<'_, Shard> {
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

    /// Makes blocks idle on other streams usable on `stream` once their own stream's work is
    /// done: attaches to each a fence recorded on its stream after it was dropped, one fence per
    /// stream. `record` records a fence on a stream now (`None`: it could not).
    ///
    /// The order matters (see `crate::fence`): blocks are marked with a promised fence under
    /// their shard's lock first, and the fences are recorded only after every mark, with no
    /// lock held. A fence recorded earlier would miss the work of blocks dropped into a shard
    /// the walk had not reached yet; holding every shard lock across the driver calls instead
    /// would stall every thread's hit path on this class.
    pub fn fence_foreign_blocks(
        &self,
        stream: StreamId,
        mut record: impl FnMut(StreamId) -> Option<Arc<dyn Fence>>,
    ) {
        let mut promises: Vec<(StreamId, Arc<StreamFence>)> = Vec::new();
        for index in 0..self.shards.len() {
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

    /// Takes back a block that was taken for a request that then failed (zeroing it failed):
    /// the hit is withdrawn, as if the request had never found it. The block is cached again
    /// only if the shard still has room: while it was out, another shard may have taken this
    /// shard's unused quota (issue 9's B2: pushing it back regardless broke the cap and made
    /// the next quota handover underflow). Otherwise it comes back for release, counted here.
    pub fn return_unserved(
        &self,
        shard: usize,
        idle: IdleBlock,
        requested_bytes: usize,
    ) -> GiveBack {
        let mut locked = self.shard(shard);
        locked.counters.requests -= 1;
        locked.counters.hits -= 1;
        locked.counters.in_use_blocks -= 1;
        locked.counters.requested_live_bytes -= requested_bytes as i64;
        if locked.idle.len() < locked.quota {
            locked.idle.push(idle);
            GiveBack::Cached
        } else {
            locked.counters.backend_releases += 1;
            locked.counters.releases_at_cap += 1;
            GiveBack::Release(idle)
        }
    }

    /// Counts a block the backend allocated for this class that served no request and went
    /// straight back (its zeroing failed, or the class was full when it was prewarmed), so
    /// that allocations minus releases stays the number of blocks held.
    pub fn record_unused_allocation(&self, shard: usize) {
        let mut locked = self.shard(shard);
        locked.counters.backend_allocations += 1;
        locked.counters.backend_releases += 1;
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
    pub fn lock_all(&self) -> Vec<ShardGuard<'_, Shard>> {
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
mod tests {
    use super::*;
    use crate::backend::sim::SimBackend;
    use crate::backend::{Backend, MemoryKind};
    use std::sync::atomic::AtomicU64;

    /// A stream whose work is numbered: fences capture how much was queued, and complete once
    /// that much has run.
    #[derive(Default)]
    struct NumberedStream {
        queued: AtomicU64,
        finished: AtomicU64,
    }

    struct NumberedFence {
        stream: Arc<NumberedStream>,
        covers: u64,
    }

    impl Fence for NumberedFence {
        fn is_complete(&self) -> bool {
            self.stream.finished.load(Ordering::Acquire) >= self.covers
        }
    }

    fn idle_block(sim: &SimBackend, stream: StreamId) -> IdleBlock {
        let block = sim.allocate(256, MemoryKind::Device).unwrap();
        IdleBlock::new(BlockRecord::boxed(block, None), Pending::on(stream), 0)
    }

    /// Issue 9's B1: the walk recorded its fence while standing at the first shard and gave the
    /// same fence to a block dropped into a later shard after it; once the fence completed, that
    /// block went to another stream while its own work still ran.
    #[test]
    fn b1_a_block_dropped_during_the_fence_walk_gets_no_older_fence() {
        let sim = SimBackend::default();
        let cache = ClassCache::new(256, 8, 2);
        let pooling = AtomicBool::new(true);
        let stream_one = Arc::new(NumberedStream::default());
        // Block `early` on stream 1 in shard 0: its work is number 1.
        stream_one.queued.store(1, Ordering::Release);
        let early = idle_block(&sim, StreamId(1));
        assert!(matches!(
            cache.give_back(0, early, 256, &pooling),
            GiveBack::Cached
        ));
        let late_address = std::cell::Cell::new(0);
        cache.fence_foreign_blocks(StreamId(2), |owner| {
            assert_eq!(owner, StreamId(1));
            let fence = Arc::new(NumberedFence {
                stream: stream_one.clone(),
                covers: stream_one.queued.load(Ordering::Acquire),
            });
            // Meanwhile another thread queues work number 2 on stream 1 with block `late`
            // and drops it into shard 1, which the walk visits after shard 0.
            stream_one.queued.store(2, Ordering::Release);
            let late = idle_block(&sim, StreamId(1));
            late_address.set(late.block.device_address());
            assert!(matches!(
                cache.give_back(1, late, 256, &pooling),
                GiveBack::Cached
            ));
            Some(fence as Arc<dyn Fence>)
        });
        // The GPU finishes work number 1, not number 2.
        stream_one.finished.store(1, Ordering::Release);
        let first = cache.take(0, StreamId(2), 256);
        assert!(
            first.is_some(),
            "`early` is usable on stream 2 once work 1 is done"
        );
        let second = cache.take(1, StreamId(2), 256);
        assert!(
            second.is_none(),
            "block {:#x} went to stream 2 while its work on stream 1 still ran",
            late_address.get()
        );
        // Its own stream may reuse it at once, in stream order.
        assert!(cache.take(1, StreamId(1), 256).is_some());
    }

    /// Issue 9's B2: a block whose hit failed (zeroing) went back into its shard even after
    /// another shard took that shard's unused quota; the cap broke and the next quota handover
    /// underflowed (a panic inside `Drop` in debug builds).
    #[test]
    fn b2_a_failed_hit_respects_the_cap_when_its_quota_was_taken() {
        let sim = SimBackend::default();
        let cap = 4;
        let cache = ClassCache::new(256, cap, 2);
        let pooling = AtomicBool::new(true);
        // Shard 0 fills the whole cap.
        for _ in 0..cap {
            let idle = idle_block(&sim, StreamId(0));
            assert!(matches!(
                cache.give_back(0, idle, 256, &pooling),
                GiveBack::Cached
            ));
        }
        // A hit takes one block; its zeroing will fail.
        let taken = cache.take(0, StreamId(0), 256).expect("a hit");
        // Meanwhile shard 1 takes shard 0's unused quota for a block of its own.
        let other = idle_block(&sim, StreamId(0));
        assert!(matches!(
            cache.give_back(1, other, 256, &pooling),
            GiveBack::Cached
        ));
        // The failed hit comes back: no room is left, so it must be released.
        let outcome = cache.return_unserved(0, taken, 256);
        assert!(
            matches!(outcome, GiveBack::Release(_)),
            "the block was cached above the cap"
        );
        let cached: usize = cache.lock_all().iter().map(|shard| shard.idle.len()).sum();
        assert_eq!(cached, cap, "the cap holds");
        // The next quota handover must not underflow.
        let again = idle_block(&sim, StreamId(0));
        let _ = cache.give_back(1, again, 256, &pooling);
        assert!(cache.free_slots() <= cap);
        let counters = cache.counters();
        assert_eq!(counters.requests, 0, "the failed hit is withdrawn");
    }
}

/// Loom models of the cache shards (`RUSTFLAGS="--cfg loom" cargo test -p gpupool --lib loom`).
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::backend::sim::SimBackend;
    use crate::backend::{Backend, MemoryKind};
    use loom::sync::atomic::AtomicU64;

    struct NumberedFence {
        finished: Arc<AtomicU64>,
        covers: u64,
    }

    impl Fence for NumberedFence {
        fn is_complete(&self) -> bool {
            self.finished.load(Ordering::Acquire) >= self.covers
        }
    }

    /// The fence walk of a miss on stream 2 races a thread that queues work on stream 1 and
    /// drops its block into another shard. In every interleaving, once the GPU has finished
    /// exactly what the recorded fence covers, the dropped block is usable on stream 2 only
    /// if its work is part of that.
    #[test]
    fn loom_fence_walk_never_covers_a_block_with_an_older_fence() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let sim = SimBackend::default();
            let cache = Arc::new(ClassCache::new(256, 4, 2));
            let queued = Arc::new(AtomicU64::new(1));
            let finished = Arc::new(AtomicU64::new(0));
            let pooling = Arc::new(AtomicBool::new(true));
            let early = IdleBlock::new(
                BlockRecord::boxed(sim.allocate(256, MemoryKind::Device).unwrap(), None),
                Pending::on(StreamId(1)),
                0,
            );
            let _ = cache.give_back(0, early, 256, &pooling);
            let late = IdleBlock::new(
                BlockRecord::boxed(sim.allocate(256, MemoryKind::Device).unwrap(), None),
                Pending::on(StreamId(1)),
                0,
            );
            let late_address = late.block.device_address();
            let dropper = {
                let (cache, queued, pooling) = (cache.clone(), queued.clone(), pooling.clone());
                loom::thread::spawn(move || {
                    // Work number 2 on stream 1 uses `late`; then `late` is dropped.
                    let ticket = queued.fetch_add(1, Ordering::AcqRel) + 1;
                    let _ = cache.give_back(1, late, 256, &pooling);
                    ticket
                })
            };
            let covered = Arc::new(AtomicU64::new(0));
            cache.fence_foreign_blocks(StreamId(2), |_| {
                let covers = queued.load(Ordering::Acquire);
                covered.store(covers, Ordering::Release);
                Some(Arc::new(NumberedFence {
                    finished: finished.clone(),
                    covers,
                }) as Arc<dyn Fence>)
            });
            let late_ticket = dropper.join().unwrap();
            // The GPU finishes exactly what the fence covers.
            finished.store(covered.load(Ordering::Acquire), Ordering::Release);
            for shard in 0..2 {
                while let Some(idle) = cache.take(shard, StreamId(2), 256) {
                    if idle.block.device_address() == late_address {
                        assert!(
                            late_ticket <= finished.load(Ordering::Acquire),
                            "the dropped block went to stream 2 before its work finished"
                        );
                    }
                }
            }
        });
    }
}
