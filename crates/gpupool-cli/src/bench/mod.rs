//! `gpupool bench`: the seed's workloads and the hit-path latency, with peers in the same run.
//!
//! 1. seed-4k: 1,000 × (allocate 4,096 B, drop), pooling off (direct) vs on.
//! 2. seed-mixed: {256 B, 1 KiB, 4 KiB, 16 KiB, 64 KiB, 256 KiB} × 500 each, per-size rows.
//! 3. hit-path latency: allocate+drop pairs of a cached block (256 B, 4 KiB, 1 MiB), p50/p99.
//! 4. peers: a naive pool (one mutex, one `Vec` per power-of-two class) on the same backend,
//!    and on CUDA the driver's own allocators.
//!
//! Each timed figure is the median of several runs on fresh managers; counts come from one run.
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
use crate::format::thousands;
use naive::NaivePool;
use timing::{batch_percentiles, median_ms, pair_percentiles};

/// Runs of each timed workload; the median is reported.
pub(super) const RUNS: usize = 7;
pub(super) const SEED_ITERATIONS: usize = 1000;
const MIXED_SIZES: [usize; 6] = [256, 1024, 4096, 16384, 65536, 262144];
const MIXED_ITERATIONS: usize = 500;
const LATENCY_SIZES: [usize; 3] = [256, 4096, 1 << 20];

/// The whole benchmark report (the JSON output).
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// The backend measured.
    pub backend: String,
    /// The device (GPU name, or host memory and CPU).
    pub device: String,
    /// The host CPU.
    pub cpu: String,
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
    /// Median time with pooling off.
    pub direct_ms: f64,
    /// Median time with pooling on.
    pub pooled_ms: f64,
    /// direct_ms / pooled_ms.
    pub speedup: f64,
    /// Median time of the naive pool on the same workload.
    pub naive_ms: f64,
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
    /// Median time.
    pub ms: f64,
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

/// Hit-path latency of one size.
#[derive(Debug, Serialize)]
pub struct LatencyReport {
    /// Requested bytes.
    pub bytes: u64,
    /// gpupool pair p50.
    pub p50_ns: f64,
    /// gpupool pair p99.
    pub p99_ns: f64,
    /// Naive pool pair p50.
    pub naive_p50_ns: f64,
    /// Naive pool pair p99.
    pub naive_p99_ns: f64,
    /// Pooling off (a backend allocation and release per pair), p50.
    pub direct_p50_ns: f64,
    /// Driver peers (CUDA): name → p50 ns.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerLatency>,
}

/// A driver allocator's pair latency.
#[derive(Debug, Serialize)]
pub struct PeerLatency {
    /// The peer's name.
    pub name: String,
    /// Pair p50.
    pub p50_ns: f64,
    /// Pair p99.
    pub p99_ns: f64,
}

/// Pairs per second with several threads.
#[derive(Debug, Serialize)]
pub struct ThroughputReport {
    /// The allocator.
    pub allocator: String,
    /// Threads (one stream each).
    pub threads: usize,
    /// Allocate+free pairs per second over all threads.
    pub pairs_per_second: f64,
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
                "bench stopped: the naive pool's allocation of {bytes} bytes failed: {error}"
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

/// Times `RUNS` runs of `work` on fresh managers; returns the median and the last stats.
fn timed_runs(
    backend: &Arc<dyn Backend>,
    pooling: bool,
    work: impl Fn(&MemoryManager) -> Result<(), PoolError>,
) -> Result<(f64, PoolStats), PoolError> {
    let mut times = Vec::with_capacity(RUNS);
    let mut stats = None;
    for _ in 0..RUNS {
        let manager = manager(backend, pooling)?;
        let start = Instant::now();
        work(&manager)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        stats = Some(manager.stats());
    }
    times.sort_by(f64::total_cmp);
    Ok((timing::percentile(&times, 0.5), stats.expect("runs")))
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
) -> Result<f64, BenchError> {
    let (ms, ()) = median_ms(RUNS, || {
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
) -> Result<(WorkloadReport, PoolStats), BenchError> {
    let (direct_ms, direct) = timed_runs(backend, false, work)?;
    let (pooled_ms, pooled) = timed_runs(backend, true, work)?;
    let naive_ms = naive_ms(backend, sizes, iterations)?;
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
        direct_ms,
        pooled_ms,
        speedup: direct_ms / pooled_ms,
        naive_ms,
        sizes: rows,
        peers: Vec::new(),
    };
    Ok((report, pooled))
}

fn latency(backend: &Arc<dyn Backend>, bytes: usize) -> Result<LatencyReport, BenchError> {
    const BATCHES: usize = 5000;
    const PAIRS: usize = 100;
    let pooled = manager(backend, true)?;
    drop(pooled.allocate_bytes(bytes)?);
    let (p50_ns, p99_ns) =
        batch_percentiles(BATCHES, PAIRS, |pairs| hit_pairs(&pooled, bytes, pairs))?;
    let naive = NaivePool::new(backend.clone());
    let (naive_p50_ns, naive_p99_ns) =
        batch_percentiles(BATCHES, PAIRS, |pairs| naive_pairs(&naive, bytes, pairs))?;
    let direct = manager(backend, false)?;
    let (direct_p50_ns, _) = pair_percentiles(200, 10, || {
        drop(direct.allocate_bytes(std::hint::black_box(bytes))?);
        Ok::<(), PoolError>(())
    })?;
    Ok(LatencyReport {
        bytes: bytes as u64,
        p50_ns,
        p99_ns,
        naive_p50_ns,
        naive_p99_ns,
        direct_p50_ns,
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

/// gpupool and the naive pool, 4 KiB pairs, with 1, 4 and 16 threads.
pub(super) fn throughput(
    backend: &Arc<dyn Backend>,
    streams: &[gpupool::StreamId],
) -> Result<Vec<ThroughputReport>, BenchError> {
    let mut rows = Vec::new();
    for threads in THROUGHPUT_THREADS {
        let pooled = manager(backend, true)?;
        let rate = threaded_rate(threads, THROUGHPUT_PAIRS, |thread, pairs| {
            hit_pairs_on(&pooled, 4096, streams[thread % streams.len()], pairs)
        })?;
        rows.push(ThroughputReport {
            allocator: "gpupool".into(),
            threads,
            pairs_per_second: rate,
        });
        let naive = NaivePool::new(backend.clone());
        let rate = threaded_rate(threads, THROUGHPUT_PAIRS, |_, pairs| {
            naive_pairs(&naive, 4096, pairs)
        })?;
        rows.push(ThroughputReport {
            allocator: "naive pool".into(),
            threads,
            pairs_per_second: rate,
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

/// Runs every workload on `backend_name`; `sim_capacity_bytes` sizes a `sim` device (see
/// [`BackendName::create`]).
pub fn run(
    backend_name: BackendName,
    sim_capacity_bytes: Option<u64>,
) -> Result<BenchReport, BenchError> {
    let backend = backend_name.create(sim_capacity_bytes)?;
    let (seed_4k_report, _) = workload(&backend, "seed-4k", seed_4k, &[4096], SEED_ITERATIONS)?;
    let (mixed_report, mixed_stats) = workload(
        &backend,
        "seed-mixed",
        seed_mixed,
        &MIXED_SIZES,
        MIXED_ITERATIONS,
    )?;
    let mut latency_rows = LATENCY_SIZES
        .iter()
        .map(|&bytes| latency(&backend, bytes))
        .collect::<Result<Vec<_>, _>>()?;
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut workloads = vec![seed_4k_report, mixed_report];
    #[cfg(feature = "cuda")]
    let throughput = if backend.name() == "cuda" {
        cuda_peers::add_peers(&mut latency_rows, &mut workloads)?
    } else {
        throughput(&backend, &[gpupool::StreamId::DEFAULT])?
    };
    #[cfg(not(feature = "cuda"))]
    let throughput = throughput(&backend, &[gpupool::StreamId::DEFAULT])?;
    Ok(BenchReport {
        backend: backend.name().to_string(),
        device: backend.device_name(),
        cpu: cpu_name(),
        workloads,
        latency: std::mem::take(&mut latency_rows),
        throughput,
        final_stats: Some(mixed_stats),
    })
}

/// The seed's tables, as text.
pub fn render_text(report: &BenchReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gpupool bench: backend {} ({}), CPU {}",
        report.backend, report.device, report.cpu
    );
    for workload in &report.workloads {
        let _ = writeln!(out);
        if workload.sizes.is_empty() {
            let _ = writeln!(out, "Allocation Reduction Test ({})", workload.name);
            let _ = writeln!(out, "Iterations: {}", thousands(workload.requests));
            let _ = writeln!(out, "Buffer Size: 4,096 bytes");
        } else {
            let _ = writeln!(out, "Mixed Size Workload ({})", workload.name);
            let _ = writeln!(out, "Iterations: {MIXED_ITERATIONS} per size");
            let _ = writeln!(out, "Buffer Sizes: 256B, 1KB, 4KB, 16KB, 64KB, 256KB");
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Direct Allocations: {}",
            thousands(workload.direct_backend_allocations)
        );
        let _ = writeln!(out, "Direct Time: {:.3} ms", workload.direct_ms);
        let _ = writeln!(
            out,
            "Pooled Allocations: {}",
            thousands(workload.backend_allocations)
        );
        let _ = writeln!(out, "Pooled Time: {:.3} ms", workload.pooled_ms);
        let _ = writeln!(out, "Pool Hit Rate: {:.2}%", workload.hit_rate * 100.0);
        let _ = writeln!(
            out,
            "Allocation Reduction: {:.1}%",
            workload.allocation_reduction * 100.0
        );
        let _ = writeln!(out, "Performance Speedup: {:.2}x", workload.speedup);
        let _ = writeln!(
            out,
            "Naive Pool Time: {:.3} ms (gpupool is {:.2}x the naive pool's speed)",
            workload.naive_ms,
            workload.naive_ms / workload.pooled_ms
        );
        for peer in &workload.peers {
            let _ = writeln!(
                out,
                "{} Time: {:.3} ms (gpupool is {:.2}x its speed)",
                peer.name,
                peer.ms,
                peer.ms / workload.pooled_ms
            );
        }
        if !workload.sizes.is_empty() {
            let _ = writeln!(out);
            let _ = writeln!(out, "Per-Size Statistics:");
            for row in &workload.sizes {
                let _ = writeln!(
                    out,
                    "  {:>9} bytes: {:>5} allocs, {:>5.1}% hit rate, {} backend allocations, {:>5.1}% efficiency",
                    row.bytes,
                    row.requests,
                    row.hit_rate * 100.0,
                    row.backend_allocations,
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
        "  {:>9}  {:>8} {:>8}  {:>9} {:>9}  {:>10}  {:>12}",
        "bytes", "p50", "p99", "naive p50", "naive p99", "direct p50", "naive/gpupool"
    );
    for row in &report.latency {
        let _ = writeln!(
            out,
            "  {:>9}  {:>8.1} {:>8.1}  {:>9.1} {:>9.1}  {:>10.1}  {:>12.2}x",
            row.bytes,
            row.p50_ns,
            row.p99_ns,
            row.naive_p50_ns,
            row.naive_p99_ns,
            row.direct_p50_ns,
            row.naive_p50_ns / row.p50_ns
        );
        for peer in &row.peers {
            let _ = writeln!(
                out,
                "  {:>9}  {:<28} p50 {:>9.1}  p99 {:>9.1}  ({:.1}x gpupool's p50)",
                "",
                peer.name,
                peer.p50_ns,
                peer.p99_ns,
                peer.p50_ns / row.p50_ns
            );
        }
    }
    if let Some(stats) = &report.final_stats {
        let totals = &stats.totals;
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Pool after seed-mixed: {} requests, {:.1}% hit rate, {:.1}% reduction, reserved {} bytes ({} cached)",
            totals.requests,
            totals.hit_rate * 100.0,
            totals.allocation_reduction * 100.0,
            totals.reserved_bytes,
            totals.cached_bytes
        );
    }
    if !report.throughput.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "Throughput (allocate + free pairs per second, one stream per thread)"
        );
        for row in &report.throughput {
            let _ = writeln!(
                out,
                "  {:<28} {:>2} threads: {:>14.0} pairs/s",
                row.allocator, row.threads, row.pairs_per_second
            );
        }
    }
    out
}
