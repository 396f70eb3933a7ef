//! Small pages: whole pages of the arena set aside for small class blocks, so that small
//! blocks never sit between large ones. Only with `shared_class_pages`: by default class blocks
//! are carved out of an arena of their own (a second reservation, `DevicePool::class_arena`),
//! which keeps them apart for good (sim, peak ÷ live, shared pages → own arena: resnet50 bf16
//! 1.027 → 1.014, bert 1.260 → 1.220) but cannot hand a page to large blocks without a driver
//! call (gpt2_medium_generate 1.003 → 1.042).
//!
//! Mixing every class block into the one best-fit range cost more than it saved (sim, peak
//! reserved ÷ live: resnet50 1.032, gpt2_train 1.021, bert_serve 1.39): a small block left in
//! a hole keeps two large free neighbours from merging and pins the page under it. PyTorch
//! keeps small blocks in separate 2 MiB segments for the same reason; here the pages are of the
//! same arena, so a small page whose last class block left becomes ordinary free space again
//! at once (in `VmState::free_range`), with no driver call: memory moves between small and
//! large blocks without unmapping. Inside a small page, placement is best fit; free ranges
//! merge only within their page.
//!
//! Which class blocks: all up to half a page (`SMALL_PAGE_SHARE`; with the default 1 MiB class
//! range and 2 MiB pages, every class block), as PyTorch's small pool holds every block up to
//! 1 MiB. Sending the larger class blocks among large blocks instead was tried on the six
//! traces (sim, peak reserved ÷ live, bert / effnet / gpt2_generate / gpt2_train / resnet50 /
//! vit): half a page 1.204 / 1.013 / 1.068 / 1.011 / 1.037 / 1.064, a quarter 1.232 / 1.014 /
//! 1.041 / 1.011 / 1.027 / 1.083, an eighth 1.285 / 1.015 / 1.078 / 1.011 / 1.026 / 1.058, a
//! 64th 1.421 / 1.015 / 1.041 / 1.010 / 1.019 / 1.054: no trend, only placement luck that moves
//! from trace to trace, so the rule stays the structural one.
#![forbid(unsafe_code)]

use super::keys::{self, FRESH, FRESH_SMALL};
use super::state::VmState;
use crate::kind::StreamId;

/// Free ranges looked at for a page to set aside (the lowest-addressed), and pages looked at in
/// each: bounds on the walk, which runs only when a class block finds no room in the small
/// pages (a few hundred times in a trace of 40,000 events).
const CANDIDATE_RANGES: usize = 1024;
const CANDIDATE_PAGES: usize = 64;

impl<O> VmState<O> {
    /// Where a class block of `bytes` on `stream` goes (address, range bytes, key): the best
    /// fit in the stream's small pages, else in fresh small pages, else in a page newly set
    /// aside (see [`VmState::new_small_page`]).
    pub(super) fn place_small(
        &mut self,
        stream: StreamId,
        bytes: usize,
    ) -> Option<(u64, usize, u64)> {
        self.best_fit(keys::own(stream, true), bytes)
            .or_else(|| self.best_fit(FRESH_SMALL, bytes))
            .or_else(|| self.new_small_page(stream))
    }

    /// Sets a whole free page aside for class blocks: the lowest-addressed whole page inside
    /// the stream's own or fresh free space, a mapped one where there is (it costs no driver
    /// call). Lowest first keeps small pages together at the bottom of the range, away from
    /// the large free ranges they would otherwise split. Returns the page as a free range.
    fn new_small_page(&mut self, stream: StreamId) -> Option<(u64, usize, u64)> {
        let page = self.page_bytes as u64;
        let own = keys::own(stream, false);
        let mut first_found = None;
        let mut mapped = None;
        let candidates = self
            .free_at
            .iter()
            .take(CANDIDATE_RANGES)
            .filter(|(_, &(size, key, _))| size >= self.page_bytes && (key == own || key == FRESH));
        for (&address, &(size, _, _)) in candidates {
            let first = (address - self.base).div_ceil(page) as usize;
            let end = ((address - self.base + size as u64) / page) as usize;
            if first >= end {
                continue; // holds a page's bytes but no whole aligned page
            }
            first_found.get_or_insert((address, first));
            if let Some(found) = (first..end.min(first + CANDIDATE_PAGES))
                .find(|&index| self.pages[index].handle.is_some())
            {
                mapped = Some((address, found));
                break;
            }
        }
        let (range_address, index) = mapped.or(first_found)?;
        let (range_bytes, key, epoch) = self.remove_free(range_address);
        let page_address = self.base + index as u64 * page;
        let range_end = range_address + range_bytes as u64;
        if page_address > range_address {
            self.insert_free(
                range_address,
                (page_address - range_address) as usize,
                key,
                epoch,
            );
        }
        if page_address + page < range_end {
            self.insert_free(
                page_address + page,
                (range_end - page_address - page) as usize,
                key,
                epoch,
            );
        }
        self.pages[index].small = true;
        let small_key = keys::inside_small(key);
        self.insert_free(page_address, self.page_bytes, small_key, epoch);
        Some((page_address, self.page_bytes, small_key))
    }
}
