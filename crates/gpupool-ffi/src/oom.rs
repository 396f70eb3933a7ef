//! The allocation-failure callback: told before an allocation of a non-zero size returns NULL.
//!
//! PyTorch's pluggable-allocator path does not turn a NULL from the allocation function into an
//! exception (see `python/gpupool/torch.py`), so the Python package registers a callback that
//! keeps the message for the exception it raises. The callback gets the device, the bytes asked
//! for and the message `gpupool_last_error` will return (valid during the call only). It runs on
//! the allocating thread with no gpupool lock held, so it may call back into gpupool.
//!
//! Unsafe code: the one call of the foreign function pointer, in [`notify`].

use std::ffi::{c_char, c_int, CString};
use std::sync::Mutex;

use crate::boundary::lock;

/// `void (*)(int device, size_t requested, const char *message)`.
pub(crate) type OomCallback = unsafe extern "C" fn(c_int, libc::size_t, *const c_char);

static CALLBACK: Mutex<Option<OomCallback>> = Mutex::new(None);

/// Installs `callback` (or removes it, with `None`).
pub fn set(callback: Option<OomCallback>) {
    *lock(&CALLBACK) = callback;
}

/// Tells the callback, if one is installed, that an allocation failed.
pub fn notify(device: usize, requested: usize, message: &str) {
    // Copied out first: the callback may install another callback.
    let Some(callback) = *lock(&CALLBACK) else {
        return;
    };
    let text = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    let device = c_int::try_from(device).unwrap_or(c_int::MAX);
    // SAFETY: whoever installed the callback promised a function of this signature that does
    // not unwind (`gpupool_set_oom_callback`'s contract); `text` outlives the call.
    unsafe { callback(device, requested, text.as_ptr()) };
}
