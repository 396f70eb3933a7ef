//! CUDA peers for `gpupool bench --backend cuda` (filled in with the CUDA backend).

use std::sync::Arc;

use gpupool::{Backend, PoolError};

use super::{LatencyReport, ThroughputReport};

/// Adds the driver allocators' figures to the report.
pub fn add_peers(
    _backend: &Arc<dyn Backend>,
    _latency: &mut [LatencyReport],
) -> Result<Vec<ThroughputReport>, PoolError> {
    Ok(Vec::new())
}
