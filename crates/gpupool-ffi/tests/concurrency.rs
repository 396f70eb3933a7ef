//! 8 threads × 10,000 allocations and frees through the C functions at once, on the host
//! backend: no two live allocations ever overlap, every allocation keeps its contents until it
//! is freed, and at the end nothing is live (pointer map, pool and counters agree).

mod support;

use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::Mutex;

use support::*;

const THREADS: usize = 8;
const OPERATIONS: usize = 10_000;
const WINDOW: usize = 24;
const DEVICE: i32 = 0;

/// Live ranges over all threads: start → end.
static LIVE: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());

fn split_mix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut value = *state;
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

/// Mostly small requests of every class, one in 64 above the large threshold (the arena).
fn size(state: &mut u64) -> usize {
    let draw = split_mix(state);
    if draw.is_multiple_of(64) {
        (1 << 20) + (draw as usize >> 8) % (3 << 20)
    } else {
        1 + (draw as usize >> 8) % (256 << 10)
    }
}

fn claim(start: usize, bytes: usize) {
    let end = start + bytes;
    let mut live = LIVE.lock().unwrap();
    if let Some((&before, &before_end)) = live.range(..=start).next_back() {
        assert!(
            before_end <= start,
            "{start:#x} overlaps live [{before:#x}, {before_end:#x})"
        );
    }
    if let Some((&after, _)) = live.range(start..).next() {
        assert!(
            after >= end,
            "[{start:#x}, {end:#x}) overlaps live {after:#x}"
        );
    }
    live.insert(start, end);
}

fn release(start: usize) {
    LIVE.lock()
        .unwrap()
        .remove(&start)
        .expect("the range was live");
}

/// The tag a thread writes at both ends of an allocation.
fn tag(thread: usize, sequence: usize) -> u64 {
    ((thread as u64) << 48) | sequence as u64
}

fn write_tags(ptr: *mut c_void, bytes: usize, tag: u64) {
    let bytes = bytes.min(8);
    let tag = tag.to_le_bytes();
    // SAFETY: host memory of at least `bytes` bytes that this thread alone owns.
    unsafe {
        std::ptr::copy_nonoverlapping(tag.as_ptr(), ptr.cast::<u8>(), bytes);
    }
}

fn tags_intact(ptr: *mut c_void, bytes: usize, tag: u64) -> bool {
    let bytes = bytes.min(8);
    let mut found = [0u8; 8];
    // SAFETY: as in `write_tags`.
    unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), found.as_mut_ptr(), bytes) };
    found[..bytes] == tag.to_le_bytes()[..bytes]
}

/// Checks an allocation's tags, forgets its range, frees it.
fn drop_one(held: &mut Vec<(usize, usize, u64)>, index: usize) {
    let (address, bytes, tag) = held.swap_remove(index);
    assert!(
        tags_intact(address as *mut c_void, bytes, tag),
        "allocation {address:#x} was overwritten"
    );
    release(address);
    free(address as *mut c_void, bytes as isize, DEVICE);
}

fn worker(thread: usize) {
    let mut state = 0x5eed + thread as u64;
    let mut held: Vec<(usize, usize, u64)> = Vec::with_capacity(WINDOW);
    for sequence in 0..OPERATIONS {
        if held.len() == WINDOW {
            let index = split_mix(&mut state) as usize % held.len();
            drop_one(&mut held, index);
        }
        let bytes = size(&mut state);
        let ptr = alloc_on(bytes as isize, DEVICE, thread % 3);
        assert!(!ptr.is_null(), "{}", last_error());
        claim(ptr as usize, bytes);
        let tag = tag(thread, sequence);
        write_tags(ptr, bytes, tag);
        held.push((ptr as usize, bytes, tag));
    }
    while !held.is_empty() {
        drop_one(&mut held, 0);
    }
}

#[test]
fn eight_threads_never_share_a_byte_and_free_everything() {
    init("host");
    std::thread::scope(|scope| {
        for thread in 0..THREADS {
            scope.spawn(move || worker(thread));
        }
    });
    assert!(LIVE.lock().unwrap().is_empty());
    let document = stats(DEVICE);
    let ffi = &document["ffi"];
    assert_eq!(ffi["live_pointers"], 0);
    assert_eq!(ffi["allocated_bytes"], 0);
    assert_eq!(ffi["requested_bytes"], 0);
    assert_eq!(ffi["allocations"], (THREADS * OPERATIONS) as u64);
    assert_eq!(ffi["frees"], (THREADS * OPERATIONS) as u64);
    assert_eq!(ffi["allocated_bytes_total"], ffi["freed_bytes_total"]);
    assert_eq!(
        (ffi["unknown_frees"].as_u64(), ffi["double_frees"].as_u64()),
        (Some(0), Some(0))
    );
    assert!(ffi["live_pointers_peak"].as_u64().unwrap() <= (THREADS * WINDOW) as u64);
    assert_eq!(document["totals"]["in_use_bytes"], 0);
    assert_eq!(document["totals"]["requested_live_bytes"], 0);
    assert_eq!(
        document["totals"]["requests"],
        (THREADS * OPERATIONS) as u64
    );
}
