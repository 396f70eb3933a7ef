//! The vocabulary every layer shares: what kind of memory a block is, and which stream of
//! GPU work it belongs to. A leaf module: it imports nothing from the crate.
#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// Where a block lives and who may touch it. Part of every cache key: a request is never
/// served a block of another kind (the seed's storage-mode mix-up hung forever).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum MemoryKind {
    /// Memory only the device reads and writes (CUDA `cuMemAlloc`, Metal `Private`).
    Device,
    /// Memory the host reads and writes and the device can address: pinned mapped host memory
    /// on CUDA, `Shared` (unified) memory on Metal, plain aligned memory on the host backend.
    HostVisible,
    /// Host-visible memory mapped write-combined: fast for the host to write and the device to
    /// read, very slow for the host to read.
    HostVisibleWriteCombined,
    /// Metal `Managed` storage (Intel Macs): separate host and device copies kept in sync.
    Managed,
}

impl MemoryKind {
    /// Every kind, in a fixed order used for dense cache indices.
    pub const ALL: [MemoryKind; 4] = [
        MemoryKind::Device,
        MemoryKind::HostVisible,
        MemoryKind::HostVisibleWriteCombined,
        MemoryKind::Managed,
    ];

    /// Whether buffers of this kind expose a host slice.
    pub fn is_host_visible(self) -> bool {
        !matches!(self, MemoryKind::Device)
    }

    /// A short lowercase name for reports and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            MemoryKind::Device => "device",
            MemoryKind::HostVisible => "host-visible",
            MemoryKind::HostVisibleWriteCombined => "host-visible-wc",
            MemoryKind::Managed => "managed",
        }
    }
}

/// An ordered queue of GPU work (a CUDA stream, a Metal command queue). `StreamId(0)` is the
/// backend's default stream; host and sim only ever use it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StreamId(pub u64);

impl StreamId {
    /// The backend's default stream.
    pub const DEFAULT: StreamId = StreamId(0);
}
