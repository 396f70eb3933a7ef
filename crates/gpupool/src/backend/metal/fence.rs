//! [`CommandBufferFence`]: a command buffer's completion as a pool [`Fence`].

use std::fmt;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use block2::RcBlock;
use objc2::rc::{autoreleasepool, Retained};
use objc2::runtime::ProtocolObject;
use objc2::Message;
use objc2_metal::{MTLCommandBuffer, MTLCommandBufferStatus};

use crate::backend::Fence;

/// Completes when a Metal command buffer has finished on the GPU (or failed).
///
/// Attach it to every pooled buffer the command buffer uses, with `PooledBuffer::used_by`;
/// after such a buffer is dropped, its block goes to no new owner until the fence completes.
/// One fence may be shared by any number of buffers.
///
/// Create it **before** `commit`: it installs a completed handler, which Metal accepts only
/// on a command buffer that is not yet committed. A command buffer that is already committed
/// gets a fence that asks the command buffer's `status` instead (it keeps the command buffer
/// alive until the fence is dropped). A command buffer that is never committed never
/// completes, so its buffers stay out of use until a trim releases them.
///
/// ```rust,ignore
/// let commands = queue.commandBuffer().unwrap();
/// let fence = CommandBufferFence::new(&commands);
/// // ... encode work that reads `input` ...
/// input.used_by(fence.clone());
/// commands.commit();
/// drop(input); // cached, but not reused until the GPU is done with it
/// ```
pub struct CommandBufferFence {
    state: State,
}

enum State {
    /// Set by the completed handler (or true from the start).
    Flag(Arc<AtomicBool>),
    /// Committed before the fence was made: poll `status`.
    Status(CommittedCommandBuffer),
}

impl CommandBufferFence {
    /// A fence for `command_buffer`; see the type's documentation for when to call it.
    pub fn new(command_buffer: &ProtocolObject<dyn MTLCommandBuffer>) -> Arc<CommandBufferFence> {
        if !command_buffer.retainedReferences() {
            tracing::warn!(
                "command buffer with unretained references: the Metal backend relies on command \
                 buffers retaining the buffers they use; keep pooled buffers alive until it completes"
            );
        }
        let status = command_buffer.status();
        let state = if is_finished(status) {
            State::Flag(Arc::new(AtomicBool::new(true)))
        } else if status == MTLCommandBufferStatus::NotEnqueued
            || status == MTLCommandBufferStatus::Enqueued
        {
            let flag = Arc::new(AtomicBool::new(false));
            let set_on_completion = flag.clone();
            let handler = RcBlock::new(move |_: NonNull<ProtocolObject<dyn MTLCommandBuffer>>| {
                set_on_completion.store(true, Ordering::Release);
            });
            // SAFETY: `handler` is a valid heap block for the duration of the call, and Metal
            // copies (retains) the blocks it stores, so dropping our `RcBlock` afterwards is
            // fine. The block's signature is `MTLCommandBufferHandler`'s. Metal calls it once,
            // on a thread of its own, after the command buffer completed or failed; the closure
            // only stores to an `AtomicBool` behind an `Arc`, which is safe from any thread.
            // The command buffer is not committed yet (checked above, and `&ProtocolObject`
            // of a non-`Sync` command buffer means no other thread can commit it meanwhile),
            // which is when Metal accepts completed handlers.
            unsafe { command_buffer.addCompletedHandler(RcBlock::as_ptr(&handler)) };
            State::Flag(flag)
        } else {
            State::Status(CommittedCommandBuffer::new(command_buffer.retain()))
        };
        Arc::new(CommandBufferFence { state })
    }
}

/// Whether the command buffer is done with its resources: completed, or stopped by an error.
fn is_finished(status: MTLCommandBufferStatus) -> bool {
    status == MTLCommandBufferStatus::Completed || status == MTLCommandBufferStatus::Error
}

impl Fence for CommandBufferFence {
    fn is_complete(&self) -> bool {
        match &self.state {
            State::Flag(flag) => flag.load(Ordering::Acquire),
            State::Status(command_buffer) => is_finished(command_buffer.status()),
        }
    }
}

impl fmt::Debug for CommandBufferFence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandBufferFence")
            .field("complete", &self.is_complete())
            .finish()
    }
}

/// A committed command buffer kept only to read its status from any thread.
struct CommittedCommandBuffer {
    /// Dropped inside an autorelease pool, see `Drop`.
    command_buffer: ManuallyDrop<Retained<ProtocolObject<dyn MTLCommandBuffer>>>,
}

// SAFETY: objc2 leaves `MTLCommandBuffer` `!Send + !Sync` because encoding into a command
// buffer is not thread-safe. This wrapper never encodes: the only method it calls is `status`,
// a read-only property that Metal itself updates from its own threads as the command buffer
// progresses (so reading it concurrently with those updates is what it is made for), plus
// retain/release, which are atomic in the Objective-C runtime.
unsafe impl Send for CommittedCommandBuffer {}
// SAFETY: as for `Send`: shared access only reads `status`.
unsafe impl Sync for CommittedCommandBuffer {}

impl CommittedCommandBuffer {
    fn new(command_buffer: Retained<ProtocolObject<dyn MTLCommandBuffer>>) -> Self {
        CommittedCommandBuffer {
            command_buffer: ManuallyDrop::new(command_buffer),
        }
    }

    fn status(&self) -> MTLCommandBufferStatus {
        self.command_buffer.status()
    }
}

impl Drop for CommittedCommandBuffer {
    fn drop(&mut self) {
        // The pool drops fences on any thread; a last release must not leak autoreleased
        // objects there.
        autoreleasepool(|_| {
            // SAFETY: dropped exactly once, here, and not used afterwards.
            unsafe { ManuallyDrop::drop(&mut self.command_buffer) }
        });
    }
}
