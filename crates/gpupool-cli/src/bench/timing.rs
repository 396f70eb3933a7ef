//! Timing helpers: medians of repeated runs and percentiles of batched pairs.
//!
//! A single allocate+drop pair takes tens of nanoseconds, close to the cost of reading the
//! clock, so pairs are timed in batches and each batch yields one per-pair sample; p50 and p99
//! are taken over those samples.

use std::time::Instant;

/// p50 and p99 of per-pair nanoseconds over `batches` batches of `pairs_per_batch` calls.
pub fn pair_percentiles(
    batches: usize,
    pairs_per_batch: usize,
    mut pair: impl FnMut(),
) -> (f64, f64) {
    for _ in 0..pairs_per_batch.max(100) {
        pair();
    }
    let mut samples: Vec<f64> = (0..batches)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..pairs_per_batch {
                pair();
            }
            start.elapsed().as_nanos() as f64 / pairs_per_batch as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    (percentile(&samples, 0.50), percentile(&samples, 0.99))
}

/// p50 and p99 of per-pair nanoseconds, where `batch(pairs)` runs `pairs` pairs itself.
pub fn batch_percentiles(
    batches: usize,
    pairs_per_batch: usize,
    mut batch: impl FnMut(usize),
) -> (f64, f64) {
    batch(pairs_per_batch.max(100));
    let mut samples: Vec<f64> = (0..batches)
        .map(|_| {
            let start = Instant::now();
            batch(pairs_per_batch);
            start.elapsed().as_nanos() as f64 / pairs_per_batch as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    (percentile(&samples, 0.50), percentile(&samples, 0.99))
}

/// The `quantile` of sorted samples (nearest rank).
pub fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Median of `runs` timings in milliseconds of `work`, plus the last run's result.
pub fn median_ms<R>(runs: usize, mut work: impl FnMut() -> R) -> (f64, R) {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let start = Instant::now();
        let result = work();
        times.push(start.elapsed().as_secs_f64() * 1e3);
        last = Some(result);
    }
    times.sort_by(f64::total_cmp);
    (percentile(&times, 0.5), last.expect("at least one run"))
}
