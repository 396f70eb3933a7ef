//! The simulated device: budgets and memory fractions (before a pool exists, refused after),
//! the out-of-memory path (NULL, the pool's message, the callback), stream ids, the statistics
//! document's fields and the dashboard. One device index per test.

mod support;

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Mutex;

use gpupool_ffi::*;
use support::*;

/// What the out-of-memory callback was told: (device, bytes, message).
static TOLD: Mutex<Vec<(i32, usize, String)>> = Mutex::new(Vec::new());

extern "C" fn remember_oom(device: c_int, requested: usize, message: *const c_char) {
    // SAFETY: gpupool passes a NUL-terminated message valid during the call.
    let message = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    TOLD.lock().unwrap().push((device, requested, message));
}

fn told(device: i32) -> Vec<(usize, String)> {
    TOLD.lock()
        .unwrap()
        .iter()
        .filter(|(at, _, _)| *at == device)
        .map(|(_, bytes, message)| (*bytes, message.clone()))
        .collect()
}

#[test]
fn over_budget_is_null_with_the_pools_message_and_the_callback_told() {
    init("sim");
    let device = 1;
    assert_eq!(gpupool_set_budget_bytes(device, 8 << 20), GPUPOOL_OK);
    // SAFETY: a function of the callback's signature that does not unwind.
    unsafe { gpupool_set_oom_callback(Some(remember_oom)) };
    let first = alloc(4 << 20, device);
    assert!(!first.is_null(), "{}", last_error());
    let refused = alloc(6 << 20, device);
    assert!(refused.is_null());
    let message = last_error();
    assert!(message.contains("budget exceeded"), "{message}");
    assert!(message.contains("budget 8388608 bytes"), "{message}");
    assert_eq!(gpupool_last_error_code(), GPUPOOL_ERR_OUT_OF_MEMORY);
    assert_eq!(told(device), [(6 << 20, message)]);
    let document = stats(device);
    assert_eq!(document["ffi"]["out_of_memory"], 1);
    assert_eq!(document["ffi"]["failed_allocations"], 1);
    assert_eq!(document["devices"][0]["budget_bytes"], 8 << 20);
    // Fixed once the pool exists.
    assert_eq!(
        gpupool_set_budget_bytes(device, 16 << 20),
        GPUPOOL_ERR_TOO_LATE
    );
    assert!(last_error().contains("already exists"), "{}", last_error());
    free(first, 4 << 20, device);
    assert!(
        !alloc(6 << 20, device).is_null(),
        "fits once the first is freed"
    );
}

#[test]
fn a_memory_fraction_is_a_budget_of_the_devices_memory() {
    init("sim");
    let device = 2;
    assert_eq!(
        gpupool_set_memory_fraction(0.0, device),
        GPUPOOL_ERR_INVALID_ARGUMENT
    );
    assert_eq!(
        gpupool_set_memory_fraction(1.5, device),
        GPUPOOL_ERR_INVALID_ARGUMENT
    );
    assert_eq!(
        gpupool_set_memory_fraction(f64::NAN, device),
        GPUPOOL_ERR_INVALID_ARGUMENT
    );
    assert_eq!(gpupool_set_memory_fraction(0.25, device), GPUPOOL_OK);
    let ptr = alloc(1 << 20, device);
    assert!(!ptr.is_null(), "{}", last_error());
    let document = stats(device);
    let capacity = document["devices"][0]["capacity_bytes"].as_u64().unwrap();
    assert_eq!(document["devices"][0]["budget_bytes"], capacity / 4);
    assert_eq!(
        gpupool_set_memory_fraction(0.5, device),
        GPUPOOL_ERR_TOO_LATE
    );
    // The PyTorch hook reports the same refusal without a return value.
    gpupool_torch_set_memory_fraction(0.5, device);
    assert!(last_error().contains("already exists"), "{}", last_error());
    free(ptr, 1 << 20, device);
}

#[test]
fn the_statistics_document_has_the_pool_and_the_boundary() {
    init("sim");
    let device = 3;
    let before = stats(device);
    assert_eq!(before["created"], false);
    assert_eq!(before["backend"], "sim");
    assert_eq!(before["totals"]["reserved_bytes"], 0);
    let kept = alloc(1000, device);
    let large = alloc(3 << 20, device);
    free(large, 3 << 20, device);
    let document = stats(device);
    assert_eq!(document["schema_version"], 1);
    assert_eq!(document["device"], device);
    assert_eq!(document["created"], true);
    assert_eq!(document["backend"], "sim");
    assert_eq!(document["pooling"], true);
    let totals = &document["totals"];
    for field in [
        "requests",
        "hits",
        "misses",
        "in_use_bytes",
        "cached_bytes",
        "reserved_bytes",
        "requested_live_bytes",
        "peak_reserved_bytes",
        "blocks_held",
        "pending_release_bytes",
        "hit_rate",
    ] {
        assert!(totals.get(field).is_some(), "totals.{field} is missing");
    }
    assert_eq!(totals["in_use_bytes"], 1024);
    assert_eq!(totals["requested_live_bytes"], 1000);
    assert_eq!(totals["requests"], 2);
    assert!(
        document["devices"][0]["large"]["requests"]
            .as_u64()
            .unwrap()
            >= 1
    );
    let ffi = &document["ffi"];
    let expected = [
        ("live_pointers", 1),
        ("live_pointers_peak", 2),
        ("allocated_bytes", 1024),
        ("requested_bytes", 1000),
        ("requested_bytes_peak", 1000 + (3 << 20)),
        ("allocations", 2),
        ("frees", 1),
        ("zero_size_allocations", 0),
        ("failed_allocations", 0),
        ("out_of_memory", 0),
        ("unknown_frees", 0),
        ("double_frees", 0),
        ("size_mismatched_frees", 0),
    ];
    for (field, value) in expected {
        assert_eq!(ffi[field], value, "ffi.{field}");
    }
    let peak = ffi["allocated_bytes_peak"].as_u64().unwrap();
    assert!(peak >= 1024 + (3 << 20), "{peak}");
    assert_eq!(
        ffi["allocated_bytes_total"].as_u64().unwrap() - ffi["freed_bytes_total"].as_u64().unwrap(),
        1024
    );
    let dashboard = take_string(gpupool_dashboard(device));
    assert!(dashboard.contains("Overall Statistics"), "{dashboard}");
    free(kept, 1000, device);
}

#[test]
fn streams_are_ids_and_record_stream_marks_a_live_allocation() {
    init("sim");
    let device = 4;
    let on_seven = alloc_on(4096, device, 7);
    let on_default = alloc(4096, device);
    assert_ne!(on_seven, on_default);
    // SAFETY: sim streams are ids.
    assert_eq!(
        unsafe { gpupool_record_stream(on_default, 9 as *mut c_void) },
        GPUPOOL_OK
    );
    // SAFETY: as above.
    unsafe { gpupool_torch_record_stream(on_seven, 9 as *mut c_void) };
    free(on_seven, 4096, device);
    free(on_default, 4096, device);
    // The block freed on stream 7 serves stream 7 again.
    let again = alloc_on(4096, device, 7);
    assert_eq!(again, on_seven);
    free(again, 4096, device);
    assert_eq!(gpupool_empty_cache(), GPUPOOL_OK);
    gpupool_torch_empty_cache();
    let document = stats(device);
    assert_eq!(
        document["totals"]["cached_bytes"], 0,
        "empty_cache released every idle block"
    );
}

#[test]
fn the_backend_is_named() {
    init("sim");
    // SAFETY: a static C string.
    let name = unsafe { CStr::from_ptr(gpupool_backend()) };
    assert_eq!(name.to_str().unwrap(), "sim");
}
