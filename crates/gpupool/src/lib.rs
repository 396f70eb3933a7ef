#![doc = include_str!("../README.md")]
#![deny(missing_docs, unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

// The layers, top to bottom (docs/design.md); a module imports only from its own layer and
// the ones below it, which `tests/all/layers.rs` checks.
//
// front door      front: MemoryManager, PooledBuffer, the maintenance thread
// routing         pool_manager: the router and the adaptors over the backend (budget, deferred
//                 release, out-of-memory retry), trims, prewarm, snapshots
// pools           pools: class caches, the large arena, the bypass, GPU-lifetime rules
// backends        backend: the Backend trait, blocks, fences; host, sim, cuda, metal
// vocabulary      kind, error, size_class, config, stats, latency, sync
// observation     observe: the dashboard and telemetry read snapshots (and the front door,
//                 to serve them)

mod front;
mod pool_manager;
mod pools;

pub mod backend;

mod config;
mod error;
mod kind;
mod latency;
mod size_class;
mod stats;
mod sync;

mod observe;
pub use observe::dashboard;
#[cfg(feature = "prometheus")]
pub use observe::telemetry;

/// Fences: markers in streams of GPU work (the backend layer's, re-exported where users of
/// `PooledBuffer::used_by` look for them).
pub mod fence {
    pub use crate::backend::fence::{CompletedFence, Fence};
}

pub use backend::{Backend, Block, MemoryKind, StreamId};
pub use config::{PoolConfig, PoolConfigBuilder};
pub use error::PoolError;
pub use front::buffer::PooledBuffer;
pub use front::memory_manager::{AllocOptions, MemoryManager};
pub use pool_manager::{ReleaseReport, TrimLevel};
pub use size_class::{SizeClasses, BLOCK_ALIGN};
pub use stats::{
    ratio, BypassStats, ClassStats, DeviceStats, LargeStats, LatencySummary, PoolStats, Totals,
    WasteBreakdown,
};
