//! The CUDA driver's own allocators, measured in the same run as gpupool.
//!
//! - direct: `cuMemAlloc` / `cuMemFree` on every request;
//! - stream-ordered pool: `cuMemAllocFromPoolAsync` / `cuMemFreeAsync` on a private pool whose
//!   release threshold is the maximum (CUDA's own caching allocator).
//!
//! The peers themselves live in [`crate::driver_peers`]. Both keep a small ledger of live
//! pointers (one mutex) so a double free is an error rather than heap corruption; it costs tens
//! of nanoseconds against microsecond driver calls. Throughput gives each thread its own
//! stream, for gpupool and the stream-ordered pool alike.
#![forbid(unsafe_code)]

use std::sync::Arc;

use gpupool::backend::cuda::CudaBackend;
use gpupool::{Backend, PoolError, StreamId};

use super::timing::{pair_percentiles, sampled_ms};
use super::{
    sampled_rate, throughput, BenchError, LatencyReport, PeerLatency, PeerTime, Sampled,
    ThroughputReport, WorkloadReport, SEED_ITERATIONS, THROUGHPUT_THREADS,
};
use crate::driver_peers::{DirectAllocator, StreamOrderedPool};

const DIRECT_PAIRS_PER_THREAD: usize = 2_000;
const STREAM_POOL_PAIRS_PER_THREAD: usize = 20_000;

/// Adds the driver peers to the seed-4k workload and the latency rows, and returns the
/// throughput of gpupool, the naive pool and both peers with 1, 4 and 16 threads; every timed
/// figure is taken `samples` times.
pub fn add_peers(
    latency: &mut [LatencyReport],
    workloads: &mut [WorkloadReport],
    samples: usize,
) -> Result<Vec<ThroughputReport>, BenchError> {
    let direct = DirectAllocator::new(0)?;
    let stream_pool = StreamOrderedPool::new(0)?;
    let stream = stream_pool.create_stream()?;

    if let Some(seed_4k) = workloads
        .iter_mut()
        .find(|workload| workload.name == "seed-4k")
    {
        let (stream_pool_ms, ()) = sampled_ms(samples, || {
            for _ in 0..SEED_ITERATIONS {
                let ptr = stream_pool.alloc(4096, stream)?;
                stream_pool.free(ptr, stream)?;
            }
            Ok::<(), PoolError>(())
        })?;
        seed_4k.peers.push(PeerTime {
            name: "cuda stream-ordered pool".into(),
            ms: Sampled::new("ms", stream_pool_ms),
        });
    }

    for row in latency.iter_mut() {
        let bytes = row.bytes as usize;
        let (mut direct_p50, mut direct_p99) = (Vec::new(), Vec::new());
        let (mut pool_p50, mut pool_p99) = (Vec::new(), Vec::new());
        for _ in 0..samples.max(1) {
            let (p50_ns, p99_ns) = pair_percentiles(200, 10, || {
                let ptr = direct.alloc(bytes)?;
                direct.free(ptr)
            })?;
            direct_p50.push(p50_ns);
            direct_p99.push(p99_ns);
            let (p50_ns, p99_ns) = pair_percentiles(2000, 100, || {
                let ptr = stream_pool.alloc(bytes, stream)?;
                stream_pool.free(ptr, stream)
            })?;
            pool_p50.push(p50_ns);
            pool_p99.push(p99_ns);
        }
        row.peers.push(PeerLatency {
            name: "cuMemAlloc/cuMemFree".into(),
            p50_ns: Sampled::of("p50_ns", &direct_p50),
            p99_ns: Sampled::of("p99_ns", &direct_p99),
        });
        row.peers.push(PeerLatency {
            name: "cuda stream-ordered pool".into(),
            p50_ns: Sampled::of("p50_ns", &pool_p50),
            p99_ns: Sampled::of("p99_ns", &pool_p99),
        });
    }

    // gpupool and the naive pool as on every backend, with one CUDA stream per thread.
    let backend = Arc::new(CudaBackend::new(0)?);
    let streams: Vec<StreamId> = (0..*THROUGHPUT_THREADS.iter().max().expect("threads"))
        .map(|_| backend.create_stream())
        .collect::<Result<_, _>>()?;
    let dyn_backend: Arc<dyn Backend> = backend;
    let mut rows = throughput(&dyn_backend, &streams, samples)?;
    let peer_streams: Vec<StreamId> = (0..streams.len())
        .map(|_| stream_pool.create_stream())
        .collect::<Result<_, _>>()?;
    for threads in THROUGHPUT_THREADS {
        let rate = sampled_rate(
            samples,
            threads,
            STREAM_POOL_PAIRS_PER_THREAD,
            |thread, pairs| {
                let stream = peer_streams[thread];
                for _ in 0..pairs {
                    let ptr = stream_pool.alloc(4096, stream)?;
                    stream_pool.free(ptr, stream)?;
                }
                Ok::<(), PoolError>(())
            },
        )?;
        rows.push(ThroughputReport {
            allocator: "cuda stream-ordered pool".into(),
            threads,
            pairs_per_second: rate,
        });
        let rate = sampled_rate(samples, threads, DIRECT_PAIRS_PER_THREAD, |_, pairs| {
            for _ in 0..pairs {
                let ptr = direct.alloc(4096)?;
                direct.free(ptr)?;
            }
            Ok::<(), PoolError>(())
        })?;
        rows.push(ThroughputReport {
            allocator: "cuMemAlloc/cuMemFree".into(),
            threads,
            pairs_per_second: rate,
        });
    }
    // Grouped by thread count, as the other backends print them.
    rows.sort_by_key(|row| row.threads);
    Ok(rows)
}
