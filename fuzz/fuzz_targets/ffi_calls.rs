//! An arbitrary sequence of C-ABI calls on the host backend, as a C program could make them:
//! allocations of any size (capped so the host is not asked for gigabytes it would touch),
//! frees of live, freed, interior and made-up pointers with right and wrong sizes and devices,
//! `record_stream`, statistics, the dashboard, `empty_cache`, configuration strings, budgets.
//!
//! The pools are process-wide, so the target keeps their state from making runs differ: the
//! process sets everything up once (backend, a fixed configuration, device 1's budget, the
//! out-of-memory callback) and creates the pools of the devices it allocates on (0, 1, 2)
//! before the first input. After that every setting is refused as too late whatever the input
//! does, so a configuration string is parsed and checked (and must be refused: `CONFIG`,
//! `TOO_LATE` or `INVALID_ARGUMENT`), never applied; allocations on other devices use invalid
//! indices only, so no input creates a pool; and each input frees what it still holds and
//! empties the caches at its end, so the next one starts from empty pools.
//!
//! Checks besides not crashing (a panic is one even where the boundary catches it: libFuzzer's
//! panic hook aborts first): no call returns `GPUPOOL_ERR_INTERNAL`; a returned pointer is
//! aligned, not already live, zeroed (the configuration zeroes reused blocks) and writable over
//! its size (AddressSanitizer watches); each device's `live_pointers` equals the live
//! allocations the target holds there; at the end of an input no pointer is live, nothing is
//! in use, and reserved = in use + cached.
#![no_main]

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use arbitrary::Arbitrary;
use gpupool_ffi::*;
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;

/// The devices inputs allocate on; their pools exist before the first input.
const DEVICES: [c_int; 3] = [0, 1, 2];
/// Device 1's budget: its out-of-memory paths are reachable with small requests.
const DEVICE_1_BUDGET: u64 = 4 << 20;
/// Small thresholds, so requests under the size cap reach the large arena, the bypass (above
/// the largest class) and the idle caps; reused blocks are zeroed (checked on every pointer).
const CONFIG: &str = "steps_per_doubling=2, max_class_bytes=512KiB, max_idle_per_class=4, \
                      min_idle_per_class=1, max_idle_bytes_per_class=64KiB, \
                      large_threshold_bytes=128KiB, zero_on_reuse=true, maintenance_interval=0";

const MIB: usize = 1 << 20;
/// How much of a block is checked for zeros and then written: the head, and the tail.
const CHECKED_BYTES: usize = 4096;

static SETUP: Once = Once::new();
static OOM_CALLS: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" fn on_oom(device: c_int, requested: usize, message: *const c_char) {
    assert!(
        DEVICES.contains(&device),
        "out-of-memory callback for device {device}"
    );
    assert!(requested > 0);
    assert!(!message.is_null());
    // SAFETY: a NUL-terminated string valid during the call (the callback's contract).
    let message = unsafe { CStr::from_ptr(message) };
    assert!(!message.to_bytes().is_empty());
    OOM_CALLS.fetch_add(1, Ordering::Relaxed);
}

fn last_error() -> String {
    let text = gpupool_last_error();
    if text.is_null() {
        return String::new();
    }
    // SAFETY: NUL-terminated, valid until this thread's next failure.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

/// A code any call may return, but never `INTERNAL` (a caught panic or a broken invariant).
fn not_internal(code: c_int, call: &str) -> c_int {
    assert_ne!(code, GPUPOOL_ERR_INTERNAL, "{call}: {}", last_error());
    code
}

fn configure(text: &[u8]) -> c_int {
    let text = CString::new(text).expect("no NUL inside");
    // SAFETY: a valid C string.
    unsafe { gpupool_configure(text.as_ptr()) }
}

fn init(text: &[u8]) -> c_int {
    let text = CString::new(text).expect("no NUL inside");
    // SAFETY: a valid C string.
    unsafe { gpupool_init(text.as_ptr()) }
}

/// Takes a string gpupool returned (NULL: the call failed) and frees it.
fn take_string(text: *mut c_char, call: &str) -> Option<String> {
    if text.is_null() {
        not_internal(gpupool_last_error_code(), call);
        return None;
    }
    // SAFETY: a NUL-terminated string gpupool returned and nobody freed.
    let owned = unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: returned by gpupool, freed once.
    unsafe { gpupool_string_free(text) };
    Some(owned)
}

/// The figures of the statistics document the checks read (the rest is skipped unparsed).
#[derive(Deserialize)]
struct Stats {
    totals: Totals,
    ffi: FfiCounters,
}

#[derive(Deserialize)]
struct Totals {
    in_use_bytes: u64,
    cached_bytes: u64,
    reserved_bytes: u64,
}

#[derive(Deserialize)]
struct FfiCounters {
    live_pointers: u64,
}

/// The statistics of `device`, `None` where the call failed.
fn stats(device: c_int) -> Option<Stats> {
    let text = take_string(gpupool_stats_json(device), "stats_json")?;
    Some(serde_json::from_str(&text).expect("the statistics are JSON"))
}

fn setup() {
    SETUP.call_once(|| {
        // SAFETY: a function of the callback's signature that does not unwind into C (a failed
        // assertion aborts the fuzzer).
        unsafe { gpupool_set_oom_callback(Some(on_oom)) };
        assert_eq!(configure(CONFIG.as_bytes()), GPUPOOL_OK, "{}", last_error());
        assert_eq!(gpupool_set_budget_bytes(1, DEVICE_1_BUDGET), GPUPOOL_OK);
        assert_eq!(init(b"host"), GPUPOOL_OK, "{}", last_error());
        for device in DEVICES {
            // SAFETY: host streams are ids only.
            let ptr = unsafe { gpupool_alloc(1, device, std::ptr::null_mut()) };
            assert!(!ptr.is_null(), "{}", last_error());
            gpupool_free(ptr, 1, device, std::ptr::null_mut());
        }
        assert_eq!(gpupool_empty_cache(), GPUPOOL_OK);
    });
}

/// A device index for an allocation: one of the three, or one that is not a device at all (so
/// that no input creates a pool).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum AllocDevice {
    Zero,
    One,
    Two,
    Invalid(i32),
}

impl AllocDevice {
    fn get(self) -> c_int {
        match self {
            AllocDevice::Zero => 0,
            AllocDevice::One => 1,
            AllocDevice::Two => 2,
            AllocDevice::Invalid(index) if (0..64).contains(&index) => -1 - index,
            AllocDevice::Invalid(index) => index,
        }
    }
}

/// A device index for calls that create no pool: any.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum AnyDevice {
    Used(AllocDevice),
    Any(i32),
}

impl AnyDevice {
    fn get(self) -> c_int {
        match self {
            AnyDevice::Used(device) => device.get(),
            AnyDevice::Any(index) => index,
        }
    }
}

/// An allocation size: below 1 MiB, or a special value (negative, zero, the class and arena
/// edges, sizes no host could give).
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Size {
    Small(u16),
    Capped(u32),
    Special(u8),
}

impl Size {
    fn get(self) -> isize {
        const SPECIAL: [isize; 16] = [
            0,
            -1,
            isize::MIN,
            isize::MAX,
            isize::MAX - 255,
            1,
            255,
            256,
            (128 << 10) + 1,
            512 << 10,
            (512 << 10) + 1,
            MIB as isize,
            4 << 20,
            (4 << 20) + 1,
            1 << 40,
            1 << 50,
        ];
        match self {
            Size::Small(bytes) => bytes as isize,
            Size::Capped(bytes) => (bytes as usize % MIB) as isize,
            Size::Special(index) => SPECIAL[usize::from(index) % SPECIAL.len()],
        }
    }
}

/// Which pointer a free or `record_stream` names.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Target {
    Live(u16),
    Freed(u16),
    Interior(u16, u32),
    MadeUp(usize),
    Null,
}

/// Which size a free passes.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum FreeSize {
    Allocated,
    Other(isize),
}

/// Which device a free names.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum FreeDevice {
    Allocated,
    Other(AnyDevice),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Alloc {
        size: Size,
        device: AllocDevice,
        stream: u8,
    },
    Free {
        target: Target,
        size: FreeSize,
        device: FreeDevice,
        stream: u8,
    },
    RecordStream {
        target: Target,
        stream: u8,
        torch_hook: bool,
    },
    StatsJson(AnyDevice),
    Dashboard(AnyDevice),
    EmptyCache {
        torch_hook: bool,
    },
    Configure(Vec<u8>),
    ConfigureNull,
    Init(Vec<u8>),
    Backend,
    SetBudget(AnyDevice, u64),
    SetFraction(f64, AnyDevice, bool),
    LastError,
}

/// An allocation the target holds.
#[derive(Clone, Copy, Debug)]
struct Live {
    ptr: usize,
    size: usize,
    device: c_int,
}

struct State {
    live: Vec<Live>,
    freed: Vec<usize>,
    /// Which of `DEVICES` this input allocated on.
    used: [bool; 3],
}

impl State {
    fn pick(&self, target: Target) -> Option<(usize, Option<Live>)> {
        match target {
            Target::Live(index) => {
                let entry = *self.live.get(usize::from(index) % self.live.len().max(1))?;
                Some((entry.ptr, Some(entry)))
            }
            Target::Freed(index) => {
                let ptr = *self
                    .freed
                    .get(usize::from(index) % self.freed.len().max(1))?;
                Some((ptr, None))
            }
            Target::Interior(index, offset) => {
                let entry = *self.live.get(usize::from(index) % self.live.len().max(1))?;
                Some((entry.ptr + offset as usize % entry.size, Some(entry)))
            }
            Target::MadeUp(ptr) => Some((ptr, None)),
            Target::Null => Some((0, None)),
        }
    }

    /// The live allocation at `ptr` on `device`, if the target holds one.
    fn position(&self, ptr: usize, device: c_int) -> Option<usize> {
        self.live
            .iter()
            .position(|entry| entry.ptr == ptr && entry.device == device)
    }

    fn live_on(&self, device: c_int) -> u64 {
        self.live
            .iter()
            .filter(|entry| entry.device == device)
            .count() as u64
    }
}

/// Checks a fresh allocation and writes to it: aligned, zeroed (zero_on_reuse), writable.
/// The head and the tail of the block are checked, up to `CHECKED_BYTES` each.
fn touch(ptr: usize, size: usize) {
    assert_eq!(ptr % 256, 0, "{ptr:#x} is not aligned to 256 bytes");
    let head = 0..size.min(CHECKED_BYTES);
    let tail = size.saturating_sub(CHECKED_BYTES).max(head.end)..size;
    for range in [head, tail] {
        // SAFETY: the allocation holds `size` bytes of host memory that only this target uses.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut((ptr + range.start) as *mut u8, range.len()) };
        assert!(
            bytes.iter().all(|&byte| byte == 0),
            "a block handed out at {ptr:#x} is not zeroed"
        );
        bytes.fill(0xa5);
    }
}

fn free(state: &mut State, ptr: usize, size: isize, device: c_int, stream: u8) {
    if let Some(index) = state.position(ptr, device) {
        state.live.swap_remove(index);
        state.freed.push(ptr);
    }
    gpupool_free(
        ptr as *mut c_void,
        size,
        device,
        usize::from(stream) as *mut c_void,
    );
    not_internal(gpupool_last_error_code(), "free");
}

fuzz_target!(|ops: Vec<Op>| {
    setup();
    let mut state = State {
        live: Vec::new(),
        freed: Vec::new(),
        used: [false; 3],
    };
    for op in ops.iter().take(256) {
        match op {
            &Op::Alloc {
                size,
                device,
                stream,
            } => {
                let (size, device) = (size.get(), device.get());
                if let Some(slot) = DEVICES.iter().position(|&used| used == device) {
                    state.used[slot] = true;
                }
                // SAFETY: host streams are ids only.
                let ptr = unsafe { gpupool_alloc(size, device, usize::from(stream) as *mut c_void) }
                    as usize;
                if ptr == 0 {
                    not_internal(gpupool_last_error_code(), "alloc");
                    continue;
                }
                assert!(
                    size > 0 && DEVICES.contains(&device),
                    "{size} bytes on {device}"
                );
                assert!(
                    state.live.iter().all(|entry| entry.ptr != ptr),
                    "{ptr:#x} handed out while live"
                );
                touch(ptr, size as usize);
                state.live.push(Live {
                    ptr,
                    size: size as usize,
                    device,
                });
            }
            &Op::Free {
                target,
                size,
                device,
                stream,
            } => {
                let Some((ptr, entry)) = state.pick(target) else {
                    continue;
                };
                let size = match (size, entry) {
                    (FreeSize::Allocated, Some(entry)) => entry.size as isize,
                    (FreeSize::Allocated, None) => 0,
                    (FreeSize::Other(size), _) => size,
                };
                let device = match (device, entry) {
                    (FreeDevice::Allocated, Some(entry)) => entry.device,
                    (FreeDevice::Allocated, None) => 0,
                    (FreeDevice::Other(device), _) => device.get(),
                };
                free(&mut state, ptr, size, device, stream);
            }
            &Op::RecordStream {
                target,
                stream,
                torch_hook,
            } => {
                let Some((ptr, _)) = state.pick(target) else {
                    continue;
                };
                let (ptr, stream) = (ptr as *mut c_void, usize::from(stream) as *mut c_void);
                if torch_hook {
                    // SAFETY: host streams are ids only.
                    unsafe { gpupool_torch_record_stream(ptr, stream) };
                    not_internal(gpupool_last_error_code(), "torch_record_stream");
                } else {
                    // SAFETY: host streams are ids only.
                    let code = unsafe { gpupool_record_stream(ptr, stream) };
                    let held = state.live.iter().any(|entry| entry.ptr == ptr as usize);
                    let expected = if held {
                        GPUPOOL_OK
                    } else {
                        GPUPOOL_ERR_UNKNOWN_POINTER
                    };
                    assert_eq!(code, expected, "record_stream: {}", last_error());
                }
            }
            &Op::StatsJson(device) => {
                let device = device.get();
                let Some(stats) = stats(device) else {
                    assert!(
                        !(0..64).contains(&device),
                        "no statistics for device {device}"
                    );
                    continue;
                };
                assert_eq!(
                    stats.ffi.live_pointers,
                    state.live_on(device),
                    "device {device}: live pointers"
                );
                let totals = &stats.totals;
                assert_eq!(
                    totals.reserved_bytes,
                    totals.in_use_bytes + totals.cached_bytes,
                    "device {device}: reserved = in use + cached"
                );
            }
            &Op::Dashboard(device) => {
                take_string(gpupool_dashboard(device.get()), "dashboard");
            }
            &Op::EmptyCache { torch_hook } => {
                if torch_hook {
                    gpupool_torch_empty_cache();
                } else {
                    assert_eq!(gpupool_empty_cache(), GPUPOOL_OK);
                }
            }
            Op::Configure(text) => {
                let end = text
                    .iter()
                    .position(|&byte| byte == 0)
                    .unwrap_or(text.len());
                let code = configure(&text[..end]);
                assert!(
                    [
                        GPUPOOL_ERR_CONFIG,
                        GPUPOOL_ERR_TOO_LATE,
                        GPUPOOL_ERR_INVALID_ARGUMENT
                    ]
                    .contains(&code),
                    "configure returned {code}: {}",
                    last_error()
                );
            }
            Op::ConfigureNull => {
                // SAFETY: NULL is allowed.
                let code = unsafe { gpupool_configure(std::ptr::null()) };
                assert_eq!(code, GPUPOOL_ERR_INVALID_ARGUMENT);
            }
            Op::Init(text) => {
                let end = text
                    .iter()
                    .position(|&byte| byte == 0)
                    .unwrap_or(text.len());
                not_internal(init(&text[..end]), "init");
                // Whatever it said, the backend stays the host's.
                // SAFETY: a static C string.
                let name = unsafe { CStr::from_ptr(gpupool_backend()) };
                assert_eq!(name.to_bytes(), b"host");
            }
            Op::Backend => {
                assert!(!gpupool_backend().is_null());
            }
            &Op::SetBudget(device, bytes) => {
                let device = device.get();
                let code = not_internal(gpupool_set_budget_bytes(device, bytes), "set_budget");
                if DEVICES.contains(&device) {
                    assert_ne!(code, GPUPOOL_OK, "a budget after the pool exists");
                }
            }
            &Op::SetFraction(fraction, device, torch_hook) => {
                let device = device.get();
                if torch_hook {
                    gpupool_torch_set_memory_fraction(fraction, device);
                    not_internal(gpupool_last_error_code(), "torch_set_memory_fraction");
                } else {
                    let code = not_internal(
                        gpupool_set_memory_fraction(fraction, device),
                        "set_memory_fraction",
                    );
                    if DEVICES.contains(&device) {
                        assert_ne!(code, GPUPOOL_OK, "a fraction after the pool exists");
                    }
                }
            }
            Op::LastError => {
                let _ = last_error();
                not_internal(gpupool_last_error_code(), "last_error_code");
            }
        }
    }

    // The end of an input: free what is live, empty the caches, and check that nothing is
    // left in use on the devices the input allocated on.
    for entry in std::mem::take(&mut state.live) {
        gpupool_free(
            entry.ptr as *mut c_void,
            entry.size as isize,
            entry.device,
            std::ptr::null_mut(),
        );
    }
    assert_eq!(gpupool_empty_cache(), GPUPOOL_OK);
    for (&device, _) in DEVICES.iter().zip(state.used).filter(|(_, used)| *used) {
        let stats = stats(device).expect("statistics of a device");
        assert_eq!(stats.ffi.live_pointers, 0, "device {device}");
        let totals = &stats.totals;
        assert_eq!(totals.in_use_bytes, 0, "device {device}");
        assert_eq!(
            totals.reserved_bytes, totals.cached_bytes,
            "device {device}: reserved = in use + cached"
        );
    }
});
