//! The marker a backend puts into a stream of GPU work: a CUDA event, a Metal command buffer's
//! completion. The pool asks a fence one question, never waits on it on the allocation path:
//! has the work before it finished? (The reuse rules built on fences are the pools' business,
//! in `pools::pending`.)
#![forbid(unsafe_code)]

/// A point in queued GPU work that completes once everything before it has run.
pub trait Fence: Send + Sync {
    /// Whether the work before the fence has finished. Must not block.
    fn is_complete(&self) -> bool;
}

/// A fence that is already complete; handy for tests and synchronous backends.
#[derive(Debug, Default, Clone, Copy)]
pub struct CompletedFence;

impl Fence for CompletedFence {
    fn is_complete(&self) -> bool {
        true
    }
}
