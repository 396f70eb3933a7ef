//! The pools: where blocks wait between owners. Each takes blocks out, takes them back, and
//! gives idle memory up for release; none calls the backend (the router above does, through
//! its adaptors), and none knows the router: records carry an owner of a type the router picks.
//!
//! - [`class_cache`]: idle blocks of one size class (the hit path);
//! - [`large_arena`]: best-fit blocks split out of large segments;
//! - [`vm_arena`]: best-fit blocks in one reserved address range, pages mapped where used;
//! - [`bypass`]: requests outside the pooled range, only counted;
//! - [`pending`]: when a block GPU work may still use can go to a new owner;
//! - [`record`]: the block records the pools move.
#![forbid(unsafe_code)]

pub(crate) mod address_map;
pub(crate) mod bypass;
pub(crate) mod class_cache;
pub(crate) mod large_arena;
pub(crate) mod pending;
pub(crate) mod record;
pub(crate) mod vm_arena;

use crate::sync::atomic::AtomicBool;

use crate::kind::StreamId;
use crate::pools::pending::Pending;
use crate::pools::record::{BlockRecord, IdleBlock};

/// A request as a pool sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Request {
    /// Bytes the caller asked for.
    pub requested_bytes: usize,
    /// Bytes of the block that serves it (the class size; the arena's rounding).
    pub block_bytes: usize,
    /// The stream the block will be used on.
    pub stream: StreamId,
    /// The calling thread's shard (class caches are sharded by thread).
    pub shard: usize,
    /// Count the request as served as soon as a block is found; otherwise the router counts
    /// it with [`Pool::record_served`] once the block passed its checks (zeroing, purge).
    pub served: bool,
}

/// A block coming back from its owner.
pub(crate) struct Returned<O> {
    pub record: Box<BlockRecord<O>>,
    /// What may still use the block (its stream, fences).
    pub pending: Pending,
    pub requested_bytes: usize,
    /// The returning thread's shard.
    pub shard: usize,
    /// The maintenance epoch of the return.
    pub epoch: u64,
}

/// What the router asks of every pool: the class caches, the large arena and the bypass (and
/// any pool to come, such as a virtual-memory arena). Misses differ by pool (a new class
/// block, a new segment, a direct allocation) and stay with the router, which composes them
/// with the backend adaptors; everything a pool holds moves through these four methods.
pub(crate) trait Pool<O> {
    /// A block for `request` from what the pool holds, counted as in use (and as a served hit
    /// when `request.served`); `None` is a miss. Records of blocks the pool split off have no
    /// owner yet: the caller sets it.
    fn take(&self, request: &Request) -> Option<Box<BlockRecord<O>>>;

    /// Counts a request served by a block that `take` handed out without counting it.
    fn record_served(&self, request: &Request, hit: bool);

    /// Takes a block back from its owner. Returns it when the pool does not keep it (full,
    /// pooling off, or a pool that never keeps blocks), counted as released: the caller gives
    /// it to the backend.
    fn give_back(&self, returned: Returned<O>, pooling: &AtomicBool) -> Option<IdleBlock<O>>;

    /// Takes idle memory out for release, counted as released: all but `keep` idle blocks
    /// (where the pool counts blocks), only those idle since epoch `idle_since` when given.
    fn release_idle(&self, keep: usize, idle_since: Option<u64>) -> Vec<IdleBlock<O>>;
}
