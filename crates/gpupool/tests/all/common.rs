//! Helpers shared by the test modules.

use gpupool::backend::sim::{SimBackend, SimConfig};
use gpupool::{MemoryManager, PoolConfig, PoolStats};

/// A manager over a fresh simulated device, with maintenance off so tests are deterministic.
pub fn sim_manager(config: gpupool::PoolConfigBuilder) -> (MemoryManager, SimBackend) {
    sim_manager_on(SimConfig::default(), config)
}

/// As `sim_manager`, with device settings.
pub fn sim_manager_on(
    sim_config: SimConfig,
    config: gpupool::PoolConfigBuilder,
) -> (MemoryManager, SimBackend) {
    let sim = SimBackend::new(sim_config);
    let config = config
        .maintenance_interval(std::time::Duration::ZERO)
        .build()
        .expect("valid test configuration");
    let manager = MemoryManager::with_config(sim.clone(), config).expect("manager");
    (manager, sim)
}

/// The default configuration builder, with the seed's pure block caps (tests count blocks;
/// the byte allowance has its own test).
pub fn defaults() -> gpupool::PoolConfigBuilder {
    PoolConfig::builder().max_idle_bytes_per_class(0)
}

/// Checks the identities every snapshot must satisfy, against the simulated device's ledger.
pub fn assert_consistent(stats: &PoolStats, sim: &SimBackend) {
    let totals = &stats.totals;
    assert_eq!(
        totals.reserved_bytes,
        totals.in_use_bytes + totals.cached_bytes
    );
    assert_eq!(
        totals.blocks_held,
        totals.backend_allocations - totals.backend_releases
    );
    assert_eq!(
        totals.requests,
        totals.hits + totals.misses + totals.bypasses
    );
    assert_eq!(
        stats.waste().total_bytes(),
        totals.reserved_bytes - totals.requested_live_bytes,
        "the waste breakdown adds up"
    );
    let ledger = sim.counters();
    assert_eq!(
        totals.blocks_held + totals.pending_release_blocks,
        ledger.live_allocations
    );
    assert_eq!(
        totals.reserved_bytes + totals.pending_release_bytes,
        ledger.live_bytes
    );
    assert_eq!(ledger.invalid_releases, 0);
    for device in &stats.devices {
        for class in &device.classes {
            assert_eq!(class.requests, class.hits + class.misses);
            assert_eq!(class.in_use_bytes, class.in_use_blocks * class.class_bytes);
            assert_eq!(class.cached_bytes, class.cached_blocks * class.class_bytes);
            assert_eq!(
                class.backend_allocations + class.arena_blocks
                    - class.backend_releases
                    - class.arena_returns,
                class.in_use_blocks + class.cached_blocks
            );
        }
    }
}
