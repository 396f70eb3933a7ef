//! Stream safety under stress: a block is never handed to a new stream while work its previous
//! owner queued on another stream may still use it.
//!
//! The pool's rule (see `gpupool::fence`) is that a block dropped on stream A is reusable on
//! stream B only once a fence recorded on A *after the drop* has completed. A reported bug broke
//! it: on a miss the pool walks the cache shards one lock at a time and records one fence per
//! stream for the whole walk, so a block dropped into a shard the walk has not reached yet gets
//! a fence recorded *before* its owner's last work, and is handed to another stream as soon as
//! that older fence completes. Unit tests with manual fences cannot reach that interleaving;
//! only many threads on many streams can.
//!
//! So this module builds two things:
//!
//! - [`StreamModel`], a backend that keeps the sim device's ledger for allocation and models
//!   asynchronous streams exactly: per stream a count of queued work tickets (`submitted`) and
//!   of finished ones (`completed`, advanced by a "GPU" thread in small random steps). A fence
//!   captures `submitted` when it is recorded and is complete once `completed` reaches it, so
//!   a fence covers precisely the work queued before it, no more and no less.
//! - An ownership checker: every buffer "uses" its block by launching one ticket of work on its
//!   stream, and a table keyed by device address remembers the last owner's stream and ticket.
//!   When a block comes back on another stream, that ticket must already be complete; otherwise
//!   the new owner could overwrite memory the old stream's kernel still reads. The sim device
//!   never reuses an address, so an address names one block for the whole run.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use gpupool::backend::sim::SimBackend;
use gpupool::backend::{BackendError, MemoryInfo, StreamOrdered};
use gpupool::fence::Fence;
use gpupool::{
    AllocOptions, Backend, Block, MemoryKind, MemoryManager, PoolConfig, PooledBuffer, StreamId,
    TrimLevel, BLOCK_ALIGN,
};

use crate::common::assert_consistent;

const KIB: usize = 1024;

/// SplitMix64: a reproducible per-thread sequence is all the stress needs, without `rand`.
struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for one thread of one run, so every run and thread draws its own sequence.
    fn for_thread(run_seed: u64, thread: usize) -> SplitMix64 {
        let mut seeder = SplitMix64(run_seed ^ 0x5851_f42d_4c95_7f2d);
        let base = seeder.next();
        SplitMix64(base.wrapping_add((thread as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        mixed ^ (mixed >> 31)
    }

    /// A draw in `0..bound` (the modulo bias is irrelevant here).
    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

/// Work tickets per stream: how many were queued and how many the "GPU" has finished.
struct StreamClocks {
    submitted: Vec<AtomicU64>,
    completed: Vec<AtomicU64>,
}

impl StreamClocks {
    fn index(&self, stream: StreamId) -> usize {
        let index = stream.0 as usize;
        assert!(
            index < self.submitted.len(),
            "stream {} is outside the model's {} streams",
            stream.0,
            self.submitted.len()
        );
        index
    }
}

/// A fence that completes once its stream has finished every ticket queued before it.
struct TicketFence {
    clocks: Arc<StreamClocks>,
    stream: usize,
    ticket: u64,
}

impl Fence for TicketFence {
    fn is_complete(&self) -> bool {
        self.clocks.completed[self.stream].load(Ordering::SeqCst) >= self.ticket
    }
}

/// The sim device's ledger with exactly modelled asynchronous streams; clones share both, so
/// the test keeps one to launch and finish work while the pool owns another.
#[derive(Clone)]
struct StreamModel {
    sim: SimBackend,
    clocks: Arc<StreamClocks>,
    fences_recorded: Arc<AtomicU64>,
    /// Whether `record_fence` gives up the CPU, as a real driver call may (see
    /// `StressSettings::fence_record_yields`).
    fence_record_yields: bool,
}

impl StreamModel {
    /// Streams `StreamId(0)..StreamId(streams)` over a fresh sim device.
    fn new(streams: usize, fence_record_yields: bool) -> StreamModel {
        StreamModel {
            // 80 GiB by default: far more than the stress ever holds, so no out-of-memory
            // recovery (which synchronises everything) hides a wrong hand-out.
            sim: SimBackend::default(),
            clocks: Arc::new(StreamClocks {
                submitted: (0..streams).map(|_| AtomicU64::new(0)).collect(),
                completed: (0..streams).map(|_| AtomicU64::new(0)).collect(),
            }),
            fences_recorded: Arc::new(AtomicU64::new(0)),
            fence_record_yields,
        }
    }

    fn streams(&self) -> usize {
        self.clocks.submitted.len()
    }

    /// Queues one unit of work on `stream` and returns its ticket (1 for the first).
    fn launch(&self, stream: StreamId) -> u64 {
        let index = self.clocks.index(stream);
        self.clocks.submitted[index].fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The last ticket finished on `stream`.
    fn completed(&self, stream: StreamId) -> u64 {
        self.clocks.completed[self.clocks.index(stream)].load(Ordering::SeqCst)
    }

    /// Tickets queued on `stream` and not finished yet.
    fn outstanding(&self, stream: StreamId) -> u64 {
        let index = self.clocks.index(stream);
        let completed = self.clocks.completed[index].load(Ordering::SeqCst);
        self.clocks.submitted[index]
            .load(Ordering::SeqCst)
            .saturating_sub(completed)
    }

    /// Finishes up to `tickets` more tickets on `stream`, never past what was queued and never
    /// backwards (a concurrent `synchronize` may have finished more than our `submitted`).
    fn complete_some(&self, stream: StreamId, tickets: u64) {
        let index = self.clocks.index(stream);
        let submitted = self.clocks.submitted[index].load(Ordering::SeqCst);
        let _ = self.clocks.completed[index].fetch_update(
            Ordering::SeqCst,
            Ordering::SeqCst,
            |completed| {
                Some(
                    completed
                        .saturating_add(tickets)
                        .min(submitted)
                        .max(completed),
                )
            },
        );
    }
}

impl Backend for StreamModel {
    fn name(&self) -> &str {
        "stream-model"
    }
    fn kinds(&self) -> &[MemoryKind] {
        self.sim.kinds()
    }
    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        self.sim.allocate(bytes, kind)
    }
    fn release(&self, block: Block) {
        self.sim.release(block)
    }
    fn memory_info(&self) -> Option<MemoryInfo> {
        self.sim.memory_info()
    }
    fn stream_ordered(&self) -> Option<&dyn StreamOrdered> {
        Some(self)
    }
}

impl StreamOrdered for StreamModel {
    fn record_fence(&self, stream: StreamId) -> Result<Arc<dyn Fence>, BackendError> {
        let index = self.clocks.index(stream);
        self.fences_recorded.fetch_add(1, Ordering::Relaxed);
        if self.fence_record_yields {
            std::thread::yield_now();
        }
        Ok(Arc::new(TicketFence {
            clocks: self.clocks.clone(),
            stream: index,
            ticket: self.clocks.submitted[index].load(Ordering::SeqCst),
        }))
    }
    fn synchronize(&self) -> Result<(), BackendError> {
        // Counted in the sim ledger too, so a report can show whether recovery ran.
        self.sim
            .stream_ordered()
            .map_or(Ok(()), |sim| sim.synchronize())?;
        for (submitted, completed) in self.clocks.submitted.iter().zip(&self.clocks.completed) {
            completed.fetch_max(submitted.load(Ordering::SeqCst), Ordering::SeqCst);
        }
        Ok(())
    }
    fn wait_for_stream(&self, _stream: StreamId) -> Result<(), BackendError> {
        Ok(())
    }
}

/// What the checker remembers of a block's last owner.
#[derive(Clone, Copy)]
struct LastUse {
    stream: StreamId,
    /// The ticket of the last work that owner launched using the block.
    ticket: u64,
    /// Whether a buffer holds the block now (a second hand-out while held is a violation too).
    held: bool,
}

/// A block handed out while work that may use it was still queued elsewhere.
#[derive(Clone, Debug)]
struct Violation {
    address: u64,
    block_bytes: usize,
    thread: usize,
    operation: usize,
    new_stream: StreamId,
    previous_stream: StreamId,
    previous_ticket: u64,
    /// The previous stream's finished ticket when the block was handed out.
    previous_completed: u64,
    /// The block was still held by another buffer.
    still_held: bool,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.still_held {
            return write!(
                f,
                "thread {} op {}: block {:#x} ({} B) handed out on stream {} while a buffer on \
                 stream {} still held it",
                self.thread,
                self.operation,
                self.address,
                self.block_bytes,
                self.new_stream.0,
                self.previous_stream.0
            );
        }
        write!(
            f,
            "thread {} op {}: block {:#x} ({} B) handed to stream {} while stream {} had \
             finished ticket {} of the {} that last used it",
            self.thread,
            self.operation,
            self.address,
            self.block_bytes,
            self.new_stream.0,
            self.previous_stream.0,
            self.previous_completed,
            self.previous_ticket
        )
    }
}

/// Lock shards of the ownership table: one mutex for 16 threads would serialise them on the
/// checker and hide the very interleavings the stress is after.
const TABLE_SHARDS: usize = 64;

/// The ownership table and what it found.
struct OwnershipChecker {
    table: Vec<Mutex<HashMap<u64, LastUse>>>,
    violations: Mutex<Vec<Violation>>,
    cross_stream_handouts: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl OwnershipChecker {
    fn new() -> OwnershipChecker {
        OwnershipChecker {
            table: (0..TABLE_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            violations: Mutex::new(Vec::new()),
            cross_stream_handouts: AtomicU64::new(0),
        }
    }

    fn slot(&self, address: u64) -> MutexGuard<'_, HashMap<u64, LastUse>> {
        lock(&self.table[(address / BLOCK_ALIGN as u64) as usize % TABLE_SHARDS])
    }

    /// Checks a fresh hand-out against the block's last owner, then "uses" the block: launches
    /// one ticket of work on the buffer's stream and records it as the block's last use.
    fn take_and_use(
        &self,
        model: &StreamModel,
        buffer: &PooledBuffer<u8>,
        thread: usize,
        operation: usize,
    ) {
        let address = buffer.device_address();
        let stream = buffer.stream();
        let mut slot = self.slot(address);
        if let Some(last) = slot.get(&address).copied() {
            // Same-stream reuse needs no wait: work on one stream runs in order.
            let cross_stream = last.stream != stream;
            if cross_stream {
                self.cross_stream_handouts.fetch_add(1, Ordering::Relaxed);
            }
            // `completed` only grows, so reading it after the pool's fence check can only
            // excuse a hand-out, never accuse a correct one.
            let previous_completed = model.completed(last.stream);
            if last.held || (cross_stream && previous_completed < last.ticket) {
                lock(&self.violations).push(Violation {
                    address,
                    block_bytes: buffer.block_bytes(),
                    thread,
                    operation,
                    new_stream: stream,
                    previous_stream: last.stream,
                    previous_ticket: last.ticket,
                    previous_completed,
                    still_held: last.held,
                });
            }
        }
        // Queued while this buffer owns the block, before its drop, as a real kernel launch
        // is; the next owner can only get the block after that drop, so it sees this ticket.
        let ticket = model.launch(stream);
        slot.insert(
            address,
            LastUse {
                stream,
                ticket,
                held: true,
            },
        );
    }

    /// Marks the block free; must run before the buffer drops, because after the drop the
    /// block may go to another thread at once.
    fn release(&self, buffer: &PooledBuffer<u8>) {
        let address = buffer.device_address();
        if let Some(last) = self.slot(address).get_mut(&address) {
            last.held = false;
        }
    }
}

/// The knobs of one stress run.
#[derive(Clone, Debug)]
struct StressSettings {
    threads: usize,
    streams: usize,
    shards: usize,
    operations_per_thread: usize,
    /// Request sizes: all below the 1 MiB large threshold, so every block lives in a class.
    sizes: Vec<usize>,
    /// Blocks dropped above the cap are released, so a lower cap means more misses (and more
    /// fence walks); 32 is the pool's default.
    max_idle_per_class: usize,
    /// Buffers a thread holds at once before it drops one at random.
    held_per_thread: usize,
    /// Pause between trims from the trimming thread.
    trim_period: Duration,
    /// Pause between the "GPU" thread's completion steps.
    gpu_tick: Duration,
    /// Yield the CPU in every `record_fence`. A real fence is a driver call (`cuEventRecord`
    /// costs microseconds), during which other threads run, launch work and drop blocks; the
    /// pool must be right however long it takes. Without the yield a race around fence
    /// recording needs the recording thread to be preempted at the wrong moment; with it, the
    /// window opens on most misses. (On the unfixed walk it turned 0 to 5 violations per run,
    /// most runs clean, into 2 to 24, no run clean.)
    fence_record_yields: bool,
}

impl Default for StressSettings {
    fn default() -> Self {
        StressSettings {
            threads: 16,
            streams: 4,
            shards: 16,
            operations_per_thread: if cfg!(miri) { 50 } else { 16_000 },
            sizes: vec![256, KIB, 4 * KIB, 16 * KIB, 64 * KIB],
            max_idle_per_class: 32,
            held_per_thread: 4,
            trim_period: Duration::from_millis(2),
            gpu_tick: Duration::from_micros(50),
            fence_record_yields: true,
        }
    }
}

/// What one run saw.
struct StressOutcome {
    violations: Vec<Violation>,
    handouts: u64,
    misses: u64,
    cross_stream_handouts: u64,
    fences_recorded: u64,
    elapsed: Duration,
}

/// Runs the stress once: workers allocate, check, use and drop buffers on random streams while
/// a "GPU" thread finishes work slowly and a trimming thread releases idle blocks.
fn run_stress(settings: &StressSettings, run_seed: u64) -> StressOutcome {
    let model = StreamModel::new(settings.streams, settings.fence_record_yields);
    let config = PoolConfig::builder()
        .shards(settings.shards)
        .max_idle_per_class(settings.max_idle_per_class)
        .min_idle_per_class(settings.max_idle_per_class.min(4))
        // Pure block caps: the byte allowance would let the small classes cache thousands.
        .max_idle_bytes_per_class(0)
        .maintenance_interval(Duration::ZERO)
        .build()
        .expect("valid stress configuration");
    let manager = MemoryManager::with_config(model.clone(), config).expect("manager");
    let checker = OwnershipChecker::new();
    let workers_done = AtomicBool::new(false);
    let start = Instant::now();

    std::thread::scope(|scope| {
        // The "GPU" (seeded as one more thread): finishes a random part of each stream's queue
        // per tick, so completion trails submission a little and a fence recorded too early
        // completes while the work it should have covered is still queued.
        scope.spawn(|| {
            let mut random = SplitMix64::for_thread(run_seed, settings.threads);
            while !workers_done.load(Ordering::Relaxed) {
                for stream in (0..model.streams()).map(|s| StreamId(s as u64)) {
                    let outstanding = model.outstanding(stream);
                    let step = random.below(outstanding as usize / 4 + 2) as u64;
                    model.complete_some(stream, step);
                }
                std::thread::sleep(settings.gpu_tick);
            }
        });
        scope.spawn(|| {
            while !workers_done.load(Ordering::Relaxed) {
                std::thread::sleep(settings.trim_period);
                manager.trim(TrimLevel::Normal);
            }
        });
        let workers: Vec<_> = (0..settings.threads)
            .map(|thread| {
                let (manager, model, checker) = (&manager, &model, &checker);
                scope.spawn(move || {
                    let mut random = SplitMix64::for_thread(run_seed, thread);
                    let mut held: Vec<PooledBuffer<u8>> = Vec::new();
                    for operation in 0..settings.operations_per_thread {
                        let stream = StreamId(random.below(settings.streams) as u64);
                        let bytes = settings.sizes[random.below(settings.sizes.len())];
                        let options = AllocOptions {
                            stream,
                            ..AllocOptions::default()
                        };
                        let buffer = manager
                            .allocate_with::<u8>(bytes, options)
                            .expect("the stress never exhausts the device");
                        checker.take_and_use(model, &buffer, thread, operation);
                        held.push(buffer);
                        if held.len() > settings.held_per_thread {
                            let victim = held.swap_remove(random.below(held.len()));
                            checker.release(&victim);
                            drop(victim);
                        }
                    }
                    for buffer in held {
                        checker.release(&buffer);
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("worker panicked");
        }
        workers_done.store(true, Ordering::Relaxed);
    });
    let elapsed = start.elapsed();

    let stats = manager.stats();
    assert_consistent(&stats, &model.sim);
    // With the GPU caught up, everything idle can go, deferred releases included.
    model.synchronize().expect("model synchronises");
    manager.trim(TrimLevel::Aggressive);
    assert_eq!(
        model.sim.counters().live_allocations,
        0,
        "blocks still live after every buffer dropped and an aggressive trim"
    );
    assert_consistent(&manager.stats(), &model.sim);

    StressOutcome {
        violations: checker
            .violations
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner),
        handouts: stats.totals.requests,
        misses: stats.totals.misses,
        cross_stream_handouts: checker.cross_stream_handouts.load(Ordering::Relaxed),
        fences_recorded: model.fences_recorded.load(Ordering::Relaxed),
        elapsed,
    }
}

fn report(run: u64, outcome: &StressOutcome) {
    println!(
        "run {run}: {} violations in {} hand-outs ({} misses, {} across streams, {} fences) \
         in {:.2?}",
        outcome.violations.len(),
        outcome.handouts,
        outcome.misses,
        outcome.cross_stream_handouts,
        outcome.fences_recorded,
        outcome.elapsed
    );
    for violation in outcome.violations.iter().take(5) {
        println!("  {violation}");
    }
}

/// One run of the stress at the default settings: 16 threads on 4 streams, 16 shards.
#[test]
fn sixteen_threads_on_four_streams_never_hand_a_block_to_another_stream_before_its_work_completes()
{
    let outcome = run_stress(&StressSettings::default(), 1);
    report(1, &outcome);
    if !cfg!(miri) {
        assert!(
            outcome.cross_stream_handouts > 0,
            "no block ever changed stream: the stress checked nothing"
        );
    }
    assert!(
        outcome.violations.is_empty(),
        "{} blocks were handed to another stream before their work completed; first: {}",
        outcome.violations.len(),
        outcome.violations[0]
    );
}

/// Counts violations over ten seeds; for watching a fix land:
/// `cargo test -p gpupool --test all stream_safety -- --ignored --nocapture`.
#[test]
#[ignore = "ten stress runs; run on demand"]
fn stress_runs_report_violations() {
    let settings = StressSettings::default();
    println!("{settings:?}");
    let per_run: Vec<usize> = (1..=10)
        .map(|run| {
            let outcome = run_stress(&settings, run);
            report(run, &outcome);
            outcome.violations.len()
        })
        .collect();
    println!("violations per run: {per_run:?}");
    assert!(
        per_run.iter().all(|&violations| violations == 0),
        "violations per run: {per_run:?}"
    );
}
