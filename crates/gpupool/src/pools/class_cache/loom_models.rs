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
