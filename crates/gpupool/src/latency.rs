//! Sampled allocation latency, per class: histograms behind the p50/p99 in the stats.
//!
//! Reading the clock costs about as much as a whole hit, so hits are timed one in
//! [`HIT_SAMPLE_PERIOD`] per thread (a thread-local counter decides before the request starts);
//! misses, which pay a backend allocation of microseconds anyway, are always timed. Samples go
//! into fixed log-scale buckets (four per doubling, so a percentile is within 19 % of the true
//! value) made of relaxed atomics: no lock, no allocation.
#![forbid(unsafe_code)]

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// One hit in this many (per thread) is timed.
pub const HIT_SAMPLE_PERIOD: u32 = 64;

const SUB_BUCKETS: u32 = 4;
const BUCKETS: usize = 40 * SUB_BUCKETS as usize;

/// Counts down to this thread's next hit-timing sample; returns whether this request is one.
#[inline]
pub(crate) fn countdown_to_sample(countdown: &Cell<u32>) -> bool {
    let left = countdown.get();
    if left == 0 {
        countdown.set(HIT_SAMPLE_PERIOD - 1);
        true
    } else {
        countdown.set(left - 1);
        false
    }
}

/// A log-scale histogram of nanoseconds.
pub(crate) struct Histogram {
    buckets: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket_of(nanos: u64) -> usize {
    let nanos = nanos.max(1);
    let power = 63 - nanos.leading_zeros();
    // The two bits below the leading one: which quarter of the doubling.
    let fraction = (((nanos as u128) << 2 >> power) & 0b11) as u32;
    ((power * SUB_BUCKETS + fraction) as usize).min(BUCKETS - 1)
}

/// The upper edge of a bucket, in nanoseconds.
fn bucket_upper(bucket: usize) -> f64 {
    let power = bucket as u32 / SUB_BUCKETS;
    let fraction = bucket as u32 % SUB_BUCKETS;
    let base = (1u64 << power) as f64;
    base * (1.0 + (fraction + 1) as f64 / SUB_BUCKETS as f64)
}

impl Histogram {
    pub fn record(&self, nanos: u64) {
        self.buckets[bucket_of(nanos)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn summary(&self) -> LatencySummary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|bucket| bucket.load(Ordering::Relaxed))
            .collect();
        let samples: u64 = counts.iter().sum();
        let quantile = |q: f64| -> f64 {
            if samples == 0 {
                return 0.0;
            }
            let rank = ((samples as f64 * q).ceil() as u64).max(1);
            let mut seen = 0;
            for (bucket, &count) in counts.iter().enumerate() {
                seen += count;
                if seen >= rank {
                    return bucket_upper(bucket);
                }
            }
            bucket_upper(BUCKETS - 1)
        };
        LatencySummary {
            samples,
            p50_ns: quantile(0.50),
            p99_ns: quantile(0.99),
        }
    }
}

/// Percentiles of sampled request latencies (upper bucket edges; 0 without samples).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// How many requests were timed.
    pub samples: u64,
    /// Median, in nanoseconds.
    pub p50_ns: f64,
    /// 99th percentile, in nanoseconds.
    pub p99_ns: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_each_sample_within_a_quarter_doubling() {
        for nanos in [1u64, 2, 3, 7, 40, 41, 1000, 123_456, 10_000_000_000] {
            let upper = bucket_upper(bucket_of(nanos));
            assert!(upper >= nanos as f64, "{nanos} -> {upper}");
            assert!(upper <= nanos as f64 * 1.5 + 1.0, "{nanos} -> {upper}");
        }
    }

    #[test]
    fn percentiles_come_from_the_recorded_samples() {
        let histogram = Histogram::default();
        assert_eq!(histogram.summary(), LatencySummary::default());
        for _ in 0..98 {
            histogram.record(40);
        }
        histogram.record(5000);
        histogram.record(5000);
        let summary = histogram.summary();
        assert_eq!(summary.samples, 100);
        assert!((40.0..=48.0).contains(&summary.p50_ns));
        assert!((5000.0..=6144.0).contains(&summary.p99_ns));
    }

    #[test]
    fn one_request_in_the_period_is_sampled() {
        let countdown = Cell::new(0);
        let sampled = (0..HIT_SAMPLE_PERIOD * 10)
            .filter(|_| countdown_to_sample(&countdown))
            .count();
        assert_eq!(sampled, 10);
    }
}
