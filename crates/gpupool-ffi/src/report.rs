//! The statistics document of `gpupool_stats_json` and the text of `gpupool_dashboard`.
//!
//! The document is the pool's `PoolStats` as serde writes it (so it parses as one), with four
//! more top-level fields: `"schema_version"` (the layout, [`SCHEMA_VERSION`]: raised when a
//! field changes meaning or goes, not when one is added), `"device"` (the index C uses; inside
//! the pool's own figures the device is always 0, as each pool serves one device), `"created"`
//! (whether the device's pool exists yet) and `"ffi"` (the boundary's counters,
//! [`CountersSnapshot`]). For a device whose
//! pool does not exist yet, the pool's figures are zeros and nothing is created: asking for
//! statistics must not open a CUDA context.
#![forbid(unsafe_code)]

use gpupool::dashboard::{self, Style};
use gpupool::{PoolStats, Totals};
use serde::Serialize;

use crate::counters::CountersSnapshot;
use crate::errors::FfiError;
use crate::registry;

/// The layout version of the statistics document.
const SCHEMA_VERSION: u32 = 1;

#[derive(Serialize)]
struct StatsDocument {
    schema_version: u32,
    device: usize,
    created: bool,
    #[serde(flatten)]
    pool: PoolStats,
    ffi: CountersSnapshot,
}

/// The pool's figures, or zeros for a device without a pool; and whether it exists.
fn pool_stats(device: usize) -> Result<(PoolStats, u64, bool), FfiError> {
    Ok(match registry::existing_pool(device)? {
        Some(pool) => (pool.stats(), pool.live_pointers(), true),
        None => {
            let backend = registry::backend()?.c_name().to_string_lossy().into_owned();
            let empty = PoolStats {
                backend,
                pooling: true,
                devices: Vec::new(),
                totals: Totals::default(),
            };
            (empty, 0, false)
        }
    })
}

/// The statistics document of `device` (see the module documentation).
pub fn stats_json(device: usize) -> Result<String, FfiError> {
    let (pool, live_pointers, created) = pool_stats(device)?;
    let document = StatsDocument {
        schema_version: SCHEMA_VERSION,
        device,
        created,
        pool,
        ffi: registry::counters(device)?.snapshot(live_pointers),
    };
    serde_json::to_string(&document)
        .map_err(|error| FfiError::Internal(format!("statistics do not serialise: {error}")))
}

/// The library's dashboard of `device`'s pool, without colour.
pub fn dashboard(device: usize) -> Result<String, FfiError> {
    let (stats, _, _) = pool_stats(device)?;
    Ok(dashboard::render(&stats, Style::PLAIN))
}
