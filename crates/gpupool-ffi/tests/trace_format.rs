//! A recorded trace is one `gpupool replay` accepts: the file is parsed by the CLI's own reader.
//!
//! How the reader gets here: `gpupool-cli` is a binary crate (no library to depend on), and
//! `CARGO_BIN_EXE_*` names binaries of this package only, so the test compiles the reader's
//! source file itself (`#[path]` below): the very code `gpupool replay` parses traces with, with
//! its checks (ids allocated before freed, sizes that match, no zero-byte allocations). Running
//! the CLI binary instead would need `cargo run -p gpupool-cli` from a test, a second build.

mod support;

#[allow(dead_code)] // the reader's API is larger than the test needs
#[path = "../../gpupool-cli/src/replay/trace.rs"]
mod cli_trace;

use std::ffi::CString;
use std::sync::Mutex;

use gpupool_ffi::*;
use support::*;

/// Recording is process-wide: the tests that start it take turns.
static RECORDER: Mutex<()> = Mutex::new(());

fn start(path: &std::path::Path) -> i32 {
    let path = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid C string.
    unsafe { gpupool_record_trace_start(path.as_ptr()) }
}

#[test]
fn a_recorded_trace_parses_with_the_replay_reader() {
    let _turn = RECORDER.lock().unwrap();
    init("sim");
    let device = 0;
    let path = std::env::temp_dir().join(format!("gpupool-ffi-trace-{}.csv", std::process::id()));
    let before = alloc(512, device); // allocated before recording: its free is left out

    assert_eq!(start(&path), GPUPOOL_OK, "{}", last_error());
    assert_eq!(
        start(&path),
        GPUPOOL_ERR_TOO_LATE,
        "one recording at a time"
    );
    let a = alloc(1000, device);
    let b = alloc_on(3 << 20, device, 5);
    assert!(alloc(0, device).is_null(), "zero bytes: not recorded");
    assert!(alloc(200 << 30, device).is_null(), "refused: not recorded");
    free(before, 512, device);
    free(a, 1000, device);
    let c = alloc_on(2000, device, 5);
    let still_live = alloc(700, device);
    free(b, 3 << 20, device);
    free(c, 2000, device);
    assert_eq!(gpupool_record_trace_stop(), GPUPOOL_OK);
    assert_eq!(
        gpupool_record_trace_stop(),
        GPUPOOL_OK,
        "stopping twice is fine"
    );
    free(still_live, 700, device); // after the recording: not in the file

    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("op,id,size,stream\n"), "{text}");
    let trace = cli_trace::parse(std::fs::File::open(&path).unwrap())
        .unwrap_or_else(|error| panic!("the replay reader refused the trace: {error}\n{text}"));
    assert_eq!(trace.allocations, 4, "{text}");
    assert_eq!(trace.frees, 3, "{text}");
    assert_eq!(trace.live_at_end, 1);
    assert_eq!(trace.streams, [0, 5]);
    assert_eq!(trace.peak_live_bytes, 1000 + (3 << 20) + 2000 + 700 - 1000);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_trace_file_that_cannot_be_created_is_an_io_error() {
    let _turn = RECORDER.lock().unwrap();
    let path = std::path::Path::new("/nonexistent-directory/trace.csv");
    assert_eq!(start(path), GPUPOOL_ERR_IO);
    assert!(last_error().contains("cannot create"), "{}", last_error());
    // SAFETY: NULL is refused.
    assert_eq!(
        unsafe { gpupool_record_trace_start(std::ptr::null()) },
        GPUPOOL_ERR_INVALID_ARGUMENT
    );
}
