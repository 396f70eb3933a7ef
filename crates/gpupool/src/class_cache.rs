//! The idle blocks of one size class and memory kind on one device: the seed's `MemoryPool`.
//!
//! This is the hit path, so it is sharded: each thread works on its own lock shard (picked once
//! per thread), and an uncontended `Mutex` costs two atomic instructions. Counters live inside
//! the shard beside the blocks they describe and change under the same lock, so a snapshot that
//! holds every shard sees figures that agree with each other exactly. The cap on idle blocks is
//! per class (the seed's 32), enforced across shards by one atomic that is reserved before a
//! block is cached, so it can never be exceeded, even momentarily.
//!
//! Blocks are kept as a stack: the most recently dropped block is reused first (warm in caches
//! and TLBs); the oldest sit at the bottom, where trims take them from.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crossbeam_utils::CachePadded;

use crate::backend::{Block, StreamId};
use crate::fence::Pending;
use crate::latency::Histogram;

/// A block with what still holds it back and when it went idle. Boxed once, when the block
/// comes from the backend, so the hit path moves one pointer between cache and buffer instead
/// of copying the record through the stack.
pub(crate) struct BlockRecord {
    pub block: Block,
    pub pending: Pending,
    /// The maintenance epoch in which the block was last dropped.
    pub epoch: u64,
}

impl BlockRecord {
    /// A fresh record for a block just allocated on `stream`.
    pub fn boxed(block: Block, stream: StreamId) -> IdleBlock {
        Box::new(BlockRecord {
            block,
            pending: Pending::on(stream),
            epoch: 0,
        })
    }
}

/// A cached (or owned) block record.
pub(crate) type IdleBlock = Box<BlockRecord>;

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
}

impl Shard {
    /// The counters with the idle count filled in.
    pub fn counters(&self) -> CacheCounters {
        CacheCounters {
            idle_blocks: self.idle.len() as u64,
            ..self.counters
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
    #[inline]
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
    max_idle: usize,
    shard_mask: usize,
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    /// Idle blocks over all shards, plus slots reserved by blocks being cached right now.
    idle_blocks: CachePadded<AtomicUsize>,
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
            max_idle,
            shard_mask: shards - 1,
            shards: (0..shards)
                .map(|_| {
                    CachePadded::new(Mutex::new(Shard {
                        idle: Vec::new(),
                        counters: CacheCounters::default(),
                    }))
                })
                .collect(),
            idle_blocks: CachePadded::new(AtomicUsize::new(0)),
            hit_latency: Histogram::default(),
            miss_latency: Histogram::default(),
        }
    }

    pub fn class_bytes(&self) -> usize {
        self.class_bytes
    }

    #[inline]
    fn shard(&self, index: usize) -> MutexGuard<'_, Shard> {
        self.shards[index & self.shard_mask]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The hit path: a usable block from this thread's shard, counted as a request and a hit.
    #[inline]
    pub fn take(
        &self,
        shard: usize,
        stream: StreamId,
        requested_bytes: usize,
    ) -> Option<IdleBlock> {
        let taken = self.shard(shard).pop_usable(stream, requested_bytes);
        if taken.is_some() {
            self.idle_blocks.fetch_sub(1, Ordering::Relaxed);
        }
        taken
    }

    /// The first step of a miss: a usable block from another thread's shard, with the shard
    /// that counted the hit.
    pub fn steal(
        &self,
        shard: usize,
        stream: StreamId,
        requested_bytes: usize,
    ) -> Option<(IdleBlock, usize)> {
        if self.idle_blocks.load(Ordering::Relaxed) == 0 {
            return None;
        }
        (1..=self.shard_mask).find_map(|offset| {
            self.take(shard + offset, stream, requested_bytes)
                .map(|idle| (idle, shard + offset))
        })
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
    #[inline]
    pub fn give_back(
        &self,
        shard: usize,
        idle: IdleBlock,
        requested_bytes: usize,
        pooling: bool,
    ) -> GiveBack {
        let admitted = pooling && self.idle_blocks.fetch_add(1, Ordering::Relaxed) < self.max_idle;
        if pooling && !admitted {
            self.idle_blocks.fetch_sub(1, Ordering::Relaxed);
        }
        let mut shard = self.shard(shard);
        shard.counters.in_use_blocks -= 1;
        shard.counters.requested_live_bytes -= requested_bytes as i64;
        if admitted {
            shard.idle.push(idle);
            GiveBack::Cached
        } else {
            shard.counters.backend_releases += 1;
            if pooling {
                shard.counters.releases_at_cap += 1;
            }
            GiveBack::Release(idle)
        }
    }

    /// Caches a freshly allocated block without a request (prewarming). Returns it back if the
    /// class is already at its cap.
    pub fn add_prewarmed(&self, shard: usize, idle: IdleBlock) -> Result<(), IdleBlock> {
        if self.idle_blocks.fetch_add(1, Ordering::Relaxed) >= self.max_idle {
            self.idle_blocks.fetch_sub(1, Ordering::Relaxed);
            return Err(idle);
        }
        let mut shard = self.shard(shard);
        shard.counters.backend_allocations += 1;
        shard.counters.prewarmed += 1;
        shard.idle.push(idle);
        Ok(())
    }

    /// Room left under the cap.
    pub fn free_slots(&self) -> usize {
        self.max_idle
            .saturating_sub(self.idle_blocks.load(Ordering::Relaxed))
    }

    /// Removes idle blocks, oldest first, keeping at least `keep` in the class; only blocks
    /// dropped in an epoch `<= idle_since` are taken when it is given. The removed blocks are
    /// counted as released here; the caller gives them to the backend.
    pub fn remove_idle(&self, keep: usize, idle_since: Option<u64>) -> Vec<IdleBlock> {
        let mut removed = Vec::new();
        for index in 0..self.shards.len() {
            let mut shard = self.shard(index);
            let mut budget = self
                .idle_blocks
                .load(Ordering::Relaxed)
                .saturating_sub(keep);
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
            let taken = removed.len() - before;
            shard.counters.backend_releases += taken as u64;
            self.idle_blocks.fetch_sub(taken, Ordering::Relaxed);
        }
        removed
    }

    /// Locks every shard, in index order (the only order in which several are ever held).
    pub fn lock_all(&self) -> Vec<MutexGuard<'_, Shard>> {
        (0..self.shards.len())
            .map(|index| self.shard(index))
            .collect()
    }

    /// Sums the counters of every shard (locking them one after another).
    pub fn counters(&self) -> CacheCounters {
        let mut total = CacheCounters::default();
        for shard in self.lock_all() {
            total.add(&shard.counters());
        }
        total
    }
}
