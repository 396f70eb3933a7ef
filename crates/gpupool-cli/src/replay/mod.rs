//! `gpupool replay`: a recorded allocation trace through a `MemoryManager`.
//!
//! The trace is parsed and checked first ([`trace`]), then replayed, timed: each `a`
//! allocates a `PooledBuffer` of the requested bytes on the stream the trace names, each `f`
//! drops it. Time per operation covers that loop only; the statistics are read after it and
//! the buffers still live at the end are dropped after that. A replay of these traces takes a
//! few milliseconds, so one run is at the mercy of the machine's other work: the replay runs
//! `--runs` times (default 5), each on a fresh manager, and the median is reported, with the
//! fastest beside it. The statistics are the last run's (every run sees the same trace).
//! Peak requested live bytes come from the trace itself, peak reserved bytes from the pool,
//! and their ratio is the memory figure the peers in `shared/traces/README.md` report. The
//! result also carries the dated pool report of the last run (`--format json` prints it
//! whole; `--dashboard` renders it).
//!
//! With `--plot`, a further replay on a fresh manager samples `stats()` every N events (never in
//! a timed pass: a snapshot locks every shard) and [`plot`] draws the timeline; each point is
//! the highest value of its N events (see `Timeline`), so short peaks are not lost between
//! samples.
//!
//! `--backend sim`, the default, is an accounting-only device of 80 GiB, so traces larger
//! than this machine's memory replay anywhere (the two traces of `shared/traces` reserve at
//! most about 16 GiB).
//!
//! Streams: the trace's stream 0 is the default stream. On `sim` and `host` the other values
//! become `StreamId(1)`, `StreamId(2)`, ... in order of appearance (those backends have no
//! asynchronous user, the id only keys per-stream reuse); on `cuda` each gets a stream created
//! on the device. Maintenance is off, so nothing but the trace changes the pool.
#![forbid(unsafe_code)]

pub mod plot;
pub mod trace;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use gpupool::backend::cuda::{driver_call_profile, DriverCall, DriverCallCount};
use gpupool::dashboard::PoolReport;
use gpupool::{
    ratio, AllocOptions, Backend, MemoryManager, PoolConfig, PoolError, PooledBuffer, StreamId,
    WasteBreakdown,
};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::backend_choice::BackendName;
use crate::format::{bytes, bytes_exact, count, nanos, thousands};
use plot::Sample;
use trace::{Op, Trace};

/// Events from which a terminal gets a progress bar during the replay.
const PROGRESS_EVENTS: u64 = 2_000_000;
/// File size from which a terminal gets a progress bar while the trace is read.
const PROGRESS_FILE_BYTES: u64 = 16 << 20;
/// Events between progress updates (the timed loop runs in chunks of this many).
const CHUNK: usize = 4096;

/// Where class blocks of device memory come from, with virtual memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ClassBlocks {
    /// Carved out of an address range of their own (the default).
    #[default]
    Arena,
    /// Carved out of small pages among the large blocks (`shared_class_pages`).
    SharedPages,
    /// One backend allocation each (`cuMemAlloc`; `carve_class_blocks` off).
    Backend,
}

/// What to replay and how.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// The trace file (CSV, gzip or not).
    pub trace: PathBuf,
    /// The backend to allocate from.
    pub backend: BackendName,
    /// Size-class steps per doubling (1: the seed's powers of two).
    pub steps_per_doubling: usize,
    /// The seed's rules: every request in the size classes, 32 idle blocks per class.
    pub seed_rules: bool,
    /// `PoolConfig::reclaim_at_peak`.
    pub reclaim_at_peak: bool,
    /// Where class blocks come from (`PoolConfig::carve_class_blocks`, `shared_class_pages`).
    pub class_blocks: ClassBlocks,
    /// Where to draw the memory timeline, if anywhere.
    pub plot: Option<PathBuf>,
    /// Events between two timeline samples.
    pub plot_every: usize,
    /// Timed replays, each on a fresh manager; the median time is reported.
    pub runs: usize,
    /// The capacity of the `sim` device, where not its default 80 GiB.
    pub sim_capacity_bytes: Option<u64>,
}

/// The version of the JSON document's layout; raised when a field changes meaning or goes.
pub const SCHEMA_VERSION: u32 = 1;

/// The figures of one replay (the JSON output).
#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    /// The layout of this document ([`SCHEMA_VERSION`]); the nested `pool_report` carries its
    /// own.
    pub schema_version: u32,
    /// Events replayed.
    pub events: u64,
    /// Nanoseconds per event over the replay loop (the median run).
    pub ns_per_op: f64,
    /// hits / (hits + misses).
    pub hit_rate: f64,
    /// 1 − backend allocations / requests.
    pub allocation_reduction: f64,
    /// Backend allocations during the replay.
    pub backend_allocations: u64,
    /// The most requested bytes live at once, from the trace.
    pub peak_live_bytes: u64,
    /// The most bytes the pool reserved.
    pub peak_reserved_bytes: u64,
    /// peak reserved / peak live.
    pub peak_ratio: f64,
    /// Where reserved memory beyond the requested live bytes went while the pool held its peak,
    /// at the moment with the most requested bytes live (from an extra, untimed pass).
    pub waste_at_peak: WasteBreakdown,
    /// Requested live bytes at the pool's peak (the peak of the pool and the trace's peak of
    /// live bytes need not coincide).
    pub requested_live_at_peak: u64,
    /// The trace file.
    pub trace: String,
    /// The backend's name.
    pub backend: String,
    /// The device, as the backend names it.
    pub device: String,
    /// Size-class steps per doubling.
    pub steps_per_doubling: usize,
    /// Allocation events.
    pub allocations: u64,
    /// Free events.
    pub frees: u64,
    /// Buffers the trace never frees.
    pub live_at_end: u64,
    /// Requests above the largest class.
    pub bypasses: u64,
    /// Wall time of the median run's replay loop, milliseconds.
    pub replay_ms: f64,
    /// Timed runs.
    pub runs: usize,
    /// The fastest run, nanoseconds per event.
    pub ns_per_op_min: f64,
    /// The compact summary of the pool after the replay.
    pub summary: String,
    /// The timeline picture, if one was drawn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plot: Option<String>,
    /// With the CUDA backend: the driver calls of one timed run (the mean over the runs), by
    /// kind; where the time of misses goes on this machine.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub driver_calls: Vec<DriverCallsPerRun>,
    /// The dated pool report after the (last) timed run, with the buffers the trace never
    /// frees still live: health, recommendations and the whole statistics snapshot.
    pub pool_report: PoolReport,
}

/// Driver calls of one kind in one timed run (see `gpupool::backend::cuda::DriverCall`).
#[derive(Debug, Clone, Serialize)]
pub struct DriverCallsPerRun {
    /// The kind (`map`, `allocate`, `record_fence`, ...).
    pub call: &'static str,
    /// Calls per run.
    pub calls: f64,
    /// Their time per run, microseconds.
    pub micros: f64,
}

/// The driver calls of the timed replay loops (summed over `runs`), per run, by kind.
fn driver_calls_per_run(sums: &[DriverCallCount], runs: usize) -> Vec<DriverCallsPerRun> {
    let runs = runs.max(1) as f64;
    DriverCall::ALL
        .iter()
        .zip(sums)
        .filter(|(_, sum)| sum.calls > 0)
        .map(|(call, sum)| DriverCallsPerRun {
            call: call.name(),
            calls: sum.calls as f64 / runs,
            micros: sum.nanos as f64 / 1e3 / runs,
        })
        .collect()
}

/// Why a replay stopped.
#[derive(Debug)]
pub enum ReplayError {
    /// The trace file could not be opened.
    Open {
        /// The file.
        path: PathBuf,
        /// The system's reason.
        error: std::io::Error,
    },
    /// The trace is malformed.
    Trace {
        /// The file.
        path: PathBuf,
        /// What and where.
        error: trace::TraceError,
    },
    /// The pool could not be set up.
    Pool(PoolError),
    /// The pool refused an allocation of the trace.
    Allocation {
        /// The trace line.
        line: u64,
        /// Requested bytes.
        bytes: u64,
        /// The pool's reason.
        error: PoolError,
    },
    /// The timeline could not be drawn.
    Plot(String),
}

impl std::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplayError::Open { path, error } => {
                write!(f, "cannot open {}: {error}", path.display())
            }
            ReplayError::Trace { path, error } => write!(f, "{}: {error}", path.display()),
            ReplayError::Pool(error) => write!(f, "{error}"),
            ReplayError::Allocation { line, bytes, error } => write!(
                f,
                "trace line {line}: allocation of {} bytes failed: {error}",
                thousands(*bytes)
            ),
            ReplayError::Plot(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for ReplayError {}

impl From<PoolError> for ReplayError {
    fn from(error: PoolError) -> Self {
        ReplayError::Pool(error)
    }
}

/// A progress bar on stderr when it is a terminal and the work is long; hidden otherwise.
fn progress(length: u64, long: bool, message: &'static str) -> ProgressBar {
    if !long || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(length);
    if let Ok(style) = ProgressStyle::with_template("{msg} {wide_bar} {percent}% {eta}") {
        bar.set_style(style);
    }
    bar.set_message(message);
    bar
}

/// Reads and checks the trace at `path`.
pub fn read_trace(path: &Path) -> Result<Trace, ReplayError> {
    let file = std::fs::File::open(path).map_err(|error| ReplayError::Open {
        path: path.to_path_buf(),
        error,
    })?;
    let length = file.metadata().map_or(0, |metadata| metadata.len());
    let bar = progress(length, length >= PROGRESS_FILE_BYTES, "reading trace");
    let parsed = trace::parse(bar.wrap_read(file));
    bar.finish_and_clear();
    parsed.map_err(|error| ReplayError::Trace {
        path: path.to_path_buf(),
        error,
    })
}

/// The backend and one `StreamId` per stream value of the trace.
fn backend_and_streams(
    name: BackendName,
    sim_capacity_bytes: Option<u64>,
    trace: &Trace,
) -> Result<(Arc<dyn Backend>, Vec<StreamId>), ReplayError> {
    // With a sim capacity, CUDA falls through to `create`, which refuses the pair.
    #[cfg(feature = "cuda")]
    if name.resolve() == BackendName::Cuda && sim_capacity_bytes.is_none() {
        let cuda = gpupool::backend::cuda::CudaBackend::new(0)?;
        let streams = trace
            .streams
            .iter()
            .map(|&value| {
                if value == 0 {
                    Ok(StreamId::DEFAULT)
                } else {
                    cuda.create_stream()
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        return Ok((Arc::new(cuda), streams));
    }
    let mut next = 0;
    let streams = trace
        .streams
        .iter()
        .map(|&value| {
            if value == 0 {
                StreamId::DEFAULT
            } else {
                next += 1;
                StreamId(next)
            }
        })
        .collect();
    Ok((name.create(sim_capacity_bytes)?, streams))
}

fn manager(
    backend: &Arc<dyn Backend>,
    options: &ReplayOptions,
) -> Result<MemoryManager, PoolError> {
    let mut config = PoolConfig::builder()
        .steps_per_doubling(options.steps_per_doubling)
        .reclaim_at_peak(options.reclaim_at_peak)
        .carve_class_blocks(options.class_blocks != ClassBlocks::Backend)
        .shared_class_pages(options.class_blocks == ClassBlocks::SharedPages)
        .maintenance_interval(Duration::ZERO);
    if options.seed_rules {
        config = config
            .large_threshold_bytes(None)
            .max_idle_bytes_per_class(0)
            .release_idle_at_peak(false)
            .carve_class_blocks(false);
    }
    let config = config.build()?;
    MemoryManager::with_devices(vec![backend.clone()], config)
}

/// The buffers of a replay, by slot.
type LiveBuffers = Vec<Option<PooledBuffer<u8>>>;

/// What a replay loop reports as it goes. The timed pass uses [`Unobserved`], whose empty
/// methods compile away.
trait Observer {
    /// A buffer was allocated.
    fn allocated(&mut self, _buffer: &PooledBuffer<u8>) {}
    /// A buffer is about to be dropped.
    fn freeing(&mut self, _buffer: &PooledBuffer<u8>) {}
    /// `done` events have been replayed.
    fn replayed(&mut self, _done: usize) {}
}

/// Observes nothing: the timed pass.
struct Unobserved;

impl Observer for Unobserved {}

/// Builds the memory timeline: one [`Sample`] every `every` events, each holding the highest
/// value of its interval. Requested-live and in-use bytes are tracked per event from the
/// buffers themselves, so their maxima are exact; reserved bytes come from `stats()` at the
/// sample, raised to the interval's in-use maximum (reserved ≥ in use at every instant) and to
/// the pool's new peak when the interval set one, so every peak shows.
struct Timeline<'a> {
    manager: &'a MemoryManager,
    every: usize,
    events: usize,
    requested_live: u64,
    in_use: u64,
    max_requested_live: u64,
    max_in_use: u64,
    peak_reserved: u64,
    samples: Vec<Sample>,
}

impl Observer for Timeline<'_> {
    fn allocated(&mut self, buffer: &PooledBuffer<u8>) {
        self.requested_live += buffer.requested_bytes() as u64;
        self.in_use += buffer.block_bytes() as u64;
        self.max_requested_live = self.max_requested_live.max(self.requested_live);
        self.max_in_use = self.max_in_use.max(self.in_use);
    }

    fn freeing(&mut self, buffer: &PooledBuffer<u8>) {
        self.requested_live -= buffer.requested_bytes() as u64;
        self.in_use -= buffer.block_bytes() as u64;
    }

    fn replayed(&mut self, done: usize) {
        if !done.is_multiple_of(self.every) && done != self.events {
            return;
        }
        let totals = self.manager.stats().totals;
        let mut reserved = totals.reserved_bytes.max(self.max_in_use);
        if totals.peak_reserved_bytes > self.peak_reserved {
            self.peak_reserved = totals.peak_reserved_bytes;
            reserved = reserved.max(totals.peak_reserved_bytes);
        }
        self.samples.push(Sample {
            event: done as u64,
            requested_live_bytes: self.max_requested_live,
            in_use_bytes: self.max_in_use,
            reserved_bytes: reserved,
        });
        self.max_requested_live = self.requested_live;
        self.max_in_use = self.in_use;
    }
}

/// Explains the pool's peak: the snapshot of the moment the pool held its peak reserved bytes
/// with the most requested bytes live. Once reached, a peak usually stays held for the rest of
/// the trace (pages stay mapped), and the moment that raised it may have had few bytes live (a
/// page for class blocks mapped while large blocks were free): the moment with the most live
/// bytes explains the peak best. A snapshot is taken at each new peak, and again whenever the
/// live bytes pass those of the kept snapshot while the pool still holds its peak.
struct PeakWatch<'a> {
    manager: &'a MemoryManager,
    peak: u64,
    waste: WasteBreakdown,
    requested_live: u64,
    /// Requested live bytes now, tracked from the buffers.
    live_now: u64,
    /// The most live bytes already checked since the kept snapshot (one `stats()` per new
    /// record, not one per event while the pool holds less than its peak).
    live_checked: u64,
}

impl PeakWatch<'_> {
    fn keep(&mut self, stats: &gpupool::PoolStats) {
        self.waste = stats.waste();
        self.requested_live = stats.totals.requested_live_bytes;
    }
}

impl Observer for PeakWatch<'_> {
    fn allocated(&mut self, buffer: &PooledBuffer<u8>) {
        self.live_now += buffer.requested_bytes() as u64;
    }

    fn freeing(&mut self, buffer: &PooledBuffer<u8>) {
        self.live_now -= buffer.requested_bytes() as u64;
    }

    fn replayed(&mut self, _done: usize) {
        let peak = self.manager.peak_reserved_bytes();
        if peak > self.peak {
            self.peak = peak;
            self.live_checked = self.live_now;
            let stats = self.manager.stats();
            self.keep(&stats);
        } else if self.live_now > self.live_checked {
            self.live_checked = self.live_now;
            let stats = self.manager.stats();
            if stats.totals.reserved_bytes == peak {
                self.keep(&stats);
            }
        }
    }
}

/// Replays `trace` on `manager`, telling `observer`; returns the loop's wall time and the
/// buffers still live.
fn replay_loop(
    manager: &MemoryManager,
    trace: &Trace,
    streams: &[StreamId],
    bar: &ProgressBar,
    observer: &mut impl Observer,
) -> Result<(Duration, LiveBuffers), ReplayError> {
    let mut live: LiveBuffers = Vec::new();
    live.resize_with(trace.slots, || None);
    let start = Instant::now();
    let mut done = 0usize;
    for chunk in trace.events.chunks(CHUNK) {
        for event in chunk {
            let slot = &mut live[event.slot as usize];
            match event.op {
                Op::Allocate => {
                    let options = AllocOptions {
                        stream: streams[event.stream as usize],
                        ..AllocOptions::default()
                    };
                    let buffer = manager
                        .allocate_with::<u8>(event.bytes as usize, options)
                        .map_err(|error| ReplayError::Allocation {
                            line: event.line,
                            bytes: event.bytes,
                            error,
                        })?;
                    observer.allocated(&buffer);
                    *slot = Some(buffer);
                }
                Op::Free => {
                    if let Some(buffer) = slot.take() {
                        observer.freeing(&buffer);
                        drop(buffer);
                    }
                }
            }
            done += 1;
            observer.replayed(done);
        }
        bar.inc(chunk.len() as u64);
    }
    Ok((start.elapsed(), live))
}

/// Replays the trace of `options`; `observe` sees each manager before it is used (to serve
/// its metrics).
pub fn run(
    options: &ReplayOptions,
    observe: &dyn Fn(&MemoryManager),
) -> Result<ReplayReport, ReplayError> {
    let trace = read_trace(&options.trace)?;
    let (backend, streams) =
        backend_and_streams(options.backend, options.sim_capacity_bytes, &trace)?;
    let events = trace.events.len();

    let runs = options.runs.max(1);
    let replayed_events = (events as u64).saturating_mul(runs as u64);
    let bar = progress(
        replayed_events,
        replayed_events >= PROGRESS_EVENTS,
        "replaying",
    );
    let mut times = Vec::with_capacity(runs);
    let mut stats = None;
    let mut driver_calls = vec![DriverCallCount::default(); DriverCall::ALL.len()];
    for _ in 0..runs {
        let timed = manager(&backend, options)?;
        observe(&timed);
        let before = driver_call_profile();
        let (elapsed, live) = replay_loop(&timed, &trace, &streams, &bar, &mut Unobserved)?;
        for (sum, (before, after)) in driver_calls
            .iter_mut()
            .zip(before.iter().zip(&driver_call_profile()))
        {
            sum.calls += after.calls - before.calls;
            sum.nanos += after.nanos - before.nanos;
        }
        stats = Some(timed.stats());
        drop(live);
        times.push(elapsed);
    }
    bar.finish_and_clear();
    let driver_calls = driver_calls_per_run(&driver_calls, runs);
    let stats = stats.expect("at least one run");
    times.sort();
    let elapsed = times[times.len() / 2];

    let watched = manager(&backend, options)?;
    observe(&watched);
    let mut watch = PeakWatch {
        manager: &watched,
        peak: 0,
        waste: WasteBreakdown::default(),
        requested_live: 0,
        live_now: 0,
        live_checked: 0,
    };
    let bar = progress(events as u64, events as u64 >= PROGRESS_EVENTS, "peak");
    let (_, live) = replay_loop(&watched, &trace, &streams, &bar, &mut watch)?;
    bar.finish_and_clear();
    drop(live);
    let (waste_at_peak, requested_live_at_peak) = (watch.waste, watch.requested_live);
    drop(watched);

    let plot = match &options.plot {
        Some(path) => {
            let sampled = manager(&backend, options)?;
            observe(&sampled);
            let mut timeline = Timeline {
                manager: &sampled,
                every: options.plot_every.max(1),
                events,
                requested_live: 0,
                in_use: 0,
                max_requested_live: 0,
                max_in_use: 0,
                peak_reserved: 0,
                samples: vec![Sample {
                    event: 0,
                    requested_live_bytes: 0,
                    in_use_bytes: 0,
                    reserved_bytes: 0,
                }],
            };
            let bar = progress(events as u64, events as u64 >= PROGRESS_EVENTS, "sampling");
            let (_, live) = replay_loop(&sampled, &trace, &streams, &bar, &mut timeline)?;
            bar.finish_and_clear();
            drop(live);
            let title = format!(
                "{}: memory over the trace ({}, {} per doubling)",
                file_name(&options.trace),
                backend.name(),
                count(options.steps_per_doubling as u64, "size-class step")
            );
            plot::write_svg(path, &title, timeline.every, &timeline.samples)
                .map_err(ReplayError::Plot)?;
            Some(path.display().to_string())
        }
        None => None,
    };

    let totals = &stats.totals;
    Ok(ReplayReport {
        schema_version: SCHEMA_VERSION,
        events: events as u64,
        ns_per_op: if events == 0 {
            0.0
        } else {
            elapsed.as_nanos() as f64 / events as f64
        },
        hit_rate: totals.hit_rate,
        allocation_reduction: totals.allocation_reduction,
        backend_allocations: totals.backend_allocations,
        peak_live_bytes: trace.peak_live_bytes,
        peak_reserved_bytes: totals.peak_reserved_bytes,
        peak_ratio: ratio(totals.peak_reserved_bytes, trace.peak_live_bytes),
        waste_at_peak,
        requested_live_at_peak,
        trace: options.trace.display().to_string(),
        backend: backend.name().to_string(),
        device: backend.device_name(),
        steps_per_doubling: options.steps_per_doubling,
        allocations: trace.allocations,
        frees: trace.frees,
        live_at_end: trace.live_at_end,
        bypasses: totals.bypasses,
        replay_ms: elapsed.as_secs_f64() * 1e3,
        runs,
        ns_per_op_min: if events == 0 {
            0.0
        } else {
            times[0].as_nanos() as f64 / events as f64
        },
        summary: gpupool::dashboard::summary(&stats),
        plot,
        driver_calls,
        pool_report: PoolReport::new(stats, SystemTime::now()),
    })
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

/// The replay's figures as text.
pub fn render_text(report: &ReplayReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "gpupool replay: {} on {} ({}), {} per doubling",
        file_name(Path::new(&report.trace)),
        report.backend,
        report.device,
        count(report.steps_per_doubling as u64, "size-class step")
    );
    let rows = [
        (
            "Events",
            format!(
                "{} ({}, {}, {} live at the end)",
                thousands(report.events),
                count(report.allocations, "allocation"),
                count(report.frees, "free"),
                thousands(report.live_at_end)
            ),
        ),
        (
            "Time per operation",
            format!(
                "{} (replay loop only; median of {}, fastest {})",
                nanos(report.ns_per_op),
                count(report.runs as u64, "run"),
                nanos(report.ns_per_op_min)
            ),
        ),
        ("Hit rate", format!("{:.2}%", report.hit_rate * 100.0)),
        (
            "Allocation reduction",
            format!("{:.2}%", report.allocation_reduction * 100.0),
        ),
        (
            "Backend allocations",
            format!(
                "{} ({} bypassed the classes)",
                thousands(report.backend_allocations),
                thousands(report.bypasses)
            ),
        ),
        ("Peak live (trace)", bytes_exact(report.peak_live_bytes)),
        ("Peak reserved", bytes_exact(report.peak_reserved_bytes)),
        ("Peak reserved / live", format!("{:.3}", report.peak_ratio)),
    ];
    for (label, value) in rows {
        let _ = writeln!(out, "  {label:<22}{value}");
    }
    let waste = &report.waste_at_peak;
    let _ = writeln!(
        out,
        "  {:<22}{} beyond {} requested live:",
        "Waste at the peak",
        bytes(waste.total_bytes()),
        bytes(report.requested_live_at_peak)
    );
    for (label, part) in [
        ("rounding inside blocks", waste.rounding_bytes),
        ("idle class blocks", waste.class_cache_bytes),
        ("arena fragmentation", waste.fragmentation_bytes),
        ("page granularity", waste.page_granularity_bytes),
        ("held for streams", waste.held_for_streams_bytes),
    ] {
        let _ = writeln!(out, "    {label:<24}{}", bytes_exact(part));
    }
    if !report.driver_calls.is_empty() {
        let _ = writeln!(out, "  Driver calls per run (included in the time above):");
        for each in &report.driver_calls {
            let _ = writeln!(
                out,
                "    {:<24}{:.0} calls, {:.0} µs ({:.1} µs each)",
                each.call,
                each.calls,
                each.micros,
                each.micros / each.calls.max(1.0)
            );
        }
    }
    let _ = writeln!(out, "{}", report.summary);
    if let Some(plot) = &report.plot {
        let _ = writeln!(out, "Memory timeline: {plot}");
    }
    out
}
