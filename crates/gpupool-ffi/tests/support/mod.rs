//! Helpers the test binaries share: the exported functions called as C calls them.
//!
//! Pools are process-wide, and each test binary is its own process: a binary chooses its
//! backend with `init` before its first allocation, and each test in it uses device indices of
//! its own (host and sim serve any index below 64), so tests running in parallel threads never
//! see each other's allocations or counters.
#![allow(dead_code)] // each binary uses a part

use std::ffi::{c_void, CStr, CString};

use gpupool_ffi::*;

/// Chooses the backend for this test process.
pub fn init(backend: &str) {
    let name = CString::new(backend).unwrap();
    // SAFETY: a valid C string.
    let result = unsafe { gpupool_init(name.as_ptr()) };
    assert_eq!(result, GPUPOOL_OK, "{}", last_error());
}

/// `gpupool_alloc` on the default stream.
pub fn alloc(size: isize, device: i32) -> *mut c_void {
    alloc_on(size, device, 0)
}

/// `gpupool_alloc` on the stream id `stream` (host and sim: any id).
pub fn alloc_on(size: isize, device: i32, stream: usize) -> *mut c_void {
    // SAFETY: host and sim streams are only ids.
    unsafe { gpupool_alloc(size, device, stream as *mut c_void) }
}

/// `gpupool_free` on the default stream.
pub fn free(ptr: *mut c_void, size: isize, device: i32) {
    gpupool_free(ptr, size, device, std::ptr::null_mut());
}

/// This thread's last error, or "" if none.
pub fn last_error() -> String {
    let text = gpupool_last_error();
    if text.is_null() {
        return String::new();
    }
    // SAFETY: a NUL-terminated string valid until this thread's next failure.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

/// Takes a string gpupool returned, and frees it.
pub fn take_string(text: *mut std::ffi::c_char) -> String {
    assert!(!text.is_null(), "{}", last_error());
    // SAFETY: a NUL-terminated string gpupool returned and nobody freed.
    let owned = unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: returned by gpupool, freed once.
    unsafe { gpupool_string_free(text) };
    owned
}

/// The statistics document of `device`.
pub fn stats(device: i32) -> serde_json::Value {
    serde_json::from_str(&take_string(gpupool_stats_json(device))).unwrap()
}

/// `gpupool_configure`.
pub fn configure(text: &str) -> i32 {
    let text = CString::new(text).unwrap();
    // SAFETY: a valid C string.
    unsafe { gpupool_configure(text.as_ptr()) }
}

/// The `ffi` counter `name` of `device`.
pub fn counter(device: i32, name: &str) -> u64 {
    stats(device)["ffi"][name].as_u64().unwrap()
}
