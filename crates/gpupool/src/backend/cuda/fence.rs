//! CUDA fences: one event recorded on a stream.
//!
//! The pool asks a fence only whether it is complete, never waits on it, and may ask from any
//! thread (the allocation path of whichever thread wants the block). `cuEventQuery` names its
//! context through the event handle, so no context is bound for it; that keeps the query to one
//! driver call with no thread-local context switch.

use std::sync::atomic::{AtomicBool, Ordering};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;

use super::driver::{self, describe, HeldContext};
use crate::backend::Fence;

/// "All work queued on one stream before this point", as a CUDA event.
pub(super) struct EventFence {
    event: sys::CUevent,
    /// Keeps the primary context (and so the event) alive for as long as the fence lives,
    /// which may be after the backend that recorded it was dropped.
    ctx: HeldContext,
    /// Set once the event has been seen complete; an event is recorded once, so it stays so.
    complete: AtomicBool,
    /// Whether a query error was already logged.
    warned: AtomicBool,
}

// SAFETY: the driver API is thread-safe, and a `CUevent` handle is not tied to the thread that
// created it: `is_complete` only queries the event (`cuEventQuery`, safe to call concurrently
// from several threads), and the one call that changes it, `cuEventDestroy`, runs in `Drop`,
// which has exclusive access. The other fields are `Send + Sync` themselves.
unsafe impl Send for EventFence {}
// SAFETY: shared access only queries the event and reads atomics (see `Send`).
unsafe impl Sync for EventFence {}

impl EventFence {
    /// Records a new event on `stream`. The caller has bound `ctx` on this thread and checked
    /// that `stream` is the default stream or a live stream of `ctx`.
    pub fn record(ctx: &HeldContext, stream: sys::CUstream) -> Result<EventFence, DriverError> {
        // Timing is off: events without it are cheaper to record and to query.
        let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?;
        let fence = EventFence {
            event,
            ctx: ctx.clone(),
            complete: AtomicBool::new(false),
            warned: AtomicBool::new(false),
        };
        // SAFETY: `event` was just created in the current context and is live; `stream` is the
        // null (legacy default) stream of the current context or a live stream of it, as the
        // caller checked. On failure `fence` drops and destroys the event.
        unsafe { result::event::record(fence.event, stream) }?;
        Ok(fence)
    }
}

impl Fence for EventFence {
    fn is_complete(&self) -> bool {
        if self.complete.load(Ordering::Acquire) {
            return true;
        }
        // SAFETY: `self.event` is live: it is destroyed only in `Drop`. `cuEventQuery` does not
        // block and needs no current context.
        match super::call_profile::timed(super::DriverCall::QueryFence, || unsafe {
            result::event::query(self.event)
        }) {
            Ok(()) => {
                self.complete.store(true, Ordering::Release);
                true
            }
            Err(DriverError(sys::CUresult::CUDA_ERROR_NOT_READY)) => false,
            Err(error) => {
                // Any other error answers "not complete". Answering "complete" could hand a
                // block to a new owner while the old owner's kernels still write it, and some
                // errors are transient: a query during a stream capture in global mode is
                // refused (CUDA_ERROR_STREAM_CAPTURE_IMPLICIT / _UNSUPPORTED) while the work is
                // very much alive. Answering "not complete" at worst keeps the block out of
                // other streams' reach (its own stream may still reuse it), and the pool
                // synchronises the whole context before it ever releases the block. After a
                // sticky error (the context is lost) that costs a cached block, in a context
                // that can do nothing more anyway. The query is repeated next time, so a
                // transient error heals by itself.
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %describe(error),
                        "cuEventQuery failed; treating the fence as pending"
                    );
                }
                false
            }
        }
    }
}

impl Drop for EventFence {
    fn drop(&mut self) {
        // The event's context is bound in case the driver wants it for the destruction (cudarc
        // does the same); the guard gives the thread back its own context afterwards.
        let _bound = driver::bind(&self.ctx);
        // SAFETY: `self.event` was created in `record` and is destroyed exactly once, here.
        // Destroying an event whose work is pending is allowed: the driver frees it once the
        // work completes.
        if let Err(error) = unsafe { result::event::destroy(self.event) } {
            tracing::debug!(error = %describe(error), "cuEventDestroy failed");
        }
    }
}
