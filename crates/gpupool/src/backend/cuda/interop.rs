//! cudarc interop: pooled device memory where cudarc expects device memory. The views, their
//! soundness and their stream ordering are documented on [`CudaBufferView`] (public, unlike
//! this module); the buffer side is `PooledBuffer::cuda_view` and its siblings.

use std::cell::{Cell, OnceCell};
use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::{
    sys, CudaEvent, CudaStream, DevicePtr, DevicePtrMut, DeviceSlice, LaunchArgs, PushKernelArg,
    SyncOnDrop,
};

use super::driver::{self, describe, stream_handle};
use super::CudaBackend;
use crate::backend::{Block, MemoryKind, StreamId};
use crate::error::PoolError;

/// A pooled buffer of CUDA device memory, borrowed for cudarc's API (reads).
///
/// [`CudaBufferView`] and [`CudaBufferViewMut`] borrow a `PooledBuffer` of a CUDA backend's
/// [`MemoryKind::Device`] memory (`PooledBuffer::cuda_view`, `cuda_view_mut`, and their `_on`
/// forms) and implement cudarc's `DeviceSlice` and `DevicePtr` (both) and `DevicePtrMut` (the
/// mutable one), so cudarc's safe copies take them (`memcpy_htod`, `memcpy_dtoh`,
/// `memcpy_dtod`, `memset_zeros`), and `PushKernelArg`, so `launch_builder(..).arg(&view)`
/// passes them to kernels.
///
/// # What makes the views sound
///
/// - **Only device memory of a CUDA backend.** A view is made from a block whose token is this
///   backend's (so its address is a live allocation of this backend's context) and whose kind is
///   `Device`. A buffer of another backend has no CUDA backend to ask, and is refused
///   ([`PoolError::NotDeviceMemory`]). Host-visible kinds are refused too: their device address is real,
///   but cudarc's safe copies run asynchronously, and the host slice the same buffer hands out
///   (`as_slice`) would then race a copy still in flight.
/// - **The address does not outlive the buffer.** A view borrows the buffer (shared for
///   [`CudaBufferView`], exclusively for [`CudaBufferViewMut`]), so the buffer can be neither
///   dropped nor mutably used while the view lives; `DevicePtr::device_ptr` ties its guard to
///   the view. The address itself is a number, as with every cudarc slice: what cudarc queues
///   with it while the guard lives is ordered as below, so the pool hands the block to nobody
///   else before that work has finished.
/// - **The address belongs to the stream's context.** Making a view refuses a stream of another
///   context than the backend's, and `device_ptr` on a stream of another context panics (the
///   trait cannot return an error, and handing the address to another device's stream is a
///   programming error, like cudarc's own length assertions in its copies).
/// - **In bounds.** `DeviceSlice::len` is the buffer's element count, and the block holds at
///   least that many elements (checked when the view is made).
///
/// # Streams: how the pool learns about the work cudarc queues
///
/// A view is lent to one cudarc stream, its *use stream*, which `DeviceSlice::stream` returns:
/// the buffer's own stream (`cuda_view`: the buffer's stream must be one the backend holds as a
/// cudarc stream, see [`CudaBackend::cudarc_stream`]) or a stream the caller names
/// (`cuda_view_on`).
///
/// - Use stream = the buffer's stream (the common case, and free): cudarc's work runs in stream
///   order with the pool's, which is all the pool assumes.
/// - Another use stream: making the view makes the use stream wait for the work queued so far on
///   the buffer's stream (the previous owner's kernels, the zeroing of `zero_on_reuse`, the
///   owner's own work), and dropping the view makes the buffer's stream wait for the work queued
///   on the use stream meanwhile. Both are event waits on the device; the host does not block.
///   So when the buffer is dropped, the pool's usual rules (reuse at once in order on the
///   buffer's stream, elsewhere after a fence recorded on it) cover cudarc's work too. This is
///   `record_stream`'s guarantee without the pool having to know the use stream, and it also
///   orders the owner's later work on its own stream after cudarc's.
/// - A cudarc call on a third stream (`other.memcpy_htod(&host, &mut view)`) is ordered against
///   the use stream the same way: the third stream first waits for the use stream; afterwards the
///   use stream waits for an event cudarc records on the third stream when the call's
///   `SyncOnDrop` guard drops. Where cudarc records no events (its event tracking is off, or the
///   context has a single stream), the guard synchronises the third stream on the host instead,
///   so the order holds in every mode.
/// - Kernels: `PushKernelArg` cannot see the stream the kernel is launched on, so launch on the
///   view's use stream (`DeviceSlice::stream`): then the rules above order it. A kernel launched
///   on any other stream with a view as argument is ordered by nothing (unlike cudarc's own
///   slices, which carry events for their whole life): keeping it ordered is the `unsafe`
///   launch's caller's job, with a view made on that stream (`cuda_view_on`).
///
/// What the ordering does not cover (each a wrong result on the device if ignored):
/// - Copies to or from another device's stream (cudarc's peer copies): a view is lent within
///   its own context; writing into it from another context's stream panics, and a copy out of it
///   queued on another device's stream is not waited for: synchronise that stream before the
///   view is dropped.
/// - Two pointers of one view held at once for two different third streams (raw `device_ptr`
///   calls whose guards overlap): only the last one is ordered. cudarc's own copies take one
///   guard at a time and are not affected.
/// - Streams cudarc does not count (borrowed streams, `wrap_borrowed_stream`): when cudarc's
///   event tracking changes while a guard lives, its work may be neither recorded nor
///   synchronised.
/// - The per-thread and legacy default stream handles are refused as a view's stream (the
///   per-thread handle names another stream on each thread).
///
/// cudarc's `CudaSlice` carries read and write events for its whole life; a view lives for one
/// borrow, and settles the order when it ends. Views are `Send` but not `Sync`: the ordering of
/// third-stream uses is kept in a cell. A view lent to another stream that is leaked
/// (`mem::forget`) never makes the buffer's stream wait: the block may then go to a new owner
/// on the buffer's stream while the use stream still works on it. That is a wrong result on
/// the device, never host memory touched (views exist only for device memory), like a leaked
/// cudarc `SyncOnDrop` guard.
///
/// A kernel on pooled buffers, with cudarc's launch builder (`function` from
/// `ctx.load_module(..)`, which needs cudarc's `nvrtc` feature; `examples/cudarc_kernel.rs`
/// does the same with the driver's raw launch):
///
/// ```no_run
/// use gpupool::backend::cuda::cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
/// use gpupool::PooledBuffer;
/// # use std::sync::Arc;
///
/// /// `out = a + b` on `stream`, the buffers' stream.
/// fn add(
///     stream: &Arc<CudaStream>,
///     function: &CudaFunction,
///     a: &PooledBuffer<f32>,
///     b: &PooledBuffer<f32>,
///     out: &mut PooledBuffer<f32>,
/// ) -> Result<(), Box<dyn std::error::Error>> {
///     let n = out.len() as u32;
///     let (a, b, mut out) = (a.cuda_view()?, b.cuda_view()?, out.cuda_view_mut()?);
///     let mut launch = stream.launch_builder(function);
///     launch.arg(&a).arg(&b).arg(&mut out).arg(&n);
///     // SAFETY: the kernel takes (const float*, const float*, float*, unsigned) and touches
///     // only indices below n; it runs on the views' stream.
///     unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }?;
///     Ok(())
/// }
/// ```
///
/// Copies:
///
/// ```no_run
/// use gpupool::backend::cuda::CudaBackend;
/// use gpupool::{AllocOptions, MemoryManager};
///
/// let backend = CudaBackend::new(0)?;
/// let stream = backend.context().new_stream().expect("a cudarc stream");
/// let options = AllocOptions { stream: backend.adopt_stream(&stream)?, ..AllocOptions::default() };
/// let manager = MemoryManager::new(backend);
/// let mut buffer = manager.allocate_with::<f32>(1000, options)?;
/// let host = vec![1.5f32; 1000];
/// stream.memcpy_htod(&host, &mut buffer.cuda_view_mut()?).expect("copy in");
/// let back = stream.clone_dtoh(&buffer.cuda_view()?).expect("copy out");
/// assert_eq!(back, host);
/// # Ok::<(), gpupool::PoolError>(())
/// ```
pub struct CudaBufferView<'a, T> {
    lent: Lent<'a>,
    _buffer: PhantomData<&'a [T]>,
}

/// A pooled buffer of CUDA device memory, borrowed exclusively for cudarc's API (reads and
/// writes): `DevicePtrMut` as well as everything [`CudaBufferView`] offers, under the same
/// rules; made by `PooledBuffer::cuda_view_mut` and `cuda_view_mut_on`.
pub struct CudaBufferViewMut<'a, T> {
    lent: Lent<'a>,
    _buffer: PhantomData<&'a mut [T]>,
}

/// What both views hold: the block's address and length, the stream it is lent to, and the
/// ordering state of the module documentation.
struct Lent<'a> {
    backend: &'a CudaBackend,
    address: sys::CUdeviceptr,
    len: usize,
    /// The buffer's own stream, checked against the backend's registry when the view was made.
    pool_stream: StreamId,
    /// The use stream.
    stream: Arc<CudaStream>,
    /// Recorded by cudarc on a third stream when a use there ends; made on the first such use.
    third: OnceCell<CudaEvent>,
    /// Whether `third` holds a use the use stream has not waited for yet.
    third_pending: Cell<bool>,
}

impl CudaBackend {
    /// A read view of `block` (a buffer's block, borrowed for `'a`) of `len` elements of `T`,
    /// ordered on `pool_stream`, lent to `stream` (the pool stream's cudarc stream if `None`).
    pub(crate) fn lend_view<'a, T>(
        &'a self,
        block: &'a Block,
        len: usize,
        pool_stream: StreamId,
        stream: Option<&Arc<CudaStream>>,
    ) -> Result<CudaBufferView<'a, T>, PoolError> {
        Ok(CudaBufferView {
            lent: self.lend::<T>(block, len, pool_stream, stream)?,
            _buffer: PhantomData,
        })
    }

    /// A read-write view: [`CudaBackend::lend_view`] of a block borrowed exclusively.
    pub(crate) fn lend_view_mut<'a, T>(
        &'a self,
        block: &'a mut Block,
        len: usize,
        pool_stream: StreamId,
        stream: Option<&Arc<CudaStream>>,
    ) -> Result<CudaBufferViewMut<'a, T>, PoolError> {
        Ok(CudaBufferViewMut {
            lent: self.lend::<T>(block, len, pool_stream, stream)?,
            _buffer: PhantomData,
        })
    }

    /// The checks of the module documentation, and the use stream's wait for the pool stream.
    fn lend<'a, T>(
        &'a self,
        block: &'a Block,
        len: usize,
        pool_stream: StreamId,
        stream: Option<&Arc<CudaStream>>,
    ) -> Result<Lent<'a>, PoolError> {
        let refuse = |message: String| PoolError::Backend {
            backend: driver::BACKEND.to_string(),
            message,
        };
        if block.token() != self.token {
            return Err(refuse(
                "the buffer's block was not allocated by this CUDA backend".to_string(),
            ));
        }
        if block.kind() != MemoryKind::Device {
            return Err(PoolError::NotDeviceMemory {
                backend: driver::BACKEND.to_string(),
                kind: block.kind(),
                wanted: "CUDA",
            });
        }
        let bytes = len.checked_mul(std::mem::size_of::<T>());
        if bytes.is_none_or(|bytes| bytes > block.bytes()) {
            return Err(refuse(format!(
                "{len} elements of {} bytes do not fit in the block of {} bytes",
                std::mem::size_of::<T>(),
                block.bytes()
            )));
        }
        let pool_handle = self
            .streams
            .handle(pool_stream)
            .map_err(|error| refuse(format!("the buffer's stream cannot be used: {error}")))?;
        let stream = match stream {
            Some(stream) => stream.clone(),
            None => self.cudarc_stream(pool_stream).ok_or_else(|| {
                refuse(format!(
                    "the buffer's stream {:#x} was registered as a raw handle, so there is no \
                     cudarc stream for it: adopt the cudarc stream with `adopt_stream`, or name \
                     one with `cuda_view_on`",
                    pool_stream.0
                ))
            })?,
        };
        self.check_stream_context(&stream)?;
        let handle = stream.cu_stream() as usize;
        if handle == super::CU_STREAM_LEGACY || handle == super::CU_STREAM_PER_THREAD {
            // The per-thread handle names another stream on every thread: a view sent to
            // another thread would compare equal to the buffer's stream there and order nothing.
            return Err(refuse(format!(
                "the special stream handle {handle:#x} (per-thread or legacy default stream) \
                 cannot be a view's stream; use a stream of its own or the buffer's"
            )));
        }
        if stream.cu_stream() != pool_handle {
            self.order(stream.cu_stream(), pool_handle)
                .map_err(|error| {
                    refuse(format!(
                        "could not order the cudarc stream after the buffer's stream: {}",
                        describe(error)
                    ))
                })?;
        }
        Ok(Lent {
            backend: self,
            address: block.device_address(),
            len,
            pool_stream,
            stream,
            third: OnceCell::new(),
            third_pending: Cell::new(false),
        })
    }

    /// Makes `waiter` wait, on the device, for the work queued on `signaller` so far: an event
    /// recorded on `signaller`, waited for by `waiter`. Both are streams of this context that
    /// live for the length of the call.
    fn order(&self, waiter: sys::CUstream, signaller: sys::CUstream) -> Result<(), DriverError> {
        let _bound = self.bind()?;
        let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)?;
        // SAFETY: `event` was just created in the current context (bound above), and both
        // streams are live streams of this context (the caller's promise: they come from the
        // backend's registry or from a cudarc stream borrowed for this call whose context was
        // checked). The wait captures the event as recorded now.
        let ordered = unsafe { result::event::record(event, signaller) }.and_then(|()| {
            // SAFETY: as above.
            unsafe {
                result::stream::wait_event(
                    waiter,
                    event,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
            }
        });
        // SAFETY: `event` is destroyed once, here; a pending wait on it is allowed (the driver
        // releases the event once the wait is resolved).
        if let Err(error) = unsafe { result::event::destroy(event) } {
            tracing::debug!(error = %describe(error), "cuEventDestroy failed");
        }
        ordered
    }
}

impl CudaBackend {
    /// Makes `waiter` (a live stream of this context) wait, on the device, for `event` as
    /// recorded now. Binds the context only for the call, as every backend call does.
    fn wait(&self, waiter: sys::CUstream, event: &CudaEvent) -> Result<(), DriverError> {
        let _bound = self.bind()?;
        // SAFETY: `waiter` is a live stream of this context (the caller's promise) and `event`
        // a live event of it (cudarc destroys it only when the `CudaEvent` drops, which the
        // borrow prevents during the call).
        unsafe {
            result::stream::wait_event(
                waiter,
                event.cu_event(),
                sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
    }
}

impl Lent<'_> {
    /// `DevicePtr::device_ptr` and `DevicePtrMut::device_ptr_mut` alike: every use is ordered
    /// after all earlier ones (the views serialise reads too, which costs nothing on the use
    /// stream and is the safe side elsewhere).
    fn pointer<'s>(&'s self, stream: &'s CudaStream) -> (sys::CUdeviceptr, SyncOnDrop<'s>) {
        if *stream == *self.stream {
            return (self.address, SyncOnDrop::Record(None));
        }
        assert!(
            stream.context() == self.stream.context(),
            "a pooled CUDA buffer of device {} was used on a stream of another context (device \
             {}); its address means nothing there",
            self.stream.context().ordinal(),
            stream.context().ordinal()
        );
        self.join_third();
        // The third stream starts after everything the use stream has queued so far.
        if let Err(error) = self
            .backend
            .order(stream.cu_stream(), self.stream.cu_stream())
        {
            stream.context().record_err(Err::<(), _>(error));
            // Cannot order on the device: wait on the host instead.
            stream.context().record_err(self.stream.synchronize());
        }
        if stream.context().is_managing_stream_synchronization() {
            let third = match self.third.get() {
                Some(event) => Some(event),
                None => match stream.context().new_event(None) {
                    Ok(event) => Some(self.third.get_or_init(|| event)),
                    Err(error) => {
                        stream.context().record_err(Err::<(), _>(error));
                        None
                    }
                },
            };
            if let Some(event) = third {
                // cudarc records it on `stream` when the guard drops, after the call queued its
                // work; the use stream waits for it at the next use or when the view ends.
                self.third_pending.set(true);
                return (self.address, SyncOnDrop::Record(Some((event, stream))));
            }
        }
        (self.address, SyncOnDrop::Sync(Some(stream)))
    }

    /// Makes the use stream wait for the last third-stream use, if one is pending.
    fn join_third(&self) {
        if !self.third_pending.replace(false) {
            return;
        }
        let Some(event) = self.third.get() else {
            return;
        };
        if let Err(error) = self.backend.wait(self.stream.cu_stream(), event) {
            tracing::warn!(error = %describe(error), "cuStreamWaitEvent failed; waiting on the host");
            if let Err(error) = event.synchronize() {
                tracing::error!(error = %describe(error), "cuEventSynchronize failed too");
            }
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        self.join_third();
        let pool = stream_handle(self.pool_stream);
        if self.stream.cu_stream() == pool {
            return;
        }
        // The buffer's stream goes on only after the work cudarc queued on the use stream.
        if let Err(error) = self.backend.order(pool, self.stream.cu_stream()) {
            tracing::warn!(
                error = %describe(error),
                "could not order the buffer's stream after its cudarc stream; waiting on the host"
            );
            if let Err(error) = self.stream.synchronize() {
                tracing::error!(error = %describe(error), "cuStreamSynchronize failed too");
            }
        }
    }
}

macro_rules! device_slice {
    ($view:ident) => {
        impl<T> $view<'_, T> {
            /// The number of elements (the buffer's length).
            pub fn len(&self) -> usize {
                self.lent.len
            }

            /// Always false: pooled buffers are never empty.
            pub fn is_empty(&self) -> bool {
                self.lent.len == 0
            }

            /// The cudarc stream the view is lent to (its use stream).
            pub fn stream(&self) -> &Arc<CudaStream> {
                &self.lent.stream
            }

            /// The device address, for raw driver calls queued on [`Self::stream`] while the view
            /// lives.
            pub fn device_address(&self) -> sys::CUdeviceptr {
                self.lent.address
            }
        }

        impl<T> DeviceSlice<T> for $view<'_, T> {
            fn len(&self) -> usize {
                self.lent.len
            }

            fn stream(&self) -> &Arc<CudaStream> {
                &self.lent.stream
            }
        }

        /// # Panics
        /// On a stream of another CUDA context than the buffer's.
        impl<T> DevicePtr<T> for $view<'_, T> {
            fn device_ptr<'a>(
                &'a self,
                stream: &'a CudaStream,
            ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
                self.lent.pointer(stream)
            }
        }

        impl<T> std::fmt::Debug for $view<'_, T> {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($view))
                    .field("device_address", &format_args!("{:#x}", self.lent.address))
                    .field("len", &self.lent.len)
                    .field("pool_stream", &self.lent.pool_stream)
                    .field("stream", &self.lent.stream.cu_stream())
                    .finish()
            }
        }
    };
}

device_slice!(CudaBufferView);
device_slice!(CudaBufferViewMut);

/// # Panics
/// On a stream of another CUDA context than the buffer's.
impl<T> DevicePtrMut<T> for CudaBufferViewMut<'_, T> {
    fn device_ptr_mut<'a>(
        &'a mut self,
        stream: &'a CudaStream,
    ) -> (sys::CUdeviceptr, SyncOnDrop<'a>) {
        self.lent.pointer(stream)
    }
}

// SAFETY: the argument pushed is a reference to the view's `CUdeviceptr` (a `u64`, which CUDA
// takes for a pointer parameter), borrowed for `'b`, which outlives the launch builder `'a`;
// the driver copies it during the launch. The address is a live device allocation of the
// view's context for the view's lifetime `'c: 'b`. Ordering: the kernel must run on the view's
// stream, which the `unsafe` launch's caller ensures (module documentation).
unsafe impl<'a, 'b: 'a, 'c: 'b, T> PushKernelArg<&'b CudaBufferView<'c, T>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b CudaBufferView<'c, T>) -> &mut Self {
        self.arg(&arg.lent.address)
    }
}

// SAFETY: as for `&CudaBufferView`.
unsafe impl<'a, 'b: 'a, 'c: 'b, T> PushKernelArg<&'b CudaBufferViewMut<'c, T>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b CudaBufferViewMut<'c, T>) -> &mut Self {
        self.arg(&arg.lent.address)
    }
}

// SAFETY: as for `&CudaBufferView`; the exclusive borrow marks the kernel as a writer.
unsafe impl<'a, 'b: 'a, 'c: 'b, T> PushKernelArg<&'b mut CudaBufferViewMut<'c, T>>
    for LaunchArgs<'a>
{
    #[inline(always)]
    fn arg(&mut self, arg: &'b mut CudaBufferViewMut<'c, T>) -> &mut Self {
        let address: &'b sys::CUdeviceptr = &arg.lent.address;
        self.arg(address)
    }
}
