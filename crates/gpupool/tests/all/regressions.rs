//! Regressions from the correctness review: each test reproduces a defect that was fixed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use gpupool::backend::sim::{SimBackend, SimConfig};
use gpupool::backend::{BackendError, MemoryInfo, StreamOrdered, Zeroing};
use gpupool::fence::Fence;
use gpupool::{
    Backend, Block, MemoryKind, MemoryManager, PoolConfig, PoolError, StreamId, TrimLevel,
};

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
    fn stream_ordered(&self) -> Option<&dyn StreamOrdered> {
        self.sim.stream_ordered()
    }
    fn zeroing(&self) -> Option<&dyn Zeroing> {
        Some(self)
    }
}

impl Zeroing for FlakyZero {
    fn zero(&self, block: &Block, stream: StreamId) -> Result<(), BackendError> {
        if self.fail.load(Ordering::SeqCst) {
            Err(BackendError::Driver("injected zero failure".into()))
        } else {
            self.sim.zeroing().expect("sim zeroes").zero(block, stream)
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
    // Miri interprets every step (about 1,000 times slower) and preempts threads at random
    // points itself, so fewer and smaller attempts still race the drops against the handle.
    let (attempts, per_thread) = if cfg!(miri) { (3, 40) } else { (50, 3000) };
    for attempt in 0..attempts {
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
                (0..per_thread)
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

// ---- Issue 9: correctness bugs found by adversarial testing ----

/// Work to run once, inside a backend call.
type Hook = Arc<std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>>;

/// The sim device, running `on_allocate` once, inside the next backend allocation.
struct AllocationHook {
    sim: SimBackend,
    on_allocate: Hook,
}

impl Backend for AllocationHook {
    fn name(&self) -> &str {
        "allocation-hook"
    }
    fn kinds(&self) -> &[MemoryKind] {
        self.sim.kinds()
    }
    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        let hook = self.on_allocate.lock().unwrap().take();
        if let Some(hook) = hook {
            hook();
        }
        self.sim.allocate(bytes, kind)
    }
    fn release(&self, block: Block) {
        self.sim.release(block)
    }
    fn memory_info(&self) -> Option<MemoryInfo> {
        self.sim.memory_info()
    }
}

/// B3: `prewarm` checked the class's room, then allocated; drops that filled the class
/// meanwhile made it release the block again, and neither the allocation nor the release was
/// counted, so "backend allocations − releases = blocks held" broke.
#[test]
fn b3_prewarm_racing_with_drops_counts_every_backend_allocation() {
    let sim = SimBackend::new(SimConfig::default());
    let on_allocate: Hook = Arc::default();
    let backend = AllocationHook {
        sim: sim.clone(),
        on_allocate: on_allocate.clone(),
    };
    let config = defaults()
        .max_idle_per_class(4)
        .min_idle_per_class(0)
        .maintenance_interval(Duration::ZERO)
        .build()
        .unwrap();
    let manager = MemoryManager::with_config(backend, config).unwrap();
    let buffers: Vec<_> = (0..4)
        .map(|_| manager.allocate_bytes(4096).unwrap())
        .collect();
    // While prewarm's first block is being allocated, four drops fill the class to its cap.
    *on_allocate.lock().unwrap() = Some(Box::new(move || drop(buffers)));
    let added = manager.prewarm(4096, 4).unwrap();
    assert_eq!(added, 0, "the class was full by the time the block arrived");
    let stats = manager.stats();
    let class = stats.class(4096, MemoryKind::Device).unwrap();
    assert_eq!(
        class.backend_allocations, 5,
        "four misses and the prewarmed block"
    );
    assert_eq!(class.backend_releases, 1, "the prewarmed block went back");
    assert_consistent_sim(&stats, &sim);
}

/// B3: a miss whose zeroing failed released its fresh block without counting the allocation
/// or the release.
#[test]
fn b3_a_miss_whose_zeroing_fails_counts_its_allocation_and_release() {
    let (manager, sim, fail) = flaky_manager();
    fail.store(true, Ordering::SeqCst);
    assert!(manager.allocate_bytes(4096).is_err());
    let stats = manager.stats();
    let class = stats.class(4096, MemoryKind::Device).unwrap();
    assert_eq!((class.backend_allocations, class.backend_releases), (1, 1));
    assert_eq!(stats.totals.failed_requests, 1);
    assert_eq!(stats.totals.requests, 0);
    assert_consistent_sim(&stats, &sim);
}

/// B4: the peak followed the budget reservation, raised before the backend was asked, so a
/// request the device refused left a peak it never reached.
#[test]
fn b4_a_refused_request_leaves_no_peak() {
    let (manager, sim) = crate::common::sim_manager_on(
        SimConfig {
            capacity_bytes: 1 << 30,
            ..SimConfig::default()
        },
        defaults(),
    );
    let kept = manager.allocate_bytes(4096).unwrap();
    assert!(matches!(
        manager.allocate_bytes(4 << 30),
        Err(gpupool::PoolError::OutOfMemory { .. } | gpupool::PoolError::TooLarge { .. })
    ));
    let class_only = manager.allocate_bytes(512 << 10);
    assert!(class_only.is_ok());
    let stats = manager.stats();
    assert_eq!(
        stats.totals.peak_reserved_bytes,
        4096 + (512 << 10),
        "the peak counts only what the device handed over"
    );
    let summary = gpupool::dashboard::summary(&stats);
    assert!(!summary.contains("4.00 GiB"), "{summary}");
    assert_consistent_sim(&stats, &sim);
    drop(kept);
}

/// B5: `prewarm(2 MiB, 8)` filled the 2 MiB class, but requests above 1 MiB go to the large
/// arena, so the prewarmed blocks were never used and every request still missed.
#[test]
fn b5_prewarm_fills_what_requests_of_that_size_use() {
    let (manager, sim) = sim_manager(defaults());
    assert_eq!(manager.prewarm(2 * MIB, 8).unwrap(), 8);
    let allocations_after_prewarm = sim.counters().allocations;
    let buffers: Vec<_> = (0..8)
        .map(|_| manager.allocate_bytes(2 * MIB).unwrap())
        .collect();
    assert!(buffers.iter().all(|buffer| buffer.is_large()));
    assert_eq!(
        sim.counters().allocations,
        allocations_after_prewarm,
        "every request was served by the prewarmed segment"
    );
    let stats = manager.stats();
    assert_eq!(stats.devices[0].large.hits, 8);
    assert_eq!(stats.devices[0].large.misses, 0);
    assert_eq!(stats.devices[0].large.prewarmed_segments, 1);
    assert_consistent_sim(&stats, &sim);
    drop(buffers);
    // Class sizes still prewarm their class.
    assert_eq!(manager.prewarm(4096, 3).unwrap(), 3);
    drop(manager.allocate_bytes(4096).unwrap());
    assert_eq!(
        manager
            .stats()
            .class(4096, MemoryKind::Device)
            .unwrap()
            .hits,
        1
    );
}

/// Host memory on a stream-ordered device, counting `wait_for_stream` calls, and failing them
/// while `fail` is set.
struct StreamWaits {
    waits: Arc<std::sync::atomic::AtomicUsize>,
    fail: Arc<AtomicBool>,
}

impl Backend for StreamWaits {
    fn name(&self) -> &str {
        "stream-waits"
    }
    fn kinds(&self) -> &[MemoryKind] {
        &[MemoryKind::HostVisible]
    }
    fn allocate(&self, bytes: usize, _kind: MemoryKind) -> Result<Block, BackendError> {
        // The host backend's memory, with this backend's stream semantics.
        gpupool::backend::host::HostBackend::new().allocate(bytes, MemoryKind::HostVisible)
    }
    fn release(&self, block: Block) {
        gpupool::backend::host::HostBackend::new().release(block)
    }
    fn stream_ordered(&self) -> Option<&dyn StreamOrdered> {
        Some(self)
    }
}

impl StreamOrdered for StreamWaits {
    fn record_fence(&self, _stream: StreamId) -> Result<Arc<dyn Fence>, BackendError> {
        Ok(Arc::new(gpupool::fence::CompletedFence))
    }
    fn synchronize(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn wait_for_stream(&self, _stream: StreamId) -> Result<(), BackendError> {
        self.waits.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            Err(BackendError::Driver("injected stream failure".into()))
        } else {
            Ok(())
        }
    }
}

/// Host-visible memory is handed out at once on its stream while the previous owner's work
/// and the zeroing may still be queued there: the first host access waits for the stream,
/// once per buffer, and a failed wait is an error, not an access.
#[test]
fn host_visible_access_waits_for_the_stream_once_per_buffer() {
    let waits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let fail = Arc::new(AtomicBool::new(false));
    let backend = StreamWaits {
        waits: waits.clone(),
        fail: fail.clone(),
    };
    let config = defaults()
        .zero_on_reuse(true)
        .maintenance_interval(Duration::ZERO)
        .build()
        .unwrap();
    let manager = MemoryManager::with_config(backend, config).unwrap();
    let mut buffer = manager.allocate::<u32>(100).unwrap();
    assert_eq!(
        waits.load(Ordering::SeqCst),
        0,
        "no wait before host access"
    );
    buffer.as_mut_slice().unwrap().fill(7);
    assert_eq!(buffer.as_slice().unwrap()[99], 7);
    assert_eq!(waits.load(Ordering::SeqCst), 1, "one wait per buffer");
    drop(buffer);
    let mut reused = manager.allocate::<u32>(100).unwrap();
    fail.store(true, Ordering::SeqCst);
    assert!(matches!(
        reused.as_mut_slice(),
        Err(gpupool::PoolError::Backend { .. })
    ));
    fail.store(false, Ordering::SeqCst);
    assert!(
        reused.as_slice().unwrap().iter().all(|&value| value == 0),
        "zeroed on reuse"
    );
    assert_eq!(waits.load(Ordering::SeqCst), 3);
}

fn assert_consistent_sim(stats: &gpupool::PoolStats, sim: &SimBackend) {
    crate::common::assert_consistent(stats, sim);
}

/// Fuzzing (fuzz/fuzz_targets/config_builder.rs): `virtual_memory_pages(Some(usize::MAX))`
/// made the arena round the page size up to a multiple of the granularity, which overflowed
/// (a panic with overflow checks, a page size of 0 without). Such page sizes now leave the
/// device without an arena: large requests are served from segments.
#[test]
fn virtual_memory_pages_near_usize_max_do_not_overflow() {
    use gpupool::backend::sim::SIM_PAGE_BYTES;
    for page_bytes in [usize::MAX, usize::MAX - SIM_PAGE_BYTES + 2] {
        let sim = SimBackend::new(SimConfig {
            capacity_bytes: 1 << 30,
            virtual_memory: true,
            ..SimConfig::default()
        });
        let config = defaults()
            .virtual_memory_pages(Some(page_bytes))
            .maintenance_interval(Duration::ZERO)
            .build()
            .unwrap();
        let manager = MemoryManager::with_config(sim.clone(), config).unwrap();
        let buffer = manager.allocate_bytes(4 * MIB).unwrap();
        assert!(buffer.is_large());
        assert_consistent_sim(&manager.stats(), &sim);
        drop(buffer);
        drop(manager);
        assert_eq!(sim.counters().live_allocations, 0);
    }
}

/// Fuzzing (fuzz/fuzz_targets/config_builder.rs): a page size just short of `usize::MAX - 2 MiB`
/// rounds without overflow, so the arena asked the sim for a reservation of that size, and the
/// sim's address arithmetic overflowed. The sim now refuses a reservation past the end of the
/// address space, as a driver does, and the pool serves large requests from segments.
#[test]
fn a_reservation_past_the_end_of_the_address_space_is_refused() {
    let page_bytes = 18_446_744_039_299_284_220; // the fuzzer's, about 2^64 − 2^35
    let sim = SimBackend::new(SimConfig {
        capacity_bytes: 1 << 30,
        virtual_memory: true,
        ..SimConfig::default()
    });
    let config = defaults()
        .virtual_memory_pages(Some(page_bytes))
        .maintenance_interval(Duration::ZERO)
        .build()
        .unwrap();
    let manager = MemoryManager::with_config(sim.clone(), config).unwrap();
    assert_eq!(sim.counters().reserved_address_bytes, 0, "nothing reserved");
    let buffer = manager.allocate_bytes(4 * MIB).unwrap();
    assert!(buffer.is_large());
    assert_consistent_sim(&manager.stats(), &sim);
    drop(buffer);
    drop(manager);
    assert_eq!(sim.counters().live_allocations, 0);
}

/// A lost device: its work never finishes and every wait for it fails.
struct LostDevice {
    sim: SimBackend,
}

/// A fence of work that never finishes.
struct NeverFence;

impl Fence for NeverFence {
    fn is_complete(&self) -> bool {
        false
    }
}

impl Backend for LostDevice {
    fn name(&self) -> &str {
        "lost"
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
    fn stream_ordered(&self) -> Option<&dyn StreamOrdered> {
        Some(self)
    }
}

impl StreamOrdered for LostDevice {
    fn record_fence(&self, _stream: StreamId) -> Result<Arc<dyn Fence>, BackendError> {
        Ok(Arc::new(NeverFence))
    }
    fn synchronize(&self) -> Result<(), BackendError> {
        Err(BackendError::Driver("injected: device lost".into()))
    }
    fn wait_for_stream(&self, _stream: StreamId) -> Result<(), BackendError> {
        Err(BackendError::Driver("injected: device lost".into()))
    }
}

/// Blocks trimmed while their stream's work was unfinished wait in the deferred list; when
/// the pool ended and its wait for the device failed, they were never released (a leak for
/// the life of the process). Now the pool's end releases them anyway.
#[test]
fn a_failed_synchronize_as_the_pool_ends_leaks_nothing() {
    let sim = SimBackend::new(SimConfig::default());
    let config = defaults()
        .maintenance_interval(Duration::ZERO)
        .build()
        .unwrap();
    let manager = MemoryManager::with_config(LostDevice { sim: sim.clone() }, config).unwrap();
    drop(manager.allocate::<u8>(4096).unwrap());
    drop(manager.allocate::<u8>(8 * MIB).unwrap());
    manager.trim(TrimLevel::Aggressive);
    let stats = manager.stats();
    assert!(
        stats.totals.pending_release_blocks > 0,
        "the trimmed blocks wait for their fences: {:?}",
        stats.totals
    );
    drop(manager);
    let ledger = sim.counters();
    assert_eq!(ledger.live_allocations, 0, "leaked: {ledger:?}");
    assert_eq!(ledger.invalid_releases, 0, "{ledger:?}");
}

/// A request larger than the whole budget emptied every cache before it was refused, though no
/// release could ever make it fit; one that fits once idle blocks go is retried, and counted.
#[test]
fn a_request_above_the_whole_budget_keeps_the_cache() {
    let sim = SimBackend::new(SimConfig::default());
    let config = defaults()
        .budget_bytes(Some(MIB as u64))
        .maintenance_interval(Duration::ZERO)
        .build()
        .unwrap();
    let manager = MemoryManager::with_config(sim.clone(), config).unwrap();
    drop(manager.allocate_bytes(512 << 10).unwrap());
    let refused = manager.allocate_bytes(2 * MIB).unwrap_err();
    assert!(
        matches!(refused, PoolError::BudgetExceeded { .. }),
        "{refused:?}"
    );
    let stats = manager.stats();
    assert_eq!(stats.totals.cached_bytes, 512 << 10, "the cache stays");
    assert_eq!(stats.totals.alloc_retries, 0);
    let fits_after_release = manager.allocate_bytes(MIB).unwrap();
    let stats = manager.stats();
    assert_eq!(stats.totals.alloc_retries, 1);
    assert_eq!(stats.totals.cached_bytes, 0, "released to make room");
    drop(fits_after_release);
}

/// A sim device whose fence recordings and waits fail while `failing` is set, whose queued work
/// runs until `finish` (its fences complete then, as after a successful wait), and which
/// counts the releases made while that work ran.
#[derive(Clone, Default)]
struct BrokenWaits {
    sim: SimBackend,
    failing: Arc<AtomicBool>,
    running: Arc<AtomicBool>,
    fences: Arc<std::sync::Mutex<Vec<Arc<ManualFence>>>>,
    early_releases: Arc<std::sync::atomic::AtomicUsize>,
}

impl BrokenWaits {
    /// The GPU finishes its work: every fence recorded so far completes.
    fn finish(&self) {
        self.running.store(false, Ordering::SeqCst);
        for fence in self.fences.lock().unwrap().drain(..) {
            fence.0.store(true, Ordering::Release);
        }
    }

    fn wait(&self) -> Result<(), BackendError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(BackendError::Driver("injected: wait failed".into()));
        }
        self.finish();
        Ok(())
    }
}

impl Backend for BrokenWaits {
    fn name(&self) -> &str {
        "broken-waits"
    }
    fn kinds(&self) -> &[MemoryKind] {
        self.sim.kinds()
    }
    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        self.sim.allocate(bytes, kind)
    }
    fn release(&self, block: Block) {
        if self.running.load(Ordering::SeqCst) {
            self.early_releases.fetch_add(1, Ordering::SeqCst);
        }
        self.sim.release(block)
    }
    fn stream_ordered(&self) -> Option<&dyn StreamOrdered> {
        Some(self)
    }
}

impl StreamOrdered for BrokenWaits {
    fn record_fence(&self, _stream: StreamId) -> Result<Arc<dyn Fence>, BackendError> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(BackendError::Driver("injected: no fence".into()));
        }
        let fence = Arc::new(ManualFence(AtomicBool::new(
            !self.running.load(Ordering::SeqCst),
        )));
        self.fences.lock().unwrap().push(fence.clone());
        Ok(fence)
    }
    fn synchronize(&self) -> Result<(), BackendError> {
        self.wait()
    }
    fn wait_for_stream(&self, _stream: StreamId) -> Result<(), BackendError> {
        self.wait()
    }
}

fn broken_waits_manager() -> (MemoryManager, BrokenWaits) {
    let device = BrokenWaits::default();
    let config = defaults()
        .maintenance_interval(Duration::ZERO)
        .build()
        .unwrap();
    let manager = MemoryManager::with_config(device.clone(), config).unwrap();
    (manager, device)
}

/// A trimmed block whose work was still running went back to the device when no fence could
/// be recorded for it and the wait that stood in for the fence failed too: the pool ignored
/// the failed wait. Now the block stays deferred, gets its fence at a later reap, and goes
/// back once that fence completes (the stress found it with failing waits injected).
#[test]
fn a_release_whose_fence_and_wait_both_fail_waits_for_a_later_fence() {
    let (manager, device) = broken_waits_manager();
    drop(manager.allocate::<u8>(4096).unwrap());
    device.running.store(true, Ordering::SeqCst); // kernels using the block still run
    device.failing.store(true, Ordering::SeqCst);
    manager.trim(TrimLevel::Aggressive);
    assert_eq!(device.early_releases.load(Ordering::SeqCst), 0);
    assert_eq!(manager.stats().totals.pending_release_blocks, 1);
    device.failing.store(false, Ordering::SeqCst);
    manager.trim(TrimLevel::Aggressive); // the deferred block gets its fence
    assert_eq!(manager.stats().totals.pending_release_blocks, 1);
    assert_eq!(device.sim.counters().live_allocations, 1);
    device.finish();
    manager.trim(TrimLevel::Aggressive);
    assert_eq!(manager.stats().totals.pending_release_blocks, 0);
    let ledger = device.sim.counters();
    assert_eq!((ledger.live_allocations, ledger.invalid_releases), (0, 0));
    assert_eq!(device.early_releases.load(Ordering::SeqCst), 0);
}

/// A buffer used on a second stream (`record_stream`) is dropped when no fence can be recorded
/// on that stream and the wait that stands in for it fails: the pool ignored the failed wait
/// and handed the block out again on its own stream while the second stream's work still ran.
/// Now a fence on that stream is recorded later, and the block waits for it.
#[test]
fn a_recorded_stream_whose_fence_and_wait_fail_at_drop_holds_the_block_back() {
    let (manager, device) = broken_waits_manager();
    let mut buffer = manager.allocate::<u8>(4096).unwrap();
    let address = buffer.device_address();
    buffer.record_stream(StreamId(1));
    device.running.store(true, Ordering::SeqCst);
    device.failing.store(true, Ordering::SeqCst);
    drop(buffer);
    device.failing.store(false, Ordering::SeqCst);
    let meanwhile = manager.allocate::<u8>(4096).unwrap();
    assert_ne!(
        meanwhile.device_address(),
        address,
        "handed out while the recorded stream's work runs"
    );
    device.finish();
    let again = manager.allocate::<u8>(4096).unwrap();
    assert_eq!(
        again.device_address(),
        address,
        "usable once its fence completed"
    );
    drop((meanwhile, again));
    manager.trim(TrimLevel::Aggressive);
    manager.trim(TrimLevel::Aggressive);
    assert_eq!(device.sim.counters().live_allocations, 0);
    assert_eq!(device.early_releases.load(Ordering::SeqCst), 0);
}

/// An asynchronous sim device whose next release, once `armed`, stops until the test says so:
/// a driver's free that takes a while, in the middle of another thread's batch of releases.
#[derive(Clone)]
struct SlowRelease {
    sim: SimBackend,
    armed: Arc<AtomicBool>,
    /// Told when the armed release has started.
    entered: Arc<std::sync::Mutex<std::sync::mpsc::Sender<()>>>,
    /// What the armed release waits for.
    go: Arc<std::sync::Mutex<std::sync::mpsc::Receiver<()>>>,
}

impl Backend for SlowRelease {
    fn name(&self) -> &str {
        "slow-release"
    }
    fn kinds(&self) -> &[MemoryKind] {
        self.sim.kinds()
    }
    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        self.sim.allocate(bytes, kind)
    }
    fn release(&self, block: Block) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.entered.lock().unwrap().send(()).unwrap();
            self.go.lock().unwrap().recv().unwrap();
        }
        self.sim.release(block)
    }
    fn stream_ordered(&self) -> Option<&dyn StreamOrdered> {
        self.sim.stream_ordered()
    }
}

/// A maintenance tick takes the deferred blocks whose fences completed out of the deferred
/// list and gives them to the device one at a time, with no lock held. A `clear()` running
/// meanwhile found an empty list and nothing cached, and returned while the device still held
/// those blocks (the stress test's "device still holds N allocations after clearing with no
/// buffer alive; the pool: 0 blocks held, 0 pending release", a few runs in a hundred, with
/// background maintenance). Now a clear waits for a tick under way, and returns with every
/// block back.
#[test]
fn a_clear_racing_a_maintenance_tick_returns_with_every_block_released() {
    let sim = SimBackend::new(SimConfig {
        asynchronous: true,
        ..SimConfig::default()
    });
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let device = SlowRelease {
        sim: sim.clone(),
        armed: Arc::new(AtomicBool::new(false)),
        entered: Arc::new(std::sync::Mutex::new(entered_tx)),
        go: Arc::new(std::sync::Mutex::new(go_rx)),
    };
    // No background thread: the test runs the tick itself, on a thread of its own.
    let config = defaults()
        .maintenance_interval(Duration::ZERO)
        .build()
        .unwrap();
    let manager = MemoryManager::with_config(device.clone(), config).unwrap();
    let buffers = [
        manager.allocate::<u8>(4096).unwrap(),
        manager.allocate::<u8>(4096).unwrap(),
    ];
    drop(buffers);
    // Their stream's work may still run: the clear defers them behind a fence...
    manager.clear();
    assert_eq!(manager.stats().totals.pending_release_blocks, 2);
    // ...which completes, so the next reap releases them.
    sim.complete_fences();
    device.armed.store(true, Ordering::SeqCst);
    let tick = {
        let manager = manager.clone();
        std::thread::spawn(move || manager.run_maintenance())
    };
    entered.recv().unwrap(); // the tick is releasing the first block
    let (done_tx, done) = std::sync::mpsc::channel();
    let clearer = {
        let manager = manager.clone();
        let sim = sim.clone();
        std::thread::spawn(move || {
            manager.clear();
            done_tx.send(sim.counters().live_allocations).unwrap();
        })
    };
    // Without the fix the clear returns at once, the tick still stopped in its release; with
    // it, the clear waits for the tick, which goes on only when told to.
    let while_the_tick_releases = done.recv_timeout(Duration::from_millis(200)).ok();
    go.send(()).unwrap();
    let live_after_clear = while_the_tick_releases.unwrap_or_else(|| done.recv().unwrap());
    tick.join().unwrap();
    clearer.join().unwrap();
    assert_eq!(
        live_after_clear, 0,
        "clear() returned while the device still held blocks a maintenance tick was releasing"
    );
    let ledger = sim.counters();
    assert_eq!((ledger.live_allocations, ledger.invalid_releases), (0, 0));
    assert_eq!(manager.stats().totals.pending_release_blocks, 0);
}
