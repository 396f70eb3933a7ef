//! Timing helpers: the spread of repeated runs and percentiles of batched pairs.
//!
//! A single allocate+drop pair takes tens of nanoseconds, close to the cost of reading the
//! clock, so pairs are timed in batches and each batch yields one per-pair sample; p50 and p99
//! are taken over those samples.
#![forbid(unsafe_code)]

use std::time::Instant;

use crate::format::Spread;

/// p50 and p99 of per-pair nanoseconds over `batches` batches of `pairs_per_batch` calls; the
/// first error of `pair` ends the measurement.
pub fn pair_percentiles<E>(
    batches: usize,
    pairs_per_batch: usize,
    mut pair: impl FnMut() -> Result<(), E>,
) -> Result<(f64, f64), E> {
    for _ in 0..pairs_per_batch.max(100) {
        pair()?;
    }
    let mut samples = (0..batches)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..pairs_per_batch {
                pair()?;
            }
            Ok(start.elapsed().as_nanos() as f64 / pairs_per_batch as f64)
        })
        .collect::<Result<Vec<f64>, E>>()?;
    samples.sort_by(f64::total_cmp);
    Ok((percentile(&samples, 0.50), percentile(&samples, 0.99)))
}

/// p50 and p99 of per-pair nanoseconds, where `batch(pairs)` runs `pairs` pairs itself; the
/// first error of `batch` ends the measurement.
pub fn batch_percentiles<E>(
    batches: usize,
    pairs_per_batch: usize,
    mut batch: impl FnMut(usize) -> Result<(), E>,
) -> Result<(f64, f64), E> {
    batch(pairs_per_batch.max(100))?;
    let mut samples = (0..batches)
        .map(|_| {
            let start = Instant::now();
            batch(pairs_per_batch)?;
            Ok(start.elapsed().as_nanos() as f64 / pairs_per_batch as f64)
        })
        .collect::<Result<Vec<f64>, E>>()?;
    samples.sort_by(f64::total_cmp);
    Ok((percentile(&samples, 0.50), percentile(&samples, 0.99)))
}

/// The `quantile` of sorted samples (nearest rank).
pub fn percentile(sorted: &[f64], quantile: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * quantile).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The spread of `samples` timings in milliseconds of `work`, plus the last run's result; the
/// first error of `work` ends the measurement.
pub fn sampled_ms<R, E>(
    samples: usize,
    mut work: impl FnMut() -> Result<R, E>,
) -> Result<(Spread, R), E> {
    let mut times = Vec::with_capacity(samples);
    let mut last = None;
    for _ in 0..samples.max(1) {
        let start = Instant::now();
        let result = work()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        last = Some(result);
    }
    Ok((Spread::of(&times), last.expect("at least one run")))
}
