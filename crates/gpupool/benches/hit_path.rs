//! The hit path: allocate + drop of a block the pool already holds, per size and backend.
//!
//! Each iteration is one pair: `allocate_bytes(n)` served from the cache (the first
//! allocation, before the measurement, puts the block there) and the drop that gives it back.
//! Nothing in the pair reaches the backend, so `host` and `sim` should agree; 16 MiB is above
//! the large threshold and measures the large arena's reuse instead of a size class.
//! `naive/4KiB` is the baseline pool of `common` (one mutex, one `Vec`) on host memory.
//!
//! `cargo bench -p gpupool --bench hit_path` (criterion: median and spread of 30 samples).

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

use common::{backends, manager, size_label, NaivePool, SIZES};

fn hit_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("hit_path");
    group.throughput(Throughput::Elements(1));
    for (name, backend) in backends() {
        let manager = manager(&backend, true);
        for bytes in SIZES {
            drop(manager.allocate_bytes(bytes).expect("the first allocation"));
            group.bench_with_input(
                BenchmarkId::new(name, size_label(bytes)),
                &bytes,
                |b, &bytes| {
                    b.iter(|| {
                        let buffer = manager
                            .allocate_bytes(black_box(bytes))
                            .expect("a cached block");
                        black_box(&buffer);
                    })
                },
            );
        }
        let stats = manager.stats().totals;
        assert_eq!(
            stats.backend_allocations,
            SIZES.len() as u64,
            "{name}: every timed pair was a hit"
        );
    }
    let (_, host) = backends().swap_remove(0);
    let naive = NaivePool::new(host, 4 << 10);
    naive.free(naive.allocate());
    group.bench_function(BenchmarkId::new("naive", size_label(4 << 10)), |b| {
        b.iter(|| naive.free(black_box(naive.allocate())))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = hit_path
}
criterion_main!(benches);
