//! The arena's books: free ranges (best fit by stream, merging), pages and the handles that
//! map them, live and gated blocks, and the walks over them (placement, retiring other streams'
//! space, reclaiming free handles, the waste split).
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::keys::{self, FRESH};
use crate::backend::Fence;
use crate::kind::StreamId;
use crate::pools::address_map::AddressMap;
use crate::pools::pending::Pending;
use crate::pools::record::BlockRecord;
use crate::stats::LargeStats;

pub(super) struct Page {
    /// The first page of the handle this page is mapped by, when mapped.
    pub(super) handle: Option<usize>,
    /// Bytes of live or gated blocks on the page.
    pub(super) used_bytes: usize,
    /// The stream of the last block freed on the page (what an unmap must wait for).
    pub(super) last_stream: StreamId,
    /// `free_count` when a block on the page was last freed.
    pub(super) freed_at: u64,
    /// Set aside for small class blocks (see `small_pages`).
    pub(super) small: bool,
}

/// One physical mapping: a run of pages mapped by one call.
pub(super) struct Handle {
    pub(super) pages: usize,
    /// Free, waiting for these fences (one per stream that last used its pages) before it is
    /// unmapped.
    pub(super) unmapping: Option<Vec<Arc<dyn Fence>>>,
}

/// The arena's books.
pub(crate) struct VmState<O> {
    /// The whole reservation, parent of every block view.
    pub(super) reservation: Box<BlockRecord<O>>,
    pub(super) base: u64,
    pub(super) page_bytes: usize,
    pub(super) pages: Vec<Page>,
    /// Mapped handles by first page.
    pub(super) handles: BTreeMap<usize, Handle>,
    /// Free ranges by (stream key, bytes, address): a range query is a best fit.
    pub(super) free: BTreeSet<(u64, usize, u64)>,
    /// Free ranges by address: (bytes, stream key, epoch freed).
    pub(super) free_at: BTreeMap<u64, (usize, u64, u64)>,
    /// Live blocks: address → bytes.
    pub(super) live: AddressMap<usize>,
    /// Freed blocks whose fences are pending: (address, pending, epoch).
    pub(super) gated: Vec<(u64, Pending, u64)>,
    /// Other streams' free ranges being retired to fresh space, by address, with the fence on
    /// their stream that must complete first.
    pub(super) retiring: HashMap<u64, Arc<dyn Fence>>,
    /// Free ranges per stream key (a few streams: a short list), so a request skips retiring
    /// when no other stream holds any.
    pub(super) ranges_per_key: Vec<(u64, usize)>,
    /// Records of returned blocks, kept for the next blocks handed out (saves an allocation
    /// and a free per request).
    pub(super) spare_records: Vec<Box<BlockRecord<O>>>,
    /// The most pages mapped at once so far.
    pub(super) peak_mapped_pages: usize,
    /// Blocks freed so far: pages remember when they were last freed on, so an unmap after a
    /// device-wide wait skips fences only for frees before the wait.
    pub(super) free_count: u64,
    /// Unmap free handles before mapping past `peak_mapped_pages` (`reclaim_at_peak`).
    pub(super) reclaim_at_peak: bool,
    /// Class blocks go to small pages set aside among the large blocks (see `small_pages`);
    /// `false` in an arena that holds class blocks only, where they are placed like any block.
    pub(super) sets_small_pages_aside: bool,
    /// The stream of the last request that had to map pages: the one a snapshot at a new peak
    /// explains (its free space was fragmentation; other streams' was theirs).
    pub(super) last_mapping_stream: StreamId,
    pub(super) counters: LargeStats,
}

impl<O> VmState<O> {
    pub fn counters(&self) -> &LargeStats {
        &self.counters
    }

    /// Where a block of `bytes` on `stream` goes, as a free range to take it from (address,
    /// bytes, stream key): the best-fitting range of the stream's own; else the stream's range
    /// that ends where fresh space begins, extended into it (as if the two were one range,
    /// which they would be but for ownership); else fresh space. Without the middle rule, a
    /// free range at the end of the used space could never grow, and requests larger than it
    /// would leave it behind as a hole (gpt2: 1.09 peak reserved / live instead of 1.02).
    ///
    /// Class blocks (`small`) go to small pages instead (see `small_pages`).
    pub(super) fn place(
        &mut self,
        stream: StreamId,
        bytes: usize,
        small: bool,
    ) -> Option<(u64, usize, u64)> {
        if small {
            return self.place_small(stream, bytes);
        }
        if let Some(own) = self.best_fit_sparing_the_frontier(keys::own(stream, false), bytes) {
            return Some(own);
        }
        let fresh = self.best_fit(FRESH, bytes)?;
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

    /// [`VmState::best_fit`], passing over the range that ends where the untouched space at
    /// the end of the reservation begins while another range of `key` fits. That range can
    /// grow into the untouched space (see `place`), so it is worth the most: cutting a small
    /// block from it leaves the next large block no contiguous room but past the peak, while
    /// a hole elsewhere that fits loses nothing. (PyTorch's expandable segments rank such a
    /// block by the size it can grow to, for the same reason.)
    pub(super) fn best_fit_sparing_the_frontier(
        &self,
        key: u64,
        bytes: usize,
    ) -> Option<(u64, usize, u64)> {
        let mut fitting = self
            .free
            .range((key, bytes, 0)..=(key, usize::MAX, u64::MAX))
            .map(|&(key, size, address)| (address, size, key));
        let best = fitting.next()?;
        let frontier = self.untouched_start();
        if Some(best.0 + best.1 as u64) != frontier {
            return Some(best);
        }
        fitting.next().or(Some(best))
    }

    /// Where the untouched space at the end of the reservation begins, if any is left.
    fn untouched_start(&self) -> Option<u64> {
        let end = self.base + self.reservation.block.bytes() as u64;
        self.free_at
            .range(..end)
            .next_back()
            .filter(|(&start, &(size, key, _))| key == FRESH && start + size as u64 == end)
            .map(|(&start, _)| start)
    }

    /// The smallest free range of `key` that holds `bytes`: (address, bytes, key).
    pub(super) fn best_fit(&self, key: u64, bytes: usize) -> Option<(u64, usize, u64)> {
        self.free
            .range((key, bytes, 0)..=(key, usize::MAX, u64::MAX))
            .next()
            .map(|&(key, size, address)| (address, size, key))
    }

    pub(super) fn pages_of(&self, address: u64, bytes: usize) -> std::ops::RangeInclusive<usize> {
        let first = ((address - self.base) as usize) / self.page_bytes;
        let last = ((address - self.base) as usize + bytes - 1) / self.page_bytes;
        first..=last
    }

    /// Bytes of `[address, address + bytes)` on `page`.
    pub(super) fn overlap(&self, page: usize, address: u64, bytes: usize) -> usize {
        let page_start = self.base + (page * self.page_bytes) as u64;
        let page_end = page_start + self.page_bytes as u64;
        let start = address.max(page_start);
        let end = (address + bytes as u64).min(page_end);
        (end - start) as usize
    }

    pub(super) fn insert_free(&mut self, address: u64, bytes: usize, key: u64, epoch: u64) {
        self.free.insert((key, bytes, address));
        self.free_at.insert(address, (bytes, key, epoch));
        match self.ranges_per_key.iter_mut().find(|(on, _)| *on == key) {
            Some((_, count)) => *count += 1,
            None => self.ranges_per_key.push((key, 1)),
        }
    }

    pub(super) fn remove_free(&mut self, address: u64) -> (usize, u64, u64) {
        let (bytes, key, epoch) = self.free_at.remove(&address).expect("a free range");
        self.free.remove(&(key, bytes, address));
        if let Some(at) = self.ranges_per_key.iter().position(|(on, _)| *on == key) {
            self.ranges_per_key[at].1 -= 1;
            if self.ranges_per_key[at].1 == 0 {
                self.ranges_per_key.swap_remove(at);
            }
        }
        // A fence covers the range as it was: once split or merged, it is fenced anew.
        if !self.retiring.is_empty() {
            self.retiring.remove(&address);
        }
        (bytes, key, epoch)
    }

    /// Unmaps wholly free handles outside `block_pages` whose work is done, until `pages`
    /// pages' worth are unmapped or none is left: each gets fences on its pages' last
    /// streams (recorded now if it had none) and goes only once they have all completed.
    pub(super) fn reclaim(
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
            if self.free_handle_ready(first, fence_after) {
                self.unmap_handle(first, unmap);
                reclaimed += count;
            }
        }
    }

    /// Whether the free handle at `first` may be unmapped now: the fences on every stream that
    /// freed space on it (recorded now if it had none; `None` from `fence_after` leaves it
    /// mapped until a later attempt) have all completed.
    pub(super) fn free_handle_ready(
        &mut self,
        first: usize,
        fence_after: &mut dyn FnMut(StreamId) -> Option<Arc<dyn Fence>>,
    ) -> bool {
        if self.handles[&first].unmapping.is_none() {
            let count = self.handles[&first].pages;
            let fences: Option<Vec<Arc<dyn Fence>>> = self
                .handle_streams(first, count)
                .into_iter()
                .map(&mut *fence_after)
                .collect();
            let Some(fences) = fences else {
                return false;
            };
            self.handles.get_mut(&first).expect("listed").unmapping = Some(fences);
        }
        self.handles[&first]
            .unmapping
            .as_ref()
            .is_some_and(|fences| fences.iter().all(|fence| fence.is_complete()))
    }

    /// Unmaps the handle at `first` in the books and through `unmap`; returns its bytes.
    pub(super) fn unmap_handle(
        &mut self,
        first: usize,
        unmap: &mut dyn FnMut(u64, usize),
    ) -> usize {
        let bytes = self.handles[&first].pages * self.page_bytes;
        self.handle_unmapped(first);
        unmap(self.base + (first * self.page_bytes) as u64, bytes);
        bytes
    }

    /// Every stream whose work may still touch the handle of `count` pages from `first`: the
    /// owners of the free ranges over it (fresh space has no queued work) and the last stream
    /// freed on each page. A page's last stream alone misses the others that freed on it.
    pub(super) fn handle_streams(&self, first: usize, count: usize) -> Vec<StreamId> {
        let start = self.base + (first * self.page_bytes) as u64;
        let end = start + (count * self.page_bytes) as u64;
        let from = self
            .free_at
            .range(..=start)
            .next_back()
            .map_or(start, |(&address, _)| address);
        let mut streams: Vec<StreamId> = self
            .free_at
            .range(from..end)
            .filter(|(&address, &(bytes, _, _))| address + bytes as u64 > start)
            .filter_map(|(_, &(_, key, _))| keys::stream_of(key))
            .chain((first..first + count).map(|page| self.pages[page].last_stream))
            .collect();
        streams.sort_unstable_by_key(|stream| stream.0);
        streams.dedup();
        streams
    }

    /// Whether a free range of key `key` holds `bytes`.
    pub(super) fn fits(&self, key: u64, bytes: usize) -> bool {
        self.best_fit(key, bytes).is_some()
    }

    /// Other streams' free ranges whose fences completed become fresh (merged with fresh
    /// neighbours); those without a fence get one, recorded now on their stream.
    pub(super) fn retire(
        &mut self,
        stream: StreamId,
        fence_after: &mut dyn FnMut(StreamId) -> Option<Arc<dyn Fence>>,
    ) {
        let others_than = |key: u64| keys::stream_of(key).is_some_and(|owner| owner != stream);
        let others = self.ranges_per_key.iter().any(|&(key, _)| others_than(key));
        if !others {
            return; // nothing another stream holds: the common single-stream case
        }
        self.retire_completed();
        let mut fences: Vec<(u64, Option<Arc<dyn Fence>>)> = Vec::new();
        let waiting: Vec<(u64, u64)> = self
            .free_at
            .iter()
            .filter(|(address, &(_, key, _))| {
                others_than(key) && !self.retiring.contains_key(address)
            })
            .filter_map(|(&address, &(_, key, _))| {
                keys::stream_of(key).map(|owner| (address, owner.0))
            })
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
        self.retire_completed();
    }

    /// Ranges whose retiring fence completed become fresh, merged with fresh neighbours.
    fn retire_completed(&mut self) {
        let done: Vec<u64> = self
            .retiring
            .iter()
            .filter(|(_, fence)| fence.is_complete())
            .map(|(&address, _)| address)
            .collect();
        for address in done {
            let (bytes, key, epoch) = self.remove_free(address);
            self.free_range(address, bytes, keys::fresh_like(key), epoch);
        }
    }

    /// Makes `[address, address + bytes)` free for key `key`, merged with free neighbours of
    /// the same key and, for a stream's space, with fresh neighbours (no queued work touches
    /// them, so the stream may use them at once) apart from the untouched end of the
    /// reservation; inside one page for small pages, where a wholly free small page becomes
    /// ordinary free space again.
    pub(super) fn free_range(&mut self, mut address: u64, mut bytes: usize, key: u64, epoch: u64) {
        let small = keys::is_small(key);
        let (base, page_bytes) = (self.base, self.page_bytes as u64);
        let page_start = move |at: u64| at - (at - base) % page_bytes;
        let joins =
            |other: u64| other == key || (!keys::is_fresh(key) && other == keys::fresh_like(key));
        let before = self
            .free_at
            .range(..address)
            .next_back()
            .map(|(&start, &(size, other, _))| (start, size, other));
        if let Some((start, size, other)) = before {
            let same_page = !small || page_start(start) == page_start(address);
            if start + size as u64 == address && joins(other) && same_page {
                self.remove_free(start);
                address = start;
                bytes += size;
                self.counters.merges += 1;
            }
        }
        let end = address + bytes as u64;
        let reservation_end = self.base + self.reservation.block.bytes() as u64;
        if let Some(&(size, other, _)) = self.free_at.get(&end) {
            // Never the untouched space at the end of the reservation: that stays fresh, for
            // the frontier rule of `place` to extend from whichever stream reaches it.
            let frontier = other == FRESH && end + size as u64 == reservation_end;
            let joins = (other == key) || (joins(other) && !frontier);
            if joins && (!small || page_start(end) == page_start(address)) {
                self.remove_free(end);
                bytes += size;
                self.counters.merges += 1;
            }
        }
        if small && bytes == self.page_bytes {
            // The last class block of the page left: the page serves any block again.
            let page = ((address - self.base) / page_bytes) as usize;
            self.pages[page].small = false;
            self.free_range(address, bytes, keys::outside_small(key), epoch);
            return;
        }
        self.insert_free(address, bytes, key, epoch);
    }

    pub(super) fn mark_live(
        &mut self,
        address: u64,
        bytes: usize,
        requested_bytes: usize,
        for_class: bool,
    ) {
        for page in self.pages_of(address, bytes) {
            self.pages[page].used_bytes += self.overlap(page, address, bytes);
        }
        self.live.insert(address, bytes);
        let counters = &mut self.counters;
        if for_class {
            counters.class_blocks += 1;
            counters.class_bytes += bytes as u64;
        } else {
            counters.in_use_blocks += 1;
            counters.in_use_bytes += bytes as u64;
            counters.requested_live_bytes += requested_bytes as u64;
        }
        counters.free_bytes -= bytes as u64;
    }

    /// `pages` pages from `first` were mapped by one handle.
    pub(super) fn handle_mapped(&mut self, first: usize, pages: usize) {
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
    pub(super) fn handle_unmapped(&mut self, first: usize) {
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

    pub(super) fn request_served(&mut self, hit: bool) {
        self.counters.requests += 1;
        if hit {
            self.counters.hits += 1;
        } else {
            self.counters.misses += 1;
        }
    }

    /// A returned block's bytes leave the pages' use and become free space on `stream` (its
    /// bytes were counted as free in the mapped pages when it came back).
    pub(super) fn release_block(
        &mut self,
        address: u64,
        bytes: usize,
        stream: StreamId,
        epoch: u64,
    ) {
        self.free_count += 1;
        for page in self.pages_of(address, bytes) {
            let overlap = self.overlap(page, address, bytes);
            self.pages[page].used_bytes -= overlap;
            self.pages[page].last_stream = stream;
            self.pages[page].freed_at = self.free_count;
        }
        // A block in a small page lies inside it: its space stays the page's.
        let small = self.pages[*self.pages_of(address, bytes).start()].small;
        self.free_range(address, bytes, keys::own(stream, small), epoch);
    }

    /// Frees the gated blocks whose fences have completed.
    pub(super) fn ungate(&mut self) {
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
