//! The CUDA backend through the C functions, as PyTorch drives it: device memory on the default
//! stream and on a stream made outside the pool, record_stream, frees, statistics. Prints
//! `skipped: no CUDA driver` where there is none. Built with the `cuda` feature (the default).
#![cfg(feature = "cuda")]

mod support;

use std::ffi::c_void;

use gpupool::backend::cuda::CudaBackend;
use gpupool_ffi::*;
use support::*;

#[test]
fn device_memory_on_foreign_streams() {
    if !CudaBackend::driver_available() {
        println!("skipped: no CUDA driver");
        return;
    }
    init("cuda");
    // A stream made outside the pool, as PyTorch's are; its backend (and so the stream) is
    // kept alive for the rest of the process.
    let owner = Box::leak(Box::new(CudaBackend::new(0).expect("device 0 opens")));
    let stream = owner.create_stream().expect("a stream").0 as usize as *mut c_void;

    let on_default = alloc(1 << 20, 0);
    assert!(!on_default.is_null(), "{}", last_error());
    // SAFETY: `stream` is a live stream of device 0's primary context, alive until exit.
    let on_stream = unsafe { gpupool_alloc(3 << 20, 0, stream) };
    assert!(!on_stream.is_null(), "{}", last_error());
    // SAFETY: as above.
    assert_eq!(
        unsafe { gpupool_record_stream(on_default, stream) },
        GPUPOOL_OK
    );
    free(on_default, 1 << 20, 0);
    gpupool_free(on_stream, 3 << 20, 0, stream);

    let document = stats(0);
    assert_eq!(document["backend"], "cuda");
    assert_eq!(document["ffi"]["live_pointers"], 0);
    assert_eq!(document["totals"]["in_use_bytes"], 0);
    assert_eq!(gpupool_empty_cache(), GPUPOOL_OK);
    let cached = |document: &serde_json::Value| document["totals"]["cached_bytes"].as_u64();
    let after = stats(0);
    assert!(cached(&after) <= cached(&document), "{after}");
}
