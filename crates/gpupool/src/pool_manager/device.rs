//! The pools of one device, composed over its upstream (backend, budget, deferred release).
#![forbid(unsafe_code)]

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::budget::Budget;
use super::upstream::Upstream;
use super::Owner;
use crate::backend::{Backend, PoolAccess};
use crate::config::PoolConfig;
use crate::error::PoolError;
use crate::kind::MemoryKind;
use crate::pools::bypass::Bypass;
use crate::pools::class_cache::ClassCache;
use crate::pools::large_arena::LargePool;
use crate::pools::vm_arena::VmArena;
use crate::pools::Pool;

/// The caches, arenas and accounting of one device.
pub(super) struct DevicePool {
    pub upstream: Upstream<Owner>,
    pub kinds: Vec<MemoryKind>,
    /// Index `class * kinds.len() + kind slot`.
    pub caches: Box<[ClassCache<Owner>]>,
    /// One large-block arena per kind slot.
    pub large: Box<[LargePool<Owner>]>,
    pub bypass: Bypass,
    /// Whether the backend can purge idle blocks (`Backend::purgeable`), read once.
    pub purgeable: bool,
    /// Whether a cached block must pass a check before it serves a request (zeroing on reuse,
    /// or whether the OS purged it); its hit is then counted after the check, never undone.
    pub hits_need_checks: bool,
    /// Requests above this many bytes go to `large` (`usize::MAX`: never), or to `virtual`
    /// for the kind slot `virtual_slot`.
    pub large_threshold: usize,
    /// The virtual-memory arena, where the backend offers virtual memory (Device memory only).
    pub virtual_arena: Option<VmArena<Owner>>,
    /// The arena class blocks are carved out of (`carve_class_blocks`): an address range of
    /// their own, as PyTorch keeps small blocks in segments of their own.
    pub class_arena: Option<VmArena<Owner>>,
    /// The kind slot `virtual_arena` serves.
    pub virtual_slot: usize,
    /// The device's memory, read once (a request above it never fits).
    pub capacity_bytes: Option<u64>,
    pub failed_requests: AtomicU64,
    /// Allocations retried after releasing idle memory (out of memory or budget).
    pub alloc_retries: AtomicU64,
    /// Requests per cache at the previous `defragment`.
    pub defragment_marks: Mutex<Vec<u64>>,
    /// Held for the whole of each operation that gives idle memory back (trims and clears,
    /// maintenance ticks, defragmentation, the out-of-memory and budget recovery): see
    /// [`DevicePool::upkeep`].
    upkeep: Mutex<()>,
}

impl DevicePool {
    pub fn new(
        backend: Arc<dyn Backend>,
        config: &PoolConfig,
        shards: usize,
    ) -> Result<DevicePool, PoolError> {
        let kinds = backend.kinds().to_vec();
        if kinds.is_empty() {
            return Err(PoolError::InvalidConfig(format!(
                "backend {} offers no memory kind",
                backend.name()
            )));
        }
        let caches: Box<[ClassCache<Owner>]> = config
            .classes
            .sizes()
            .iter()
            .flat_map(|&class_bytes| {
                let cap = config.idle_cap(class_bytes);
                kinds
                    .iter()
                    .map(move |_| ClassCache::new(class_bytes, cap, shards))
            })
            .collect();
        let marks = vec![0; caches.len()];
        let purgeable = backend.purgeable().is_some();
        // Purgeable state belongs to a whole backend buffer (Metal), so blocks carved out of
        // one segment cannot be purged one by one: such backends keep large requests in the
        // classes.
        let large_threshold = match config.large_threshold_bytes {
            Some(threshold) if !purgeable => threshold,
            _ => usize::MAX,
        };
        let virtual_slot = kinds
            .iter()
            .position(|&kind| kind == MemoryKind::Device)
            .unwrap_or(usize::MAX);
        let virtual_arena = if large_threshold == usize::MAX || virtual_slot == usize::MAX {
            None
        } else {
            open_virtual_arena(backend.as_ref(), config, true)
        };
        let class_arena =
            if virtual_arena.is_some() && config.carve_class_blocks && !config.shared_class_pages {
                open_virtual_arena(backend.as_ref(), config, false)
            } else {
                None
            };
        let capacity_bytes = backend.memory_info().map(|info| info.total_bytes);
        Ok(DevicePool {
            capacity_bytes,
            virtual_arena,
            class_arena,
            virtual_slot,
            upstream: Upstream::new(backend, Budget::new(config.budget_bytes)),
            large: kinds.iter().map(|_| LargePool::default()).collect(),
            kinds,
            caches,
            bypass: Bypass::default(),
            purgeable,
            hits_need_checks: purgeable || config.zero_on_reuse,
            large_threshold,
            failed_requests: AtomicU64::new(0),
            alloc_retries: AtomicU64::new(0),
            defragment_marks: Mutex::new(marks),
            upkeep: Mutex::new(()),
        })
    }

    /// Takes this device's upkeep lock, for the whole of a trim, clear, maintenance tick,
    /// defragmentation or release of everything idle.
    ///
    /// Why: such an operation takes blocks out of the pools (counted as released there) or out
    /// of the deferred list, and gives them to the backend only afterwards, one driver call at
    /// a time, with no pool lock held. Meanwhile those blocks are in no pool and on no list, so
    /// a second operation running alongside found nothing to release and returned while the
    /// device still held them: a `clear()` racing a background maintenance tick returned with
    /// memory still allocated (the stress test saw up to 321 blocks, 135 MB, still held after
    /// its clears, gone a few milliseconds later), and an out-of-memory or budget retry racing
    /// one retried without the memory the tick was about to give back. Under this lock each
    /// waits for the other to finish, so when one returns, every block idle when it started is
    /// back with the device or deferred behind a fence. The hit path, misses and drops never
    /// take it (their own releases are not serialised); an allocation takes it only for the
    /// out-of-memory or budget recovery.
    ///
    /// Lock order: this first, then `defragment_marks`, the pools' locks and the deferred
    /// list. Nothing that holds it allocates, and every caller holds its own reference to the
    /// pool (so no record's reference dropped under it is the last, which would run the pool's
    /// drop and take it again): one thread never takes it twice.
    pub fn upkeep(&self) -> MutexGuard<'_, ()> {
        self.upkeep.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.upstream.backend
    }

    /// The kind a request gets, and its slot in this device's kinds.
    #[inline(always)]
    pub fn kind_slot(&self, kind: Option<MemoryKind>) -> Result<(MemoryKind, usize), PoolError> {
        match kind {
            None => Ok((self.kinds[0], 0)),
            Some(kind) => self
                .kinds
                .iter()
                .position(|&offered| offered == kind)
                .map(|slot| (kind, slot))
                .ok_or_else(|| PoolError::UnsupportedKind {
                    kind,
                    backend: self.backend().name().to_string(),
                }),
        }
    }

    /// Every pool of the device, for what all pools do alike (trims, maintenance).
    pub fn pools(&self) -> impl Iterator<Item = &dyn Pool<Owner>> + '_ {
        let caches = self.caches.iter().map(|cache| cache as &dyn Pool<Owner>);
        let arenas = self.large.iter().map(|large| large as &dyn Pool<Owner>);
        caches
            .chain(arenas)
            .chain(std::iter::once(&self.bypass as &dyn Pool<Owner>))
    }

    /// The virtual-memory arenas: the one of large blocks, and the class blocks' own.
    pub fn arenas(&self) -> impl Iterator<Item = &VmArena<Owner>> + '_ {
        self.virtual_arena.iter().chain(self.class_arena.iter())
    }

    /// The arena class blocks are carved out of, if any: their own, else small pages of the
    /// large blocks' arena.
    pub fn carving_arena(&self) -> Option<&VmArena<Owner>> {
        self.class_arena.as_ref().or(self.virtual_arena.as_ref())
    }

    /// The arenas' end (all work waited for, or nothing ever used them): every handle
    /// unmapped, the address space given back.
    pub fn close_virtual_arena(&self) {
        for arena in self.arenas() {
            let memory = self
                .backend()
                .virtual_memory()
                .expect("the arena's backend");
            let (pages, reservation) = arena.take_everything();
            for (address, bytes) in pages {
                memory.unmap(address, bytes, &PoolAccess::new());
                self.upstream.budget.released(bytes as u64);
            }
            memory.unreserve(reservation);
        }
    }

    /// Bytes committed to the budget now.
    pub fn reserved_now(&self) -> u64 {
        self.upstream.budget.committed()
    }
}

/// Reserves the virtual-memory arena's address space: twice the device's memory, so that
/// placement never runs out of addresses before the device runs out of memory. `None` (with a
/// log line) where the backend has no virtual memory, the configuration turns it off, its
/// pages are larger than the device, or the reservation fails: the segment arena serves
/// instead.
fn open_virtual_arena(
    backend: &dyn Backend,
    config: &PoolConfig,
    sets_small_pages_aside: bool,
) -> Option<VmArena<Owner>> {
    let page_setting = config.virtual_memory_pages?;
    let memory = backend.virtual_memory()?;
    let granularity = memory.granularity().max(1);
    let page_bytes = match page_setting {
        0 => granularity,
        // Why checked: a page size within one granularity of `usize::MAX` has no multiple of
        // it in `usize` (`virtual_memory_pages(Some(usize::MAX))` overflowed here; fuzzing
        // found it). No arena then, as for any page size the address space cannot hold.
        bytes => bytes.checked_next_multiple_of(granularity)?,
    };
    let capacity = backend.memory_info()?.total_bytes;
    if page_bytes as u64 > capacity {
        // Not one page could ever be mapped: every large request would fail.
        tracing::warn!(
            page_bytes,
            capacity,
            "virtual-memory pages larger than the device; segments instead"
        );
        return None;
    }
    let address_bytes = usize::try_from(capacity.checked_mul(2)?)
        .ok()?
        .checked_next_multiple_of(page_bytes)?;
    match memory.reserve(address_bytes) {
        Ok(reservation) => {
            tracing::info!(address_bytes, page_bytes, "virtual-memory arena reserved");
            Some(VmArena::new(
                reservation,
                page_bytes,
                config.reclaim_at_peak,
                sets_small_pages_aside,
            ))
        }
        Err(error) => {
            tracing::warn!(
                ?error,
                "no address space for the virtual-memory arena; segments"
            );
            None
        }
    }
}
