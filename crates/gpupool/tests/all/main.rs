//! One integration-test binary (it links once, which matters on a 2-core CI), a module per area.

mod common;
mod core;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cuda_stress;
mod large;
mod layers;
mod metal_like;
mod observability;
mod properties;
mod readme;
mod regressions;
mod stream_safety;
mod stress;
mod virtual_memory;
