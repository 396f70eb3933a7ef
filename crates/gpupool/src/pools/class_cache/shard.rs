//! One lock shard of a class cache: its idle blocks, its part of the class cap, and the
//! counters of what happened in it.
//!
//! The counters count events, each once, when it happens: a block handed out (idle → in use),
//! given back (in use → idle), allocated, released. A request is counted when it is served,
//! never before, so no failure has anything to take back. In-use figures may go negative in
//! one shard (a block allocated on one thread and dropped on another); only their sum over the
//! shards means something.
#![forbid(unsafe_code)]

use crate::kind::StreamId;
use crate::pools::record::IdleBlock;

/// Counters of one shard (or, summed, of a class).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CacheCounters {
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    pub backend_allocations: u64,
    pub backend_releases: u64,
    /// Blocks carved out of the virtual-memory arena's pages, and given back to it.
    pub arena_blocks: u64,
    pub arena_returns: u64,
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
        self.arena_blocks += other.arena_blocks;
        self.arena_returns += other.arena_returns;
        self.releases_at_cap += other.releases_at_cap;
        self.prewarmed += other.prewarmed;
        self.in_use_blocks += other.in_use_blocks;
        self.requested_live_bytes += other.requested_live_bytes;
        self.idle_blocks += other.idle_blocks;
    }

    /// A block went to an owner (from the cache, or fresh from the backend).
    #[inline(always)]
    pub fn block_in_use(&mut self, requested_bytes: usize) {
        self.in_use_blocks += 1;
        self.requested_live_bytes += requested_bytes as i64;
    }

    /// A block came back from its owner.
    #[inline(always)]
    pub fn block_returned(&mut self, requested_bytes: usize) {
        self.in_use_blocks -= 1;
        self.requested_live_bytes -= requested_bytes as i64;
    }

    /// A request was served: from the cache (`hit`) or by a new backend allocation.
    #[inline(always)]
    pub fn request_served(&mut self, hit: bool) {
        self.requests += 1;
        if hit {
            self.hits += 1;
        } else {
            self.misses += 1;
        }
    }

    /// The backend allocated a block for this class (or, `carved`, the arena lent one).
    pub fn block_allocated(&mut self, carved: bool) {
        if carved {
            self.arena_blocks += 1;
        } else {
            self.backend_allocations += 1;
        }
    }

    /// A block of this class went back to the backend (or, `carved`, to the arena); `at_cap`
    /// when the cache had no room.
    pub fn block_released(&mut self, carved: bool, at_cap: bool) {
        if carved {
            self.arena_returns += 1;
        } else {
            self.backend_releases += 1;
        }
        if at_cap {
            self.releases_at_cap += 1;
        }
    }
}

/// One shard: idle blocks (a stack, most recent on top), counters and quota.
pub(crate) struct Shard<O> {
    pub idle: Vec<IdleBlock<O>>,
    pub counters: CacheCounters,
    /// How many idle blocks this shard may hold (its part of the class cap).
    pub quota: usize,
}

impl<O> Shard<O> {
    pub fn new() -> Shard<O> {
        Shard {
            idle: Vec::new(),
            counters: CacheCounters::default(),
            quota: 0,
        }
    }

    /// The counters with the idle count filled in.
    pub fn counters(&self) -> CacheCounters {
        CacheCounters {
            idle_blocks: self.idle.len() as u64,
            ..self.counters
        }
    }

    /// Whether one more idle block fits in this shard's quota.
    #[inline(always)]
    pub fn has_room(&self) -> bool {
        self.idle.len() < self.quota
    }

    /// Quota this shard holds but does not use; given up to another shard.
    pub fn give_up_unused_quota(&mut self) -> usize {
        let unused = self.quota.saturating_sub(self.idle.len());
        self.quota -= unused;
        unused
    }

    /// Takes back a block from its owner: caches it (`cache`), or counts its release and
    /// hands it back for release.
    #[inline(always)]
    pub fn admit(
        &mut self,
        idle: IdleBlock<O>,
        requested_bytes: usize,
        cache: bool,
        at_cap: bool,
    ) -> Option<IdleBlock<O>> {
        self.counters.block_returned(requested_bytes);
        if cache {
            self.idle.push(idle);
            None
        } else {
            self.counters.block_released(idle.record.carved, at_cap);
            Some(idle)
        }
    }

    /// Takes the most recent block usable on `stream`, counted as in use. With `served`, the
    /// request is counted as a hit at once; otherwise the caller counts it once the block
    /// passed its checks (zeroing, a purge check).
    #[inline(always)]
    pub fn take_usable(
        &mut self,
        stream: StreamId,
        requested_bytes: usize,
        served: bool,
    ) -> Option<IdleBlock<O>> {
        let top = self.idle.last_mut()?;
        let idle = if top.pending.usable_on(stream) {
            self.idle.pop()?
        } else {
            self.take_buried(stream)?
        };
        self.counters.block_in_use(requested_bytes);
        if served {
            self.counters.request_served(true);
        }
        Some(idle)
    }

    /// The most recent usable block below the top (the top is held back by a fence).
    #[cold]
    fn take_buried(&mut self, stream: StreamId) -> Option<IdleBlock<O>> {
        let position = self
            .idle
            .iter_mut()
            .rposition(|idle| idle.pending.usable_on(stream))?;
        Some(self.idle.remove(position))
    }
}
