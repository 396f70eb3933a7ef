//! The large-block arena: best-fit blocks split out of segments, merged when freed.

use gpupool::backend::sim::SimConfig;
use gpupool::{AllocOptions, StreamId, TrimLevel};

use crate::common::{assert_consistent, defaults, sim_manager, sim_manager_on};

const MIB: usize = 1 << 20;

#[test]
fn requests_above_the_threshold_share_a_segment_and_reuse_freed_space() {
    let (manager, sim) = sim_manager(defaults());
    let first = manager.allocate_bytes(3 * MIB).unwrap();
    let second = manager.allocate_bytes(5 * MIB).unwrap();
    assert!(first.is_large() && second.is_large());
    assert_eq!(first.block_bytes(), 3 * MIB, "no rounding to a class");
    assert_eq!(
        second.device_address(),
        first.device_address() + 3 * MIB as u64,
        "split out of the same segment"
    );
    assert_eq!(sim.counters().allocations, 1, "one 20 MiB segment");
    drop(first);
    // A smaller request fits in the freed 3 MiB: no new segment.
    let third = manager.allocate_bytes(2 * MIB + 7).unwrap();
    assert_eq!(sim.counters().allocations, 1);
    let stats = manager.stats();
    let large = &stats.devices[0].large;
    assert_eq!((large.requests, large.hits, large.misses), (3, 2, 1));
    assert_eq!(large.segment_bytes, 20 * MIB as u64);
    // The freed 3 MiB block is not split for 2 MiB: the rest would be under 1 MiB.
    assert_eq!(large.in_use_bytes, (5 * MIB + 3 * MIB) as u64);
    assert_consistent(&stats, &sim);
    drop((second, third));
    assert_consistent(&manager.stats(), &sim);
}

#[test]
fn freed_neighbours_merge_into_one_reusable_block() {
    let (manager, sim) = sim_manager(defaults());
    let a = manager.allocate_bytes(4 * MIB).unwrap();
    let b = manager.allocate_bytes(4 * MIB).unwrap();
    let c = manager.allocate_bytes(4 * MIB).unwrap();
    let start = a.device_address();
    drop(a);
    drop(b);
    // 8 MiB free at the start of the segment, in one piece.
    let big = manager.allocate_bytes(7 * MIB).unwrap();
    assert_eq!(big.device_address(), start);
    assert_eq!(sim.counters().allocations, 1);
    assert!(manager.stats().devices[0].large.merges >= 1);
    drop((big, c));
    // Everything free again: the whole segment is one block, and a trim gives it back.
    let report = manager.trim(TrimLevel::Normal);
    assert_eq!(report.bytes, 20 * MIB as u64);
    assert_eq!(sim.counters().live_allocations, 0);
    assert_consistent(&manager.stats(), &sim);
}

#[test]
fn large_blocks_are_reused_only_on_their_stream() {
    let (manager, sim) = sim_manager(defaults());
    let on = |stream| AllocOptions {
        stream: StreamId(stream),
        ..AllocOptions::default()
    };
    let first = manager.allocate_with::<u8>(30 * MIB, on(1)).unwrap();
    let address = first.device_address();
    drop(first);
    let other = manager.allocate_with::<u8>(30 * MIB, on(2)).unwrap();
    assert_ne!(
        other.device_address(),
        address,
        "stream 2 must not get stream 1's block"
    );
    let same = manager.allocate_with::<u8>(30 * MIB, on(1)).unwrap();
    assert_eq!(same.device_address(), address);
    assert_eq!(sim.counters().allocations, 2);
    drop((other, same));
    assert_consistent(&manager.stats(), &sim);
}

#[test]
fn fenced_large_blocks_wait_for_their_fences() {
    let (manager, sim) = sim_manager_on(
        SimConfig {
            asynchronous: true,
            ..SimConfig::default()
        },
        defaults(),
    );
    let mut shared = manager.allocate_bytes(16 * MIB).unwrap();
    let address = shared.device_address();
    shared.record_stream(StreamId(4));
    drop(shared);
    let blocked = manager.allocate_bytes(16 * MIB).unwrap();
    assert_ne!(blocked.device_address(), address);
    sim.complete_fences();
    let reused = manager.allocate_bytes(16 * MIB).unwrap();
    assert_eq!(reused.device_address(), address);
    drop((blocked, reused));
    assert_consistent(&manager.stats(), &sim);
}

#[test]
fn a_huge_request_gets_its_own_segment_and_its_space_is_split_for_later_ones() {
    let (manager, sim) = sim_manager(defaults());
    let huge = manager.allocate_bytes(300 * MIB + 3).unwrap();
    assert_eq!(huge.block_bytes(), 300 * MIB + 512);
    let address = huge.device_address();
    drop(huge);
    let a = manager.allocate_bytes(250 * MIB).unwrap();
    let b = manager.allocate_bytes(40 * MIB).unwrap();
    assert_eq!(a.device_address(), address);
    assert_eq!(b.device_address(), address + 250 * MIB as u64);
    assert_eq!(sim.counters().allocations, 1);
    let stats = manager.stats();
    assert!((stats.totals.memory_efficiency - 290.0 / 302.0).abs() < 0.01);
    assert_consistent(&stats, &sim);
    drop((a, b));
}

#[test]
fn a_budget_too_small_for_a_shared_segment_gets_an_exact_one() {
    let budget = 12 * MIB as u64;
    let (manager, sim) = sim_manager(defaults().budget_bytes(Some(budget)));
    let buffer = manager.allocate_bytes(9 * MIB).unwrap();
    assert_eq!(
        sim.counters().live_bytes,
        9 * MIB as u64,
        "20 MiB did not fit"
    );
    assert!(manager.allocate_bytes(4 * MIB).is_err());
    drop(buffer);
    assert!(sim.counters().peak_live_bytes <= budget);
    assert_consistent(&manager.stats(), &sim);
}

#[test]
fn everything_is_released_when_the_last_owner_goes() {
    let (manager, sim) = sim_manager_on(
        SimConfig {
            asynchronous: true,
            ..SimConfig::default()
        },
        defaults(),
    );
    let mut fenced = manager.allocate_bytes(3 * MIB).unwrap();
    fenced.record_stream(StreamId(9));
    let survivor = manager.allocate_bytes(6 * MIB).unwrap();
    drop(fenced); // gated in its segment
    drop(manager);
    assert!(sim.counters().live_allocations >= 1);
    drop(survivor);
    let ledger = sim.counters();
    assert_eq!(ledger.live_allocations, 0);
    assert_eq!(ledger.invalid_releases, 0);
}

#[test]
fn mixed_sizes_keep_reserved_close_to_live() {
    let (manager, sim) = sim_manager(defaults());
    let mut held = Vec::new();
    let mut state = 7u64;
    let mut peak_live = 0u64;
    let mut live = 0u64;
    // Miri interprets every step (about 1,000 times slower): a quarter of them.
    let steps = if cfg!(miri) { 1000 } else { 4000 };
    for _ in 0..steps {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let bytes = 2 * MIB + (state >> 35) as usize % (60 * MIB);
        if state.is_multiple_of(2) && !held.is_empty() {
            let buffer: gpupool::PooledBuffer<u8> =
                held.swap_remove((state >> 9) as usize % held.len());
            live -= buffer.requested_bytes() as u64;
        } else if held.len() < 40 {
            let buffer = manager.allocate_bytes(bytes).unwrap();
            live += bytes as u64;
            held.push(buffer);
        }
        peak_live = peak_live.max(live);
    }
    let stats = manager.stats();
    assert_consistent(&stats, &sim);
    let ratio = stats.totals.peak_reserved_bytes as f64 / peak_live as f64;
    assert!(ratio < 1.6, "peak reserved / peak live = {ratio:.3}");
}

#[test]
fn eight_threads_never_share_bytes_across_classes_and_the_arena() {
    use std::collections::BTreeMap;
    use std::sync::{Arc, Barrier, Mutex};

    let (manager, sim) = sim_manager_on(
        SimConfig {
            asynchronous: true,
            ..SimConfig::default()
        },
        defaults().max_idle_bytes_per_class(1 << 20),
    );
    // Live ranges by start address: a new buffer must not overlap any live one.
    let live: Arc<Mutex<BTreeMap<u64, u64>>> = Arc::default();
    // Miri interprets every step (about 1,000 times slower): fewer of them still interleave.
    let steps = if cfg!(miri) { 60 } else { 1500u64 };
    let barrier = Arc::new(Barrier::new(8));
    let threads: Vec<_> = (0..8u64)
        .map(|thread| {
            let (manager, sim, live, barrier) =
                (manager.clone(), sim.clone(), live.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut state = thread.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                let mut held = Vec::new();
                for step in 0..steps {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let bytes = if state % 3 == 0 {
                        (1 + state % (40 * MIB as u64)) as usize
                    } else {
                        (1 + state % 200_000) as usize
                    };
                    let options = AllocOptions {
                        stream: StreamId(1 + (state >> 20) % 2),
                        ..AllocOptions::default()
                    };
                    let mut buffer = manager.allocate_with::<u8>(bytes, options).unwrap();
                    let start = buffer.device_address();
                    let end = start + buffer.block_bytes() as u64;
                    {
                        let mut live = live.lock().unwrap();
                        let before = live.range(..end).next_back();
                        assert!(
                            before.is_none_or(|(_, &other_end)| other_end <= start),
                            "bytes {start:#x}..{end:#x} handed to two owners"
                        );
                        live.insert(start, end);
                    }
                    if step % 5 == 0 {
                        buffer.record_stream(StreamId(3));
                    }
                    held.push(buffer);
                    if held.len() > 6 || state % 4 == 0 {
                        let buffer = held.swap_remove((state >> 33) as usize % held.len());
                        live.lock().unwrap().remove(&buffer.device_address());
                        drop(buffer);
                    }
                    if step % (steps / 15) == 0 {
                        sim.complete_fences();
                    }
                }
                for buffer in held {
                    live.lock().unwrap().remove(&buffer.device_address());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    sim.complete_fences();
    manager.trim(TrimLevel::Aggressive);
    let stats = manager.stats();
    assert_consistent(&stats, &sim);
    assert_eq!(stats.totals.in_use_bytes, 0);
    drop(manager);
    let ledger = sim.counters();
    assert_eq!(ledger.live_allocations, 0);
    assert_eq!(ledger.invalid_releases, 0);
}
