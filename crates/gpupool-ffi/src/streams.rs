//! From the `cudaStream_t` C passes to the pool's `StreamId`.
//!
//! The null stream is `StreamId::DEFAULT`. Any other handle becomes `StreamId(handle)`; on the
//! CUDA backend it must first be registered with `CudaBackend::register_stream`, because the pool
//! refuses to record events on a stream it was not told about (a made-up handle is undefined
//! behaviour in the driver). Registration is `unsafe`: the caller vouches that the handle is a
//! live stream of the device's primary context that stays alive while the pool may use it. The
//! exported functions pass that promise on to their callers (see `gpupool_alloc`); PyTorch keeps
//! its streams alive for the whole process (they come from its stream pools), which is the
//! promise made.
//!
//! Registering takes the backend's stream-list lock, so each thread remembers the last few
//! streams it registered per device and skips the call for them (a device's backend lives as
//! long as the process, so a registration never goes stale). Host and sim streams are only ids.

use gpupool::StreamId;

use crate::backend_choice::DeviceBackend;

/// The stream id of `handle` on device `device`, registering it with a CUDA backend first.
///
/// # Safety
/// On CUDA, `handle` must be null or a live `cudaStream_t` of the device's primary context that
/// stays alive for as long as the process uses gpupool (the pool records events and queues
/// zeroing on it whenever a buffer of that stream is allocated or freed).
pub unsafe fn stream_id(backend: &DeviceBackend, device: usize, handle: u64) -> StreamId {
    if handle == 0 {
        return StreamId::DEFAULT;
    }
    match backend {
        #[cfg(feature = "cuda")]
        // SAFETY: the caller's promise, passed on.
        DeviceBackend::Cuda(cuda) => unsafe {
            cuda_registration::register_once(cuda, device, handle)
        },
        DeviceBackend::Plain(_) => {
            let _ = device; // host and sim streams are ids on any device
        }
    }
    StreamId(handle)
}

#[cfg(feature = "cuda")]
mod cuda_registration {
    use std::cell::Cell;

    use gpupool::backend::cuda::CudaBackend;

    /// Registrations each thread remembers.
    const REMEMBERED: usize = 8;

    thread_local! {
        /// `(device, stream)` pairs this thread registered, most recent first; `u64::MAX` is
        /// free.
        static REGISTERED: Cell<[(u64, u64); REMEMBERED]> =
            const { Cell::new([(u64::MAX, 0); REMEMBERED]) };
    }

    /// Registers `handle` with `cuda` unless this thread did already.
    ///
    /// # Safety
    /// As `stream_id`.
    pub unsafe fn register_once(cuda: &CudaBackend, device: usize, handle: u64) {
        let key = (device as u64, handle);
        let mut known = REGISTERED.get();
        if known.contains(&key) {
            return;
        }
        // SAFETY: the caller's promise, passed on (see `stream_id`'s contract).
        unsafe { cuda.register_stream(handle as usize as _) };
        known.copy_within(0..REMEMBERED - 1, 1);
        known[0] = key;
        REGISTERED.set(known);
    }
}
