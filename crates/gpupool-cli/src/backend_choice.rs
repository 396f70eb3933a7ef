//! Which backend a command runs on: `auto` picks CUDA when a driver and a device exist, else
//! Metal on Apple, else host.
#![forbid(unsafe_code)]

use std::sync::Arc;

use clap::ValueEnum;
use gpupool::backend::host::HostBackend;
use gpupool::backend::sim::{SimBackend, SimConfig};
use gpupool::{Backend, PoolError};

/// A backend named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendName {
    /// The best backend found: cuda, else metal, else host.
    Auto,
    /// Aligned host memory.
    Host,
    /// The accounting-only simulated device.
    Sim,
    /// NVIDIA GPU memory through the CUDA driver.
    Cuda,
    /// Apple GPU memory through Metal.
    Metal,
}

impl BackendName {
    /// The concrete backend `auto` stands for on this machine.
    pub fn resolve(self) -> BackendName {
        if self != BackendName::Auto {
            return self;
        }
        if cuda_available() {
            BackendName::Cuda
        } else if cfg!(target_vendor = "apple") {
            BackendName::Metal
        } else {
            BackendName::Host
        }
    }

    /// A fresh backend instance for device 0, with a `sim` device of `sim_capacity_bytes` when
    /// given (the hidden `--sim-capacity-bytes`: a nearly full device, so the tests can watch
    /// allocations fail without a GPU). The capacity is refused for any other backend, rather
    /// than silently ignored.
    pub fn create(self, sim_capacity_bytes: Option<u64>) -> Result<Arc<dyn Backend>, PoolError> {
        let resolved = self.resolve();
        if sim_capacity_bytes.is_some() && resolved != BackendName::Sim {
            return Err(PoolError::InvalidConfig(
                "--sim-capacity-bytes applies to --backend sim only".into(),
            ));
        }
        match resolved {
            BackendName::Host | BackendName::Auto => Ok(Arc::new(HostBackend::new())),
            // A device like the H200 the CUDA replays run on: virtual memory with 2 MiB pages,
            // so `sim` and `cuda` replays place and map blocks alike.
            BackendName::Sim => Ok(Arc::new(SimBackend::new(SimConfig {
                capacity_bytes: sim_capacity_bytes.unwrap_or(SimConfig::default().capacity_bytes),
                virtual_memory: true,
                ..SimConfig::default()
            }))),
            BackendName::Cuda => create_cuda(),
            BackendName::Metal => create_metal(),
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
fn create_cuda() -> Result<Arc<dyn Backend>, PoolError> {
    Ok(Arc::new(gpupool::backend::cuda::CudaBackend::new(0)?))
}

#[cfg(not(feature = "cuda"))]
fn create_cuda() -> Result<Arc<dyn Backend>, PoolError> {
    Err(PoolError::InvalidConfig(
        "this build has no CUDA support (feature `cuda`)".into(),
    ))
}

#[cfg(all(feature = "metal", target_vendor = "apple"))]
fn create_metal() -> Result<Arc<dyn Backend>, PoolError> {
    Ok(Arc::new(gpupool::backend::metal::MetalBackend::new()?))
}

#[cfg(not(all(feature = "metal", target_vendor = "apple")))]
fn create_metal() -> Result<Arc<dyn Backend>, PoolError> {
    Err(PoolError::InvalidConfig(
        "Metal is only available on Apple platforms".into(),
    ))
}
