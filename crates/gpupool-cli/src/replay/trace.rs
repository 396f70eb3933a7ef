//! The allocation trace format and its parser.
//!
//! A trace is CSV, optionally gzip-compressed (recognised by its magic bytes, whatever the file
//! is called), with an optional `op,id,size,stream` header:
//!
//! ```text
//! a,0,154389504,0      allocate buffer id 0: 154389504 bytes on stream 0
//! f,0,154389504,0      free buffer id 0
//! ```
//!
//! Parsing checks the whole trace before anything is replayed, so the timed replay loop has no
//! error path but the pool's own: a bad op, a bad number, a wrong field count, a zero-byte
//! allocation, an id allocated while live, a free of an unknown id or with another size than
//! its allocation, text that is not UTF-8 and truncated or corrupt gzip data are each an error
//! naming the line. Parsing also computes what the trace itself says: the peak of requested
//! live bytes.
//!
//! Lines are read with a bound of [`MAX_LINE_BYTES`]: a longer line is an error as soon as the
//! bound is passed, so a file that is one huge line (or a small gzip stream that inflates to
//! gigabytes without a newline) costs a few kilobytes of memory, not the size of the line. Error
//! messages quote at most [`ECHO_CHARS`] characters of the input, for the same reason.
//!
//! Buffer ids become dense *slots* (reused after a free), so the replay keeps its live buffers
//! in a `Vec` indexed by slot rather than a hash map keyed by id: the hashing is paid here,
//! once, and not inside the timed loop that measures the pool.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read};

use flate2::read::MultiGzDecoder;

/// What an event does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Allocate a buffer.
    Allocate,
    /// Free it.
    Free,
}

/// One line of the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Allocate or free.
    pub op: Op,
    /// The dense slot of the buffer id.
    pub slot: u32,
    /// Index into [`Trace::streams`].
    pub stream: u32,
    /// Requested bytes.
    pub bytes: u64,
    /// The line in the file (1-based).
    pub line: u64,
}

/// A parsed, checked trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trace {
    /// The events in order.
    pub events: Vec<Event>,
    /// How many slots the live buffers need at most.
    pub slots: usize,
    /// The distinct stream values, in order of first appearance.
    pub streams: Vec<u64>,
    /// Allocation events.
    pub allocations: u64,
    /// Free events.
    pub frees: u64,
    /// The most requested bytes live at once.
    pub peak_live_bytes: u64,
    /// Buffers never freed.
    pub live_at_end: u64,
}

/// Why a trace was refused, and where.
#[derive(Debug, PartialEq, Eq)]
pub struct TraceError {
    /// The 1-based line, where one applies.
    pub line: u64,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for TraceError {}

const HEADER: &str = "op,id,size,stream";
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];
/// The longest line accepted, newline excluded. A trace line is four numbers of at most twenty
/// digits and three commas; the rest is room for spaces and a `\r`.
pub const MAX_LINE_BYTES: usize = 4096;
/// How many characters of the input an error message quotes.
pub const ECHO_CHARS: usize = 80;

/// `text` as an error message quotes it: its first [`ECHO_CHARS`] characters, then "…" when
/// some were left out, so a message stays short whatever the input.
fn excerpt(text: &str) -> String {
    match text.char_indices().nth(ECHO_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

struct Live {
    slot: u32,
    bytes: u64,
    line: u64,
}

#[derive(Default)]
struct Builder {
    trace: Trace,
    live: HashMap<u64, Live>,
    free_slots: Vec<u32>,
    stream_index: HashMap<u64, u32>,
    live_bytes: u64,
}

fn number(field: &str, what: &str, line: u64) -> Result<u64, TraceError> {
    field.parse().map_err(|error| TraceError {
        line,
        message: format!("bad {what} {:?}: {error}", excerpt(field)),
    })
}

impl Builder {
    fn event(&mut self, text: &str, line: u64) -> Result<(), TraceError> {
        let fields: Vec<&str> = text.split(',').map(str::trim).collect();
        let [op, id, size, stream] = fields[..] else {
            return Err(TraceError {
                line,
                message: format!(
                    "expected 4 fields ({HEADER}), found {}: {:?}",
                    fields.len(),
                    excerpt(text)
                ),
            });
        };
        let op = match op {
            "a" => Op::Allocate,
            "f" => Op::Free,
            other => {
                return Err(TraceError {
                    line,
                    message: format!("bad op {:?}: expected \"a\" or \"f\"", excerpt(other)),
                })
            }
        };
        let id = number(id, "id", line)?;
        let bytes = number(size, "size", line)?;
        let stream = number(stream, "stream", line)?;
        if usize::try_from(bytes).is_err() {
            return Err(TraceError {
                line,
                message: format!("size {bytes} does not fit in this machine's address space"),
            });
        }
        let next_stream = self.stream_index.len() as u32;
        let stream_index = *self.stream_index.entry(stream).or_insert_with(|| {
            self.trace.streams.push(stream);
            next_stream
        });
        let slot = match op {
            Op::Allocate => {
                if bytes == 0 {
                    return Err(TraceError {
                        line,
                        message: format!("allocation of 0 bytes for id {id}"),
                    });
                }
                if let Some(earlier) = self.live.get(&id) {
                    return Err(TraceError {
                        line,
                        message: format!(
                            "id {id} allocated again while live (allocated at line {})",
                            earlier.line
                        ),
                    });
                }
                let slot = self.free_slots.pop().unwrap_or_else(|| {
                    self.trace.slots += 1;
                    (self.trace.slots - 1) as u32
                });
                self.live.insert(id, Live { slot, bytes, line });
                self.trace.allocations += 1;
                self.live_bytes += bytes;
                self.trace.peak_live_bytes = self.trace.peak_live_bytes.max(self.live_bytes);
                slot
            }
            Op::Free => {
                let Some(allocation) = self.live.remove(&id) else {
                    return Err(TraceError {
                        line,
                        message: format!(
                            "free of unknown id {id} (never allocated, or freed already)"
                        ),
                    });
                };
                if allocation.bytes != bytes {
                    return Err(TraceError {
                        line,
                        message: format!(
                            "free of id {id} with size {bytes}, but it was allocated with size {} at line {}",
                            allocation.bytes, allocation.line
                        ),
                    });
                }
                self.free_slots.push(allocation.slot);
                self.trace.frees += 1;
                self.live_bytes -= bytes;
                allocation.slot
            }
        };
        self.trace.events.push(Event {
            op,
            slot,
            stream: stream_index,
            bytes,
            line,
        });
        Ok(())
    }
}

/// Parses a trace from `input`, gzip-compressed or not (told by its first two bytes).
pub fn parse(input: impl Read) -> Result<Trace, TraceError> {
    let mut input = BufReader::new(input);
    let compressed = input
        .fill_buf()
        .map(|head| head.starts_with(&GZIP_MAGIC))
        .map_err(|error| TraceError {
            line: 1,
            message: format!("cannot read: {error}"),
        })?;
    if compressed {
        parse_lines(BufReader::new(MultiGzDecoder::new(input)), true)
    } else {
        parse_lines(input, false)
    }
}

/// Why [`read_bounded_line`] stopped short of a line.
enum LineError {
    /// The line is longer than [`MAX_LINE_BYTES`].
    TooLong,
    /// The input could not be read.
    Read(io::Error),
}

/// Reads the next line of `input` into `line` (cleared first, newline excluded), keeping at
/// most [`MAX_LINE_BYTES`] of it: the input is taken buffer by buffer through `fill_buf` and
/// `consume`, so a longer line is refused once the bound is passed, never held whole. Returns
/// `false` at the end of the input.
fn read_bounded_line(input: &mut impl BufRead, line: &mut Vec<u8>) -> Result<bool, LineError> {
    line.clear();
    loop {
        let available = match input.fill_buf() {
            Ok(available) => available,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(LineError::Read(error)),
        };
        if available.is_empty() {
            // The last line may lack its newline.
            return Ok(!line.is_empty());
        }
        let newline = available.iter().position(|&byte| byte == b'\n');
        let taken = newline.unwrap_or(available.len());
        if line.len() + taken > MAX_LINE_BYTES {
            return Err(LineError::TooLong);
        }
        line.extend_from_slice(&available[..taken]);
        match newline {
            Some(_) => {
                input.consume(taken + 1);
                return Ok(true);
            }
            None => input.consume(taken),
        }
    }
}

fn parse_lines(mut input: impl BufRead, compressed: bool) -> Result<Trace, TraceError> {
    let mut builder = Builder::default();
    let mut bytes = Vec::with_capacity(MAX_LINE_BYTES);
    let mut line = 0u64;
    loop {
        line += 1;
        match read_bounded_line(&mut input, &mut bytes) {
            Ok(false) => break,
            Ok(true) => {}
            Err(LineError::TooLong) => {
                return Err(TraceError {
                    line,
                    message: format!(
                        "line longer than {MAX_LINE_BYTES} bytes (a trace line is {HEADER}); \
                         is this a trace?"
                    ),
                })
            }
            Err(LineError::Read(error)) => {
                let message = match (error.kind(), compressed) {
                    (io::ErrorKind::UnexpectedEof, true) => {
                        "truncated gzip data (the file ends inside the compressed stream)"
                            .to_string()
                    }
                    (_, true) => format!("corrupt gzip data: {error}"),
                    (_, false) => format!("cannot read: {error}"),
                };
                return Err(TraceError { line, message });
            }
        }
        let Ok(text) = std::str::from_utf8(&bytes) else {
            return Err(TraceError {
                line,
                message: "not UTF-8 text".to_string(),
            });
        };
        let content = text.trim();
        if content.is_empty() || (builder.trace.events.is_empty() && content == HEADER) {
            continue;
        }
        builder.event(content, line)?;
    }
    builder.trace.live_at_end = builder.live.len() as u64;
    Ok(builder.trace)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn gzip(text: &str) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(text.as_bytes()).unwrap();
        encoder.finish().unwrap()
    }

    const SMALL: &str = "op,id,size,stream\na,0,1000,0\na,1,3000,7\nf,0,1000,0\na,2,500,0\n";

    #[test]
    fn a_trace_parses_into_slots_streams_and_its_peak() {
        let trace = parse(SMALL.as_bytes()).unwrap();
        assert_eq!(trace.events.len(), 4);
        assert_eq!(trace.slots, 2, "id 2 reuses the slot id 0 freed");
        assert_eq!(trace.events[3].slot, trace.events[0].slot);
        assert_eq!(trace.streams, [0, 7]);
        assert_eq!(trace.events[1].stream, 1);
        assert_eq!(trace.peak_live_bytes, 4000);
        assert_eq!(
            (trace.allocations, trace.frees, trace.live_at_end),
            (3, 1, 2)
        );
        assert_eq!(trace.events[3].line, 5);
        assert_eq!(parse(&gzip(SMALL)[..]).unwrap(), trace);
    }

    #[test]
    fn malformed_lines_are_errors_with_their_line() {
        let cases = [
            ("a,0,10,0\nx,1,10,0\n", 2, "bad op \"x\""),
            ("a,0,1o,0\n", 1, "bad size \"1o\""),
            ("a,-1,10,0\n", 1, "bad id \"-1\""),
            ("a,0,10\n", 1, "expected 4 fields"),
            ("a,0,10,0\nf,1,10,0\n", 2, "free of unknown id 1"),
            ("a,0,10,0\nf,0,10,0\nf,0,10,0\n", 3, "free of unknown id 0"),
            (
                "a,0,10,0\na,0,10,0\n",
                2,
                "allocated again while live (allocated at line 1)",
            ),
            (
                "a,0,10,0\nf,0,20,0\n",
                2,
                "allocated with size 10 at line 1",
            ),
            ("a,0,0,0\n", 1, "allocation of 0 bytes"),
            (
                "op,id,size,stream\na,0,10,0\nop,id,size,stream\n",
                3,
                "bad op \"op\"",
            ),
        ];
        for (text, line, message) in cases {
            let error = parse(text.as_bytes()).unwrap_err();
            assert_eq!(error.line, line, "{text:?}: {error}");
            assert!(error.message.contains(message), "{text:?}: {error}");
        }
        let error = parse(&b"a,0,10,0\na,1,\xff\xfe,0\n"[..]).unwrap_err();
        assert_eq!((error.line, error.message.as_str()), (2, "not UTF-8 text"));
    }

    #[test]
    fn truncated_and_corrupt_gzip_are_errors() {
        let text: String = (0..5000).map(|id| format!("a,{id},512,0\n")).collect();
        let compressed = gzip(&text);
        let error = parse(&compressed[..compressed.len() / 2]).unwrap_err();
        assert!(error.message.contains("truncated gzip"), "{error}");
        assert!(error.line > 1, "{error}");
        let mut corrupt = compressed.clone();
        corrupt[compressed.len() / 2] ^= 0xff;
        assert!(parse(&corrupt[..]).is_err());
        // Only the CRC and length trailer missing: the data is complete, the stream is not.
        assert!(parse(&compressed[..compressed.len() - 4]).is_err());
    }

    /// An endless stream: the same gzip member of zeros, over and over (a gzip file may hold
    /// several members; the parser reads them all as one text).
    struct EndlessGzipOfZeros {
        member: Vec<u8>,
        position: usize,
    }

    impl Read for EndlessGzipOfZeros {
        fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
            let rest = &self.member[self.position..];
            let count = rest.len().min(buffer.len());
            buffer[..count].copy_from_slice(&rest[..count]);
            self.position = (self.position + count) % self.member.len();
            Ok(count)
        }
    }

    #[test]
    fn c2_a_line_longer_than_the_bound_is_refused_without_reading_it_whole() {
        // An endless line: only a reader that stops at the bound returns at all.
        let error = parse(io::repeat(b'7')).unwrap_err();
        assert_eq!(error.line, 1, "{error}");
        assert!(error.message.contains("longer than 4096 bytes"), "{error}");
        // The same on a later line, which is named.
        let error = parse(b"a,0,10,0\n".chain(io::repeat(b' '))).unwrap_err();
        assert_eq!(error.line, 2, "{error}");
        // A line of exactly the bound is accepted (padding is trimmed).
        let mut padded = format!("a,0,10,0{}", " ".repeat(MAX_LINE_BYTES - 8));
        assert_eq!(padded.len(), MAX_LINE_BYTES);
        assert_eq!(parse(padded.as_bytes()).unwrap().events.len(), 1);
        padded.push(' ');
        assert!(parse(padded.as_bytes()).is_err());
    }

    #[test]
    fn c2_an_endless_gzip_stream_of_zeros_is_refused_at_the_first_line() {
        let zeros = vec![0u8; 1 << 20];
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&zeros).unwrap();
        let member = encoder.finish().unwrap();
        let endless = EndlessGzipOfZeros {
            member,
            position: 0,
        };
        let error = parse(endless).unwrap_err();
        assert_eq!(error.line, 1, "{error}");
        assert!(error.message.contains("longer than"), "{error}");
    }

    #[test]
    fn c2_error_messages_quote_at_most_80_characters_of_the_input() {
        let long_size = "9".repeat(2000);
        let long_op = "é".repeat(1500);
        let cases = [
            format!("a,0,{long_size},0\n"),
            format!("{long_op},0,10,0\n"),
            format!("{long_op}\n"),
        ];
        for text in cases {
            let error = parse(text.as_bytes()).unwrap_err();
            let message = error.to_string();
            assert!(message.chars().count() < 200, "{message}");
            assert!(message.contains('…'), "{message}");
        }
        assert_eq!(excerpt("short"), "short");
        assert_eq!(excerpt(&"x".repeat(ECHO_CHARS)), "x".repeat(ECHO_CHARS));
        assert_eq!(
            excerpt(&"ü".repeat(ECHO_CHARS + 1)),
            format!("{}…", "ü".repeat(ECHO_CHARS))
        );
    }

    #[test]
    fn empty_input_is_an_empty_trace() {
        assert_eq!(parse(&b""[..]).unwrap(), Trace::default());
        assert_eq!(
            parse(&b"op,id,size,stream\n"[..]).unwrap(),
            Trace::default()
        );
    }
}
