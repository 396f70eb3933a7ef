//! The arena's blocks and segments: a map from address to block (linked to its neighbours in
//! its segment), the free blocks ordered for best fit, and the splitting and merging.
#![forbid(unsafe_code)]

use std::collections::BTreeSet;

use super::MIN_SPLIT_BYTES;
use crate::backend::Block;
use crate::kind::StreamId;
use crate::pools::address_map::AddressMap;
use crate::pools::pending::Pending;
use crate::pools::record::{BlockRecord, IdleBlock};
use crate::stats::LargeStats;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Used,
    Free,
    /// Freed, but fenced work may still use it.
    Gated,
}

pub(super) struct LargeBlock<O> {
    /// The record handed out last time, kept for the next owner (saves an allocation).
    pub(super) record: Option<Box<BlockRecord<O>>>,
    pub(super) segment: u64,
    pub(super) bytes: usize,
    pub(super) state: State,
    pub(super) stream: StreamId,
    pub(super) prev: Option<u64>,
    pub(super) next: Option<u64>,
    /// Maintenance epoch in which the block was freed.
    pub(super) epoch: u64,
    /// The arena's request count when the block was freed.
    pub(super) freed_at: u64,
}

pub(super) struct Segment<O> {
    pub(super) record: Box<BlockRecord<O>>,
}

pub(crate) struct LargeState<O> {
    pub(super) blocks: AddressMap<LargeBlock<O>>,
    /// Reusable blocks: (stream, bytes, address), so a range query is a best fit.
    pub(super) free: BTreeSet<(u64, usize, u64)>,
    pub(super) gated: Vec<(u64, Pending)>,
    pub(super) segments: AddressMap<Segment<O>>,
    pub(super) counters: LargeStats,
}

impl<O> Default for LargeState<O> {
    fn default() -> Self {
        LargeState {
            blocks: AddressMap::default(),
            free: BTreeSet::new(),
            gated: Vec::new(),
            segments: AddressMap::default(),
            counters: LargeStats::default(),
        }
    }
}

impl<O> LargeState<O> {
    /// A fresh segment from the backend, all of it one free block on `stream` (freed in
    /// `epoch`, at arena request `freed_at`), counted as allocated; returns its base address.
    pub(super) fn insert_segment(
        &mut self,
        segment: Block,
        stream: StreamId,
        epoch: u64,
        freed_at: u64,
    ) -> u64 {
        let base = segment.device_address();
        let segment_bytes = segment.bytes();
        let counters = &mut self.counters;
        counters.backend_allocations += 1;
        counters.segments += 1;
        counters.segment_bytes += segment_bytes as u64;
        counters.free_bytes += segment_bytes as u64;
        self.blocks.insert(
            base,
            LargeBlock {
                record: None,
                segment: base,
                bytes: segment_bytes,
                state: State::Free,
                stream,
                prev: None,
                next: None,
                epoch,
                freed_at,
            },
        );
        self.free.insert((stream.0, segment_bytes, base));
        self.segments.insert(
            base,
            Segment {
                record: BlockRecord::boxed(segment, None),
            },
        );
        base
    }

    pub fn counters(&self) -> &LargeStats {
        &self.counters
    }

    pub(super) fn request_served(&mut self, hit: bool) {
        self.counters.requests += 1;
        if hit {
            self.counters.hits += 1;
        } else {
            self.counters.misses += 1;
        }
    }

    /// Segments whose one block is free (not gated), by address.
    pub(super) fn whole_free_segments(&self) -> impl Iterator<Item = (u64, &LargeBlock<O>)> + '_ {
        self.blocks
            .iter()
            .filter(|(_, block)| {
                block.state == State::Free && block.prev.is_none() && block.next.is_none()
            })
            .map(|(&address, block)| (address, block))
    }

    /// Takes whole free segments out, counted as released.
    pub(super) fn remove_segments(&mut self, addresses: &[u64]) -> Vec<IdleBlock<O>> {
        let mut removed = Vec::with_capacity(addresses.len());
        for &address in addresses {
            let block = self.blocks.remove(&address).expect("listed by the caller");
            self.free.remove(&(block.stream.0, block.bytes, address));
            let segment = self
                .segments
                .remove(&address)
                .expect("a whole block is its segment");
            let counters = &mut self.counters;
            counters.backend_releases += 1;
            counters.segments -= 1;
            counters.segment_bytes -= block.bytes as u64;
            counters.free_bytes -= block.bytes as u64;
            removed.push(IdleBlock::new(
                segment.record,
                Pending::on(block.stream),
                block.epoch,
            ));
        }
        removed
    }

    /// Marks `address` used for `bytes`, splitting off a remainder worth keeping.
    pub(super) fn hand_out(
        &mut self,
        address: u64,
        bytes: usize,
        requested_bytes: usize,
        owner: Option<O>,
    ) -> Box<BlockRecord<O>> {
        let (segment, size, stream, next) = {
            let block = &self.blocks[&address];
            (block.segment, block.bytes, block.stream, block.next)
        };
        self.free.remove(&(stream.0, size, address));
        let mut used = size;
        if size - bytes >= MIN_SPLIT_BYTES {
            used = bytes;
            let rest = address + bytes as u64;
            self.blocks.insert(
                rest,
                LargeBlock {
                    record: None,
                    segment,
                    bytes: size - bytes,
                    state: State::Free,
                    stream,
                    prev: Some(address),
                    next,
                    epoch: 0,
                    freed_at: self.counters.requests,
                },
            );
            if let Some(next) = next {
                self.blocks.get_mut(&next).expect("linked").prev = Some(rest);
            }
            self.free.insert((stream.0, size - bytes, rest));
            self.counters.splits += 1;
        }
        let block = self.blocks.get_mut(&address).expect("present");
        block.bytes = used;
        block.state = State::Used;
        if used != size {
            block.next = Some(address + used as u64);
        }
        let counters = &mut self.counters;
        counters.in_use_blocks += 1;
        counters.in_use_bytes += used as u64;
        counters.requested_live_bytes += requested_bytes as u64;
        counters.free_bytes -= used as u64;
        let parent = &self.segments[&segment].record.block;
        let view = parent
            .view((address - segment) as usize, used)
            .expect("a block lies inside its segment");
        let kept = self
            .blocks
            .get_mut(&address)
            .expect("present")
            .record
            .take();
        match kept {
            Some(mut record) => {
                record.block = view;
                record.owner = owner;
                record
            }
            None => BlockRecord::boxed(view, owner),
        }
    }

    /// Makes a block free on `stream`, merged with free neighbours of the same stream.
    pub(super) fn free_block(&mut self, address: u64, stream: StreamId, epoch: u64) {
        let mut start = address;
        let (segment, mut bytes, prev, next, mut record) = {
            let block = self.blocks.get_mut(&address).expect("present");
            (
                block.segment,
                block.bytes,
                block.prev,
                block.next,
                block.record.take(),
            )
        };
        let mergeable =
            |block: &LargeBlock<O>| block.state == State::Free && block.stream == stream;
        let mut new_prev = prev;
        if let Some(prev_address) = prev.filter(|p| mergeable(&self.blocks[p])) {
            let prev_block = self.blocks.remove(&prev_address).expect("linked");
            self.free
                .remove(&(stream.0, prev_block.bytes, prev_address));
            self.blocks.remove(&address);
            start = prev_address;
            // Any spare record will do: the next owner's view is written into it.
            record = record.or(prev_block.record);
            bytes += prev_block.bytes;
            new_prev = prev_block.prev;
            self.counters.merges += 1;
        }
        let mut new_next = next;
        if let Some(next_address) = next.filter(|n| mergeable(&self.blocks[n])) {
            let next_block = self.blocks.remove(&next_address).expect("linked");
            self.free
                .remove(&(stream.0, next_block.bytes, next_address));
            bytes += next_block.bytes;
            new_next = next_block.next;
            self.counters.merges += 1;
        }
        self.blocks.insert(
            start,
            LargeBlock {
                record,
                segment,
                bytes,
                state: State::Free,
                stream,
                prev: new_prev,
                next: new_next,
                epoch,
                freed_at: self.counters.requests,
            },
        );
        if let Some(next) = new_next {
            self.blocks.get_mut(&next).expect("linked").prev = Some(start);
        }
        if let Some(prev) = new_prev {
            self.blocks.get_mut(&prev).expect("linked").next = Some(start);
        }
        self.free.insert((stream.0, bytes, start));
    }

    /// Frees the gated blocks whose fences have completed.
    pub(super) fn ungate(&mut self) {
        if self.gated.is_empty() {
            return;
        }
        let mut still = Vec::new();
        for (address, mut pending) in std::mem::take(&mut self.gated) {
            let stream = pending.stream;
            if pending.usable_on(stream) {
                let epoch = self.blocks[&address].epoch;
                self.blocks.get_mut(&address).expect("gated").state = State::Used;
                self.free_block(address, stream, epoch);
            } else {
                still.push((address, pending));
            }
        }
        self.gated = still;
    }
}
