//! The backend as the pools see it: allocations counted against the budget, and blocks
//! released only once no GPU work may still use them (deferred release).
//!
//! Every backend allocation and release of a device goes through [`Upstream`], so the budget,
//! the peak and the deferred list never miss one. The out-of-memory retry sits one layer up,
//! in the router, because only the router can empty the pools.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::budget::Budget;
use super::ReleaseReport;
use crate::backend::{Backend, Block, Fence};
use crate::error::BackendError;
use crate::kind::{MemoryKind, StreamId};
use crate::pools::pending::StreamFence;
use crate::pools::record::IdleBlock;

/// One device's backend with its budget and deferred releases.
pub(super) struct Upstream<O> {
    pub backend: Arc<dyn Backend>,
    pub budget: Budget,
    /// Blocks out of every pool whose GPU work had not finished when they were released: each
    /// waits for a fence recorded on its stream, so no drop blocks on the GPU.
    deferred: Mutex<Vec<IdleBlock<O>>>,
    /// `deferred.len()`, readable without the lock.
    deferred_count: AtomicUsize,
}

impl<O> Upstream<O> {
    pub fn new(backend: Arc<dyn Backend>, budget: Budget) -> Upstream<O> {
        Upstream {
            backend,
            budget,
            deferred: Mutex::new(Vec::new()),
            deferred_count: AtomicUsize::new(0),
        }
    }

    /// One backend allocation of bytes already committed to the budget.
    pub fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
        let block = self.backend.allocate(bytes, kind)?;
        self.budget.allocated(block.bytes() as u64);
        Ok(block)
    }

    /// Gives a block back to the backend now, and its bytes back to the budget.
    pub fn release_now(&self, block: Block) {
        let bytes = block.bytes() as u64;
        self.backend.release(block);
        self.budget.released(bytes);
    }

    /// Gives blocks (already uncounted from their pools) back to the backend. A block that GPU
    /// work may still use gets a fence recorded on its stream and waits in the deferred list
    /// instead: releasing never blocks on the GPU. The report counts both. Blocks released
    /// together were all taken out of their pools before the call, so one fence per stream,
    /// recorded now, covers the work of each of them.
    pub fn release(&self, blocks: Vec<IdleBlock<O>>) -> ReleaseReport {
        let mut report = ReleaseReport::default();
        let mut stream_fences: Vec<(StreamId, Arc<dyn Fence>)> = Vec::new();
        let mut deferred = Vec::new();
        for mut record in blocks {
            report.blocks += 1;
            report.bytes += record.block.bytes() as u64;
            if !record.pending.is_idle() && !record.pending.has_stream_fence() {
                let stream = record.pending.stream;
                match self.stream_fence(stream, &mut stream_fences) {
                    Some(fence) => record
                        .pending
                        .set_stream_fence(StreamFence::recorded(fence)),
                    None => record.pending.clear_gates(),
                }
            }
            if record.pending.gates.is_none() || record.pending.is_idle() {
                self.release_now(record.into_block());
            } else {
                // A deferred block keeps no pool reference: the pool's own drop releases it.
                record.owner = None;
                deferred.push(record);
            }
        }
        if !deferred.is_empty() {
            let mut list = self.deferred_list();
            list.append(&mut deferred);
            self.deferred_count.store(list.len(), Ordering::Relaxed);
        }
        report
    }

    /// A fence on `stream`, recorded once per release batch; `None` after synchronising the
    /// device when no fence could be recorded.
    fn stream_fence(
        &self,
        stream: StreamId,
        recorded: &mut Vec<(StreamId, Arc<dyn Fence>)>,
    ) -> Option<Arc<dyn Fence>> {
        if let Some((_, fence)) = recorded.iter().find(|(on, _)| *on == stream) {
            return Some(fence.clone());
        }
        match self.backend.fence_after(stream) {
            Ok(fence) => {
                recorded.push((stream, fence.clone()));
                Some(fence)
            }
            Err(error) => {
                tracing::warn!(?error, "no fence for a release; synchronising");
                let _ = self.backend.wait_for_all();
                None
            }
        }
    }

    /// Releases the deferred blocks whose GPU work has finished; with `wait`, synchronises
    /// the device first and releases every block deferred before it.
    pub fn reap(&self, wait: bool) {
        if self.deferred_count.load(Ordering::Relaxed) == 0 {
            return;
        }
        if wait {
            // Only the blocks deferred before the wait are known to be done after it: blocks
            // deferred meanwhile keep waiting for their fences.
            let before: Vec<IdleBlock<O>> = {
                let mut list = self.deferred_list();
                let taken = std::mem::take(&mut *list);
                self.deferred_count.store(0, Ordering::Relaxed);
                taken
            };
            if let Err(error) = self.backend.wait_for_all() {
                tracing::warn!(?error, "waiting before releasing deferred blocks failed");
                let mut list = self.deferred_list();
                list.extend(before);
                self.deferred_count.store(list.len(), Ordering::Relaxed);
                return;
            }
            for record in before {
                self.release_now(record.into_block());
            }
            return;
        }
        let ready: Vec<IdleBlock<O>> = {
            let mut list = self.deferred_list();
            let mut ready = Vec::new();
            for mut record in std::mem::take(&mut *list) {
                if record.pending.is_idle() {
                    ready.push(record);
                } else {
                    list.push(record);
                }
            }
            self.deferred_count.store(list.len(), Ordering::Relaxed);
            ready
        };
        for record in ready {
            self.release_now(record.into_block());
        }
    }

    /// The deferred list, locked (snapshots read it).
    pub fn deferred_list(&self) -> MutexGuard<'_, Vec<IdleBlock<O>>> {
        self.deferred.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
