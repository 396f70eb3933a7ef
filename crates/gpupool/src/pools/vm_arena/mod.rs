//! The virtual-memory arena: one address range per device, reserved up front, in which blocks
//! are placed by best fit and freed neighbours always merge, with physical memory mapped page by
//! page only where blocks live.
//!
//! Segments of `cuMemAlloc` strand memory: a free 18 MiB tail of one segment and a free 6 MiB
//! head of the next can never serve a 20 MiB request, so the arena allocates a third segment.
//! Here there are no segment boundaries: every free range is contiguous address space, and
//! what decides memory is only which pages have a live block in them. On the repo's PyTorch
//! traces a simulation of this placement needs 1.003–1.004× the live bytes.
//!
//! One exception to best fit, as in PyTorch's expandable segments: the free range right below
//! the untouched space at the end of the reservation is passed over while another range fits,
//! since only it can grow into that space without a gap (vit_varres 1.063 → 1.042, resnet50
//! bf16 1.020 → 1.013 in sim; resnet50_train 1.016 → 1.024, placement luck the other way).
//!
//! Pages are the backend's granularity (2 MiB on CUDA; configurable in multiples of it). Pages
//! are mapped when a block first lands on them, each contiguous run of unmapped pages a block
//! needs as one physical *handle* (one driver call set, not one per page: mapping cost grows
//! with the number of handles), and stay mapped while free (the next block that lands there
//! costs no driver call). Trims, maintenance and the out-of-memory retry unmap handles none of
//! whose pages a block uses, but only once fences recorded on the streams that last used them
//! have completed (`cuMemUnmap` does not wait for queued work). Never on the allocation path.
//!
//! Streams: a free range belongs to the stream its block was freed on and serves that stream
//! at once (work on one stream runs in order). Address space no queued work can touch belongs
//! to no stream (*fresh*) and serves any. When a request finds nothing on its own stream, the
//! arena *retires* other streams' free ranges: each gets a fence recorded on its stream now
//! (under the arena's lock, so after every free it holds), and once the fence has completed the
//! range becomes fresh and merges with fresh neighbours. A range that changes meanwhile (split,
//! merged) loses its fence and is fenced again later: a fence covers only the frees before it.
//! Blocks with fences (`used_by`, `record_stream`) wait, unmerged, until they complete.
//!
//! Class blocks (`carve_class_blocks`, the default) are carved out of a second arena of the
//! same kind, over a reservation of its own, in which they are placed like any block: no class
//! block ever sits between two large ones, as PyTorch keeps small blocks in segments of their
//! own. With `shared_class_pages` they go to *small pages* of this arena instead
//! (`small_pages`).
//!
//! The arena never calls the backend: `take` is given the mapping to do for pages it needs,
//! and `unmappable_pages` returns the pages to unmap. One mutex guards the state: requests that
//! reach it are large (above the class range) and rare next to class hits.
#![forbid(unsafe_code)]

use crate::sync::atomic::AtomicBool;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::backend::{Block, Fence};
use crate::kind::StreamId;
use crate::pools::address_map::AddressMap;
use crate::pools::record::{BlockRecord, IdleBlock};
use crate::pools::{Pool, Request, Returned};
use crate::stats::LargeStats;

/// Blocks are multiples of this (PyTorch's rounding too).
pub const VM_ROUNDING: usize = 512;

/// A block the arena placed, and whether it was a hit (no page had to be mapped).
pub(crate) type Placed<O> = (Box<BlockRecord<O>>, bool);

/// Class blocks of at most `page_bytes / SMALL_PAGE_SHARE` share small pages; larger ones (only
/// with a class range above half a page) are placed among large blocks (see `small_pages`).
pub const SMALL_PAGE_SHARE: usize = 2;

/// Records kept for reuse at most (enough for the blocks a training step frees at once).
const MAX_SPARE_RECORDS: usize = 256;

mod keys;
mod small_pages;
mod state;
mod waste;

pub(crate) use self::keys::serves;
use self::keys::FRESH;

use self::state::{Page, VmState};

/// The virtual-memory arena of one device.
pub(crate) struct VmArena<O> {
    state: Mutex<VmState<O>>,
}

impl<O> VmArena<O> {
    /// An arena over `reservation` (a multiple of `page_bytes`, from
    /// `VirtualMemory::reserve`), with nothing mapped yet. `sets_small_pages_aside`: class
    /// blocks share small pages among the large blocks (see `small_pages`); `false` for an
    /// arena of class blocks only.
    pub fn new(
        reservation: Block,
        page_bytes: usize,
        reclaim_at_peak: bool,
        sets_small_pages_aside: bool,
    ) -> VmArena<O> {
        let base = reservation.device_address();
        let bytes = reservation.bytes();
        let pages = (0..bytes / page_bytes)
            .map(|_| Page {
                handle: None,
                used_bytes: 0,
                last_stream: StreamId::DEFAULT,
                freed_at: 0,
                small: false,
            })
            .collect();
        let mut state = VmState {
            reservation: BlockRecord::boxed(reservation, None),
            base,
            page_bytes,
            pages,
            handles: BTreeMap::new(),
            free: BTreeSet::new(),
            free_at: BTreeMap::new(),
            live: AddressMap::default(),
            gated: Vec::new(),
            retiring: HashMap::new(),
            spare_records: Vec::new(),
            peak_mapped_pages: 0,
            free_count: 0,
            reclaim_at_peak,
            sets_small_pages_aside,
            ranges_per_key: Vec::new(),
            last_mapping_stream: StreamId::DEFAULT,
            counters: LargeStats {
                address_space_bytes: bytes as u64,
                ..LargeStats::default()
            },
        };
        state.insert_free(base, bytes, FRESH, 0);
        VmArena {
            state: Mutex::new(state),
        }
    }

    /// The size pages are mapped in.
    pub fn page_bytes(&self) -> usize {
        self.lock().page_bytes
    }

    pub fn lock(&self) -> MutexGuard<'_, VmState<O>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A block for `request` (`request.block_bytes`, a multiple of [`VM_ROUNDING`]) by best fit,
    /// with `map(address, bytes)` called for each page it lands on that is not mapped yet.
    /// `Ok(None)`: no free range of the reservation is large enough. A failed mapping leaves the
    /// arena as it was, apart from pages mapped before the failure, which stay mapped and free.
    /// The block counts as in use, and as a served request when `request.served`; the second
    /// value tells whether it was a hit (no page had to be mapped).
    /// `fence_after(stream)` records a fence on another stream, to retire its free ranges
    /// (`None`: not now).
    ///
    /// With `reclaim_at_peak`, before it maps new pages past its highest mapping so far, the
    /// arena unmaps wholly free handles whose work is done (`unmap(address, bytes)` for each),
    /// as many as the excess: memory moves to where it is wanted instead of growing the peak.
    ///
    /// `for_class`: the block is lent to a class cache (carved, counted as the classes' and
    /// not as a request or in-use block of the arena).
    pub fn take_or_map<E>(
        &self,
        request: &Request,
        for_class: bool,
        owner: Option<O>,
        mut fence_after: impl FnMut(StreamId) -> Option<Arc<dyn Fence>>,
        mut map: impl FnMut(u64, usize) -> Result<(), E>,
        mut unmap: impl FnMut(u64, usize),
    ) -> Result<Option<Placed<O>>, E> {
        let mut state = self.lock();
        state.ungate();
        let bytes = request.block_bytes;
        // Class blocks share small pages, apart from larger ones (see `small_pages`).
        let small = for_class
            && state.sets_small_pages_aside
            && bytes <= state.page_bytes / SMALL_PAGE_SHARE;
        // The common case first: the stream's own space holds the block (what `place` would
        // find first), with one search instead of `fits` and `place` each searching.
        let own = if small {
            None
        } else {
            state.best_fit_sparing_the_frontier(keys::own(request.stream, false), bytes)
        };
        let placed = match own {
            Some(own) => Some(own),
            None => {
                // A large block's own search just failed; a small one's is still to do.
                if !small || !state.fits(keys::own(request.stream, true), bytes) {
                    state.retire(request.stream, &mut fence_after);
                }
                state.place(request.stream, bytes, small)
            }
        };
        let Some((address, range_bytes, key)) = placed else {
            return Ok(None);
        };
        let (_, _, epoch) = state.remove_free(address);
        if range_bytes > bytes {
            state.insert_free(address + bytes as u64, range_bytes - bytes, key, epoch);
        }
        let mut mapped_now = 0;
        let pages = state.pages_of(address, bytes);
        let mut page = *pages.start();
        while page <= *pages.end() {
            if let Some(first) = state.pages[page].handle {
                // Mapped; a pending unmap is called off (the page is wanted again). The
                // handle's other pages are mapped too: one lookup per handle, not per page.
                let handle_end = match state.handles.get_mut(&first) {
                    Some(handle) => {
                        handle.unmapping = None;
                        first + handle.pages
                    }
                    None => page + 1,
                };
                page = handle_end.max(page + 1);
                continue;
            }
            let run = (page..=*pages.end())
                .take_while(|&next| state.pages[next].handle.is_none())
                .count();
            let run_address = state.base + (page * state.page_bytes) as u64;
            // Only where mapping would take the arena past its highest mapping so far:
            // below it, free pages stay mapped for the blocks that will want them (moving
            // memory at every miss cost vit_varres ten times the driver calls).
            let mapped_pages = state.counters.segment_bytes as usize / state.page_bytes;
            let over_peak = (mapped_pages + run).saturating_sub(state.peak_mapped_pages);
            if state.reclaim_at_peak && over_peak > 0 {
                let block_pages = pages.clone();
                state.reclaim(over_peak, &block_pages, &mut fence_after, &mut unmap);
            }
            if let Err(error) = map(run_address, run * state.page_bytes) {
                state.free_range(address, bytes, key, epoch);
                return Err(error);
            }
            state.handle_mapped(page, run);
            mapped_now += 1;
            page += run;
        }
        let hit = mapped_now == 0;
        if !hit {
            state.last_mapping_stream = request.stream;
        }
        state.mark_live(address, bytes, request.requested_bytes, for_class);
        if request.served && !for_class {
            state.request_served(hit);
        }
        let view = state
            .reservation
            .block
            .view((address - state.base) as usize, bytes)
            .expect("a block lies inside the reservation");
        let mut record = match state.spare_records.pop() {
            Some(mut record) => {
                record.block = view;
                record.owner = owner;
                record
            }
            None => BlockRecord::boxed(view, owner),
        };
        record.carved = for_class;
        Ok(Some((record, hit)))
    }

    /// Unmaps handles none of whose pages a block uses, once the work that used them is done:
    /// each is first marked with fences recorded now on every stream that freed space on it
    /// (`fence_after`; `None` leaves it mapped), and is unmapped (`unmap(address, bytes)`,
    /// called under the arena's lock, so no block can be placed on its pages in between) once
    /// they completed, at once when the work is already done. `waited`: the caller waited for
    /// all work after reading [`VmArena::free_count`], which it passes: handles whose pages were
    /// all freed before that need no fence. Returns the bytes unmapped.
    pub fn unmap_free_handles(
        &self,
        waited: Option<u64>,
        mut fence_after: impl FnMut(StreamId) -> Option<Arc<dyn Fence>>,
        mut unmap: impl FnMut(u64, usize),
    ) -> u64 {
        let mut state = self.lock();
        state.ungate();
        // One fence per stream for the whole walk: every handle was freed before it began.
        let mut fences: Vec<(StreamId, Arc<dyn Fence>)> = Vec::new();
        let mut fence_once_per_stream =
            |stream: StreamId| match fences.iter().find(|(on, _)| *on == stream) {
                Some((_, fence)) => Some(fence.clone()),
                None => fence_after(stream).inspect(|fence| fences.push((stream, fence.clone()))),
            };
        let mut unmapped = 0;
        let firsts: Vec<usize> = state.handles.keys().copied().collect();
        for first in firsts {
            let pages = state.handles[&first].pages;
            if (first..first + pages).any(|page| state.pages[page].used_bytes != 0) {
                continue;
            }
            let waited_for = waited.is_some_and(|count| {
                (first..first + pages).all(|page| state.pages[page].freed_at <= count)
            });
            if waited_for || state.free_handle_ready(first, &mut fence_once_per_stream) {
                unmapped += state.unmap_handle(first, &mut unmap) as u64;
            }
        }
        unmapped
    }

    /// How many blocks were freed so far (see [`VmArena::unmap_free_handles`]).
    pub fn free_count(&self) -> u64 {
        self.lock().free_count
    }

    /// Every handle still mapped, unmapped in the arena's books (the pool is being dropped and
    /// has waited for all work), and the reservation, for the caller to give back.
    pub fn take_everything(&self) -> (Vec<(u64, usize)>, Block) {
        let mut state = self.lock();
        let mut unmap = Vec::new();
        let firsts: Vec<usize> = state.handles.keys().copied().collect();
        for first in firsts {
            let pages = state.handles[&first].pages;
            state.handle_unmapped(first);
            unmap.push((
                state.base + (first * state.page_bytes) as u64,
                pages * state.page_bytes,
            ));
        }
        state.live.clear();
        state.gated.clear();
        // The reservation is handed back by value; the arena is not used after this.
        let parent = &state.reservation.block;
        let reservation = parent.view(0, parent.bytes()).expect("the whole range");
        (unmap, reservation)
    }
}

impl<O> Pool<O> for VmArena<O> {
    /// Always a miss: a placement may need pages mapped (and, with `reclaim_at_peak`, others
    /// unmapped), which only the router can do, so the arena's requests go through
    /// `take_or_map` with the backend's calls. (Taking here would have to undo what placement
    /// changed when a page turned out to be needed.)
    fn take(&self, _request: &Request) -> Option<Box<BlockRecord<O>>> {
        None
    }

    fn record_served(&self, _request: &Request, hit: bool) {
        self.lock().request_served(hit);
    }

    /// Keeps every block: its space becomes free on its stream (or waits for its fences).
    fn give_back(&self, returned: Returned<O>, _pooling: &AtomicBool) -> Option<IdleBlock<O>> {
        let address = returned.record.block.device_address();
        let mut state = self.lock();
        let Some(&bytes) = state.live.get(&address) else {
            tracing::error!(
                address,
                "virtual-memory arena: return of a block it does not hold"
            );
            return None;
        };
        // No longer in use: free space inside mapped pages from now on (`free_bytes` is mapped
        // bytes minus bytes in use), though a gated block's space is reusable only once its
        // fences complete, as in the segment arena.
        let counters = &mut state.counters;
        if returned.record.carved {
            counters.class_blocks -= 1;
            counters.class_bytes -= bytes as u64;
        } else {
            counters.in_use_blocks -= 1;
            counters.in_use_bytes -= bytes as u64;
            counters.requested_live_bytes -= returned.requested_bytes as u64;
        }
        counters.free_bytes += bytes as u64;
        if returned.pending.gates.is_some() {
            state
                .gated
                .push((address, returned.pending, returned.epoch));
        } else {
            state.live.remove(&address);
            state.release_block(address, bytes, returned.pending.stream, returned.epoch);
        }
        if state.spare_records.len() < MAX_SPARE_RECORDS {
            let mut record = returned.record;
            record.owner = None;
            state.spare_records.push(record);
        }
        None
    }

    /// Nothing to hand back as blocks: idle memory is pages, which `unmappable_pages` yields.
    fn release_idle(&self, _keep: usize, _idle_since: Option<u64>) -> Vec<IdleBlock<O>> {
        Vec::new()
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
