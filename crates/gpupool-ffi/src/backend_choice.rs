//! Which backend the pools use, and opening it for one device.
//!
//! `GPUPOOL_BACKEND` (`cuda`, `host` or `sim`) or `gpupool_init` choose it; by default it is
//! `cuda` where `CudaBackend::driver_available()` says a driver and a device exist, else
//! `host`. One backend instance per device: CUDA opens that ordinal; host and sim make a fresh
//! instance per device index (the sim as the CLI's replay has it: 80 GiB with virtual memory).
#![forbid(unsafe_code)]

use std::sync::Arc;

use gpupool::backend::host::HostBackend;
use gpupool::backend::sim::{SimBackend, SimConfig};
use gpupool::Backend;

use crate::errors::FfiError;

/// A backend kind, as `GPUPOOL_BACKEND` and `gpupool_init` name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// NVIDIA GPUs through the CUDA driver.
    Cuda,
    /// Aligned host memory.
    Host,
    /// The accounting-only simulated device.
    Sim,
}

impl BackendKind {
    /// Parses a name; `auto` (or an empty name) picks [`BackendKind::detect`].
    pub fn parse(name: &str) -> Result<BackendKind, FfiError> {
        match name.trim().to_ascii_lowercase().as_str() {
            "cuda" => Ok(BackendKind::Cuda),
            "host" => Ok(BackendKind::Host),
            "sim" => Ok(BackendKind::Sim),
            "" | "auto" => Ok(BackendKind::detect()),
            other => Err(FfiError::InvalidArgument(format!(
                "unknown backend {other:?}: expected cuda, host, sim or auto"
            ))),
        }
    }

    /// CUDA where a driver and a device exist, else host.
    pub fn detect() -> BackendKind {
        if cuda_available() {
            BackendKind::Cuda
        } else {
            BackendKind::Host
        }
    }

    /// The name, as a C string for `gpupool_backend`.
    pub fn c_name(self) -> &'static std::ffi::CStr {
        match self {
            BackendKind::Cuda => c"cuda",
            BackendKind::Host => c"host",
            BackendKind::Sim => c"sim",
        }
    }

    /// Opens the backend of device `index`.
    pub fn open(self, index: usize) -> Result<DeviceBackend, FfiError> {
        match self {
            BackendKind::Cuda => open_cuda(index),
            BackendKind::Host => Ok(DeviceBackend::Plain(Arc::new(HostBackend::new()))),
            BackendKind::Sim => Ok(DeviceBackend::Plain(Arc::new(SimBackend::new(SimConfig {
                virtual_memory: true,
                ..SimConfig::default()
            })))),
        }
    }
}

/// One device's backend. CUDA keeps its concrete type, because foreign streams must be
/// registered with it before the pool may use them.
#[derive(Clone)]
pub enum DeviceBackend {
    /// A CUDA device.
    #[cfg(feature = "cuda")]
    Cuda(Arc<gpupool::backend::cuda::CudaBackend>),
    /// A backend whose streams are plain ids (host, sim).
    Plain(Arc<dyn Backend>),
}

impl DeviceBackend {
    /// The backend as the pool takes it.
    pub fn as_dyn(&self) -> Arc<dyn Backend> {
        match self {
            #[cfg(feature = "cuda")]
            DeviceBackend::Cuda(backend) => backend.clone(),
            DeviceBackend::Plain(backend) => backend.clone(),
        }
    }
}

#[cfg(feature = "cuda")]
fn cuda_available() -> bool {
    gpupool::backend::cuda::CudaBackend::driver_available()
}

#[cfg(not(feature = "cuda"))]
fn cuda_available() -> bool {
    false
}

#[cfg(feature = "cuda")]
fn open_cuda(index: usize) -> Result<DeviceBackend, FfiError> {
    if !cuda_available() {
        return Err(FfiError::Backend(
            "the cuda backend needs a CUDA driver and a device, and none was found".into(),
        ));
    }
    let backend = gpupool::backend::cuda::CudaBackend::new(index)?;
    Ok(DeviceBackend::Cuda(Arc::new(backend)))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_index: usize) -> Result<DeviceBackend, FfiError> {
    Err(FfiError::Backend(
        "this build of gpupool_ffi has no CUDA support (feature `cuda`)".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!(BackendKind::parse(" Host ").unwrap(), BackendKind::Host);
        assert_eq!(BackendKind::parse("sim").unwrap(), BackendKind::Sim);
        assert_eq!(BackendKind::parse("auto").unwrap(), BackendKind::detect());
        let error = BackendKind::parse("metal").unwrap_err().to_string();
        assert!(error.contains("unknown backend \"metal\""), "{error}");
    }
}
