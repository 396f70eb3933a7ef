//! The Metal backend's pool logic, tested on every platform through a fake Metal-like device.
//!
//! `FakeMetal` behaves like `backend::metal::MetalBackend` where the pool can tell: kinds are
//! storage/CPU-cache modes (`Shared`, `Private`, `Shared` + write-combined, `Managed`), idle
//! blocks are made `Volatile` and reclaimed as `NonVolatile` (reporting `Empty` when "the OS"
//! discarded them), `record_fence` has no stream to mark and `synchronize` waits for nothing.
//! `FakeCommandBuffer` stands for an `MTLCommandBuffer` whose completed handler the test fires
//! by hand, as `CommandBufferFence`'s handler does on a Mac.
//!
//! The tests prove the properties the Metal backend relies on the pool for: caches keyed by
//! storage mode, GPU lifetime through command-buffer fences, purgeable reclaim, and trims that
//! release purgeable blocks too. On Apple targets a second module runs the real backend
//! against the machine's GPU, and skips when there is none.

use std::alloc::Layout;
use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use gpupool::backend::{BackendError, MemoryInfo, Purgeable as PurgeableCapability};
use gpupool::fence::Fence;
use gpupool::{
    AllocOptions, Backend, Block, MemoryKind, MemoryManager, PoolConfig, PoolError, PoolStats,
    TrimLevel, BLOCK_ALIGN,
};

const KIB: usize = 1024;

/// A Metal storage mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Storage {
    Shared,
    Private,
    Managed,
}

/// A Metal CPU cache mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CpuCache {
    Default,
    WriteCombined,
}

/// The resource options the real backend uses for each kind.
fn options(kind: MemoryKind) -> (Storage, CpuCache) {
    match kind {
        MemoryKind::HostVisible => (Storage::Shared, CpuCache::Default),
        MemoryKind::HostVisibleWriteCombined => (Storage::Shared, CpuCache::WriteCombined),
        MemoryKind::Device => (Storage::Private, CpuCache::Default),
        MemoryKind::Managed => (Storage::Managed, CpuCache::Default),
        other => panic!("no Metal storage mode for {other:?}"),
    }
}

/// `MTLPurgeableState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purgeable {
    NonVolatile,
    Volatile,
    Empty,
}

/// One buffer the fake driver handed out.
struct FakeBuffer {
    device_address: u64,
    kind: MemoryKind,
    storage: Storage,
    cpu_cache: CpuCache,
    bytes: usize,
    /// Host memory address (kept as an integer so the ledger is `Send`).
    host: Option<usize>,
    state: Purgeable,
}

#[derive(Default)]
struct Ledger {
    next_id: u64,
    /// Live buffers by token.
    live: HashMap<u64, FakeBuffer>,
    /// The kind of every allocation, in order.
    allocated_kinds: Vec<MemoryKind>,
    /// Device addresses of released buffers, in order.
    released: Vec<u64>,
    make_purgeable_calls: u64,
    reclaim_calls: u64,
    /// Calls that named a block whose kind differs from the driver's record, or an unknown
    /// block.
    mismatches: u64,
}

/// A Metal-like device; clones share one ledger, so a test keeps a clone to inspect it.
#[derive(Clone)]
struct FakeMetal {
    kinds: Arc<Vec<MemoryKind>>,
    purgeable: bool,
    ledger: Arc<Mutex<Ledger>>,
}

/// Where fake GPU addresses start; each buffer gets its own 1 GiB range.
const FIRST_GPU_ADDRESS: u64 = 0x10_0000_0000;

impl FakeMetal {
    /// The kinds the brief's fake offers (an Intel Mac with a discrete GPU would put `Device`
    /// first; the order only decides the default kind).
    fn new() -> FakeMetal {
        FakeMetal::with_kinds(&[
            MemoryKind::HostVisible,
            MemoryKind::Device,
            MemoryKind::HostVisibleWriteCombined,
            MemoryKind::Managed,
        ])
    }

    /// Apple silicon: unified memory, so no `Managed`.
    fn apple_silicon() -> FakeMetal {
        FakeMetal::with_kinds(&[
            MemoryKind::HostVisible,
            MemoryKind::Device,
            MemoryKind::HostVisibleWriteCombined,
        ])
    }

    fn with_kinds(kinds: &[MemoryKind]) -> FakeMetal {
        FakeMetal {
            kinds: Arc::new(kinds.to_vec()),
            purgeable: true,
            ledger: Arc::default(),
        }
    }

    /// Like `MetalBackend::with_purgeable_idle_blocks`.
    fn with_purgeable_idle_blocks(mut self, enabled: bool) -> FakeMetal {
        self.purgeable = enabled;
        self
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn find<R>(&self, device_address: u64, f: impl FnOnce(&mut FakeBuffer) -> R) -> Option<R> {
        self.ledger()
            .live
            .values_mut()
            .find(|buffer| buffer.device_address == device_address)
            .map(f)
    }

    /// The kind the driver allocated the buffer at `device_address` as.
    fn kind_of(&self, device_address: u64) -> Option<MemoryKind> {
        self.find(device_address, |buffer| buffer.kind)
    }

    /// The storage and CPU cache mode of the buffer at `device_address`.
    fn options_of(&self, device_address: u64) -> Option<(Storage, CpuCache)> {
        self.find(device_address, |buffer| (buffer.storage, buffer.cpu_cache))
    }

    /// The purgeable state of the buffer at `device_address`.
    fn state_of(&self, device_address: u64) -> Option<Purgeable> {
        self.find(device_address, |buffer| buffer.state)
    }

    /// The OS discards the buffer at `device_address`, which it may only do to a volatile
    /// one. Returns whether it did.
    fn purge(&self, device_address: u64) -> bool {
        self.find(device_address, |buffer| {
            let volatile = buffer.state == Purgeable::Volatile;
            if volatile {
                buffer.state = Purgeable::Empty;
            }
            volatile
        })
        .unwrap_or(false)
    }

    fn live_buffers(&self) -> usize {
        self.ledger().live.len()
    }

    fn live_bytes(&self) -> u64 {
        self.ledger()
            .live
            .values()
            .map(|buffer| buffer.bytes as u64)
            .sum()
    }

    fn allocated_kinds(&self) -> Vec<MemoryKind> {
        self.ledger().allocated_kinds.clone()
    }

    fn released(&self) -> Vec<u64> {
        self.ledger().released.clone()
    }

    /// Checks the block against the driver's record: it must be live and of the recorded kind.
    fn check(ledger: &mut Ledger, block: &Block) -> bool {
        let matches = ledger.live.get(&block.token()).is_some_and(|buffer| {
            buffer.kind == block.kind() && buffer.device_address == block.device_address()
        });
        if !matches {
            ledger.mismatches += 1;
        }
        matches
    }
}

fn host_layout(bytes: usize) -> Layout {
    Layout::from_size_align(bytes, BLOCK_ALIGN).expect("valid layout")
}

impl Backend for FakeMetal {
    fn name(&self) -> &str {
        "fake-metal"
    }

    fn kinds(&self) -> &[MemoryKind] {
        &self.kinds
    }

    fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        if !self.kinds.contains(&kind) {
            return Err(BackendError::UnsupportedKind(kind));
        }
        if bytes == 0 {
            return Err(BackendError::Driver("Metal buffers cannot be empty".into()));
        }
        let (storage, cpu_cache) = options(kind);
        let host = if storage == Storage::Private {
            None
        } else {
            // SAFETY: the layout has a non-zero size (checked above).
            let ptr = unsafe { std::alloc::alloc_zeroed(host_layout(bytes)) };
            Some(NonNull::new(ptr).ok_or(BackendError::OutOfMemory)?)
        };
        let mut ledger = self.ledger();
        let token = ledger.next_id;
        ledger.next_id += 1;
        let device_address = FIRST_GPU_ADDRESS + (token << 30);
        ledger.live.insert(
            token,
            FakeBuffer {
                device_address,
                kind,
                storage,
                cpu_cache,
                bytes,
                host: host.map(|ptr| ptr.as_ptr() as usize),
                state: Purgeable::NonVolatile,
            },
        );
        ledger.allocated_kinds.push(kind);
        // SAFETY: the block owns a fresh allocation of `bytes` bytes that nothing else uses.
        // Host-visible kinds get real heap memory from `alloc_zeroed`: valid for reads and
        // writes of `bytes` bytes, aligned to BLOCK_ALIGN, zeroed, and freed only in `release`.
        // `Device` blocks have no host pointer (like `Private` buffers) and a synthetic device
        // address nothing dereferences.
        Ok(unsafe { Block::new(device_address, host, bytes, kind, token) })
    }

    fn release(&self, block: Block) {
        let mut ledger = self.ledger();
        if !FakeMetal::check(&mut ledger, &block) {
            return;
        }
        let buffer = ledger.live.remove(&block.token()).expect("checked above");
        if let Some(host) = buffer.host {
            // Freed through the block's pointer, not one made from the ledger's integer: only
            // the former carries the allocation's provenance (Miri's strict provenance checks).
            let ptr = block
                .host_ptr()
                .filter(|ptr| ptr.as_ptr() as usize == host)
                .expect("the block's host pointer is the one allocated");
            // SAFETY: `ptr` came from `alloc_zeroed` with this layout in `allocate`, and the
            // buffer was just removed from the ledger, so it is freed once.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), host_layout(buffer.bytes)) };
        }
        ledger.released.push(buffer.device_address);
    }

    fn memory_info(&self) -> Option<MemoryInfo> {
        let total_bytes = 64 << 30;
        Some(MemoryInfo {
            total_bytes,
            free_bytes: total_bytes - self.live_bytes(),
        })
    }

    // Like Metal: no stream to mark, and command buffers retain what they use, so there is
    // nothing to wait for (no `stream_ordered`).

    fn purgeable(&self) -> Option<&dyn PurgeableCapability> {
        self.purgeable.then_some(self as &dyn PurgeableCapability)
    }
}

impl PurgeableCapability for FakeMetal {
    fn make_purgeable(&self, block: &Block) {
        let mut ledger = self.ledger();
        ledger.make_purgeable_calls += 1;
        if FakeMetal::check(&mut ledger, block) && block.kind() != MemoryKind::Managed {
            ledger.live.get_mut(&block.token()).expect("checked").state = Purgeable::Volatile;
        }
    }

    fn reclaim(&self, block: &Block) -> bool {
        let mut ledger = self.ledger();
        ledger.reclaim_calls += 1;
        if !FakeMetal::check(&mut ledger, block) {
            return false;
        }
        if block.kind() == MemoryKind::Managed {
            return true;
        }
        let buffer = ledger.live.get_mut(&block.token()).expect("checked");
        let previous = std::mem::replace(&mut buffer.state, Purgeable::NonVolatile);
        previous != Purgeable::Empty
    }
}

/// A fence of a fake command buffer: completes when the test fires the completed handler.
struct FakeFence(Arc<AtomicBool>);

impl Fence for FakeFence {
    fn is_complete(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Stands for an `MTLCommandBuffer` with a completed handler installed before commit.
#[derive(Default)]
struct FakeCommandBuffer {
    completed: Arc<AtomicBool>,
}

impl FakeCommandBuffer {
    /// What `CommandBufferFence::new` returns.
    fn fence(&self) -> Arc<dyn Fence> {
        Arc::new(FakeFence(self.completed.clone()))
    }

    /// The GPU finished: Metal calls the completed handler.
    fn complete(&self) {
        self.completed.store(true, Ordering::Release);
    }
}

/// A manager over `fake`, maintenance off and one shard so hits are deterministic.
fn manager_on(fake: &FakeMetal, config: gpupool::PoolConfigBuilder) -> MemoryManager {
    let config = config
        .maintenance_interval(Duration::ZERO)
        .shards(1)
        .build()
        .expect("valid test configuration");
    MemoryManager::with_config(fake.clone(), config).expect("manager")
}

fn manager(fake: &FakeMetal) -> MemoryManager {
    manager_on(fake, PoolConfig::builder())
}

fn of_kind(kind: MemoryKind) -> AllocOptions {
    AllocOptions::kind(kind)
}

/// The identities every snapshot satisfies, checked against the fake driver.
fn assert_consistent(stats: &PoolStats, fake: &FakeMetal) {
    let totals = &stats.totals;
    assert_eq!(
        totals.reserved_bytes,
        totals.in_use_bytes + totals.cached_bytes
    );
    assert_eq!(
        totals.blocks_held,
        totals.backend_allocations - totals.backend_releases
    );
    assert_eq!(totals.blocks_held, fake.live_buffers() as u64);
    assert_eq!(totals.reserved_bytes, fake.live_bytes());
    assert_eq!(
        fake.ledger().mismatches,
        0,
        "the pool passed a foreign block"
    );
}

// ---------------------------------------------------------------------------------------------
// (1) Caches keyed by storage mode.

#[test]
fn a_freed_shared_buffer_never_serves_a_private_request() {
    let fake = FakeMetal::new();
    let manager = manager(&fake);

    let shared = manager
        .allocate_with::<u8>(4 * KIB, of_kind(MemoryKind::HostVisible))
        .unwrap();
    let shared_address = shared.device_address();
    drop(shared);

    let private = manager
        .allocate_with::<u8>(4 * KIB, of_kind(MemoryKind::Device))
        .unwrap();
    assert_eq!(private.kind(), MemoryKind::Device);
    assert_ne!(
        private.device_address(),
        shared_address,
        "a Private request got the cached Shared buffer"
    );
    assert!(
        private.host_ptr().is_none(),
        "Private memory has no host pointer"
    );
    assert_eq!(
        fake.options_of(private.device_address()),
        Some((Storage::Private, CpuCache::Default))
    );
    assert_eq!(
        fake.allocated_kinds(),
        [MemoryKind::HostVisible, MemoryKind::Device],
        "the Private request was a new allocation"
    );
    let stats = manager.stats();
    assert_eq!((stats.totals.hits, stats.totals.misses), (0, 2));
    assert_eq!(
        stats.totals.cached_bytes,
        4 * KIB as u64,
        "the Shared block stays cached"
    );
    let private_address = private.device_address();
    drop(private);

    // Each kind is served from its own cache.
    let shared_again = manager
        .allocate_with::<u8>(4 * KIB, of_kind(MemoryKind::HostVisible))
        .unwrap();
    assert_eq!(shared_again.device_address(), shared_address);
    let private_again = manager
        .allocate_with::<u8>(4 * KIB, of_kind(MemoryKind::Device))
        .unwrap();
    assert_eq!(private_again.device_address(), private_address);
    let stats = manager.stats();
    assert_eq!((stats.totals.hits, stats.totals.misses), (2, 2));
    assert_consistent(&stats, &fake);
}

#[test]
fn alternating_kinds_always_get_a_block_of_the_requested_kind() {
    let fake = FakeMetal::new();
    let manager = manager(&fake);
    let kinds = [
        MemoryKind::HostVisible,
        MemoryKind::Device,
        MemoryKind::HostVisibleWriteCombined,
        MemoryKind::Managed,
    ];
    let sizes = [256, 4 * KIB, 64 * KIB];
    // Every address the pool ever served, with the kind it was served as.
    let mut served_as: HashMap<u64, MemoryKind> = HashMap::new();
    let mut held = std::collections::VecDeque::new();
    for step in 0..600usize {
        let kind = kinds[step % kinds.len()];
        let bytes = sizes[(step / kinds.len()) % sizes.len()];
        let mut buffer = manager.allocate_with::<u8>(bytes, of_kind(kind)).unwrap();
        let address = buffer.device_address();
        assert_eq!(buffer.kind(), kind, "step {step}");
        assert_eq!(
            fake.kind_of(address),
            Some(kind),
            "step {step}: driver record"
        );
        assert_eq!(fake.options_of(address), Some(options(kind)), "step {step}");
        assert_eq!(
            buffer.host_ptr().is_some(),
            kind.is_host_visible(),
            "step {step}"
        );
        let first = *served_as.entry(address).or_insert(kind);
        assert_eq!(first, kind, "step {step}: a block changed kind");
        if let Ok(slice) = buffer.as_mut_slice() {
            slice.fill(step as u8);
        }
        held.push_back(buffer);
        // Keep a few alive so requests see both hits and misses.
        if held.len() > 3 + step % 3 {
            held.pop_front();
        }
    }
    drop(held);
    let stats = manager.stats();
    assert!(
        stats.totals.hits > 400,
        "blocks were reused: {:?}",
        stats.totals
    );
    assert_eq!(
        stats.totals.backend_allocations as usize,
        fake.allocated_kinds().len()
    );
    for device in &stats.devices {
        for class in &device.classes {
            assert_eq!(class.requests, class.hits + class.misses);
        }
    }
    assert_consistent(&stats, &fake);
}

#[test]
fn a_kind_the_device_lacks_is_refused() {
    let fake = FakeMetal::apple_silicon();
    let manager = manager(&fake);
    let error = manager
        .allocate_with::<u8>(4 * KIB, of_kind(MemoryKind::Managed))
        .unwrap_err();
    assert_eq!(
        error,
        PoolError::UnsupportedKind {
            kind: MemoryKind::Managed,
            backend: "fake-metal".to_string(),
        }
    );
    assert!(matches!(
        manager.prewarm_with(4 * KIB, 2, of_kind(MemoryKind::Managed)),
        Err(PoolError::UnsupportedKind { .. })
    ));
    assert!(
        fake.allocated_kinds().is_empty(),
        "nothing reached the driver"
    );
    assert!(matches!(
        fake.allocate(4 * KIB, MemoryKind::Managed),
        Err(BackendError::UnsupportedKind(MemoryKind::Managed))
    ));

    // The default kind is the backend's first: Shared on unified memory.
    let default = manager.allocate_bytes(4 * KIB).unwrap();
    assert_eq!(default.kind(), MemoryKind::HostVisible);
    assert!(default.as_slice().unwrap().iter().all(|&byte| byte == 0));
    drop(default);

    let discrete = FakeMetal::with_kinds(&[
        MemoryKind::Device,
        MemoryKind::HostVisible,
        MemoryKind::HostVisibleWriteCombined,
        MemoryKind::Managed,
    ]);
    let discrete_manager = self::manager(&discrete);
    assert_eq!(
        discrete_manager.allocate_bytes(4 * KIB).unwrap().kind(),
        MemoryKind::Device,
        "Private first without unified memory"
    );
}

// ---------------------------------------------------------------------------------------------
// (2) GPU lifetime through command-buffer completion.

#[test]
fn a_block_waits_for_its_command_buffer_before_reuse() {
    let fake = FakeMetal::new();
    let manager = manager(&fake);
    let commands = FakeCommandBuffer::default();

    let mut input = manager
        .allocate_with::<f32>(1024, of_kind(MemoryKind::HostVisible))
        .unwrap();
    let input_address = input.device_address();
    input.used_by(commands.fence());
    drop(input); // the command buffer is still running

    let second = manager
        .allocate_with::<f32>(1024, of_kind(MemoryKind::HostVisible))
        .unwrap();
    assert_ne!(
        second.device_address(),
        input_address,
        "a block still in use by the GPU was handed out"
    );
    let third = manager
        .allocate_with::<f32>(1024, of_kind(MemoryKind::HostVisible))
        .unwrap();
    assert_ne!(third.device_address(), input_address);
    let stats = manager.stats();
    assert_eq!((stats.totals.hits, stats.totals.misses), (0, 3));

    commands.complete();
    let fourth = manager
        .allocate_with::<f32>(1024, of_kind(MemoryKind::HostVisible))
        .unwrap();
    assert_eq!(
        fourth.device_address(),
        input_address,
        "after completion the block is reused"
    );
    let stats = manager.stats();
    assert_eq!((stats.totals.hits, stats.totals.misses), (1, 3));
    assert_eq!(stats.totals.backend_allocations, 3);
    assert_consistent(&stats, &fake);
}

#[test]
fn one_command_buffer_gates_every_buffer_it_uses_of_every_kind() {
    let fake = FakeMetal::new();
    let manager = manager(&fake);
    let commands = FakeCommandBuffer::default();
    let kinds = [
        MemoryKind::HostVisible,
        MemoryKind::Device,
        MemoryKind::HostVisibleWriteCombined,
        MemoryKind::Managed,
    ];
    let mut gated = Vec::new();
    for kind in kinds {
        let mut buffer = manager
            .allocate_with::<u8>(16 * KIB, of_kind(kind))
            .unwrap();
        buffer.used_by(commands.fence());
        gated.push(buffer.device_address());
    }
    // Dropped while the command buffer runs.
    let replacements: Vec<_> = kinds
        .iter()
        .map(|&kind| {
            manager
                .allocate_with::<u8>(16 * KIB, of_kind(kind))
                .unwrap()
        })
        .collect();
    for buffer in &replacements {
        assert!(!gated.contains(&buffer.device_address()));
    }
    commands.complete();
    let reused: Vec<_> = kinds
        .iter()
        .map(|&kind| {
            manager
                .allocate_with::<u8>(16 * KIB, of_kind(kind))
                .unwrap()
        })
        .collect();
    for (buffer, address) in reused.iter().zip(&gated) {
        assert_eq!(buffer.device_address(), *address);
    }
    drop((replacements, reused));
    assert_consistent(&manager.stats(), &fake);
}

// ---------------------------------------------------------------------------------------------
// (3) Purgeable idle blocks.

#[test]
fn an_idle_block_is_volatile_and_reclaimed_on_reuse() {
    let fake = FakeMetal::new();
    let manager = manager(&fake);
    let buffer = manager
        .allocate_with::<u8>(8 * KIB, of_kind(MemoryKind::HostVisible))
        .unwrap();
    let address = buffer.device_address();
    assert_eq!(fake.state_of(address), Some(Purgeable::NonVolatile));
    assert!(!fake.purge(address), "memory in use cannot be discarded");
    drop(buffer);
    assert_eq!(fake.ledger().make_purgeable_calls, 1);
    assert_eq!(fake.state_of(address), Some(Purgeable::Volatile));

    let again = manager
        .allocate_with::<u8>(8 * KIB, of_kind(MemoryKind::HostVisible))
        .unwrap();
    assert_eq!(again.device_address(), address, "a hit");
    assert_eq!(fake.ledger().reclaim_calls, 1);
    assert_eq!(fake.state_of(address), Some(Purgeable::NonVolatile));
    let stats = manager.stats();
    assert_eq!((stats.totals.hits, stats.totals.misses), (1, 1));
    assert_eq!(stats.totals.backend_releases, 0);
    drop(again);
    assert_consistent(&manager.stats(), &fake);
}

#[test]
fn a_block_the_os_emptied_is_released_and_the_request_is_a_miss() {
    let fake = FakeMetal::new();
    let manager = manager(&fake);
    let buffer = manager
        .allocate_with::<u8>(8 * KIB, of_kind(MemoryKind::Device))
        .unwrap();
    let address = buffer.device_address();
    drop(buffer);
    assert!(
        fake.purge(address),
        "an idle volatile block can be discarded"
    );

    let fresh = manager
        .allocate_with::<u8>(8 * KIB, of_kind(MemoryKind::Device))
        .unwrap();
    assert_ne!(
        fresh.device_address(),
        address,
        "the emptied block was handed out"
    );
    assert_eq!(fake.released(), [address], "the emptied block was released");
    assert_eq!(fake.ledger().reclaim_calls, 1);
    let stats = manager.stats();
    assert_eq!(stats.totals.hits, 0, "the reclaim failure is not a hit");
    assert_eq!(stats.totals.misses, 2);
    assert_eq!(stats.totals.backend_allocations, 2);
    assert_eq!(stats.totals.backend_releases, 1);
    assert_eq!(stats.totals.cached_bytes, 0);
    let class = stats.devices[0]
        .classes
        .iter()
        .find(|class| class.kind == MemoryKind::Device)
        .expect("the Device class row");
    assert_eq!(
        (
            class.requests,
            class.hits,
            class.misses,
            class.backend_releases
        ),
        (2, 0, 2, 1)
    );
    drop(fresh);
    assert_consistent(&manager.stats(), &fake);
}

#[test]
fn managed_buffers_are_never_made_purgeable() {
    let fake = FakeMetal::new();
    let manager = manager(&fake);
    let buffer = manager
        .allocate_with::<u8>(8 * KIB, of_kind(MemoryKind::Managed))
        .unwrap();
    let address = buffer.device_address();
    drop(buffer);
    assert_eq!(fake.state_of(address), Some(Purgeable::NonVolatile));
    assert!(!fake.purge(address));
    let again = manager
        .allocate_with::<u8>(8 * KIB, of_kind(MemoryKind::Managed))
        .unwrap();
    assert_eq!(again.device_address(), address);
}

#[test]
fn purgeability_can_be_turned_off() {
    let fake = FakeMetal::new().with_purgeable_idle_blocks(false);
    let manager = manager(&fake);
    let buffer = manager.allocate_bytes(8 * KIB).unwrap();
    let address = buffer.device_address();
    drop(buffer);
    assert_eq!(fake.state_of(address), Some(Purgeable::NonVolatile));
    let again = manager.allocate_bytes(8 * KIB).unwrap();
    assert_eq!(again.device_address(), address);
    let ledger = fake.ledger();
    assert_eq!((ledger.make_purgeable_calls, ledger.reclaim_calls), (0, 0));
}

// ---------------------------------------------------------------------------------------------
// (4) Trims.

#[test]
fn an_aggressive_trim_releases_every_cached_block_purgeable_or_not() {
    let fake = FakeMetal::new();
    let manager = manager_on(&fake, PoolConfig::builder().min_idle_per_class(1));
    let commands = FakeCommandBuffer::default();
    let mut buffers = Vec::new();
    for kind in [
        MemoryKind::HostVisible,
        MemoryKind::Device,
        MemoryKind::HostVisibleWriteCombined,
        MemoryKind::Managed,
    ] {
        for bytes in [KIB, 64 * KIB, 1024 * KIB] {
            for _ in 0..2 {
                buffers.push(manager.allocate_with::<u8>(bytes, of_kind(kind)).unwrap());
            }
        }
    }
    // One block is still used by a running command buffer when the trim comes.
    buffers[0].used_by(commands.fence());
    let addresses: Vec<u64> = buffers
        .iter()
        .map(|buffer| buffer.device_address())
        .collect();
    let total = buffers.len() as u64;
    drop(buffers);
    // Some idle blocks were discarded by the OS meanwhile; the others are still volatile.
    assert!(fake.purge(addresses[1]));
    assert!(fake.purge(addresses[7]));
    // (The fenced block, `addresses[0]`, is left out: whether a block with pending work is made
    // volatile is the core's choice.)
    let volatile = addresses[1..]
        .iter()
        .filter(|&&address| fake.state_of(address) == Some(Purgeable::Volatile))
        .count();
    assert_eq!(
        volatile,
        17 - 2,
        "Shared and Private idle blocks are volatile"
    );

    let normal = manager.trim(TrimLevel::Normal);
    assert_eq!(normal.blocks, 12, "a normal trim keeps one block per class");
    assert_eq!(
        fake.live_buffers(),
        13,
        "12 kept, and the trimmed fenced block waits for its command buffer"
    );

    let aggressive = manager.trim(TrimLevel::Aggressive);
    assert_eq!(normal.blocks + aggressive.blocks, total);
    // The block a running command buffer still uses waits for it instead of being released now.
    assert_eq!(
        fake.live_buffers(),
        1,
        "only the fenced block is still held"
    );
    let stats = manager.stats();
    assert_eq!(stats.totals.cached_bytes, 0);
    assert_eq!(stats.totals.pending_release_blocks, 1);
    commands.complete();
    manager.trim(TrimLevel::Normal); // reaps blocks whose work has finished
    assert_eq!(
        fake.live_buffers(),
        0,
        "every block went back to the driver"
    );
    let mut released = fake.released();
    released.sort_unstable();
    let mut expected = addresses.clone();
    expected.sort_unstable();
    assert_eq!(released, expected);
    let stats = manager.stats();
    assert_eq!(stats.totals.cached_bytes, 0);
    assert_eq!(stats.totals.blocks_held, 0);
    assert_eq!(stats.totals.pending_release_blocks, 0);
    assert_eq!(stats.totals.backend_releases, total);
    assert_consistent(&stats, &fake);
}

// ---------------------------------------------------------------------------------------------
// The real backend, on Apple targets with a Metal 3 GPU.

#[cfg(all(feature = "metal", target_vendor = "apple"))]
mod on_apple {
    use std::time::{Duration, Instant};

    use gpupool::backend::metal::objc2_metal::{
        MTLBlitCommandEncoder, MTLBuffer, MTLCommandBuffer, MTLCommandEncoder, MTLCommandQueue,
        MTLDevice, MTLPurgeableState, MTLResource, MTLStorageMode,
    };
    use gpupool::backend::metal::{CommandBufferFence, MetalBackend};
    use gpupool::fence::Fence;
    use gpupool::{AllocOptions, Backend, MemoryKind, MemoryManager, PoolConfig};

    /// The real backend, or `None` (with a note) where the machine has no usable Metal device,
    /// such as a CI virtual machine without GPU access.
    fn metal() -> Option<MetalBackend> {
        match MetalBackend::new() {
            Ok(backend) => Some(backend),
            Err(error) => {
                eprintln!("skipping: {error}");
                None
            }
        }
    }

    fn manager_on(backend: &MetalBackend, config: gpupool::PoolConfigBuilder) -> MemoryManager {
        let config = config
            .maintenance_interval(Duration::ZERO)
            .shards(1)
            .build()
            .unwrap();
        MemoryManager::with_config(backend.clone(), config).unwrap()
    }

    fn storage_mode(kind: MemoryKind) -> MTLStorageMode {
        match kind {
            MemoryKind::Device => MTLStorageMode::Private,
            MemoryKind::Managed => MTLStorageMode::Managed,
            _ => MTLStorageMode::Shared,
        }
    }

    fn wait_for(fence: &CommandBufferFence) -> bool {
        let start = Instant::now();
        while !fence.is_complete() {
            if start.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    #[test]
    fn every_kind_allocates_binds_and_is_reused() {
        let Some(backend) = metal() else { return };
        let manager = manager_on(&backend, PoolConfig::builder());
        assert!(manager.stats().devices[0].capacity_bytes.unwrap() > 0);
        for &kind in backend.kinds() {
            let mut buffer = manager
                .allocate_with::<u32>(1000, AllocOptions::kind(kind))
                .unwrap();
            assert_eq!(buffer.kind(), kind);
            assert_ne!(buffer.device_address(), 0);
            let metal = backend.metal_buffer(&buffer).expect("registered");
            assert_eq!(metal.buffer().storageMode(), storage_mode(kind));
            assert!(metal.buffer().length() >= metal.offset() + buffer.block_bytes());
            assert_eq!(
                metal.buffer().gpuAddress() + metal.offset() as u64,
                buffer.device_address()
            );
            if kind.is_host_visible() {
                assert_eq!(
                    buffer.host_ptr().unwrap() as usize % gpupool::BLOCK_ALIGN,
                    0
                );
                assert!(buffer.as_slice().unwrap().iter().all(|&word| word == 0));
                let slice = buffer.as_mut_slice().unwrap();
                slice
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, word)| *word = i as u32);
                assert_eq!(buffer.as_slice().unwrap()[999], 999);
            } else {
                assert!(buffer.host_ptr().is_none());
            }
            let address = buffer.device_address();
            drop(buffer);
            let again = manager
                .allocate_with::<u32>(1000, AllocOptions::kind(kind))
                .unwrap();
            assert_eq!(again.device_address(), address, "{kind:?} block reused");
        }
    }

    #[test]
    fn idle_blocks_are_volatile_until_reused() {
        let Some(backend) = metal() else { return };
        let manager = manager_on(&backend, PoolConfig::builder());
        let buffer = manager.allocate_bytes(64 * 1024).unwrap();
        let address = buffer.device_address();
        drop(buffer);
        let metal = backend.metal_buffer_at(address).expect("cached block");
        let state = metal
            .buffer()
            .setPurgeableState(MTLPurgeableState::KeepCurrent);
        assert!(
            state == MTLPurgeableState::Volatile || state == MTLPurgeableState::Empty,
            "{state:?}"
        );
        let again = manager.allocate_bytes(64 * 1024).unwrap();
        let state = metal
            .buffer()
            .setPurgeableState(MTLPurgeableState::KeepCurrent);
        if again.device_address() == address {
            assert_eq!(state, MTLPurgeableState::NonVolatile);
        }
    }

    #[test]
    fn a_command_buffer_fence_gates_reuse_until_completion() {
        let Some(backend) = metal() else { return };
        let manager = manager_on(&backend, PoolConfig::builder());
        let queue = backend.device().newCommandQueue().expect("queue");

        let commands = queue.commandBuffer().expect("command buffer");
        let fence = CommandBufferFence::new(&commands);
        assert!(!fence.is_complete());
        let mut buffer = manager.allocate_bytes(4096).unwrap();
        let address = buffer.device_address();
        buffer.used_by(fence.clone());
        drop(buffer);
        let other = manager.allocate_bytes(4096).unwrap();
        assert_ne!(other.device_address(), address, "reused before commit");
        commands.commit();
        commands.waitUntilCompleted();
        assert!(wait_for(&fence), "completed handler never ran");
        let reused = manager.allocate_bytes(4096).unwrap();
        assert_eq!(reused.device_address(), address);

        // Made after commit: the fence reads the command buffer's status.
        let late = queue.commandBuffer().expect("command buffer");
        late.commit();
        let late_fence = CommandBufferFence::new(&late);
        late.waitUntilCompleted();
        assert!(wait_for(&late_fence));
    }

    #[test]
    fn zero_on_reuse_clears_every_kind() {
        let Some(backend) = metal() else { return };
        let manager = manager_on(&backend, PoolConfig::builder().zero_on_reuse(true));
        for &kind in backend.kinds() {
            let mut buffer = manager
                .allocate_with::<u8>(4096, AllocOptions::kind(kind))
                .unwrap();
            if let Ok(slice) = buffer.as_mut_slice() {
                slice.fill(0xAB);
            }
            drop(buffer);
            let again = manager
                .allocate_with::<u8>(4096, AllocOptions::kind(kind))
                .unwrap();
            if let Ok(slice) = again.as_slice() {
                assert!(slice.iter().all(|&byte| byte == 0), "{kind:?}");
            }
        }
    }

    /// The example of `docs/metal.md`: upload through `Private` memory and read back, with
    /// the blocks gated on the command buffer.
    #[test]
    fn the_documented_example_round_trips_through_private_memory() {
        let Some(backend) = metal() else { return };
        let manager = MemoryManager::new(backend.clone());
        let queue = backend.device().newCommandQueue().expect("a command queue");

        let shared = AllocOptions::kind(MemoryKind::HostVisible);
        let private = AllocOptions::kind(MemoryKind::Device);
        let mut input = manager.allocate_with::<f32>(1 << 16, shared).unwrap();
        input.as_mut_slice().unwrap().fill(1.5);
        let mut on_gpu = manager.allocate_with::<f32>(1 << 16, private).unwrap();
        let mut output = manager.allocate_with::<f32>(1 << 16, shared).unwrap();

        let commands = queue.commandBuffer().expect("a command buffer");
        let fence = CommandBufferFence::new(&commands); // before commit
        let blit = commands.blitCommandEncoder().expect("a blit encoder");
        let bytes = input.requested_bytes();
        let src = backend.metal_buffer(&input).unwrap();
        let gpu = backend.metal_buffer(&on_gpu).unwrap();
        let dst = backend.metal_buffer(&output).unwrap();
        // SAFETY: each range is `bytes` long from the block's offset, inside blocks of at
        // least `bytes` bytes; the command buffer retains the three buffers until it completes.
        unsafe {
            blit.copyFromBuffer_sourceOffset_toBuffer_destinationOffset_size(
                src.buffer(),
                src.offset(),
                gpu.buffer(),
                gpu.offset(),
                bytes,
            );
            blit.copyFromBuffer_sourceOffset_toBuffer_destinationOffset_size(
                gpu.buffer(),
                gpu.offset(),
                dst.buffer(),
                dst.offset(),
                bytes,
            );
        }
        blit.endEncoding();
        for buffer in [&mut input, &mut on_gpu, &mut output] {
            buffer.used_by(fence.clone());
        }
        commands.commit();
        drop(input); // cached, but not reused until the command buffer completes
        drop(on_gpu);
        commands.waitUntilCompleted();
        assert!(output.as_slice().unwrap().iter().all(|&value| value == 1.5));
        assert!(wait_for(&fence));
    }
}
