//! CUDA's virtual memory management as the pool's [`VirtualMemory`] capability: address space
//! from `cuMemAddressReserve`, physical pages from `cuMemCreate`, mapped with `cuMemMap` and
//! made accessible with `cuMemSetAccess`; `cuMemUnmap` + `cuMemRelease` give a page back.
//!
//! Each `map` call creates one physical handle for the range it maps (the pool maps each
//! contiguous run of pages a block needs as one), and the backend remembers the handle by
//! address, because `cuMemUnmap` must undo exactly one mapping and the handle must be released
//! after it. Access is granted to the owning device only: peer devices and IPC cannot use
//! these blocks yet.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::driver::backend_error;
use super::*;
use crate::backend::{PoolAccess, VirtualMemory};

/// Handles of the mapped pages, by address; whether the device supports virtual memory, with
/// its granularity.
pub(super) struct Mappings {
    /// `Some(granularity)` when the device supports virtual memory management.
    pub granularity: Option<usize>,
    handles: Mutex<HashMap<u64, (sys::CUmemGenericAllocationHandle, usize)>>,
}

impl Mappings {
    /// Books for a device of this granularity (`None`: no virtual memory management).
    pub fn new(granularity: Option<usize>) -> Mappings {
        Mappings {
            granularity,
            handles: Mutex::default(),
        }
    }

    fn handles(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, (sys::CUmemGenericAllocationHandle, usize)>> {
        self.handles.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What physical pages of device `ordinal` are.
fn page_properties(ordinal: i32) -> sys::CUmemAllocationProp {
    // SAFETY: a plain C struct of integers, enums whose zero is a valid value, and one
    // pointer, for which all zeros mean "no handle types, no flags, no metadata".
    let mut properties: sys::CUmemAllocationProp = unsafe { std::mem::zeroed() };
    properties.type_ = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
    properties.location = device_location(ordinal);
    properties
}

/// `CUmemLocation` as every CUDA version lays it out: CUDA 13.2 made `id` the first member of
/// a union (beside a `localized` pair of bytes), which keeps the layout but not cudarc's Rust
/// field names, and which version's bindings are compiled is the application's choice (the
/// `cuda` feature).
#[repr(C)]
struct MemLocation {
    type_: sys::CUmemLocationType,
    id: std::ffi::c_int,
}

/// The location "device `ordinal`".
fn device_location(ordinal: i32) -> sys::CUmemLocation {
    let location = MemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
        id: ordinal,
    };
    // SAFETY: `MemLocation` is the C layout of `CUmemLocation` in every CUDA version cudarc
    // binds (an enum, then an `int` or a union whose first member is that `int`, 4 bytes
    // each); `transmute` checks the sizes agree, and every bit pattern of the two fields is a
    // value of the target's (the enum value is one of its variants).
    unsafe { std::mem::transmute::<MemLocation, sys::CUmemLocation>(location) }
}

/// The device's granularity when it supports virtual memory management, else `None`.
pub(super) fn probe(ctx: &HeldContext) -> Option<usize> {
    let supported = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)
        .ok()?;
    if supported == 0 {
        return None;
    }
    let properties = page_properties(ctx.ordinal() as i32);
    let mut granularity = 0usize;
    // SAFETY: both pointers are valid for the call; the context is current (the caller bound
    // it).
    unsafe {
        sys::cuMemGetAllocationGranularity(
            &mut granularity,
            &properties,
            sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
        )
    }
    .result()
    .ok()?;
    (granularity > 0).then_some(granularity)
}

impl VirtualMemory for CudaBackend {
    fn granularity(&self) -> usize {
        self.mappings.granularity.unwrap_or(2 << 20)
    }

    fn reserve(&self, bytes: usize) -> Result<Block, BackendError> {
        let _bound = self.bind().map_err(backend_error)?;
        let mut address: sys::CUdeviceptr = 0;
        // SAFETY: `address` is valid for the result; no fixed address and no flags are asked
        // for; the context is current.
        unsafe { sys::cuMemAddressReserve(&mut address, bytes, self.granularity(), 0, 0) }
            .result()
            .map_err(backend_error)?;
        // SAFETY: a device block (no host pointer) over address space this backend reserved
        // for it alone; nothing reads it until pages are mapped in, and it is given back only
        // through `unreserve`.
        Ok(unsafe { Block::new(address, None, bytes, MemoryKind::Device, self.token) })
    }

    fn unreserve(&self, reservation: Block) {
        if reservation.token() != self.token {
            tracing::error!("a reservation of another backend; leaking it");
            return;
        }
        let _bound = self.bind();
        // SAFETY: reserved by `reserve` above (the token says so) and given back once, after
        // the pool unmapped everything in it.
        let freed =
            unsafe { sys::cuMemAddressFree(reservation.device_address(), reservation.bytes()) };
        if let Err(error) = freed.result() {
            tracing::warn!(error = %driver::describe(error), "cuMemAddressFree failed");
        }
    }

    fn map(&self, address: u64, bytes: usize, _access: &PoolAccess) -> Result<(), BackendError> {
        timed(DriverCall::Map, || self.map_one_handle(address, bytes))
    }

    fn unmap(&self, address: u64, bytes: usize, _access: &PoolAccess) {
        timed(DriverCall::Unmap, || self.unmap_one_handle(address, bytes))
    }
}

impl CudaBackend {
    /// `cuMemCreate` + `cuMemMap` + `cuMemSetAccess` of `address..address + bytes` as one handle.
    fn map_one_handle(&self, address: u64, bytes: usize) -> Result<(), BackendError> {
        let _bound = self.bind().map_err(backend_error)?;
        let ordinal = self.ctx.ordinal() as i32;
        let properties = page_properties(ordinal);
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: `handle` and `properties` are valid for the call; `bytes` is a multiple of
        // the granularity (the pool maps whole pages); the context is current.
        unsafe { sys::cuMemCreate(&mut handle, bytes, &properties, 0) }
            .result()
            .map_err(backend_error)?;
        // SAFETY: `address..address + bytes` lies in a reservation of ours and is unmapped
        // (the pool maps each page once); `handle` holds exactly `bytes`.
        if let Err(error) = unsafe { sys::cuMemMap(address, bytes, 0, handle, 0) }.result() {
            // SAFETY: the handle was created above and is not mapped anywhere.
            let _ = unsafe { sys::cuMemRelease(handle) };
            return Err(backend_error(error));
        }
        let access = sys::CUmemAccessDesc {
            location: properties.location,
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        // SAFETY: the range was mapped just above; one access descriptor, valid for the call.
        if let Err(error) = unsafe { sys::cuMemSetAccess(address, bytes, &access, 1) }.result() {
            // SAFETY: undo the mapping and the handle made above; nothing used them yet.
            unsafe {
                let _ = sys::cuMemUnmap(address, bytes);
                let _ = sys::cuMemRelease(handle);
            }
            return Err(backend_error(error));
        }
        self.mappings.handles().insert(address, (handle, bytes));
        Ok(())
    }

    /// `cuMemUnmap` + `cuMemRelease` of the handle mapped at `address`.
    fn unmap_one_handle(&self, address: u64, bytes: usize) {
        let Some((handle, mapped)) = self.mappings.handles().remove(&address) else {
            tracing::error!(address, "unmap of a range this backend did not map");
            return;
        };
        if mapped != bytes {
            tracing::error!(
                address,
                bytes,
                mapped,
                "unmap of a different size than mapped"
            );
        }
        let _bound = self.bind();
        // SAFETY: `address..address + mapped` is exactly one mapping made by `map` with
        // `handle` (removed from the books above, so it is undone once), and the pool calls
        // this only after the work that used it completed.
        if let Err(error) = unsafe { sys::cuMemUnmap(address, mapped) }.result() {
            // Still mapped: keep the handle in the books rather than release memory in use.
            tracing::warn!(error = %driver::describe(error), "cuMemUnmap failed; the range stays mapped");
            self.mappings.handles().insert(address, (handle, mapped));
            return;
        }
        // SAFETY: the handle's only mapping is gone.
        if let Err(error) = unsafe { sys::cuMemRelease(handle) }.result() {
            tracing::warn!(error = %driver::describe(error), "cuMemRelease failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use cudarc::driver::sys;

    #[test]
    fn device_location_is_the_type_then_the_ordinal() {
        let location = super::device_location(7);
        // SAFETY: `CUmemLocation` is two 4-byte fields (`device_location`'s transmute checks
        // the size), and any bytes are an `[i32; 2]`.
        let words = unsafe { std::mem::transmute::<sys::CUmemLocation, [i32; 2]>(location) };
        let device = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE as i32;
        assert_eq!(words, [device, 7]);
    }
}
