//! The synchronisation primitives of the class caches, swappable for loom's.
//!
//! Normal builds use a spin lock for the cache shards (its unlock is one plain store; see
//! `class_cache`) and std's mutex elsewhere. Under `--cfg loom` both become loom's mutex, so
//! the loom models in `class_cache` explore every interleaving of the shard locks (a spin lock
//! would spin forever under loom's scheduler). Only the modules that loom models use this
//! facade; the rest of the crate uses std directly.
#![forbid(unsafe_code)]

#[cfg(not(loom))]
mod imp {
    pub(crate) use std::sync::{Mutex, MutexGuard};

    /// A cache shard's lock: a spin lock whose waiters yield the CPU.
    pub(crate) type ShardLock<T> = spin::mutex::SpinMutex<T, spin::relax::Yield>;
    /// Its guard.
    pub(crate) type ShardGuard<'a, T> = spin::mutex::SpinMutexGuard<'a, T, spin::relax::Yield>;
}

#[cfg(loom)]
mod imp {
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
