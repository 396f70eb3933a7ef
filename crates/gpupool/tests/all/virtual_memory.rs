//! The virtual-memory arena on the sim device: one reserved range, best fit, merging across
//! what would be segment boundaries, pages mapped where blocks live and unmapped by trims once
//! their stream's work is done, out-of-memory recovery, and stream safety.

use std::sync::Arc;

use gpupool::backend::sim::{SimConfig, SIM_PAGE_BYTES};
use gpupool::fence::Fence;
use gpupool::{AllocOptions, PoolError, StreamId, TrimLevel};

use crate::common::{assert_consistent, defaults, sim_manager_on};

const MIB: usize = 1 << 20;

fn vm_device(capacity_bytes: u64, asynchronous: bool) -> SimConfig {
    SimConfig {
        capacity_bytes,
        asynchronous,
        virtual_memory: true,
        ..SimConfig::default()
    }
}

/// The defaults with class blocks carved out of small pages among the large blocks.
fn shared_pages() -> gpupool::PoolConfigBuilder {
    defaults().shared_class_pages(true)
}

/// The page every one of `blocks` lies on (they must share one).
fn the_one_page_of(blocks: &[gpupool::PooledBuffer<u8>]) -> u64 {
    let page_of = |address: u64| address & !(SIM_PAGE_BYTES as u64 - 1);
    let page = page_of(blocks[0].device_address());
    assert!(blocks
        .iter()
        .all(|block| page_of(block.device_address()) == page));
    page
}

fn on(stream: u64) -> AllocOptions {
    AllocOptions {
        stream: StreamId(stream),
        ..AllocOptions::default()
    }
}

#[test]
fn freed_neighbours_merge_and_serve_a_larger_block_without_a_new_page() {
    let (manager, sim) = sim_manager_on(vm_device(1 << 30, false), defaults());
    let a = manager.allocate_bytes(3 * MIB).unwrap();
    let b = manager.allocate_bytes(5 * MIB).unwrap();
    let c = manager.allocate_bytes(3 * MIB).unwrap();
    assert!(a.is_large() && b.is_large() && c.is_large());
    assert_eq!(
        b.device_address(),
        a.device_address() + 3 * MIB as u64,
        "one range"
    );
    let a_address = a.device_address();
    let mapped = sim.counters().allocations;
    drop((a, b));
    let merged = manager.allocate_bytes(8 * MIB).unwrap();
    assert_eq!(merged.device_address(), a_address, "a and b merged");
    assert_eq!(sim.counters().allocations, mapped, "no page mapped");
    let stats = manager.stats();
    assert_eq!(stats.devices[0].large.hits, 1);
    assert_eq!(
        stats.totals.reserved_bytes,
        6 * SIM_PAGE_BYTES as u64,
        "six 2 MiB pages hold 11 MiB of blocks"
    );
    assert!(stats.devices[0].large.address_space_bytes >= 1 << 31);
    assert_consistent(&stats, &sim);
    drop((merged, c));
}

#[test]
fn pages_are_unmapped_by_a_trim_only_once_their_streams_work_is_done() {
    let (manager, sim) = sim_manager_on(vm_device(1 << 30, true), defaults());
    let block = manager.allocate_with::<u8>(6 * MIB, on(1)).unwrap();
    drop(block);
    assert_eq!(
        sim.counters().live_bytes,
        6 * MIB as u64,
        "mapped while free"
    );
    manager.trim(TrimLevel::Aggressive);
    assert_eq!(
        sim.counters().live_bytes,
        6 * MIB as u64,
        "stream 1's work may still use the pages"
    );
    assert_eq!(sim.counters().synchronizations, 0, "no device-wide wait");
    sim.complete_fences();
    let report = manager.trim(TrimLevel::Aggressive);
    assert_eq!(report.bytes, 6 * MIB as u64);
    assert_eq!(sim.counters().live_bytes, 0);
    assert_consistent(&manager.stats(), &sim);
}

#[test]
fn out_of_memory_unmaps_free_pages_and_retries() {
    let (manager, sim) = sim_manager_on(vm_device(64 * MIB as u64, false), defaults());
    let first = manager.allocate_with::<u8>(40 * MIB, on(1)).unwrap();
    drop(first);
    // Stream 2 cannot use stream 1's free space: it needs new pages, which do not fit until
    // the free ones are unmapped.
    let second = manager.allocate_with::<u8>(40 * MIB, on(2)).unwrap();
    assert_eq!(sim.counters().live_bytes, 40 * MIB as u64);
    let never = manager.allocate_with::<u8>(100 * MIB, on(2));
    assert!(
        matches!(never, Err(PoolError::TooLarge { limit_bytes, .. }) if limit_bytes == 64 * MIB as u64),
        "{never:?}"
    );
    let not_now = manager.allocate_with::<u8>(30 * MIB, on(2));
    assert!(
        matches!(not_now, Err(PoolError::OutOfMemory { .. })),
        "{not_now:?}"
    );
    assert_eq!(second.len(), 40 * MIB, "the live buffer is untouched");
    assert_eq!(
        manager.stats().totals.alloc_retries,
        1,
        "larger than the device: refused without a retry; the 30 MiB request was retried"
    );
    assert_consistent(&manager.stats(), &sim);
}

#[test]
fn the_budget_counts_pages_and_a_refusal_leaks_nothing() {
    let (manager, sim) = sim_manager_on(
        vm_device(1 << 30, false),
        defaults().budget_bytes(Some(16 * MIB as u64)),
    );
    let refused = manager.allocate_bytes(20 * MIB);
    assert!(
        matches!(refused, Err(PoolError::BudgetExceeded { .. })),
        "{refused:?}"
    );
    let fits = manager.allocate_bytes(15 * MIB).unwrap();
    assert_eq!(sim.counters().live_bytes, 16 * MIB as u64);
    let stats = manager.stats();
    assert_eq!(stats.totals.peak_reserved_bytes, 16 * MIB as u64);
    assert_consistent(&stats, &sim);
    drop(fits);
}

#[derive(Default)]
struct ManualFence(std::sync::atomic::AtomicBool);

impl Fence for ManualFence {
    fn is_complete(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[test]
fn space_freed_on_one_stream_goes_to_no_other_and_fenced_space_to_nobody() {
    let (manager, sim) = sim_manager_on(vm_device(1 << 30, true), defaults());
    let on_one = manager.allocate_with::<u8>(4 * MIB, on(1)).unwrap();
    let address = on_one.device_address();
    drop(on_one);
    let on_two = manager.allocate_with::<u8>(4 * MIB, on(2)).unwrap();
    assert_ne!(on_two.device_address(), address, "stream 1's space");
    let again = manager.allocate_with::<u8>(4 * MIB, on(1)).unwrap();
    assert_eq!(
        again.device_address(),
        address,
        "same-stream reuse is immediate"
    );
    let mut fenced = again;
    let fence = Arc::new(ManualFence::default());
    fenced.used_by(fence.clone());
    drop(fenced);
    let other = manager.allocate_with::<u8>(4 * MIB, on(1)).unwrap();
    assert_ne!(other.device_address(), address, "its fence is pending");
    fence.0.store(true, std::sync::atomic::Ordering::Release);
    let reused = manager.allocate_with::<u8>(4 * MIB, on(1)).unwrap();
    assert_eq!(
        reused.device_address(),
        address,
        "reusable once the fence completed"
    );
    drop((on_two, other, reused));
    drop(manager);
    assert_eq!(
        sim.counters().live_bytes,
        0,
        "everything unmapped at the end"
    );
    assert_eq!(
        sim.counters().reserved_address_bytes,
        0,
        "and the range given back"
    );
    assert_eq!(sim.counters().invalid_releases, 0);
}

#[test]
fn prewarm_maps_the_pages_requests_of_that_size_use() {
    let (manager, sim) = sim_manager_on(vm_device(1 << 30, false), defaults());
    assert_eq!(manager.prewarm(4 * MIB, 4).unwrap(), 4);
    let mapped = sim.counters().allocations;
    let buffers: Vec<_> = (0..4)
        .map(|_| manager.allocate_bytes(4 * MIB).unwrap())
        .collect();
    assert_eq!(
        sim.counters().allocations,
        mapped,
        "no page mapped after prewarm"
    );
    assert_eq!(manager.stats().devices[0].large.hits, 4);
    drop(buffers);
}

#[test]
fn another_stream_reuses_freed_space_once_a_fence_on_its_stream_completed() {
    let (manager, sim) = sim_manager_on(vm_device(1 << 30, true), defaults());
    let on_one = manager.allocate_with::<u8>(8 * MIB, on(1)).unwrap();
    let address = on_one.device_address();
    let tail = manager.allocate_with::<u8>(2 * MIB, on(1)).unwrap();
    drop(on_one);
    // Stream 2 misses: stream 1's space gets a fence, still pending (its work may run).
    let first = manager.allocate_with::<u8>(8 * MIB, on(2)).unwrap();
    assert_ne!(first.device_address(), address);
    sim.complete_fences();
    // The fence completed: the space is fresh now, for any stream.
    let second = manager.allocate_with::<u8>(8 * MIB, on(2)).unwrap();
    assert_eq!(
        second.device_address(),
        address,
        "reused across streams after the fence"
    );
    assert_eq!(sim.counters().synchronizations, 0, "no device-wide wait");
    assert_consistent(&manager.stats(), &sim);
    drop((first, second, tail));
}

#[test]
fn reclaim_at_peak_moves_free_pages_instead_of_growing_the_peak() {
    for (reclaim, expected_peak) in [(false, 12 * MIB), (true, 8 * MIB)] {
        let (manager, sim) = sim_manager_on(
            vm_device(1 << 30, false),
            defaults().reclaim_at_peak(reclaim),
        );
        let first = manager.allocate_bytes(4 * MIB).unwrap();
        let kept = manager.allocate_bytes(2 * MIB).unwrap();
        drop(first);
        // 6 MiB fits neither the 4 MiB hole nor any mapped space: new pages are needed.
        let bigger = manager.allocate_bytes(6 * MIB).unwrap();
        let stats = manager.stats();
        assert_eq!(
            stats.totals.peak_reserved_bytes, expected_peak as u64,
            "reclaim_at_peak({reclaim})"
        );
        assert_consistent(&stats, &sim);
        drop((kept, bigger));
    }
}

/// Review regression: a trim marked a handle unmapped in the arena's books and unmapped it
/// after releasing the lock; an allocation in between mapped the same pages again (a double
/// mapping, then an unmap of the new one). Unmaps now happen under the arena's lock.
#[test]
fn a_trim_racing_allocations_never_maps_a_range_twice() {
    let (manager, sim) = sim_manager_on(vm_device(1 << 30, false), defaults());
    let manager = Arc::new(manager);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trimmer = {
        let (manager, stop) = (manager.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                manager.trim(TrimLevel::Aggressive);
            }
        })
    };
    let rounds = if cfg!(miri) { 50 } else { 20_000 };
    for _ in 0..rounds {
        drop(manager.allocate_bytes(4 * MIB).unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trimmer.join().unwrap();
    assert_eq!(sim.counters().invalid_releases, 0, "a range mapped twice");
    manager.trim(TrimLevel::Aggressive);
    assert_consistent(&manager.stats(), &sim);
}

/// Review regression: when a later device failed to open, the address space the earlier ones
/// had reserved was never given back.
#[test]
fn a_device_that_fails_to_open_leaves_no_reservation_behind() {
    let first = gpupool::backend::sim::SimBackend::new(vm_device(1 << 30, false));
    let broken = gpupool::backend::sim::SimBackend::new(SimConfig {
        kinds: Vec::new(),
        ..SimConfig::default()
    });
    let backends: Vec<Arc<dyn gpupool::Backend>> = vec![Arc::new(first.clone()), Arc::new(broken)];
    let config = defaults()
        .maintenance_interval(std::time::Duration::ZERO)
        .build()
        .unwrap();
    let opened = gpupool::MemoryManager::with_devices(backends, config);
    assert!(
        matches!(opened, Err(PoolError::InvalidConfig(_))),
        "{opened:?}"
    );
    assert_eq!(first.counters().reserved_address_bytes, 0);
}

/// Review regression: the arena's key for "no stream" was also a valid stream id, whose free
/// space would then have served every stream at once.
#[test]
fn the_last_stream_id_is_served_by_segments_not_the_arena() {
    let (manager, sim) = sim_manager_on(vm_device(1 << 30, true), defaults());
    let odd = manager.allocate_with::<u8>(4 * MIB, on(u64::MAX)).unwrap();
    assert!(odd.is_large());
    let address = odd.device_address();
    drop(odd);
    let other = manager.allocate_with::<u8>(4 * MIB, on(1)).unwrap();
    assert_ne!(
        other.device_address(),
        address,
        "its space went to another stream"
    );
    assert_eq!(manager.stats().devices[0].large.prewarmed_segments, 0);
    assert_consistent(&manager.stats(), &sim);
    drop(other);
}

#[test]
fn idle_class_blocks_go_back_before_a_mapping_raises_the_peak() {
    let guarded = |enabled: bool| {
        let config = shared_pages().release_idle_at_peak(enabled);
        let (manager, sim) = sim_manager_on(vm_device(1 << 30, false), config);
        // 4 MiB of idle 512 KiB class blocks, then a large block that must map fresh pages.
        let small: Vec<_> = (0..8)
            .map(|_| manager.allocate_bytes(512 * 1024).unwrap())
            .collect();
        drop(small);
        let before = manager.peak_reserved_bytes();
        let large = manager.allocate_bytes(4 * MIB).unwrap();
        let stats = manager.stats();
        assert_consistent(&stats, &sim);
        let idle = stats.totals.cached_bytes - stats.devices[0].large.free_bytes;
        let peak = manager.peak_reserved_bytes();
        drop(large);
        (before, peak, idle)
    };
    let (before, peak, idle) = guarded(true);
    assert_eq!(before, 4 * MIB as u64);
    assert_eq!(
        peak, before,
        "the idle class blocks made room for the pages"
    );
    assert_eq!(idle, 0, "every idle class block went back");
    let (before, peak, idle) = guarded(false);
    assert_eq!(peak, before + 4 * MIB as u64, "off: the seed's behaviour");
    assert_eq!(idle, 4 * MIB as u64);
}

#[test]
fn below_the_peak_idle_class_blocks_stay_cached() {
    let (manager, sim) = sim_manager_on(vm_device(1 << 30, false), shared_pages());
    let large = manager.allocate_bytes(8 * MIB).unwrap();
    drop(large);
    let trimmed = manager.trim(TrimLevel::Aggressive);
    assert!(trimmed.bytes >= 8 * MIB as u64);
    let small: Vec<_> = (0..4)
        .map(|_| manager.allocate_bytes(512 * 1024).unwrap())
        .collect();
    drop(small);
    // 2 MiB idle in the class, 0 mapped: mapping 4 MiB stays below the 8 MiB peak.
    let large = manager.allocate_bytes(4 * MIB).unwrap();
    let stats = manager.stats();
    assert_eq!(
        stats.totals.cached_bytes - stats.devices[0].large.free_bytes,
        2 * MIB as u64
    );
    assert_consistent(&stats, &sim);
    drop(large);
}

#[test]
fn class_blocks_are_carved_out_of_shared_small_pages() {
    let (manager, sim) = sim_manager_on(vm_device(1 << 30, false), shared_pages());
    let blocks: Vec<_> = (0..100)
        .map(|_| manager.allocate_bytes(4096).unwrap())
        .collect();
    let stats = manager.stats();
    assert_consistent(&stats, &sim);
    assert_eq!(
        sim.counters().allocations,
        1,
        "one page mapped for 100 class blocks"
    );
    assert_eq!(stats.totals.reserved_bytes, SIM_PAGE_BYTES as u64);
    let class = stats.class(4096, gpupool::MemoryKind::Device).unwrap();
    assert_eq!((class.arena_blocks, class.backend_allocations), (100, 0));
    assert_eq!(stats.devices[0].large.class_blocks, 100);
    assert_eq!(stats.devices[0].large.class_bytes, 100 * 4096);
    the_one_page_of(&blocks);
    drop(blocks);
    // Idle class blocks go back into the arena: their page serves a large block at once.
    manager.trim(TrimLevel::Aggressive);
    let stats = manager.stats();
    assert_consistent(&stats, &sim);
    assert_eq!(stats.devices[0].large.class_blocks, 0);
    let class = stats.class(4096, gpupool::MemoryKind::Device).unwrap();
    assert_eq!(class.arena_returns, 100);
    let _ = stats;
    let with_backend = sim_manager_on(
        vm_device(1 << 30, false),
        defaults().carve_class_blocks(false),
    );
    let (manager_b, sim_b) = with_backend;
    let small = manager_b.allocate_bytes(4096).unwrap();
    assert_eq!(small.block_bytes(), 4096);
    let stats = manager_b.stats();
    assert_consistent(&stats, &sim_b);
    assert_eq!(
        stats
            .class(4096, gpupool::MemoryKind::Device)
            .unwrap()
            .backend_allocations,
        1,
        "off: one backend allocation per class block"
    );
}

#[test]
fn a_small_page_whose_blocks_all_left_serves_large_blocks_again() {
    let (manager, sim) = sim_manager_on(vm_device(1 << 30, false), shared_pages());
    let small = manager.allocate_bytes(64 * 1024).unwrap();
    let page = small.device_address();
    drop(small); // idle in its class, on the one page mapped so far
                 // A page-sized block would map a second page, past the peak: the idle class block goes
                 // back into the arena first, its page becomes ordinary free space and takes the block.
    let large = manager.allocate_bytes(SIM_PAGE_BYTES).unwrap();
    assert_eq!(large.device_address(), page);
    assert_eq!(sim.counters().allocations, 1, "no second page mapped");
    assert_eq!(manager.peak_reserved_bytes(), SIM_PAGE_BYTES as u64);
    assert_consistent(&manager.stats(), &sim);
}

#[test]
fn carved_class_blocks_wait_for_their_streams_work_before_another_stream_reuses_them() {
    for shared in [false, true] {
        // Asynchronous device: fences complete only when the device says so.
        let (manager, sim) = sim_manager_on(
            vm_device(1 << 30, true),
            defaults()
                .shared_class_pages(shared)
                .max_idle_per_class(1)
                .min_idle_per_class(0),
        );
        let first = manager.allocate_with::<u8>(4096, on(1)).unwrap();
        let second = manager.allocate_with::<u8>(4096, on(1)).unwrap();
        let addresses = [first.device_address(), second.device_address()];
        // One goes to the class cache, the other past its cap back into the arena, on stream 1.
        drop((first, second));
        let other = manager.allocate_with::<u8>(4096, on(2)).unwrap();
        assert!(
            !addresses.contains(&other.device_address()),
            "shared pages {shared}: stream 2 got a block stream 1's queued work may still use"
        );
        assert_consistent(&manager.stats(), &sim);
        drop(other);
    }
}

/// The default: class blocks are carved out of an address range of their own, many to a page,
/// so no class block ever sits between two large blocks (PyTorch's small segments).
#[test]
fn class_blocks_are_carved_out_of_a_range_of_their_own() {
    let (manager, sim) = sim_manager_on(vm_device(1 << 30, false), defaults());
    let large = manager.allocate_bytes(3 * SIM_PAGE_BYTES).unwrap();
    let blocks: Vec<_> = (0..100)
        .map(|_| manager.allocate_bytes(4096).unwrap())
        .collect();
    let stats = manager.stats();
    assert_consistent(&stats, &sim);
    assert_eq!(
        sim.counters().allocations,
        2,
        "the large block's and one page"
    );
    let class = stats.class(4096, gpupool::MemoryKind::Device).unwrap();
    assert_eq!((class.arena_blocks, class.backend_allocations), (100, 0));
    assert_eq!(stats.devices[0].large.class_bytes, 100 * 4096);
    let page = the_one_page_of(&blocks);
    let large_range = large.device_address()..large.device_address() + 3 * SIM_PAGE_BYTES as u64;
    assert!(!large_range.contains(&page));
    // Two reservations: the large blocks' and the class blocks'.
    assert_eq!(
        stats.devices[0].large.address_space_bytes,
        sim.counters().reserved_address_bytes
    );
    assert_eq!(sim.counters().reserved_address_bytes, 2 * 2 * (1 << 30));
    // A freed large block's space never serves class blocks: their range is apart.
    let address = large.device_address();
    drop(large);
    let more: Vec<_> = (0..600)
        .map(|_| manager.allocate_bytes(4096).unwrap())
        .collect();
    assert!(more.iter().all(|block| {
        let at = block.device_address();
        !(address..address + 3 * SIM_PAGE_BYTES as u64).contains(&at)
    }));
    assert_consistent(&manager.stats(), &sim);
    drop((blocks, more));
    manager.trim(TrimLevel::Aggressive);
    let stats = manager.stats();
    assert_eq!(stats.totals.reserved_bytes, 0, "every page unmapped");
    assert_consistent(&stats, &sim);
}

/// In a range of their own, idle class blocks of one class make room for another class's
/// blocks before that range maps past the peak; a large block's mapping leaves them cached
/// (giving them back would free nothing large blocks can use).
#[test]
fn idle_class_blocks_make_room_in_their_own_range_before_the_peak() {
    let (manager, sim) = sim_manager_on(vm_device(1 << 30, false), defaults());
    let half_page = SIM_PAGE_BYTES / 2;
    let idle: Vec<_> = (0..2)
        .map(|_| manager.allocate_bytes(half_page).unwrap())
        .collect();
    drop(idle);
    assert_eq!(manager.peak_reserved_bytes(), SIM_PAGE_BYTES as u64);
    // Another class, a page's worth: the idle blocks go back, their page serves these.
    let quarters: Vec<_> = (0..4)
        .map(|_| manager.allocate_bytes(half_page / 2).unwrap())
        .collect();
    assert_eq!(manager.peak_reserved_bytes(), SIM_PAGE_BYTES as u64);
    assert_eq!(sim.counters().allocations, 1, "no second page");
    drop(quarters);
    // A large block past the peak: the idle quarters stay cached.
    let large = manager.allocate_bytes(SIM_PAGE_BYTES).unwrap();
    let stats = manager.stats();
    assert_eq!(
        stats.totals.cached_bytes - stats.devices[0].large.free_bytes,
        SIM_PAGE_BYTES as u64
    );
    assert_eq!(manager.peak_reserved_bytes(), 2 * SIM_PAGE_BYTES as u64);
    assert_consistent(&stats, &sim);
    drop(large);
}

/// Pages larger than the whole device (`virtual_memory_pages` of 128 MiB on a 64 MiB device)
/// could never be mapped: every large request failed. Now such a device gets no arena, and
/// large requests are served by segments.
#[test]
fn pages_larger_than_the_device_fall_back_to_segments() {
    let config = defaults().virtual_memory_pages(Some(128 * MIB));
    let (manager, sim) = sim_manager_on(vm_device(64 << 20, false), config);
    let large = manager.allocate_bytes(8 * MIB).unwrap();
    assert!(large.is_large());
    let stats = manager.stats();
    assert_eq!(stats.devices[0].large.address_space_bytes, 0, "no arena");
    assert_eq!(sim.counters().reserved_address_bytes, 0);
    drop(large);
    assert_consistent(&manager.stats(), &sim);
}

/// The free range at the growth frontier (right below the untouched space at the end of the
/// reservation) can grow, so a block that also fits a hole elsewhere goes to the hole, even a
/// larger one: the frontier range then serves the next large block with fewer new pages.
/// Plain best fit put the small block at the frontier (vit_varres 1.063 → 1.042, sim).
#[test]
fn the_range_at_the_growth_frontier_is_spared_while_a_hole_fits() {
    let (manager, sim) = sim_manager_on(vm_device(1 << 30, false), defaults());
    let page = SIM_PAGE_BYTES;
    let hole = manager.allocate_bytes(4 * page).unwrap();
    let middle = manager.allocate_bytes(page).unwrap();
    let frontier_side = manager.allocate_bytes(2 * page).unwrap();
    let hole_address = hole.device_address();
    let frontier_address = frontier_side.device_address();
    drop((hole, frontier_side));
    assert_eq!(manager.peak_reserved_bytes(), 7 * page as u64);
    // Fits both the 2-page range at the frontier (best fit) and the 4-page hole.
    let small = manager.allocate_bytes(page + page / 2).unwrap();
    assert_eq!(small.device_address(), hole_address, "the hole serves it");
    // Grows from the spared range: 2 pages there, 4 more mapped (7 + 4 = 11), where plain
    // best fit would have had to map 6 past the block it put at the frontier.
    let large = manager.allocate_bytes(6 * page).unwrap();
    assert_eq!(large.device_address(), frontier_address);
    assert_eq!(manager.peak_reserved_bytes(), 11 * page as u64);
    assert_consistent(&manager.stats(), &sim);
    drop((small, middle, large));
}
