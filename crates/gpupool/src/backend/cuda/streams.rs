//! The streams a CUDA backend may name: the ones it created, the cudarc streams it adopted, and
//! raw handles a user registered.
//!
//! A [`StreamId`] is a plain number that safe code can make up, and the driver may dereference
//! a made-up stream handle. So every id other than the default stream is checked against this
//! registry before it reaches the driver. Streams the backend created and streams it adopted
//! from cudarc are held as cudarc `Arc<CudaStream>`s: holding one keeps the stream alive (a
//! created stream is destroyed when its last `Arc` drops, which may be a clone a user took with
//! `CudaBackend::cudarc_stream`), and the `Arc` is what cudarc's API wants. Raw handles lent
//! through the `unsafe` `CudaBackend::register_stream` are only numbers: the user promised to
//! keep them alive as long as the backend, and no `Arc` is made for them, because an `Arc` could
//! outlive that promise.
//!
//! The lookup takes a mutex and scans a few entries; only slow paths (fences, zeroing,
//! host-access waits, lending a buffer to cudarc) do it.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cudarc::driver::result::DriverError;
use cudarc::driver::{sys, CudaContext, CudaStream};

use super::driver::stream_handle;
use crate::backend::{BackendError, StreamId};

struct RegisteredStream {
    id: u64,
    /// The cudarc stream, for streams created here or adopted; `None` for a raw handle lent
    /// through `CudaBackend::register_stream`.
    stream: Option<Arc<CudaStream>>,
}

/// The streams a backend will pass to the driver (see the module documentation).
#[derive(Default)]
pub(super) struct StreamRegistry {
    streams: Mutex<Vec<RegisteredStream>>,
}

impl StreamRegistry {
    /// Creates a non-blocking stream in `ctx` (the caller has bound it) and holds it.
    ///
    /// The stream is made through cudarc (`CudaContext::new_stream`), so that
    /// [`StreamRegistry::cudarc`] can hand it out: cudarc then knows the context has several
    /// streams, and its own slices track their uses with events (the first such stream makes
    /// cudarc synchronise the context once).
    pub fn create(&self, ctx: &Arc<CudaContext>) -> Result<StreamId, DriverError> {
        let stream = ctx.new_stream()?;
        let id = stream.cu_stream() as usize as u64;
        self.lock().push(RegisteredStream {
            id,
            stream: Some(stream),
        });
        Ok(StreamId(id))
    }

    /// Holds a cudarc stream of the backend's context (the caller checked the context and that
    /// the handle is neither null nor one of the per-thread or legacy markers).
    pub fn adopt(&self, stream: &Arc<CudaStream>) -> StreamId {
        let id = stream.cu_stream() as usize as u64;
        let mut streams = self.lock();
        match streams.iter_mut().find(|known| known.id == id) {
            // Registered as a raw handle before: hold it from now on.
            Some(known) => {
                known.stream.get_or_insert_with(|| stream.clone());
            }
            None => streams.push(RegisteredStream {
                id,
                stream: Some(stream.clone()),
            }),
        }
        StreamId(id)
    }

    /// Records a stream the caller vouches for (see `CudaBackend::register_stream`).
    pub fn register(&self, stream: sys::CUstream) -> StreamId {
        let id = stream as usize as u64;
        if id != 0 {
            let mut streams = self.lock();
            if !streams.iter().any(|known| known.id == id) {
                streams.push(RegisteredStream { id, stream: None });
            }
        }
        StreamId(id)
    }

    /// The handle of `stream`, if it is the default stream or a known one.
    pub fn handle(&self, stream: StreamId) -> Result<sys::CUstream, BackendError> {
        if stream == StreamId::DEFAULT || self.lock().iter().any(|known| known.id == stream.0) {
            Ok(stream_handle(stream))
        } else {
            Err(BackendError::Driver(format!(
                "stream {:#x} was neither created nor registered by this CUDA backend",
                stream.0
            )))
        }
    }

    /// The cudarc stream held for `stream`: `None` for the default stream (the caller makes
    /// one), for raw handles and for unknown ids.
    pub fn cudarc(&self, stream: StreamId) -> Option<Arc<CudaStream>> {
        self.lock()
            .iter()
            .find(|known| known.id == stream.0)
            .and_then(|known| known.stream.clone())
    }

    /// Forgets every stream and drops the backend's references to the cudarc ones; the caller
    /// has bound their context. A created stream is destroyed here unless a user still holds a
    /// clone (then when that clone drops); work still queued on it completes first either way.
    pub fn release_all(&self) {
        let streams: Vec<RegisteredStream> = self.lock().drain(..).collect();
        drop(streams);
    }

    fn lock(&self) -> MutexGuard<'_, Vec<RegisteredStream>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
