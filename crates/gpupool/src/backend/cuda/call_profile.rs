//! How many driver calls the CUDA backend made, by kind, and how long they took: what a pool's
//! misses cost on a given machine and driver, which the pool's own counters cannot say (a
//! mapping costs 60 µs on one host and several times that on another; see BENCHMARKS.md).
//!
//! Process-wide counters for every CUDA backend, added to with relaxed atomics after each
//! call: a reading is a running sum, not a snapshot; subtract two readings to time a stretch of
//! work. Only the slow paths make driver calls, so the hit path pays nothing for this.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A kind of driver call the backend makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DriverCall {
    /// `cuMemAlloc` (and `cuMemHostAlloc`) of a block.
    Allocate,
    /// `cuMemFree` (and `cuMemFreeHost`) of a block.
    Free,
    /// `cuMemCreate` + `cuMemMap` + `cuMemSetAccess` of one virtual-memory handle.
    Map,
    /// `cuMemUnmap` + `cuMemRelease` of one handle.
    Unmap,
    /// `cuEventCreate` + `cuEventRecord`: a fence on a stream.
    RecordFence,
    /// `cuEventQuery` of a fence not yet known complete.
    QueryFence,
    /// `cuCtxSynchronize` or `cuStreamSynchronize`.
    Synchronize,
    /// `cuMemGetInfo`.
    MemoryInfo,
}

impl DriverCall {
    /// Every kind, in the order [`driver_call_profile`] lists them.
    pub const ALL: [DriverCall; KINDS] = [
        DriverCall::Allocate,
        DriverCall::Free,
        DriverCall::Map,
        DriverCall::Unmap,
        DriverCall::RecordFence,
        DriverCall::QueryFence,
        DriverCall::Synchronize,
        DriverCall::MemoryInfo,
    ];

    /// A short name for reports (`map`, `record_fence`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DriverCall::Allocate => "allocate",
            DriverCall::Free => "free",
            DriverCall::Map => "map",
            DriverCall::Unmap => "unmap",
            DriverCall::RecordFence => "record_fence",
            DriverCall::QueryFence => "query_fence",
            DriverCall::Synchronize => "synchronize",
            DriverCall::MemoryInfo => "memory_info",
        }
    }
}

/// Calls of one kind so far, and their time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverCallCount {
    /// Calls made.
    pub calls: u64,
    /// Their time in total, in nanoseconds (the call and the context binding around it).
    pub nanos: u64,
}

/// How many kinds of driver call are counted.
const KINDS: usize = 8;

static CALLS: [AtomicU64; KINDS] = [const { AtomicU64::new(0) }; KINDS];
static NANOS: [AtomicU64; KINDS] = [const { AtomicU64::new(0) }; KINDS];

/// Runs `work` (one driver call of kind `call`, with what it needs around it) and counts it.
pub(super) fn timed<T>(call: DriverCall, work: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let result = work();
    let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    CALLS[call as usize].fetch_add(1, Ordering::Relaxed);
    NANOS[call as usize].fetch_add(nanos, Ordering::Relaxed);
    result
}

/// The driver calls every CUDA backend of this process made so far, by kind (in the order of
/// [`DriverCall::ALL`]).
///
/// ```
/// use gpupool::backend::cuda::{driver_call_profile, DriverCall};
///
/// let before = driver_call_profile();
/// // ... work on a pool over a `CudaBackend` ...
/// let after = driver_call_profile();
/// for (index, call) in DriverCall::ALL.iter().enumerate() {
///     let calls = after[index].calls - before[index].calls;
///     let micros = (after[index].nanos - before[index].nanos) as f64 / 1e3;
///     if calls > 0 {
///         println!("{}: {calls} calls, {micros:.0} µs", call.name());
///     }
/// }
/// ```
pub fn driver_call_profile() -> [DriverCallCount; KINDS] {
    std::array::from_fn(|index| DriverCallCount {
        calls: CALLS[index].load(Ordering::Relaxed),
        nanos: NANOS[index].load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timed_calls_are_counted_by_kind() {
        let before = driver_call_profile();
        let answer = timed(DriverCall::QueryFence, || 42);
        timed(DriverCall::QueryFence, || ());
        let after = driver_call_profile();
        assert_eq!(answer, 42);
        let index = DriverCall::QueryFence as usize;
        // Other tests may count calls at the same time: at least ours.
        assert!(after[index].calls >= before[index].calls + 2);
        assert_eq!(DriverCall::ALL[index], DriverCall::QueryFence);
        assert_eq!(DriverCall::ALL.len(), CALLS.len());
    }
}
