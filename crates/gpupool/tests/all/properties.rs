//! Property test: random configurations, simulated devices and operation sequences keep every
//! statistics identity, never hand out overlapping blocks, respect the budget, fail only with
//! clean errors, and leave nothing behind on the device once everything is dropped.
//!
//! Each case builds a pool over a fresh `SimBackend` (so the ledger checks every release), runs
//! 1 to 200 operations over a vector of live buffers, and checks after every operation:
//!
//! - `assert_consistent` (reserved = in use + cached; blocks held = allocations − releases;
//!   requests = hits + misses + bypasses; the sim ledger agrees, no invalid release);
//! - the pool's in-use and requested-live bytes equal the sums over the live buffers, and its
//!   request and failure counts equal the allocate calls that succeeded and failed;
//! - every live buffer's block holds its request, and no two live blocks overlap (as handed
//!   out: a large-arena block is a view inside a segment);
//! - with a budget, the device never holds more than the budget.
//!
//! At the end every buffer and the manager are dropped (in one of three orders) and the ledger
//! must show no live allocation and no invalid release.

use std::time::Duration;

use gpupool::backend::sim::{FaultKind, FaultPlan, SimBackend, SimConfig};
use gpupool::{
    AllocOptions, MemoryManager, PoolConfig, PoolError, PooledBuffer, StreamId, TrimLevel,
};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

use crate::common::assert_consistent;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// The pool's settings for one case.
#[derive(Clone, Debug)]
struct PoolSetup {
    steps_per_doubling: usize,
    budget_bytes: Option<u64>,
    /// `None`: the default caps (32 blocks, 4 MiB allowance); else (block cap, byte allowance,
    /// blocks kept by a normal trim).
    idle_caps: Option<(usize, usize, usize)>,
    large_threshold: Option<usize>,
    zero_on_reuse: bool,
    shards: usize,
}

/// The simulated device of one case.
#[derive(Clone, Debug)]
struct DeviceSetup {
    capacity_bytes: u64,
    asynchronous: bool,
    faults: FaultPlan,
    fault_kind: FaultKind,
    /// Large requests in the virtual-memory arena instead of segments.
    virtual_memory: bool,
}

/// One step of a case. Buffer slots are taken modulo the number of live buffers (no-op when
/// there is none), so shrinking towards 0 keeps a sequence valid.
#[derive(Clone, Debug)]
enum Op {
    Allocate { bytes: usize, stream: u64 },
    Drop { slot: usize },
    RecordStream { slot: usize, stream: u64 },
    Trim(TrimLevel),
    Clear,
    Defragment,
    RunMaintenance,
    SetPooling(bool),
    Prewarm { bytes: usize, count: usize },
    CompleteFences,
}

/// How a case ends.
#[derive(Clone, Copy, Debug)]
enum Teardown {
    /// Drop the buffers, then the manager.
    DropBuffers,
    /// Drop the buffers, clear with the fences completed (everything must go back while the
    /// manager is alive), then drop the manager.
    ClearAndDrop,
    /// Drop the manager first: the buffers outlive it and the last one releases everything.
    BuffersOutlive,
}

fn pool_setup() -> impl Strategy<Value = PoolSetup> {
    (
        prop::sample::select(vec![1usize, 2, 4]),
        prop::option::of(MIB as u64..=64 * MIB as u64),
        prop::option::of((1usize..=4, prop::sample::select(vec![0usize, 64 * KIB]))),
        any::<u8>(),
        prop::option::of(Just(MIB)),
        any::<bool>(),
        prop::sample::select(vec![1usize, 2, 8]),
    )
        .prop_map(
            |(steps, budget, caps, keep_seed, large_threshold, zero_on_reuse, shards)| PoolSetup {
                steps_per_doubling: steps,
                budget_bytes: budget,
                idle_caps: caps
                    .map(|(blocks, bytes)| (blocks, bytes, keep_seed as usize % (blocks + 1))),
                large_threshold,
                zero_on_reuse,
                shards,
            },
        )
}

fn device_setup() -> impl Strategy<Value = DeviceSetup> {
    let faults = prop_oneof![
        Just(FaultPlan::None),
        (0.0f64..=0.2, any::<u64>())
            .prop_map(|(probability, seed)| FaultPlan::Probability { probability, seed }),
    ];
    (
        64 * MIB as u64..=1 << 30,
        any::<bool>(),
        faults,
        prop_oneof![Just(FaultKind::OutOfMemory), Just(FaultKind::DriverError)],
        any::<bool>(),
    )
        .prop_map(
            |(capacity_bytes, asynchronous, faults, fault_kind, virtual_memory)| DeviceSetup {
                capacity_bytes,
                asynchronous,
                faults,
                fault_kind,
                virtual_memory,
            },
        )
}

/// Request sizes from 1 B to 64 MiB, mostly small, with the class and arena edges.
fn request_bytes() -> impl Strategy<Value = usize> {
    prop_oneof![
        8 => 1usize..=4 * KIB,
        4 => 4 * KIB + 1..=MIB,
        2 => MIB + 1..=64 * MIB,
        2 => prop::sample::select(vec![
            1,
            255,
            256,
            257,
            4 * KIB,
            MIB - 1,
            MIB,
            MIB + 1,
            10 * MIB - 1,
            10 * MIB,
            20 * MIB,
            20 * MIB + 1,
            64 * MIB,
        ]),
    ]
}

fn operation() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (request_bytes(), 0u64..=3).prop_map(|(bytes, stream)| Op::Allocate { bytes, stream }),
        8 => (0usize..64).prop_map(|slot| Op::Drop { slot }),
        2 => (0usize..64, 0u64..=3).prop_map(|(slot, stream)| Op::RecordStream { slot, stream }),
        1 => prop_oneof![Just(TrimLevel::Normal), Just(TrimLevel::Aggressive)].prop_map(Op::Trim),
        1 => Just(Op::Clear),
        1 => Just(Op::Defragment),
        1 => Just(Op::RunMaintenance),
        // Mostly back on: once off, pooling stays off until the next `SetPooling(true)`.
        1 => prop::bool::weighted(0.7).prop_map(Op::SetPooling),
        1 => (request_bytes(), 0usize..=8).prop_map(|(bytes, count)| Op::Prewarm { bytes, count }),
        2 => Just(Op::CompleteFences),
    ]
}

fn teardown() -> impl Strategy<Value = Teardown> {
    prop_oneof![
        Just(Teardown::DropBuffers),
        Just(Teardown::ClearAndDrop),
        Just(Teardown::BuffersOutlive),
    ]
}

fn build(pool: &PoolSetup, device: &DeviceSetup) -> (MemoryManager, SimBackend) {
    let sim = SimBackend::new(SimConfig {
        capacity_bytes: device.capacity_bytes,
        asynchronous: device.asynchronous,
        virtual_memory: device.virtual_memory,
        faults: device.faults,
        fault_kind: device.fault_kind,
        ..SimConfig::default()
    });
    let mut builder = PoolConfig::builder()
        .steps_per_doubling(pool.steps_per_doubling)
        .budget_bytes(pool.budget_bytes)
        .large_threshold_bytes(pool.large_threshold)
        .zero_on_reuse(pool.zero_on_reuse)
        // Reclaiming before the peak is exercised with virtual memory on odd capacities.
        .reclaim_at_peak(device.capacity_bytes % 2 == 1)
        // And releasing idle class blocks at the peak on all but every fourth capacity.
        .release_idle_at_peak(!device.capacity_bytes.is_multiple_of(4))
        // And class blocks carved out of the arena on capacities not divisible by three.
        .carve_class_blocks(!device.capacity_bytes.is_multiple_of(3))
        .shards(pool.shards)
        .maintenance_interval(Duration::ZERO);
    if let Some((blocks, bytes, keep)) = pool.idle_caps {
        builder = builder
            .max_idle_per_class(blocks)
            .max_idle_bytes_per_class(bytes)
            .min_idle_per_class(keep);
    }
    let config = builder
        .build()
        .expect("the generated configuration is valid");
    let manager = MemoryManager::with_config(sim.clone(), config).expect("manager");
    (manager, sim)
}

/// What the test expects of the pool, besides the identities.
struct Model {
    budget: Option<u64>,
    large_threshold: Option<usize>,
    pooling: bool,
    /// Allocate calls that succeeded and failed.
    served: u64,
    failed: u64,
    /// Whether injected faults of each kind can happen.
    driver_faults: bool,
}

/// Every check that must hold between operations.
fn check(
    manager: &MemoryManager,
    sim: &SimBackend,
    live: &[PooledBuffer<u8>],
    model: &Model,
    step: &str,
) {
    let stats = manager.stats();
    assert_consistent(&stats, sim);
    let totals = &stats.totals;

    let in_use: u64 = live.iter().map(|b| b.block_bytes() as u64).sum();
    let requested: u64 = live.iter().map(|b| b.requested_bytes() as u64).sum();
    assert_eq!(
        totals.in_use_bytes, in_use,
        "{step}: in-use bytes differ from the live buffers' blocks"
    );
    assert_eq!(
        totals.requested_live_bytes, requested,
        "{step}: requested live bytes differ from the live buffers' requests"
    );
    assert_eq!(
        (totals.requests, totals.failed_requests),
        (model.served, model.failed),
        "{step}: (requests, failed requests) differ from the allocate calls"
    );
    assert_eq!(stats.pooling, model.pooling, "{step}: pooling state");

    let mut ranges: Vec<(u64, u64)> = live
        .iter()
        .map(|buffer| {
            assert!(
                buffer.block_bytes() >= buffer.requested_bytes(),
                "{step}: block of {} bytes for a request of {}",
                buffer.block_bytes(),
                buffer.requested_bytes()
            );
            let start = buffer.device_address();
            (start, start + buffer.block_bytes() as u64)
        })
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "{step}: live blocks overlap: [{:#x}, {:#x}) and [{:#x}, {:#x})",
            pair[0].0,
            pair[0].1,
            pair[1].0,
            pair[1].1
        );
    }

    if let Some(budget) = model.budget {
        let held = sim.counters().live_bytes;
        assert!(
            held <= budget,
            "{step}: the device holds {held} bytes, over the budget of {budget}"
        );
    }
}

fn allocate(manager: &MemoryManager, live: &mut Vec<PooledBuffer<u8>>, model: &mut Model, op: &Op) {
    let Op::Allocate { bytes, stream } = *op else {
        unreachable!()
    };
    let options = AllocOptions {
        stream: StreamId(stream),
        ..AllocOptions::default()
    };
    match manager.allocate_with::<u8>(bytes, options) {
        Ok(buffer) => {
            model.served += 1;
            assert_eq!(buffer.requested_bytes(), bytes, "{op:?}: requested bytes");
            assert_eq!(buffer.len(), bytes, "{op:?}: length");
            assert_eq!(buffer.stream(), StreamId(stream), "{op:?}: stream");
            let large = model.pooling && model.large_threshold.is_some_and(|t| bytes > t);
            assert_eq!(buffer.is_large(), large, "{op:?}: served by the arena?");
            // Every generated size is within the classes (largest 256 MiB): bypass only with
            // pooling off.
            assert_eq!(buffer.is_bypass(), !model.pooling, "{op:?}: bypass?");
            live.push(buffer);
        }
        Err(error) => {
            model.failed += 1;
            let clean = match &error {
                PoolError::BudgetExceeded { .. } => model.budget.is_some(),
                PoolError::OutOfMemory { .. } => true,
                PoolError::Backend { .. } => model.driver_faults,
                _ => false,
            };
            assert!(clean, "{op:?}: unexpected error {error:?}");
        }
    }
}

fn run_case(pool: PoolSetup, device: DeviceSetup, ops: Vec<Op>, end: Teardown) {
    let (manager, sim) = build(&pool, &device);
    let mut model = Model {
        budget: pool.budget_bytes,
        large_threshold: pool.large_threshold,
        pooling: true,
        served: 0,
        failed: 0,
        driver_faults: device.fault_kind == FaultKind::DriverError
            && device.faults != FaultPlan::None,
    };
    let mut live: Vec<PooledBuffer<u8>> = Vec::new();
    check(&manager, &sim, &live, &model, "start");

    for (index, op) in ops.iter().enumerate() {
        match op {
            Op::Allocate { .. } => allocate(&manager, &mut live, &mut model, op),
            Op::Drop { slot } => {
                if !live.is_empty() {
                    let slot = slot % live.len();
                    drop(live.swap_remove(slot));
                }
            }
            Op::RecordStream { slot, stream } => {
                if !live.is_empty() {
                    let slot = slot % live.len();
                    live[slot].record_stream(StreamId(*stream));
                }
            }
            Op::Trim(level) => {
                manager.trim(*level);
            }
            Op::Clear => {
                manager.clear();
            }
            Op::Defragment => {
                manager.defragment();
            }
            Op::RunMaintenance => {
                manager.run_maintenance();
            }
            Op::SetPooling(enabled) => {
                manager.set_pooling(*enabled);
                model.pooling = *enabled;
            }
            Op::Prewarm { bytes, count } => match manager.prewarm(*bytes, *count) {
                Ok(served) => assert!(served <= *count, "{op:?}: prewarmed {served}"),
                Err(error) => {
                    let clean = match &error {
                        PoolError::BudgetExceeded { .. } => model.budget.is_some(),
                        PoolError::OutOfMemory { .. } | PoolError::TooLarge { .. } => true,
                        PoolError::Backend { .. } => model.driver_faults,
                        _ => false,
                    };
                    assert!(clean, "{op:?}: unexpected error {error:?}");
                }
            },
            Op::CompleteFences => sim.complete_fences(),
        }
        check(
            &manager,
            &sim,
            &live,
            &model,
            &format!("after op {index} {op:?}"),
        );
    }

    match end {
        Teardown::DropBuffers | Teardown::ClearAndDrop => {
            live.clear();
            check(&manager, &sim, &live, &model, "after dropping every buffer");
            if matches!(end, Teardown::ClearAndDrop) {
                // Releases wait for fences recorded at release time: complete them, then the
                // next clear reaps what the first one deferred.
                for _ in 0..2 {
                    manager.clear();
                    sim.complete_fences();
                }
                manager.clear();
                check(&manager, &sim, &live, &model, "after clearing");
                let ledger = sim.counters();
                assert_eq!(
                    (ledger.live_allocations, ledger.live_bytes),
                    (0, 0),
                    "clear with every buffer dropped and every fence complete left memory held"
                );
            }
            drop(manager);
        }
        Teardown::BuffersOutlive => {
            drop(manager);
            live.clear();
        }
    }
    // The pool's drop synchronises before releasing what waits for fences: no
    // `complete_fences` needed.
    let ledger = sim.counters();
    assert_eq!(
        ledger.live_allocations, 0,
        "{end:?}: device allocations left after dropping everything: {ledger:?}"
    );
    assert_eq!(ledger.live_bytes, 0, "{end:?}: {ledger:?}");
    assert_eq!(ledger.invalid_releases, 0, "{end:?}: {ledger:?}");
}

/// Operations per case. Under Miri every operation's snapshot check takes about a second
/// (a snapshot walks every class and shard), so cases are fewer and shorter there.
const MAX_OPS: usize = if cfg!(miri) { 30 } else { 200 };

proptest! {
    #![proptest_config(ProptestConfig {
        cases: if cfg!(miri) { 2 } else { 64 },
        // No regression file next to the tests: a failure is written up as a test instead.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_operation_sequences_keep_every_stats_identity(
        pool in pool_setup(),
        device in device_setup(),
        ops in prop::collection::vec(operation(), 1..=MAX_OPS),
        end in teardown(),
    ) {
        run_case(pool, device, ops, end);
    }
}
