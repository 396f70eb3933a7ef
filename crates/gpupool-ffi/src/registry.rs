//! The process-wide state: the settings, and one pool per device, created on first use.
//!
//! C has no handle to pass around, and PyTorch's pluggable allocator calls plain functions, so
//! the pools are global: a fixed table of [`MAX_DEVICES`] slots, each with a `OnceLock` for the
//! device's pool and the boundary's counters for that device. A process that only touches
//! device 0 creates only device 0's pool (for CUDA, only device 0's context).
//!
//! Reading a created pool is one atomic load (`OnceLock::get`), the hot path of every
//! allocation. Creating one takes the settings mutex and happens under it, so a pool is built
//! from one consistent set of settings, and a setting that applies at creation (the
//! configuration, a device's budget, the backend) is refused under the same lock once the pool
//! it applies to exists: [`FfiError::TooLate`], never a silent no-op.
//!
//! The settings start from the environment at first use: `GPUPOOL_BACKEND` (`cuda`, `host`,
//! `sim`, `auto`), `GPUPOOL_CONFIG` (a configuration string, see `config_string`) and
//! `GPUPOOL_LOG` (a `tracing` filter such as `warn` or `gpupool=debug`: logs to stderr; a C
//! library has no host program that would install a log subscriber). A bad `GPUPOOL_BACKEND`
//! or `GPUPOOL_CONFIG` makes every pool creation fail with its error, so it is seen at the
//! first allocation rather than ignored; `gpupool_init` replaces a bad `GPUPOOL_BACKEND`.
//!
//! Pools live as long as the process (statics are never dropped), which is also what lets
//! C hold their pointers without any lifetime protocol.
#![forbid(unsafe_code)]

use std::sync::{Mutex, MutexGuard, OnceLock};

use gpupool::{MemoryManager, PoolConfig, PoolConfigBuilder};

use crate::backend_choice::{BackendKind, DeviceBackend};
use crate::boundary::lock;
use crate::config_string;
use crate::counters::Counters;
use crate::device::DevicePool;
use crate::errors::FfiError;

/// Device indices served: 0 to `GPUPOOL_MAX_DEVICES - 1`.
pub const GPUPOOL_MAX_DEVICES: usize = 64;
const MAX_DEVICES: usize = GPUPOOL_MAX_DEVICES;

struct Slot {
    pool: OnceLock<DevicePool>,
    counters: Counters,
}

static SLOTS: [Slot; MAX_DEVICES] = [const {
    Slot {
        pool: OnceLock::new(),
        counters: Counters::new(),
    }
}; MAX_DEVICES];

/// What pools are created from.
struct Settings {
    /// `None` until chosen (`gpupool_init`, `GPUPOOL_BACKEND`) or detected.
    backend: Option<Result<BackendKind, FfiError>>,
    builder: PoolConfigBuilder,
    /// A bad `GPUPOOL_CONFIG`: every pool creation fails with it.
    config_error: Option<FfiError>,
    /// Per-device budgets (`gpupool_set_budget_bytes`, `gpupool_set_memory_fraction`).
    budgets: [Option<u64>; MAX_DEVICES],
    /// Backends opened before their pool, to read the device's memory for a fraction.
    opened: Vec<Option<DeviceBackend>>,
    /// Whether any pool exists.
    any_pool: bool,
}

static SETTINGS: Mutex<Option<Settings>> = Mutex::new(None);

impl Settings {
    fn from_environment() -> Settings {
        install_logging();
        let backend = std::env::var("GPUPOOL_BACKEND").ok().map(|name| {
            BackendKind::parse(&name)
                .map_err(|error| FfiError::InvalidArgument(format!("GPUPOOL_BACKEND: {error}")))
        });
        let (builder, config_error) = match std::env::var("GPUPOOL_CONFIG") {
            Err(_) => (PoolConfig::builder(), None),
            Ok(text) => match validated(&text, PoolConfig::builder()) {
                Ok(builder) => (builder, None),
                Err(error) => (
                    PoolConfig::builder(),
                    Some(FfiError::Config(format!(
                        "GPUPOOL_CONFIG={text:?}: {error}"
                    ))),
                ),
            },
        };
        Settings {
            backend,
            builder,
            config_error,
            budgets: [None; MAX_DEVICES],
            opened: (0..MAX_DEVICES).map(|_| None).collect(),
            any_pool: false,
        }
    }

    /// The backend kind, detected now if nothing chose one.
    fn backend(&mut self) -> Result<BackendKind, FfiError> {
        self.backend
            .get_or_insert_with(|| Ok(BackendKind::detect()))
            .clone()
    }

    /// The backend of `device`: the one opened for its memory size, or a new one.
    fn take_backend(&mut self, device: usize) -> Result<DeviceBackend, FfiError> {
        match self.opened[device].take() {
            Some(backend) => Ok(backend),
            None => self.backend()?.open(device),
        }
    }
}

/// `text` applied to `builder`, checked by building it.
fn validated(text: &str, builder: PoolConfigBuilder) -> Result<PoolConfigBuilder, FfiError> {
    let builder = config_string::apply(text, builder)?;
    builder.clone().build()?;
    Ok(builder)
}

fn install_logging() {
    let Ok(filter) = std::env::var("GPUPOOL_LOG") else {
        return;
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|error| {
        eprintln!("gpupool: GPUPOOL_LOG={filter:?} is not a log filter ({error}); using warn");
        tracing_subscriber::EnvFilter::new("warn")
    });
    // Fails only if the process already has a subscriber, which then gets the events.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs `body` on the settings (read from the environment the first time).
fn with_settings<T>(body: impl FnOnce(&mut Settings) -> T) -> T {
    let mut guard: MutexGuard<'_, Option<Settings>> = lock(&SETTINGS);
    body(guard.get_or_insert_with(Settings::from_environment))
}

fn slot(device: usize) -> Result<&'static Slot, FfiError> {
    SLOTS.get(device).ok_or_else(|| {
        FfiError::InvalidArgument(format!(
            "device {device}: gpupool serves devices 0 to {}",
            MAX_DEVICES - 1
        ))
    })
}

/// Checks a device index from C.
pub fn device_index(device: std::ffi::c_int) -> Result<usize, FfiError> {
    let index = usize::try_from(device).map_err(|_| {
        FfiError::InvalidArgument(format!("device {device}: devices are numbered from 0"))
    })?;
    slot(index)?;
    Ok(index)
}

/// The counters of `device` (an index [`device_index`] accepted).
pub fn counters(device: usize) -> Result<&'static Counters, FfiError> {
    Ok(&slot(device)?.counters)
}

/// The pool of `device` if it exists, without creating it.
pub fn existing_pool(device: usize) -> Result<Option<&'static DevicePool>, FfiError> {
    Ok(slot(device)?.pool.get())
}

/// Every pool created so far.
pub fn pools() -> impl Iterator<Item = &'static DevicePool> {
    SLOTS.iter().filter_map(|slot| slot.pool.get())
}

/// The pool of `device`, created now if this is its first use.
pub fn pool(device: usize) -> Result<&'static DevicePool, FfiError> {
    let slot = slot(device)?;
    if let Some(pool) = slot.pool.get() {
        return Ok(pool);
    }
    with_settings(|settings| {
        if let Some(pool) = slot.pool.get() {
            return Ok(pool); // created by another thread meanwhile
        }
        if let Some(error) = &settings.config_error {
            return Err(error.clone());
        }
        let mut builder = settings.builder.clone();
        if let Some(budget) = settings.budgets[device] {
            builder = builder.budget_bytes(Some(budget));
        }
        let config = builder.build()?;
        let backend = settings.take_backend(device)?;
        let manager = MemoryManager::with_devices(vec![backend.as_dyn()], config)?;
        settings.any_pool = true;
        tracing::info!(device, backend = %manager.backend_name(), "gpupool: pool created");
        // Only this thread can set the slot: creation happens under the settings lock.
        Ok(slot
            .pool
            .get_or_init(|| DevicePool::new(device, backend, manager)))
    })
}

/// Chooses the backend; refused once a pool exists with another one.
pub fn init(kind: BackendKind) -> Result<(), FfiError> {
    with_settings(|settings| {
        if settings.any_pool {
            let current = settings.backend()?;
            if current != kind {
                return Err(FfiError::TooLate(format!(
                    "pools already use the {} backend; gpupool_init must come before the \
                     first allocation",
                    current.c_name().to_string_lossy()
                )));
            }
        }
        settings.backend = Some(Ok(kind));
        Ok(())
    })
}

/// The backend kind pools use (or will use).
pub fn backend() -> Result<BackendKind, FfiError> {
    with_settings(Settings::backend)
}

/// Applies a configuration string; refused once a pool exists (checked after the string, so a
/// bad string is always reported as such).
pub fn configure(text: &str) -> Result<(), FfiError> {
    with_settings(|settings| {
        let builder = validated(text, settings.builder.clone())?;
        if settings.any_pool {
            return Err(FfiError::TooLate(
                "pools already exist; gpupool_configure must come before the first allocation"
                    .into(),
            ));
        }
        settings.builder = builder;
        Ok(())
    })
}

fn too_late_for_budget(device: usize) -> FfiError {
    FfiError::TooLate(format!(
        "device {device}'s pool already exists (made at its first allocation), and a pool's \
         budget is fixed when it is made; set it before the first allocation on that device"
    ))
}

/// Sets the budget of `device`'s pool, before the pool exists.
pub fn set_budget(device: usize, bytes: u64) -> Result<(), FfiError> {
    let slot = slot(device)?;
    if bytes == 0 {
        return Err(FfiError::InvalidArgument(
            "a budget of 0 bytes can serve nothing".into(),
        ));
    }
    with_settings(|settings| {
        if slot.pool.get().is_some() {
            return Err(too_late_for_budget(device));
        }
        settings.budgets[device] = Some(bytes);
        Ok(())
    })
}

/// Sets the budget of `device`'s pool to `fraction` of the device's total memory, before the
/// pool exists. Returns the budget in bytes.
pub fn set_memory_fraction(device: usize, fraction: f64) -> Result<u64, FfiError> {
    let slot = slot(device)?;
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(FfiError::InvalidArgument(format!(
            "memory fraction {fraction}: expected a number in (0, 1]"
        )));
    }
    with_settings(|settings| {
        if slot.pool.get().is_some() {
            return Err(too_late_for_budget(device));
        }
        let backend = settings.take_backend(device)?;
        let info = backend.as_dyn().memory_info();
        settings.opened[device] = Some(backend);
        let total = info
            .ok_or_else(|| {
                FfiError::Backend(format!(
                    "device {device}: the backend cannot tell its total memory"
                ))
            })?
            .total_bytes;
        let budget = ((total as f64 * fraction) as u64).max(1);
        settings.budgets[device] = Some(budget);
        Ok(budget)
    })
}
