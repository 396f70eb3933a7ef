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
//! The arena never calls the backend: `take` is given the mapping to do for pages it needs,
//! and `unmappable_pages` returns the pages to unmap. One mutex guards the state: requests that
//! reach it are large (above the class range) and rare next to class hits.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::backend::{Block, Fence};
use crate::kind::StreamId;
use crate::pools::address_map::AddressMap;
use crate::pools::pending::Pending;
use crate::pools::record::{BlockRecord, IdleBlock};
use crate::pools::{Pool, Request, Returned};
use crate::stats::LargeStats;

/// Blocks are multiples of this (PyTorch's rounding too).
pub const VM_ROUNDING: usize = 512;

/// A block the arena placed, and whether it was a hit (no page had to be mapped).
pub(crate) type Placed<O> = (Box<BlockRecord<O>>, bool);

/// Records kept for reuse at most (enough for the blocks a training step frees at once).
const MAX_SPARE_RECORDS: usize = 256;

/// The stream key of address space no block ever used: any stream may take it.
const FRESH: u64 = u64::MAX;

struct Page {
    /// The first page of the handle this page is mapped by, when mapped.
    handle: Option<usize>,
    /// Bytes of live or gated blocks on the page.
    used_bytes: usize,
    /// The stream of the last block freed on the page (what an unmap must wait for).
    last_stream: StreamId,
}

/// One physical mapping: a run of pages mapped by one call.
struct Handle {
    pages: usize,
    /// Free, waiting for these fences (one per stream that last used its pages) before it is
    /// unmapped.
    unmapping: Option<Vec<Arc<dyn Fence>>>,
}

/// The arena's books.
pub(crate) struct VmState<O> {
    /// The whole reservation, parent of every block view.
    reservation: Box<BlockRecord<O>>,
    base: u64,
    page_bytes: usize,
    pages: Vec<Page>,
    /// Mapped handles by first page.
    handles: BTreeMap<usize, Handle>,
    /// Free ranges by (stream key, bytes, address): a range query is a best fit.
    free: BTreeSet<(u64, usize, u64)>,
    /// Free ranges by address: (bytes, stream key, epoch freed).
    free_at: BTreeMap<u64, (usize, u64, u64)>,
    /// Live blocks: address → bytes.
    live: AddressMap<usize>,
    /// Freed blocks whose fences are pending: (address, pending, epoch).
    gated: Vec<(u64, Pending, u64)>,
    /// Other streams' free ranges being retired to fresh space, by address, with the fence on
    /// their stream that must complete first.
    retiring: HashMap<u64, Arc<dyn Fence>>,
    /// Free ranges per stream key (a few streams: a short list), so a request skips retiring
    /// when no other stream holds any.
    ranges_per_key: Vec<(u64, usize)>,
    /// Records of returned blocks, kept for the next blocks handed out (saves an allocation
    /// and a free per request).
    spare_records: Vec<Box<BlockRecord<O>>>,
    /// The most pages mapped at once so far.
    peak_mapped_pages: usize,
    /// Unmap free handles before mapping past `peak_mapped_pages` (`reclaim_at_peak`).
    reclaim_at_peak: bool,
    /// The stream of the last request that had to map pages: the one a snapshot at a new peak
    /// explains (its free space was fragmentation; other streams' was theirs).
    last_mapping_stream: StreamId,
    counters: LargeStats,
}

/// The virtual-memory arena of one device.
pub(crate) struct VmArena<O> {
    state: Mutex<VmState<O>>,
}

impl<O> VmArena<O> {
    /// An arena over `reservation` (a multiple of `page_bytes`, from
    /// `VirtualMemory::reserve`), with nothing mapped yet.
    pub fn new(reservation: Block, page_bytes: usize, reclaim_at_peak: bool) -> VmArena<O> {
        let base = reservation.device_address();
        let bytes = reservation.bytes();
        let pages = (0..bytes / page_bytes)
            .map(|_| Page {
                handle: None,
                used_bytes: 0,
                last_stream: StreamId::DEFAULT,
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
            reclaim_at_peak,
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
    pub fn take_or_map<E>(
        &self,
        request: &Request,
        owner: Option<O>,
        mut fence_after: impl FnMut(StreamId) -> Option<Arc<dyn Fence>>,
        mut map: impl FnMut(u64, usize) -> Result<(), E>,
        mut unmap: impl FnMut(u64, usize),
    ) -> Result<Option<Placed<O>>, E> {
        let mut state = self.lock();
        state.ungate();
        let bytes = request.block_bytes;
        if !state.fits_own(request.stream, bytes) {
            state.retire(request.stream, &mut fence_after);
        }
        let Some((address, range_bytes, key)) = state.place(request.stream, bytes) else {
            return Ok(None);
        };
        let epoch = state.free_at[&address].2;
        state.remove_free(address);
        if range_bytes > bytes {
            state.insert_free(address + bytes as u64, range_bytes - bytes, key, epoch);
        }
        let mut mapped_now = 0;
        let pages = state.pages_of(address, bytes);
        let mut page = *pages.start();
        while page <= *pages.end() {
            if let Some(first) = state.pages[page].handle {
                // Mapped; a pending unmap is called off (the page is wanted again).
                if let Some(handle) = state.handles.get_mut(&first) {
                    handle.unmapping = None;
                }
                page += 1;
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
        state.mark_live(address, bytes, request.requested_bytes);
        if request.served {
            state.request_served(hit);
        }
        let view = state
            .reservation
            .block
            .view((address - state.base) as usize, bytes)
            .expect("a block lies inside the reservation");
        let record = match state.spare_records.pop() {
            Some(mut record) => {
                record.block = view;
                record.owner = owner;
                record
            }
            None => BlockRecord::boxed(view, owner),
        };
        Ok(Some((record, hit)))
    }

    /// Handles none of whose pages a block uses: each is first marked with fences recorded now
    /// on the streams that last used its pages (`fence_after`; `None` leaves it mapped), and
    /// comes back here, unmapped in the arena's books, once they completed (at once when the
    /// work is already done), for the caller to unmap. With `wait`, the caller has waited for
    /// all work: every free handle comes back. Returns (address, bytes) per handle.
    pub fn unmappable_pages(
        &self,
        wait: bool,
        mut fence_after: impl FnMut(StreamId) -> Option<Arc<dyn Fence>>,
    ) -> Vec<(u64, usize)> {
        let mut state = self.lock();
        state.ungate();
        let mut fences: Vec<(StreamId, Arc<dyn Fence>)> = Vec::new();
        let mut unmap = Vec::new();
        let firsts: Vec<usize> = state.handles.keys().copied().collect();
        for first in firsts {
            let pages = state.handles[&first].pages;
            if (first..first + pages).any(|page| state.pages[page].used_bytes != 0) {
                continue;
            }
            if state.handles[&first].unmapping.is_none() && !wait {
                let mut streams: Vec<StreamId> = (first..first + pages)
                    .map(|page| state.pages[page].last_stream)
                    .collect();
                streams.sort_unstable_by_key(|stream| stream.0);
                streams.dedup();
                let mut handle_fences = Vec::new();
                for stream in streams {
                    let fence = match fences.iter().find(|(on, _)| *on == stream) {
                        Some((_, fence)) => Some(fence.clone()),
                        None => fence_after(stream).inspect(|fence| {
                            fences.push((stream, fence.clone()));
                        }),
                    };
                    match fence {
                        Some(fence) => handle_fences.push(fence),
                        None => {
                            // No fence: the handle stays mapped until a later attempt.
                            handle_fences.clear();
                            break;
                        }
                    }
                }
                if !handle_fences.is_empty() {
                    state.handles.get_mut(&first).expect("listed").unmapping = Some(handle_fences);
                }
            }
            let ready = wait
                || state.handles[&first]
                    .unmapping
                    .as_ref()
                    .is_some_and(|fences| fences.iter().all(|fence| fence.is_complete()));
            if ready {
                state.handle_unmapped(first);
                unmap.push((
                    state.base + (first * state.page_bytes) as u64,
                    pages * state.page_bytes,
                ));
            }
        }
        unmap
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

impl<O> VmState<O> {
    pub fn counters(&self) -> &LargeStats {
        &self.counters
    }

    /// The counters with the split of the free space filled in (a walk over the mapped
    /// pages: for snapshots, not the allocation path).
    pub fn counters_with_waste(&self) -> LargeStats {
        let mut granularity = 0u64;
        let mut held = 0u64;
        let own = self.last_mapping_stream.0;
        for (index, page) in self.pages.iter().enumerate() {
            if page.handle.is_none() {
                continue;
            }
            if page.used_bytes > 0 {
                granularity += (self.page_bytes - page.used_bytes.min(self.page_bytes)) as u64;
                continue;
            }
            // A wholly free page: another stream's (held) unless fresh or the stream of the
            // last request that mapped pages (then it is fragmentation).
            let start = self.base + (index * self.page_bytes) as u64;
            let owner = self
                .free_at
                .range(..=start)
                .next_back()
                .map_or(FRESH, |(_, &(_, key, _))| key);
            if owner != FRESH && owner != own {
                held += self.page_bytes as u64;
            }
        }
        // Gated blocks count as used on their pages but as free in `free_bytes`: their space
        // is held too (for their fences). Whatever the walk does not explain is fragmentation.
        let free = self.counters.free_bytes;
        let granularity = granularity.min(free);
        let gated: u64 = self
            .gated
            .iter()
            .map(|(address, _, _)| self.live.get(address).copied().unwrap_or(0) as u64)
            .sum();
        LargeStats {
            page_granularity_bytes: granularity,
            held_for_streams_bytes: (held + gated).min(free - granularity),
            ..self.counters.clone()
        }
    }

    /// Where a block of `bytes` on `stream` goes, as a free range to take it from (address,
    /// bytes, stream key): the best-fitting range of the stream's own; else the stream's range
    /// that ends where fresh space begins, extended into it (as if the two were one range,
    /// which they would be but for ownership); else fresh space. Without the middle rule, a
    /// free range at the end of the used space could never grow, and requests larger than it
    /// would leave it behind as a hole (gpt2: 1.09 peak reserved / live instead of 1.02).
    fn place(&mut self, stream: StreamId, bytes: usize) -> Option<(u64, usize, u64)> {
        let fit = |free: &BTreeSet<(u64, usize, u64)>, key: u64| {
            free.range((key, bytes, 0)..=(key, usize::MAX, u64::MAX))
                .next()
                .map(|&(key, size, address)| (address, size, key))
        };
        if let Some(own) = fit(&self.free, stream.0) {
            return Some(own);
        }
        let fresh = fit(&self.free, FRESH)?;
        let frontier = self
            .free_at
            .range(..fresh.0)
            .next_back()
            .map(|(&start, &(size, key, epoch))| (start, size, key, epoch))
            .filter(|&(start, size, key, _)| key == stream.0 && start + size as u64 == fresh.0);
        match frontier {
            Some((start, size, _, epoch)) => {
                // The fresh part becomes the stream's: no work ever touched it, so any stream
                // may take it, this one included.
                self.remove_free(fresh.0);
                self.remove_free(start);
                self.insert_free(start, size + fresh.1, stream.0, epoch);
                let taken = start + bytes as u64;
                let end = start + (size + fresh.1) as u64;
                // What the block leaves of the fresh part stays fresh for every stream.
                self.remove_free(start);
                self.insert_free(start, bytes, stream.0, epoch);
                if end > taken {
                    self.insert_free(taken, (end - taken) as usize, FRESH, 0);
                }
                Some((start, bytes, stream.0))
            }
            None => Some(fresh),
        }
    }

    fn pages_of(&self, address: u64, bytes: usize) -> std::ops::RangeInclusive<usize> {
        let first = ((address - self.base) as usize) / self.page_bytes;
        let last = ((address - self.base) as usize + bytes - 1) / self.page_bytes;
        first..=last
    }

    /// Bytes of `[address, address + bytes)` on `page`.
    fn overlap(&self, page: usize, address: u64, bytes: usize) -> usize {
        let page_start = self.base + (page * self.page_bytes) as u64;
        let page_end = page_start + self.page_bytes as u64;
        let start = address.max(page_start);
        let end = (address + bytes as u64).min(page_end);
        (end - start) as usize
    }

    fn insert_free(&mut self, address: u64, bytes: usize, key: u64, epoch: u64) {
        self.free.insert((key, bytes, address));
        self.free_at.insert(address, (bytes, key, epoch));
        match self.ranges_per_key.iter_mut().find(|(on, _)| *on == key) {
            Some((_, count)) => *count += 1,
            None => self.ranges_per_key.push((key, 1)),
        }
    }

    fn remove_free(&mut self, address: u64) -> (usize, u64, u64) {
        let (bytes, key, epoch) = self.free_at.remove(&address).expect("a free range");
        self.free.remove(&(key, bytes, address));
        if let Some(at) = self.ranges_per_key.iter().position(|(on, _)| *on == key) {
            self.ranges_per_key[at].1 -= 1;
            if self.ranges_per_key[at].1 == 0 {
                self.ranges_per_key.swap_remove(at);
            }
        }
        // A fence covers the range as it was: once split or merged, it is fenced anew.
        self.retiring.remove(&address);
        (bytes, key, epoch)
    }

    /// Unmaps wholly free handles outside `block_pages` whose work is done, until `pages`
    /// pages' worth are unmapped or none is left: each gets fences on its pages' last
    /// streams (recorded now if it had none) and goes only once they have all completed.
    fn reclaim(
        &mut self,
        pages: usize,
        block_pages: &std::ops::RangeInclusive<usize>,
        fence_after: &mut dyn FnMut(StreamId) -> Option<Arc<dyn Fence>>,
        unmap: &mut dyn FnMut(u64, usize),
    ) {
        let mut reclaimed = 0;
        let firsts: Vec<usize> = self.handles.keys().copied().collect();
        for first in firsts {
            if reclaimed >= pages {
                break;
            }
            let count = self.handles[&first].pages;
            let last = first + count - 1;
            let overlaps_block = first <= *block_pages.end() && last >= *block_pages.start();
            if overlaps_block || (first..=last).any(|page| self.pages[page].used_bytes != 0) {
                continue;
            }
            if self.handles[&first].unmapping.is_none() {
                let mut streams: Vec<StreamId> = (first..=last)
                    .map(|page| self.pages[page].last_stream)
                    .collect();
                streams.sort_unstable_by_key(|stream| stream.0);
                streams.dedup();
                let fences: Option<Vec<Arc<dyn Fence>>> =
                    streams.into_iter().map(&mut *fence_after).collect();
                let Some(fences) = fences else { continue };
                self.handles.get_mut(&first).expect("listed").unmapping = Some(fences);
            }
            let ready = self.handles[&first]
                .unmapping
                .as_ref()
                .is_some_and(|fences| fences.iter().all(|fence| fence.is_complete()));
            if ready {
                self.handle_unmapped(first);
                unmap(
                    self.base + (first * self.page_bytes) as u64,
                    count * self.page_bytes,
                );
                reclaimed += count;
            }
        }
    }

    /// Whether a free range of the stream's own holds `bytes`.
    fn fits_own(&self, stream: StreamId, bytes: usize) -> bool {
        self.free
            .range((stream.0, bytes, 0)..=(stream.0, usize::MAX, u64::MAX))
            .next()
            .is_some()
    }

    /// Other streams' free ranges whose fences completed become fresh (merged with fresh
    /// neighbours); those without a fence get one, recorded now on their stream.
    fn retire(
        &mut self,
        stream: StreamId,
        fence_after: &mut dyn FnMut(StreamId) -> Option<Arc<dyn Fence>>,
    ) {
        let others = self
            .ranges_per_key
            .iter()
            .any(|&(key, _)| key != FRESH && key != stream.0);
        if !others {
            return; // nothing another stream holds: the common single-stream case
        }
        let done: Vec<u64> = self
            .retiring
            .iter()
            .filter(|(_, fence)| fence.is_complete())
            .map(|(&address, _)| address)
            .collect();
        for address in done {
            let (bytes, _, epoch) = self.remove_free(address);
            self.free_range(address, bytes, FRESH, epoch);
        }
        let mut fences: Vec<(u64, Option<Arc<dyn Fence>>)> = Vec::new();
        let waiting: Vec<(u64, u64)> = self
            .free_at
            .iter()
            .filter(|(address, &(_, key, _))| {
                key != FRESH && key != stream.0 && !self.retiring.contains_key(address)
            })
            .map(|(&address, &(_, key, _))| (address, key))
            .collect();
        for (address, key) in waiting {
            let fence = match fences.iter().find(|(on, _)| *on == key) {
                Some((_, fence)) => fence.clone(),
                None => {
                    let fence = fence_after(StreamId(key));
                    fences.push((key, fence.clone()));
                    fence
                }
            };
            if let Some(fence) = fence {
                self.retiring.insert(address, fence);
            }
        }
        // Fences that are complete already (work done, or a synchronous device) retire now.
        let done: Vec<u64> = self
            .retiring
            .iter()
            .filter(|(_, fence)| fence.is_complete())
            .map(|(&address, _)| address)
            .collect();
        for address in done {
            let (bytes, _, epoch) = self.remove_free(address);
            self.free_range(address, bytes, FRESH, epoch);
        }
    }

    /// Makes `[address, address + bytes)` free for stream key `key`, merged with free
    /// neighbours of the same key.
    fn free_range(&mut self, mut address: u64, mut bytes: usize, key: u64, epoch: u64) {
        let before = self
            .free_at
            .range(..address)
            .next_back()
            .map(|(&start, &(size, other, _))| (start, size, other));
        if let Some((start, size, other)) = before {
            if start + size as u64 == address && other == key {
                self.remove_free(start);
                address = start;
                bytes += size;
                self.counters.merges += 1;
            }
        }
        let end = address + bytes as u64;
        if let Some(&(size, other, _)) = self.free_at.get(&end) {
            if other == key {
                self.remove_free(end);
                bytes += size;
                self.counters.merges += 1;
            }
        }
        self.insert_free(address, bytes, key, epoch);
    }

    fn mark_live(&mut self, address: u64, bytes: usize, requested_bytes: usize) {
        for page in self.pages_of(address, bytes) {
            self.pages[page].used_bytes += self.overlap(page, address, bytes);
        }
        self.live.insert(address, bytes);
        let counters = &mut self.counters;
        counters.in_use_blocks += 1;
        counters.in_use_bytes += bytes as u64;
        counters.requested_live_bytes += requested_bytes as u64;
        counters.free_bytes -= bytes as u64;
    }

    /// `pages` pages from `first` were mapped by one handle.
    fn handle_mapped(&mut self, first: usize, pages: usize) {
        for page in first..first + pages {
            self.pages[page].handle = Some(first);
        }
        self.handles.insert(
            first,
            Handle {
                pages,
                unmapping: None,
            },
        );
        let bytes = (pages * self.page_bytes) as u64;
        let mapped = (self.counters.segment_bytes + bytes) as usize / self.page_bytes;
        self.peak_mapped_pages = self.peak_mapped_pages.max(mapped);
        let counters = &mut self.counters;
        counters.backend_allocations += 1;
        counters.segments += 1;
        counters.segment_bytes += bytes;
        counters.free_bytes += bytes;
    }

    /// The handle at `first` is unmapped in the books.
    fn handle_unmapped(&mut self, first: usize) {
        let handle = self.handles.remove(&first).expect("a mapped handle");
        for page in first..first + handle.pages {
            self.pages[page].handle = None;
        }
        let bytes = (handle.pages * self.page_bytes) as u64;
        let counters = &mut self.counters;
        counters.backend_releases += 1;
        counters.segments -= 1;
        counters.segment_bytes -= bytes;
        counters.free_bytes -= bytes;
    }

    fn request_served(&mut self, hit: bool) {
        self.counters.requests += 1;
        if hit {
            self.counters.hits += 1;
        } else {
            self.counters.misses += 1;
        }
    }

    /// A returned block's bytes leave the pages' use and become free space on `stream` (its
    /// bytes were counted as free in the mapped pages when it came back).
    fn release_block(&mut self, address: u64, bytes: usize, stream: StreamId, epoch: u64) {
        for page in self.pages_of(address, bytes) {
            let overlap = self.overlap(page, address, bytes);
            self.pages[page].used_bytes -= overlap;
            self.pages[page].last_stream = stream;
        }
        self.free_range(address, bytes, stream.0, epoch);
    }

    /// Frees the gated blocks whose fences have completed.
    fn ungate(&mut self) {
        if self.gated.is_empty() {
            return;
        }
        for (address, mut pending, epoch) in std::mem::take(&mut self.gated) {
            let stream = pending.stream;
            if pending.usable_on(stream) {
                let bytes = self
                    .live
                    .remove(&address)
                    .expect("a gated block stays listed");
                self.release_block(address, bytes, stream, epoch);
            } else {
                self.gated.push((address, pending, epoch));
            }
        }
    }
}

impl<O> Pool<O> for VmArena<O> {
    /// Only free space already mapped: a request that needs pages goes through `take_or_map`.
    fn take(&self, request: &Request) -> Option<Box<BlockRecord<O>>> {
        self.take_or_map(request, None, |_| None, |_, _| Err(()), |_, _| {})
            .ok()
            .flatten()
            .map(|(record, _)| record)
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
        counters.in_use_blocks -= 1;
        counters.in_use_bytes -= bytes as u64;
        counters.requested_live_bytes -= returned.requested_bytes as u64;
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
