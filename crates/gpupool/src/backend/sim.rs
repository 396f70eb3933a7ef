//! The `sim` backend: an accounting-only device.
//!
//! It touches no memory: it hands out synthetic, aligned, never-reused addresses and keeps a
//! ledger of live allocations, so tests can prove that nothing leaks or is released twice, and
//! traces larger than RAM can be replayed. It models a device's capacity, an allocation latency
//! (a fixed cost plus a per-byte cost, spent spinning), injected faults, and optionally
//! asynchronous streams whose fences complete only when the test says so.
//!
//! Fault probabilities use a seeded SplitMix64 generator written here (six lines): a
//! reproducible sequence is all that is needed, and it keeps `rand` out of the library.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{
    Backend, BackendError, Block, Fence, MemoryInfo, MemoryKind, PoolAccess, StreamId,
    StreamOrdered, VirtualMemory, Zeroing,
};
use crate::size_class::BLOCK_ALIGN;

/// When the simulated device refuses an allocation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FaultPlan {
    /// Never.
    None,
    /// The `n`-th allocation attempt (1-based) fails, once.
    Nth(u64),
    /// Every `n`-th attempt fails.
    EveryNth(u64),
    /// Each attempt fails with probability `probability`, from a seeded generator.
    Probability {
        /// Chance of failure, 0..=1.
        probability: f64,
        /// Generator seed.
        seed: u64,
    },
}

/// What an injected fault looks like to the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// The driver reports out of memory (the pool releases idle blocks and retries).
    OutOfMemory,
    /// Any other driver error (the pool reports it at once).
    DriverError,
}

/// Settings of a simulated device.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Device memory in bytes; allocations beyond it fail with out-of-memory.
    pub capacity_bytes: u64,
    /// Fixed cost of each allocation.
    pub fixed_latency: Duration,
    /// Extra cost per allocated byte, in nanoseconds.
    pub latency_ns_per_byte: f64,
    /// Injected failures.
    pub faults: FaultPlan,
    /// How injected failures look.
    pub fault_kind: FaultKind,
    /// Whether streams are asynchronous: fences complete only on [`SimBackend::complete_fences`]
    /// or `synchronize`.
    pub asynchronous: bool,
    /// The kinds offered; the first is the default.
    pub kinds: Vec<MemoryKind>,
    /// Whether the device offers virtual memory ([`VirtualMemory`]): address space reserved
    /// up front, physical pages of [`SIM_PAGE_BYTES`] mapped and counted as allocations.
    pub virtual_memory: bool,
}

/// The simulated device's virtual-memory granularity (CUDA's on an H100 or H200).
pub const SIM_PAGE_BYTES: usize = 2 << 20;

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            capacity_bytes: 80 << 30,
            fixed_latency: Duration::ZERO,
            latency_ns_per_byte: 0.0,
            faults: FaultPlan::None,
            fault_kind: FaultKind::OutOfMemory,
            asynchronous: false,
            kinds: vec![MemoryKind::Device, MemoryKind::HostVisible],
            virtual_memory: false,
        }
    }
}

/// The ledger's figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// Successful allocations.
    pub allocations: u64,
    /// Releases.
    pub releases: u64,
    /// Allocation attempts refused (faults or capacity).
    pub refusals: u64,
    /// Allocations not yet released.
    pub live_allocations: u64,
    /// Bytes not yet released.
    pub live_bytes: u64,
    /// Highest `live_bytes`.
    pub peak_live_bytes: u64,
    /// Releases of blocks the ledger did not know (double or foreign releases).
    pub invalid_releases: u64,
    /// Calls to `synchronize`.
    pub synchronizations: u64,
    /// Address space reserved through [`VirtualMemory`] (not memory).
    pub reserved_address_bytes: u64,
}

struct Ledger {
    next_address: u64,
    live: HashMap<u64, usize>,
    attempts: u64,
    random_state: u64,
    counters: SimCounters,
    fences: Vec<Arc<SimFence>>,
}

/// A fence of the simulated device.
#[derive(Debug, Default)]
pub struct SimFence {
    complete: AtomicBool,
}

impl Fence for SimFence {
    fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Acquire)
    }
}

/// An accounting-only device; clones share one ledger, so a test can keep a clone to inspect.
#[derive(Clone)]
pub struct SimBackend {
    config: Arc<SimConfig>,
    ledger: Arc<Mutex<Ledger>>,
}

impl Default for SimBackend {
    fn default() -> Self {
        SimBackend::new(SimConfig::default())
    }
}

impl std::fmt::Debug for SimBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBackend")
            .field("config", &self.config)
            .field("counters", &self.counters())
            .finish()
    }
}

/// The first synthetic address: far from null so a zero address never appears.
const FIRST_ADDRESS: u64 = 0x7f00_0000_0000;

fn split_mix_64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut mixed = *state;
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    mixed ^ (mixed >> 31)
}

impl SimBackend {
    /// A simulated device with these settings.
    pub fn new(config: SimConfig) -> SimBackend {
        let seed = match config.faults {
            FaultPlan::Probability { seed, .. } => seed,
            _ => 0,
        };
        SimBackend {
            config: Arc::new(config),
            ledger: Arc::new(Mutex::new(Ledger {
                next_address: FIRST_ADDRESS,
                live: HashMap::new(),
                attempts: 0,
                random_state: seed,
                counters: SimCounters::default(),
                fences: Vec::new(),
            })),
        }
    }

    /// A simulated device of `capacity_bytes` with default settings otherwise.
    pub fn with_capacity(capacity_bytes: u64) -> SimBackend {
        SimBackend::new(SimConfig {
            capacity_bytes,
            ..SimConfig::default()
        })
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The ledger's figures now.
    pub fn counters(&self) -> SimCounters {
        self.ledger().counters
    }

    /// Completes every fence recorded so far (the simulated GPU catches up).
    pub fn complete_fences(&self) {
        for fence in self.ledger().fences.drain(..) {
            fence.complete.store(true, Ordering::Release);
        }
    }

    /// Whether this attempt is an injected fault.
    fn injected_fault(&self, ledger: &mut Ledger) -> bool {
        let attempt = ledger.attempts;
        match self.config.faults {
            FaultPlan::None => false,
            FaultPlan::Nth(n) => attempt == n,
            FaultPlan::EveryNth(n) => n > 0 && attempt.is_multiple_of(n),
            FaultPlan::Probability { probability, .. } => {
                let draw = split_mix_64(&mut ledger.random_state) >> 11;
                (draw as f64 / (1u64 << 53) as f64) < probability
            }
        }
    }

    /// One attempt to take `bytes` of the device (an allocation or a mapping): its latency,
    /// then capacity and injected faults; the ledger, locked, when it may go ahead.
    fn attempt(&self, bytes: usize) -> Result<std::sync::MutexGuard<'_, Ledger>, BackendError> {
        self.spend_latency(bytes);
        let mut ledger = self.ledger();
        ledger.attempts += 1;
        let over_capacity = ledger.counters.live_bytes + bytes as u64 > self.config.capacity_bytes;
        if over_capacity || self.injected_fault(&mut ledger) {
            ledger.counters.refusals += 1;
            return Err(match (over_capacity, self.config.fault_kind) {
                (false, FaultKind::DriverError) => {
                    BackendError::Driver("injected driver fault".into())
                }
                _ => BackendError::OutOfMemory,
            });
        }
        Ok(ledger)
    }

    fn spend_latency(&self, bytes: usize) {
        let cost = self.config.fixed_latency
            + Duration::from_nanos((self.config.latency_ns_per_byte * bytes as f64) as u64);
        if cost.is_zero() {
            return;
        }
        let start = Instant::now();
        while start.elapsed() < cost {
            std::hint::spin_loop();
        }
    }
}

impl Backend for SimBackend {
    fn name(&self) -> &str {
        "sim"
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn device_name(&self) -> String {
        // The capacity in the largest IEC unit that divides it (80 GiB, 1536 KiB), else bytes.
        let capacity = self.config.capacity_bytes;
        let (value, unit) = [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")]
            .into_iter()
            .find(|&(shift, _)| capacity >= 1 << shift && capacity.is_multiple_of(1 << shift))
            .map_or((capacity, "B"), |(shift, unit)| (capacity >> shift, unit));
        format!("simulated device ({value} {unit})")
    }

    fn kinds(&self) -> &[MemoryKind] {
        &self.config.kinds
    }

    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        if !self.config.kinds.contains(&kind) {
            return Err(BackendError::UnsupportedKind(kind));
        }
        if bytes as u64 > self.config.capacity_bytes {
            return Err(BackendError::TooLarge {
                limit: self.config.capacity_bytes,
            });
        }
        let mut ledger = self.attempt(bytes)?;
        let address = ledger.next_address;
        ledger.next_address += (bytes as u64).next_multiple_of(BLOCK_ALIGN as u64);
        ledger.live.insert(address, bytes);
        let counters = &mut ledger.counters;
        counters.allocations += 1;
        counters.live_allocations += 1;
        counters.live_bytes += bytes as u64;
        counters.peak_live_bytes = counters.peak_live_bytes.max(counters.live_bytes);
        // SAFETY: the block has no host pointer, so it promises nothing about host memory; the
        // synthetic address range is owned by this block alone (addresses are never reused).
        Ok(unsafe { Block::new(address, None, bytes, kind, address) })
    }

    fn release(&self, block: Block) {
        let mut ledger = self.ledger();
        match ledger.live.remove(&block.token()) {
            Some(bytes) if bytes == block.bytes() => {
                ledger.counters.releases += 1;
                ledger.counters.live_allocations -= 1;
                ledger.counters.live_bytes -= bytes as u64;
            }
            _ => ledger.counters.invalid_releases += 1,
        }
    }

    fn memory_info(&self) -> Option<MemoryInfo> {
        let live = self.ledger().counters.live_bytes;
        Some(MemoryInfo {
            free_bytes: self.config.capacity_bytes - live,
            total_bytes: self.config.capacity_bytes,
        })
    }

    /// Asynchronous only when configured so: its fences then complete when the test says.
    fn stream_ordered(&self) -> Option<&dyn StreamOrdered> {
        self.config
            .asynchronous
            .then_some(self as &dyn StreamOrdered)
    }

    /// Nothing to write: the sim holds no memory.
    fn zeroing(&self) -> Option<&dyn Zeroing> {
        Some(self)
    }

    fn virtual_memory(&self) -> Option<&dyn VirtualMemory> {
        self.config
            .virtual_memory
            .then_some(self as &dyn VirtualMemory)
    }
}

/// Reservations take addresses like allocations (never reused) but no capacity; a mapping is
/// an allocation in the ledger (capacity, faults, live counts), keyed by its address.
impl VirtualMemory for SimBackend {
    fn granularity(&self) -> usize {
        SIM_PAGE_BYTES
    }

    fn reserve(&self, bytes: usize) -> Result<Block, BackendError> {
        if !bytes.is_multiple_of(SIM_PAGE_BYTES) {
            return Err(BackendError::Driver(format!(
                "reservation of {bytes} bytes is not a multiple of the granularity"
            )));
        }
        let mut ledger = self.ledger();
        let address = ledger.next_address.next_multiple_of(SIM_PAGE_BYTES as u64);
        // Why checked: a reservation past the end of the 64-bit address space is refused, as a
        // driver refuses one larger than its address space (a page size near `usize::MAX`
        // asked for one and overflowed the addition here; fuzzing found it).
        let Some(end) = address.checked_add(bytes as u64) else {
            return Err(BackendError::OutOfMemory);
        };
        ledger.next_address = end;
        ledger.counters.reserved_address_bytes += bytes as u64;
        // SAFETY: the block has no host pointer, so it promises nothing about host memory; the
        // synthetic address range is this reservation's alone (addresses are never reused).
        Ok(unsafe { Block::new(address, None, bytes, MemoryKind::Device, address) })
    }

    fn unreserve(&self, reservation: Block) {
        self.ledger().counters.reserved_address_bytes -= reservation.bytes() as u64;
    }

    fn map(&self, address: u64, bytes: usize, _access: &PoolAccess) -> Result<(), BackendError> {
        let mut ledger = self.attempt(bytes)?;
        if ledger.live.insert(address, bytes).is_some() {
            ledger.counters.invalid_releases += 1; // mapped twice: as wrong as a double free
        }
        let counters = &mut ledger.counters;
        counters.allocations += 1;
        counters.live_allocations += 1;
        counters.live_bytes += bytes as u64;
        counters.peak_live_bytes = counters.peak_live_bytes.max(counters.live_bytes);
        Ok(())
    }

    fn unmap(&self, address: u64, bytes: usize, _access: &PoolAccess) {
        let mut ledger = self.ledger();
        match ledger.live.remove(&address) {
            Some(mapped) if mapped == bytes => {
                ledger.counters.releases += 1;
                ledger.counters.live_allocations -= 1;
                ledger.counters.live_bytes -= bytes as u64;
            }
            _ => ledger.counters.invalid_releases += 1,
        }
    }
}

impl StreamOrdered for SimBackend {
    fn record_fence(&self, _stream: StreamId) -> Result<Arc<dyn Fence>, BackendError> {
        let fence = Arc::new(SimFence::default());
        self.ledger().fences.push(fence.clone());
        Ok(fence)
    }

    fn synchronize(&self) -> Result<(), BackendError> {
        self.ledger().counters.synchronizations += 1;
        self.complete_fences();
        Ok(())
    }

    /// The sim's work finishes when the test completes its fences; the host has nothing to
    /// race, so host access does not wait.
    fn wait_for_stream(&self, _stream: StreamId) -> Result<(), BackendError> {
        Ok(())
    }
}

impl Zeroing for SimBackend {
    fn zero(&self, _block: &Block, _stream: StreamId) -> Result<(), BackendError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_tracks_live_blocks_and_flags_unknown_releases() {
        let sim = SimBackend::with_capacity(1 << 20);
        let first = sim.allocate(4096, MemoryKind::Device).unwrap();
        let second = sim.allocate(4096, MemoryKind::Device).unwrap();
        assert_ne!(first.device_address(), second.device_address());
        assert_eq!(sim.counters().live_bytes, 8192);
        sim.release(first);
        sim.release(second);
        // SAFETY: a forged block, only to check the ledger's detection; it has no host pointer.
        let forged = unsafe { Block::new(1, None, 4096, MemoryKind::Device, 1) };
        sim.release(forged);
        let counters = sim.counters();
        assert_eq!(counters.live_allocations, 0);
        assert_eq!(counters.invalid_releases, 1);
    }

    #[test]
    fn capacity_and_faults_refuse_allocations() {
        let sim = SimBackend::with_capacity(8192);
        let block = sim.allocate(8192, MemoryKind::Device).unwrap();
        assert_eq!(
            sim.allocate(256, MemoryKind::Device).unwrap_err(),
            BackendError::OutOfMemory
        );
        assert!(matches!(
            sim.allocate(16384, MemoryKind::Device),
            Err(BackendError::TooLarge { limit: 8192 })
        ));
        sim.release(block);

        let faulty = SimBackend::new(SimConfig {
            faults: FaultPlan::EveryNth(3),
            ..SimConfig::default()
        });
        let outcomes: Vec<bool> = (0..6)
            .map(|_| match faulty.allocate(256, MemoryKind::Device) {
                Ok(block) => {
                    faulty.release(block);
                    true
                }
                Err(_) => false,
            })
            .collect();
        assert_eq!(outcomes, [true, true, false, true, true, false]);
    }

    #[test]
    fn seeded_probability_faults_are_reproducible() {
        let run = || {
            let sim = SimBackend::new(SimConfig {
                faults: FaultPlan::Probability {
                    probability: 0.3,
                    seed: 42,
                },
                ..SimConfig::default()
            });
            (0..200)
                .map(|_| sim.allocate(256, MemoryKind::Device).is_ok())
                .collect::<Vec<_>>()
        };
        let first = run();
        assert_eq!(first, run());
        let failures = first.iter().filter(|ok| !**ok).count();
        assert!((30..90).contains(&failures), "{failures} failures of 200");
    }
}
