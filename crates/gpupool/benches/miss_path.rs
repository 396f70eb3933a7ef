//! The miss path: allocations the pool cannot serve from its cache, per size and backend.
//!
//! - `pooling_off/…`: allocate + drop with pooling turned off
//!   (`PoolConfigBuilder::pooling(false)`): every pair is one backend allocation and one
//!   backend release through the manager's bypass.
//! - `cold/…`: one allocate with pooling on, right after `MemoryManager::clear` emptied the
//!   caches: the class lookup, the miss, the backend allocation and the statistics. The clear
//!   and the drop that follows run outside the timed part (criterion's `iter_batched`, one
//!   allocation per batch: each timed allocation also pays one clock read, some 20 ns).
//!
//! `cargo bench -p gpupool --bench miss_path`.

mod common;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

use common::{backends, manager, size_label, SIZES};

fn pooling_off(c: &mut Criterion) {
    let mut group = c.benchmark_group("miss_path/pooling_off");
    group.throughput(Throughput::Elements(1));
    for (name, backend) in backends() {
        let manager = manager(&backend, false);
        for bytes in SIZES {
            group.bench_with_input(
                BenchmarkId::new(name, size_label(bytes)),
                &bytes,
                |b, &bytes| {
                    b.iter(|| {
                        let buffer = manager
                            .allocate_bytes(black_box(bytes))
                            .expect("a direct allocation");
                        black_box(&buffer);
                    })
                },
            );
        }
        let totals = manager.stats().totals;
        assert_eq!(totals.hits, 0, "{name}: nothing is pooled");
        assert_eq!(totals.backend_allocations, totals.requests);
    }
    group.finish();
}

fn cold(c: &mut Criterion) {
    let mut group = c.benchmark_group("miss_path/cold");
    group.throughput(Throughput::Elements(1));
    for (name, backend) in backends() {
        let manager = manager(&backend, true);
        for bytes in SIZES {
            group.bench_with_input(
                BenchmarkId::new(name, size_label(bytes)),
                &bytes,
                |b, &bytes| {
                    b.iter_batched(
                        || {
                            manager.clear();
                        },
                        |()| {
                            manager
                                .allocate_bytes(black_box(bytes))
                                .expect("an allocation from the backend")
                        },
                        BatchSize::PerIteration,
                    )
                },
            );
        }
        let totals = manager.stats().totals;
        assert_eq!(totals.hits, 0, "{name}: every timed allocation missed");
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = pooling_off, cold
}
criterion_main!(benches);
