//! The budget adaptor: how many bytes the pool may hold from the backend, and the peak it held.
//!
//! One atomic, `committed`, is raised *before* a backend allocation by compare-and-swap, so
//! concurrent misses can never take the pool over its budget, and lowered when the allocation
//! fails or the block is released. The peak follows `held` instead, the bytes the backend really
//! handed over: a request the device refused leaves no peak behind (issue 9's B4). The two
//! differ only by allocations in flight.
#![forbid(unsafe_code)]

use crate::sync::atomic::{AtomicU64, Ordering};

use crossbeam_utils::CachePadded;

/// Bytes committed against a limit, bytes held, and the peak held.
pub(super) struct Budget {
    limit: Option<u64>,
    committed: CachePadded<AtomicU64>,
    held: AtomicU64,
    peak: AtomicU64,
}

impl Budget {
    pub fn new(limit: Option<u64>) -> Budget {
        Budget {
            limit,
            committed: CachePadded::new(AtomicU64::new(0)),
            held: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    /// The configured limit (`u64::MAX` when none).
    pub fn limit(&self) -> u64 {
        self.limit.unwrap_or(u64::MAX)
    }

    /// Commits `bytes` unless that would pass the limit.
    pub fn try_reserve(&self, bytes: u64) -> bool {
        let Some(limit) = self.limit else {
            self.committed.fetch_add(bytes, Ordering::Relaxed);
            return true;
        };
        let mut current = self.committed.load(Ordering::Relaxed);
        loop {
            let Some(wanted) = current.checked_add(bytes).filter(|&total| total <= limit) else {
                return false;
            };
            match self.committed.compare_exchange_weak(
                current,
                wanted,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives back a commitment whose allocation did not happen.
    pub fn unreserve(&self, bytes: u64) {
        self.committed.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// The backend handed over `bytes` that were committed.
    pub fn allocated(&self, bytes: u64) {
        let held = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(held, Ordering::Relaxed);
    }

    /// `bytes` went back to the backend.
    pub fn released(&self, bytes: u64) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
        self.unreserve(bytes);
    }

    /// Bytes committed now (held plus allocations in flight).
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Bytes the backend handed over and has not been given back.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// The most bytes ever held at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn the_limit_holds_and_only_handed_over_bytes_make_the_peak() {
        let budget = Budget::new(Some(100));
        assert!(budget.try_reserve(60));
        assert!(!budget.try_reserve(41), "over the limit");
        budget.unreserve(60); // the backend refused
        assert_eq!((budget.committed(), budget.peak()), (0, 0));
        assert!(budget.try_reserve(100));
        budget.allocated(100);
        budget.released(100);
        assert_eq!((budget.committed(), budget.peak()), (0, 100));
    }
}

/// Loom models of the reservation (`RUSTFLAGS="--cfg loom" cargo test -p gpupool --lib loom`).
#[cfg(all(test, loom))]
mod loom_models {
    use super::*;
    use std::sync::Arc;

    /// Two misses of 60 bytes race each other and the release of 40 bytes held under a
    /// limit of 100. In every interleaving the committed bytes never pass the limit, at most
    /// one miss gets its bytes, and the books end exact: committed = held = what was granted.
    #[test]
    fn loom_concurrent_reservations_never_pass_the_limit() {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(3);
        builder.check(|| {
            let budget = Arc::new(Budget::new(Some(100)));
            assert!(budget.try_reserve(40));
            budget.allocated(40);
            let misses: Vec<_> = (0..2)
                .map(|_| {
                    let budget = budget.clone();
                    loom::thread::spawn(move || {
                        let granted = budget.try_reserve(60);
                        assert!(budget.committed() <= 100, "committed past the limit");
                        if granted {
                            budget.allocated(60);
                        }
                        granted
                    })
                })
                .collect();
            budget.released(40);
            assert!(budget.committed() <= 100, "committed past the limit");
            let granted = misses
                .into_iter()
                .map(|miss| miss.join().unwrap())
                .filter(|&granted| granted)
                .count();
            assert!(granted <= 1, "two misses of 60 bytes under a limit of 100");
            assert_eq!(budget.committed(), 60 * granted as u64);
            assert_eq!(budget.held(), 60 * granted as u64);
            assert!(budget.peak() <= 100);
        });
    }
}
