//! The bypass: requests outside the pooled range (or with pooling off) go straight to the
//! backend and back; this pool holds nothing and only counts them, so the totals stay whole.
#![forbid(unsafe_code)]

use crate::sync::atomic::AtomicBool;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::pools::record::{BlockRecord, IdleBlock};
use crate::pools::{Pool, Request, Returned};

/// What went through the bypass.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BypassCounters {
    pub requests: u64,
    pub backend_allocations: u64,
    pub backend_releases: u64,
    pub in_use_blocks: u64,
    pub in_use_bytes: u64,
    pub requested_live_bytes: u64,
}

/// The bypass of one device.
#[derive(Default)]
pub(crate) struct Bypass {
    counters: Mutex<BypassCounters>,
}

impl Bypass {
    /// The counters, locked (snapshots hold the lock while they read everything else).
    pub fn lock(&self) -> MutexGuard<'_, BypassCounters> {
        self.counters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request was served by a block of `block_bytes` allocated for it.
    pub fn served(&self, block_bytes: usize, requested_bytes: usize) {
        let mut counters = self.lock();
        counters.requests += 1;
        counters.backend_allocations += 1;
        counters.in_use_blocks += 1;
        counters.in_use_bytes += block_bytes as u64;
        counters.requested_live_bytes += requested_bytes as u64;
    }
}

impl<O> Pool<O> for Bypass {
    /// The bypass holds nothing: every request is a miss the router serves from the backend.
    fn take(&self, _request: &Request) -> Option<Box<BlockRecord<O>>> {
        None
    }

    /// Requests are counted when served (`Bypass::served`).
    fn record_served(&self, _request: &Request, _hit: bool) {}

    /// Never kept: counted as released and handed back for release.
    fn give_back(&self, returned: Returned<O>, _pooling: &AtomicBool) -> Option<IdleBlock<O>> {
        let block_bytes = returned.record.block.bytes();
        let mut counters = self.lock();
        counters.in_use_blocks -= 1;
        counters.in_use_bytes -= block_bytes as u64;
        counters.requested_live_bytes -= returned.requested_bytes as u64;
        counters.backend_releases += 1;
        drop(counters);
        Some(IdleBlock::new(
            returned.record,
            returned.pending,
            returned.epoch,
        ))
    }

    fn release_idle(&self, _keep: usize, _idle_since: Option<u64>) -> Vec<IdleBlock<O>> {
        Vec::new()
    }
}
