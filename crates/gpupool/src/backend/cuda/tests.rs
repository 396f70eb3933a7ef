//! What can be checked without a driver; the device tests are in `tests/all/cuda.rs`.
use super::*;

#[test]
#[cfg_attr(
    miri,
    ignore = "turns integers into CUstream handles (opaque to Rust, only the driver uses them), which -Zmiri-strict-provenance refuses"
)]
fn stream_ids_and_handles_convert_both_ways() {
    assert!(CudaBackend::stream_handle(StreamId::DEFAULT).is_null());
    let handle = CudaBackend::stream_handle(StreamId(0x7f00_1234_5600));
    assert_eq!(handle as usize as u64, 0x7f00_1234_5600);
}

#[test]
fn out_of_memory_stays_retryable() {
    let error = cudarc::driver::DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY);
    assert_eq!(backend_error(error), BackendError::OutOfMemory);
}

#[test]
fn probing_never_panics_and_agrees_with_the_device_count() {
    let available = CudaBackend::driver_available();
    assert_eq!(available, CudaBackend::device_count() > 0);
    if !available {
        match CudaBackend::new(0) {
            Err(PoolError::Backend { backend, message }) => {
                assert_eq!(backend, "cuda");
                assert!(message.contains("no CUDA driver"), "{message}");
            }
            other => panic!("expected a backend error without a driver, got {other:?}"),
        }
    }
}

#[test]
#[cfg_attr(
    miri,
    ignore = "turns integers into CUstream handles (opaque to Rust, only the driver uses them), which -Zmiri-strict-provenance refuses"
)]
fn unknown_streams_are_refused_without_a_driver_call() {
    let registry = StreamRegistry::default();
    assert!(registry.handle(StreamId::DEFAULT).unwrap().is_null());
    assert!(matches!(
        registry.handle(StreamId(0xdead_0000)),
        Err(BackendError::Driver(_))
    ));
    let lent = registry.register(0xbeef_0000usize as sys::CUstream);
    assert_eq!(lent, StreamId(0xbeef_0000));
    assert_eq!(registry.handle(lent).unwrap() as usize, 0xbeef_0000);
    // A raw handle has no cudarc stream to hand out.
    assert!(registry.cudarc(lent).is_none());
    assert!(registry.cudarc(StreamId(0xdead_0000)).is_none());
    // Lent streams are not destroyed by the registry, so no driver call happens here.
    registry.release_all();
    assert!(registry.handle(lent).is_err());
}

/// Issue 11: what mapping costs per page size on this device, to choose the page size (printed;
/// run the library's unit tests with `--ignored --nocapture`). Times `cuMemCreate`, `cuMemMap`
/// and `cuMemSetAccess` per page, and `cuMemUnmap` with `cuMemRelease`, through the backend's
/// capability (a unit test: only the crate can make the `PoolAccess` mapping needs).
#[test]
#[ignore]
fn virtual_memory_mapping_costs_per_page_size() {
    const MIB: usize = 1 << 20;
    let Ok(backend) = CudaBackend::new(0) else {
        eprintln!("skipped: no CUDA driver");
        return;
    };
    let Some(memory) = backend.virtual_memory() else {
        eprintln!("cuda: no virtual memory management");
        return;
    };
    let access = crate::backend::PoolAccess::new();
    let granularity = memory.granularity();
    eprintln!("cuda: virtual memory granularity {granularity} bytes");
    for page_bytes in [2 * MIB, 20 * MIB, 64 * MIB, 256 * MIB] {
        let page_bytes = page_bytes.next_multiple_of(granularity);
        let pages = (1024 * MIB / page_bytes).max(4);
        let reservation = memory.reserve(pages * page_bytes).expect("address space");
        let base = reservation.device_address();
        let start = std::time::Instant::now();
        for page in 0..pages {
            memory
                .map(base + (page * page_bytes) as u64, page_bytes, &access)
                .expect("a mapping");
        }
        let map_ns = start.elapsed().as_nanos() as f64 / pages as f64;
        let start = std::time::Instant::now();
        for page in 0..pages {
            memory.unmap(base + (page * page_bytes) as u64, page_bytes, &access);
        }
        let unmap_ns = start.elapsed().as_nanos() as f64 / pages as f64;
        memory.unreserve(reservation);
        eprintln!(
            "cuda vmm: page {:>4} MiB: map {:>9.1} us/page ({:>7.2} us/MiB), unmap {:>9.1} us/page",
            page_bytes / MIB,
            map_ns / 1e3,
            map_ns / 1e3 / (page_bytes / MIB) as f64,
            unmap_ns / 1e3
        );
    }
}
