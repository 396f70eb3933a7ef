//! The CUDA backend's capabilities: stream order (events as fences, stream and context
//! synchronisation) and zeroing in stream order (`cuMemsetD8Async`).

use super::*;

impl StreamOrdered for CudaBackend {
    fn record_fence(&self, stream: StreamId) -> Result<Arc<dyn Fence>, BackendError> {
        let handle = self.streams.handle(stream)?;
        let _bound = self.bind().map_err(backend_error)?;
        let fence = timed(DriverCall::RecordFence, || {
            EventFence::record(&self.ctx, handle)
        })
        .map_err(backend_error)?;
        Ok(Arc::new(fence))
    }

    fn synchronize(&self) -> Result<(), BackendError> {
        let _bound = self.bind().map_err(backend_error)?;
        timed(DriverCall::Synchronize, result::ctx::synchronize).map_err(backend_error)
    }

    fn wait_for_stream(&self, stream: StreamId) -> Result<(), BackendError> {
        let handle = self.streams.handle(stream)?;
        let _bound = self.bind().map_err(backend_error)?;
        // SAFETY: `handle` is the default stream or a live stream of this context (the
        // registry checked it), and the context is current.
        timed(DriverCall::Synchronize, || unsafe {
            result::stream::synchronize(handle)
        })
        .map_err(backend_error)
    }
}

impl Zeroing for CudaBackend {
    fn zero(&self, block: &Block, stream: StreamId) -> Result<(), BackendError> {
        if block.token() != self.token {
            return Err(BackendError::Driver(
                "cannot zero a block this CUDA backend did not allocate".to_string(),
            ));
        }
        let handle = self.streams.handle(stream)?;
        let _bound = self.bind().map_err(backend_error)?;
        // SAFETY: the token shows the block is one of ours and still allocated (a released
        // block was moved into `release`), so its device address is valid in this context for
        // `bytes` bytes, device memory or mapped host memory alike. The caller holds the block
        // exclusively. `handle` is the default stream or a live stream of this context (the
        // registry checked it); the memset runs after the work queued on it before.
        unsafe { result::memset_d8_async(block.device_address(), 0, block.bytes(), handle) }
            .map_err(backend_error)
    }
}
