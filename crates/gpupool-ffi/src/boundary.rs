//! The guard every exported function runs its body in: no panic crosses into C.
//!
//! Unwinding out of an `extern "C"` function aborts the process (Rust 1.81 and later), which
//! would take PyTorch down with a message about Rust instead of an error. So each body runs
//! inside `catch_unwind`; a caught panic becomes [`FfiError::Internal`] with the panic's
//! message, reported like any other failure (last error, return code or NULL).
//!
//! The shared state a panic could interrupt is poison-tolerant: every mutex of this crate is
//! locked with [`lock`], which takes the data of a poisoned mutex as it is (each critical
//! section leaves its data consistent at every point a panic could occur: map inserts and
//! removes are single calls).
#![forbid(unsafe_code)]

use std::any::Any;
use std::ffi::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::errors::{report, FfiError, GPUPOOL_OK};

/// Runs `body`; a panic becomes an internal error.
pub fn guarded<T>(body: impl FnOnce() -> Result<T, FfiError>) -> Result<T, FfiError> {
    // `AssertUnwindSafe`: after a panic nothing observes a broken invariant, see the module
    // documentation.
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(payload) => Err(FfiError::Internal(panic_message(payload.as_ref()))),
    }
}

/// Runs `body` for a function that returns a code: `GPUPOOL_OK`, or the error's code with the
/// last error set.
pub fn code(body: impl FnOnce() -> Result<(), FfiError>) -> c_int {
    match guarded(body) {
        Ok(()) => GPUPOOL_OK,
        Err(error) => report(&error),
    }
}

/// Runs `body` for a function that returns a value: the value, or `on_error` with the last
/// error set.
pub fn value<T>(on_error: T, body: impl FnOnce() -> Result<T, FfiError>) -> T {
    match guarded(body) {
        Ok(value) => value,
        Err(error) => {
            report(&error);
            on_error
        }
    }
}

/// Locks `mutex`, taking the data of a poisoned one as it is (see the module documentation).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        format!("panic: {text}")
    } else if let Some(text) = payload.downcast_ref::<String>() {
        format!("panic: {text}")
    } else {
        "panic with a non-text payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::{last_error_text, GPUPOOL_ERR_INTERNAL};

    #[test]
    fn a_panic_becomes_an_internal_error() {
        let result = code(|| panic!("boom"));
        assert_eq!(result, GPUPOOL_ERR_INTERNAL);
        assert!(last_error_text().unwrap().contains("panic: boom"));
    }
}
