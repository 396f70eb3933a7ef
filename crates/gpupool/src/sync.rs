//! The synchronisation primitives the loom models explore, swappable for loom's.
//!
//! Normal builds use a spin lock for the cache shards (its unlock is one plain store; see
//! `class_cache`), std's mutex and std's atomics. Under `--cfg loom` they become loom's, so
//! the loom models explore every interleaving of the shard locks and quota handover
//! (`class_cache`), the pooling switch the last handle turns off, the budget's reservation
//! (`pool_manager::budget`) and the deferred-release list (`pool_manager::upstream`); a spin
//! lock would spin forever under loom's scheduler. Only the modules those models use take
//! their primitives from here; the rest of the crate uses std directly.
#![forbid(unsafe_code)]

#[cfg(not(loom))]
mod imp {
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
    pub(crate) use std::sync::{Mutex, MutexGuard};

    /// A cache shard's lock: a spin lock whose waiters yield the CPU.
    pub(crate) type ShardLock<T> = spin::mutex::SpinMutex<T, spin::relax::Yield>;
    /// Its guard.
    pub(crate) type ShardGuard<'a, T> = spin::mutex::SpinMutexGuard<'a, T, spin::relax::Yield>;
}

#[cfg(loom)]
mod imp {
    pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
    pub(crate) use loom::sync::{Mutex, MutexGuard};

    /// A cache shard's lock, as a loom mutex with the spin lock's interface.
    pub(crate) struct ShardLock<T>(loom::sync::Mutex<T>);

    /// Its guard.
    pub(crate) type ShardGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

    impl<T> ShardLock<T> {
        pub(crate) fn new(value: T) -> ShardLock<T> {
            ShardLock(loom::sync::Mutex::new(value))
        }

        pub(crate) fn lock(&self) -> ShardGuard<'_, T> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }
}

pub(crate) use imp::{Mutex, MutexGuard, ShardGuard, ShardLock};

/// Atomics, std's or loom's.
pub(crate) mod atomic {
    pub(crate) use super::imp::{AtomicBool, AtomicU64, AtomicUsize};
    pub(crate) use std::sync::atomic::Ordering;
}
