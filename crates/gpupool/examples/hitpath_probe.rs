//! Probe: why does the bench harness measure a slower hit path than a plain loop?
use gpupool::{backend::host::HostBackend, Backend, MemoryManager, PoolConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn pair_percentiles(batches: usize, pairs: usize, mut pair: impl FnMut()) -> f64 {
    for _ in 0..pairs.max(100) {
        pair();
    }
    let mut samples: Vec<f64> = (0..batches)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..pairs {
                pair();
            }
            start.elapsed().as_nanos() as f64 / pairs as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn manager(backend: &Arc<dyn Backend>, pooling: bool) -> MemoryManager {
    let config = PoolConfig::builder()
        .pooling(pooling)
        .maintenance_interval(Duration::ZERO)
        .build()
        .unwrap();
    MemoryManager::with_devices(vec![backend.clone()], config).unwrap()
}

fn plain(manager: &MemoryManager, bytes: usize) -> f64 {
    drop(manager.allocate_bytes(bytes).unwrap());
    let mut samples = Vec::new();
    for _ in 0..5000 {
        let start = Instant::now();
        for _ in 0..100 {
            let buffer = manager.allocate_bytes(std::hint::black_box(bytes)).unwrap();
            std::hint::black_box(&buffer);
        }
        samples.push(start.elapsed().as_nanos() as f64 / 100.0);
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let backend: Arc<dyn Backend> = Arc::new(HostBackend::new());
    let fresh = manager(&backend, true);
    println!("A plain loop, fresh process: {:.1}", plain(&fresh, 4096));
    let closure = manager(&backend, true);
    drop(closure.allocate_bytes(4096).unwrap());
    println!(
        "B closure harness: {:.1}",
        pair_percentiles(5000, 100, || {
            let buffer = closure
                .allocate_bytes(std::hint::black_box(4096))
                .expect("cached");
            std::hint::black_box(&buffer);
        })
    );
    for pooling in [false, true, false, true] {
        for _ in 0..7 {
            let m = manager(&backend, pooling);
            for &bytes in &[256usize, 1024, 4096, 16384, 65536, 262144] {
                for _ in 0..500 {
                    drop(m.allocate_bytes(bytes).unwrap());
                }
            }
        }
    }
    let after = manager(&backend, true);
    println!("C plain loop after 28 managers: {:.1}", plain(&after, 4096));
    println!("A again: {:.1}", plain(&fresh, 4096));
    let stats_heavy = manager(&backend, true);
    let _ = stats_heavy.stats();
    println!(
        "D plain loop, new manager: {:.1}",
        plain(&stats_heavy, 4096)
    );
}
