//! The backend as the pools see it: allocations counted against the budget, and blocks
//! released only once no GPU work may still use them (deferred release).
//!
//! Every backend allocation and release of a device goes through [`Upstream`], so the budget,
//! the peak and the deferred list never miss one. The out-of-memory retry sits one layer up,
//! in the router, because only the router can empty the pools.
#![forbid(unsafe_code)]

use std::sync::{Arc, PoisonError};

use crate::sync::atomic::{AtomicUsize, Ordering};
use crate::sync::{Mutex, MutexGuard};

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
            let mut waited = false;
            if !record.pending.is_idle() && !record.pending.has_stream_fence() {
                let stream = record.pending.stream;
                match self.stream_fence(stream, &mut stream_fences) {
                    Some(fence) => record
                        .pending
                        .set_stream_fence(StreamFence::recorded(fence)),
                    // No fence: wait for the device instead. A wait that failed proves nothing
                    // about the block's work, so the block is deferred unfenced then, and
                    // `reap` fences it later.
                    None => match self.backend.wait_for_all() {
                        Ok(()) => {
                            record.pending.clear_gates();
                            waited = true;
                        }
                        Err(error) => {
                            tracing::warn!(?error, "no fence and no wait for a release; deferred");
                        }
                    },
                }
            }
            if waited || record.pending.is_idle() {
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

    /// A fence on `stream`, recorded once per batch; `None` when none could be recorded.
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
                tracing::warn!(?error, "no fence for a release");
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
        let (ready, mut unfenced): (Vec<IdleBlock<O>>, Vec<IdleBlock<O>>) = {
            let mut list = self.deferred_list();
            let mut ready = Vec::new();
            let mut unfenced = Vec::new();
            for mut record in std::mem::take(&mut *list) {
                if record.pending.is_idle() {
                    ready.push(record);
                } else if !record.pending.has_stream_fence() {
                    unfenced.push(record);
                } else {
                    list.push(record);
                }
            }
            self.deferred_count
                .store(list.len() + unfenced.len(), Ordering::Relaxed);
            (ready, unfenced)
        };
        for record in ready {
            self.release_now(record.into_block());
        }
        // Deferred when neither a fence nor a wait could be had: fenced now, with no lock held
        // (a fence recorded later covers more work, so it is as safe); without one they wait
        // for the next reap.
        if !unfenced.is_empty() {
            let mut fences = Vec::new();
            for record in &mut unfenced {
                if let Some(fence) = self.stream_fence(record.pending.stream, &mut fences) {
                    record
                        .pending
                        .set_stream_fence(StreamFence::recorded(fence));
                }
            }
            let mut list = self.deferred_list();
            list.append(&mut unfenced);
            self.deferred_count.store(list.len(), Ordering::Relaxed);
        }
    }

    /// The pool's end: releases every deferred block, after a wait for the device. A wait
    /// that fails is logged and the blocks go back all the same: nobody could ever reap them
    /// after this, so keeping them would leak them for the life of the process, and a device
    /// that cannot synchronise has failed (a CUDA context with a sticky error runs no more
    /// work; CUDA's own free synchronises before it frees).
    pub fn release_all_at_end(&self) {
        let all = {
            let mut list = self.deferred_list();
            self.deferred_count.store(0, Ordering::Relaxed);
            std::mem::take(&mut *list)
        };
        if all.is_empty() {
            return;
        }
        if let Err(error) = self.backend.wait_for_all() {
            tracing::error!(
                ?error,
                blocks = all.len(),
                "the device could not be synchronised as the pool ends; releasing its deferred \
                 blocks anyway"
            );
        }
        for record in all {
            self.release_now(record.into_block());
        }
    }

    /// The deferred list, locked (snapshots read it).
    pub fn deferred_list(&self) -> MutexGuard<'_, Vec<IdleBlock<O>>> {
        self.deferred.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Loom models of deferred release (`RUSTFLAGS="--cfg loom" cargo test -p gpupool --lib loom`).
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use crate::backend::sim::SimBackend;
    use crate::pools::pending::Pending;
    use crate::pools::record::BlockRecord;
    use crate::sync::atomic::AtomicBool;

    /// The GPU's progress on the block's stream, as a fence.
    struct Flag(Arc<AtomicBool>);

    impl Fence for Flag {
        fn is_complete(&self) -> bool {
            self.0.load(Ordering::Acquire)
        }
    }

    /// A sim backend that fails the model if a block is released before the GPU is done.
    struct Checked {
        sim: SimBackend,
        gpu_done: Arc<AtomicBool>,
    }

    impl Backend for Checked {
        fn name(&self) -> &str {
            "checked sim"
        }
        fn kinds(&self) -> &[MemoryKind] {
            self.sim.kinds()
        }
        fn allocate(&self, bytes: usize, kind: MemoryKind) -> Result<Block, BackendError> {
            self.sim.allocate(bytes, kind)
        }
        fn release(&self, block: Block) {
            assert!(
                self.gpu_done.load(Ordering::Acquire),
                "released while the GPU may still use the block"
            );
            self.sim.release(block);
        }
    }

    /// A block released while its stream's work runs is deferred behind its fence; a
    /// maintenance reap and the GPU's finishing run concurrently, then a last reap. In every interleaving the block goes back to
    /// the backend only after the GPU finished, exactly once, and the budget ends empty.
    #[test]
    fn loom_deferred_release_waits_for_its_fence_and_happens_once() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let gpu_done = Arc::new(AtomicBool::new(false));
            let checked = Arc::new(Checked {
                sim: SimBackend::default(),
                gpu_done: gpu_done.clone(),
            });
            let upstream = Arc::new(Upstream::<()>::new(checked.clone(), Budget::new(None)));
            assert!(upstream.budget.try_reserve(256));
            let block = upstream.allocate(256, MemoryKind::Device).unwrap();
            let mut pending = Pending::on(StreamId(1));
            pending.set_stream_fence(StreamFence::recorded(Arc::new(Flag(gpu_done.clone()))));
            let idle = IdleBlock::new(BlockRecord::boxed(block, None), pending, 0);
            let releaser = {
                let upstream = upstream.clone();
                loom::thread::spawn(move || upstream.release(vec![idle]).blocks)
            };
            let maintenance = {
                let upstream = upstream.clone();
                loom::thread::spawn(move || upstream.reap(false))
            };
            gpu_done.store(true, Ordering::Release);
            assert_eq!(releaser.join().unwrap(), 1);
            maintenance.join().unwrap();
            upstream.reap(false);
            let sim = checked.sim.counters();
            assert_eq!((sim.allocations, sim.releases), (1, 1), "{sim:?}");
            assert_eq!(upstream.deferred_list().len(), 0);
            assert_eq!(
                (upstream.budget.held(), upstream.budget.committed()),
                (0, 0)
            );
        });
    }
}
