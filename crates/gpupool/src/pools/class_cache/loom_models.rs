//! Loom models of the cache shards (`RUSTFLAGS="--cfg loom" cargo test -p gpupool --lib loom`).

use super::*;
use crate::backend::sim::SimBackend;
use crate::backend::{Backend, MemoryKind};
use crate::pools::pending::Pending;
use crate::pools::record::BlockRecord;

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
        let cache = Arc::new(ClassCache::<()>::new(256, 4, 2));
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
        cache.fence_foreign_blocks(StreamId(2), usize::MAX, |_| {
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
            while let Some(idle) = cache.take(shard, StreamId(2), 256, true) {
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

fn sim_block(sim: &SimBackend) -> IdleBlock<()> {
    IdleBlock::new(
        BlockRecord::boxed(sim.allocate(256, MemoryKind::Device).unwrap(), None),
        Pending::on(StreamId(0)),
        0,
    )
}

/// Quotas and blocks of the class, read under the reserve lock and every shard lock (the
/// lock order of `grow_quota`): (idle blocks, quota in shards plus the reserve).
fn idle_and_quota(cache: &ClassCache<()>) -> (usize, usize) {
    let reserve = cache.reserve.lock().unwrap();
    let shards = cache.lock_all();
    let idle = shards.iter().map(|shard| shard.idle.len()).sum();
    let quota = shards.iter().map(|shard| shard.quota).sum::<usize>() + *reserve;
    (idle, quota)
}

/// Two threads return two blocks each into their own shards of a class capped at three, so
/// the second shard to need quota must take it from the other one's unused quota. In every
/// interleaving, seen by an observer that locks the class: the cap is never exceeded, not even
/// for a moment, and quota is neither created nor lost; afterwards every block is either
/// cached or handed back for release, none twice.
#[test]
fn loom_quota_handover_never_passes_the_cap() {
    const CAP: usize = 3;
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(2);
    builder.check(|| {
        let sim = SimBackend::default();
        let cache = Arc::new(ClassCache::<()>::new(256, CAP, 2));
        let pooling = Arc::new(AtomicBool::new(true));
        let returners: Vec<_> = (0..2)
            .map(|shard| {
                let blocks = [sim_block(&sim), sim_block(&sim)];
                let (cache, pooling) = (cache.clone(), pooling.clone());
                loom::thread::spawn(move || {
                    blocks
                        .into_iter()
                        .filter_map(|block| cache.give_back(shard, block, 256, &pooling))
                        .count()
                })
            })
            .collect();
        let (idle, quota) = idle_and_quota(&cache);
        assert!(idle <= CAP, "{idle} idle blocks in a class capped at {CAP}");
        assert_eq!(quota, CAP, "quota was created or lost");
        let handed_back: usize = returners.into_iter().map(|t| t.join().unwrap()).sum();
        let (idle, quota) = idle_and_quota(&cache);
        assert!(idle <= CAP);
        assert_eq!(quota, CAP);
        assert_eq!(idle + handed_back, 4, "a block was lost or duplicated");
    });
}

/// The last manager handle's drop (pooling off, then a trim of every shard) races a buffer's
/// drop returning its block. In every interleaving the block is handed back for release
/// exactly once, by the trim or by the return itself, and nothing stays cached: a cached
/// block would keep the pool alive forever (its record holds the pool). Both paths of the
/// return are modelled: the fast one (the shard has quota) and the quota-growing one.
#[test]
fn loom_a_block_returned_during_the_last_handles_drop_is_never_stranded() {
    for shard_has_quota in [true, false] {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(move || last_handle_model(shard_has_quota));
    }
}

fn last_handle_model(shard_has_quota: bool) {
    {
        let sim = SimBackend::default();
        let cache = Arc::new(ClassCache::<()>::new(256, 4, 2));
        let pooling = Arc::new(AtomicBool::new(true));
        if shard_has_quota {
            assert!(cache.give_back(1, sim_block(&sim), 256, &pooling).is_none());
            assert!(cache.take(1, StreamId(0), 256, true).is_some());
        }
        let block = sim_block(&sim);
        let returner = {
            let (cache, pooling) = (cache.clone(), pooling.clone());
            loom::thread::spawn(move || cache.give_back(1, block, 256, &pooling).is_some())
        };
        pooling.store(false, Ordering::Relaxed);
        let trimmed = cache.remove_idle(0, None).len();
        let handed_back = returner.join().unwrap();
        assert_eq!(
            trimmed + usize::from(handed_back),
            1,
            "released {trimmed} by the trim and {handed_back} by the return"
        );
        assert_eq!(idle_and_quota(&cache).0, 0, "a block stayed cached");
    }
}
