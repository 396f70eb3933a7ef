#![doc = include_str!("../../../README.md")]
#![deny(missing_docs, unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod backend;
mod buffer;
mod class_cache;
mod config;
pub mod dashboard;
mod error;
pub mod fence;
mod large_pool;
mod latency;
mod maintenance;
mod memory_manager;
mod pool_manager;
mod size_class;
mod stats;
mod sync;
pub mod telemetry;

pub use backend::{Backend, Block, MemoryKind, StreamId};
pub use buffer::PooledBuffer;
pub use config::{PoolConfig, PoolConfigBuilder};
pub use error::PoolError;
pub use memory_manager::{AllocOptions, MemoryManager};
pub use pool_manager::{ReleaseReport, TrimLevel};
pub use size_class::{SizeClasses, BLOCK_ALIGN};
pub use stats::{
    ratio, BypassStats, ClassStats, DeviceStats, LargeStats, LatencySummary, PoolStats, Totals,
};
