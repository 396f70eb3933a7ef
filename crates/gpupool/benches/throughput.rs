//! Multi-thread throughput: 2, 4 and 8 threads each running allocate + drop pairs of 4 KiB
//! hits on one shared manager, as pairs per second over all threads.
//!
//! Each sample starts its threads together (a barrier) and spans from the first thread's
//! start to the last one's end; thread creation is outside it. Criterion reports the median
//! rate and its spread over 30 samples, which is what the single-sample rows of
//! `gpupool bench` lacked. `naive` is the baseline pool of `common` (one mutex) on host memory.
//! On a machine with fewer cores than threads the threads take turns, which the figures show.
//!
//! `cargo bench -p gpupool --bench throughput`.

mod common;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gpupool::{Backend, MemoryManager};

use common::{backends, manager, threaded, NaivePool};

const THREADS: [usize; 3] = [2, 4, 8];
const BYTES: usize = 4 << 10;

/// `pairs` hits of `bytes` on `manager`.
#[inline(never)]
fn hit_pairs(manager: &MemoryManager, pairs: u64) {
    for _ in 0..pairs {
        let buffer = manager
            .allocate_bytes(black_box(BYTES))
            .expect("a cached block");
        black_box(&buffer);
    }
}

/// `pairs` allocate + free pairs on the naive pool.
#[inline(never)]
fn naive_pairs(naive: &NaivePool, pairs: u64) {
    for _ in 0..pairs {
        naive.free(black_box(naive.allocate()));
    }
}

fn throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("throughput_4KiB");
    for threads in THREADS {
        group.throughput(Throughput::Elements(threads as u64));
        for (name, backend) in backends() {
            let manager = manager(&backend, true);
            // One cached block per thread, so the timed pairs are hits from the start.
            let warm: Vec<_> = (0..threads)
                .map(|_| manager.allocate_bytes(BYTES).expect("a block"))
                .collect();
            drop(warm);
            group.bench_function(BenchmarkId::new(name, format!("{threads}threads")), |b| {
                b.iter_custom(|iters| threaded(threads, |_| hit_pairs(&manager, iters)))
            });
        }
        let host: Arc<dyn Backend> = backends().swap_remove(0).1;
        let naive = NaivePool::new(host, BYTES);
        group.bench_function(
            BenchmarkId::new("naive", format!("{threads}threads")),
            |b| b.iter_custom(|iters| threaded(threads, |_| naive_pairs(&naive, iters))),
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::criterion();
    targets = throughput
}
criterion_main!(benches);
