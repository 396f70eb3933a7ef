//! What can fail at the C boundary, the `int` codes C sees, and the thread-local last error.
//!
//! Every exported function that can fail returns a code (or NULL) and leaves a message in a
//! thread-local slot that `gpupool_last_error` hands out, like `errno` and `dlerror`: a
//! successful call leaves the slot alone, and the message stays valid until the next failure
//! on the same thread. `gpupool_last_error_code` gives the code of that failure, so a caller
//! that only sees NULL (PyTorch's allocation path) can tell out of memory from other failures.
#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};

use gpupool::PoolError;

/// The call succeeded.
pub const GPUPOOL_OK: c_int = 0;
/// An argument is invalid: a negative size or device, a device index out of range, a null or
/// non-UTF-8 string, a fraction outside (0, 1].
pub const GPUPOOL_ERR_INVALID_ARGUMENT: c_int = -1;
/// A configuration string has an unknown key, a bad value, or inconsistent settings.
pub const GPUPOOL_ERR_CONFIG: c_int = -2;
/// The setting can no longer change: the pool it applies to already exists.
pub const GPUPOOL_ERR_TOO_LATE: c_int = -3;
/// The pointer is not a live allocation of gpupool.
pub const GPUPOOL_ERR_UNKNOWN_POINTER: c_int = -4;
/// The backend failed: no such device, no driver, a driver error.
pub const GPUPOOL_ERR_BACKEND: c_int = -5;
/// Reading or writing a file failed (trace recording).
pub const GPUPOOL_ERR_IO: c_int = -6;
/// A bug: gpupool panicked. The panic was caught at the boundary; the message says where.
pub const GPUPOOL_ERR_INTERNAL: c_int = -7;
/// The device, or the budget, cannot hold the request even after idle memory was released.
/// Allocation reports it as NULL; the code names it for callers that map last errors to codes.
pub const GPUPOOL_ERR_OUT_OF_MEMORY: c_int = -8;

/// A failure at the boundary, with the words the last error shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FfiError {
    /// See [`GPUPOOL_ERR_INVALID_ARGUMENT`].
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// See [`GPUPOOL_ERR_CONFIG`].
    #[error("configuration: {0}")]
    Config(String),
    /// See [`GPUPOOL_ERR_TOO_LATE`].
    #[error("too late: {0}")]
    TooLate(String),
    /// See [`GPUPOOL_ERR_UNKNOWN_POINTER`].
    #[error("{0}")]
    UnknownPointer(String),
    /// The pool refused a request or could not be created; its own words.
    #[error("{0}")]
    Pool(PoolError),
    /// See [`GPUPOOL_ERR_BACKEND`].
    #[error("backend: {0}")]
    Backend(String),
    /// See [`GPUPOOL_ERR_IO`].
    #[error("{0}")]
    Io(String),
    /// See [`GPUPOOL_ERR_INTERNAL`].
    #[error("internal error (please report): {0}")]
    Internal(String),
}

impl FfiError {
    /// The code C sees for this error.
    pub fn code(&self) -> c_int {
        match self {
            FfiError::InvalidArgument(_) => GPUPOOL_ERR_INVALID_ARGUMENT,
            FfiError::Config(_) => GPUPOOL_ERR_CONFIG,
            FfiError::TooLate(_) => GPUPOOL_ERR_TOO_LATE,
            FfiError::UnknownPointer(_) => GPUPOOL_ERR_UNKNOWN_POINTER,
            FfiError::Pool(PoolError::InvalidConfig(_)) => GPUPOOL_ERR_CONFIG,
            FfiError::Pool(
                PoolError::OutOfMemory { .. }
                | PoolError::BudgetExceeded { .. }
                | PoolError::TooLarge { .. },
            ) => GPUPOOL_ERR_OUT_OF_MEMORY,
            FfiError::Pool(
                PoolError::NoSuchDevice { .. }
                | PoolError::Backend { .. }
                | PoolError::UnsupportedKind { .. },
            ) => GPUPOOL_ERR_BACKEND,
            FfiError::Pool(_) => GPUPOOL_ERR_INVALID_ARGUMENT,
            FfiError::Backend(_) => GPUPOOL_ERR_BACKEND,
            FfiError::Io(_) => GPUPOOL_ERR_IO,
            FfiError::Internal(_) => GPUPOOL_ERR_INTERNAL,
        }
    }
}

impl From<PoolError> for FfiError {
    fn from(error: PoolError) -> Self {
        FfiError::Pool(error)
    }
}

/// A failure as the thread-local slot keeps it.
struct LastError {
    code: c_int,
    message: CString,
}

thread_local! {
    static LAST_ERROR: RefCell<Option<LastError>> = const { RefCell::new(None) };
}

/// Stores `message` with `code` as this thread's last error.
fn set_last_error(code: c_int, message: &str) {
    // A C string cannot hold NUL bytes; none of our messages has one, but user input quoted in
    // a message might.
    let message = CString::new(message.replace('\0', "\\0"))
        .unwrap_or_else(|_| CString::from(c"(unprintable error message)"));
    LAST_ERROR.with(|slot| *slot.borrow_mut() = Some(LastError { code, message }));
}

/// Stores the error as this thread's last error and returns its code.
pub fn report(error: &FfiError) -> c_int {
    set_last_error(error.code(), &error.to_string());
    error.code()
}

/// This thread's last error as a C string, or NULL. The pointer stays valid until the next
/// failure on this thread replaces the message.
pub fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|slot| {
        slot.borrow()
            .as_ref()
            .map_or(std::ptr::null(), |error| error.message.as_ptr())
    })
}

/// The code of this thread's last error, or `GPUPOOL_OK` if none.
pub fn last_error_code() -> c_int {
    LAST_ERROR.with(|slot| {
        slot.borrow()
            .as_ref()
            .map_or(GPUPOOL_OK, |error| error.code)
    })
}

/// This thread's last error as Rust text, for tests and for logs.
pub fn last_error_text() -> Option<String> {
    LAST_ERROR.with(|slot| {
        slot.borrow()
            .as_ref()
            .map(|error| error.message.to_string_lossy().into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_with_nul_bytes_are_kept_readable() {
        set_last_error(GPUPOOL_ERR_CONFIG, "a\0b");
        assert_eq!(last_error_text().as_deref(), Some("a\\0b"));
        assert_eq!(last_error_code(), GPUPOOL_ERR_CONFIG);
    }

    #[test]
    fn pool_errors_map_to_codes() {
        let too_large = FfiError::from(PoolError::TooLarge {
            requested_bytes: 1,
            limit_bytes: 0,
        });
        assert_eq!(too_large.code(), GPUPOOL_ERR_OUT_OF_MEMORY);
        let config = FfiError::from(PoolError::InvalidConfig("x".into()));
        assert_eq!(config.code(), GPUPOOL_ERR_CONFIG);
    }
}
