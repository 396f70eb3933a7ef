//! Misuse C makes easy is reported, counted and harmless: double frees, unknown pointers, bad
//! sizes, NULL, unknown pointers for record_stream. Host backend; one device index per test.

mod support;

use std::ffi::c_void;

use gpupool_ffi::*;
use support::*;

#[test]
fn a_double_free_is_reported_counted_and_harmless() {
    init("host");
    let device = 1;
    let ptr = alloc(1000, device);
    assert!(!ptr.is_null(), "{}", last_error());
    free(ptr, 1000, device);
    free(ptr, 1000, device);
    assert!(last_error().contains("double free"), "{}", last_error());
    assert_eq!(counter(device, "double_frees"), 1);
    assert_eq!(counter(device, "unknown_frees"), 0);
    // The block is still the pool's to hand out, once.
    let again = alloc(1000, device);
    assert_eq!(again, ptr, "the cached block serves the next request");
    let other = alloc(1000, device);
    assert_ne!(other, again);
    free(again, 1000, device);
    free(other, 1000, device);
    assert_eq!(counter(device, "live_pointers"), 0);
    assert_eq!(stats(device)["totals"]["in_use_bytes"], 0);
}

#[test]
fn an_unknown_pointer_is_reported_and_counted() {
    init("host");
    let device = 2;
    let ptr = alloc(4096, device);
    let inside = (ptr as usize + 256) as *mut c_void;
    free(inside, 4096, device);
    assert!(last_error().contains("unknown pointer"), "{}", last_error());
    let stack = 12345usize;
    free(&stack as *const usize as *mut c_void, 8, device);
    assert_eq!(counter(device, "unknown_frees"), 2);
    assert_eq!(
        counter(device, "live_pointers"),
        1,
        "the real allocation is untouched"
    );
    free(ptr, 4096, device);
    assert_eq!(counter(device, "live_pointers"), 0);
    // A device whose pool was never made counts its bad frees too, and makes no pool.
    free(inside, 4096, 40);
    assert_eq!(counter(40, "unknown_frees"), 1);
    assert_eq!(stats(40)["created"], false);
}

#[test]
fn a_pointer_freed_with_another_device_is_not_freed() {
    init("host");
    let ptr = alloc(512, 3);
    alloc(512, 4).cast::<u8>(); // device 4's pool exists; the pointer is device 3's
    free(ptr, 512, 4);
    assert!(last_error().contains("unknown pointer"), "{}", last_error());
    assert_eq!(counter(3, "live_pointers"), 1);
    free(ptr, 512, 3);
    assert_eq!(counter(3, "live_pointers"), 0);
}

#[test]
fn zero_negative_and_huge_sizes() {
    init("host");
    let device = 5;
    let errors_before = last_error();
    assert!(alloc(0, device).is_null());
    assert_eq!(last_error(), errors_before, "size 0 is not an error");
    assert_eq!(counter(device, "zero_size_allocations"), 1);

    assert!(alloc(-1, device).is_null());
    assert!(last_error().contains("size -1"), "{}", last_error());
    assert_eq!(gpupool_last_error_code(), GPUPOOL_ERR_INVALID_ARGUMENT);
    assert!(alloc(isize::MIN, device).is_null());

    assert!(alloc(isize::MAX, device).is_null());
    assert_eq!(gpupool_last_error_code(), GPUPOOL_ERR_OUT_OF_MEMORY);
    let message = last_error();
    assert!(
        message.contains("exceeds the largest possible allocation"),
        "{message}"
    );
    let document = stats(device);
    assert_eq!(document["ffi"]["failed_allocations"], 3);
    assert_eq!(document["ffi"]["out_of_memory"], 1);
    assert_eq!(document["ffi"]["live_pointers"], 0);
}

#[test]
fn bad_device_indices_are_refused() {
    init("host");
    assert!(alloc(256, -1).is_null());
    assert!(
        last_error().contains("devices are numbered from 0"),
        "{}",
        last_error()
    );
    assert!(alloc(256, GPUPOOL_MAX_DEVICES as i32).is_null());
    assert!(last_error().contains("devices 0 to 63"), "{}", last_error());
    assert!(gpupool_stats_json(-3).is_null());
    assert_eq!(
        gpupool_set_budget_bytes(99, 1 << 20),
        GPUPOOL_ERR_INVALID_ARGUMENT
    );
}

#[test]
fn freeing_null_is_a_no_op() {
    init("host");
    free(std::ptr::null_mut(), 0, 6);
    free(std::ptr::null_mut(), 100, 6);
    let document = stats(6);
    assert_eq!(document["ffi"]["unknown_frees"], 0);
    assert_eq!(document["created"], false, "freeing NULL makes no pool");
}

#[test]
fn record_stream_on_an_unknown_pointer_is_an_error() {
    init("host");
    let device = 7;
    let ptr = alloc(2048, device);
    // SAFETY: host streams are ids.
    let known = unsafe { gpupool_record_stream(ptr, 7 as *mut c_void) };
    assert_eq!(known, GPUPOOL_OK);
    let inside = (ptr as usize + 8) as *mut c_void;
    // SAFETY: as above.
    let unknown = unsafe { gpupool_record_stream(inside, 7 as *mut c_void) };
    assert_eq!(unknown, GPUPOOL_ERR_UNKNOWN_POINTER);
    assert!(
        last_error().contains("record_stream on unknown pointer"),
        "{}",
        last_error()
    );
    free(ptr, 2048, device);
    // SAFETY: as above.
    let freed = unsafe { gpupool_record_stream(ptr, 7 as *mut c_void) };
    assert_eq!(freed, GPUPOOL_ERR_UNKNOWN_POINTER);
}

#[test]
fn bad_strings_are_errors_not_crashes() {
    init("host");
    assert_eq!(configure("colour=blue"), GPUPOOL_ERR_CONFIG);
    assert!(
        last_error().contains("unknown key \"colour\""),
        "{}",
        last_error()
    );
    assert_eq!(configure("steps_per_doubling=x"), GPUPOOL_ERR_CONFIG);
    assert_eq!(configure("min_idle_per_class=100"), GPUPOOL_ERR_CONFIG);
    assert!(
        last_error().contains("exceeds max_idle_per_class"),
        "{}",
        last_error()
    );
    // SAFETY: NULL is allowed and refused.
    assert_eq!(
        unsafe { gpupool_configure(std::ptr::null()) },
        GPUPOOL_ERR_INVALID_ARGUMENT
    );
    let not_utf8 = [0xffu8, 0xfe, 0];
    // SAFETY: a NUL-terminated byte string.
    let result = unsafe { gpupool_configure(not_utf8.as_ptr().cast()) };
    assert_eq!(result, GPUPOOL_ERR_INVALID_ARGUMENT);
    let metal = std::ffi::CString::new("metal").unwrap();
    // SAFETY: a valid C string.
    assert_eq!(
        unsafe { gpupool_init(metal.as_ptr()) },
        GPUPOOL_ERR_INVALID_ARGUMENT
    );
    // SAFETY: NULL is a no-op.
    unsafe { gpupool_string_free(std::ptr::null_mut()) };
}

#[test]
fn another_backend_is_refused_once_pools_exist() {
    init("host");
    let ptr = alloc(256, 8);
    let sim = std::ffi::CString::new("sim").unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { gpupool_init(sim.as_ptr()) }, GPUPOOL_ERR_TOO_LATE);
    assert!(last_error().contains("host backend"), "{}", last_error());
    free(ptr, 256, 8);
}

#[test]
fn a_free_with_another_size_frees_and_is_counted() {
    init("host");
    let device = 9;
    let ptr = alloc(3000, device);
    free(ptr, 2999, device);
    let document = stats(device);
    assert_eq!(document["ffi"]["size_mismatched_frees"], 1);
    assert_eq!(document["ffi"]["live_pointers"], 0);
}
