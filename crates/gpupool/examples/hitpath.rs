//! Quick hit-path timing (development aid): allocate+drop pairs of a cached block, under the
//! default configuration and under the benchmark's (maintenance off, backend behind `dyn`).
use gpupool::{backend::host::HostBackend, Backend, MemoryManager, PoolConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn measure(label: &str, manager: &MemoryManager) {
    for bytes in [256usize, 4096, 1 << 20] {
        drop(manager.allocate_bytes(bytes).unwrap());
        let mut samples = Vec::new();
        for _ in 0..20_000 {
            let start = Instant::now();
            for _ in 0..100 {
                let buffer = manager.allocate_bytes(std::hint::black_box(bytes)).unwrap();
                std::hint::black_box(&buffer);
            }
            samples.push(start.elapsed().as_nanos() as f64 / 100.0);
        }
        samples.sort_by(f64::total_cmp);
        println!(
            "{label} {bytes}: p50 {:.1} ns p99 {:.1} ns",
            samples[samples.len() / 2],
            samples[samples.len() * 99 / 100]
        );
    }
}

fn main() {
    measure("default", &MemoryManager::new(HostBackend::new()));
    let backend: Arc<dyn Backend> = Arc::new(HostBackend::new());
    let config = PoolConfig::builder()
        .maintenance_interval(Duration::ZERO)
        .build()
        .unwrap();
    measure(
        "bench-config",
        &MemoryManager::with_devices(vec![backend], config).unwrap(),
    );
    let config = PoolConfig::builder().shards(8).build().unwrap();
    measure(
        "8-shards",
        &MemoryManager::with_config(HostBackend::new(), config).unwrap(),
    );
}
