//! Unit tests of the class cache: the fence walk and the cap, with explicit shards.

use super::*;
use crate::backend::sim::SimBackend;
use crate::backend::{Backend, MemoryKind};
use crate::pools::pending::Pending;
use crate::pools::record::BlockRecord;

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

fn idle_block(sim: &SimBackend, stream: StreamId) -> IdleBlock<()> {
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
    assert!(cache.give_back(0, early, 256, &pooling).is_none());
    let late_address = std::cell::Cell::new(0);
    cache.fence_foreign_blocks(StreamId(2), usize::MAX, |owner| {
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
        assert!(cache.give_back(1, late, 256, &pooling).is_none());
        Some(fence as Arc<dyn Fence>)
    });
    // The GPU finishes work number 1, not number 2.
    stream_one.finished.store(1, Ordering::Release);
    let first = cache.take(0, StreamId(2), 256, true);
    assert!(
        first.is_some(),
        "`early` is usable on stream 2 once work 1 is done"
    );
    let second = cache.take(1, StreamId(2), 256, true);
    assert!(
        second.is_none(),
        "block {:#x} went to stream 2 while its work on stream 1 still ran",
        late_address.get()
    );
    // Its own stream may reuse it at once, in stream order.
    assert!(cache.take(1, StreamId(1), 256, true).is_some());
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
        assert!(cache.give_back(0, idle, 256, &pooling).is_none());
    }
    // A hit takes one block, not counted yet: its zeroing is still to come, and will fail.
    let taken = cache.take(0, StreamId(0), 256, false).expect("a hit");
    // Meanwhile shard 1 takes shard 0's unused quota for a block of its own.
    let other = idle_block(&sim, StreamId(0));
    assert!(cache.give_back(1, other, 256, &pooling).is_none());
    // The failed hit comes back like any drop: no room is left, so it must be released.
    let outcome = cache.give_back(0, taken, 256, &pooling);
    assert!(outcome.is_some(), "the block was cached above the cap");
    let cached: usize = cache.lock_all().iter().map(|shard| shard.idle.len()).sum();
    assert_eq!(cached, cap, "the cap holds");
    // The next quota handover must not underflow.
    let again = idle_block(&sim, StreamId(0));
    let _ = cache.give_back(1, again, 256, &pooling);
    assert!(cache.free_slots() <= cap);
    let counters = cache.counters();
    assert_eq!(counters.requests, 0, "the failed hit was never counted");
}

/// A miss looks only in the shards threads were given so far: a block in shard 2 of 8 is
/// found while three threads have shard numbers, and the search never locks shards past
/// them (with a stale count of two it is not found: a missed reuse, nothing worse).
#[test]
fn a_miss_searches_only_the_shards_threads_were_given() {
    let sim = SimBackend::default();
    let cache = ClassCache::<()>::new(256, 8, 8);
    let pooling = AtomicBool::new(true);
    assert!(cache
        .give_back(2, idle_block(&sim, StreamId(0)), 256, &pooling)
        .is_none());
    assert!(cache.steal(0, 2, StreamId(0), 256, true).is_none());
    let (_idle, from) = cache
        .steal(0, 3, StreamId(0), 256, true)
        .expect("the block in shard 2");
    assert_eq!(from, 2);
    assert!(cache
        .give_back(6, idle_block(&sim, StreamId(0)), 256, &pooling)
        .is_none());
    let (_idle, from) = cache
        .steal(1, 100, StreamId(0), 256, true)
        .expect("every shard once more threads than shards were seen");
    assert_eq!(from, 6);
}
