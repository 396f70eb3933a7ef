//! `gpupool bench`: the seed's workloads and the hit-path latency, with peers in the same run.
//!
//! "The seed" is the C# Metal memory-pooling sample that gpupool reimplements; its two
//! benchmark scenarios, the seed's workloads, are the first two below.
//!
//! 1. seed-4k: 1,000 × (allocate 4 KiB, drop), pooling off (direct) vs on.
//! 2. seed-mixed: {256 B, 1 KiB, 4 KiB, 16 KiB, 64 KiB, 256 KiB} × 500 each, per-size rows.
//! 3. hit-path latency: allocate+drop pairs of a cached block (256 B, 4 KiB, 1 MiB), p50/p99.
//! 4. throughput: 4 KiB pairs with 1, 4 and 16 threads on one manager.
//! 5. peers: a naive pool (one mutex, one `Vec` per power-of-two class) on the same backend,
//!    and on CUDA the driver's own allocators.
//!
//! Every timed figure is taken `--samples` times (default 5), each on fresh managers, and
//! reported as the median with the fastest and slowest sample beside it ([`Sampled`]): one
//! sample of a run of milliseconds is at the mercy of the machine's other work (the
//! throughput rows swung 2× between runs when they had one). Counts come from one run.
//!
//! A failed allocation anywhere (gpupool, the naive pool, a driver peer) ends the benchmark
//! with a [`BenchError`] naming it: on a device that is nearly full, or failing, the command
//! says so and exits non-zero rather than panicking. The timed loops pay for this with one
//! branch per pair, as an `expect` would.
#![forbid(unsafe_code)]

mod naive;
mod timing;

#[cfg(feature = "cuda")]
mod cuda_peers;

use std::sync::Arc;
use std::time::Instant;

use gpupool::backend::BackendError;
use gpupool::{Backend, MemoryManager, PoolConfig, PoolError, PoolStats};
use serde::Serialize;

use crate::backend_choice::BackendName;
use crate::format::{bytes, rate, size, thousands, Spread};
use naive::NaivePool;
use timing::{batch_percentiles, pair_percentiles, sampled_ms};

/// Samples of each timed figure unless `--samples` says otherwise.
pub const DEFAULT_SAMPLES: usize = 5;
/// The most samples `--samples` accepts: enough for any spread, few enough that a typo cannot
/// ask for a benchmark of hours.
pub const MAX_SAMPLES: u64 = 100;
/// The version of the JSON document's layout; raised when a field changes meaning or goes.
pub const SCHEMA_VERSION: u32 = 1;
pub(super) const SEED_ITERATIONS: usize = 1000;
const MIXED_SIZES: [usize; 6] = [256, 1024, 4096, 16384, 65536, 262144];
const MIXED_ITERATIONS: usize = 500;
const LATENCY_SIZES: [usize; 3] = [256, 4096, 1 << 20];

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    /// The backend to measure.
    pub backend: BackendName,
    /// Samples of each timed figure (at least 1).
    pub samples: usize,
    /// The capacity of a `sim` device, where not its default (see [`BackendName::create`]).
    pub sim_capacity_bytes: Option<u64>,
}

/// A timed figure taken several times: the median, the fastest and the slowest sample. In
/// JSON it is three fields beside the others: `KEY` (the median, as before there were
/// samples), `KEY_min` and `KEY_max`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampled {
    key: &'static str,
    /// The figures.
    pub spread: Spread,
}

impl Sampled {
    /// `spread` under the JSON key `key`.
    pub fn new(key: &'static str, spread: Spread) -> Sampled {
        Sampled { key, spread }
    }

    /// The spread of `samples` under the JSON key `key`.
    pub fn of(key: &'static str, samples: &[f64]) -> Sampled {
        Sampled::new(key, Spread::of(samples))
    }

    /// The median.
    pub fn median(&self) -> f64 {
        self.spread.median
    }

    /// `median [min–max]`, each figure written by `show`.
    pub fn show(&self, show: impl Fn(f64) -> String) -> String {
        self.spread.show(show)
    }
}

impl Serialize for Sampled {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry(self.key, &self.spread.median)?;
        map.serialize_entry(&format!("{}_min", self.key), &self.spread.min)?;
        map.serialize_entry(&format!("{}_max", self.key), &self.spread.max)?;
        map.end()
    }
}

/// The whole benchmark report (the JSON output).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The layout of this document ([`SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// The backend measured.
    pub backend: String,
    /// The device (GPU name, or host memory and CPU).
    pub device: String,
    /// The host CPU.
    pub cpu: String,
    /// Samples of each timed figure.
    pub samples: usize,
    /// seed-4k and seed-mixed.
    pub workloads: Vec<WorkloadReport>,
    /// Hit-path latency per size.
    pub latency: Vec<LatencyReport>,
    /// Multi-thread throughput.
    pub throughput: Vec<ThroughputReport>,
    /// The pooled manager's statistics after seed-mixed.
    #[serde(skip)]
    pub final_stats: Option<PoolStats>,
}

/// One seed workload, direct vs pooled.
#[derive(Debug, Serialize)]
pub struct WorkloadReport {
    /// "seed-4k" or "seed-mixed".
    pub name: String,
    /// Allocate calls.
    pub requests: u64,
    /// Backend allocations with pooling on.
    pub backend_allocations: u64,
    /// Backend allocations with pooling off.
    pub direct_backend_allocations: u64,
    /// hits / (hits + misses).
    pub hit_rate: f64,
    /// 1 − backend allocations / requests.
    pub allocation_reduction: f64,
    /// Time with pooling off, milliseconds (`direct_ms`, `_min`, `_max`).
    #[serde(flatten)]
    pub direct_ms: Sampled,
    /// Time with pooling on, milliseconds (`pooled_ms`, `_min`, `_max`).
    #[serde(flatten)]
    pub pooled_ms: Sampled,
    /// Median direct time / median pooled time.
    pub speedup: f64,
    /// Time of the naive pool on the same workload, milliseconds (`naive_ms`, `_min`, `_max`).
    #[serde(flatten)]
    pub naive_ms: Sampled,
    /// Per-size rows (seed-mixed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sizes: Vec<SizeRow>,
    /// Driver allocators on the same workload (CUDA).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerTime>,
}

/// A driver allocator's time on a workload.
#[derive(Debug, Serialize)]
pub struct PeerTime {
    /// The peer's name.
    pub name: String,
    /// Its time, milliseconds (`ms`, `ms_min`, `ms_max`).
    #[serde(flatten)]
    pub ms: Sampled,
}

/// One size of the mixed workload.
#[derive(Debug, Serialize)]
pub struct SizeRow {
    /// Requested bytes.
    pub bytes: u64,
    /// Requests of this size.
    pub requests: u64,
    /// Backend allocations of its class.
    pub backend_allocations: u64,
    /// Hit rate of its class.
    pub hit_rate: f64,
    /// requested bytes / block bytes.
    pub efficiency: f64,
}

/// Hit-path latency of one size: each figure is a percentile of one sample's batches, and
/// its spread is over the samples.
#[derive(Debug, Serialize)]
pub struct LatencyReport {
    /// Requested bytes.
    pub bytes: u64,
    /// gpupool pair p50, ns (`p50_ns`, `_min`, `_max`).
    #[serde(flatten)]
    pub p50_ns: Sampled,
    /// gpupool pair p99, ns.
    #[serde(flatten)]
    pub p99_ns: Sampled,
    /// Naive pool pair p50, ns.
    #[serde(flatten)]
    pub naive_p50_ns: Sampled,
    /// Naive pool pair p99, ns.
    #[serde(flatten)]
    pub naive_p99_ns: Sampled,
    /// Pooling off (a backend allocation and release per pair), p50, ns.
    #[serde(flatten)]
    pub direct_p50_ns: Sampled,
    /// Driver peers (CUDA).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerLatency>,
}

/// A driver allocator's pair latency.
#[derive(Debug, Serialize)]
pub struct PeerLatency {
    /// The peer's name.
    pub name: String,
    /// Pair p50, ns (`p50_ns`, `_min`, `_max`).
    #[serde(flatten)]
    pub p50_ns: Sampled,
    /// Pair p99, ns.
    #[serde(flatten)]
    pub p99_ns: Sampled,
}

/// Pairs per second with several threads.
#[derive(Debug, Serialize)]
pub struct ThroughputReport {
    /// The allocator.
    pub allocator: String,
    /// Threads (one stream each).
    pub threads: usize,
    /// Allocate+free pairs per second over all threads (`pairs_per_second`, `_min`, `_max`).
    #[serde(flatten)]
    pub pairs_per_second: Sampled,
}

/// Why the benchmark stopped.
#[derive(Debug)]
pub enum BenchError {
    /// gpupool refused an operation: setting up a manager, or an allocation of a workload.
    Pool(PoolError),
    /// The backend refused the naive comparison pool an allocation.
    NaivePool {
        /// The bytes asked for.
        bytes: usize,
        /// The backend's reason.
        error: BackendError,
    },
}

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BenchError::Pool(error) => write!(f, "bench stopped: {error}"),
            BenchError::NaivePool { bytes, error } => write!(
                f,
                "bench stopped: the naive pool's allocation of {} failed: {error}",
                size(*bytes as u64)
            ),
        }
    }
}

impl std::error::Error for BenchError {}

impl From<PoolError> for BenchError {
    fn from(error: PoolError) -> Self {
        BenchError::Pool(error)
    }
}

/// A naive-pool block of `bytes`, its failure as a [`BenchError`].
fn naive_allocate(pool: &NaivePool, bytes: usize) -> Result<gpupool::Block, BenchError> {
    pool.allocate(bytes)
        .map_err(|error| BenchError::NaivePool { bytes, error })
}

/// Called with every manager the benchmark creates (the metrics endpoint serves the latest).
type Observer = Box<dyn Fn(&MemoryManager) + Send + Sync>;
static OBSERVER: std::sync::OnceLock<Observer> = std::sync::OnceLock::new();

/// Shows each manager the benchmark creates to `observer`, before it is used (set once).
pub fn observe_managers(observer: impl Fn(&MemoryManager) + Send + Sync + 'static) {
    let _ = OBSERVER.set(Box::new(observer));
}

/// Hands a new manager to the observer, if any.
pub(super) fn observed(manager: MemoryManager) -> MemoryManager {
    if let Some(observer) = OBSERVER.get() {
        observer(&manager);
    }
    manager
}

fn manager(backend: &Arc<dyn Backend>, pooling: bool) -> Result<MemoryManager, PoolError> {
    let config = PoolConfig::builder()
        .pooling(pooling)
        .maintenance_interval(std::time::Duration::ZERO)
        .build()?;
    MemoryManager::with_devices(vec![backend.clone()], config).map(observed)
}

/// Times `samples` runs of `work`, each on a fresh manager; returns the times in milliseconds
/// and the last run's statistics.
fn timed_runs(
    backend: &Arc<dyn Backend>,
    pooling: bool,
    samples: usize,
    work: impl Fn(&MemoryManager) -> Result<(), PoolError>,
) -> Result<(Spread, PoolStats), PoolError> {
    let mut times = Vec::with_capacity(samples);
    let mut stats = None;
    for _ in 0..samples.max(1) {
        let manager = manager(backend, pooling)?;
        let start = Instant::now();
        work(&manager)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        stats = Some(manager.stats());
    }
    Ok((Spread::of(&times), stats.expect("runs")))
}

fn seed_4k(manager: &MemoryManager) -> Result<(), PoolError> {
    for _ in 0..SEED_ITERATIONS {
        drop(manager.allocate_bytes(std::hint::black_box(4096))?);
    }
    Ok(())
}

fn seed_mixed(manager: &MemoryManager) -> Result<(), PoolError> {
    for &bytes in &MIXED_SIZES {
        for _ in 0..MIXED_ITERATIONS {
            drop(manager.allocate_bytes(std::hint::black_box(bytes))?);
        }
    }
    Ok(())
}

fn naive_ms(
    backend: &Arc<dyn Backend>,
    sizes: &[usize],
    iterations: usize,
    samples: usize,
) -> Result<Spread, BenchError> {
    let (ms, ()) = sampled_ms(samples, || {
        let pool = NaivePool::new(backend.clone());
        for &bytes in sizes {
            for _ in 0..iterations {
                let block = naive_allocate(&pool, std::hint::black_box(bytes))?;
                pool.free(block);
            }
        }
        Ok::<(), BenchError>(())
    })?;
    Ok(ms)
}

fn workload(
    backend: &Arc<dyn Backend>,
    name: &str,
    work: fn(&MemoryManager) -> Result<(), PoolError>,
    sizes: &[usize],
    iterations: usize,
    samples: usize,
) -> Result<(WorkloadReport, PoolStats), BenchError> {
    let (direct_ms, direct) = timed_runs(backend, false, samples, work)?;
    let (pooled_ms, pooled) = timed_runs(backend, true, samples, work)?;
    let naive_ms = naive_ms(backend, sizes, iterations, samples)?;
    let totals = &pooled.totals;
    let rows = if sizes.len() > 1 {
        sizes
            .iter()
            .map(|&bytes| {
                let row = pooled.devices[0]
                    .classes
                    .iter()
                    .find(|row| row.class_bytes >= bytes as u64)
                    .expect("every mixed size has a class row");
                SizeRow {
                    bytes: bytes as u64,
                    requests: row.requests,
                    backend_allocations: row.backend_allocations,
                    hit_rate: row.hit_rate,
                    efficiency: bytes as f64 / row.class_bytes as f64,
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let report = WorkloadReport {
        name: name.to_string(),
        requests: totals.requests,
        backend_allocations: totals.backend_allocations,
        direct_backend_allocations: direct.totals.backend_allocations,
        hit_rate: totals.hit_rate,
        allocation_reduction: totals.allocation_reduction,
        direct_ms: Sampled::new("direct_ms", direct_ms),
        pooled_ms: Sampled::new("pooled_ms", pooled_ms),
        speedup: direct_ms.median / pooled_ms.median,
        naive_ms: Sampled::new("naive_ms", naive_ms),
        sizes: rows,
        peers: Vec::new(),
    };
    Ok((report, pooled))
}

fn latency(
    backend: &Arc<dyn Backend>,
    bytes: usize,
    samples: usize,
) -> Result<LatencyReport, BenchError> {
    const BATCHES: usize = 2000;
    const PAIRS: usize = 100;
    let mut gpupool = (Vec::new(), Vec::new());
    let mut naive = (Vec::new(), Vec::new());
    let mut direct = Vec::new();
    for _ in 0..samples.max(1) {
        let pooled = manager(backend, true)?;
        drop(pooled.allocate_bytes(bytes)?);
        let (p50, p99) =
            batch_percentiles(BATCHES, PAIRS, |pairs| hit_pairs(&pooled, bytes, pairs))?;
        gpupool.0.push(p50);
        gpupool.1.push(p99);
        let pool = NaivePool::new(backend.clone());
        let (p50, p99) =
            batch_percentiles(BATCHES, PAIRS, |pairs| naive_pairs(&pool, bytes, pairs))?;
        naive.0.push(p50);
        naive.1.push(p99);
        let unpooled = manager(backend, false)?;
        let (p50, _) = pair_percentiles(200, 10, || {
            drop(unpooled.allocate_bytes(std::hint::black_box(bytes))?);
            Ok::<(), PoolError>(())
        })?;
        direct.push(p50);
    }
    Ok(LatencyReport {
        bytes: bytes as u64,
        p50_ns: Sampled::of("p50_ns", &gpupool.0),
        p99_ns: Sampled::of("p99_ns", &gpupool.1),
        naive_p50_ns: Sampled::of("naive_p50_ns", &naive.0),
        naive_p99_ns: Sampled::of("naive_p99_ns", &naive.1),
        direct_p50_ns: Sampled::of("direct_p50_ns", &direct),
        peers: Vec::new(),
    })
}

/// Threads of the throughput runs.
pub(super) const THROUGHPUT_THREADS: [usize; 3] = [1, 4, 16];
/// Pairs each thread runs.
const THROUGHPUT_PAIRS: usize = 100_000;

/// Pairs per second of `threads` threads each running `pairs` calls of `pair(thread)`.
/// `work(thread, pairs)` runs all of one thread's pairs, so the timed loop is the allocator's
/// own code and not a closure call per pair. The first thread's error, if any, is returned.
pub fn threaded_rate<E: Send>(
    threads: usize,
    pairs: usize,
    work: impl Fn(usize, usize) -> Result<(), E> + Sync,
) -> Result<f64, E> {
    let barrier = std::sync::Barrier::new(threads);
    // Each thread times itself; the run spans from the first start to the last end.
    let spans: Vec<(Instant, Instant)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                let barrier = &barrier;
                let work = &work;
                scope.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    work(thread, pairs)?;
                    Ok((start, Instant::now()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| {
                // A panic in a benchmark thread is a bug: carry it on as it is.
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect::<Result<_, E>>()
    })?;
    let first = spans.iter().map(|span| span.0).min().expect("threads");
    let last = spans.iter().map(|span| span.1).max().expect("threads");
    Ok((threads * pairs) as f64 / last.duration_since(first).as_secs_f64())
}

/// `samples` rates of [`threaded_rate`], as a [`Sampled`] `pairs_per_second`.
pub fn sampled_rate<E: Send>(
    samples: usize,
    threads: usize,
    pairs: usize,
    work: impl Fn(usize, usize) -> Result<(), E> + Sync,
) -> Result<Sampled, E> {
    let rates = (0..samples.max(1))
        .map(|_| threaded_rate(threads, pairs, &work))
        .collect::<Result<Vec<f64>, E>>()?;
    Ok(Sampled::of("pairs_per_second", &rates))
}

/// gpupool and the naive pool, 4 KiB pairs, with 1, 4 and 16 threads; each sample on a fresh
/// manager or pool.
pub(super) fn throughput(
    backend: &Arc<dyn Backend>,
    streams: &[gpupool::StreamId],
    samples: usize,
) -> Result<Vec<ThroughputReport>, BenchError> {
    let mut rows = Vec::new();
    for threads in THROUGHPUT_THREADS {
        let mut rates = Vec::with_capacity(samples);
        for _ in 0..samples.max(1) {
            let pooled = manager(backend, true)?;
            rates.push(threaded_rate(
                threads,
                THROUGHPUT_PAIRS,
                |thread, pairs| hit_pairs_on(&pooled, 4096, streams[thread % streams.len()], pairs),
            )?);
        }
        rows.push(ThroughputReport {
            allocator: "gpupool".into(),
            threads,
            pairs_per_second: Sampled::of("pairs_per_second", &rates),
        });
        rates.clear();
        for _ in 0..samples.max(1) {
            let naive = NaivePool::new(backend.clone());
            rates.push(threaded_rate(threads, THROUGHPUT_PAIRS, |_, pairs| {
                naive_pairs(&naive, 4096, pairs)
            })?);
        }
        rows.push(ThroughputReport {
            allocator: "naive pool".into(),
            threads,
            pairs_per_second: Sampled::of("pairs_per_second", &rates),
        });
    }
    Ok(rows)
}

/// `pairs` allocate+drop pairs of a cached block, in a function of its own: a loop a user would
/// write, compiled on its own rather than inside the timing closure.
#[inline(never)]
fn hit_pairs(manager: &MemoryManager, bytes: usize, pairs: usize) -> Result<(), PoolError> {
    for _ in 0..pairs {
        let buffer = manager.allocate_bytes(std::hint::black_box(bytes))?;
        std::hint::black_box(&buffer);
    }
    Ok(())
}

/// `hit_pairs` on a given stream.
#[inline(never)]
fn hit_pairs_on(
    manager: &MemoryManager,
    bytes: usize,
    stream: gpupool::StreamId,
    pairs: usize,
) -> Result<(), PoolError> {
    let options = gpupool::AllocOptions {
        stream,
        ..gpupool::AllocOptions::default()
    };
    for _ in 0..pairs {
        let buffer = manager.allocate_with::<u8>(std::hint::black_box(bytes), options)?;
        std::hint::black_box(&buffer);
    }
    Ok(())
}

/// The naive pool's counterpart of `hit_pairs`.
#[inline(never)]
fn naive_pairs(naive: &NaivePool, bytes: usize, pairs: usize) -> Result<(), BenchError> {
    for _ in 0..pairs {
        let block = naive_allocate(naive, std::hint::black_box(bytes))?;
        naive.free(std::hint::black_box(block));
    }
    Ok(())
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split(':').nth(1))
                .map(|name| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// Runs every workload as `options` says.
pub fn run(options: BenchOptions) -> Result<BenchReport, BenchError> {
    let samples = options.samples.max(1);
    let backend = options.backend.create(options.sim_capacity_bytes)?;
    let (seed_4k_report, _) = workload(
        &backend,
        "seed-4k",
        seed_4k,
        &[4096],
        SEED_ITERATIONS,
        samples,
    )?;
    let (mixed_report, mixed_stats) = workload(
        &backend,
        "seed-mixed",
        seed_mixed,
        &MIXED_SIZES,
        MIXED_ITERATIONS,
        samples,
    )?;
    let mut latency_rows = LATENCY_SIZES
        .iter()
        .map(|&bytes| latency(&backend, bytes, samples))
        .collect::<Result<Vec<_>, _>>()?;
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut workloads = vec![seed_4k_report, mixed_report];
    #[cfg(feature = "cuda")]
    let throughput = if backend.name() == "cuda" {
        cuda_peers::add_peers(&mut latency_rows, &mut workloads, samples)?
    } else {
        throughput(&backend, &[gpupool::StreamId::DEFAULT], samples)?
    };
    #[cfg(not(feature = "cuda"))]
    let throughput = throughput(&backend, &[gpupool::StreamId::DEFAULT], samples)?;
    Ok(BenchReport {
        schema_version: SCHEMA_VERSION,
        backend: backend.name().to_string(),
        device: backend.device_name(),
        cpu: cpu_name(),
        samples,
        workloads,
        latency: std::mem::take(&mut latency_rows),
        throughput,
        final_stats: Some(mixed_stats),
    })
}

/// Milliseconds with three decimals.
fn ms(value: f64) -> String {
    format!("{value:.3}")
}

/// Nanoseconds with one decimal.
fn ns(value: f64) -> String {
    format!("{value:.1}")
}

/// The seed's tables, as text. Timed figures are `median [min–max]` over the samples.
pub fn render_text(report: &BenchReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gpupool bench: backend {} ({}), CPU {}",
        report.backend, report.device, report.cpu
    );
    let _ = writeln!(
        out,
        "Timed figures: median [fastest–slowest] of {} sample{}, each on fresh managers",
        report.samples,
        if report.samples == 1 { "" } else { "s" }
    );
    for workload in &report.workloads {
        let _ = writeln!(out);
        if workload.sizes.is_empty() {
            let _ = writeln!(out, "Allocation Reduction Test ({})", workload.name);
            let _ = writeln!(out, "Iterations: {}", thousands(workload.requests));
            let _ = writeln!(out, "Buffer Size: {}", size(4096));
        } else {
            let sizes: Vec<String> = MIXED_SIZES.iter().map(|&b| size(b as u64)).collect();
            let _ = writeln!(out, "Mixed Size Workload ({})", workload.name);
            let _ = writeln!(
                out,
                "Iterations: {} per size",
                thousands(MIXED_ITERATIONS as u64)
            );
            let _ = writeln!(out, "Buffer Sizes: {}", sizes.join(", "));
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Direct Allocations: {}",
            thousands(workload.direct_backend_allocations)
        );
        let _ = writeln!(out, "Direct Time: {} ms", workload.direct_ms.show(ms));
        let _ = writeln!(
            out,
            "Pooled Allocations: {}",
            thousands(workload.backend_allocations)
        );
        let _ = writeln!(out, "Pooled Time: {} ms", workload.pooled_ms.show(ms));
        let _ = writeln!(out, "Pool Hit Rate: {:.2}%", workload.hit_rate * 100.0);
        let _ = writeln!(
            out,
            "Allocation Reduction: {:.1}%",
            workload.allocation_reduction * 100.0
        );
        let _ = writeln!(out, "Performance Speedup: {:.2}x", workload.speedup);
        let _ = writeln!(
            out,
            "Naive Pool Time: {} ms (gpupool is {:.2}x the naive pool's speed)",
            workload.naive_ms.show(ms),
            workload.naive_ms.median() / workload.pooled_ms.median()
        );
        for peer in &workload.peers {
            let _ = writeln!(
                out,
                "{} Time: {} ms (gpupool is {:.2}x its speed)",
                peer.name,
                peer.ms.show(ms),
                peer.ms.median() / workload.pooled_ms.median()
            );
        }
        if !workload.sizes.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "Per-Size Statistics:");
            for row in &workload.sizes {
                let _ = writeln!(
                    out,
                    "  {:>7}: {:>5} allocs, {:>5.1}% hit rate, {} backend allocation{}, {:>5.1}% efficiency",
                    size(row.bytes),
                    thousands(row.requests),
                    row.hit_rate * 100.0,
                    thousands(row.backend_allocations),
                    if row.backend_allocations == 1 { "" } else { "s" },
                    row.efficiency * 100.0
                );
            }
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Hit Path Latency (allocate + drop of a cached block, ns per pair)"
    );
    let _ = writeln!(
        out,
        "  {:<7}  {:<24} {:<24} p99",
        "size", "allocator", "p50"
    );
    for row in &report.latency {
        let gpupool_p50 = row.p50_ns.median();
        let lines = [
            ("gpupool", &row.p50_ns, Some(&row.p99_ns), String::new()),
            (
                "naive pool",
                &row.naive_p50_ns,
                Some(&row.naive_p99_ns),
                format!(
                    "{:.2}x gpupool's p50",
                    row.naive_p50_ns.median() / gpupool_p50
                ),
            ),
            (
                "pooling off (direct)",
                &row.direct_p50_ns,
                None,
                format!(
                    "{:.1}x gpupool's p50",
                    row.direct_p50_ns.median() / gpupool_p50
                ),
            ),
        ];
        let peers = row.peers.iter().map(|peer| {
            (
                peer.name.as_str(),
                &peer.p50_ns,
                Some(&peer.p99_ns),
                format!("{:.1}x gpupool's p50", peer.p50_ns.median() / gpupool_p50),
            )
        });
        let lines = lines
            .iter()
            .map(|(name, p50, p99, note)| (*name, *p50, *p99, note.clone()))
            .chain(peers);
        for (index, (name, p50, p99, note)) in lines.enumerate() {
            let label = if index == 0 {
                size(row.bytes)
            } else {
                String::new()
            };
            let p99 = p99.map_or_else(|| "-".to_string(), |p99| p99.show(ns));
            let line = format!(
                "  {label:<7}  {name:<24} {:<24} {p99:<24} {note}",
                p50.show(ns)
            );
            let _ = writeln!(out, "{}", line.trim_end());
        }
    }
    if let Some(stats) = &report.final_stats {
        let totals = &stats.totals;
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Pool after seed-mixed: {} requests, {:.1}% hit rate, {:.1}% reduction, reserved {} ({} cached)",
            thousands(totals.requests),
            totals.hit_rate * 100.0,
            totals.allocation_reduction * 100.0,
            bytes(totals.reserved_bytes),
            bytes(totals.cached_bytes)
        );
    }
    if !report.throughput.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Throughput (allocate + free pairs per second over all threads, one stream per thread)"
        );
        for row in &report.throughput {
            let threads = format!(
                "{} thread{}",
                row.threads,
                if row.threads == 1 { "" } else { "s" }
            );
            let _ = writeln!(
                out,
                "  {:<28} {threads:>10}: {}",
                row.allocator,
                row.pairs_per_second.show(rate)
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sampled_figure_keeps_its_key_and_adds_the_range() {
        let json =
            serde_json::to_value(Sampled::of("pooled_ms", &[3.0, 1.0, 2.0, 5.0, 4.0])).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"pooled_ms": 3.0, "pooled_ms_min": 1.0, "pooled_ms_max": 5.0})
        );
    }

    #[test]
    fn the_text_report_uses_iec_units_separators_and_rates() {
        let report = BenchReport {
            schema_version: SCHEMA_VERSION,
            backend: "sim".into(),
            device: "simulated".into(),
            cpu: "test".into(),
            samples: 3,
            workloads: vec![WorkloadReport {
                name: "seed-mixed".into(),
                requests: 3000,
                backend_allocations: 6,
                direct_backend_allocations: 3000,
                hit_rate: 0.998,
                allocation_reduction: 0.998,
                direct_ms: Sampled::of("direct_ms", &[3.0, 3.5, 4.0]),
                pooled_ms: Sampled::of("pooled_ms", &[0.1, 0.2, 0.3]),
                speedup: 17.5,
                naive_ms: Sampled::of("naive_ms", &[0.2, 0.2, 0.2]),
                sizes: vec![SizeRow {
                    bytes: 262_144,
                    requests: 1500,
                    backend_allocations: 1,
                    hit_rate: 0.998,
                    efficiency: 1.0,
                }],
                peers: Vec::new(),
            }],
            latency: vec![LatencyReport {
                bytes: 1 << 20,
                p50_ns: Sampled::of("p50_ns", &[20.0, 21.0, 22.0]),
                p99_ns: Sampled::of("p99_ns", &[30.0]),
                naive_p50_ns: Sampled::of("naive_p50_ns", &[40.0]),
                naive_p99_ns: Sampled::of("naive_p99_ns", &[50.0]),
                direct_p50_ns: Sampled::of("direct_p50_ns", &[1300.0]),
                peers: Vec::new(),
            }],
            throughput: vec![ThroughputReport {
                allocator: "gpupool".into(),
                threads: 1,
                pairs_per_second: Sampled::of("pairs_per_second", &[45_021_034.0, 40e6, 46e6]),
            }],
            final_stats: None,
        };
        let text = render_text(&report);
        for expected in [
            "median [fastest–slowest] of 3 samples",
            "Iterations: 500 per size",
            "Buffer Sizes: 256 B, 1 KiB, 4 KiB, 16 KiB, 64 KiB, 256 KiB",
            "Pooled Time: 0.200 [0.100–0.300] ms",
            "  256 KiB: 1,500 allocs,  99.8% hit rate, 1 backend allocation, 100.0% efficiency",
            "  1 MiB    gpupool                  21.0 [20.0–22.0]",
            "naive pool               40.0 [40.0–40.0]",
            "1.90x gpupool's p50",
            " 1 thread: 45.0 M/s [40.0 M/s–46.0 M/s]",
        ] {
            assert!(text.contains(expected), "{expected:?} not in\n{text}");
        }
        for raw in ["KB", "bytes:", "349440", "45021034", "pairs/s"] {
            assert!(!text.contains(raw), "{raw:?} in\n{text}");
        }
    }
}
