//! Configuration reaches the pools: `GPUPOOL_CONFIG` at first use, `gpupool_configure` on top of
//! it, a device's own budget over both; and nothing changes once a pool exists. One test: the
//! environment is read once per process, before anything else.

mod support;

use gpupool_ffi::*;
use support::*;

#[test]
fn environment_then_configure_then_device_budget_then_too_late() {
    // The only test of this process, so nothing has read the environment yet.
    std::env::set_var("GPUPOOL_CONFIG", "budget_bytes=64MiB, max_idle_per_class=8");
    init("host");
    assert_eq!(
        configure("steps_per_doubling=4"),
        GPUPOOL_OK,
        "{}",
        last_error()
    );
    assert_eq!(gpupool_set_budget_bytes(1, 32 << 20), GPUPOOL_OK);
    assert_eq!(gpupool_set_budget_bytes(1, 0), GPUPOOL_ERR_INVALID_ARGUMENT);

    let ptr = alloc(600, 0);
    assert!(!ptr.is_null(), "{}", last_error());
    let device0 = stats(0);
    assert_eq!(
        device0["devices"][0]["budget_bytes"],
        64 << 20,
        "from GPUPOOL_CONFIG"
    );
    let block = device0["totals"]["in_use_bytes"].as_u64().unwrap();
    assert!(
        (600..1024).contains(&block),
        "steps_per_doubling=4 serves 600 B from a finer class, got {block}"
    );
    let other = alloc(600, 1);
    assert_eq!(
        stats(1)["devices"][0]["budget_bytes"],
        32 << 20,
        "the device's own budget"
    );

    assert_eq!(configure("steps_per_doubling=2"), GPUPOOL_ERR_TOO_LATE);
    assert!(
        last_error().contains("before the first allocation"),
        "{}",
        last_error()
    );
    assert_eq!(
        configure("steps_per_doubling=zwei"),
        GPUPOOL_ERR_CONFIG,
        "bad strings are named first"
    );
    free(ptr, 600, 0);
    free(other, 600, 1);
}
