//! Quick hit-path timing (development aid): allocate+drop pairs of a cached block.
use gpupool::{backend::host::HostBackend, MemoryManager};
use std::time::Instant;
fn main() {
    let manager = MemoryManager::new(HostBackend::new());
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
            "{bytes}: p50 {:.1} ns p99 {:.1} ns",
            samples[samples.len() / 2],
            samples[samples.len() * 99 / 100]
        );
    }
}
