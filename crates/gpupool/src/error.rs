//! The errors of the crate: [`PoolError`] for users, [`BackendError`] for what a backend
//! reports to the pool (defined here, below the backends, so the backend layer imports
//! nothing above it).
//!
//! Variants separate "never fits" ([`PoolError::TooLarge`]) from "out of memory now, retry
//! after freeing something" ([`PoolError::OutOfMemory`]) from "over the configured limit"
//! ([`PoolError::BudgetExceeded`]), and each carries the numbers a user needs to act on it.
#![forbid(unsafe_code)]

use crate::kind::MemoryKind;

/// Everything that can go wrong when configuring the pool or asking it for memory.
///
/// No error loses or corrupts a buffer already handed out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// A request for zero elements or zero bytes.
    #[error("cannot allocate zero bytes")]
    ZeroSize,

    /// `count × size_of::<T>()` does not fit in `usize`.
    #[error("size overflow: {count} elements of {element_bytes} bytes do not fit in usize")]
    SizeOverflow {
        /// Elements requested.
        count: usize,
        /// Bytes per element.
        element_bytes: usize,
    },

    /// The request is larger than anything the backend can ever allocate.
    #[error("request of {requested_bytes} bytes exceeds the largest possible allocation of {limit_bytes} bytes")]
    TooLarge {
        /// Bytes requested.
        requested_bytes: u64,
        /// The backend's limit for one allocation.
        limit_bytes: u64,
    },

    /// The request is larger than the largest size class, so it cannot be cached (prewarm).
    #[error("{requested_bytes} bytes is above the largest class of {max_class_bytes} bytes and is never cached")]
    NotPooled {
        /// Bytes requested.
        requested_bytes: u64,
        /// The largest class.
        max_class_bytes: u64,
    },

    /// The device refused the allocation even after every idle block was released.
    #[error("out of memory: {requested_bytes} bytes requested, {reserved_bytes} bytes reserved by the pool, device free: {}", fmt_optional(*.device_free_bytes))]
    OutOfMemory {
        /// Bytes requested (the block size the pool tried to allocate).
        requested_bytes: u64,
        /// Bytes the pool held from the device when it gave up.
        reserved_bytes: u64,
        /// Free device bytes reported by the driver, where known.
        device_free_bytes: Option<u64>,
    },

    /// Serving the request would take the pool's reserved bytes above the configured budget,
    /// even after every idle block was released.
    #[error("budget exceeded: {requested_bytes} bytes requested, {reserved_bytes} bytes reserved, budget {budget_bytes} bytes")]
    BudgetExceeded {
        /// Bytes requested (the block size needed).
        requested_bytes: u64,
        /// Bytes reserved when the request was refused.
        reserved_bytes: u64,
        /// The configured maximum of reserved bytes.
        budget_bytes: u64,
    },

    /// The configuration is inconsistent; nothing was created.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The backend has no memory of the requested kind.
    #[error("backend {backend} does not offer {kind:?} memory")]
    UnsupportedKind {
        /// The kind asked for.
        kind: MemoryKind,
        /// The backend's name.
        backend: String,
    },

    /// The element type needs a stricter alignment than blocks guarantee.
    #[error("element alignment {align} exceeds the block alignment of {block_align} bytes")]
    Alignment {
        /// `align_of::<T>()`.
        align: usize,
        /// The alignment every block has.
        block_align: usize,
    },

    /// The device index is not one the manager serves.
    #[error("no device {device}: the manager serves {devices} device(s)")]
    NoSuchDevice {
        /// The index asked for.
        device: usize,
        /// How many devices the manager serves.
        devices: usize,
    },

    /// The buffer's memory is not visible to the host, so it has no host slice.
    #[error("{kind:?} memory has no host slice")]
    NotHostVisible {
        /// The buffer's memory kind.
        kind: MemoryKind,
    },

    /// The buffer cannot be lent to a GPU API as that API's device memory: it belongs to
    /// another backend, or its memory is of a host-visible kind (`PooledBuffer::cuda_view`).
    #[error("{kind:?} memory of the {backend} backend is not {wanted} device memory")]
    NotDeviceMemory {
        /// The name of the buffer's backend.
        backend: String,
        /// The buffer's memory kind.
        kind: MemoryKind,
        /// The API that wanted device memory (e.g. "CUDA").
        wanted: &'static str,
    },

    /// A driver call failed for a reason other than memory.
    #[error("{backend} backend error: {message}")]
    Backend {
        /// The backend's name.
        backend: String,
        /// The driver's description of the failure.
        message: String,
    },
}

fn fmt_optional(value: Option<u64>) -> String {
    value.map_or_else(|| "unknown".to_string(), |bytes| format!("{bytes} bytes"))
}

/// A backend's failure, classified so the pool knows whether releasing idle blocks may help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The device is out of memory now; releasing cached blocks and retrying may succeed.
    #[error("device out of memory")]
    OutOfMemory,
    /// The request can never be served by this backend (e.g. above its largest buffer).
    #[error("larger than the backend's limit of {limit} bytes")]
    TooLarge {
        /// The largest single allocation the backend can make.
        limit: u64,
    },
    /// The backend does not offer this memory kind.
    #[error("{0:?} memory is not offered")]
    UnsupportedKind(MemoryKind),
    /// Any other driver failure, with the driver's words.
    #[error("driver error: {0}")]
    Driver(String),
}

impl PoolError {
    /// Turns a backend failure during an allocation into the user-facing error.
    pub(crate) fn from_backend(
        backend: &str,
        error: BackendError,
        requested_bytes: usize,
        reserved_bytes: u64,
        device_free_bytes: Option<u64>,
    ) -> PoolError {
        match error {
            BackendError::OutOfMemory => PoolError::OutOfMemory {
                requested_bytes: requested_bytes as u64,
                reserved_bytes,
                device_free_bytes,
            },
            BackendError::TooLarge { limit } => PoolError::TooLarge {
                requested_bytes: requested_bytes as u64,
                limit_bytes: limit,
            },
            BackendError::UnsupportedKind(kind) => PoolError::UnsupportedKind {
                kind,
                backend: backend.to_string(),
            },
            BackendError::Driver(message) => PoolError::Backend {
                backend: backend.to_string(),
                message,
            },
        }
    }
}
