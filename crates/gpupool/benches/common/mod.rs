//! What the benchmarks share: the backends they run on, the pool configuration, the baseline
//! pool, size labels and criterion's settings.
//!
//! Each `benches/*.rs` file is its own crate and uses only part of this module.
#![allow(
    dead_code,
    reason = "each benchmark crate uses a different part of this module"
)]

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use criterion::Criterion;
use gpupool::backend::host::HostBackend;
use gpupool::backend::sim::{SimBackend, SimConfig};
use gpupool::{Backend, Block, MemoryManager, PoolConfig};

/// The sizes of the per-size benchmarks: 256 B to 16 MiB. Above the default large threshold
/// (1 MiB), 16 MiB is served by the large arena rather than a size class.
pub const SIZES: [usize; 5] = [256, 4 << 10, 64 << 10, 1 << 20, 16 << 20];

/// The backends every per-size benchmark runs on: `host` (real host memory, large blocks
/// mapped from the OS) and `sim` (the accounting-only device of `gpupool replay`, with
/// virtual memory and 2 MiB pages like an H200), so the figures separate the pool's own cost
/// from the memory's.
pub fn backends() -> Vec<(&'static str, Arc<dyn Backend>)> {
    vec![
        ("host", Arc::new(HostBackend::new())),
        (
            "sim",
            Arc::new(SimBackend::new(SimConfig {
                virtual_memory: true,
                ..SimConfig::default()
            })),
        ),
    ]
}

/// A manager on `backend` with the default configuration, maintenance off (no background
/// thread waking during a measurement) and pooling on or off.
pub fn manager(backend: &Arc<dyn Backend>, pooling: bool) -> MemoryManager {
    let config = PoolConfig::builder()
        .pooling(pooling)
        .maintenance_interval(Duration::ZERO)
        .build()
        .expect("the benchmark configuration is valid");
    MemoryManager::with_devices(vec![backend.clone()], config)
        .expect("a manager on a fresh backend")
}

/// `256 B`, `4 KiB`, `16 MiB`: the size in the largest IEC unit that divides it, without
/// spaces so that it can be typed as a benchmark filter.
pub fn size_label(bytes: usize) -> String {
    for (unit, name) in [(1usize << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{name}", bytes / unit);
        }
    }
    format!("{bytes}B")
}

/// Criterion's settings: 30 samples after 0.5 s of warm-up, 1.5 s of measurement per
/// benchmark, so the whole set runs in a few minutes on two cores. The command line
/// (`-- --sample-size 100 --measurement-time 5`) overrides them.
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_millis(1500))
}

/// The baseline pool: one mutex over one `Vec` of idle blocks of a single size, no cap, no
/// statistics (what a first pool often looks like; `gpupool bench` has the same peer for every
/// size). The figures of gpupool beside it say what the design buys.
pub struct NaivePool {
    backend: Arc<dyn Backend>,
    bytes: usize,
    idle: Mutex<Vec<Block>>,
}

impl NaivePool {
    /// A pool of `bytes`-byte blocks on `backend`, its default kind.
    pub fn new(backend: Arc<dyn Backend>, bytes: usize) -> NaivePool {
        NaivePool {
            backend,
            bytes,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// An idle block, or a new one from the backend.
    pub fn allocate(&self) -> Block {
        if let Some(block) = self.idle.lock().unwrap().pop() {
            return block;
        }
        let kind = self.backend.kinds()[0];
        self.backend
            .allocate(self.bytes, kind)
            .expect("the backend has room for the baseline's block")
    }

    /// Keeps the block for the next `allocate`.
    pub fn free(&self, block: Block) {
        self.idle.lock().unwrap().push(block);
    }
}

impl Drop for NaivePool {
    fn drop(&mut self) {
        for block in self.idle.get_mut().unwrap().drain(..) {
            self.backend.release(block);
        }
    }
}

/// Runs `work(thread)` on `threads` threads released together by a barrier, and returns the
/// time from the first thread's start to the last thread's end (thread creation excluded).
pub fn threaded(threads: usize, work: impl Fn(usize) + Sync) -> Duration {
    let barrier = Barrier::new(threads);
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                let (barrier, work) = (&barrier, &work);
                scope.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    work(thread);
                    (start, Instant::now())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a benchmark thread panicked"))
            .collect()
    });
    let first = spans.iter().map(|span| span.0).min().expect("threads");
    let last = spans.iter().map(|span| span.1).max().expect("threads");
    last - first
}
