//! Pooled buffers as cudarc device memory: copies in, a kernel on them, copies out (issue 14).
//!
//! The example gets a pool on device 0 through the CUDA backend, on a cudarc stream the backend
//! adopts, and allocates two `f32` inputs and an output from it. cudarc's `memcpy_htod` copies
//! the inputs into the pooled buffers through their views (`PooledBuffer::cuda_view_mut`, which
//! implements cudarc's `DevicePtrMut`). A vector-add kernel runs on the three pooled buffers; it
//! is hand-written PTX that the driver JIT-compiles, so neither NVRTC nor a toolkit is needed at
//! run time. `memcpy_dtoh` copies the sum out (`cuda_view`, cudarc's `DevicePtr`), and every
//! element is checked. Finally the buffers are dropped and the same sizes are allocated again:
//! the pool serves them from its cache, which the statistics printed at the end show as hits.
//!
//! ```text
//! cargo run --release -p gpupool --features cuda,cuda-12080 --example cudarc_kernel
//! ```
//!
//! Without a CUDA driver it prints `skipped: no CUDA driver` and exits 0. Any wrong element, a
//! second round that is not served from the cache, or a CUDA error exits 1.
//!
//! The kernel is launched with cudarc's raw `launch_kernel` on addresses from the views'
//! `DevicePtr::device_ptr`, whose guards are held across the launch. With cudarc's `nvrtc`
//! feature (which gpupool leaves to the application), `ctx.load_module(Ptx::from_src(PTX))` and
//! `stream.launch_builder(&function).arg(&a_view).arg(&b_view).arg(&mut out_view)` do the same:
//! the views implement cudarc's `PushKernelArg`.

use std::error::Error;
use std::ffi::{c_void, CString};
use std::process::ExitCode;
use std::sync::Arc;

use gpupool::backend::cuda::cudarc::driver::{result, sys, CudaContext, DevicePtr, DevicePtrMut};
use gpupool::backend::cuda::CudaBackend;
use gpupool::{AllocOptions, MemoryManager};

/// Elements per buffer: 800 KB of `f32`, below the large-arena threshold, so a size class
/// serves each buffer; not a multiple of the block size, so the bounds check in the kernel
/// matters.
const N: usize = 200_003;

/// `out[i] = a[i] + b[i]` for `i < n`. PTX ISA 7.0 for sm_52 and newer: the driver JIT-compiles
/// it for the GPU it runs on.
const PTX: &str = r"
.version 7.0
.target sm_52
.address_size 64

.visible .entry vector_add(
    .param .u64 vector_add_a,
    .param .u64 vector_add_b,
    .param .u64 vector_add_out,
    .param .u32 vector_add_n
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .f32 %f<4>;
    .reg .b64 %rd<11>;

    ld.param.u64 %rd1, [vector_add_a];
    ld.param.u64 %rd2, [vector_add_b];
    ld.param.u64 %rd3, [vector_add_out];
    ld.param.u32 %r1, [vector_add_n];
    mov.u32 %r2, %ctaid.x;
    mov.u32 %r3, %ntid.x;
    mov.u32 %r4, %tid.x;
    mad.lo.s32 %r5, %r2, %r3, %r4;
    setp.ge.u32 %p1, %r5, %r1;
    @%p1 bra $L__done;
    cvta.to.global.u64 %rd4, %rd1;
    cvta.to.global.u64 %rd5, %rd2;
    cvta.to.global.u64 %rd6, %rd3;
    mul.wide.u32 %rd7, %r5, 4;
    add.s64 %rd8, %rd4, %rd7;
    add.s64 %rd9, %rd5, %rd7;
    add.s64 %rd10, %rd6, %rd7;
    ld.global.f32 %f1, [%rd8];
    ld.global.f32 %f2, [%rd9];
    add.f32 %f3, %f1, %f2;
    st.global.f32 [%rd10], %f3;
$L__done:
    ret;
}
";

fn main() -> ExitCode {
    if !CudaBackend::driver_available() {
        println!("skipped: no CUDA driver");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("cudarc_kernel: FAILED: {error}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Box<dyn Error>> {
    let backend = CudaBackend::new(0)?;
    let ctx = backend.context().clone();
    // A cudarc stream, adopted by the pool: buffers allocated on it are ordered on it, and
    // their views lend them to it.
    let stream = ctx.new_stream()?;
    let options = AllocOptions {
        stream: backend.adopt_stream(&stream)?,
        ..AllocOptions::default()
    };
    println!(
        "cudarc_kernel: device 0 is {}; pool stream {:#x} is cudarc's stream",
        gpupool::Backend::device_name(&backend),
        options.stream.0
    );
    let manager = MemoryManager::new(backend);
    let module = Module::load(&ctx, PTX, "vector_add")?;

    let a_host: Vec<f32> = (0..N).map(|i| i as f32 * 0.5).collect();
    let b_host: Vec<f32> = (0..N).map(|i| (N - i) as f32 * 0.25 + 1.0).collect();
    let mut a = manager.allocate_with::<f32>(N, options)?;
    let mut b = manager.allocate_with::<f32>(N, options)?;
    let mut out = manager.allocate_with::<f32>(N, options)?;

    stream.memcpy_htod(&a_host, &mut a.cuda_view_mut()?)?;
    stream.memcpy_htod(&b_host, &mut b.cuda_view_mut()?)?;
    {
        let a_view = a.cuda_view()?;
        let b_view = b.cuda_view()?;
        let mut out_view = out.cuda_view_mut()?;
        // The guards stay alive until the launch is queued (cudarc's rule for raw addresses).
        let (mut a_address, _a_guard) = a_view.device_ptr(&stream);
        let (mut b_address, _b_guard) = b_view.device_ptr(&stream);
        let (mut out_address, _out_guard) = out_view.device_ptr_mut(&stream);
        let mut n = N as u32;
        let mut params = [
            (&mut a_address as *mut u64).cast::<c_void>(),
            (&mut b_address as *mut u64).cast::<c_void>(),
            (&mut out_address as *mut u64).cast::<c_void>(),
            (&mut n as *mut u32).cast::<c_void>(),
        ];
        ctx.bind_to_thread()?;
        // SAFETY: `vector_add` takes three `.u64` global addresses and a `.u32` count, which
        // `params` points to in that order (the driver copies them during the call). Each
        // address is a pooled buffer of `N` f32 elements on this device, borrowed by its view
        // until after the launch is queued on `stream`, the views' stream; the kernel reads and
        // writes only indices below `n = N`.
        unsafe {
            result::launch_kernel(
                module.function,
                ((N as u32).div_ceil(256), 1, 1),
                (256, 1, 1),
                0,
                stream.cu_stream(),
                &mut params,
            )
        }?;
    }
    let mut sum = vec![0.0f32; N];
    stream.memcpy_dtoh(&out.cuda_view()?, &mut sum)?;
    stream.synchronize()?;
    ctx.check_err()?;

    let wrong: Vec<usize> = (0..N)
        .filter(|&i| sum[i].to_bits() != (a_host[i] + b_host[i]).to_bits())
        .collect();
    if let Some(&first) = wrong.first() {
        return Err(format!(
            "{} of {N} elements are wrong; the first is out[{first}] = {}, expected {}",
            wrong.len(),
            sum[first],
            a_host[first] + b_host[first]
        )
        .into());
    }
    println!("cudarc_kernel: vector_add on 3 pooled buffers: all {N} elements correct");

    let before = manager.stats().totals;
    drop((a, b, out));
    let again: Vec<_> = (0..3)
        .map(|_| manager.allocate_with::<f32>(N, options))
        .collect::<Result<_, _>>()?;
    let totals = manager.stats().totals;
    println!(
        "cudarc_kernel: pool after the second round: requests {}, hits {}, misses {}, backend \
         allocations {}, hit rate {:.1}%, in use {} bytes, reserved {} bytes",
        totals.requests,
        totals.hits,
        totals.misses,
        totals.backend_allocations,
        100.0 * totals.hit_rate,
        totals.in_use_bytes,
        totals.reserved_bytes
    );
    if totals.hits != before.hits + 3 || totals.backend_allocations != before.backend_allocations {
        return Err(format!(
            "the second round was not served from the cache: hits {} -> {}, backend allocations \
             {} -> {}",
            before.hits, totals.hits, before.backend_allocations, totals.backend_allocations
        )
        .into());
    }
    drop(again);
    drop(module);
    Ok(())
}

/// A PTX module loaded through the driver's JIT, and one of its kernels; unloaded on drop.
struct Module {
    ctx: Arc<CudaContext>,
    module: sys::CUmodule,
    function: sys::CUfunction,
}

impl Module {
    fn load(ctx: &Arc<CudaContext>, ptx: &str, kernel: &str) -> Result<Module, Box<dyn Error>> {
        ctx.bind_to_thread()?;
        let text = CString::new(ptx)?;
        // SAFETY: a NUL-terminated PTX text, which `cuModuleLoadData` accepts; the context is
        // current.
        let module = unsafe { result::module::load_data(text.as_ptr().cast()) }?;
        // SAFETY: `module` was just loaded.
        match unsafe { result::module::get_function(module, CString::new(kernel)?) } {
            Ok(function) => Ok(Module {
                ctx: ctx.clone(),
                module,
                function,
            }),
            Err(error) => {
                // SAFETY: loaded above, unloaded once, and no kernel of it ever ran.
                let _ = unsafe { result::module::unload(module) };
                Err(error.into())
            }
        }
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // On an error path a kernel may still be queued: let it finish first.
            let _ = result::ctx::synchronize();
            // SAFETY: the module is unloaded once, here, after every kernel of it finished.
            let _ = unsafe { result::module::unload(self.module) };
        }
    }
}
