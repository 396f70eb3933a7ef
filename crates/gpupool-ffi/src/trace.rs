//! Trace recording: every allocation and free, in the format `gpupool replay` reads.
//!
//! `gpupool_record_trace_start(path)` creates the file and writes the `op,id,size,stream`
//! header; while it records, each successful allocation appends `a,<id>,<bytes>,<stream>` and
//! each free of an allocation made during the same recording appends `f,<id>,<bytes>,<stream>`
//! (the CLI's reader, `crates/gpupool-cli/src/replay/trace.rs`, refuses a free of an id it never
//! saw allocated, so frees of older allocations are left out). Ids count from 0 in each
//! recording; bytes are the requested bytes; the stream is the `cudaStream_t` as an integer
//! (0: the default stream), which the replay maps to streams of its own. Zero-byte and failed
//! allocations are not recorded (the reader refuses zero-byte allocations). The trace has no
//! device column: the events of every device go to the one file.
//!
//! Lines go through a buffered writer behind a mutex, flushed by
//! `gpupool_record_trace_stop`. While nothing records, allocations pay one relaxed atomic load;
//! while recording, every allocation and free also takes that mutex. A failed write stops the
//! recording; `stop` reports the error.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::boundary::lock;
use crate::errors::FfiError;
use crate::pointers::TraceTag;

/// The first line of every trace.
pub(crate) const HEADER: &str = "op,id,size,stream";

struct Recording {
    session: u64,
    path: PathBuf,
    writer: BufWriter<File>,
    next_id: u64,
    /// The first write error; recording stops at it.
    failed: Option<String>,
}

static RECORDING: AtomicBool = AtomicBool::new(false);
static ACTIVE: Mutex<Option<Recording>> = Mutex::new(None);
static SESSIONS: AtomicU64 = AtomicU64::new(0);

fn io_error(path: &Path, action: &str, error: std::io::Error) -> FfiError {
    FfiError::Io(format!("trace {}: {action}: {error}", path.display()))
}

/// Starts recording into a new file at `path` (replacing one that exists). Refused while a
/// recording is running.
pub fn start(path: &Path) -> Result<(), FfiError> {
    let mut active = lock(&ACTIVE);
    if let Some(recording) = active.as_ref() {
        return Err(FfiError::TooLate(format!(
            "a trace is already being recorded into {}; stop it first",
            recording.path.display()
        )));
    }
    let file = File::create(path).map_err(|error| io_error(path, "cannot create", error))?;
    let mut writer = BufWriter::with_capacity(1 << 16, file);
    writeln!(writer, "{HEADER}").map_err(|error| io_error(path, "cannot write", error))?;
    *active = Some(Recording {
        session: SESSIONS.fetch_add(1, Ordering::Relaxed) + 1,
        path: path.to_path_buf(),
        writer,
        next_id: 0,
        failed: None,
    });
    RECORDING.store(true, Ordering::Release);
    Ok(())
}

/// Stops recording and flushes the file. Stopping when nothing records is not an error.
pub fn stop() -> Result<(), FfiError> {
    let mut active = lock(&ACTIVE);
    RECORDING.store(false, Ordering::Release);
    let Some(mut recording) = active.take() else {
        return Ok(());
    };
    if let Some(failure) = recording.failed.take() {
        return Err(FfiError::Io(failure));
    }
    recording
        .writer
        .flush()
        .map_err(|error| io_error(&recording.path, "cannot flush", error))
}

/// Records an allocation; returns the tag its free will be recorded under, or `None` when
/// nothing records.
pub fn allocated(bytes: usize, stream: u64) -> Option<TraceTag> {
    if !RECORDING.load(Ordering::Relaxed) {
        return None;
    }
    let mut active = lock(&ACTIVE);
    let recording = active
        .as_mut()
        .filter(|recording| recording.failed.is_none())?;
    let id = recording.next_id;
    recording.next_id += 1;
    recording.write('a', id, bytes, stream);
    Some(TraceTag {
        session: recording.session,
        id,
    })
}

/// Records the free of an allocation recorded under `tag`, if its recording still runs.
pub fn freed(tag: TraceTag, bytes: usize, stream: u64) {
    let mut active = lock(&ACTIVE);
    if let Some(recording) = active
        .as_mut()
        .filter(|recording| recording.session == tag.session && recording.failed.is_none())
    {
        recording.write('f', tag.id, bytes, stream);
    }
}

impl Recording {
    fn write(&mut self, op: char, id: u64, bytes: usize, stream: u64) {
        if let Err(error) = writeln!(self.writer, "{op},{id},{bytes},{stream}") {
            let message = format!("trace {}: write failed: {error}", self.path.display());
            tracing::warn!("{message}; recording stopped");
            self.failed = Some(message);
            RECORDING.store(false, Ordering::Release);
        }
    }
}
