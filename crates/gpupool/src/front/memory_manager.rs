//! `MemoryManager`: the front door.
//!
//! A cheap `Clone + Send + Sync` handle. It turns typed requests into byte requests (checking
//! zero sizes, overflow and alignment), hands out [`PooledBuffer`]s, and exposes the pool's
//! operations and statistics. The seed's `...Async` methods are plain methods here: allocation
//! is a synchronous, sub-microsecond operation.
#![forbid(unsafe_code)]

use std::sync::Arc;

use super::buffer::PooledBuffer;
use super::maintenance::Maintenance;
use crate::backend::Backend;
use crate::config::PoolConfig;
use crate::error::PoolError;
use crate::kind::{MemoryKind, StreamId};
use crate::pool_manager::{PoolManager, ReleaseReport, TrimLevel};
use crate::size_class::BLOCK_ALIGN;
use crate::stats::PoolStats;

/// Where and how a request is served. The default is device 0, the backend's default kind and
/// the default stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocOptions {
    /// The device index.
    pub device: usize,
    /// The memory kind; `None` for the backend's default.
    pub kind: Option<MemoryKind>,
    /// The stream the buffer's work is ordered on.
    pub stream: StreamId,
}

impl AllocOptions {
    /// Options for memory of `kind`.
    pub fn kind(kind: MemoryKind) -> Self {
        AllocOptions {
            kind: Some(kind),
            ..AllocOptions::default()
        }
    }
}

struct Handle {
    pool: Arc<PoolManager>,
    _maintenance: Option<Maintenance>,
}

impl Drop for Handle {
    /// With the last handle gone no request can come again: release the caches now, and let
    /// buffers still alive release their blocks when they drop instead of caching them.
    fn drop(&mut self) {
        self.pool.set_pooling(false);
    }
}

/// The front door: allocate typed buffers, switch pooling, trim, and read statistics.
///
/// ```
/// use gpupool::{backend::host::HostBackend, MemoryManager};
/// let manager = MemoryManager::new(HostBackend::new());
/// drop(manager.allocate::<u8>(4096).unwrap());
/// let again = manager.allocate::<u8>(4096).unwrap(); // served from the cache
/// let stats = manager.stats();
/// assert_eq!(stats.totals.hits, 1);
/// assert_eq!(stats.totals.backend_allocations, 1);
/// # drop(again);
/// ```
#[derive(Clone)]
pub struct MemoryManager {
    handle: Arc<Handle>,
}

impl MemoryManager {
    /// A manager with pooling on and the seed's default configuration.
    pub fn new<B: Backend>(backend: B) -> MemoryManager {
        MemoryManager::with_config(backend, PoolConfig::default())
            .expect("the default configuration is valid for any backend")
    }

    /// A manager for one device with the given configuration.
    pub fn with_config<B: Backend>(
        backend: B,
        config: PoolConfig,
    ) -> Result<MemoryManager, PoolError> {
        MemoryManager::with_devices(vec![Arc::new(backend)], config)
    }

    /// A manager serving several devices, one backend each (device index = position).
    pub fn with_devices(
        backends: Vec<Arc<dyn Backend>>,
        config: PoolConfig,
    ) -> Result<MemoryManager, PoolError> {
        let interval = config.maintenance_interval;
        let pool = PoolManager::new(backends, config)?;
        let maintenance = Maintenance::start(Arc::downgrade(&pool), interval);
        Ok(MemoryManager {
            handle: Arc::new(Handle {
                pool,
                _maintenance: maintenance,
            }),
        })
    }

    fn pool(&self) -> &Arc<PoolManager> {
        &self.handle.pool
    }

    /// A buffer of `count` elements of `T` on device 0, default kind and stream.
    ///
    /// Errors: zero `count`, `count × size_of::<T>()` overflowing, `T` aligned above 256
    /// bytes, budget or device exhausted.
    #[inline(always)]
    pub fn allocate<T: bytemuck::Pod>(&self, count: usize) -> Result<PooledBuffer<T>, PoolError> {
        self.allocate_with(count, AllocOptions::default())
    }

    /// A buffer of `bytes` bytes.
    #[inline(always)]
    pub fn allocate_bytes(&self, bytes: usize) -> Result<PooledBuffer<u8>, PoolError> {
        self.allocate_with(bytes, AllocOptions::default())
    }

    /// A buffer of `count` elements with explicit device, kind and stream.
    #[inline(always)]
    pub fn allocate_with<T: bytemuck::Pod>(
        &self,
        count: usize,
        options: AllocOptions,
    ) -> Result<PooledBuffer<T>, PoolError> {
        let element_bytes = std::mem::size_of::<T>();
        if std::mem::align_of::<T>() > BLOCK_ALIGN {
            return Err(PoolError::Alignment {
                align: std::mem::align_of::<T>(),
                block_align: BLOCK_ALIGN,
            });
        }
        let bytes = count
            .checked_mul(element_bytes)
            .ok_or(PoolError::SizeOverflow {
                count,
                element_bytes,
            })?;
        let allocation =
            self.pool()
                .allocate(options.device, bytes, options.kind, options.stream)?;
        Ok(PooledBuffer::new(
            allocation,
            count,
            bytes,
            options.device,
            options.stream,
        ))
    }

    /// Turns pooling on or off. Turning it off releases every idle block; later requests go
    /// straight to the backend and are counted as bypasses.
    pub fn set_pooling(&self, enabled: bool) {
        self.pool().set_pooling(enabled);
    }

    /// Whether pooling is on.
    pub fn pooling(&self) -> bool {
        self.pool().pooling()
    }

    /// Pre-allocates room for `count` requests of `bytes` bytes on device 0 (the seed's
    /// `PreAllocatePoolAsync`), so they need no backend call: up to `count` idle blocks of the
    /// class that serves `bytes`, within the class cap and the budget, or, for sizes the large
    /// arena serves (above `large_threshold_bytes`), one free segment that holds `count` of
    /// them. Returns how many requests the prewarmed memory serves.
    ///
    /// ```
    /// use gpupool::{backend::host::HostBackend, MemoryManager};
    /// let manager = MemoryManager::new(HostBackend::new());
    /// assert_eq!(manager.prewarm(2 << 20, 4)?, 4); // 2 MiB: the large arena
    /// let buffers: Vec<_> = (0..4).map(|_| manager.allocate_bytes(2 << 20)).collect::<Result<_, _>>()?;
    /// assert_eq!(manager.stats().totals.backend_allocations, 1, "all four from the prewarmed segment");
    /// # drop(buffers);
    /// # Ok::<(), gpupool::PoolError>(())
    /// ```
    pub fn prewarm(&self, bytes: usize, count: usize) -> Result<usize, PoolError> {
        self.prewarm_with(bytes, count, AllocOptions::default())
    }

    /// `prewarm` for a given device, kind and (for the large arena, whose free space belongs
    /// to a stream) stream.
    pub fn prewarm_with(
        &self,
        bytes: usize,
        count: usize,
        options: AllocOptions,
    ) -> Result<usize, PoolError> {
        self.pool()
            .prewarm(options.device, bytes, count, options.kind, options.stream)
    }

    /// Releases idle blocks: down to the per-class minimum, or all of them.
    pub fn trim(&self, level: TrimLevel) -> ReleaseReport {
        self.pool().trim(level)
    }

    /// Releases every idle block (the seed's `ClearPools`); live buffers are untouched.
    pub fn clear(&self) -> ReleaseReport {
        self.pool().trim(TrimLevel::Aggressive)
    }

    /// Releases every idle block of the classes that saw no request since the previous call,
    /// returning what it released. Classes in use keep their cache.
    pub fn defragment(&self) -> ReleaseReport {
        self.pool().defragment()
    }

    /// Runs one maintenance pass now (what the background thread does each interval).
    pub fn run_maintenance(&self) -> ReleaseReport {
        self.pool().maintain()
    }

    /// Reserved bytes over the budget (or the device capacity), the highest of any device.
    pub fn memory_pressure(&self) -> f64 {
        self.stats().totals.memory_pressure
    }

    /// The most bytes the backends have held at once, summed over devices: what
    /// `stats().totals.peak_reserved_bytes` reports, read without taking a snapshot (a few
    /// atomic loads), so a caller can watch for new peaks cheaply.
    pub fn peak_reserved_bytes(&self) -> u64 {
        self.pool().peak_reserved_bytes()
    }

    /// One consistent snapshot of every counter and derived metric.
    pub fn stats(&self) -> PoolStats {
        self.pool().stats()
    }

    /// The configuration in force.
    pub fn config(&self) -> &PoolConfig {
        self.pool().config()
    }

    /// How many devices this manager serves.
    pub fn device_count(&self) -> usize {
        self.pool().device_count()
    }

    /// Device `device`'s backend as its concrete type `B`, or `None` when it is another type
    /// (or `device` is not served). The way back to a backend moved into the manager, e.g. to
    /// adopt a cudarc stream after the manager was made:
    /// `manager.backend::<CudaBackend>(0).unwrap().adopt_stream(&stream)`.
    ///
    /// ```
    /// use gpupool::backend::{host::HostBackend, sim::SimBackend};
    /// use gpupool::MemoryManager;
    /// let manager = MemoryManager::new(HostBackend::new());
    /// assert!(manager.backend::<HostBackend>(0).is_some());
    /// assert!(manager.backend::<SimBackend>(0).is_none());
    /// assert!(manager.backend::<HostBackend>(1).is_none());
    /// ```
    pub fn backend<B: Backend>(&self, device: usize) -> Option<&B> {
        if device >= self.device_count() {
            return None;
        }
        self.pool().backend(device).downcast_ref::<B>()
    }

    /// The name of device `device`'s backend.
    pub fn backend_name(&self) -> String {
        self.pool().backend(0).name().to_string()
    }
}

impl std::fmt::Debug for MemoryManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryManager")
            .field("backend", &self.backend_name())
            .field("devices", &self.device_count())
            .field("pooling", &self.pooling())
            .finish()
    }
}
