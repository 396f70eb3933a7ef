//! CUDA backend tests, on device 0.
//!
//! Each test starts with [`cuda_or_skip`], which prints `skipped: no CUDA driver` and returns
//! `None` without a driver, so the tests build and run everywhere but prove something only on a
//! GPU machine (`devscripts/cuda_tests.sh` fails when a GPU is present and a test skipped). The
//! tests take turns on the GPU through one lock even when the harness runs tests in parallel:
//! one of them fills the whole device.
//!
//! Copies and fills go through the driver directly (cudarc, as re-exported by the backend), on
//! the buffer's stream, followed by a synchronisation of that stream. Stream A is held busy by
//! a tiny hand-written PTX kernel that spins until the host opens a flag ([`Gate`]), so "A is
//! still busy" is a fact of the test, not a race against the clock.

use std::error::Error;
use std::ffi::{c_void, CString};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use gpupool::backend::cuda::cudarc::driver::{
    result, sys, CudaContext, CudaStream, DevicePtr, DeviceSlice, DriverError,
};
use gpupool::backend::cuda::CudaBackend;
use gpupool::backend::{BackendError, StreamOrdered};
use gpupool::{
    AllocOptions, Backend, MemoryKind, MemoryManager, PoolConfig, PoolConfigBuilder, PoolError,
    StreamId,
};

type TestResult = Result<(), Box<dyn Error>>;

const MIB: usize = 1 << 20;

/// The GPU, one test at a time.
static GPU: Mutex<()> = Mutex::new(());

/// Device 0, its context (for raw driver calls after the backend moved into a manager) and
/// this test's turn on the GPU.
struct Gpu {
    backend: CudaBackend,
    ctx: Arc<CudaContext>,
    turn: MutexGuard<'static, ()>,
}

/// Device 0, or `None` after printing `skipped: no CUDA driver`.
fn cuda_or_skip() -> Option<Gpu> {
    if !CudaBackend::driver_available() {
        eprintln!("skipped: no CUDA driver");
        return None;
    }
    let turn = GPU.lock().unwrap_or_else(PoisonError::into_inner);
    let backend = CudaBackend::new(0).expect("device 0 opens when a driver is present");
    eprintln!("cuda: device 0 is {}", backend.device_name());
    let ctx = backend.context().clone();
    Some(Gpu { backend, ctx, turn })
}

/// Test configurations: no maintenance thread, so nothing is released behind the test's back.
fn config() -> PoolConfigBuilder {
    PoolConfig::builder().maintenance_interval(Duration::ZERO)
}

/// A backend call's result as a test error (`BackendError` is not a `std::error::Error`).
fn driver<T>(result: Result<T, BackendError>) -> Result<T, Box<dyn Error>> {
    result.map_err(|error| format!("{error:?}").into())
}

fn on(stream: StreamId) -> AllocOptions {
    AllocOptions {
        stream,
        ..AllocOptions::default()
    }
}

fn on_kind(stream: StreamId, kind: MemoryKind) -> AllocOptions {
    AllocOptions {
        stream,
        kind: Some(kind),
        ..AllocOptions::default()
    }
}

/// Copies `data` to device address `dst` on `stream` and waits for it.
fn upload(ctx: &CudaContext, dst: u64, data: &[u32], stream: StreamId) -> Result<(), DriverError> {
    ctx.bind_to_thread()?;
    let handle = CudaBackend::stream_handle(stream);
    // SAFETY: `dst` is a live buffer of at least `data.len()` words on this context, `handle`
    // a live stream of it; `data` outlives the copy, which completes before this returns.
    unsafe {
        result::memcpy_htod_async(dst, data, handle)?;
        result::stream::synchronize(handle)
    }
}

/// Copies `words` words from device address `src` on `stream`, waiting for them.
fn download(
    ctx: &CudaContext,
    src: u64,
    words: usize,
    stream: StreamId,
) -> Result<Vec<u32>, DriverError> {
    ctx.bind_to_thread()?;
    let handle = CudaBackend::stream_handle(stream);
    let mut out = vec![0u32; words];
    // SAFETY: `src` is a live buffer of at least `words` words; `out` outlives the copy, which
    // completes before this returns.
    unsafe {
        result::memcpy_dtoh_async(&mut out, src, handle)?;
        result::stream::synchronize(handle)?;
    }
    Ok(out)
}

/// Queues a fill of `words` words at `dst` with `value` on `stream` (`cuMemsetD32Async`).
fn fill(
    ctx: &CudaContext,
    dst: u64,
    value: u32,
    words: usize,
    stream: StreamId,
) -> Result<(), DriverError> {
    ctx.bind_to_thread()?;
    // SAFETY: `dst` is a live buffer of at least `words` words that stays allocated (held by
    // the pool) until the fill has run.
    unsafe { sys::cuMemsetD32Async(dst, value, words, CudaBackend::stream_handle(stream)) }.result()
}

/// Queues a device-to-device copy of `bytes` bytes on `stream`.
fn copy(
    ctx: &CudaContext,
    dst: u64,
    src: u64,
    bytes: usize,
    stream: StreamId,
) -> Result<(), DriverError> {
    ctx.bind_to_thread()?;
    // SAFETY: both are live buffers of at least `bytes` bytes, held until the copy has run.
    unsafe { result::memcpy_dtod_async(dst, src, bytes, CudaBackend::stream_handle(stream)) }
}

fn synchronize(ctx: &CudaContext, stream: StreamId) -> Result<(), DriverError> {
    ctx.bind_to_thread()?;
    // SAFETY: the default stream or a live stream of this context.
    unsafe { result::stream::synchronize(CudaBackend::stream_handle(stream)) }
}

/// Whether `stream` still has queued work (`cuStreamQuery` says not ready).
fn busy(ctx: &CudaContext, stream: StreamId) -> Result<bool, DriverError> {
    ctx.bind_to_thread()?;
    // SAFETY: a live stream of this context.
    match unsafe { sys::cuStreamQuery(CudaBackend::stream_handle(stream)) }.result() {
        Ok(()) => Ok(false),
        Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) => Ok(true),
        Err(error) => Err(error),
    }
}

/// The device a device address belongs to (`CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL`).
fn device_of(ctx: &CudaContext, address: u64) -> Result<i32, DriverError> {
    ctx.bind_to_thread()?;
    let mut ordinal: std::ffi::c_int = -1;
    // SAFETY: the attribute is an `int`, written into `ordinal`, which outlives the call.
    unsafe {
        sys::cuPointerGetAttribute(
            (&mut ordinal as *mut std::ffi::c_int).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            address,
        )
    }
    .result()?;
    Ok(ordinal)
}

/// Checks that every sampled word of a buffer of `words` words is `expected`: 64 KiB at 16
/// evenly spaced places and the last 64 KiB.
fn expect_everywhere(
    ctx: &CudaContext,
    address: u64,
    words: usize,
    expected: u32,
    stream: StreamId,
) -> TestResult {
    const SAMPLE_WORDS: usize = 16 << 10;
    let mut starts: Vec<usize> = (0..16).map(|part| part * (words / 16)).collect();
    starts.push(words.saturating_sub(SAMPLE_WORDS));
    for start in starts {
        let count = SAMPLE_WORDS.min(words - start);
        let got = download(ctx, address + 4 * start as u64, count, stream)?;
        if let Some(offset) = got.iter().position(|&word| word != expected) {
            return Err(format!(
                "word {} of the buffer at {address:#x} is {:#010x}, expected {expected:#010x}",
                start + offset,
                got[offset]
            )
            .into());
        }
    }
    Ok(())
}

/// A kernel that waits until the host writes a non-zero word to a pinned, mapped flag, or until
/// 60 s have passed (so a failing test cannot wedge the GPU). Hand-written PTX, loaded through
/// the driver's JIT: no nvrtc or toolkit needed.
const GATE_PTX: &str = r"
.version 7.0
.target sm_52
.address_size 64

.visible .entry gpupool_gate(
    .param .u64 gpupool_gate_flag,
    .param .u64 gpupool_gate_timeout_ns
)
{
    .reg .pred %p<3>;
    .reg .b32 %r<2>;
    .reg .b64 %rd<7>;

    ld.param.u64 %rd1, [gpupool_gate_flag];
    ld.param.u64 %rd2, [gpupool_gate_timeout_ns];
    cvta.to.global.u64 %rd3, %rd1;
    mov.u64 %rd4, %globaltimer;
$L__wait:
    ld.volatile.global.u32 %r1, [%rd3];
    setp.ne.s32 %p1, %r1, 0;
    @%p1 bra $L__done;
    mov.u64 %rd5, %globaltimer;
    sub.s64 %rd6, %rd5, %rd4;
    setp.lt.u64 %p2, %rd6, %rd2;
    @%p2 bra $L__wait;
$L__done:
    ret;
}
";

/// Holds a stream busy until [`Gate::open`]: [`Gate::close`] queues the waiting kernel.
struct Gate {
    ctx: Arc<CudaContext>,
    module: sys::CUmodule,
    function: sys::CUfunction,
    flag: *mut u32,
    flag_device: u64,
}

impl Gate {
    fn new(ctx: &Arc<CudaContext>) -> Result<Gate, DriverError> {
        ctx.bind_to_thread()?;
        let ptx = CString::new(GATE_PTX).expect("the PTX has no NUL byte");
        // SAFETY: a NUL-terminated PTX text, which `cuModuleLoadData` accepts; the context is
        // current.
        let module = unsafe { result::module::load_data(ptx.as_ptr().cast()) }?;
        let name = CString::new("gpupool_gate").expect("no NUL byte");
        // SAFETY: `module` was just loaded.
        let function = unsafe { result::module::get_function(module, name) }?;
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        // SAFETY: the context is current; valid flags.
        let flag = unsafe { result::malloc_host(4, flags) }?.cast::<u32>();
        // SAFETY: `flag` points to 4 writable, suitably aligned bytes just allocated.
        unsafe { flag.write_volatile(0) };
        let mut flag_device = 0;
        // SAFETY: `flag` was allocated with DEVICEMAP in the current context; flags must be 0.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut flag_device, flag.cast(), 0) }.result()?;
        Ok(Gate {
            ctx: ctx.clone(),
            module,
            function,
            flag,
            flag_device,
        })
    }

    /// Queues the waiting kernel on `stream`: work queued after it waits for `open`.
    fn close(&self, stream: StreamId) -> Result<(), DriverError> {
        self.hold(stream, 60_000_000_000)
    }

    /// A way to open the gate from another thread.
    fn opener(&self) -> GateOpener {
        GateOpener(self.flag as usize)
    }

    /// Queues the waiting kernel on `stream` for at most `timeout_ns` (or until `open`).
    fn hold(&self, stream: StreamId, timeout_ns: u64) -> Result<(), DriverError> {
        self.ctx.bind_to_thread()?;
        let mut flag = self.flag_device;
        let mut timeout_ns: u64 = timeout_ns;
        let mut params = [
            (&mut flag as *mut u64).cast::<c_void>(),
            (&mut timeout_ns as *mut u64).cast::<c_void>(),
        ];
        // SAFETY: `function` takes two `.u64` parameters, which `params` points to (the driver
        // copies them during the call); the flag it polls stays allocated until `Drop`, which
        // first waits for the kernel.
        unsafe {
            result::launch_kernel(
                self.function,
                (1, 1, 1),
                (1, 1, 1),
                0,
                CudaBackend::stream_handle(stream),
                &mut params,
            )
        }
    }

    /// Lets the waiting kernel finish.
    fn open(&self) {
        // SAFETY: `flag` is live pinned memory until `Drop`.
        unsafe { self.flag.write_volatile(1) };
        fence(Ordering::SeqCst);
    }
}

// SAFETY: the driver API is thread-safe: the module and function handles may be used to
// launch from any thread bound to the same context (`hold` binds it), and the flag is only
// written with volatile stores, which any thread may make.
unsafe impl Sync for Gate {}

/// Opens a [`Gate`] from another thread; valid while the gate lives (the tests join the thread
/// that holds it before dropping the gate).
struct GateOpener(usize);

impl GateOpener {
    fn open(&self) {
        // SAFETY: the flag is live pinned memory while the gate lives, which the callers
        // guarantee; a volatile word write is what `Gate::open` does too.
        unsafe { (self.0 as *mut u32).write_volatile(1) };
        fence(Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open();
        if self.ctx.bind_to_thread().is_ok() {
            let _ = result::ctx::synchronize();
            // SAFETY: the kernel has finished (synchronised above), so neither the module nor
            // the flag is in use; each is released once.
            unsafe {
                let _ = result::module::unload(self.module);
                let _ = result::free_host(self.flag.cast());
            }
        }
    }
}

#[test]
fn device_buffers_carry_data_and_are_reused() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    let name = backend.device_name();
    assert_eq!(
        backend.kinds()[0],
        MemoryKind::Device,
        "Device is the default kind"
    );
    let stream = backend.create_stream()?;
    let manager =
        MemoryManager::with_config(backend, config().large_threshold_bytes(None).build()?)?;
    // 4 MiB and 12 bytes: served by the 8 MiB class (the large arena is off here; its own
    // tests cover it).
    const WORDS: usize = (1 << 20) + 3;
    let pattern: Vec<u32> = (0..WORDS as u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();

    let first = manager.allocate_with::<u32>(WORDS, on(stream))?;
    assert_eq!(first.kind(), MemoryKind::Device);
    assert_eq!(first.block_bytes(), 8 * MIB);
    assert!(first.host_ptr().is_none());
    assert!(matches!(
        first.as_slice(),
        Err(PoolError::NotHostVisible { .. })
    ));
    upload(&ctx, first.device_address(), &pattern, stream)?;
    assert_eq!(
        download(&ctx, first.device_address(), WORDS, stream)?,
        pattern
    );
    assert_eq!(device_of(&ctx, first.device_address())?, 0);
    let address = first.device_address();
    drop(first);

    let second = manager.allocate_with::<u32>(WORDS, on(stream))?;
    assert_eq!(
        second.device_address(),
        address,
        "the cached block is reused"
    );
    let stats = manager.stats();
    assert_eq!(stats.backend, "cuda");
    assert_eq!(stats.totals.hits, 1);
    assert_eq!(stats.totals.misses, 1);
    assert_eq!(stats.totals.backend_allocations, 1);
    let device = &stats.devices[0];
    assert_eq!(device.device_name, name);
    let capacity = device
        .capacity_bytes
        .expect("cuMemGetInfo reports the capacity");
    let free = device
        .device_free_bytes
        .expect("cuMemGetInfo reports free memory");
    assert!(
        capacity > 0 && free <= capacity,
        "free {free} of {capacity}"
    );

    let inverse: Vec<u32> = pattern.iter().map(|word| !word).collect();
    upload(&ctx, second.device_address(), &inverse, stream)?;
    assert_eq!(
        download(&ctx, second.device_address(), WORDS, stream)?,
        inverse
    );
    drop(second);
    drop(manager);
    drop(turn);
    Ok(())
}

#[test]
fn mapped_host_buffers_are_shared_by_host_and_device() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    let stream = backend.create_stream()?;
    let manager = MemoryManager::with_config(backend, config().build()?)?;
    const WORDS: usize = 64 << 10;
    let bytes = WORDS * 4;
    for kind in [
        MemoryKind::HostVisible,
        MemoryKind::HostVisibleWriteCombined,
    ] {
        let mut host = manager.allocate_with::<u32>(WORDS, on_kind(stream, kind))?;
        assert_eq!(host.kind(), kind);
        let host_ptr = host.host_ptr().expect("mapped memory has a host pointer");
        assert_eq!(host_ptr as usize % gpupool::BLOCK_ALIGN, 0);
        assert!(
            host.as_slice()?.iter().all(|&word| word == 0),
            "{kind:?}: fresh pinned memory is zeroed"
        );

        // The host writes; the device reads through the block's device address.
        let pattern: Vec<u32> = (0..WORDS as u32).map(|i| i ^ 0x5A5A_0000).collect();
        host.as_mut_slice()?.copy_from_slice(&pattern);
        // Drains write-combining buffers before the device reads (a no-op for cached memory).
        fence(Ordering::SeqCst);
        let device = manager.allocate_with::<u32>(WORDS, on(stream))?;
        copy(
            &ctx,
            device.device_address(),
            host.device_address(),
            bytes,
            stream,
        )?;
        synchronize(&ctx, stream)?;
        assert_eq!(
            download(&ctx, device.device_address(), WORDS, stream)?,
            pattern
        );
        assert_eq!(
            download(&ctx, host.device_address(), WORDS, stream)?,
            pattern
        );

        // The device writes; the host reads through its slice.
        fill(&ctx, host.device_address(), 0xDEAD_BEEF, WORDS, stream)?;
        synchronize(&ctx, stream)?;
        assert!(
            host.as_slice()?.iter().all(|&word| word == 0xDEAD_BEEF),
            "{kind:?}: the device's writes are visible to the host"
        );
    }
    drop(manager);
    drop(turn);
    Ok(())
}

#[test]
fn a_block_dropped_with_queued_work_goes_to_no_other_stream_until_that_work_is_done() -> TestResult
{
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    let a = backend.create_stream()?;
    let b = backend.create_stream()?;
    let manager =
        MemoryManager::with_config(backend, config().large_threshold_bytes(None).build()?)?;
    const BYTES: usize = 256 * MIB;
    const WORDS: usize = BYTES / 4;
    const X_VALUE: u32 = 0xAAAA_AAAA;
    const NEW_VALUE: u32 = 0x5555_5555;
    let gate = Gate::new(&ctx)?;

    // Stream A: the gate, then 50 fills of X. Drop X while all of that is queued.
    let x = manager.allocate_with::<u32>(WORDS, on(a))?;
    let x_address = x.device_address();
    gate.close(a)?;
    for _ in 0..50 {
        fill(&ctx, x_address, X_VALUE, WORDS, a)?;
    }
    drop(x);
    assert!(
        busy(&ctx, a)?,
        "stream A holds queued work (the gate is closed)"
    );

    // Stream B: 20 buffers of X's size, kept, each filled on B.
    let mut fresh = Vec::new();
    for index in 0..20 {
        let buffer = manager.allocate_with::<u32>(WORDS, on(b))?;
        assert_ne!(
            buffer.device_address(),
            x_address,
            "request {index} on stream B got X while stream A's work on X was queued"
        );
        fill(&ctx, buffer.device_address(), NEW_VALUE, WORDS, b)?;
        fresh.push(buffer);
    }
    synchronize(&ctx, b)?;
    assert!(
        busy(&ctx, a)?,
        "B finished without waiting for A, and A is still held"
    );
    let class = manager.stats();
    let class = class
        .class(BYTES as u64, MemoryKind::Device)
        .expect("the 256 MiB class saw requests");
    assert_eq!((class.hits, class.misses), (0, 21));

    // Stream A itself may reuse X at once: its work runs in order.
    let again = manager.allocate_with::<u32>(WORDS, on(a))?;
    assert_eq!(
        again.device_address(),
        x_address,
        "same-stream reuse is immediate"
    );
    assert_eq!(manager.stats().totals.hits, 1);

    // Let A run; no new owner's memory changed, and A's reuse of X sees A's fills in order.
    gate.open();
    synchronize(&ctx, a)?;
    for buffer in &fresh {
        expect_everywhere(&ctx, buffer.device_address(), WORDS, NEW_VALUE, b)?;
    }
    expect_everywhere(&ctx, again.device_address(), WORDS, X_VALUE, a)?;

    // Once a fence recorded on A after the drop has completed, B may reuse X too.
    drop(again);
    let probe = manager.allocate_with::<u32>(WORDS, on(b))?; // a miss: records the fence on A
    assert_ne!(probe.device_address(), x_address);
    synchronize(&ctx, a)?; // the fence is complete
    let reused = manager.allocate_with::<u32>(WORDS, on(b))?;
    assert_eq!(
        reused.device_address(),
        x_address,
        "cross-stream reuse after the fence"
    );
    assert_eq!(manager.stats().totals.hits, 2);

    drop((fresh, probe, reused));
    drop(manager);
    drop(gate);
    drop(turn);
    Ok(())
}

#[test]
fn a_large_arena_block_with_queued_work_goes_to_no_other_stream() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    let a = backend.create_stream()?;
    let b = backend.create_stream()?;
    // The default configuration: 256 MiB requests are split out of the large arena.
    let manager = MemoryManager::with_config(backend, config().build()?)?;
    const BYTES: usize = 256 * MIB;
    const WORDS: usize = BYTES / 4;
    const X_VALUE: u32 = 0xAAAA_AAAA;
    const NEW_VALUE: u32 = 0x5555_5555;
    let gate = Gate::new(&ctx)?;

    let x = manager.allocate_with::<u32>(WORDS, on(a))?;
    assert!(x.is_large());
    let x_start = x.device_address();
    let x_end = x_start + BYTES as u64;
    gate.close(a)?;
    for _ in 0..50 {
        fill(&ctx, x_start, X_VALUE, WORDS, a)?;
    }
    drop(x);
    assert!(busy(&ctx, a)?, "stream A holds queued work");

    let mut fresh = Vec::new();
    for index in 0..20 {
        let buffer = manager.allocate_with::<u32>(WORDS, on(b))?;
        let start = buffer.device_address();
        assert!(
            start + BYTES as u64 <= x_start || start >= x_end,
            "request {index} on stream B overlaps X while A's work on X is queued"
        );
        fill(&ctx, start, NEW_VALUE, WORDS, b)?;
        fresh.push(buffer);
    }
    synchronize(&ctx, b)?;
    assert!(busy(&ctx, a)?, "A is still held by the gate");

    // Stream A reuses X's space at once: its work runs in order.
    let again = manager.allocate_with::<u32>(WORDS, on(a))?;
    assert_eq!(
        again.device_address(),
        x_start,
        "same-stream reuse is immediate"
    );

    gate.open();
    synchronize(&ctx, a)?;
    for buffer in &fresh {
        expect_everywhere(&ctx, buffer.device_address(), WORDS, NEW_VALUE, b)?;
    }
    expect_everywhere(&ctx, again.device_address(), WORDS, X_VALUE, a)?;
    drop((fresh, again));
    drop(manager);
    drop(gate);
    drop(turn);
    Ok(())
}

#[test]
fn out_of_memory_releases_idle_blocks_and_retries() -> TestResult {
    let Some(Gpu {
        backend,
        ctx: _,
        turn,
    }) = cuda_or_skip()
    else {
        return Ok(());
    };
    let total = backend.memory_info().expect("memory info").total_bytes;
    // Classes in quarter steps, so 192 MiB is a class of its own; no cap that matters; every
    // request in the classes (the large arena has its own test below).
    let config = config()
        .steps_per_doubling(4)
        .max_idle_per_class(4096)
        .large_threshold_bytes(None)
        .build()?;
    let manager = MemoryManager::with_config(backend, config)?;
    const BIG: usize = 256 * MIB;
    const SMALL: usize = 16 * MIB;

    // Fill the device with 256 MiB buffers, then the rest with 16 MiB ones.
    let limit = (total as usize / BIG) + 8;
    let mut held = Vec::new();
    for size in [BIG, SMALL] {
        let mut full = false;
        for _ in 0..limit {
            match manager.allocate_bytes(size) {
                Ok(buffer) => held.push(buffer),
                Err(PoolError::OutOfMemory {
                    requested_bytes,
                    device_free_bytes,
                    ..
                }) => {
                    assert_eq!(requested_bytes, size as u64);
                    assert!(device_free_bytes.is_some(), "the error says what is free");
                    full = true;
                    break;
                }
                Err(other) => return Err(other.into()),
            }
        }
        assert!(
            full,
            "{limit} buffers of {size} bytes never filled {total} bytes"
        );
    }
    let reserved: u64 = held.iter().map(|buffer| buffer.block_bytes() as u64).sum();
    eprintln!(
        "cuda: filled the device with {} buffers, {reserved} of {total} bytes",
        held.len()
    );
    drop(held);
    let stats = manager.stats();
    assert_eq!(
        stats.totals.cached_bytes, reserved,
        "every dropped buffer is cached"
    );
    assert_eq!(stats.totals.backend_releases, 0);

    // A new class finds the device full: the pool releases idle blocks and retries.
    let middle = manager.allocate_bytes(192 * MIB)?;
    assert_eq!(middle.block_bytes(), 192 * MIB);
    let after = manager.stats();
    assert!(
        after.totals.backend_releases > 0,
        "idle blocks were released"
    );
    assert!(after.totals.cached_bytes < reserved);
    assert_eq!(after.totals.in_use_bytes, 192 * MIB as u64);
    drop(middle);

    // Never fits: an error with the numbers, not a panic.
    let huge = total + (1 << 30);
    match manager.allocate_bytes(huge as usize) {
        Err(PoolError::TooLarge {
            requested_bytes,
            limit_bytes,
        }) => {
            assert!(requested_bytes >= huge);
            assert_eq!(limit_bytes, total);
        }
        Err(PoolError::OutOfMemory {
            requested_bytes, ..
        }) => assert!(requested_bytes >= huge),
        other => panic!("a request above the device's memory must fail, got {other:?}"),
    }
    drop(manager);
    drop(turn);
    Ok(())
}

#[test]
fn the_large_arena_gives_free_segments_back_when_the_device_is_full() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    let total = backend.memory_info().expect("memory info").total_bytes as usize;
    // The segment arena (virtual memory off): freed segments never merge, so 300 MiB fits
    // only once some go back to the driver.
    let manager =
        MemoryManager::with_config(backend, config().virtual_memory_pages(None).build()?)?;
    const BIG: usize = 256 * MIB;
    let mut held = Vec::new();
    for _ in 0..(total / BIG + 8) {
        match manager.allocate_bytes(BIG) {
            Ok(buffer) => {
                assert!(buffer.is_large());
                held.push(buffer);
            }
            Err(PoolError::OutOfMemory { .. }) => break,
            Err(other) => return Err(other.into()),
        }
    }
    assert!(
        held.len() > 8,
        "only {} buffers of 256 MiB fitted",
        held.len()
    );
    let count = held.len();
    drop(held);
    let stats = manager.stats();
    assert_eq!(stats.devices[0].large.free_bytes, (count * BIG) as u64);
    // 300 MiB fits no free block: the free segments go back to the driver, then it fits.
    let bigger = manager.allocate_bytes(300 * MIB)?;
    assert!(manager.stats().devices[0].large.backend_releases > 0);
    // The data path through a block of the arena, at its far end.
    let pattern: Vec<u32> = (0..4096u32)
        .map(|index| index.wrapping_mul(2654435761))
        .collect();
    let end = bigger.device_address() + (300 * MIB - 4096 * 4) as u64;
    upload(&ctx, end, &pattern, StreamId::DEFAULT)?;
    assert_eq!(download(&ctx, end, 4096, StreamId::DEFAULT)?, pattern);
    drop(bigger);
    drop(manager);
    drop(turn);
    Ok(())
}

#[test]
fn the_multi_device_path_serves_device_zero_and_refuses_others() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    let name = backend.device_name();
    let manager = MemoryManager::with_devices(vec![Arc::new(backend)], config().build()?)?;
    assert_eq!(manager.device_count(), 1);
    let options = AllocOptions {
        device: 0,
        ..AllocOptions::default()
    };
    let buffer = manager.allocate_with::<f32>(1000, options)?;
    assert_eq!(buffer.device(), 0);
    assert_eq!(device_of(&ctx, buffer.device_address())?, 0);
    let stats = manager.stats();
    assert_eq!(stats.devices.len(), 1);
    let device = &stats.devices[0];
    assert_eq!(device.device, 0);
    assert_eq!(device.device_name, name);
    assert_eq!((device.totals.requests, device.totals.misses), (1, 1));
    assert_eq!(device.totals.in_use_bytes, buffer.block_bytes() as u64);
    match manager.allocate_with::<f32>(
        1000,
        AllocOptions {
            device: 1,
            ..options
        },
    ) {
        Err(PoolError::NoSuchDevice { device, devices }) => assert_eq!((device, devices), (1, 1)),
        other => panic!("device 1 is not served, got {other:?}"),
    }
    drop((buffer, manager));

    if CudaBackend::device_count() < 2 {
        eprintln!("cuda: one device only; the two-device part of this test did not run");
    } else {
        let backends: Vec<Arc<dyn Backend>> = vec![
            Arc::new(CudaBackend::new(0)?),
            Arc::new(CudaBackend::new(1)?),
        ];
        let manager = MemoryManager::with_devices(backends, config().build()?)?;
        for device in 0..2 {
            let options = AllocOptions {
                device,
                ..AllocOptions::default()
            };
            let buffer = manager.allocate_with::<u8>(MIB, options)?;
            assert_eq!(device_of(&ctx, buffer.device_address())?, device as i32);
        }
        assert_eq!(manager.stats().devices.len(), 2);
    }
    drop(turn);
    Ok(())
}

#[test]
fn zero_on_reuse_clears_device_and_host_blocks_in_stream_order() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    let stream = backend.create_stream()?;
    let manager = MemoryManager::with_config(backend, config().zero_on_reuse(true).build()?)?;
    const WORDS: usize = 1 << 20;

    let first = manager.allocate_with::<u32>(WORDS, on(stream))?;
    let address = first.device_address();
    upload(&ctx, address, &vec![0x1234_5678; WORDS], stream)?;
    drop(first);
    let second = manager.allocate_with::<u32>(WORDS, on(stream))?;
    assert_eq!(
        second.device_address(),
        address,
        "a reuse, so it was zeroed"
    );
    synchronize(&ctx, stream)?;
    assert!(download(&ctx, address, WORDS, stream)?
        .iter()
        .all(|&word| word == 0));

    let mut host = manager.allocate_with::<u32>(WORDS, on_kind(stream, MemoryKind::HostVisible))?;
    host.as_mut_slice()?.fill(0xFFFF_FFFF);
    let host_address = host.device_address();
    drop(host);
    let host = manager.allocate_with::<u32>(WORDS, on_kind(stream, MemoryKind::HostVisible))?;
    assert_eq!(host.device_address(), host_address);
    synchronize(&ctx, stream)?;
    assert!(host.as_slice()?.iter().all(|&word| word == 0));
    assert_eq!(manager.stats().totals.hits, 2);
    drop((second, host, manager));
    drop(turn);
    Ok(())
}

#[test]
fn the_backend_allocates_each_kind_and_fences_follow_stream_work() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    assert_eq!(backend.name(), "cuda");
    assert!(!backend.device_name().is_empty());
    assert!(CudaBackend::device_count() >= 1);
    let info = backend.memory_info().expect("memory info");
    assert!(info.total_bytes > 0 && info.free_bytes <= info.total_bytes);
    assert_eq!(
        backend.kinds(),
        [
            MemoryKind::Device,
            MemoryKind::HostVisible,
            MemoryKind::HostVisibleWriteCombined
        ]
    );
    for &kind in backend.kinds() {
        let block = driver(backend.allocate(MIB, kind))?;
        assert_eq!((block.bytes(), block.kind()), (MIB, kind));
        if let Some(host) = block.host_ptr() {
            assert_eq!(host.as_ptr() as usize % gpupool::BLOCK_ALIGN, 0);
        }
        driver(
            backend
                .zeroing()
                .expect("CUDA zeroes")
                .zero(&block, StreamId::DEFAULT),
        )?;
        driver(
            backend
                .stream_ordered()
                .expect("CUDA streams")
                .synchronize(),
        )?;
        backend.release(block);
    }
    assert!(backend.allocate(MIB, MemoryKind::Managed).is_err());
    assert!(
        backend.record_fence(StreamId(0xdead_0000)).is_err(),
        "unknown streams are refused"
    );

    // A fence on a held stream is pending, from any thread (no context bound there), and
    // completes with the stream's work.
    let stream = backend.create_stream()?;
    let gate = Gate::new(&ctx)?;
    gate.close(stream)?;
    let fence = driver(backend.record_fence(stream))?;
    assert!(!fence.is_complete());
    let elsewhere = fence.clone();
    assert!(!std::thread::spawn(move || elsewhere.is_complete())
        .join()
        .unwrap());
    gate.open();
    synchronize(&ctx, stream)?;
    assert!(fence.is_complete());
    let elsewhere = fence.clone();
    assert!(std::thread::spawn(move || elsewhere.is_complete())
        .join()
        .unwrap());
    // The last reference drops on another thread, which destroys the event there.
    std::thread::spawn(move || drop(fence)).join().unwrap();
    let default_fence = driver(backend.record_fence(StreamId::DEFAULT))?;
    driver(StreamOrdered::synchronize(&backend))?;
    assert!(default_fence.is_complete());
    drop(gate);
    drop(backend);
    drop(turn);
    Ok(())
}

#[test]
fn pool_calls_give_the_thread_its_own_context_back_and_accept_lent_streams() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    // A stream made by cudarc and lent to the backend; declared first, so it outlives the
    // manager, as `register_stream` requires.
    let lent = ctx.new_stream()?;
    // SAFETY: a live stream of device 0's primary context that outlives the backend.
    let lent_id = unsafe { backend.register_stream(lent.cu_stream()) };
    assert_eq!(lent_id.0, lent.cu_stream() as usize as u64);
    let own = backend.create_stream()?;
    // Class blocks from `cuMemAlloc`, which belong to a context (carved blocks of the
    // virtual-memory arena belong to none: `cuMemCreate` memory is the device's).
    let config = config().carve_class_blocks(false).build()?;
    let manager = MemoryManager::with_config(backend, config)?;

    // The user works with another context on this thread; pool calls must not switch it.
    let other = CudaContext::new_non_primary(0, 0)?;
    other.bind_to_thread()?;
    let still_theirs =
        || -> Result<bool, DriverError> { Ok(result::ctx::get_current()? == Some(other.cu_ctx())) };
    let extra = CudaBackend::new(0)?;
    assert!(
        still_theirs()?,
        "opening a backend left the thread's context alone"
    );
    drop(extra);
    let buffer = manager.allocate_with::<u8>(MIB, on(lent_id))?; // a miss: cuMemAlloc
    assert!(still_theirs()?, "allocate left the thread's context alone");
    let mut owner: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: the attribute is a `CUcontext`, written into `owner`, which outlives the call.
    unsafe {
        sys::cuPointerGetAttribute(
            (&mut owner as *mut sys::CUcontext).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_CONTEXT,
            buffer.device_address(),
        )
    }
    .result()?;
    assert_eq!(
        owner,
        ctx.cu_ctx(),
        "the block belongs to the primary context"
    );

    // Cross-stream reuse through a fence recorded on the lent stream.
    let address = buffer.device_address();
    drop(buffer);
    let probe = manager.allocate_with::<u8>(MIB, on(own))?; // a miss: records the fence
    assert_ne!(probe.device_address(), address);
    // SAFETY: a live stream; synchronising it directly keeps the user's context current.
    unsafe { result::stream::synchronize(lent.cu_stream()) }?;
    let reused = manager.allocate_with::<u8>(MIB, on(own))?;
    assert_eq!(reused.device_address(), address);
    assert!(still_theirs()?, "fences left the thread's context alone");
    drop((probe, reused));
    manager.clear(); // synchronise and free
    assert!(still_theirs()?, "release left the thread's context alone");
    drop(manager);
    assert!(
        still_theirs()?,
        "dropping the backend left the thread's context alone"
    );
    drop(other);
    drop(lent);
    drop(turn);
    Ok(())
}

/// Issue 9: a host-visible block is handed out at once on its stream while the previous
/// owner's work and the zeroing may still be queued there; the new owner's `as_mut_slice`
/// wrote before them, and they overwrote its data. The first host access now waits.
#[test]
fn host_visible_access_waits_for_queued_work_and_zeroing_on_its_stream() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    let stream = backend.create_stream()?;
    let manager = MemoryManager::with_config(backend, config().zero_on_reuse(true).build()?)?;
    const WORDS: usize = 1 << 20;
    let gate = Gate::new(&ctx)?;
    let kind = on_kind(stream, MemoryKind::HostVisible);

    // The previous owner queues a fill of its buffer behind the closed gate, and drops it.
    let previous = manager.allocate_with::<u32>(WORDS, kind)?;
    let address = previous.device_address();
    gate.close(stream)?;
    fill(&ctx, address, 0xAAAA_AAAA, WORDS, stream)?;
    drop(previous);
    // The new owner on the same stream gets the block at once (stream order), with a zeroing
    // queued behind the fill.
    let mut next = manager.allocate_with::<u32>(WORDS, kind)?;
    assert_eq!(next.device_address(), address, "same-stream reuse");
    assert!(busy(&ctx, stream)?, "the fill and the zeroing are queued");
    // The gate opens a little later; the host access must wait for it, not write before.
    let opener = gate.opener();
    let opening = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        opener.open();
    });
    next.as_mut_slice()?.fill(7);
    opening.join().expect("the opener thread");
    synchronize(&ctx, stream)?;
    assert!(
        next.as_slice()?.iter().all(|&word| word == 7),
        "queued work overwrote what the host wrote after its access began"
    );
    drop((next, manager));
    drop(gate);
    drop(turn);
    Ok(())
}

/// Issue 9's B1 on the device: 16 threads on 4 streams allocate blocks, queue a kernel that
/// sleeps and then a fill that writes the block on their stream, record an event after it and
/// drop the block while that work is still queued. An owner on another stream checks, right
/// after it got a block, that the previous owner's event has completed. Misses fence foreign
/// blocks concurrently with the drops (small caps, many shards). Any incomplete event is a
/// block handed out while a kernel could still write it.
#[test]
fn b1_sixteen_threads_on_four_streams_never_get_a_block_whose_work_still_runs() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    const THREADS: usize = 16;
    const ROUNDS: usize = 600;
    let streams: Vec<StreamId> = (0..4)
        .map(|_| backend.create_stream())
        .collect::<Result<_, _>>()?;
    let manager = MemoryManager::with_config(
        backend,
        config()
            .shards(16)
            .max_idle_per_class(8)
            .max_idle_bytes_per_class(0)
            .min_idle_per_class(0)
            .build()?,
    )?;
    let gate = Gate::new(&ctx)?;
    // Per block address: the last owner's stream and the event recorded after its work.
    type LastUse = std::collections::HashMap<u64, (StreamId, usize)>;
    let last_use: Mutex<LastUse> = Mutex::new(LastUse::new());
    let violations = std::sync::atomic::AtomicUsize::new(0);
    let checks = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| -> TestResult {
        let mut workers = Vec::new();
        for thread in 0..THREADS {
            let (manager, ctx, gate, streams) = (&manager, &ctx, &gate, &streams);
            let (last_use, violations, checks) = (&last_use, &violations, &checks);
            workers.push(scope.spawn(move || -> Result<(), String> {
                ctx.bind_to_thread().map_err(|error| format!("{error:?}"))?;
                let mut random = 0x9E37_79B9_7F4A_7C15u64 ^ (thread as u64 + 1);
                let mut next = move || {
                    random ^= random << 13;
                    random ^= random >> 7;
                    random ^= random << 17;
                    random
                };
                let stream = streams[thread % streams.len()];
                let mut held = Vec::new();
                for _ in 0..ROUNDS {
                    let words = 64usize << (next() % 5); // 256 B to 4 KiB
                    let buffer = manager
                        .allocate_with::<u32>(words, on(stream))
                        .map_err(|error| error.to_string())?;
                    let address = buffer.device_address();
                    let previous = last_use.lock().unwrap().get(&address).copied();
                    if let Some((owner, event)) = previous {
                        if owner != stream {
                            checks.fetch_add(1, Ordering::Relaxed);
                            let event = event as sys::CUevent;
                            // SAFETY: the event lives until the end of the test (never destroyed
                            // before every worker has finished).
                            let done = unsafe { sys::cuEventQuery(event) };
                            if done == sys::CUresult::CUDA_ERROR_NOT_READY {
                                violations.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    // A kernel that sleeps up to 50 µs, then a fill of this block, then an event.
                    gate.hold(stream, 5_000 + next() % 45_000)
                        .map_err(|error| format!("{error:?}"))?;
                    fill(ctx, address, thread as u32, words, stream)
                        .map_err(|error| format!("{error:?}"))?;
                    let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                        .map_err(|error| format!("{error:?}"))?;
                    // SAFETY: a fresh event and a live stream of this context.
                    unsafe { result::event::record(event, CudaBackend::stream_handle(stream)) }
                        .map_err(|error| format!("{error:?}"))?;
                    // The events are leaked on purpose: a few thousand, freed with the context.
                    last_use
                        .lock()
                        .unwrap()
                        .insert(address, (stream, event as usize));
                    held.push(buffer);
                    if held.len() > 3 || next() % 2 == 0 {
                        let victim = (next() as usize) % held.len();
                        drop(held.swap_remove(victim));
                    }
                }
                Ok(())
            }));
        }
        for worker in workers {
            worker.join().expect("a worker panicked")?;
        }
        Ok(())
    })?;
    synchronize(&ctx, StreamId::DEFAULT)?;
    let (checks, violations) = (checks.into_inner(), violations.into_inner());
    eprintln!("cuda b1 stress: {checks} cross-stream hand-outs checked, {violations} violations");
    assert!(
        checks > 0,
        "no block ever changed streams: the test proved nothing"
    );
    assert_eq!(
        violations, 0,
        "blocks went to another stream while their work still ran"
    );
    drop(manager);
    drop(gate);
    drop(turn);
    Ok(())
}

/// Issue 11: the virtual-memory arena on the device: blocks in one reserved range carry data,
/// freed neighbours merge, and after a trim with nothing live the device's free memory is back
/// within one page of where it started.
#[test]
fn the_virtual_memory_arena_carries_data_and_a_trim_gives_the_pages_back() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    let Some(page_bytes) = backend.virtual_memory().map(|memory| memory.granularity()) else {
        eprintln!("cuda: device 0 has no virtual memory management; segments serve instead");
        return Ok(());
    };
    let stream = backend.create_stream()?;
    let manager = MemoryManager::with_config(backend, config().build()?)?;
    let free_before = device_free(&ctx)?;
    let sizes = [3 * MIB, 30 * MIB, 100 * MIB + 512, 7 * MIB];
    let mut buffers = Vec::new();
    for (index, &bytes) in sizes.iter().enumerate() {
        let words = bytes / 4;
        let buffer = manager.allocate_with::<u32>(words, on(stream))?;
        assert!(buffer.is_large());
        fill(
            &ctx,
            buffer.device_address(),
            index as u32 + 1,
            words,
            stream,
        )?;
        buffers.push(buffer);
    }
    for (index, buffer) in buffers.iter().enumerate() {
        expect_everywhere(
            &ctx,
            buffer.device_address(),
            buffer.len(),
            index as u32 + 1,
            stream,
        )?;
    }
    let contiguous = buffers[1].device_address() == buffers[0].device_address() + 3 * MIB as u64;
    assert!(
        contiguous,
        "blocks are placed one after another in the range"
    );
    let first = buffers[0].device_address();
    buffers.truncate(3);
    buffers.remove(0);
    buffers.remove(0);
    // 3 MiB and 30 MiB are free neighbours now: 33 MiB fit where they were.
    let merged = manager.allocate_with::<u32>(33 * MIB / 4, on(stream))?;
    assert_eq!(merged.device_address(), first, "freed neighbours merged");
    drop((merged, buffers));
    synchronize(&ctx, stream)?;
    manager.trim(gpupool::TrimLevel::Aggressive);
    let free_after = device_free(&ctx)?;
    assert!(
        free_after + page_bytes as u64 >= free_before,
        "device free memory {free_after} is more than one page below {free_before}"
    );
    drop(manager);
    drop(turn);
    Ok(())
}

/// Free device memory (`cuMemGetInfo`).
fn device_free(ctx: &CudaContext) -> Result<u64, DriverError> {
    ctx.bind_to_thread()?;
    Ok(result::mem_get_info()?.0 as u64)
}

/// Issue 11: out of memory in the virtual-memory arena. The device is filled with 256 MiB
/// blocks, every other one is freed (holes no 300 MiB request fits), and a 300 MiB request then
/// needs new pages the device has no room for: the arena unmaps its free handles and retries,
/// and it fits. A request larger than the device gets the error with the numbers; the live
/// buffers keep their data.
#[test]
fn the_virtual_memory_arena_unmaps_free_handles_when_the_device_is_full() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    if backend.virtual_memory().is_none() {
        eprintln!("cuda: device 0 has no virtual memory management; segments serve instead");
        return Ok(());
    }
    let total = backend.memory_info().expect("memory info").total_bytes as usize;
    let manager = MemoryManager::with_config(backend, config().build()?)?;
    const BIG: usize = 256 * MIB;
    let mut held = Vec::new();
    for _ in 0..(total / BIG + 8) {
        match manager.allocate::<u32>(BIG / 4) {
            Ok(buffer) => held.push(buffer),
            Err(PoolError::OutOfMemory { .. }) => break,
            Err(other) => return Err(other.into()),
        }
    }
    assert!(
        held.len() > 8,
        "only {} blocks of 256 MiB fitted",
        held.len()
    );
    let mut kept = Vec::new();
    let last = held.len() - 1;
    for (index, buffer) in held.into_iter().enumerate() {
        // Every other block is freed; the last stays, so no free range borders fresh space.
        if index % 2 == 0 || index == last {
            fill(
                &ctx,
                buffer.device_address(),
                index as u32,
                BIG / 4,
                StreamId::DEFAULT,
            )?;
            kept.push((index as u32, buffer));
        }
    }
    synchronize(&ctx, StreamId::DEFAULT)?;
    let releases_before = manager.stats().devices[0].large.backend_releases;
    let bigger = manager.allocate::<u32>(300 * MIB / 4)?;
    assert!(
        manager.stats().devices[0].large.backend_releases > releases_before,
        "free handles were unmapped to make room"
    );
    let never = manager.allocate_bytes(total + BIG);
    assert!(
        matches!(never, Err(PoolError::TooLarge { .. })),
        "{never:?}"
    );
    for (value, buffer) in &kept {
        expect_everywhere(
            &ctx,
            buffer.device_address(),
            buffer.len(),
            *value,
            StreamId::DEFAULT,
        )?;
    }
    drop((bigger, kept));
    drop(manager);
    drop(turn);
    Ok(())
}

// ---- Issue 14: cudarc interop --------------------------------------------------------------

/// A cudarc stream's id for the raw helpers of this file (which take pool stream ids).
fn id_of(stream: &CudaStream) -> StreamId {
    StreamId(stream.cu_stream() as usize as u64)
}

/// Issue 14: a pooled buffer goes where cudarc wants device memory, on an adopted cudarc
/// stream: copies in and out, device-to-device between pooled buffers and a cudarc slice,
/// cudarc's memset, and the block is a hit for the next request.
#[test]
fn cudarc_copies_data_in_and_out_of_pooled_buffers_on_an_adopted_stream() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    let stream = ctx.new_stream()?;
    let id = backend.adopt_stream(&stream)?;
    assert_eq!(id, id_of(&stream));
    assert_eq!(
        backend.adopt_stream(&stream)?,
        id,
        "adopting again gives the same id"
    );
    let held = backend
        .cudarc_stream(id)
        .expect("an adopted stream is held");
    assert!(
        Arc::ptr_eq(&held, &stream),
        "the backend hands back the adopted Arc"
    );
    let manager = MemoryManager::with_config(backend, config().build()?)?;
    const WORDS: usize = 100_003;
    let pattern: Vec<u32> = (0..WORDS as u32)
        .map(|i| i.wrapping_mul(2_654_435_761))
        .collect();

    let mut a = manager.allocate_with::<u32>(WORDS, on(id))?;
    let mut b = manager.allocate_with::<u32>(WORDS, on(id))?;
    let address = a.device_address();
    {
        let view = a.cuda_view_mut()?;
        assert_eq!(DeviceSlice::len(&view), WORDS);
        assert!(Arc::ptr_eq(DeviceSlice::stream(&view), &stream));
        assert_eq!(view.device_address(), address);
        let (pointer, _guard) = view.device_ptr(&stream);
        assert_eq!(pointer, address, "cudarc gets the block's address");
    }
    stream.memcpy_htod(&pattern, &mut a.cuda_view_mut()?)?;
    let mut back = vec![0u32; WORDS];
    stream.memcpy_dtoh(&a.cuda_view()?, &mut back)?;
    stream.synchronize()?;
    assert_eq!(
        back, pattern,
        "memcpy_htod then memcpy_dtoh through pooled views"
    );
    // The raw path agrees: the view's address is the buffer's.
    assert_eq!(download(&ctx, a.device_address(), WORDS, id)?, pattern);

    stream.memcpy_dtod(&a.cuda_view()?, &mut b.cuda_view_mut()?)?;
    assert_eq!(
        stream.clone_dtoh(&b.cuda_view()?)?,
        pattern,
        "pooled to pooled"
    );
    let mut slice = stream.alloc_zeros::<u32>(WORDS)?;
    stream.memcpy_dtod(&b.cuda_view()?, &mut slice)?;
    assert_eq!(
        stream.clone_dtoh(&slice)?,
        pattern,
        "pooled to a cudarc slice"
    );
    stream.memset_zeros(&mut b.cuda_view_mut()?)?;
    stream.memcpy_dtod(&slice, &mut a.cuda_view_mut()?)?;
    assert!(stream
        .clone_dtoh(&b.cuda_view()?)?
        .iter()
        .all(|&word| word == 0));
    assert_eq!(
        stream.clone_dtoh(&a.cuda_view()?)?,
        pattern,
        "a cudarc slice to pooled"
    );
    ctx.check_err()?;

    let (a_address, b_address) = (a.device_address(), b.device_address());
    drop((a, b));
    let again = manager.allocate_with::<u32>(WORDS, on(id))?;
    assert!([a_address, b_address].contains(&again.device_address()));
    assert_eq!(manager.stats().totals.hits, 1);
    drop((again, slice, manager));
    drop(turn);
    Ok(())
}

/// Issue 14: a view lent to another stream than the buffer's orders the two on the device: the
/// other stream starts after the buffer's queued work, and the buffer's stream (so the pool's
/// reuse) goes on only after the other stream's work. Each direction is held open by a gate.
#[test]
fn a_view_on_another_stream_orders_both_streams_on_the_device() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    let pool_stream = backend.create_stream()?;
    let pool_cudarc = backend
        .cudarc_stream(pool_stream)
        .expect("a created stream");
    assert_eq!(id_of(&pool_cudarc), pool_stream);
    let other = ctx.new_stream()?;
    let other_id = id_of(&other);
    let manager = MemoryManager::with_config(backend, config().build()?)?;
    const WORDS: usize = 1 << 18;
    let gate = Gate::new(&ctx)?;

    // 1. The other stream waits for the buffer's stream: fill on the (gated) pool stream, then
    //    copy out on the other stream into a cudarc slice.
    let mut buffer = manager.allocate_with::<u32>(WORDS, on(pool_stream))?;
    gate.close(pool_stream)?;
    fill(
        &ctx,
        buffer.device_address(),
        0x1234_5678,
        WORDS,
        pool_stream,
    )?;
    let mut probe = other.alloc_zeros::<u32>(WORDS)?;
    other.synchronize()?;
    other.memcpy_dtod(&buffer.cuda_view_on(&other)?, &mut probe)?;
    assert!(
        busy(&ctx, other_id)?,
        "the other stream waits for the buffer's gated stream"
    );
    gate.open();
    other.synchronize()?;
    assert!(
        other
            .clone_dtoh(&probe)?
            .iter()
            .all(|&word| word == 0x1234_5678),
        "the copy ran after the fill"
    );
    synchronize(&ctx, pool_stream)?;

    // 2. The buffer's stream waits for the other stream: the other stream is gated and zeroes
    //    the buffer through a mutable view; the view is dropped, and the buffer's stream then
    //    fills the first half. Only if it waited for the zeroing does the fill survive it.
    let gate = Gate::new(&ctx)?;
    gate.close(other_id)?;
    other.memset_zeros(&mut buffer.cuda_view_mut_on(&other)?)?;
    fill(
        &ctx,
        buffer.device_address(),
        0x0BAD_F00D,
        WORDS / 2,
        pool_stream,
    )?;
    assert!(
        busy(&ctx, pool_stream)?,
        "the buffer's stream waits for the gated other stream"
    );
    gate.open();
    synchronize(&ctx, pool_stream)?;
    let words = download(&ctx, buffer.device_address(), WORDS, pool_stream)?;
    assert!(
        words[..WORDS / 2].iter().all(|&word| word == 0x0BAD_F00D),
        "the buffer's stream's fill ran after the other stream's zeroing"
    );
    assert!(
        words[WORDS / 2..].iter().all(|&word| word == 0),
        "the other stream's zeroing reached the buffer"
    );
    ctx.check_err()?;
    drop((buffer, probe, manager));
    drop(gate);
    drop(turn);
    Ok(())
}

/// Issue 14: a cudarc call on a third stream (neither the buffer's nor the view's) is ordered
/// after the view's stream, and the view's stream, so the buffer's, after it.
#[test]
fn a_cudarc_call_on_a_third_stream_is_ordered_with_the_view() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    let pool_stream = backend.create_stream()?;
    let third = ctx.new_stream()?;
    let manager = MemoryManager::with_config(backend, config().build()?)?;
    const WORDS: usize = 1 << 18;
    let source: Vec<u32> = (0..WORDS as u32).collect();
    let slice = third.clone_htod(&source)?;
    third.synchronize()?;
    let mut buffer = manager.allocate_with::<u32>(WORDS, on(pool_stream))?;
    let gate = Gate::new(&ctx)?;
    gate.close(id_of(&third))?;
    {
        let mut view = buffer.cuda_view_mut()?;
        third.memcpy_dtod(&slice, &mut view)?;
        // The view ends here: the buffer's stream waits for the copy on the gated third stream.
    }
    // Only if the buffer's stream waited for the copy does this fill survive it.
    fill(
        &ctx,
        buffer.device_address(),
        0x0BAD_F00D,
        WORDS / 2,
        pool_stream,
    )?;
    assert!(
        busy(&ctx, pool_stream)?,
        "the buffer's stream waits for the third stream's copy"
    );
    gate.open();
    synchronize(&ctx, pool_stream)?;
    let words = download(&ctx, buffer.device_address(), WORDS, pool_stream)?;
    assert!(
        words[..WORDS / 2].iter().all(|&word| word == 0x0BAD_F00D),
        "the buffer's stream's fill ran after the third stream's copy"
    );
    assert_eq!(
        words[WORDS / 2..],
        source[WORDS / 2..],
        "the third stream's copy reached the buffer"
    );
    ctx.check_err()?;
    drop((buffer, slice, manager));
    drop(gate);
    drop(turn);
    Ok(())
}

/// Issue 14: what is refused, on the device: host-visible buffers, raw registered streams for
/// `cuda_view` (but not for `cuda_view_on`), the per-thread stream, and streams of another
/// context (adopting, lending, and using a view on one, which panics).
#[test]
fn cudarc_interop_refuses_host_memory_raw_streams_and_other_contexts() -> TestResult {
    let Some(Gpu { backend, ctx, turn }) = cuda_or_skip() else {
        return Ok(());
    };
    let lent = ctx.new_stream()?;
    // SAFETY: a live stream of device 0's primary context that outlives the backend.
    let lent_id = unsafe { backend.register_stream(lent.cu_stream()) };
    assert!(
        backend.cudarc_stream(lent_id).is_none(),
        "no Arc for a raw handle"
    );
    assert_eq!(
        backend.adopt_stream(&ctx.default_stream())?,
        StreamId::DEFAULT
    );
    assert!(matches!(
        backend.adopt_stream(&ctx.per_thread_stream()),
        Err(PoolError::Backend { .. })
    ));
    let other_ctx = CudaContext::new_non_primary(0, 0)?;
    let foreign = other_ctx.new_stream()?;
    match backend.adopt_stream(&foreign) {
        Err(PoolError::Backend { message, .. }) => {
            assert!(message.contains("context"), "{message}")
        }
        other => panic!("a stream of another context was adopted: {other:?}"),
    }
    let manager = MemoryManager::with_config(backend, config().build()?)?;

    let mut pinned =
        manager.allocate_with::<u32>(1024, on_kind(StreamId::DEFAULT, MemoryKind::HostVisible))?;
    assert_eq!(
        pinned.cuda_view().err(),
        Some(PoolError::NotDeviceMemory {
            backend: "cuda".to_string(),
            kind: MemoryKind::HostVisible,
            wanted: "CUDA",
        })
    );
    assert!(pinned.cuda_view_mut().is_err());

    let raw = manager.allocate_with::<u32>(1024, on(lent_id))?;
    assert!(matches!(raw.cuda_view(), Err(PoolError::Backend { .. })));
    let host = vec![7u32; 1024];
    let mut raw = raw;
    lent.memcpy_htod(&host, &mut raw.cuda_view_mut_on(&lent)?)?;
    assert_eq!(lent.clone_dtoh(&raw.cuda_view_on(&lent)?)?, host);

    match raw.cuda_view_on(&ctx.per_thread_stream()) {
        Err(PoolError::Backend { message, .. }) => {
            assert!(message.contains("per-thread"), "{message}")
        }
        other => panic!("a view on the per-thread stream was made: {other:?}"),
    }
    match raw.cuda_view_on(&foreign) {
        Err(PoolError::Backend { message, .. }) => {
            assert!(message.contains("context"), "{message}")
        }
        other => panic!("a view on another context's stream was made: {other:?}"),
    }
    let mut view = raw.cuda_view_mut_on(&lent)?;
    let used_elsewhere = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        foreign.memcpy_htod(&host, &mut view)
    }));
    assert!(
        used_elsewhere.is_err(),
        "a view used on another context's stream panics"
    );
    drop(view);
    lent.synchronize()?;
    drop((pinned, raw, manager));
    drop(foreign);
    drop(other_ctx);
    drop(lent);
    drop(turn);
    Ok(())
}

/// Issue 14: the refusals that need no driver: buffers of other backends are not CUDA device
/// memory, whatever their kind.
#[test]
fn buffers_of_other_backends_are_not_cuda_device_memory() -> TestResult {
    let host = MemoryManager::new(gpupool::backend::host::HostBackend::new());
    let mut buffer = host.allocate::<f32>(1000)?;
    let expected = PoolError::NotDeviceMemory {
        backend: "host".to_string(),
        kind: buffer.kind(),
        wanted: "CUDA",
    };
    assert_eq!(buffer.cuda_view().err(), Some(expected.clone()));
    assert_eq!(buffer.cuda_view_mut().err(), Some(expected));
    assert!(host.backend::<CudaBackend>(0).is_none());

    let sim = MemoryManager::new(gpupool::backend::sim::SimBackend::new(
        gpupool::backend::sim::SimConfig::default(),
    ));
    let device = sim.allocate_with::<u32>(1000, AllocOptions::kind(MemoryKind::Device))?;
    assert_eq!(
        device.cuda_view().err(),
        Some(PoolError::NotDeviceMemory {
            backend: "sim".to_string(),
            kind: MemoryKind::Device,
            wanted: "CUDA",
        })
    );
    Ok(())
}
