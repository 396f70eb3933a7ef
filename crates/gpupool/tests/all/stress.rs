//! Stress and faults (issue 13): many threads of random operations against one pool, with
//! injected device faults, budgets, asynchronous fences and virtual memory, checked while they
//! run and after.
//!
//! Each worker thread draws random operations: allocations of 1 B to 4 MiB (skewed to small
//! sizes, with the class, arena and page edges) on any of 4 streams and any device, drops,
//! hand-offs of live buffers to other threads (which drop them or record streams on them),
//! `record_stream` and `used_by`, trims, clears, defragmentation, maintenance, prewarms,
//! snapshots, and rarely pooling off and on again. A "GPU" thread completes fences at random
//! intervals, and a sampler thread takes snapshots every few milliseconds.
//!
//! Checked during the run:
//!
//! - every snapshot (sampler and workers) satisfies the identities of
//!   `common::assert_consistent` that involve the snapshot alone (a snapshot holds every lock,
//!   so they are exact under concurrency too), its counters never go backwards, the peak is at
//!   least what is reserved, and with a budget no device holds more than the budget (the
//!   snapshot's reserved plus pending bytes, and the device's own ledger read directly);
//! - every buffer handed out holds its request, on the stream, device and kind asked for, and
//!   overlaps no other live buffer of its device (a concurrent interval map, checked on each
//!   insertion);
//! - every failed allocation or prewarm is a clean error of a kind the setup can produce
//!   (never a panic: a panicking worker is reported as a violation), and so is every refused
//!   host access (only when its wait for the stream failed);
//! - on asynchronous devices, against a model of the work queued on each stream
//!   ([`StreamWork`]): no block is released or unmapped, handed out on another stream, or read
//!   by the host after its first access waited for its stream, while work of a previous owner
//!   may still use it (except as the manager drops: after a failed wait it releases everything
//!   all the same, by design);
//! - on host-visible memory, every buffer carries a pattern derived from its owner (thread,
//!   sequence number) from allocation to drop, and with `zero_on_reuse` every buffer starts
//!   zeroed.
//!
//! Checked after the run: with every buffer dropped, the pool holds nothing in use, counted
//! every request and failure the workers saw, agrees with the device's ledger, gives
//! everything back on a clear; after the manager is dropped (before or after the buffers) the
//! device holds no allocation and saw no invalid release.
//!
//! The sim device holds no memory (its blocks have no host pointer), so the data checks run on
//! [`HostDevice`]: host memory with the sim's ledger, injected faults and asynchronous fences
//! rebuilt around it. The sim runs carry virtual memory and the device's capacity. The sim
//! injects faults only into allocations and mappings; [`FlakyFences`] wraps either device to
//! make fence recordings, `synchronize` and `wait_for_stream` fail too (the pool must then
//! synchronise, record later, keep blocks deferred or refuse host access; a failed wait waits
//! for nothing, and the work it was for stays unfinished in the model).
//!
//! `stress_*` tests run in CI in a few seconds; `stress_long` (ignored) is the long run,
//! parameterised by `GPUPOOL_STRESS_THREADS` (default 16), `GPUPOOL_STRESS_OPS` (operations
//! in all, over every thread; default 10^7), `GPUPOOL_STRESS_SETUPS` (comma-separated names
//! of `long_setups`, default all) and `GPUPOOL_STRESS_SEED`:
//!
//! ```text
//! cargo test --release -p gpupool --test all stress_long -- --ignored --nocapture
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use gpupool::backend::host::HostBackend;
use gpupool::backend::sim::{FaultKind, FaultPlan, SimBackend, SimConfig};
use gpupool::backend::{
    BackendError, MemoryInfo, PoolAccess, StreamOrdered, VirtualMemory, Zeroing,
};
use gpupool::fence::Fence;
use gpupool::{
    AllocOptions, Backend, Block, MemoryKind, MemoryManager, PoolConfig, PoolError, PoolStats,
    PooledBuffer, StreamId, TrimLevel,
};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
/// Streams the workers use: `StreamId(0)..StreamId(STREAMS)`.
const STREAMS: u64 = 4;
/// Live buffers a worker keeps at most (it drops one instead of allocating beyond).
const MAX_LIVE: usize = 48;
/// Buffers waiting in the hand-off between threads at most.
const MAX_EXCHANGE: usize = 64;
/// The first violations are kept, with their messages, for the report.
const KEPT_VIOLATIONS: usize = 20;

/// SplitMix64: a reproducible per-thread sequence is all the stress needs, without `rand`.
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut mixed = self.0;
        mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        mixed ^ (mixed >> 31)
    }

    /// A draw in `0..bound` (the modulo bias is irrelevant here).
    pub(crate) fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound.max(1) as u64) as usize
    }

    pub(crate) fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

// ---------------------------------------------------------------------------------------------
// The setups.

/// Which device the pool runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceChoice {
    /// The sim: capacity, faults, fences, virtual memory; no host memory.
    Sim,
    /// [`HostDevice`]: host memory (data checks), faults, fences; no virtual memory.
    Host,
}

/// How a run ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Teardown {
    /// Drop every buffer, check the pool at rest, clear, then drop the manager.
    DropBuffersFirst,
    /// Drop the manager while buffers are alive: the last buffer releases everything.
    BuffersOutlive,
}

/// One stress configuration.
#[derive(Clone, Debug)]
struct Setup {
    name: &'static str,
    device: DeviceChoice,
    devices: usize,
    threads: usize,
    /// Operations per worker thread.
    ops_per_thread: u64,
    /// Per device.
    budget: Option<u64>,
    capacity: u64,
    /// Chance that a device allocation (or mapping) fails, injected.
    fault_probability: f64,
    /// Chance that recording a fence (the pool synchronises instead), a `synchronize` or a
    /// `wait_for_stream` fails, injected, each ([`FlakyFences`]).
    fence_fault_probability: f64,
    fault_kind: FaultKind,
    virtual_memory: bool,
    asynchronous: bool,
    /// Longest pause of the "GPU" thread between completing fences.
    gpu_period: Duration,
    zero_on_reuse: bool,
    carve_class_blocks: bool,
    reclaim_at_peak: bool,
    steps_per_doubling: usize,
    /// Cache shards per class (`None`: the default, four per core).
    shards: Option<usize>,
    /// Idle caps (blocks per class, byte allowance, kept by a normal trim); `None`: defaults.
    idle_caps: Option<(usize, usize, usize)>,
    /// Background maintenance period (`ZERO`: none).
    maintenance: Duration,
    max_request: usize,
    teardown: Teardown,
    seed: u64,
}

impl Setup {
    fn base(name: &'static str, device: DeviceChoice) -> Setup {
        Setup {
            name,
            device,
            devices: 1,
            threads: 8,
            ops_per_thread: 1_000,
            budget: None,
            capacity: 80 << 30,
            fault_probability: 0.0,
            fence_fault_probability: 0.0,
            fault_kind: FaultKind::OutOfMemory,
            virtual_memory: false,
            asynchronous: true,
            gpu_period: Duration::from_micros(500),
            zero_on_reuse: false,
            carve_class_blocks: false,
            reclaim_at_peak: false,
            steps_per_doubling: 1,
            shards: None,
            idle_caps: None,
            maintenance: Duration::ZERO,
            max_request: 4 * MIB,
            teardown: Teardown::DropBuffersFirst,
            seed: 0x6770_7570_6f6f_6c13,
        }
    }

    /// Two sim devices with a budget each, virtual memory (reclaiming at the peak), 2 % of
    /// allocations and mappings failing as out of memory, 2 % of fence recordings and waits
    /// failing, tight idle caps, background maintenance.
    fn budget_faults_virtual_memory() -> Setup {
        Setup {
            devices: 2,
            // A snapshot walks the arena's pages (twice the capacity): a smaller device keeps
            // the sampler's snapshots, which hold every lock, short.
            capacity: 4 << 30,
            budget: Some(64 * MIB as u64),
            fault_probability: 0.02,
            fence_fault_probability: 0.02,
            fault_kind: FaultKind::OutOfMemory,
            virtual_memory: true,
            reclaim_at_peak: true,
            // Tight caps: blocks go back at the cap on many drops.
            idle_caps: Some((2, 0, 1)),
            shards: Some(2),
            maintenance: Duration::from_millis(3),
            ..Setup::base("sim-budget-faults-vm", DeviceChoice::Sim)
        }
    }

    /// A sim without budget or virtual memory (segments for large requests), 1 % of
    /// allocations failing with a driver error, finer classes, one shard, zeroing; the manager
    /// drops before the buffers.
    fn no_budget_segments() -> Setup {
        Setup {
            fault_probability: 0.01,
            fault_kind: FaultKind::DriverError,
            steps_per_doubling: 4,
            // Every thread on one shard per class; zeroing in stream order (the sim's).
            shards: Some(1),
            zero_on_reuse: true,
            teardown: Teardown::BuffersOutlive,
            ..Setup::base("sim-nobudget-segments", DeviceChoice::Sim)
        }
    }

    /// A small sim device whose capacity, not a budget, runs out (the out-of-memory retry),
    /// with virtual memory, class blocks carved out of the arena, a slow GPU, 64 shards.
    fn small_device_carved() -> Setup {
        Setup {
            capacity: 160 * MIB as u64,
            fault_probability: 0.005,
            virtual_memory: true,
            carve_class_blocks: true,
            shards: Some(64),
            gpu_period: Duration::from_millis(3),
            ..Setup::base("sim-capacity-carved", DeviceChoice::Sim)
        }
    }

    /// Host memory (data checks) with a budget, zeroing, 2 % driver faults on allocations,
    /// fence recordings and waits (host accesses too), background maintenance.
    fn host_data() -> Setup {
        Setup {
            budget: Some(160 * MIB as u64),
            fault_probability: 0.02,
            fence_fault_probability: 0.02,
            fault_kind: FaultKind::DriverError,
            zero_on_reuse: true,
            maintenance: Duration::from_millis(3),
            ..Setup::base("host-data-budget-faults-zeroing", DeviceChoice::Host)
        }
    }

    /// Host memory on a small device without budget, synchronous, small idle caps; the
    /// manager drops before the buffers.
    fn host_data_plain() -> Setup {
        Setup {
            capacity: 256 * MIB as u64,
            fault_probability: 0.01,
            asynchronous: false,
            idle_caps: Some((4, 64 * KIB, 2)),
            teardown: Teardown::BuffersOutlive,
            ..Setup::base("host-data-nobudget", DeviceChoice::Host)
        }
    }

    /// Fewer and smaller operations under Miri, where each costs thousands of times more.
    fn sized(mut self, threads: usize, ops_per_thread: u64) -> Setup {
        self.threads = threads;
        self.ops_per_thread = ops_per_thread;
        if cfg!(miri) {
            self.threads = 2;
            self.ops_per_thread = 40;
            self.devices = 1;
            self.max_request = 64 * KIB;
            self.maintenance = Duration::ZERO;
        }
        self
    }
}

// ---------------------------------------------------------------------------------------------
// The devices.

/// A device's ledger, as the stress reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Ledger {
    attempts: u64,
    allocations: u64,
    releases: u64,
    /// Refused attempts: injected faults, and the capacity where it ran out.
    refusals: u64,
    /// Of those, injected faults where the device tells them apart (`None`: it does not).
    injected: Option<u64>,
    live_allocations: u64,
    live_bytes: u64,
    invalid_releases: u64,
    /// Fence recordings refused, injected.
    fence_faults: u64,
    /// Device-wide waits (`synchronize`) failed, injected: nothing was waited for.
    sync_faults: u64,
    /// Waits for one stream (`wait_for_stream`) failed, injected: nothing was waited for.
    stream_wait_faults: u64,
}

/// What the stress needs of a device besides the [`Backend`].
trait Device: Backend + Clone {
    fn build(setup: &Setup, index: usize) -> Self;
    /// The simulated GPU catches up: every fence recorded so far completes.
    fn complete_fences(&self);
    fn ledger(&self) -> Ledger;
    /// The model of the device's queued work, for an asynchronous device whose fences and
    /// waits go through it ([`FlakyFences`]).
    fn work(&self) -> Option<&StreamWork> {
        None
    }
}

impl Device for SimBackend {
    fn build(setup: &Setup, index: usize) -> SimBackend {
        let faults = if setup.fault_probability > 0.0 {
            FaultPlan::Probability {
                probability: setup.fault_probability,
                seed: setup.seed ^ (index as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d),
            }
        } else {
            FaultPlan::None
        };
        SimBackend::new(SimConfig {
            capacity_bytes: setup.capacity,
            faults,
            fault_kind: setup.fault_kind,
            asynchronous: setup.asynchronous,
            virtual_memory: setup.virtual_memory,
            ..SimConfig::default()
        })
    }

    fn complete_fences(&self) {
        SimBackend::complete_fences(self);
    }

    fn ledger(&self) -> Ledger {
        let counters = self.counters();
        Ledger {
            attempts: counters.allocations + counters.refusals,
            allocations: counters.allocations,
            releases: counters.releases,
            refusals: counters.refusals,
            injected: None,
            live_allocations: counters.live_allocations,
            live_bytes: counters.live_bytes,
            invalid_releases: counters.invalid_releases,
            ..Ledger::default()
        }
    }
}

/// Host memory behind the sim's bookkeeping: a ledger of live blocks keyed by address (which
/// flags releases of unknown or resized blocks, and refuses them instead of freeing), a
/// capacity, seeded injected faults, and asynchronous fences that complete when the stress's
/// "GPU" thread says so. Its blocks are real, zeroed, host-visible memory, so the stress can
/// write and check every buffer's contents.
#[derive(Clone)]
struct HostDevice {
    host: HostBackend,
    shared: Arc<HostShared>,
}

struct HostShared {
    capacity: u64,
    fault_probability: f64,
    fault_kind: FaultKind,
    asynchronous: bool,
    ledger: Mutex<HostLedger>,
    fences: Mutex<Vec<Arc<FlagFence>>>,
}

struct HostLedger {
    live: HashMap<u64, usize>,
    random: SplitMix64,
    figures: Ledger,
}

#[derive(Default)]
struct FlagFence(AtomicBool);

impl Fence for FlagFence {
    fn is_complete(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Device for HostDevice {
    fn build(setup: &Setup, index: usize) -> HostDevice {
        HostDevice {
            host: HostBackend::new(),
            shared: Arc::new(HostShared {
                capacity: setup.capacity,
                fault_probability: setup.fault_probability,
                fault_kind: setup.fault_kind,
                asynchronous: setup.asynchronous,
                ledger: Mutex::new(HostLedger {
                    live: HashMap::new(),
                    random: SplitMix64::new(setup.seed ^ index as u64),
                    figures: Ledger {
                        injected: Some(0),
                        ..Ledger::default()
                    },
                }),
                fences: Mutex::new(Vec::new()),
            }),
        }
    }

    fn complete_fences(&self) {
        for fence in lock(&self.shared.fences).drain(..) {
            fence.0.store(true, Ordering::Release);
        }
    }

    fn ledger(&self) -> Ledger {
        lock(&self.shared.ledger).figures
    }
}

impl Backend for HostDevice {
    fn name(&self) -> &str {
        "stress-host"
    }

    fn kinds(&self) -> &[MemoryKind] {
        self.host.kinds()
    }

    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        let shared = &self.shared;
        let mut ledger = lock(&shared.ledger);
        ledger.figures.attempts += 1;
        if ledger.figures.live_bytes + bytes as u64 > shared.capacity {
            ledger.figures.refusals += 1;
            return Err(BackendError::OutOfMemory);
        }
        let draw = (ledger.random.next() >> 11) as f64 / (1u64 << 53) as f64;
        if draw < shared.fault_probability {
            ledger.figures.refusals += 1;
            *ledger.figures.injected.get_or_insert(0) += 1;
            return Err(match shared.fault_kind {
                FaultKind::OutOfMemory => BackendError::OutOfMemory,
                FaultKind::DriverError => BackendError::Driver("injected driver fault".into()),
            });
        }
        // Under the ledger's lock, so the capacity holds exactly.
        let block = match self.host.allocate(bytes, kind) {
            Ok(block) => block,
            Err(error) => {
                ledger.figures.refusals += 1;
                return Err(error);
            }
        };
        if ledger.live.insert(block.device_address(), bytes).is_some() {
            ledger.figures.invalid_releases += 1; // an address live twice: the ledger is wrong
        }
        let figures = &mut ledger.figures;
        figures.allocations += 1;
        figures.live_allocations += 1;
        figures.live_bytes += bytes as u64;
        Ok(block)
    }

    fn release(&self, block: Block) {
        let mut ledger = lock(&self.shared.ledger);
        match ledger.live.remove(&block.device_address()) {
            Some(bytes) if bytes == block.bytes() => {
                let figures = &mut ledger.figures;
                figures.releases += 1;
                figures.live_allocations -= 1;
                figures.live_bytes -= bytes as u64;
                drop(ledger);
                self.host.release(block);
            }
            Some(bytes) => {
                // Put the entry back and leak the block: freeing it with the wrong size would be
                // undefined behaviour.
                ledger.live.insert(block.device_address(), bytes);
                ledger.figures.invalid_releases += 1;
            }
            None => ledger.figures.invalid_releases += 1,
        }
    }

    fn memory_info(&self) -> Option<MemoryInfo> {
        let live = lock(&self.shared.ledger).figures.live_bytes;
        Some(MemoryInfo {
            free_bytes: self.shared.capacity.saturating_sub(live),
            total_bytes: self.shared.capacity,
        })
    }

    fn stream_ordered(&self) -> Option<&dyn StreamOrdered> {
        self.shared
            .asynchronous
            .then_some(self as &dyn StreamOrdered)
    }
}

impl StreamOrdered for HostDevice {
    fn record_fence(&self, _stream: StreamId) -> Result<Arc<dyn Fence>, BackendError> {
        let fence = Arc::new(FlagFence::default());
        lock(&self.shared.fences).push(fence.clone());
        Ok(fence)
    }

    fn synchronize(&self) -> Result<(), BackendError> {
        self.complete_fences();
        Ok(())
    }

    /// No real work runs on the streams: the host never has anything to wait for.
    fn wait_for_stream(&self, _stream: StreamId) -> Result<(), BackendError> {
        Ok(())
    }
}

/// A device whose fence recordings, device-wide waits and stream waits fail now and then
/// (neither device injects those), each with `fence_fault_probability`: every place the pool
/// records a fence must fall back (synchronise, keep the block, record later), and every
/// place it waits must treat a failed wait as no wait at all (keep the block deferred, refuse
/// host access with an error), without losing a block or handing one out early. A failed wait
/// waits for nothing: the work stays unfinished in the model ([`StreamWork`]) and the device's
/// fences stay incomplete. Everything else goes to the device; releases and unmaps are checked
/// against the model first.
#[derive(Clone)]
struct FlakyFences<D> {
    inner: D,
    probability: f64,
    random: Arc<Mutex<SplitMix64>>,
    faults: Arc<InjectedFaults>,
    /// The model of the device's queued work; `None` for a synchronous device (no streams).
    work: Option<Arc<StreamWork>>,
}

/// Faults [`FlakyFences`] injected, by call.
#[derive(Default)]
struct InjectedFaults {
    fences: AtomicU64,
    synchronizations: AtomicU64,
    stream_waits: AtomicU64,
}

impl<D: Device> FlakyFences<D> {
    /// Whether this call fails (counted in `count`).
    fn inject(&self, count: &AtomicU64) -> bool {
        if self.probability <= 0.0 {
            return false;
        }
        let draw = (lock(&self.random).next() >> 11) as f64 / (1u64 << 53) as f64;
        let fails = draw < self.probability;
        if fails {
            count.fetch_add(1, Ordering::Relaxed);
        }
        fails
    }

    /// Checks a release or unmap of `[start, start + bytes)` against the model.
    fn releasing(&self, start: u64, bytes: usize, what: &str) {
        if let Some(work) = &self.work {
            work.released(start, bytes, what);
        }
    }
}

impl<D: Device> Device for FlakyFences<D> {
    fn build(setup: &Setup, index: usize) -> Self {
        let inner = D::build(setup, index);
        let work = inner
            .stream_ordered()
            .is_some()
            .then(|| Arc::new(StreamWork::new()));
        FlakyFences {
            inner,
            probability: setup.fence_fault_probability,
            random: Arc::new(Mutex::new(SplitMix64::new(!setup.seed ^ index as u64))),
            faults: Arc::default(),
            work,
        }
    }

    /// The model's work finishes first, so a fence the device completes is never complete
    /// before the work it covers has finished in the model.
    fn complete_fences(&self) {
        if let Some(work) = &self.work {
            work.finish_all();
        }
        self.inner.complete_fences();
    }

    fn ledger(&self) -> Ledger {
        Ledger {
            fence_faults: self.faults.fences.load(Ordering::Relaxed),
            sync_faults: self.faults.synchronizations.load(Ordering::Relaxed),
            stream_wait_faults: self.faults.stream_waits.load(Ordering::Relaxed),
            ..self.inner.ledger()
        }
    }

    fn work(&self) -> Option<&StreamWork> {
        self.work.as_deref()
    }
}

impl<D: Device> Backend for FlakyFences<D> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn kinds(&self) -> &[MemoryKind] {
        self.inner.kinds()
    }
    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        self.inner.allocate(bytes, kind)
    }
    fn release(&self, block: Block) {
        self.releasing(block.device_address(), block.bytes(), "block");
        self.inner.release(block)
    }
    fn memory_info(&self) -> Option<MemoryInfo> {
        self.inner.memory_info()
    }
    fn stream_ordered(&self) -> Option<&dyn StreamOrdered> {
        self.inner
            .stream_ordered()
            .map(|_| self as &dyn StreamOrdered)
    }
    fn zeroing(&self) -> Option<&dyn Zeroing> {
        self.inner.zeroing()
    }
    fn virtual_memory(&self) -> Option<&dyn VirtualMemory> {
        self.inner
            .virtual_memory()
            .map(|_| self as &dyn VirtualMemory)
    }
}

impl<D: Device> VirtualMemory for FlakyFences<D> {
    fn granularity(&self) -> usize {
        self.memory().granularity()
    }
    fn reserve(&self, bytes: usize) -> Result<Block, BackendError> {
        self.memory().reserve(bytes)
    }
    fn unreserve(&self, reservation: Block) {
        self.releasing(
            reservation.device_address(),
            reservation.bytes(),
            "reservation",
        );
        self.memory().unreserve(reservation)
    }
    fn map(&self, address: u64, bytes: usize, access: &PoolAccess) -> Result<(), BackendError> {
        self.memory().map(address, bytes, access)
    }
    fn unmap(&self, address: u64, bytes: usize, access: &PoolAccess) {
        self.releasing(address, bytes, "mapping");
        self.memory().unmap(address, bytes, access)
    }
}

impl<D: Device> FlakyFences<D> {
    fn memory(&self) -> &dyn VirtualMemory {
        self.inner.virtual_memory().expect("virtual memory")
    }

    fn streams(&self) -> (&dyn StreamOrdered, &StreamWork) {
        let streams = self.inner.stream_ordered().expect("asynchronous device");
        let work = self.work.as_deref().expect("asynchronous device");
        (streams, work)
    }
}

impl<D: Device> StreamOrdered for FlakyFences<D> {
    fn record_fence(&self, stream: StreamId) -> Result<Arc<dyn Fence>, BackendError> {
        let (streams, work) = self.streams();
        if self.inject(&self.faults.fences) {
            return Err(BackendError::Driver("injected fence fault".into()));
        }
        // Read before the device's fence exists: the fence covers the work queued before it.
        let recorded_at = work.now();
        let inner = streams.record_fence(stream)?;
        Ok(Arc::new(WorkFence {
            inner,
            work: self.work.clone().expect("asynchronous device"),
            stream,
            recorded_at,
        }))
    }

    /// A failed wait waits for nothing: no work finishes, no fence completes.
    fn synchronize(&self) -> Result<(), BackendError> {
        let (streams, work) = self.streams();
        if self.inject(&self.faults.synchronizations) {
            return Err(BackendError::Driver("injected synchronize fault".into()));
        }
        work.finish_all();
        streams.synchronize()
    }

    fn wait_for_stream(&self, stream: StreamId) -> Result<(), BackendError> {
        let (streams, work) = self.streams();
        if self.inject(&self.faults.stream_waits) {
            return Err(BackendError::Driver("injected stream-wait fault".into()));
        }
        streams.wait_for_stream(stream)?;
        work.finish(stream);
        Ok(())
    }
}

/// A fence of a [`FlakyFences`] device: complete once the device completed it and the work
/// queued on its stream before it was recorded has finished in the model.
struct WorkFence {
    inner: Arc<dyn Fence>,
    work: Arc<StreamWork>,
    stream: StreamId,
    recorded_at: u64,
}

impl Fence for WorkFence {
    fn is_complete(&self) -> bool {
        self.work.is_finished(self.stream, self.recorded_at) && self.inner.is_complete()
    }
}

// ---------------------------------------------------------------------------------------------
// The GPU's work, as the stress models it.

/// The work queued on the streams of one asynchronous device, as the stress models it: the
/// devices hold no real GPU work, so without it neither the data checks nor the ledgers could
/// see a block released, or handed to another stream, while work of its previous owner may
/// still use it (after a failed wait, say).
///
/// A logical clock orders the events. A buffer's work is queued on its own stream and on the
/// streams recorded on it until its drop, and on the stream of each fence it was declared
/// `used_by` until that fence was recorded: at its drop each becomes a busy range (block,
/// stream, tick). Work finishes when the "GPU" thread completes the fences or a `synchronize`
/// succeeds (every stream), or a `wait_for_stream` succeeds (that stream): the event takes the
/// next tick and marks the streams finished up to it. A failed wait finishes nothing.
///
/// Checked against it: a block released or unmapped (busy ranges on it must have finished,
/// except as the manager drops: `Upstream::release_all_at_end`), a block handed out (busy
/// ranges of other streams must have finished; its own stream's work runs in order before the
/// new owner's) and a buffer's first host access (every busy range must have finished: the
/// access waited for its stream). The device's fences complete only after the work before
/// them has finished in the model, so whatever the pool bases on a fence or a successful wait
/// never looks early here.
struct StreamWork {
    clock: AtomicU64,
    /// Per stream, the tick of the last event that finished its work: the work queued before
    /// that tick is done.
    finished: Vec<AtomicU64>,
    busy: Mutex<BusyRanges>,
    /// Set as the manager drops: when its last wait fails it releases everything all the same.
    ending: AtomicBool,
    /// Releases and unmaps the model saw too early (reported by the pool's own calls, so kept
    /// here until the run collects them).
    violations: Violations,
    /// Releases and unmaps checked.
    release_checks: AtomicU64,
    /// Busy releases as the manager dropped after a failed wait (accepted).
    busy_at_end: AtomicU64,
}

/// The busy ranges of a device, by start address and a sequence number (ranges of several
/// owners may overlap: a block reused on its stream while its work still runs).
#[derive(Default)]
struct BusyRanges {
    ranges: BTreeMap<(u64, u64), Busy>,
    next: u64,
    /// The longest range queued: a range that overlaps `[start, end)` starts after
    /// `start - longest`.
    longest: u64,
}

/// Work that uses `[start, end)` (the key's start), queued on `stream` before tick
/// `queued_before`, by the buffer of `owner`, on its stream or `why` there.
#[derive(Clone, Copy, Debug)]
struct Busy {
    end: u64,
    stream: StreamId,
    queued_before: u64,
    owner: Owner,
    why: Why,
}

/// Why a buffer's work ran on a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// The buffer's own stream.
    Own,
    /// A stream recorded on it (`record_stream`).
    Recorded,
    /// The stream of a fence it was declared `used_by`.
    UsedBy,
}

impl StreamWork {
    fn new() -> StreamWork {
        StreamWork {
            clock: AtomicU64::new(0),
            finished: (0..STREAMS).map(|_| AtomicU64::new(0)).collect(),
            busy: Mutex::default(),
            ending: AtomicBool::new(false),
            violations: Violations::default(),
            release_checks: AtomicU64::new(0),
            busy_at_end: AtomicU64::new(0),
        }
    }

    /// The tick now: work queued from here on is not finished by the events before.
    fn now(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }

    fn finished_tick(&self, stream: StreamId) -> &AtomicU64 {
        self.finished
            .get(stream.0 as usize)
            .unwrap_or_else(|| panic!("{stream:?} is not one of the stress's {STREAMS} streams"))
    }

    /// Whether the work queued on `stream` before tick `queued_before` has finished.
    fn is_finished(&self, stream: StreamId, queued_before: u64) -> bool {
        self.finished_tick(stream).load(Ordering::SeqCst) > queued_before
    }

    /// A wait for `stream` succeeded: the work queued on it so far has finished.
    fn finish(&self, stream: StreamId) {
        let tick = self.clock.fetch_add(1, Ordering::SeqCst) + 1;
        self.finished_tick(stream).fetch_max(tick, Ordering::SeqCst);
    }

    /// The GPU caught up, or the device was synchronised: all work queued so far has finished.
    fn finish_all(&self) {
        let tick = self.clock.fetch_add(1, Ordering::SeqCst) + 1;
        for finished in &self.finished {
            finished.fetch_max(tick, Ordering::SeqCst);
        }
        lock(&self.busy)
            .ranges
            .retain(|_, busy| !self.is_finished(busy.stream, busy.queued_before));
    }

    /// Work of `owner` on `stream`, queued before tick `queued_before`, uses `[start, end)`.
    fn queue(
        &self,
        start: u64,
        end: u64,
        (stream, why): (StreamId, Why),
        queued_before: u64,
        owner: Owner,
    ) {
        let mut busy = lock(&self.busy);
        let key = (start, busy.next);
        busy.next += 1;
        busy.longest = busy.longest.max(end - start);
        busy.ranges.insert(
            key,
            Busy {
                end,
                stream,
                queued_before,
                owner,
                why,
            },
        );
    }

    /// Unfinished work on `[start, end)` that `counts`, with its start.
    fn unfinished(
        &self,
        start: u64,
        end: u64,
        counts: impl Fn(&Busy) -> bool,
    ) -> Option<(u64, Busy)> {
        let busy = lock(&self.busy);
        let from = start.saturating_sub(busy.longest);
        busy.ranges
            .range((from, 0)..(end, 0))
            .find(|(_, work)| {
                work.end > start
                    && counts(work)
                    && !self.is_finished(work.stream, work.queued_before)
            })
            .map(|(&(at, _), work)| (at, *work))
    }

    /// The device releases (or unmaps) `[start, start + bytes)`.
    fn released(&self, start: u64, bytes: usize, what: &str) {
        self.release_checks.fetch_add(1, Ordering::Relaxed);
        let Some((at, work)) = self.unfinished(start, start + bytes as u64, |_| true) else {
            return;
        };
        if self.ending.load(Ordering::SeqCst) {
            self.busy_at_end.fetch_add(1, Ordering::Relaxed);
        } else {
            // Printed when the run collects it (`Violations::absorb`).
            self.violations.keep(
                format!(
                    "{what} [{start:#x}, +{bytes}) released while {}",
                    work.describe(at)
                ),
                false,
            );
        }
    }
}

impl Busy {
    fn describe(&self, start: u64) -> String {
        let why = match self.why {
            Why::Own => "its own stream",
            Why::Recorded => "recorded on it",
            Why::UsedBy => "a used_by fence's",
        };
        format!(
            "work of {} on {:?} ({why}; queued before tick {}) on [{start:#x}, {:#x}) has not \
             finished",
            self.owner, self.stream, self.queued_before, self.end
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Shared state of a run: violations, the interval maps, the hand-off, counts.

/// The violations of a run: counted, the first few kept with their messages.
#[derive(Default)]
pub(crate) struct Violations {
    count: AtomicU64,
    pub(crate) first: Mutex<Vec<String>>,
}

impl Violations {
    pub(crate) fn report(&self, message: String) {
        self.keep(message, true);
    }

    /// Counts a violation and keeps its message if it is among the first, printed or not.
    fn keep(&self, message: String, print: bool) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut first = lock(&self.first);
        if first.len() < KEPT_VIOLATIONS {
            if print {
                eprintln!("stress violation: {message}");
            }
            first.push(message);
        }
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Adds `other`'s violations (their kept messages with `prefix`, and their count).
    fn absorb(&self, other: &Violations, prefix: &str) {
        let kept = lock(&other.first).clone();
        for message in &kept {
            self.report(format!("{prefix}{message}"));
        }
        self.count
            .fetch_add(other.count() - kept.len() as u64, Ordering::Relaxed);
    }
}

/// Who owns a buffer: the thread that allocated it and its sequence number there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) thread: u32,
    pub(crate) seq: u64,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "thread {} buffer #{}", self.thread, self.seq)
    }
}

/// A live buffer with what the stress knows of it.
struct Live {
    buffer: PooledBuffer<u8>,
    device: usize,
    owner: Owner,
    /// Whether it is in the interval map (not when it overlapped another: reported already).
    tracked: bool,
    /// Where its pattern starts in its owner's template; `None` without host memory.
    pattern_offset: Option<usize>,
    /// Streams recorded on it (`record_stream`): its work runs there too until its drop.
    extra_streams: Vec<StreamId>,
    /// Fences it was declared `used_by`: work on their stream, queued before the tick.
    used_by: Vec<(StreamId, u64)>,
}

/// Live `[start, end)` ranges of one device, by start.
pub(crate) type IntervalMap = BTreeMap<u64, (u64, Owner)>;

/// Counts of one thread, summed at the end.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    ops: u64,
    allocations: u64,
    failed: u64,
    failed_budget: u64,
    failed_out_of_memory: u64,
    failed_backend: u64,
    drops: u64,
    handoffs: u64,
    record_streams: u64,
    fences_used: u64,
    trims: u64,
    clears: u64,
    maintenance: u64,
    defragments: u64,
    prewarms: u64,
    prewarm_failures: u64,
    pooling_off: u64,
    snapshots_checked: u64,
    overlap_checks: u64,
    pattern_checks: u64,
    zero_checks: u64,
    bytes_checked: u64,
    /// Host accesses refused with a clean error (their stream wait failed).
    host_access_refused: u64,
    /// Blocks handed out and first host accesses checked against the model of queued work.
    work_checks: u64,
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.ops += other.ops;
        self.allocations += other.allocations;
        self.failed += other.failed;
        self.failed_budget += other.failed_budget;
        self.failed_out_of_memory += other.failed_out_of_memory;
        self.failed_backend += other.failed_backend;
        self.drops += other.drops;
        self.handoffs += other.handoffs;
        self.record_streams += other.record_streams;
        self.fences_used += other.fences_used;
        self.trims += other.trims;
        self.clears += other.clears;
        self.maintenance += other.maintenance;
        self.defragments += other.defragments;
        self.prewarms += other.prewarms;
        self.prewarm_failures += other.prewarm_failures;
        self.pooling_off += other.pooling_off;
        self.snapshots_checked += other.snapshots_checked;
        self.overlap_checks += other.overlap_checks;
        self.pattern_checks += other.pattern_checks;
        self.zero_checks += other.zero_checks;
        self.bytes_checked += other.bytes_checked;
        self.host_access_refused += other.host_access_refused;
        self.work_checks += other.work_checks;
    }
}

/// What the threads of one run share.
struct Shared<D> {
    setup: Setup,
    devices: Vec<D>,
    intervals: Vec<Mutex<IntervalMap>>,
    /// Buffers handed from one thread to another.
    exchange: Mutex<Vec<Live>>,
    /// Each thread's pattern template (see `pattern_spans`).
    templates: Vec<Vec<u8>>,
    violations: Violations,
    /// Operations done so far, for the deadlock watchdog.
    progress: AtomicU64,
    /// Worker threads done with their operations.
    finished: AtomicUsize,
    stop: AtomicBool,
}

/// The pattern templates are this long; a buffer's byte `i` is its owner thread's template
/// byte `(offset + i) % TEMPLATE_BYTES`, and its offset follows from its sequence number.
/// (Generating it byte by byte is slow under Miri, where buffers are small anyway.)
const TEMPLATE_BYTES: usize = if cfg!(miri) {
    4 * KIB + 8
} else {
    64 * KIB + 8
};

/// The parts of a buffer of `len` bytes that carry the pattern: all of it up to 32 KiB, else
/// 16 KiB at each end and 64 bytes of every 4 KiB between (writing every byte of multi-MiB
/// buffers would cost more than the pool; a stray write or zeroing of a block covers more
/// than 4 KiB, an overlap is caught exactly by the interval map).
fn pattern_spans(len: usize) -> impl Iterator<Item = (usize, usize)> {
    const DENSE: usize = 16 * KIB;
    const STRIDE: usize = 4 * KIB;
    const STAMP: usize = 64;
    let (head, tail_start) = if len <= 2 * DENSE {
        (len, len)
    } else {
        (DENSE, len - DENSE)
    };
    let stamps = (head..tail_start)
        .step_by(STRIDE)
        .map(move |start| (start, (start + STAMP).min(tail_start)));
    std::iter::once((0, head))
        .chain(stamps)
        .chain((tail_start < len).then_some((tail_start, len)))
}

/// The template bytes for `[start, end)` of a buffer whose pattern starts at `offset`, in
/// pieces (the template wraps around).
fn template_pieces(
    template: &[u8],
    offset: usize,
    start: usize,
    end: usize,
) -> impl Iterator<Item = (usize, &[u8])> {
    let mut position = start;
    std::iter::from_fn(move || {
        if position >= end {
            return None;
        }
        let from = (offset + position) % template.len();
        let take = (end - position).min(template.len() - from);
        let piece = (position, &template[from..from + take]);
        position += take;
        Some(piece)
    })
}

fn pattern_offset(owner: Owner) -> usize {
    (owner.seq as usize).wrapping_mul(8_191) % TEMPLATE_BYTES
}

/// Adds `owner`'s live range `[start, end)` to `map`, unless it overlaps a live range there;
/// the error describes the overlap.
pub(crate) fn insert_range(
    map: &Mutex<IntervalMap>,
    start: u64,
    end: u64,
    owner: Owner,
) -> Result<(), String> {
    let mut map = lock(map);
    // The ranges in the map are disjoint, so the last one starting before `end` is the only
    // one that can reach past `start`.
    if let Some((&other_start, &(other_end, other))) = map.range(..end).next_back() {
        if other_end > start {
            return Err(format!(
                "block [{start:#x}, {end:#x}) handed out while {other}'s [{other_start:#x}, \
                 {other_end:#x}) is live"
            ));
        }
    }
    map.insert(start, (end, owner));
    Ok(())
}

/// Removes `owner`'s range starting at `start` from `map`; the error says what was there.
pub(crate) fn remove_range(
    map: &Mutex<IntervalMap>,
    start: u64,
    owner: Owner,
) -> Result<(), String> {
    match lock(map).remove(&start) {
        Some((_, found)) if found == owner => Ok(()),
        other => Err(format!(
            "{owner}: its range at {start:#x} was not in the map at drop (found {other:?})"
        )),
    }
}

impl<D: Device> Shared<D> {
    fn new(setup: &Setup) -> Shared<D> {
        let devices: Vec<D> = (0..setup.devices).map(|i| D::build(setup, i)).collect();
        let templates = (0..setup.threads)
            .map(|thread| {
                let mut random = SplitMix64::new(setup.seed ^ (thread as u64) << 32);
                (0..TEMPLATE_BYTES).map(|_| random.next() as u8).collect()
            })
            .collect();
        Shared {
            setup: setup.clone(),
            intervals: (0..setup.devices).map(|_| Mutex::default()).collect(),
            devices,
            exchange: Mutex::new(Vec::new()),
            templates,
            violations: Violations::default(),
            progress: AtomicU64::new(0),
            finished: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        }
    }

    fn manager(&self) -> MemoryManager {
        let setup = &self.setup;
        let mut config = PoolConfig::builder()
            .budget_bytes(setup.budget)
            .zero_on_reuse(setup.zero_on_reuse)
            .carve_class_blocks(setup.carve_class_blocks)
            .reclaim_at_peak(setup.reclaim_at_peak)
            .steps_per_doubling(setup.steps_per_doubling)
            .maintenance_interval(setup.maintenance);
        if let Some(shards) = setup.shards {
            config = config.shards(shards);
        }
        if let Some((blocks, bytes, keep)) = setup.idle_caps {
            config = config
                .max_idle_per_class(blocks)
                .max_idle_bytes_per_class(bytes)
                .min_idle_per_class(keep);
        }
        let config = config.build().expect("valid stress configuration");
        let backends = self
            .devices
            .iter()
            .map(|device| Arc::new(device.clone()) as Arc<dyn Backend>)
            .collect();
        MemoryManager::with_devices(backends, config).expect("manager")
    }

    /// Adds a new buffer's range to its device's map, unless it overlaps a live one.
    fn insert_interval(&self, live: &Live, counts: &mut Counts) -> bool {
        counts.overlap_checks += 1;
        let start = live.buffer.device_address();
        let end = start + live.buffer.block_bytes() as u64;
        match insert_range(&self.intervals[live.device], start, end, live.owner) {
            Ok(()) => true,
            Err(overlap) => {
                self.violations
                    .report(format!("{}: device {}: {overlap}", live.owner, live.device));
                false
            }
        }
    }

    fn remove_interval(&self, live: &Live) {
        let start = live.buffer.device_address();
        if let Err(message) = remove_range(&self.intervals[live.device], start, live.owner) {
            self.violations.report(message);
        }
    }

    /// Writes the owner's pattern into a new host-visible buffer (the first host access was
    /// made already).
    fn write_pattern(&self, live: &mut Live, offset: usize) -> Result<(), PoolError> {
        let template = &self.templates[live.owner.thread as usize];
        let bytes = live.buffer.as_mut_slice()?;
        for (start, end) in pattern_spans(bytes.len()) {
            for (position, piece) in template_pieces(template, offset, start, end) {
                bytes[position..position + piece.len()].copy_from_slice(piece);
            }
        }
        live.pattern_offset = Some(offset);
        Ok(())
    }

    /// Checks a host-visible buffer's pattern before its drop.
    fn check_pattern(&self, live: &Live, counts: &mut Counts) {
        let Some(offset) = live.pattern_offset else {
            return;
        };
        counts.pattern_checks += 1;
        let template = &self.templates[live.owner.thread as usize];
        let bytes = match live.buffer.as_slice() {
            Ok(bytes) => bytes,
            Err(error) => {
                self.violations.report(format!(
                    "{}: host access at drop failed: {error}",
                    live.owner
                ));
                return;
            }
        };
        for (start, end) in pattern_spans(bytes.len()) {
            for (position, piece) in template_pieces(template, offset, start, end) {
                counts.bytes_checked += piece.len() as u64;
                let held = &bytes[position..position + piece.len()];
                if held != piece {
                    let first = held
                        .iter()
                        .zip(piece)
                        .position(|(a, b)| a != b)
                        .unwrap_or(0);
                    self.violations.report(format!(
                        "{}: [{:#x}, +{}) lost its pattern at byte {} (found {:#04x}, wrote \
                         {:#04x}) before its drop",
                        live.owner,
                        live.buffer.device_address(),
                        bytes.len(),
                        position + first,
                        held[first],
                        piece[first]
                    ));
                    return;
                }
            }
        }
    }

    /// With `zero_on_reuse`, a new host-visible buffer must read zero where it will be checked.
    /// (The first host access was made already.)
    fn check_zeroed(&self, live: &Live, counts: &mut Counts) {
        counts.zero_checks += 1;
        let bytes = match live.buffer.as_slice() {
            Ok(bytes) => bytes,
            Err(error) => {
                self.violations
                    .report(format!("{}: host access failed: {error}", live.owner));
                return;
            }
        };
        // Compared against zeros a chunk at a time (`memcmp`), searched only on a difference.
        const ZEROS: [u8; 4096] = [0; 4096];
        for (start, end) in pattern_spans(bytes.len()) {
            let dirty = bytes[start..end]
                .chunks(ZEROS.len())
                .any(|chunk| chunk != &ZEROS[..chunk.len()]);
            if !dirty {
                continue;
            }
            if let Some(index) = bytes[start..end].iter().position(|&byte| byte != 0) {
                self.violations.report(format!(
                    "{}: zero_on_reuse handed out [{:#x}, +{}) with byte {} = {:#04x}",
                    live.owner,
                    live.buffer.device_address(),
                    bytes.len(),
                    start + index,
                    bytes[start + index]
                ));
                return;
            }
        }
    }

    /// Checks a buffer's contents and range, and drops it; its work is queued in the model
    /// first (before the drop, so no new owner can come before it).
    fn retire(&self, live: Live, counts: &mut Counts) {
        self.check_pattern(&live, counts);
        if live.tracked {
            self.remove_interval(&live);
        }
        if let Some(work) = self.devices[live.device].work() {
            let start = live.buffer.device_address();
            let end = start + live.buffer.block_bytes() as u64;
            let now = work.now();
            let own = ((live.buffer.stream(), Why::Own), now);
            let recorded = live
                .extra_streams
                .into_iter()
                .map(|stream| ((stream, Why::Recorded), now));
            let used_by = live
                .used_by
                .into_iter()
                .map(|(stream, queued_before)| ((stream, Why::UsedBy), queued_before));
            for (on, queued_before) in std::iter::once(own).chain(recorded).chain(used_by) {
                work.queue(start, end, on, queued_before, live.owner);
            }
        }
        counts.drops += 1;
        drop(live.buffer);
    }

    /// A new buffer's first host access, which waits for its stream: `false` when the wait
    /// failed (injected: a clean error, tried twice) or the access failed otherwise (a
    /// violation). Once it succeeded, the work of the block's previous owners must have
    /// finished.
    fn first_host_access(&self, live: &Live, counts: &mut Counts) -> bool {
        for _ in 0..2 {
            match live.buffer.as_slice() {
                Ok(_) => {
                    self.check_host_access(live, counts);
                    return true;
                }
                Err(PoolError::Backend { message, .. })
                    if message.contains("injected stream-wait fault") =>
                {
                    counts.host_access_refused += 1;
                }
                Err(error) => {
                    self.violations
                        .report(format!("{}: host access failed: {error}", live.owner));
                    return false;
                }
            }
        }
        false
    }

    /// After a host access waited for the buffer's stream: no work of a previous owner may
    /// still use the block.
    fn check_host_access(&self, live: &Live, counts: &mut Counts) {
        let Some(work) = self.devices[live.device].work() else {
            return;
        };
        counts.work_checks += 1;
        let start = live.buffer.device_address();
        let end = start + live.buffer.block_bytes() as u64;
        if let Some((at, busy)) = work.unfinished(start, end, |_| true) {
            self.violations.report(format!(
                "{}: device {}: host access to [{start:#x}, {end:#x}) on {:?} while {}",
                live.owner,
                live.device,
                live.buffer.stream(),
                busy.describe(at)
            ));
        }
    }

    /// A block handed out on its stream: no work of a previous owner on another stream may
    /// still use it (work on its own stream runs before the new owner's, in order).
    fn check_handed_out(&self, live: &Live, counts: &mut Counts) {
        let Some(work) = self.devices[live.device].work() else {
            return;
        };
        counts.work_checks += 1;
        let stream = live.buffer.stream();
        let start = live.buffer.device_address();
        let end = start + live.buffer.block_bytes() as u64;
        if let Some((at, busy)) = work.unfinished(start, end, |busy| busy.stream != stream) {
            self.violations.report(format!(
                "{}: device {}: [{start:#x}, {end:#x}) handed out on {stream:?} while {}",
                live.owner,
                live.device,
                busy.describe(at)
            ));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshot checks.

/// Counters that never go backwards, from one snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Monotone {
    requests: u64,
    hits: u64,
    misses: u64,
    bypasses: u64,
    failed_requests: u64,
    backend_allocations: u64,
    backend_releases: u64,
    peak_reserved_bytes: u64,
}

impl Monotone {
    pub(crate) fn of(stats: &PoolStats) -> Monotone {
        let totals = &stats.totals;
        Monotone {
            requests: totals.requests,
            hits: totals.hits,
            misses: totals.misses,
            bypasses: totals.bypasses,
            failed_requests: totals.failed_requests,
            backend_allocations: totals.backend_allocations,
            backend_releases: totals.backend_releases,
            peak_reserved_bytes: totals.peak_reserved_bytes,
        }
    }

    pub(crate) fn not_below(&self, earlier: &Monotone) -> bool {
        self.requests >= earlier.requests
            && self.hits >= earlier.hits
            && self.misses >= earlier.misses
            && self.bypasses >= earlier.bypasses
            && self.failed_requests >= earlier.failed_requests
            && self.backend_allocations >= earlier.backend_allocations
            && self.backend_releases >= earlier.backend_releases
            && self.peak_reserved_bytes >= earlier.peak_reserved_bytes
    }
}

/// The identities a snapshot satisfies on its own (those of `common::assert_consistent` that
/// do not read the device), the peak, and the budget; returns what failed.
pub(crate) fn snapshot_failures(stats: &PoolStats, budget: Option<u64>) -> Vec<String> {
    let mut failures = Vec::new();
    let mut expect = |holds: bool, what: String| {
        if !holds {
            failures.push(what);
        }
    };
    let totals = &stats.totals;
    expect(
        totals.reserved_bytes == totals.in_use_bytes + totals.cached_bytes,
        format!(
            "reserved {} != in use {} + cached {}",
            totals.reserved_bytes, totals.in_use_bytes, totals.cached_bytes
        ),
    );
    expect(
        Some(totals.blocks_held)
            == totals
                .backend_allocations
                .checked_sub(totals.backend_releases),
        format!(
            "blocks held {} != backend allocations {} - releases {}",
            totals.blocks_held, totals.backend_allocations, totals.backend_releases
        ),
    );
    expect(
        totals.requests == totals.hits + totals.misses + totals.bypasses,
        format!(
            "requests {} != hits {} + misses {} + bypasses {}",
            totals.requests, totals.hits, totals.misses, totals.bypasses
        ),
    );
    expect(
        Some(stats.waste().total_bytes())
            == totals
                .reserved_bytes
                .checked_sub(totals.requested_live_bytes),
        format!(
            "waste {} != reserved {} - requested live {}",
            stats.waste().total_bytes(),
            totals.reserved_bytes,
            totals.requested_live_bytes
        ),
    );
    expect(
        totals.in_use_bytes >= totals.requested_live_bytes,
        format!(
            "in use {} < requested live {}",
            totals.in_use_bytes, totals.requested_live_bytes
        ),
    );
    expect(
        totals.peak_reserved_bytes >= totals.reserved_bytes,
        format!(
            "peak {} < reserved {}",
            totals.peak_reserved_bytes, totals.reserved_bytes
        ),
    );
    for device in &stats.devices {
        let held = device.totals.reserved_bytes + device.totals.pending_release_bytes;
        if let Some(budget) = budget {
            expect(
                held <= budget,
                format!(
                    "device {} holds {held} bytes (reserved {} + pending {}), over the budget \
                     of {budget}",
                    device.device,
                    device.totals.reserved_bytes,
                    device.totals.pending_release_bytes
                ),
            );
        }
        for class in &device.classes {
            let name = format!(
                "device {} class {} {:?}",
                device.device, class.class_bytes, class.kind
            );
            expect(
                class.requests == class.hits + class.misses,
                format!(
                    "{name}: requests {} != hits {} + misses {}",
                    class.requests, class.hits, class.misses
                ),
            );
            expect(
                class.in_use_bytes == class.in_use_blocks * class.class_bytes
                    && class.cached_bytes == class.cached_blocks * class.class_bytes,
                format!("{name}: bytes are not blocks × class size: {class:?}"),
            );
            expect(
                class.backend_allocations + class.arena_blocks
                    == class.backend_releases
                        + class.arena_returns
                        + class.in_use_blocks
                        + class.cached_blocks,
                format!(
                    "{name}: allocations {} + arena blocks {} != releases {} + arena returns {} \
                     + in use {} + cached {}",
                    class.backend_allocations,
                    class.arena_blocks,
                    class.backend_releases,
                    class.arena_returns,
                    class.in_use_blocks,
                    class.cached_blocks
                ),
            );
        }
    }
    failures
}

/// Checks one snapshot, against the previous one this thread took.
fn check_snapshot<D: Device>(
    shared: &Shared<D>,
    stats: &PoolStats,
    previous: &mut Option<Monotone>,
    who: &str,
) {
    for failure in snapshot_failures(stats, shared.setup.budget) {
        shared
            .violations
            .report(format!("{who}: snapshot identity: {failure}"));
    }
    let now = Monotone::of(stats);
    if let Some(earlier) = previous {
        if !now.not_below(earlier) {
            shared.violations.report(format!(
                "{who}: counters went backwards: {earlier:?} then {now:?}"
            ));
        }
    }
    *previous = Some(now);
}

// ---------------------------------------------------------------------------------------------
// The threads.

/// Request sizes from 1 B to `max`: log-uniform, half the time skewed further to small sizes,
/// one in twenty an edge (class, arena threshold, page).
pub(crate) fn request_bytes(random: &mut SplitMix64, max: usize) -> usize {
    const EDGES: [usize; 11] = [
        1,
        255,
        256,
        257,
        4 * KIB,
        MIB - 1,
        MIB,
        MIB + 1,
        2 * MIB,
        2 * MIB + 1,
        4 * MIB,
    ];
    if random.chance(20) {
        return EDGES[random.below(EDGES.len())].min(max);
    }
    let top = max.ilog2() as usize;
    let mut exponent = random.below(top + 1);
    if random.chance(2) {
        exponent = exponent.min(random.below(top + 1));
    }
    let low = 1usize << exponent;
    (low + random.below(low)).min(max)
}

fn allocate<D: Device>(
    shared: &Shared<D>,
    manager: &MemoryManager,
    random: &mut SplitMix64,
    owner: Owner,
    counts: &mut Counts,
) -> Option<Live> {
    let setup = &shared.setup;
    let bytes = request_bytes(random, setup.max_request);
    let device = random.below(setup.devices);
    let stream = StreamId(random.below(STREAMS as usize) as u64);
    // The sim also offers host-visible memory (without a host pointer): a second set of
    // classes and arenas.
    let kind =
        (setup.device == DeviceChoice::Sim && random.chance(8)).then_some(MemoryKind::HostVisible);
    let options = AllocOptions {
        device,
        kind,
        stream,
    };
    let buffer = match manager.allocate_with::<u8>(bytes, options) {
        Ok(buffer) => buffer,
        Err(error) => {
            counts.failed += 1;
            let clean = match &error {
                PoolError::BudgetExceeded { .. } => {
                    counts.failed_budget += 1;
                    setup.budget.is_some()
                }
                PoolError::OutOfMemory { .. } => {
                    counts.failed_out_of_memory += 1;
                    true
                }
                PoolError::Backend { .. } => {
                    counts.failed_backend += 1;
                    setup.fault_kind == FaultKind::DriverError && setup.fault_probability > 0.0
                }
                _ => false,
            };
            if !clean {
                shared.violations.report(format!(
                    "{owner}: allocation of {bytes} bytes failed with an unexpected error: \
                     {error:?}"
                ));
            }
            return None;
        }
    };
    counts.allocations += 1;
    let expected_kind = kind.unwrap_or(shared.devices[device].kinds()[0]);
    if buffer.len() != bytes
        || buffer.requested_bytes() != bytes
        || buffer.block_bytes() < bytes
        || buffer.stream() != stream
        || buffer.device() != device
        || buffer.kind() != expected_kind
    {
        shared.violations.report(format!(
            "{owner}: a request of {bytes} bytes on device {device}, stream {stream:?}, kind \
             {expected_kind:?} got {buffer:?} (stream {:?})",
            buffer.stream()
        ));
    }
    let mut live = Live {
        buffer,
        device,
        owner,
        tracked: false,
        pattern_offset: None,
        extra_streams: Vec::new(),
        used_by: Vec::new(),
    };
    live.tracked = shared.insert_interval(&live, counts);
    shared.check_handed_out(&live, counts);
    if live.tracked && live.buffer.host_ptr().is_some() && shared.first_host_access(&live, counts) {
        if setup.zero_on_reuse {
            shared.check_zeroed(&live, counts);
        }
        if let Err(error) = shared.write_pattern(&mut live, pattern_offset(owner)) {
            shared
                .violations
                .report(format!("{owner}: host access failed: {error}"));
        }
    }
    Some(live)
}

fn worker<D: Device>(shared: &Shared<D>, manager: MemoryManager, thread: usize) -> Counts {
    let setup = &shared.setup;
    let mut random = SplitMix64::new(setup.seed.wrapping_add((thread as u64 + 1) << 40));
    let mut counts = Counts::default();
    let mut live: Vec<Live> = Vec::new();
    let mut seq = 0u64;
    let mut pooling_back_at: Option<u64> = None;
    let mut previous: Option<Monotone> = None;
    let mut peak = 0u64;
    let who = format!("thread {thread}");
    for op in 0..setup.ops_per_thread {
        if op % 256 == 255 {
            shared.progress.fetch_add(256, Ordering::Relaxed);
        }
        if pooling_back_at == Some(op) {
            manager.set_pooling(true);
            pooling_back_at = None;
        }
        counts.ops += 1;
        match random.below(10_000) {
            0..4_500 => {
                if live.len() >= MAX_LIVE {
                    let victim = live.swap_remove(random.below(live.len()));
                    shared.retire(victim, &mut counts);
                }
                let owner = Owner {
                    thread: thread as u32,
                    seq,
                };
                seq += 1;
                if let Some(buffer) = allocate(shared, &manager, &mut random, owner, &mut counts) {
                    live.push(buffer);
                }
            }
            4_500..8_300 => {
                if !live.is_empty() {
                    let victim = live.swap_remove(random.below(live.len()));
                    shared.retire(victim, &mut counts);
                }
            }
            8_300..8_600 => {
                // Hand a buffer to another thread, or take one another thread handed over.
                counts.handoffs += 1;
                let mut exchange = lock(&shared.exchange);
                if random.chance(2) && !live.is_empty() && exchange.len() < MAX_EXCHANGE {
                    exchange.push(live.swap_remove(random.below(live.len())));
                } else if !exchange.is_empty() && live.len() < MAX_LIVE {
                    let index = random.below(exchange.len());
                    live.push(exchange.swap_remove(index));
                }
            }
            8_600..9_200 => {
                if !live.is_empty() {
                    counts.record_streams += 1;
                    let index = random.below(live.len());
                    let own = live[index].buffer.stream().0;
                    let other =
                        StreamId((own + 1 + random.below(STREAMS as usize - 1) as u64) % STREAMS);
                    live[index].buffer.record_stream(other);
                    if !live[index].extra_streams.contains(&other) {
                        live[index].extra_streams.push(other);
                    }
                }
            }
            9_200..9_300 => {
                // GPU work on some stream uses the buffer, through a fence of the device.
                if !live.is_empty() {
                    let index = random.below(live.len());
                    let device = &shared.devices[live[index].device];
                    if let Some(streams) = device.stream_ordered() {
                        let stream = StreamId(random.below(STREAMS as usize) as u64);
                        let queued_before = device.work().map_or(0, StreamWork::now);
                        // An injected fence fault: the work is not queued, nothing to declare.
                        if let Ok(fence) = streams.record_fence(stream) {
                            counts.fences_used += 1;
                            live[index].buffer.used_by(fence);
                            live[index].used_by.push((stream, queued_before));
                        }
                    }
                }
            }
            9_300..9_340 => {
                counts.trims += 1;
                manager.trim(TrimLevel::Normal);
            }
            9_340..9_360 => {
                counts.trims += 1;
                manager.trim(TrimLevel::Aggressive);
            }
            9_360..9_365 => {
                counts.clears += 1;
                manager.clear();
            }
            9_365..9_415 => {
                counts.maintenance += 1;
                manager.run_maintenance();
            }
            9_415..9_435 => {
                counts.defragments += 1;
                manager.defragment();
            }
            9_435..9_485 => {
                counts.prewarms += 1;
                let bytes = request_bytes(&mut random, setup.max_request);
                let count = random.below(5);
                let options = AllocOptions {
                    device: random.below(setup.devices),
                    kind: None,
                    stream: StreamId(random.below(STREAMS as usize) as u64),
                };
                match manager.prewarm_with(bytes, count, options) {
                    Ok(served) if served <= count => {}
                    Ok(served) => shared.violations.report(format!(
                        "{who}: prewarm of {count} × {bytes} bytes says it serves {served}"
                    )),
                    Err(error) => {
                        counts.prewarm_failures += 1;
                        let clean = match &error {
                            PoolError::BudgetExceeded { .. } => setup.budget.is_some(),
                            PoolError::OutOfMemory { .. } | PoolError::TooLarge { .. } => true,
                            PoolError::Backend { .. } => setup.fault_kind == FaultKind::DriverError,
                            _ => false,
                        };
                        if !clean {
                            shared.violations.report(format!(
                                "{who}: prewarm of {count} × {bytes} bytes failed with an \
                                 unexpected error: {error:?}"
                            ));
                        }
                    }
                }
            }
            9_485..9_685 => {
                counts.snapshots_checked += 1;
                let stats = manager.stats();
                check_snapshot(shared, &stats, &mut previous, &who);
            }
            9_685..9_686 => {
                if pooling_back_at.is_none() && random.chance(4) {
                    counts.pooling_off += 1;
                    manager.set_pooling(false);
                    pooling_back_at = Some(op + 20 + random.below(300) as u64);
                }
            }
            _ => {
                let now = manager.peak_reserved_bytes();
                if now < peak {
                    shared.violations.report(format!(
                        "{who}: peak reserved bytes went down from {peak} to {now}"
                    ));
                }
                peak = now;
                let pressure = manager.memory_pressure();
                if !pressure.is_finite() || pressure < 0.0 {
                    shared
                        .violations
                        .report(format!("{who}: memory pressure {pressure}"));
                }
            }
        }
    }
    if pooling_back_at.is_some() {
        manager.set_pooling(true);
    }
    shared.finished.fetch_add(1, Ordering::Relaxed);
    match setup.teardown {
        // What is left goes to the exchange: the teardown drops it with the pool at rest.
        Teardown::DropBuffersFirst => lock(&shared.exchange).append(&mut live),
        // This thread's handle goes first; the last handle (the sampler's or a worker's) drops
        // while other threads still drop buffers.
        Teardown::BuffersOutlive => {
            drop(manager);
            for buffer in live {
                shared.retire(buffer, &mut counts);
            }
        }
    }
    counts
}

/// What the sampler thread saw.
#[derive(Clone, Copy, Debug, Default)]
struct SamplerCounts {
    snapshots: u64,
    ledger_reads: u64,
}

fn sampler<D: Device>(shared: &Shared<D>, manager: MemoryManager) -> SamplerCounts {
    let mut counts = SamplerCounts::default();
    let mut previous = None;
    let mut last_progress = (0, Instant::now());
    // Until the workers are done (it holds a handle, which `BuffersOutlive` wants gone then).
    while !shared.stop.load(Ordering::Relaxed)
        && shared.finished.load(Ordering::Relaxed) < shared.setup.threads
    {
        let stats = manager.stats();
        check_snapshot(shared, &stats, &mut previous, "sampler");
        counts.snapshots += 1;
        if let Some(budget) = shared.setup.budget {
            for (index, device) in shared.devices.iter().enumerate() {
                counts.ledger_reads += 1;
                let held = device.ledger().live_bytes;
                if held > budget {
                    shared.violations.report(format!(
                        "device {index} holds {held} bytes by its ledger, over the budget of \
                         {budget}"
                    ));
                }
            }
        }
        // A deadlock watchdog: no progress for this long is not slowness.
        let progress = shared.progress.load(Ordering::Relaxed);
        if progress != last_progress.0 {
            last_progress = (progress, Instant::now());
        } else if !cfg!(miri) && last_progress.1.elapsed() > Duration::from_secs(300) {
            eprintln!(
                "stress {}: no operation finished for 300 s: deadlock; aborting",
                shared.setup.name
            );
            std::process::abort();
        }
        // Under Miri a snapshot costs as much as hundreds of operations: fewer of them.
        std::thread::sleep(Duration::from_millis(if cfg!(miri) { 20 } else { 2 }));
    }
    counts
}

fn gpu<D: Device>(shared: &Shared<D>) -> u64 {
    let mut random = SplitMix64::new(shared.setup.seed ^ 0x0067_7075);
    let mut rounds = 0;
    let period = shared.setup.gpu_period.as_micros().max(1) as usize;
    while !shared.stop.load(Ordering::Relaxed) {
        for device in &shared.devices {
            device.complete_fences();
        }
        rounds += 1;
        std::thread::sleep(Duration::from_micros(random.below(period) as u64));
    }
    rounds
}

// ---------------------------------------------------------------------------------------------
// A run.

/// The figures of one run.
#[derive(Debug)]
struct Report {
    name: &'static str,
    threads: usize,
    ops: u64,
    seconds: f64,
    ledger: Ledger,
    counts: Counts,
    sampler: SamplerCounts,
    work: WorkFigures,
    gpu_rounds: u64,
    violations: u64,
    first_violations: Vec<String>,
}

/// What the models of queued work saw, over every device.
#[derive(Debug, Default)]
struct WorkFigures {
    /// Releases and unmaps checked.
    release_checks: u64,
    /// Releases of busy blocks as the manager dropped after a failed wait (accepted).
    busy_at_end: u64,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        let injected = self
            .ledger
            .injected
            .map_or("n/a".to_string(), |n| n.to_string());
        write!(
            f,
            "stress {}: {} threads, {} ops in {:.2} s ({:.0} ops/s); device: {} attempts, {} \
             refusals (injected faults {injected}), {} allocations, {} fence faults, {} \
             synchronize faults, {} stream-wait faults; allocations: {} ok, {} failed ({} \
             budget, {} out of memory, {} backend); {} drops, {} hand-offs, {} record_stream, {} \
             used_by, {} trims, {} clears, {} maintenance, {} defragment, {} prewarms ({} \
             failed), {} pooling off, {} host accesses refused; checks: {} snapshots by \
             workers, {} by the sampler, {} ledger reads, {} overlap checks, {} pattern checks, \
             {} zero checks, {} bytes compared, {} hand-outs and host accesses and {} releases \
             checked against queued work ({} busy releases as the manager dropped); {} GPU \
             rounds; violations: {}",
            self.name,
            self.threads,
            self.ops,
            self.seconds,
            self.ops as f64 / self.seconds.max(1e-9),
            self.ledger.attempts,
            self.ledger.refusals,
            self.ledger.allocations,
            self.ledger.fence_faults,
            self.ledger.sync_faults,
            self.ledger.stream_wait_faults,
            c.allocations,
            c.failed,
            c.failed_budget,
            c.failed_out_of_memory,
            c.failed_backend,
            c.drops,
            c.handoffs,
            c.record_streams,
            c.fences_used,
            c.trims,
            c.clears,
            c.maintenance,
            c.defragments,
            c.prewarms,
            c.prewarm_failures,
            c.pooling_off,
            c.host_access_refused,
            c.snapshots_checked,
            self.sampler.snapshots,
            self.sampler.ledger_reads,
            c.overlap_checks,
            c.pattern_checks,
            c.zero_checks,
            c.bytes_checked,
            c.work_checks,
            self.work.release_checks,
            self.work.busy_at_end,
            self.gpu_rounds,
            self.violations
        )
    }
}

fn sum_ledgers(ledgers: impl Iterator<Item = Ledger>) -> Ledger {
    ledgers.fold(Ledger::default(), |sum, l| Ledger {
        attempts: sum.attempts + l.attempts,
        allocations: sum.allocations + l.allocations,
        releases: sum.releases + l.releases,
        refusals: sum.refusals + l.refusals,
        injected: match (sum.injected, l.injected) {
            (Some(a), Some(b)) => Some(a + b),
            (None, Some(b)) if sum == Ledger::default() => Some(b),
            _ => None,
        },
        live_allocations: sum.live_allocations + l.live_allocations,
        live_bytes: sum.live_bytes + l.live_bytes,
        invalid_releases: sum.invalid_releases + l.invalid_releases,
        fence_faults: sum.fence_faults + l.fence_faults,
        sync_faults: sum.sync_faults + l.sync_faults,
        stream_wait_faults: sum.stream_wait_faults + l.stream_wait_faults,
    })
}

/// The pool at rest, every buffer dropped: nothing in use, every request counted, the ledger
/// agrees; after a clear with the fences complete, the device holds nothing.
fn check_at_rest<D: Device>(shared: &Shared<D>, manager: &MemoryManager, counts: &Counts) {
    let report = |message: String| shared.violations.report(format!("at rest: {message}"));
    let stats = manager.stats();
    for failure in snapshot_failures(&stats, shared.setup.budget) {
        report(failure);
    }
    let totals = &stats.totals;
    if (totals.in_use_bytes, totals.requested_live_bytes) != (0, 0) {
        report(format!(
            "in use {} and requested live {} bytes with no buffer alive",
            totals.in_use_bytes, totals.requested_live_bytes
        ));
    }
    if (totals.requests, totals.failed_requests) != (counts.allocations, counts.failed) {
        report(format!(
            "(requests, failed) = ({}, {}), the workers saw ({}, {})",
            totals.requests, totals.failed_requests, counts.allocations, counts.failed
        ));
    }
    // Background maintenance may release idle blocks between the snapshot and the ledger's
    // reading: compare a snapshot taken while the ledger stood still, retrying a while.
    let mut mismatch = None;
    for _ in 0..200 {
        let before = sum_ledgers(shared.devices.iter().map(Device::ledger));
        let totals = manager.stats().totals;
        let after = sum_ledgers(shared.devices.iter().map(Device::ledger));
        let agrees = totals.blocks_held + totals.pending_release_blocks == after.live_allocations
            && totals.reserved_bytes + totals.pending_release_bytes == after.live_bytes;
        if agrees && before == after {
            mismatch = None;
            break;
        }
        mismatch = Some(format!(
            "the pool holds {} blocks + {} pending, {} bytes + {} pending; the device {} \
             allocations, {} bytes",
            totals.blocks_held,
            totals.pending_release_blocks,
            totals.reserved_bytes,
            totals.pending_release_bytes,
            after.live_allocations,
            after.live_bytes
        ));
        std::thread::sleep(Duration::from_micros(500));
    }
    if let Some(message) = mismatch {
        report(message);
    }
    // Releases wait for fences recorded at release time: complete them, and the next clear
    // releases what the previous one deferred. (Clears record fences, which may fail: a few
    // more rounds then.)
    for _ in 0..20 {
        manager.clear();
        let empty = shared
            .devices
            .iter()
            .all(|device| device.ledger().live_allocations == 0);
        if empty {
            break;
        }
        shared.devices.iter().for_each(Device::complete_fences);
    }
    for (index, device) in shared.devices.iter().enumerate() {
        let ledger = device.ledger();
        if (ledger.live_allocations, ledger.live_bytes) != (0, 0) {
            // Where the pool says they are, to tell a stuck block from a slow clean-up.
            let stats = manager.stats();
            let pool = stats.devices.get(index);
            report(format!(
                "device {index} still holds {} allocations, {} bytes after clearing with no \
                 buffer alive; the pool: {} blocks held, {} pending release ({} bytes), {} \
                 bytes cached, large arena {} segments with {} free bytes",
                ledger.live_allocations,
                ledger.live_bytes,
                stats.totals.blocks_held,
                stats.totals.pending_release_blocks,
                stats.totals.pending_release_bytes,
                stats.totals.cached_bytes,
                pool.map_or(0, |pool| pool.large.segments),
                pool.map_or(0, |pool| pool.large.free_bytes),
            ));
        }
    }
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// A buffer of one byte that outlives every other (see `run`), in the interval map like them.
fn last_buffer<D: Device>(shared: &Shared<D>, manager: &MemoryManager) -> Live {
    let options = AllocOptions {
        device: 0,
        kind: None,
        stream: StreamId(0),
    };
    let buffer = (0..1_000)
        .find_map(|_| manager.allocate_with::<u8>(1, options).ok())
        .expect("one byte in a thousand attempts");
    let mut live = Live {
        buffer,
        device: 0,
        owner: Owner {
            thread: u32::MAX,
            seq: 0,
        },
        tracked: false,
        pattern_offset: None,
        extra_streams: Vec::new(),
        used_by: Vec::new(),
    };
    live.tracked = shared.insert_interval(&live, &mut Counts::default());
    live
}

/// The manager drops next: when its last wait fails, it releases everything all the same
/// (`Upstream::release_all_at_end`), and the model accepts it from here on.
fn manager_ends<D: Device>(shared: &Shared<D>) {
    for work in shared.devices.iter().filter_map(Device::work) {
        work.ending.store(true, Ordering::SeqCst);
    }
}

fn run<D: Device>(setup: &Setup) -> Report {
    let shared = Shared::<D>::new(setup);
    let mut manager = Some(shared.manager());
    // When buffers outlive the manager, whichever drops last drops the manager: a buffer kept
    // here until the end makes that moment known.
    let last_buffer = (setup.teardown == Teardown::BuffersOutlive)
        .then(|| last_buffer(&shared, manager.as_ref().expect("the manager")));
    let start = Instant::now();
    let mut counts = Counts::default();
    let (sampler_counts, gpu_rounds) = std::thread::scope(|scope| {
        let handle = manager.as_ref().expect("the manager");
        let sampler_manager = handle.clone();
        let sampler = scope.spawn(|| sampler(&shared, sampler_manager));
        let gpu = scope.spawn(|| gpu(&shared));
        let workers: Vec<_> = (0..setup.threads)
            .map(|thread| {
                let manager = handle.clone();
                let shared = &shared;
                scope.spawn(move || worker(shared, manager, thread))
            })
            .collect();
        if setup.teardown == Teardown::BuffersOutlive {
            manager = None; // the threads hold the only handles now
        }
        for (thread, handle) in workers.into_iter().enumerate() {
            match handle.join() {
                Ok(thread_counts) => counts.add(&thread_counts),
                Err(payload) => shared.violations.report(format!(
                    "thread {thread} panicked: {}",
                    panic_message(payload.as_ref())
                )),
            }
        }
        shared.stop.store(true, Ordering::Relaxed);
        let sampler_counts = sampler.join().unwrap_or_else(|payload| {
            shared.violations.report(format!(
                "the sampler panicked: {}",
                panic_message(payload.as_ref())
            ));
            SamplerCounts::default()
        });
        let gpu_rounds = gpu.join().unwrap_or(0);
        (sampler_counts, gpu_rounds)
    });

    let leftovers = std::mem::take(&mut *lock(&shared.exchange));
    match manager {
        Some(manager) => {
            for live in leftovers {
                shared.retire(live, &mut counts);
            }
            check_at_rest(&shared, &manager, &counts);
            manager_ends(&shared);
            drop(manager);
        }
        None => {
            // The handles are gone; what the hand-off holds drops from a few threads at once.
            let mut chunks: Vec<Vec<Live>> = (0..4).map(|_| Vec::new()).collect();
            for (index, live) in leftovers.into_iter().enumerate() {
                chunks[index % 4].push(live);
            }
            let shared = &shared;
            let dropped: Vec<Counts> = std::thread::scope(|scope| {
                let handles: Vec<_> = chunks
                    .into_iter()
                    .map(|chunk| {
                        scope.spawn(move || {
                            let mut counts = Counts::default();
                            for live in chunk {
                                shared.retire(live, &mut counts);
                            }
                            counts
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|handle| handle.join().expect("dropping buffers panicked"))
                    .collect()
            });
            dropped.iter().for_each(|more| counts.add(more));
            manager_ends(shared);
            if let Some(last) = last_buffer {
                shared.retire(last, &mut Counts::default());
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();

    // Nothing leaked, nothing released twice: the pool's drop synchronises before releasing
    // what waits for fences, so no fence needs completing here.
    for (index, device) in shared.devices.iter().enumerate() {
        let ledger = device.ledger();
        if (
            ledger.live_allocations,
            ledger.live_bytes,
            ledger.invalid_releases,
        ) != (0, 0, 0)
        {
            shared.violations.report(format!(
                "device {index} after the pool and every buffer are gone: {ledger:?}"
            ));
        }
    }
    let mut work = WorkFigures::default();
    for (index, device) in shared.devices.iter().enumerate() {
        if let Some(model) = device.work() {
            shared
                .violations
                .absorb(&model.violations, &format!("device {index}: "));
            work.release_checks += model.release_checks.load(Ordering::Relaxed);
            work.busy_at_end += model.busy_at_end.load(Ordering::Relaxed);
        }
    }
    for (index, map) in shared.intervals.iter().enumerate() {
        let left = lock(map).len();
        if left != 0 {
            shared
                .violations
                .report(format!("device {index}: {left} ranges left in the map"));
        }
    }
    let first_violations = lock(&shared.violations.first).clone();
    Report {
        name: setup.name,
        threads: setup.threads,
        ops: counts.ops,
        seconds,
        ledger: sum_ledgers(shared.devices.iter().map(Device::ledger)),
        counts,
        sampler: sampler_counts,
        work,
        gpu_rounds,
        violations: shared.violations.count(),
        first_violations,
    }
}

fn run_setup(setup: &Setup) -> Report {
    match setup.device {
        DeviceChoice::Sim => run::<FlakyFences<SimBackend>>(setup),
        DeviceChoice::Host => run::<FlakyFences<HostDevice>>(setup),
    }
}

fn run_and_check(mut setup: Setup) {
    setup.seed = env_or("GPUPOOL_STRESS_SEED", setup.seed);
    let report = run_setup(&setup);
    println!("{report}");
    assert_eq!(
        report.violations, 0,
        "{}: {} violations, the first: {:#?}",
        report.name, report.violations, report.first_violations
    );
    assert_eq!(report.ops, setup.threads as u64 * setup.ops_per_thread);
    assert!(report.counts.allocations > 0, "{report}");
}

// ---------------------------------------------------------------------------------------------
// The tests.

// The default tests: 8 threads × 20,000 operations in all, spread over the setups so the suite
// stays within seconds on a 2-core machine in a debug build.

#[test]
fn stress_sim_with_budget_faults_and_virtual_memory() {
    run_and_check(Setup::budget_faults_virtual_memory().sized(8, 4_000));
}

#[test]
fn stress_sim_without_budget_on_segments() {
    run_and_check(Setup::no_budget_segments().sized(8, 4_000));
}

#[test]
fn stress_sim_small_device_with_carved_class_blocks() {
    run_and_check(Setup::small_device_carved().sized(8, 4_000));
}

#[test]
fn stress_host_data_with_budget_faults_and_zeroing() {
    run_and_check(Setup::host_data().sized(8, 4_000));
}

#[test]
fn stress_host_data_without_budget() {
    run_and_check(Setup::host_data_plain().sized(8, 4_000));
}

/// The setups of the long run, by name.
fn long_setups() -> Vec<Setup> {
    vec![
        Setup::budget_faults_virtual_memory(),
        Setup::no_budget_segments(),
        Setup::small_device_carved(),
        Setup::host_data(),
        Setup::host_data_plain(),
    ]
}

pub(crate) fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(value) => value
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
        Err(_) => default,
    }
}

/// The long run: `GPUPOOL_STRESS_THREADS` threads (default 16) doing `GPUPOOL_STRESS_OPS`
/// operations in all (default 10^7) on each setup of `GPUPOOL_STRESS_SETUPS` (default all).
#[test]
#[ignore = "long: minutes in release mode; run with --ignored --nocapture"]
fn stress_long() {
    let threads: usize = env_or("GPUPOOL_STRESS_THREADS", 16);
    let ops: u64 = env_or("GPUPOOL_STRESS_OPS", 10_000_000);
    let seed: u64 = env_or(
        "GPUPOOL_STRESS_SEED",
        Setup::base("", DeviceChoice::Sim).seed,
    );
    let wanted = std::env::var("GPUPOOL_STRESS_SETUPS").ok();
    let mut failed = Vec::new();
    for mut setup in long_setups() {
        if let Some(wanted) = &wanted {
            if !wanted.split(',').any(|name| name.trim() == setup.name) {
                continue;
            }
        }
        setup.threads = threads;
        setup.ops_per_thread = ops.div_ceil(threads as u64);
        setup.seed = seed;
        let report = run_setup(&setup);
        println!("{report}");
        if report.violations != 0 {
            failed.push((report.name, report.violations, report.first_violations));
        }
    }
    assert!(failed.is_empty(), "violations: {failed:#?}");
}
