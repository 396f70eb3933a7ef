//! Arbitrary bytes into the trace reader of `gpupool replay`, plain and gzip-compressed.
//!
//! The reader is the CLI's own source file, compiled in here (the CLI is a binary crate with no
//! library to depend on; `crates/gpupool-ffi/tests/trace_format.rs` does the same). It must
//! never panic, hang or hold more than its bounds allow, and it must say the same thing about
//! a text whether it comes plain or compressed. Besides not crashing, each input checks:
//!
//! - a parsed trace is consistent: events = allocations + frees, live at the end = allocations
//!   − frees, every slot and stream index in range, the peak at least every allocation;
//! - an error names a line (1-based) and quotes at most `ECHO_CHARS` characters of the input,
//!   so its message stays short whatever the input (escaped, a quoted character may take up to
//!   ten);
//! - the gzip stream of the same bytes gives the same trace or the same error (unless the
//!   bytes already start with gzip's magic, which sends the plain run to the gzip path too).
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // the reader's API is larger than the target needs
#[path = "../../crates/gpupool-cli/src/replay/trace.rs"]
mod trace;

/// The longest error message: the fixed text with its numbers (under 200 characters) and one
/// quote of at most `ECHO_CHARS` characters of the input, which `{:?}` may escape to up to 10
/// characters each (`\u{10ffff}`), and the "…" that marks a cut.
const MAX_MESSAGE_CHARS: usize = 200 + 10 * trace::ECHO_CHARS + 1;

fn check(result: &Result<trace::Trace, trace::TraceError>) {
    match result {
        Ok(trace) => {
            assert_eq!(
                trace.allocations + trace.frees,
                trace.events.len() as u64,
                "every event is an allocation or a free"
            );
            assert_eq!(trace.live_at_end, trace.allocations - trace.frees);
            assert!(trace.slots as u64 <= trace.allocations);
            let mut last_line = 0;
            for event in &trace.events {
                assert!((event.slot as usize) < trace.slots);
                assert!((event.stream as usize) < trace.streams.len());
                assert!(event.bytes > 0);
                assert!(event.bytes <= trace.peak_live_bytes || event.op == trace::Op::Free);
                assert!(event.line > last_line, "lines increase");
                last_line = event.line;
            }
        }
        Err(error) => {
            assert!(error.line >= 1, "{error}");
            let chars = error.message.chars().count();
            assert!(chars <= MAX_MESSAGE_CHARS, "{chars} characters: {error}");
        }
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).expect("writing to a Vec");
    encoder.finish().expect("writing to a Vec")
}

fuzz_target!(|data: &[u8]| {
    // As given: plain text, or gzip (valid, truncated or corrupt) when it starts with the magic.
    let plain = trace::parse(data);
    check(&plain);
    // The same bytes compressed: the gzip path over a valid stream.
    let compressed = trace::parse(&gzip(data)[..]);
    check(&compressed);
    if !data.starts_with(&[0x1f, 0x8b]) {
        assert_eq!(plain, compressed, "plain and gzip readings differ");
    }
});
