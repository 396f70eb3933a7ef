//! Issue 13 on the device: the stress of `stress.rs` on CUDA, with kernels writing the buffers
//! while other threads allocate, and the card filled to out of memory again and again.
//!
//! [`cuda_stress_kernels_write_while_others_allocate`]: `GPUPOOL_CUDA_STRESS_THREADS` threads
//! (default 8), each with a stream of its own made by the backend, do `GPUPOOL_CUDA_STRESS_OPS`
//! random operations in all (default 20,000) per setup: they allocate device buffers of 1 B to
//! 64 MiB (skewed to small sizes) on their stream or another thread's, fill each with a pattern
//! of its owner (a hand-written PTX kernel: word `i` is `tag ^ (i × 0x9E3779B1)`, the tag drawn
//! per buffer), rewrite buffers on other streams after `record_stream` (ordered after the
//! buffer's stream by an event), hand buffers to other threads, verify them (a second kernel
//! counts the words that differ from the pattern into a device word), trim, and drop them with
//! the previous owner's writes sometimes still queued, on the buffer's stream or on a stream it
//! was recorded on. A block handed to a new owner while such a write could still run gets
//! overwritten after the new owner's fill: its verification finds the old owner's words. Every
//! buffer is verified before its drop. Checked as in `stress.rs`: no two live buffers overlap
//! (an interval map), every snapshot (a sampler thread, and the workers now and then) satisfies
//! the identities of `stress::snapshot_failures` (with the budget), counters never go back,
//! every failed allocation is a clean error of a kind the setup can produce; at the end, with
//! every buffer dropped, nothing is in use, every request is counted, and trims give every
//! byte back. Two setups: the virtual-memory arena with background maintenance, and the
//! segment arena with a 1 GiB budget, `zero_on_reuse` and tight idle caps. The data check is
//! not vacuous: with the `record_stream` call of `write_elsewhere` left out, 200,000
//! operations per setup on the H200 found 4 and 2 buffers overwritten by a previous owner's
//! queued write (and 2,000,000 with it found none).
//!
//! [`cuda_stress_fill_to_out_of_memory_repeatedly`]: `GPUPOOL_CUDA_STRESS_OOM_ROUNDS` rounds
//! (default 3) per setup (virtual-memory arena, segment arena, each with and without a budget
//! of half the card) of: allocate 1 GiB buffers until the pool refuses, then 64 MiB, 2 MiB and
//! 64 KiB ones, each filled by the kernel; every refusal must be a clean `PoolError` of the
//! setup's kind (`OutOfMemory` without budget, `BudgetExceeded` with one) naming the request;
//! every buffer handed out still holds its pattern afterwards; after dropping them all and a
//! trim, the pool holds nothing, the driver's free memory is back within 16 pages of where it
//! started, and a new allocation succeeds and carries data.
//!
//! Each test prints one summary line per setup (`cuda stress ...`). Without a driver each
//! prints `skipped: no CUDA driver` and passes (`devscripts/cuda_tests.sh` fails a run where
//! a GPU is visible and a test skipped). On the device, with a larger count:
//!
//! ```text
//! GPUPOOL_CUDA_STRESS_OPS=2000000 devbin/all-<hash> cuda_stress --nocapture --test-threads=1
//! ```
//!
//! The GPU is taken through this module's own lock: the tests of `cuda.rs` use theirs, so run
//! the CUDA tests with `--test-threads=1` (as `devscripts/cuda_tests.sh` does), because the
//! out-of-memory test fills the whole card.

use std::error::Error;
use std::ffi::{c_void, CString};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use gpupool::backend::cuda::cudarc::driver::{result, sys, CudaContext, DriverError};
use gpupool::backend::cuda::CudaBackend;
use gpupool::{
    AllocOptions, Backend, MemoryManager, PoolConfig, PoolConfigBuilder, PoolError, PoolStats,
    PooledBuffer, StreamId, TrimLevel,
};

use crate::stress::{
    env_or, insert_range, lock, panic_message, remove_range, request_bytes, snapshot_failures,
    IntervalMap, Monotone, Owner, SplitMix64, Violations,
};

type TestResult = Result<(), Box<dyn Error>>;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;

/// The GPU, one test of this module at a time.
static GPU: Mutex<()> = Mutex::new(());

/// Device 0 (a backend, its context for raw driver calls, this test's turn), or `None` after
/// printing `skipped: no CUDA driver`.
fn cuda_or_skip() -> Option<(CudaBackend, Arc<CudaContext>, MutexGuard<'static, ()>)> {
    if !CudaBackend::driver_available() {
        eprintln!("skipped: no CUDA driver");
        return None;
    }
    let turn = GPU.lock().unwrap_or_else(PoisonError::into_inner);
    let backend = CudaBackend::new(0).expect("device 0 opens when a driver is present");
    eprintln!("cuda stress: device 0 is {}", backend.device_name());
    let ctx = backend.context().clone();
    Some((backend, ctx, turn))
}

// ---------------------------------------------------------------------------------------------
// The kernels.

/// `gpupool_stress_fill(dst, words, tag)` writes `tag ^ (i × 0x9E3779B1)` (32-bit, `i`'s low
/// 32 bits) to word `i` of `dst` for every `i < words`; `gpupool_stress_check(src, words, tag,
/// mismatches)` adds 1 to the word at `mismatches` for each word of `src` that differs from
/// that. Grid-stride loops over a 64-bit index, so any grid covers any length. Hand-written
/// PTX (ISA 7.0, sm_52, JIT-compiled by the driver for the card): no nvrtc or toolkit needed.
/// `-1640531535` is `0x9E3779B1` as the signed immediate `nvcc` would print.
const STRESS_PTX: &str = r"
.version 7.0
.target sm_52
.address_size 64

.visible .entry gpupool_stress_fill(
    .param .u64 gpupool_stress_fill_dst,
    .param .u64 gpupool_stress_fill_words,
    .param .u32 gpupool_stress_fill_tag
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<10>;

    ld.param.u64 %rd1, [gpupool_stress_fill_dst];
    ld.param.u64 %rd2, [gpupool_stress_fill_words];
    ld.param.u32 %r1, [gpupool_stress_fill_tag];
    cvta.to.global.u64 %rd3, %rd1;
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mov.u32 %r5, %nctaid.x;
    cvt.u64.u32 %rd4, %r4;
    mad.wide.u32 %rd5, %r2, %r3, %rd4;
    mul.wide.u32 %rd6, %r5, %r3;
$L__fill_loop:
    setp.ge.u64 %p1, %rd5, %rd2;
    @%p1 bra $L__fill_done;
    cvt.u32.u64 %r6, %rd5;
    mul.lo.s32 %r7, %r6, -1640531535;
    xor.b32 %r7, %r7, %r1;
    shl.b64 %rd7, %rd5, 2;
    add.s64 %rd8, %rd3, %rd7;
    st.global.u32 [%rd8], %r7;
    add.s64 %rd5, %rd5, %rd6;
    bra.uni $L__fill_loop;
$L__fill_done:
    ret;
}

.visible .entry gpupool_stress_check(
    .param .u64 gpupool_stress_check_src,
    .param .u64 gpupool_stress_check_words,
    .param .u32 gpupool_stress_check_tag,
    .param .u64 gpupool_stress_check_mismatches
)
{
    .reg .pred %p<3>;
    .reg .b32 %r<10>;
    .reg .b64 %rd<12>;

    ld.param.u64 %rd1, [gpupool_stress_check_src];
    ld.param.u64 %rd2, [gpupool_stress_check_words];
    ld.param.u32 %r1, [gpupool_stress_check_tag];
    ld.param.u64 %rd9, [gpupool_stress_check_mismatches];
    cvta.to.global.u64 %rd3, %rd1;
    cvta.to.global.u64 %rd10, %rd9;
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mov.u32 %r5, %nctaid.x;
    cvt.u64.u32 %rd4, %r4;
    mad.wide.u32 %rd5, %r2, %r3, %rd4;
    mul.wide.u32 %rd6, %r5, %r3;
$L__check_loop:
    setp.ge.u64 %p1, %rd5, %rd2;
    @%p1 bra $L__check_done;
    cvt.u32.u64 %r6, %rd5;
    mul.lo.s32 %r7, %r6, -1640531535;
    xor.b32 %r7, %r7, %r1;
    shl.b64 %rd7, %rd5, 2;
    add.s64 %rd8, %rd3, %rd7;
    ld.global.u32 %r8, [%rd8];
    setp.eq.s32 %p2, %r8, %r7;
    @%p2 bra $L__check_next;
    atom.global.add.u32 %r9, [%rd10], 1;
$L__check_next:
    add.s64 %rd5, %rd5, %rd6;
    bra.uni $L__check_loop;
$L__check_done:
    ret;
}
";

/// Threads per block of both kernels.
const BLOCK_THREADS: u32 = 256;
/// The most blocks a launch uses (each thread then loops over the rest).
const MAX_BLOCKS: u32 = 4096;

/// The word the kernels put at index `index` of a buffer tagged `tag` (the host's copy of the
/// formula, for the report of a mismatch).
fn pattern_word(tag: u32, index: usize) -> u32 {
    tag ^ (index as u32).wrapping_mul(0x9E37_79B1)
}

/// The loaded module and its two kernels.
struct Kernels {
    ctx: Arc<CudaContext>,
    module: sys::CUmodule,
    fill: sys::CUfunction,
    check: sys::CUfunction,
}

// SAFETY: the driver API is thread-safe; the module and function handles may be used to launch
// from any thread bound to the same context (every launch binds it), and nothing here is
// mutated after `load`.
unsafe impl Sync for Kernels {}

impl Kernels {
    fn load(ctx: &Arc<CudaContext>) -> Result<Kernels, DriverError> {
        ctx.bind_to_thread()?;
        let ptx = CString::new(STRESS_PTX).expect("the PTX has no NUL byte");
        // SAFETY: a NUL-terminated PTX text, which `cuModuleLoadData` accepts; the context is
        // current.
        let module = unsafe { result::module::load_data(ptx.as_ptr().cast()) }?;
        let function = |name: &str| {
            let name = CString::new(name).expect("no NUL byte");
            // SAFETY: `module` was just loaded and is unloaded only in `Drop`.
            unsafe { result::module::get_function(module, name) }
        };
        let (fill, check) = match (
            function("gpupool_stress_fill"),
            function("gpupool_stress_check"),
        ) {
            (Ok(fill), Ok(check)) => (fill, check),
            (Err(error), _) | (_, Err(error)) => {
                // SAFETY: loaded above, used by nothing yet, unloaded once.
                let _ = unsafe { result::module::unload(module) };
                return Err(error);
            }
        };
        Ok(Kernels {
            ctx: ctx.clone(),
            module,
            fill,
            check,
        })
    }

    /// The grid for `words` words.
    fn grid(words: usize) -> u32 {
        words
            .div_ceil(BLOCK_THREADS as usize)
            .clamp(1, MAX_BLOCKS as usize) as u32
    }

    /// Queues the fill of the first `words` words at `address` with `tag`'s pattern on
    /// `stream`. The caller keeps the memory allocated (a live buffer, or a dropped one whose
    /// stream the pool orders reuse after) until it has run.
    fn fill(&self, address: u64, words: usize, tag: u32, stream: StreamId) -> DriverResult {
        if words == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        let (mut dst, mut count, mut tag) = (address, words as u64, tag);
        let mut params = [
            (&mut dst as *mut u64).cast::<c_void>(),
            (&mut count as *mut u64).cast::<c_void>(),
            (&mut tag as *mut u32).cast::<c_void>(),
        ];
        // SAFETY: `fill` takes (.u64, .u64, .u32), which `params` points to in that order (the
        // driver copies them during the call); it writes only words `0..words` at `address`,
        // which the caller holds allocated on this context until the kernel has run; the
        // stream is one of the backend's, alive as long as the manager.
        unsafe {
            result::launch_kernel(
                self.fill,
                (Self::grid(words), 1, 1),
                (BLOCK_THREADS, 1, 1),
                0,
                CudaBackend::stream_handle(stream),
                &mut params,
            )
        }
    }

    /// Queues the check of the first `words` words at `address` against `tag`'s pattern on
    /// `stream`, adding the number of differing words to the device word at `mismatches`.
    fn check(
        &self,
        address: u64,
        words: usize,
        tag: u32,
        mismatches: u64,
        stream: StreamId,
    ) -> DriverResult {
        if words == 0 {
            return Ok(());
        }
        self.ctx.bind_to_thread()?;
        let (mut src, mut count, mut tag, mut counter) = (address, words as u64, tag, mismatches);
        let mut params = [
            (&mut src as *mut u64).cast::<c_void>(),
            (&mut count as *mut u64).cast::<c_void>(),
            (&mut tag as *mut u32).cast::<c_void>(),
            (&mut counter as *mut u64).cast::<c_void>(),
        ];
        // SAFETY: `check` takes (.u64, .u64, .u32, .u64), which `params` points to in that
        // order; it reads words `0..words` at `address` (held allocated by the caller until it
        // has run) and adds atomically to the live device word at `mismatches`.
        unsafe {
            result::launch_kernel(
                self.check,
                (Self::grid(words), 1, 1),
                (BLOCK_THREADS, 1, 1),
                0,
                CudaBackend::stream_handle(stream),
                &mut params,
            )
        }
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            let _ = result::ctx::synchronize();
            // SAFETY: every launch has finished (synchronised above); unloaded once.
            let _ = unsafe { result::module::unload(self.module) };
        }
    }
}

type DriverResult = Result<(), DriverError>;

/// A device word the check kernel counts mismatches into: `cuMemAlloc` memory outside the
/// pool, so that the pool's figures are the stress's alone, and so that it exists when the card
/// is full.
struct Counter {
    ctx: Arc<CudaContext>,
    address: u64,
}

impl Counter {
    fn new(ctx: &Arc<CudaContext>) -> Result<Counter, DriverError> {
        ctx.bind_to_thread()?;
        // SAFETY: the context is current; freed once, in `Drop`.
        let address = unsafe { result::malloc_sync(4) }?;
        Ok(Counter {
            ctx: ctx.clone(),
            address,
        })
    }

    /// Sets the word to zero on `stream` (queued).
    fn reset(&self, stream: StreamId) -> DriverResult {
        self.ctx.bind_to_thread()?;
        // SAFETY: a live 4-byte allocation of this context; the stream is a live one of it.
        unsafe { sys::cuMemsetD32Async(self.address, 0, 1, CudaBackend::stream_handle(stream)) }
            .result()
    }

    /// The word, once the work queued on `stream` before has run.
    fn read(&self, stream: StreamId) -> Result<u32, DriverError> {
        self.ctx.bind_to_thread()?;
        let mut value = [0u32; 1];
        let handle = CudaBackend::stream_handle(stream);
        // SAFETY: a live 4-byte allocation; `value` outlives the copy, which has completed
        // when the stream's synchronisation returns.
        unsafe {
            result::memcpy_dtoh_async(&mut value, self.address, handle)?;
            result::stream::synchronize(handle)?;
        }
        Ok(value[0])
    }

    /// Counts the words of `[address, +4 × words)` that differ from `tag`'s pattern, in order
    /// after the work queued on `stream`, and waits for the answer.
    fn mismatches(
        &self,
        kernels: &Kernels,
        address: u64,
        words: usize,
        tag: u32,
        stream: StreamId,
    ) -> Result<u32, DriverError> {
        self.reset(stream)?;
        kernels.check(address, words, tag, self.address, stream)?;
        self.read(stream)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            let _ = result::ctx::synchronize();
            // SAFETY: allocated in `new`, freed once; no queued work uses it (synchronised).
            let _ = unsafe { result::free_sync(self.address) };
        }
    }
}

/// Makes the work queued on `waiter` from now on wait for the work queued on `writer` so far
/// (an event recorded on `writer`).
fn order_after(ctx: &CudaContext, waiter: StreamId, writer: StreamId) -> DriverResult {
    if waiter == writer {
        return Ok(());
    }
    ctx.bind_to_thread()?;
    let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?;
    // SAFETY: a fresh event and two live streams of this context; destroying an event that a
    // queued wait refers to is allowed (its resources go when the wait is done).
    let outcome = unsafe {
        result::event::record(event, CudaBackend::stream_handle(writer)).and_then(|()| {
            result::stream::wait_event(
                CudaBackend::stream_handle(waiter),
                event,
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        })
    };
    // SAFETY: created above, destroyed once.
    let destroyed = unsafe { result::event::destroy(event) };
    outcome.and(destroyed)
}

fn synchronize(ctx: &CudaContext) -> DriverResult {
    ctx.bind_to_thread()?;
    result::ctx::synchronize()
}

/// Free device memory (`cuMemGetInfo`).
fn device_free(ctx: &CudaContext) -> Result<u64, DriverError> {
    ctx.bind_to_thread()?;
    Ok(result::mem_get_info()?.0 as u64)
}

/// The first word of `[address, +4 × words)` that differs from `tag`'s pattern, as (index,
/// found), read back in chunks (only after the kernel reported a mismatch).
fn first_mismatch(
    ctx: &CudaContext,
    address: u64,
    words: usize,
    tag: u32,
    stream: StreamId,
) -> Result<Option<(usize, u32)>, DriverError> {
    const CHUNK: usize = 1 << 20;
    ctx.bind_to_thread()?;
    let handle = CudaBackend::stream_handle(stream);
    let mut chunk = vec![0u32; CHUNK.min(words)];
    for start in (0..words).step_by(CHUNK) {
        let count = CHUNK.min(words - start);
        // SAFETY: words `start..start + count` lie in the caller's live buffer; `chunk`
        // outlives the copy, complete when the synchronisation returns.
        unsafe {
            result::memcpy_dtoh_async(&mut chunk[..count], address + 4 * start as u64, handle)?;
            result::stream::synchronize(handle)?;
        }
        let found = chunk[..count]
            .iter()
            .enumerate()
            .find(|&(offset, &word)| word != pattern_word(tag, start + offset));
        if let Some((offset, &word)) = found {
            return Ok(Some((start + offset, word)));
        }
    }
    Ok(None)
}

/// Test configurations: no maintenance thread unless a setup asks for one.
fn config() -> PoolConfigBuilder {
    PoolConfig::builder().maintenance_interval(Duration::ZERO)
}

fn on(stream: StreamId) -> AllocOptions {
    AllocOptions {
        stream,
        ..AllocOptions::default()
    }
}

/// Gives back every idle byte: synchronises the device (so every fence is complete) and trims,
/// a few times (a release deferred by one trim goes at the next). Returns the last snapshot.
fn trim_to_rest(ctx: &CudaContext, manager: &MemoryManager) -> Result<PoolStats, DriverError> {
    let mut stats = manager.stats();
    for _ in 0..4 {
        synchronize(ctx)?;
        manager.trim(TrimLevel::Aggressive);
        stats = manager.stats();
        if stats.totals.reserved_bytes + stats.totals.pending_release_bytes == 0 {
            break;
        }
    }
    Ok(stats)
}

// ---------------------------------------------------------------------------------------------
// Kernels writing while other threads allocate.

/// One configuration of the kernel stress.
#[derive(Clone, Debug)]
struct Setup {
    name: &'static str,
    threads: usize,
    ops_per_thread: u64,
    /// The virtual-memory arena for large requests (else the segment arena).
    virtual_memory: bool,
    budget: Option<u64>,
    zero_on_reuse: bool,
    /// Idle caps (blocks per class, byte allowance, kept by a normal trim); `None`: defaults.
    idle_caps: Option<(usize, usize, usize)>,
    maintenance: Duration,
    max_request: usize,
    seed: u64,
}

impl Setup {
    fn base(name: &'static str) -> Setup {
        Setup {
            name,
            threads: 8,
            ops_per_thread: 2_500,
            virtual_memory: true,
            budget: None,
            zero_on_reuse: false,
            idle_caps: None,
            maintenance: Duration::ZERO,
            max_request: 64 * MIB,
            seed: 0x6375_6461_7374_7213,
        }
    }

    /// Large requests in the virtual-memory arena, background maintenance every 5 ms.
    fn virtual_memory() -> Setup {
        Setup {
            maintenance: Duration::from_millis(5),
            ..Setup::base("cuda-vm-arena")
        }
    }

    /// The segment arena, a 1 GiB budget (some requests are refused), zeroing on reuse (the
    /// pool queues a memset on the new owner's stream before its fill), tight idle caps (many
    /// drops release blocks while kernels may still use them).
    fn segments_budget() -> Setup {
        Setup {
            virtual_memory: false,
            budget: Some(GIB as u64),
            zero_on_reuse: true,
            idle_caps: Some((4, 0, 1)),
            ..Setup::base("cuda-segments-budget-zeroing")
        }
    }

    fn manager(&self, backend: CudaBackend) -> Result<MemoryManager, PoolError> {
        let mut config = config()
            .budget_bytes(self.budget)
            .zero_on_reuse(self.zero_on_reuse)
            .maintenance_interval(self.maintenance);
        if !self.virtual_memory {
            config = config.virtual_memory_pages(None);
        }
        if let Some((blocks, bytes, keep)) = self.idle_caps {
            config = config
                .max_idle_per_class(blocks)
                .max_idle_bytes_per_class(bytes)
                .min_idle_per_class(keep);
        }
        MemoryManager::with_config(backend, config.build()?)
    }
}

/// Live buffers a worker keeps at most.
const MAX_LIVE: usize = 32;
/// Buffers waiting in the hand-off at most.
const MAX_EXCHANGE: usize = 64;

/// A live buffer with what the stress knows of it.
struct Live {
    buffer: PooledBuffer<u8>,
    owner: Owner,
    /// The pattern's tag.
    tag: u32,
    /// Words carrying the pattern: the whole requested length but its last `len % 4` bytes.
    words: usize,
    /// Streams besides the buffer's own that wrote it (each passed to `record_stream`).
    others: Vec<StreamId>,
    /// Whether it is in the interval map (not when it overlapped another: reported already).
    tracked: bool,
}

/// Counts of one thread, summed at the end.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    ops: u64,
    allocations: u64,
    failed: u64,
    failed_budget: u64,
    failed_out_of_memory: u64,
    drops: u64,
    /// Drops with the previous owner's writes still queued.
    drops_with_queued_writes: u64,
    handoffs: u64,
    record_streams: u64,
    fills: u64,
    checks: u64,
    buffers_verified: u64,
    bytes_verified: u64,
    snapshots: u64,
    overlap_checks: u64,
    trims: u64,
    maintenance: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.ops += o.ops;
        self.allocations += o.allocations;
        self.failed += o.failed;
        self.failed_budget += o.failed_budget;
        self.failed_out_of_memory += o.failed_out_of_memory;
        self.drops += o.drops;
        self.drops_with_queued_writes += o.drops_with_queued_writes;
        self.handoffs += o.handoffs;
        self.record_streams += o.record_streams;
        self.fills += o.fills;
        self.checks += o.checks;
        self.buffers_verified += o.buffers_verified;
        self.bytes_verified += o.bytes_verified;
        self.snapshots += o.snapshots;
        self.overlap_checks += o.overlap_checks;
        self.trims += o.trims;
        self.maintenance += o.maintenance;
    }
}

/// What the threads of one run share.
struct Shared {
    setup: Setup,
    ctx: Arc<CudaContext>,
    kernels: Kernels,
    /// One per worker thread (thread `t` uses `streams[t]`; any thread may queue on any).
    streams: Vec<StreamId>,
    intervals: Mutex<IntervalMap>,
    exchange: Mutex<Vec<Live>>,
    violations: Violations,
    /// Operations done so far, for the deadlock watchdog.
    progress: AtomicU64,
    stop: AtomicBool,
}

impl Shared {
    fn allocate(
        &self,
        manager: &MemoryManager,
        random: &mut SplitMix64,
        owner: Owner,
        own: StreamId,
        counts: &mut Counts,
    ) -> Result<Option<Live>, DriverError> {
        let bytes = request_bytes(random, self.setup.max_request);
        // One in eight on another thread's stream (stream order holds whoever queues).
        let stream = if random.chance(8) {
            self.streams[random.below(self.streams.len())]
        } else {
            own
        };
        let buffer = match manager.allocate_with::<u8>(bytes, on(stream)) {
            Ok(buffer) => buffer,
            Err(error) => {
                counts.failed += 1;
                let clean = match &error {
                    PoolError::BudgetExceeded { .. } => {
                        counts.failed_budget += 1;
                        self.setup.budget.is_some()
                    }
                    // Not expected on a card this size, but a clean answer.
                    PoolError::OutOfMemory { .. } => {
                        counts.failed_out_of_memory += 1;
                        true
                    }
                    _ => false,
                };
                if !clean {
                    self.violations.report(format!(
                        "{owner}: allocation of {bytes} bytes failed with an unexpected error: \
                         {error:?}"
                    ));
                }
                return Ok(None);
            }
        };
        counts.allocations += 1;
        if buffer.len() != bytes
            || buffer.block_bytes() < bytes
            || buffer.stream() != stream
            || buffer.device() != 0
        {
            self.violations.report(format!(
                "{owner}: a request of {bytes} bytes on stream {stream:?} got {buffer:?} (stream \
                 {:?})",
                buffer.stream()
            ));
        }
        let tag =
            (SplitMix64::new((u64::from(owner.thread) << 40) ^ owner.seq).next() >> 32) as u32;
        let mut live = Live {
            buffer,
            owner,
            tag,
            words: bytes / 4,
            others: Vec::new(),
            tracked: false,
        };
        counts.overlap_checks += 1;
        let start = live.buffer.device_address();
        let end = start + live.buffer.block_bytes() as u64;
        match insert_range(&self.intervals, start, end, owner) {
            Ok(()) => live.tracked = true,
            Err(overlap) => self.violations.report(format!("{owner}: {overlap}")),
        }
        self.kernels
            .fill(start, live.words, tag, live.buffer.stream())?;
        counts.fills += 1;
        Ok(Some(live))
    }

    /// Checks the buffer's pattern, after every write queued on it so far (on its stream and
    /// the streams recorded on it).
    fn verify(&self, live: &Live, counter: &Counter, counts: &mut Counts) -> DriverResult {
        let stream = live.buffer.stream();
        for &other in &live.others {
            order_after(&self.ctx, stream, other)?;
        }
        if live.words == 0 {
            return Ok(()); // under 4 bytes: no word carries the pattern
        }
        let address = live.buffer.device_address();
        let mismatches =
            counter.mismatches(&self.kernels, address, live.words, live.tag, stream)?;
        counts.checks += 1;
        counts.buffers_verified += 1;
        counts.bytes_verified += 4 * live.words as u64;
        if mismatches != 0 {
            let first = first_mismatch(&self.ctx, address, live.words, live.tag, stream)?;
            self.violations.report(format!(
                "{}: {mismatches} of the {} words of [{address:#x}, +{}) (stream {stream:?}, \
                 also written on {:?}) lost their pattern; the first: {}",
                live.owner,
                live.words,
                live.buffer.len(),
                live.others,
                match first {
                    Some((index, found)) => format!(
                        "word {index} is {found:#010x}, expected {:#010x}",
                        pattern_word(live.tag, index)
                    ),
                    None => "none on reading back (a transient difference)".into(),
                }
            ));
        }
        Ok(())
    }

    /// Verifies the buffer and drops it, half the time with rewrites of its pattern still
    /// queued on its stream or on one recorded on it: the pool must give the block to no
    /// other stream before they have run.
    fn retire(
        &self,
        live: Live,
        counter: &Counter,
        random: &mut SplitMix64,
        counts: &mut Counts,
    ) -> DriverResult {
        let verified = self.verify(&live, counter, counts);
        if live.tracked {
            let start = live.buffer.device_address();
            if let Err(message) = remove_range(&self.intervals, start, live.owner) {
                self.violations.report(message);
            }
        }
        let mut queued = Ok(());
        if verified.is_ok() && live.words > 0 && random.chance(2) {
            let choice = random.below(live.others.len() + 1);
            let stream = live
                .others
                .get(choice)
                .copied()
                .unwrap_or(live.buffer.stream());
            for _ in 0..1 + random.below(3) {
                queued = queued.and_then(|()| {
                    self.kernels
                        .fill(live.buffer.device_address(), live.words, live.tag, stream)
                });
                counts.fills += 1;
            }
            counts.drops_with_queued_writes += 1;
        }
        counts.drops += 1;
        drop(live.buffer);
        verified.and(queued)
    }

    /// Rewrites the buffer's pattern on another stream, ordered after its own stream's work,
    /// and records that stream on the buffer.
    fn write_elsewhere(
        &self,
        live: &mut Live,
        stream: StreamId,
        counts: &mut Counts,
    ) -> DriverResult {
        let own = live.buffer.stream();
        if stream == own {
            return Ok(());
        }
        order_after(&self.ctx, stream, own)?;
        self.kernels
            .fill(live.buffer.device_address(), live.words, live.tag, stream)?;
        counts.fills += 1;
        live.buffer.record_stream(stream);
        if !live.others.contains(&stream) {
            live.others.push(stream);
        }
        counts.record_streams += 1;
        Ok(())
    }

    fn check_snapshot(&self, stats: &PoolStats, previous: &mut Option<Monotone>, who: &str) {
        for failure in snapshot_failures(stats, self.setup.budget) {
            self.violations
                .report(format!("{who}: snapshot identity: {failure}"));
        }
        let now = Monotone::of(stats);
        if let Some(earlier) = previous {
            if !now.not_below(earlier) {
                self.violations.report(format!(
                    "{who}: counters went backwards: {earlier:?} then {now:?}"
                ));
            }
        }
        *previous = Some(now);
    }
}

fn worker(shared: &Shared, manager: MemoryManager, thread: usize) -> Counts {
    let mut counts = Counts::default();
    let who = format!("thread {thread}");
    let counter = match Counter::new(&shared.ctx) {
        Ok(counter) => counter,
        Err(error) => {
            shared
                .violations
                .report(format!("{who}: no counter word: {error:?}"));
            return counts;
        }
    };
    let setup = &shared.setup;
    let own = shared.streams[thread];
    let mut random = SplitMix64::new(setup.seed.wrapping_add((thread as u64 + 1) << 40));
    let mut live: Vec<Live> = Vec::new();
    let mut seq = 0u64;
    let mut previous = None;
    let mut peak = 0u64;
    for op in 0..setup.ops_per_thread {
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        if op % 64 == 63 {
            shared.progress.fetch_add(64, Ordering::Relaxed);
        }
        counts.ops += 1;
        let outcome = match random.below(10_000) {
            0..4_000 => {
                let mut outcome = Ok(());
                if live.len() >= MAX_LIVE {
                    let victim = live.swap_remove(random.below(live.len()));
                    outcome = shared.retire(victim, &counter, &mut random, &mut counts);
                }
                let owner = Owner {
                    thread: thread as u32,
                    seq,
                };
                seq += 1;
                outcome.and_then(|()| {
                    let allocated = shared.allocate(&manager, &mut random, owner, own, &mut counts);
                    allocated.map(|buffer| live.extend(buffer))
                })
            }
            4_000..7_000 if !live.is_empty() => {
                let victim = live.swap_remove(random.below(live.len()));
                shared.retire(victim, &counter, &mut random, &mut counts)
            }
            7_000..7_600 => {
                // Hand a buffer to another thread, or take one another thread handed over.
                counts.handoffs += 1;
                let mut exchange = lock(&shared.exchange);
                if random.chance(2) && !live.is_empty() && exchange.len() < MAX_EXCHANGE {
                    exchange.push(live.swap_remove(random.below(live.len())));
                } else if !exchange.is_empty() && live.len() < MAX_LIVE {
                    let index = random.below(exchange.len());
                    live.push(exchange.swap_remove(index));
                }
                Ok(())
            }
            7_600..8_400 if !live.is_empty() => {
                let index = random.below(live.len());
                let stream = shared.streams[random.below(shared.streams.len())];
                shared.write_elsewhere(&mut live[index], stream, &mut counts)
            }
            8_400..8_900 if !live.is_empty() => {
                // Queued work on the buffer's own stream, not waited for.
                let buffer = &live[random.below(live.len())];
                counts.fills += 1;
                shared.kernels.fill(
                    buffer.buffer.device_address(),
                    buffer.words,
                    buffer.tag,
                    buffer.buffer.stream(),
                )
            }
            8_900..9_300 if !live.is_empty() => {
                let buffer = &live[random.below(live.len())];
                shared.verify(buffer, &counter, &mut counts)
            }
            9_300..9_500 => {
                counts.snapshots += 1;
                let stats = manager.stats();
                shared.check_snapshot(&stats, &mut previous, &who);
                Ok(())
            }
            9_500..9_550 => {
                counts.trims += 1;
                manager.trim(TrimLevel::Normal);
                Ok(())
            }
            9_550..9_570 => {
                counts.trims += 1;
                manager.trim(TrimLevel::Aggressive);
                Ok(())
            }
            9_570..9_600 => {
                counts.maintenance += 1;
                manager.run_maintenance();
                Ok(())
            }
            _ => {
                let now = manager.peak_reserved_bytes();
                if now < peak {
                    shared.violations.report(format!(
                        "{who}: peak reserved bytes went down from {peak} to {now}"
                    ));
                }
                peak = now;
                Ok(())
            }
        };
        if let Err(error) = outcome {
            shared
                .violations
                .report(format!("{who}: a driver call failed: {error:?}; stopping"));
            shared.stop.store(true, Ordering::Relaxed);
            break;
        }
    }
    // What is left goes to the hand-off: the end of the run verifies and drops it.
    lock(&shared.exchange).append(&mut live);
    drop(counter);
    counts
}

/// What the sampler thread saw.
#[derive(Clone, Copy, Debug, Default)]
struct SamplerCounts {
    snapshots: u64,
}

fn sampler(shared: &Shared, manager: MemoryManager, workers_done: &AtomicBool) -> SamplerCounts {
    let mut counts = SamplerCounts::default();
    let mut previous = None;
    let mut last_progress = (0, Instant::now());
    while !workers_done.load(Ordering::Relaxed) {
        let stats = manager.stats();
        shared.check_snapshot(&stats, &mut previous, "sampler");
        counts.snapshots += 1;
        // A deadlock watchdog: no operation for this long is not slowness.
        let progress = shared.progress.load(Ordering::Relaxed);
        if progress != last_progress.0 {
            last_progress = (progress, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(180) {
            eprintln!(
                "cuda stress {}: no operation finished for 180 s: deadlock; aborting",
                shared.setup.name
            );
            std::process::abort();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    counts
}

/// The figures of one run.
#[derive(Debug)]
struct Report {
    name: &'static str,
    threads: usize,
    seconds: f64,
    counts: Counts,
    sampler: SamplerCounts,
    violations: u64,
    first_violations: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        write!(
            f,
            "cuda stress {}: {} threads, {} ops in {:.2} s ({:.0} ops/s); allocations: {} ok, \
             {} failed ({} budget, {} out of memory); kernels: {} fills, {} checks; {} drops \
             ({} with writes still queued), {} hand-offs, {} writes on other streams \
             (record_stream), {} trims, {} maintenance; checks: {} buffers verified, {} bytes \
             verified, {} overlap checks, {} snapshots by workers, {} by the sampler; \
             violations: {}",
            self.name,
            self.threads,
            c.ops,
            self.seconds,
            c.ops as f64 / self.seconds.max(1e-9),
            c.allocations,
            c.failed,
            c.failed_budget,
            c.failed_out_of_memory,
            c.fills,
            c.checks,
            c.drops,
            c.drops_with_queued_writes,
            c.handoffs,
            c.record_streams,
            c.trims,
            c.maintenance,
            c.buffers_verified,
            c.bytes_verified,
            c.overlap_checks,
            c.snapshots,
            self.sampler.snapshots,
            self.violations
        )
    }
}

/// The pool at rest, every buffer dropped: nothing in use, every request counted, and after
/// trims nothing held.
fn check_at_rest(shared: &Shared, manager: &MemoryManager, counts: &Counts) -> DriverResult {
    let report = |message: String| shared.violations.report(format!("at rest: {message}"));
    synchronize(&shared.ctx)?;
    let stats = manager.stats();
    for failure in snapshot_failures(&stats, shared.setup.budget) {
        report(failure);
    }
    let totals = &stats.totals;
    if (totals.in_use_bytes, totals.requested_live_bytes) != (0, 0) {
        report(format!(
            "in use {} and requested live {} bytes with no buffer alive",
            totals.in_use_bytes, totals.requested_live_bytes
        ));
    }
    if (totals.requests, totals.failed_requests) != (counts.allocations, counts.failed) {
        report(format!(
            "(requests, failed) = ({}, {}), the workers saw ({}, {})",
            totals.requests, totals.failed_requests, counts.allocations, counts.failed
        ));
    }
    let stats = trim_to_rest(&shared.ctx, manager)?;
    let totals = &stats.totals;
    if (totals.reserved_bytes, totals.pending_release_bytes) != (0, 0) {
        report(format!(
            "after synchronising and trimming with no buffer alive the pool still holds {} \
             bytes ({} blocks) and {} bytes pending release",
            totals.reserved_bytes, totals.blocks_held, totals.pending_release_bytes
        ));
    }
    let left = lock(&shared.intervals).len();
    if left != 0 {
        report(format!("{left} ranges left in the interval map"));
    }
    Ok(())
}

fn run(
    setup: &Setup,
    backend: CudaBackend,
    ctx: &Arc<CudaContext>,
) -> Result<Report, Box<dyn Error>> {
    let streams: Vec<StreamId> = (0..setup.threads)
        .map(|_| backend.create_stream())
        .collect::<Result<_, _>>()?;
    let manager = setup.manager(backend)?;
    let shared = Shared {
        setup: setup.clone(),
        ctx: ctx.clone(),
        kernels: Kernels::load(ctx)?,
        streams,
        intervals: Mutex::default(),
        exchange: Mutex::new(Vec::new()),
        violations: Violations::default(),
        progress: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    };
    let start = Instant::now();
    let mut counts = Counts::default();
    let workers_done = AtomicBool::new(false);
    let sampler_counts = std::thread::scope(|scope| {
        let sampler_manager = manager.clone();
        let (shared, workers_done) = (&shared, &workers_done);
        let sampler = scope.spawn(move || sampler(shared, sampler_manager, workers_done));
        let workers: Vec<_> = (0..setup.threads)
            .map(|thread| {
                let manager = manager.clone();
                scope.spawn(move || worker(shared, manager, thread))
            })
            .collect();
        for (thread, handle) in workers.into_iter().enumerate() {
            match handle.join() {
                Ok(thread_counts) => counts.add(&thread_counts),
                Err(payload) => shared.violations.report(format!(
                    "thread {thread} panicked: {}",
                    panic_message(payload.as_ref())
                )),
            }
        }
        workers_done.store(true, Ordering::Relaxed);
        sampler.join().unwrap_or_else(|payload| {
            shared.violations.report(format!(
                "the sampler panicked: {}",
                panic_message(payload.as_ref())
            ));
            SamplerCounts::default()
        })
    });

    // The leftovers: verified and dropped here, then the pool at rest.
    let ended = (|| -> DriverResult {
        let counter = Counter::new(ctx)?;
        let mut random = SplitMix64::new(setup.seed ^ 0x0065_6e64);
        let leftovers = std::mem::take(&mut *lock(&shared.exchange));
        let mut outcome = Ok(());
        for live in leftovers {
            let retired = shared.retire(live, &counter, &mut random, &mut counts);
            outcome = outcome.and(retired);
        }
        drop(counter);
        outcome?;
        check_at_rest(&shared, &manager, &counts)
    })();
    if let Err(error) = ended {
        shared.violations.report(format!(
            "the end of the run: a driver call failed: {error:?}"
        ));
    }
    drop(manager);
    let seconds = start.elapsed().as_secs_f64();
    let first_violations = lock(&shared.violations.first).clone();
    Ok(Report {
        name: setup.name,
        threads: setup.threads,
        seconds,
        counts,
        sampler: sampler_counts,
        violations: shared.violations.count(),
        first_violations,
    })
}

/// Issue 13 on the device: kernels fill, rewrite and check buffers on every worker's stream
/// while the other workers allocate, hand over, record streams, trim and drop.
#[test]
fn cuda_stress_kernels_write_while_others_allocate() -> TestResult {
    let Some((backend, ctx, turn)) = cuda_or_skip() else {
        return Ok(());
    };
    let threads: usize = env_or("GPUPOOL_CUDA_STRESS_THREADS", 8usize).max(1);
    let ops: u64 = env_or("GPUPOOL_CUDA_STRESS_OPS", 20_000u64);
    let seed: u64 = env_or("GPUPOOL_CUDA_STRESS_SEED", Setup::base("").seed);
    let vmm = backend.virtual_memory().is_some();
    if !vmm {
        eprintln!("cuda stress: device 0 has no virtual memory management; segments serve instead");
    }
    let mut backend = Some(backend);
    let mut failed = Vec::new();
    for mut setup in [Setup::virtual_memory(), Setup::segments_budget()] {
        setup.threads = threads;
        setup.ops_per_thread = ops.div_ceil(threads as u64);
        setup.seed = seed;
        let backend = match backend.take() {
            Some(backend) => backend,
            None => CudaBackend::new(0)?,
        };
        let report = run(&setup, backend, &ctx)?;
        println!("{report}");
        if report.violations != 0 {
            failed.push((report.name, report.violations, report.first_violations));
            continue;
        }
        let c = &report.counts;
        assert_eq!(c.ops, setup.threads as u64 * setup.ops_per_thread);
        assert!(c.allocations > 0 && c.buffers_verified > 0, "{report}");
        if threads > 1 {
            assert!(
                c.record_streams > 0,
                "no buffer was written on another stream: {report}"
            );
        }
    }
    assert!(failed.is_empty(), "violations: {failed:#?}");
    drop(turn);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The card filled to out of memory, again and again.

/// One configuration of the out-of-memory rounds.
struct OomSetup {
    name: &'static str,
    virtual_memory: bool,
    budget: Option<u64>,
}

/// The request sizes of a fill, in order: each is requested until the pool refuses it.
const FILL_SIZES: [usize; 4] = [GIB, 64 * MIB, 2 * MIB, 64 * KIB];

/// The figures of the out-of-memory rounds of one setup.
#[derive(Debug, Default)]
struct OomFigures {
    rounds: u32,
    buffers: u64,
    bytes_filled: u64,
    buffers_verified: u64,
    bytes_verified: u64,
    refusals: u64,
    most_held: u64,
    free_start: u64,
    /// The lowest free memory after a trim, over the rounds.
    free_after_trim: u64,
}

/// A buffer of a fill and its pattern.
struct Filled {
    buffer: PooledBuffer<u8>,
    tag: u32,
    owner: Owner,
}

/// Checks a refusal: the setup's kind, naming the request and the numbers.
fn check_refusal(
    error: &PoolError,
    asked: usize,
    held_bytes: u64,
    budget: Option<u64>,
) -> Result<(), String> {
    let names_request = |requested: u64| {
        requested >= asked as u64 && requested <= asked.next_multiple_of(2 * MIB) as u64
    };
    match (error, budget) {
        (
            PoolError::OutOfMemory {
                requested_bytes,
                reserved_bytes,
                device_free_bytes,
            },
            None,
        ) => {
            if !names_request(*requested_bytes) {
                return Err(format!("{error}: the request was {asked} bytes"));
            }
            if *reserved_bytes < held_bytes {
                return Err(format!(
                    "{error}: the buffers handed out hold {held_bytes} bytes"
                ));
            }
            if device_free_bytes.is_none() {
                return Err(format!("{error}: no free memory figure"));
            }
            Ok(())
        }
        (
            PoolError::BudgetExceeded {
                requested_bytes,
                reserved_bytes,
                budget_bytes,
            },
            Some(budget),
        ) => {
            if !names_request(*requested_bytes) {
                return Err(format!("{error}: the request was {asked} bytes"));
            }
            if *budget_bytes != budget {
                return Err(format!("{error}: the budget is {budget}"));
            }
            if *reserved_bytes < held_bytes || *reserved_bytes > budget {
                return Err(format!(
                    "{error}: the buffers handed out hold {held_bytes} bytes, the budget is \
                     {budget}"
                ));
            }
            if reserved_bytes + requested_bytes <= budget {
                return Err(format!("{error}: the request fits in the budget"));
            }
            Ok(())
        }
        _ => Err(format!(
            "a request of {asked} bytes was refused with {error:?}, expected {}",
            if budget.is_some() {
                "BudgetExceeded"
            } else {
                "OutOfMemory"
            }
        )),
    }
}

/// The rounds of one setup.
fn oom_rounds(
    setup: &OomSetup,
    backend: CudaBackend,
    ctx: &Arc<CudaContext>,
    rounds: u32,
    page_bytes: u64,
) -> Result<OomFigures, Box<dyn Error>> {
    let stream = backend.create_stream()?;
    let mut config = config().budget_bytes(setup.budget);
    if !setup.virtual_memory {
        config = config.virtual_memory_pages(None);
    }
    let manager = MemoryManager::with_config(backend, config.build()?)?;
    let kernels = Kernels::load(ctx)?;
    let counter = Counter::new(ctx)?;
    // A warm-up, so that whatever the driver sets up on the first launch, copy and memset is
    // in place before the free memory is read.
    {
        let warm = manager.allocate_with::<u8>(MIB, on(stream))?;
        kernels.fill(warm.device_address(), MIB / 4, 7, stream)?;
        let mismatches = counter.mismatches(&kernels, warm.device_address(), MIB / 4, 7, stream)?;
        assert_eq!(
            mismatches, 0,
            "{}: the warm-up buffer lost its pattern",
            setup.name
        );
    }
    let rest = trim_to_rest(ctx, &manager)?;
    assert_eq!(rest.totals.reserved_bytes, 0, "{}: {rest:?}", setup.name);
    let mut figures = OomFigures {
        free_start: device_free(ctx)?,
        free_after_trim: u64::MAX,
        ..OomFigures::default()
    };
    let mut random = SplitMix64::new(0x006f_6f6d ^ setup.name.len() as u64);
    for round in 0..rounds {
        figures.rounds += 1;
        let mut held: Vec<Filled> = Vec::new();
        let mut held_bytes = 0u64;
        let intervals = Mutex::new(IntervalMap::new());
        for asked in FILL_SIZES {
            // Enough attempts to fill any card with this size, and then some.
            let limit = (ctx.total_mem()? / asked).max(1 << 12) + 64;
            let mut refused = false;
            for _ in 0..limit {
                match manager.allocate_with::<u8>(asked, on(stream)) {
                    Ok(buffer) => {
                        let tag = random.next() as u32;
                        let start = buffer.device_address();
                        let end = start + buffer.block_bytes() as u64;
                        let owner = Owner {
                            thread: round,
                            seq: figures.buffers,
                        };
                        insert_range(&intervals, start, end, owner)
                            .map_err(|overlap| format!("{}: {overlap}", setup.name))?;
                        kernels.fill(start, asked / 4, tag, stream)?;
                        figures.buffers += 1;
                        figures.bytes_filled += asked as u64;
                        held_bytes += buffer.block_bytes() as u64;
                        held.push(Filled { buffer, tag, owner });
                    }
                    Err(error) => {
                        check_refusal(&error, asked, held_bytes, setup.budget).map_err(
                            |message| format!("{} round {round}: {message}", setup.name),
                        )?;
                        figures.refusals += 1;
                        refused = true;
                        break;
                    }
                }
            }
            assert!(
                refused || asked < FILL_SIZES[0],
                "{}: {limit} requests of {asked} bytes were all served",
                setup.name
            );
        }
        // Full: the largest size is refused again, cleanly.
        match manager.allocate_with::<u8>(GIB, on(stream)) {
            Ok(buffer) => panic!(
                "{}: 1 GiB was served right after it was refused: {buffer:?}",
                setup.name
            ),
            Err(error) => {
                check_refusal(&error, GIB, held_bytes, setup.budget)
                    .map_err(|message| format!("{} round {round}: {message}", setup.name))?;
                figures.refusals += 1;
            }
        }
        let stats = manager.stats();
        let failures = snapshot_failures(&stats, setup.budget);
        assert!(
            failures.is_empty(),
            "{} round {round}: snapshot identities: {failures:#?}",
            setup.name
        );
        assert_eq!(stats.totals.in_use_bytes, held_bytes, "{}", setup.name);
        if let Some(budget) = setup.budget {
            // Every size is a multiple of 64 KiB and the budget one of 1 GiB: the budget is
            // filled to within the smallest large request.
            assert!(
                stats.totals.reserved_bytes + 2 * MIB as u64 > budget,
                "{}: refused at {} bytes reserved under a budget of {budget}",
                setup.name,
                stats.totals.reserved_bytes
            );
        }
        figures.most_held = figures.most_held.max(held_bytes);

        // Every buffer handed out before the refusals still holds its pattern.
        counter.reset(stream)?;
        for filled in &held {
            let words = filled.buffer.len() / 4;
            kernels.check(
                filled.buffer.device_address(),
                words,
                filled.tag,
                counter.address,
                stream,
            )?;
            figures.buffers_verified += 1;
            figures.bytes_verified += 4 * words as u64;
        }
        let mismatches = counter.read(stream)?;
        if mismatches != 0 {
            for filled in &held {
                let words = filled.buffer.len() / 4;
                let address = filled.buffer.device_address();
                if let Some((index, found)) =
                    first_mismatch(ctx, address, words, filled.tag, stream)?
                {
                    panic!(
                        "{} round {round}: {mismatches} words lost their pattern; the first \
                         found: word {index} of [{address:#x}, +{}) is {found:#010x}, expected \
                         {:#010x}",
                        setup.name,
                        filled.buffer.len(),
                        pattern_word(filled.tag, index)
                    );
                }
            }
            panic!(
                "{} round {round}: {mismatches} words lost their pattern",
                setup.name
            );
        }

        let handed_out = held.len();
        // Everything back: nothing held after a trim, the driver's free memory where it was.
        for filled in held.drain(..) {
            remove_range(&intervals, filled.buffer.device_address(), filled.owner)
                .map_err(|message| format!("{} round {round}: {message}", setup.name))?;
            drop(filled.buffer);
        }
        assert!(lock(&intervals).is_empty(), "{}", setup.name);
        let stats = trim_to_rest(ctx, &manager)?;
        assert_eq!(
            (
                stats.totals.in_use_bytes,
                stats.totals.reserved_bytes,
                stats.totals.pending_release_bytes
            ),
            (0, 0, 0),
            "{} round {round}: the pool still holds memory after the trim: {:?}",
            setup.name,
            stats.totals
        );
        let free = device_free(ctx)?;
        figures.free_after_trim = figures.free_after_trim.min(free);
        eprintln!(
            "cuda stress oom {} round {round}: {} buffers, {} bytes handed out; free {} bytes \
             at the start, {free} after the trim",
            setup.name, handed_out, held_bytes, figures.free_start
        );
        assert!(
            free + 16 * page_bytes >= figures.free_start,
            "{} round {round}: the device has {free} bytes free after the trim, more than 16 \
             pages of {page_bytes} bytes below the {} it had at the start",
            setup.name,
            figures.free_start
        );

        // And the pool serves again, with data.
        for asked in [GIB, 64 * KIB] {
            let buffer = manager.allocate_with::<u8>(asked, on(stream))?;
            let tag = random.next() as u32;
            kernels.fill(buffer.device_address(), asked / 4, tag, stream)?;
            let mismatches =
                counter.mismatches(&kernels, buffer.device_address(), asked / 4, tag, stream)?;
            assert_eq!(
                mismatches, 0,
                "{} round {round}: a fresh buffer lost its pattern",
                setup.name
            );
            figures.buffers_verified += 1;
            figures.bytes_verified += asked as u64;
        }
    }
    let stats = trim_to_rest(ctx, &manager)?;
    assert_eq!(stats.totals.reserved_bytes, 0, "{}", setup.name);
    drop(counter);
    drop(kernels);
    drop(manager);
    Ok(figures)
}

/// Issue 13 on the device: the card (or the budget) filled until the pool refuses, again and
/// again, with and without the virtual-memory arena.
#[test]
fn cuda_stress_fill_to_out_of_memory_repeatedly() -> TestResult {
    let Some((backend, ctx, turn)) = cuda_or_skip() else {
        return Ok(());
    };
    let rounds: u32 = env_or("GPUPOOL_CUDA_STRESS_OOM_ROUNDS", 3u32);
    let total = backend.memory_info().expect("memory info").total_bytes;
    let page_bytes = backend
        .virtual_memory()
        .map_or(2 * MIB, |memory| memory.granularity()) as u64;
    // Half the card, in whole GiB: smaller than the card, so the budget refuses first.
    let budget = (total / 2) / GIB as u64 * GIB as u64;
    let setups = [
        OomSetup {
            name: "vm-arena",
            virtual_memory: true,
            budget: None,
        },
        OomSetup {
            name: "segments",
            virtual_memory: false,
            budget: None,
        },
        OomSetup {
            name: "vm-arena-budget",
            virtual_memory: true,
            budget: Some(budget),
        },
        OomSetup {
            name: "segments-budget",
            virtual_memory: false,
            budget: Some(budget),
        },
    ];
    let mut backend = Some(backend);
    for setup in &setups {
        let backend = match backend.take() {
            Some(backend) => backend,
            None => CudaBackend::new(0)?,
        };
        let start = Instant::now();
        let figures = oom_rounds(setup, backend, &ctx, rounds, page_bytes)?;
        println!(
            "cuda stress oom {}: {} rounds in {:.2} s, budget {}; {} buffers filled ({} bytes), \
             at most {} bytes held of {total}; {} refusals caught (all {}); {} buffers verified, \
             {} bytes verified; device free {} bytes at the start, at least {} after each trim; \
             violations: 0",
            setup.name,
            figures.rounds,
            start.elapsed().as_secs_f64(),
            setup
                .budget
                .map_or("none".to_string(), |budget| budget.to_string()),
            figures.buffers,
            figures.bytes_filled,
            figures.most_held,
            figures.refusals,
            if setup.budget.is_some() {
                "BudgetExceeded"
            } else {
                "OutOfMemory"
            },
            figures.buffers_verified,
            figures.bytes_verified,
            figures.free_start,
            figures.free_after_trim
        );
        assert!(figures.refusals >= u64::from(rounds), "{figures:?}");
    }
    drop(turn);
    Ok(())
}
