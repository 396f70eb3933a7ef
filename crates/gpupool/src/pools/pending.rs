//! GPU lifetime: when a cached block may go to a new owner.
//!
//! A block that queued GPU work may still read or write must not be handed out again until
//! that work is done (the seed reused such blocks at once). A [`Fence`] is a backend's marker
//! in a stream of work: a CUDA event, a Metal command buffer's completion. The rules, kept here
//! (above the backends, below the router) so they are tested on every platform with fake
//! fences:
//!
//! - a block carries the fences its last owner attached (`used_by`, streams recorded at drop);
//!   it is usable by nobody until all of them are complete;
//! - a block is usable at once on the stream it was dropped on, because work on one stream runs
//!   in order;
//! - on another stream it is usable only once a fence recorded on its stream after the drop has
//!   completed. The pool records that fence lazily, on a miss that finds such blocks, rather than
//!   at every drop: a fence recorded later covers more work, so it is just as safe, and the hit
//!   path never calls the driver.
//!
//! "After the drop" is the whole difficulty of the lazy fence. The miss walks the cache shards
//! one lock at a time, and other threads keep dropping blocks into shards meanwhile; a fence
//! recorded while the walk stood at shard 0 does not cover the work of a block dropped into
//! shard 3 a moment later (that was issue 9's B1: blocks went to another stream while their
//! kernels still ran). So the walk first *marks* the blocks it wants fenced, each under its
//! shard's lock, by attaching a [`StreamFence`] that is only promised; then, with no lock held,
//! it records one real fence per stream and fulfils the promises. Every marked block was dropped
//! before its shard was locked for marking, hence before the fence was recorded; a block dropped
//! later carries no mark and waits for the next walk.
//!
//! Fences are only queried, never waited on, on the allocation path.
#![forbid(unsafe_code)]

use std::sync::Arc;

use crate::backend::{Backend, CompletedFence, Fence};
use crate::kind::StreamId;
use crate::sync::Mutex;

/// A fence on a block's own stream, recorded after the block was dropped, that lets any stream
/// reuse the block once complete. It may be *promised* (attached to blocks under their shard
/// lock) before it is recorded (see the module documentation); until it is fulfilled it counts
/// as incomplete. A promise the backend could not keep (recording failed) is *abandoned*: the
/// block then counts as unfenced, and a later walk or release fences it again.
pub(crate) struct StreamFence {
    state: Mutex<Promise>,
}

enum Promise {
    Pending,
    Recorded(Arc<dyn Fence>),
    Abandoned,
}

impl StreamFence {
    /// A fence to be recorded later, by [`StreamFence::fulfil`] or [`StreamFence::abandon`].
    pub fn promised() -> Arc<StreamFence> {
        Arc::new(StreamFence {
            state: Mutex::new(Promise::Pending),
        })
    }

    /// A fence recorded already.
    pub fn recorded(fence: Arc<dyn Fence>) -> Arc<StreamFence> {
        Arc::new(StreamFence {
            state: Mutex::new(Promise::Recorded(fence)),
        })
    }

    /// A fence for a block no GPU work ever touched (prewarmed): complete from the start.
    pub fn completed() -> Arc<StreamFence> {
        StreamFence::recorded(Arc::new(CompletedFence))
    }

    fn state(&self) -> crate::sync::MutexGuard<'_, Promise> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps the promise with a fence recorded now.
    pub fn fulfil(&self, fence: Arc<dyn Fence>) {
        *self.state() = Promise::Recorded(fence);
    }

    /// Gives the promise up: the blocks holding it count as unfenced again.
    pub fn abandon(&self) {
        *self.state() = Promise::Abandoned;
    }

    /// Whether the fence was recorded and its work has finished.
    pub fn is_complete(&self) -> bool {
        match &*self.state() {
            Promise::Recorded(fence) => fence.is_complete(),
            Promise::Pending | Promise::Abandoned => false,
        }
    }

    /// Whether the promise was given up.
    pub fn is_abandoned(&self) -> bool {
        matches!(*self.state(), Promise::Abandoned)
    }
}

/// A fence on `stream` that could be neither recorded when its block was dropped nor replaced
/// by a wait for the device (both failed): it is recorded at the first query that can (a fence
/// recorded later covers more work, so it is as safe) and counts as incomplete until then. A
/// failed wait proves nothing about the GPU's progress, so nothing else may stand in for it.
pub(crate) struct LateFence {
    backend: Arc<dyn Backend>,
    stream: StreamId,
    recorded: Mutex<Option<Arc<dyn Fence>>>,
}

impl LateFence {
    /// A fence on `stream` of `backend`, to be recorded later.
    pub fn new(backend: Arc<dyn Backend>, stream: StreamId) -> LateFence {
        LateFence {
            backend,
            stream,
            recorded: Mutex::new(None),
        }
    }
}

impl Fence for LateFence {
    /// Recording is a driver call that does not wait (rare: only after two failures).
    fn is_complete(&self) -> bool {
        let mut recorded = self
            .recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recorded.is_none() {
            *recorded = self.backend.fence_after(self.stream).ok();
        }
        recorded.as_ref().is_some_and(|fence| fence.is_complete())
    }
}

/// What keeps a cached block from being reused: its stream and outstanding fences.
///
/// The common case (no fences, one stream) is a stream id and a null pointer, so the hit path
/// moves 16 bytes and tests one pointer.
#[derive(Default)]
pub(crate) struct Pending {
    /// The stream the block was dropped on.
    pub stream: StreamId,
    /// Fences, boxed because almost no block has any.
    pub gates: Option<Box<Gates>>,
}

/// The fences of a cached block.
#[derive(Default)]
pub(crate) struct Gates {
    /// Fences of work (on any stream) that may still use the block.
    pub fences: Vec<Arc<dyn Fence>>,
    /// A fence recorded (or promised) on the block's stream after the drop; once complete, any
    /// stream may reuse the block.
    pub stream_fence: Option<Arc<StreamFence>>,
}

impl Pending {
    /// A block with nothing pending, owned by `stream`.
    pub fn on(stream: StreamId) -> Pending {
        Pending {
            stream,
            gates: None,
        }
    }

    /// A block owned by `stream` that work behind `fences` may still use.
    pub fn with_fences(stream: StreamId, fences: Vec<Arc<dyn Fence>>) -> Pending {
        Pending {
            stream,
            gates: (!fences.is_empty()).then(|| {
                Box::new(Gates {
                    fences,
                    stream_fence: None,
                })
            }),
        }
    }

    /// Whether a request on `stream` may take this block now. Drops fences found complete so
    /// they are not queried again.
    #[inline(always)]
    pub fn usable_on(&mut self, stream: StreamId) -> bool {
        match &mut self.gates {
            None => self.stream == stream,
            Some(gates) => {
                gates.fences.retain(|fence| !fence.is_complete());
                gates.fences.is_empty()
                    && (self.stream == stream
                        || gates
                            .stream_fence
                            .as_ref()
                            .is_some_and(|fence| fence.is_complete()))
            }
        }
    }

    /// Whether the block is proven free of GPU work on every stream. When this is false the
    /// pool synchronises the backend before releasing the block.
    pub fn is_idle(&mut self) -> bool {
        match &mut self.gates {
            None => false,
            Some(gates) => {
                gates.fences.retain(|fence| !fence.is_complete());
                gates.fences.is_empty()
                    && gates
                        .stream_fence
                        .as_ref()
                        .is_some_and(|fence| fence.is_complete())
            }
        }
    }

    /// Whether a fence recorded (or promised) on the block's stream is attached.
    pub fn has_stream_fence(&self) -> bool {
        self.gates.as_ref().is_some_and(|gates| {
            gates
                .stream_fence
                .as_ref()
                .is_some_and(|fence| !fence.is_abandoned())
        })
    }

    /// Forgets every fence (after the device was synchronised).
    pub fn clear_gates(&mut self) {
        self.gates = None;
    }

    /// Whether a cross-stream fence should be recorded for this block.
    pub fn wants_stream_fence(&self, stream: StreamId) -> bool {
        self.stream != stream && !self.has_stream_fence()
    }

    /// Attaches the cross-stream fence (recorded or promised).
    pub fn set_stream_fence(&mut self, fence: Arc<StreamFence>) {
        self.gates.get_or_insert_with(Box::default).stream_fence = Some(fence);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Default)]
    struct ManualFence(AtomicBool);

    impl Fence for ManualFence {
        fn is_complete(&self) -> bool {
            self.0.load(Ordering::Acquire)
        }
    }

    #[test]
    fn same_stream_reuse_is_immediate_and_other_streams_wait_for_the_stream_fence() {
        let mut pending = Pending::on(StreamId(7));
        assert!(pending.usable_on(StreamId(7)));
        assert!(!pending.usable_on(StreamId(8)));
        let fence = Arc::new(ManualFence::default());
        pending.set_stream_fence(StreamFence::recorded(fence.clone()));
        assert!(!pending.usable_on(StreamId(8)));
        fence.0.store(true, Ordering::Release);
        assert!(pending.usable_on(StreamId(8)));
    }

    #[test]
    fn a_promised_fence_holds_blocks_back_until_recorded_and_an_abandoned_one_is_redone() {
        let mut pending = Pending::on(StreamId(1));
        let promise = StreamFence::promised();
        pending.set_stream_fence(promise.clone());
        assert!(!pending.wants_stream_fence(StreamId(2)), "already promised");
        assert!(!pending.usable_on(StreamId(2)), "not recorded yet");
        promise.abandon();
        assert!(
            pending.wants_stream_fence(StreamId(2)),
            "abandoned: fence again"
        );
        assert!(!pending.usable_on(StreamId(2)));
        let kept = StreamFence::promised();
        pending.set_stream_fence(kept.clone());
        kept.fulfil(Arc::new(CompletedFence));
        assert!(pending.usable_on(StreamId(2)));
    }

    #[test]
    fn attached_fences_block_every_stream_until_complete() {
        let fence = Arc::new(ManualFence::default());
        let mut pending = Pending::with_fences(StreamId(1), vec![fence.clone()]);
        assert!(!pending.usable_on(StreamId(1)));
        fence.0.store(true, Ordering::Release);
        assert!(pending.usable_on(StreamId(1)));
        assert!(
            pending.gates.as_ref().unwrap().fences.is_empty(),
            "completed fences are dropped"
        );
    }

    #[test]
    fn idleness_needs_a_completed_stream_fence() {
        let mut on_stream = Pending::on(StreamId(3));
        assert!(!on_stream.is_idle());
        on_stream.set_stream_fence(StreamFence::completed());
        assert!(on_stream.is_idle());
    }
}
