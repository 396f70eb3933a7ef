//! The pool report (the seed's `GeneratePoolReport`): a dated, plain record of a snapshot —
//! overall figures, memory, the per-class table, latency, health and recommendations — as text
//! and, with the `json` feature, as JSON.
//!
//! Where the dashboard is for a person at a terminal, the report is for a file or a ticket: it
//! carries its timestamp (UTC, RFC 3339) and, in JSON, the whole [`PoolStats`] beside the
//! derived judgements, so a reader can check every figure. The timestamp is an argument, so
//! the same snapshot always gives the same report.
#![forbid(unsafe_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::format::{bytes, percent, thousands};
use super::health::HealthAssessment;
use super::recommendations::{recommendations, Recommendation};
use super::render::{analysis, breakdown, latency, mean_efficiency, Page};
use super::score::{class_efficiency, StarRating};
use super::style::Style;
use super::summary::summary;
use crate::backend::MemoryKind;
use crate::stats::PoolStats;

/// The efficiency score of one class.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClassScore {
    /// The device index.
    pub device: usize,
    /// The class's block size.
    pub class_bytes: u64,
    /// The memory kind.
    pub kind: MemoryKind,
    /// 0–100, see [`class_efficiency`].
    pub score: f64,
}

/// A recommendation with its sentence.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RecommendationEntry {
    /// The recommendation and its figures.
    #[serde(flatten)]
    pub recommendation: Recommendation,
    /// What the dashboard prints for it.
    pub message: String,
}

/// A dated report of one snapshot; serialises (serde) to the JSON report, which
/// `to_json` writes with the `json` feature.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PoolReport {
    /// The layout of the serialised report, [`PoolReport::SCHEMA_VERSION`]: a reader checks it
    /// before trusting the fields it knows. Fields may be added without raising it; it is
    /// raised when one changes meaning or goes.
    pub schema_version: u32,
    /// When the report was made, UTC, RFC 3339 (`2025-11-25T12:00:00Z`).
    pub generated_at: String,
    /// The same instant in seconds since the Unix epoch.
    pub generated_at_unix_s: u64,
    /// The compact one-line summary.
    pub summary: String,
    /// The health status and why.
    pub health: HealthAssessment,
    /// The star rating; `None` before the first request.
    pub rating: Option<StarRating>,
    /// The request-weighted mean of the class scores, 0–100.
    pub efficiency_score: f64,
    /// Every class's score.
    pub class_scores: Vec<ClassScore>,
    /// What to change; empty when the pool is operating well.
    pub recommendations: Vec<RecommendationEntry>,
    /// The snapshot itself.
    pub stats: PoolStats,
}

impl PoolReport {
    /// The layout version this library writes.
    pub const SCHEMA_VERSION: u32 = 1;

    /// The report of `stats`, dated `generated_at`.
    pub fn new(stats: PoolStats, generated_at: SystemTime) -> PoolReport {
        let seconds = generated_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let class_scores = stats
            .devices
            .iter()
            .flat_map(|device| {
                device.classes.iter().map(|class| ClassScore {
                    device: device.device,
                    class_bytes: class.class_bytes,
                    kind: class.kind,
                    score: class_efficiency(class),
                })
            })
            .collect();
        PoolReport {
            schema_version: PoolReport::SCHEMA_VERSION,
            generated_at: rfc3339(seconds),
            generated_at_unix_s: seconds,
            summary: summary(&stats),
            health: HealthAssessment::of(&stats.totals),
            rating: (stats.totals.requests > 0)
                .then(|| StarRating::from_reduction(stats.totals.allocation_reduction)),
            efficiency_score: mean_efficiency(&stats),
            class_scores,
            recommendations: recommendations(&stats)
                .into_iter()
                .map(|recommendation| RecommendationEntry {
                    message: recommendation.to_string(),
                    recommendation,
                })
                .collect(),
            stats,
        }
    }

    /// The report as pretty-printed JSON. Needs the `json` feature.
    #[cfg(feature = "json")]
    pub fn to_json(&self) -> String {
        // Cannot fail: every map key is a string and serde_json writes non-finite floats as null.
        serde_json::to_string_pretty(self).expect("a report always serialises")
    }

    /// The report as plain text (no colour), every line within 80 columns.
    pub fn to_text(&self) -> String {
        let stats = &self.stats;
        let totals = &stats.totals;
        let mut page = Page {
            out: String::new(),
            style: Style::PLAIN,
        };
        page.line("gpupool Pool Report");
        page.line(&format!("Generated: {}", self.generated_at));
        page.line(&format!(
            "Backend: {}, pooling {}, {} device(s)",
            stats.backend,
            if stats.pooling { "on" } else { "off" },
            stats.devices.len()
        ));
        page.wrapped("", &self.summary);

        page.section("Overall");
        page.line(&format!(
            "  Requests {}: hits {}, misses {}, bypasses {}, failed {}",
            thousands(totals.requests),
            thousands(totals.hits),
            thousands(totals.misses),
            thousands(totals.bypasses),
            thousands(totals.failed_requests)
        ));
        page.line(&format!(
            "  Hit rate {}, allocation reduction {}",
            percent(totals.hit_rate),
            percent(totals.allocation_reduction)
        ));
        page.line(&format!(
            "  Backend allocations {}, releases {}, blocks held {}",
            thousands(totals.backend_allocations),
            thousands(totals.backend_releases),
            thousands(totals.blocks_held)
        ));

        page.section("Memory");
        page.line(&format!(
            "  In use {}, cached {}, reserved {}, peak reserved {}",
            bytes(totals.in_use_bytes),
            bytes(totals.cached_bytes),
            bytes(totals.reserved_bytes),
            bytes(totals.peak_reserved_bytes)
        ));
        page.line(&format!(
            "  Requested live {}, internal fragmentation {}, idle fraction {}",
            bytes(totals.requested_live_bytes),
            percent(totals.internal_fragmentation),
            percent(totals.idle_fraction)
        ));
        page.line(&format!(
            "  Memory efficiency {}, memory pressure {}",
            percent(totals.memory_efficiency),
            percent(totals.memory_pressure)
        ));
        for device in &stats.devices {
            let known = |value: Option<u64>| value.map_or_else(|| "unknown".into(), bytes);
            page.wrapped(
                "  ",
                &format!("Device {}: {}", device.device, device.device_name),
            );
            page.line(&format!(
                "    capacity {}, free {}, budget {}, reserved {}",
                known(device.capacity_bytes),
                known(device.device_free_bytes),
                device.budget_bytes.map_or_else(|| "none".into(), bytes),
                bytes(device.totals.reserved_bytes)
            ));
        }

        breakdown(&mut page, stats);
        page.section("Latency");
        latency(&mut page, stats);
        analysis(&mut page, stats);
        page.out
    }
}

/// Seconds since the Unix epoch as an RFC 3339 UTC timestamp (proleptic Gregorian calendar;
/// Howard Hinnant's `civil_from_days`).
fn rfc3339(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let second_of_day = unix_seconds % 86_400;
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_764_073_989), "2025-11-25T12:33:09Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
    }
}
