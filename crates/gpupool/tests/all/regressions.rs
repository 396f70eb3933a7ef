//! Regressions from the correctness review: each test reproduces a defect that was fixed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use gpupool::backend::sim::{SimBackend, SimConfig};
use gpupool::backend::{BackendError, MemoryInfo};
use gpupool::fence::Fence;
use gpupool::{Backend, Block, MemoryKind, MemoryManager, PoolConfig, StreamId, TrimLevel};

use crate::common::{defaults, sim_manager};

const MIB: usize = 1 << 20;

/// The sim device, with `zero` failing while `fail` is set.
struct FlakyZero {
    sim: SimBackend,
    fail: Arc<AtomicBool>,
}

impl Backend for FlakyZero {
    fn name(&self) -> &str {
        "flaky-zero"
    }
    fn kinds(&self) -> &[MemoryKind] {
        self.sim.kinds()
    }
    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        self.sim.allocate(bytes, kind)
    }
    fn release(&self, block: Block) {
        self.sim.release(block)
    }
    fn memory_info(&self) -> Option<MemoryInfo> {
        self.sim.memory_info()
    }
    fn record_fence(&self, stream: StreamId) -> Result<Option<Arc<dyn Fence>>, BackendError> {
        self.sim.record_fence(stream)
    }
    fn synchronize(&self) -> Result<(), BackendError> {
        self.sim.synchronize()
    }
    fn zero(&self, block: &Block, stream: StreamId) -> Result<(), BackendError> {
        if self.fail.load(Ordering::SeqCst) {
            Err(BackendError::Driver("injected zero failure".into()))
        } else {
            self.sim.zero(block, stream)
        }
    }
}

fn flaky_manager() -> (MemoryManager, SimBackend, Arc<AtomicBool>) {
    let sim = SimBackend::new(SimConfig::default());
    let fail = Arc::new(AtomicBool::new(false));
    let backend = FlakyZero {
        sim: sim.clone(),
        fail: fail.clone(),
    };
    let config = defaults()
        .zero_on_reuse(true)
        .maintenance_interval(Duration::ZERO)
        .build()
        .unwrap();
    let manager = MemoryManager::with_config(backend, config).unwrap();
    (manager, sim, fail)
}

#[derive(Default)]
struct ManualFence(AtomicBool);

impl Fence for ManualFence {
    fn is_complete(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// `allocate_large`: when `zero_if_asked` fails, the record handed back to the arena still holds
/// its `owner` (an `Arc<PoolManager>`). The arena keeps it in the free block, so the pool keeps
/// itself alive: once no trim can run any more (last handle gone while a neighbour is gated),
/// the pool and its segment are never released.
#[test]
fn a_failed_zero_in_the_large_arena_strands_no_pool_reference() {
    let (manager, sim, fail) = flaky_manager();
    // One 20 MiB segment: [a: 2 MiB | free 18 MiB].
    let mut a = manager.allocate_bytes(2 * MIB).unwrap();
    assert!(a.is_large());
    fail.store(true, Ordering::SeqCst);
    // Best fit takes 2 MiB of the free space, zeroing fails, the block (with its owner) goes back.
    assert!(manager.allocate_bytes(2 * MIB).is_err());
    fail.store(false, Ordering::SeqCst);
    // `a` is dropped while GPU work (a fence) still uses it: it waits, gated, unmerged.
    let fence = Arc::new(ManualFence::default());
    a.used_by(fence.clone());
    drop(a);
    // Last handle: pooling off + trim; the segment is not whole (a is gated), so it stays.
    drop(manager);
    fence.0.store(true, Ordering::Release);
    // Every buffer and handle is gone: the pool must have released everything.
    assert_eq!(
        sim.counters().live_allocations,
        0,
        "the segment leaked: the arena's free block still holds an Arc<PoolManager>"
    );
}

/// `PoolManager::give_back` reads `pooling` before it takes the shard lock. A buffer dropped
/// while the last handle drops can read `true`, wait for the shard while `Handle::drop` stores
/// `false` and trims, then cache its record (with its `Arc<PoolManager>`) after the trim: the
/// pool owns itself through its cache and is never freed.
#[test]
fn a_buffer_dropped_while_the_last_handle_drops_does_not_leak_the_pool() {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 3000;
    for attempt in 0..50 {
        let sim = SimBackend::new(SimConfig::default());
        let config = PoolConfig::builder()
            .max_idle_per_class(1 << 20)
            .min_idle_per_class(0)
            .shards(1)
            .maintenance_interval(Duration::ZERO)
            .build()
            .unwrap();
        let manager = MemoryManager::with_config(sim.clone(), config).unwrap();
        let batches: Vec<Vec<_>> = (0..THREADS)
            .map(|_| {
                (0..PER_THREAD)
                    .map(|_| manager.allocate_bytes(256).unwrap())
                    .collect()
            })
            .collect();
        let barrier = Arc::new(Barrier::new(THREADS + 1));
        let threads: Vec<_> = batches
            .into_iter()
            .map(|batch| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    for buffer in batch {
                        drop(buffer);
                    }
                })
            })
            .collect();
        barrier.wait();
        std::thread::sleep(Duration::from_micros(200));
        drop(manager);
        for thread in threads {
            thread.join().unwrap();
        }
        let live = sim.counters().live_allocations;
        assert_eq!(
            live, 0,
            "{live} blocks leaked at attempt {attempt}: a block was cached after the last handle's trim"
        );
    }
}

/// A hit whose `zero_on_reuse` fails is an allocate call that returned an error, but it stays
/// counted as a request and a hit (`Totals::requests` is documented as calls that succeeded;
/// the miss path's zero failure is, consistently, not counted).
#[test]
fn a_hit_whose_zeroing_fails_is_not_counted_as_a_request() {
    let (manager, _sim, fail) = flaky_manager();
    assert_eq!(manager.prewarm(4096, 1).unwrap(), 1);
    fail.store(true, Ordering::SeqCst);
    assert!(manager.allocate_bytes(4096).is_err());
    let totals = manager.stats().totals;
    assert_eq!(totals.failed_requests, 1);
    assert_eq!(
        (totals.requests, totals.hits),
        (0, 0),
        "a failed call is counted as a successful request and a hit"
    );
}

/// Same for the large arena: a failed large request is counted as a request and a hit.
#[test]
fn a_large_request_whose_zeroing_fails_is_not_counted_as_a_hit() {
    let (manager, _sim, fail) = flaky_manager();
    drop(manager.allocate_bytes(4 * MIB).unwrap());
    fail.store(true, Ordering::SeqCst);
    assert!(manager.allocate_bytes(4 * MIB).is_err());
    let stats = manager.stats();
    assert_eq!(stats.totals.failed_requests, 1);
    assert_eq!(
        (stats.devices[0].large.requests, stats.devices[0].large.hits),
        (1, 0),
        "the failed request is counted as a served hit"
    );
}

/// With pooling off, a dropped class block is released at once, but a large-arena block stays
/// cached in its segment (`give_back` never looks at `pooling` for the arena), so memory stays
/// reserved with pooling off, and after the last handle is gone nothing trims it until the very
/// last buffer drops.
#[test]
fn large_blocks_are_released_with_pooling_off() {
    let (manager, sim) = sim_manager(defaults());
    let small = manager.allocate_bytes(4096).unwrap();
    let big = manager.allocate_bytes(30 * MIB).unwrap();
    assert!(big.is_large());
    manager.set_pooling(false);
    drop(small);
    assert_eq!(
        sim.counters().live_allocations,
        1,
        "the class block is released"
    );
    drop(big);
    assert_eq!(
        manager.stats().totals.cached_bytes,
        0,
        "pooling is off, yet the large block stays cached"
    );
    assert_eq!(sim.counters().live_allocations, 0);
    manager.trim(TrimLevel::Aggressive);
}
