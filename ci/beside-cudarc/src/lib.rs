//! Both sides of one build: candle's use of cudarc (linked to libcuda, CUDA version from the
//! build system) and gpupool's CUDA backend over the same cudarc. Compiled as an rlib only:
//! with `dynamic-linking`, linking a binary would need libcuda, cuBLAS and the rest, which a
//! machine without a toolkit lacks.

use std::sync::Arc;

use cudarc::driver::{CudaContext, DriverError};
use gpupool::backend::cuda::CudaBackend;
use gpupool::{MemoryManager, PoolError};

/// What candle does with cudarc: a context on device `ordinal`.
pub fn candle_side(ordinal: usize) -> Result<Arc<CudaContext>, DriverError> {
    CudaContext::new(ordinal)
}

/// gpupool on the same device, through the same cudarc.
pub fn gpupool_side(ordinal: usize) -> Result<MemoryManager, PoolError> {
    Ok(MemoryManager::new(CudaBackend::new(ordinal)?))
}

/// A pooled device buffer of `n` floats.
pub fn pooled_floats(
    manager: &MemoryManager,
    n: usize,
) -> Result<gpupool::PooledBuffer<f32>, PoolError> {
    manager.allocate::<f32>(n)
}
