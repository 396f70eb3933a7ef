//! The front door: [`MemoryManager`] hands out [`PooledBuffer`]s, which give their blocks back
//! on drop; the maintenance thread trims behind them.

pub(crate) mod buffer;
pub(crate) mod maintenance;
pub(crate) mod memory_manager;
