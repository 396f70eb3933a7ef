//! Dashboard, summary, report and telemetry: expected output for a healthy, a thrashing and an
//! empty pool, a test per recommendation trigger and for the quiet case, and width and NaN
//! checks on every render. The JSON report's tests need the `json` feature and the telemetry's
//! the `prometheus` feature (both on in `cargo test --workspace`, where the CLI enables them).
//!
//! Left out under Miri (`devscripts/miri.sh`): the module renders text from snapshots, in code
//! that forbids `unsafe`, and takes longer interpreted (about ten minutes) than every other
//! module together; the pool operations it drives to make its snapshots are `core`'s.
#![cfg(not(miri))]

use std::time::{Duration, UNIX_EPOCH};

use gpupool::backend::sim::SimConfig;
use gpupool::dashboard::{self, Health, HealthAssessment, PoolReport, Recommendation, Style};
use gpupool::{LatencySummary, PoolStats};

use crate::common::{defaults, sim_manager, sim_manager_on};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// Replaces the sampled latencies (which depend on the machine) with fixed figures, so a
/// render can be compared with its expected text.
fn fixed_latency(mut stats: PoolStats) -> PoolStats {
    for device in &mut stats.devices {
        for class in &mut device.classes {
            class.hit_latency = if class.hits == 0 {
                LatencySummary::default()
            } else {
                LatencySummary {
                    samples: class.hits.div_ceil(64),
                    p50_ns: 40.0,
                    p99_ns: 96.0,
                }
            };
            class.miss_latency = LatencySummary {
                samples: class.misses,
                p50_ns: 3072.0,
                p99_ns: 12288.0,
            };
        }
    }
    stats
}

/// 1,000 reuses of 4 KiB, 500 of 64 KiB, two buffers still live.
fn healthy() -> PoolStats {
    let (manager, _sim) = sim_manager(defaults());
    for _ in 0..1000 {
        drop(manager.allocate_bytes(4 * KIB).unwrap());
    }
    for _ in 0..500 {
        drop(manager.allocate_bytes(60 * KIB).unwrap());
    }
    let _live = (
        manager.allocate_bytes(3000).unwrap(),
        manager.allocate_bytes(64 * KIB).unwrap(),
    );
    fixed_latency(manager.stats())
}

/// Sixteen 4 KiB buffers live at once, one hundred times, with a cap of two idle blocks.
fn thrashing() -> PoolStats {
    let (manager, _sim) = sim_manager(defaults().max_idle_per_class(2).min_idle_per_class(1));
    for _ in 0..100 {
        let held: Vec<_> = (0..16)
            .map(|_| manager.allocate_bytes(4 * KIB).unwrap())
            .collect();
        drop(held);
    }
    fixed_latency(manager.stats())
}

fn empty() -> PoolStats {
    let (manager, _sim) = sim_manager(defaults());
    manager.stats()
}

/// Terminal columns of `line`: characters, not counting ANSI colour sequences (`ESC [ ... m`).
fn display_width(line: &str) -> usize {
    let mut width = 0;
    let mut chars = line.chars();
    while let Some(character) = chars.next() {
        if character == '\u{1b}' {
            for inner in chars.by_ref() {
                if inner.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            width += 1;
        }
    }
    width
}

#[test]
fn display_width_skips_colour_sequences() {
    assert_eq!(display_width("\u{1b}[1;32mok\u{1b}[0m"), 2);
    assert_eq!(display_width("══ µs"), 5);
}

fn assert_renders_cleanly(stats: &PoolStats) {
    let report = PoolReport::new(stats.clone(), UNIX_EPOCH);
    #[cfg_attr(not(feature = "json"), allow(unused_mut))]
    let mut texts = vec![
        dashboard::render(stats, Style::PLAIN),
        dashboard::render(stats, Style::COLOR),
        report.to_text(),
        dashboard::summary(stats),
    ];
    #[cfg(feature = "json")]
    texts.push(report.to_json());
    for text in texts {
        assert!(!text.contains("NaN"), "NaN in:\n{text}");
        assert!(!text.contains("inf"), "infinity in:\n{text}");
    }
    for text in [
        dashboard::render(stats, Style::PLAIN),
        dashboard::render(stats, Style::COLOR),
        report.to_text(),
    ] {
        for line in text.lines() {
            assert!(
                display_width(line) <= 80,
                "{} columns: {line}",
                display_width(line)
            );
        }
    }
}

fn footer() -> String {
    format!(
        "══════════════════════════════════════════════════════════════════════════════\n  \
         gpupool {} · metrics as defined in docs/design.md\n",
        env!("CARGO_PKG_VERSION")
    )
}

const HEALTHY_DASHBOARD: &str = "\
══════════════════════════════════════════════════════════════════════════════
                        gpupool Memory Pool Dashboard
══════════════════════════════════════════════════════════════════════════════
  Backend: sim   Pooling: on   Devices: 1
  Device 0: simulated device (80 GiB), capacity 80.0 GiB, no budget

Overall Statistics
──────────────────────────────────────────────────────────────────────────────
  Requests                   1,502    Backend allocations            2
  Hits                       1,500    Backend releases               0
  Misses                         2    Blocks held                    2
  Bypasses                       0    Failed requests                0
  In use                  68.0 KiB    Requested live          66.9 KiB
  Cached                       0 B    Reserved                68.0 KiB
  Peak reserved           68.0 KiB

Performance Metrics
──────────────────────────────────────────────────────────────────────────────
  Hit rate                   99.9%    Allocation reduction       99.9%
  Internal fragmentation      1.6%    Idle fraction               0.0%
  Memory efficiency          98.4%    Memory pressure             0.0%

  Latency (hits sampled 1 in 64; a miss includes its backend allocation)
  Class      Kind       Hit p50    Hit p99   Miss p50   Miss p99
  4 KiB      device       40 ns      96 ns     3.1 µs    12.3 µs
  64 KiB     device       40 ns      96 ns     3.1 µs    12.3 µs

Pool Size Breakdown
──────────────────────────────────────────────────────────────────────────────
  Class      Kind        Requests  Hit rate    Live  Cached      Bytes  Score
  4 KiB      device         1,001     99.9%       1       0        0 B   73.2
  64 KiB     device           501     99.8%       1       0        0 B   99.8
  Live, Cached: blocks in use, idle. Bytes: cached. Score: efficiency, 0-100.

Efficiency Analysis
──────────────────────────────────────────────────────────────────────────────
  Rating:  ★★★★★ Excellent (allocation reduction 99.9%)
  Health:  Healthy: hit rate 99.9%, allocation reduction 99.9%
  Score:   82.1 of 100 (class efficiency, weighted by requests)
  Recommendations:
    • Pool is operating well: no change recommended.

Memory Distribution (cached bytes, top 10 classes)
──────────────────────────────────────────────────────────────────────────────
  No idle block is cached.

";

const THRASHING_DASHBOARD: &str = "\
══════════════════════════════════════════════════════════════════════════════
                        gpupool Memory Pool Dashboard
══════════════════════════════════════════════════════════════════════════════
  Backend: sim   Pooling: on   Devices: 1
  Device 0: simulated device (80 GiB), capacity 80.0 GiB, no budget

Overall Statistics
──────────────────────────────────────────────────────────────────────────────
  Requests                   1,600    Backend allocations        1,402
  Hits                         198    Backend releases           1,400
  Misses                     1,402    Blocks held                    2
  Bypasses                       0    Failed requests                0
  In use                       0 B    Requested live               0 B
  Cached                  8.00 KiB    Reserved                8.00 KiB
  Peak reserved           64.0 KiB

Performance Metrics
──────────────────────────────────────────────────────────────────────────────
  Hit rate                   12.4%    Allocation reduction       12.4%
  Internal fragmentation      0.0%    Idle fraction             100.0%
  Memory efficiency           0.0%    Memory pressure             0.0%

  Latency (hits sampled 1 in 64; a miss includes its backend allocation)
  Class      Kind       Hit p50    Hit p99   Miss p50   Miss p99
  4 KiB      device       40 ns      96 ns     3.1 µs    12.3 µs

Pool Size Breakdown
──────────────────────────────────────────────────────────────────────────────
  Class      Kind        Requests  Hit rate    Live  Cached      Bytes  Score
  4 KiB      device         1,600     12.4%       0       2   8.00 KiB   12.4
  Live, Cached: blocks in use, idle. Bytes: cached. Score: efficiency, 0-100.

Efficiency Analysis
──────────────────────────────────────────────────────────────────────────────
  Rating:  ★☆☆☆☆ Poor (allocation reduction 12.4%)
  Health:  Needs Attention: hit rate 12.4%, allocation reduction 12.4%
  Score:   12.4 of 100 (class efficiency, weighted by requests)
  Recommendations:
    • Raise the cap of class 4 KiB (max_idle_per_class): 1,400 releases at cap
      in 1,600 requests.

Memory Distribution (cached bytes, top 10 classes)
──────────────────────────────────────────────────────────────────────────────
  4 KiB ██████████████████████████████████████████████████ 100.0% 8.00 KiB
  Total cached: 8.00 KiB

";

const EMPTY_DASHBOARD: &str = "\
══════════════════════════════════════════════════════════════════════════════
                        gpupool Memory Pool Dashboard
══════════════════════════════════════════════════════════════════════════════
  Backend: sim   Pooling: on   Devices: 1
  Device 0: simulated device (80 GiB), capacity 80.0 GiB, no budget

Overall Statistics
──────────────────────────────────────────────────────────────────────────────
  Requests                       0    Backend allocations            0
  Hits                           0    Backend releases               0
  Misses                         0    Blocks held                    0
  Bypasses                       0    Failed requests                0
  In use                       0 B    Requested live               0 B
  Cached                       0 B    Reserved                     0 B
  Peak reserved                0 B

Performance Metrics
──────────────────────────────────────────────────────────────────────────────
  Hit rate                    0.0%    Allocation reduction        0.0%
  Internal fragmentation      0.0%    Idle fraction               0.0%
  Memory efficiency           0.0%    Memory pressure             0.0%

  Latency: no request timed yet.

Pool Size Breakdown
──────────────────────────────────────────────────────────────────────────────
  No size class has seen a request yet.

Efficiency Analysis
──────────────────────────────────────────────────────────────────────────────
  Rating:  ☆☆☆☆☆ n/a (no requests yet)
  Health:  Idle: no request served yet
  Recommendations:
    • Nothing to recommend until requests are served.

Memory Distribution (cached bytes, top 10 classes)
──────────────────────────────────────────────────────────────────────────────
  No idle block is cached.

";

#[test]
fn dashboard_of_a_healthy_pool() {
    let stats = healthy();
    assert_eq!(
        dashboard::render(&stats, Style::PLAIN),
        HEALTHY_DASHBOARD.to_string() + &footer()
    );
    assert_eq!(
        dashboard::summary(&stats),
        "Pool Stats: 1,502 allocs, 99.9% hit rate, 99.9% reduction, Peak: 68.0 KiB, \
         Health: Healthy"
    );
    assert_renders_cleanly(&stats);
}

#[test]
fn dashboard_of_a_thrashing_pool() {
    let stats = thrashing();
    assert_eq!(
        dashboard::render(&stats, Style::PLAIN),
        THRASHING_DASHBOARD.to_string() + &footer()
    );
    assert_eq!(
        dashboard::summary(&stats),
        "Pool Stats: 1,600 allocs, 12.4% hit rate, 12.4% reduction, Peak: 64.0 KiB, \
         Health: Needs Attention"
    );
    assert_renders_cleanly(&stats);
}

#[test]
fn dashboard_of_an_empty_pool() {
    let stats = empty();
    assert_eq!(
        dashboard::render(&stats, Style::PLAIN),
        EMPTY_DASHBOARD.to_string() + &footer()
    );
    assert_eq!(
        dashboard::summary(&stats),
        "Pool Stats: 0 allocs, 0.0% hit rate, 0.0% reduction, Peak: 0 B, Health: Idle"
    );
    assert_renders_cleanly(&stats);
}

#[test]
fn colour_only_paints_and_keeps_the_width() {
    let stats = thrashing();
    let plain = dashboard::render(&stats, Style::PLAIN);
    let colored = dashboard::render(&stats, Style::COLOR);
    assert!(!plain.contains('\u{1b}'));
    assert!(colored.contains("\u{1b}[1;31mNeeds Attention\u{1b}[0m"));
    let widths = |text: &str| text.lines().map(display_width).collect::<Vec<_>>();
    assert_eq!(widths(&plain), widths(&colored));
}

#[test]
fn the_pool_report_is_dated() {
    let stats = healthy();
    let report = PoolReport::new(
        stats.clone(),
        UNIX_EPOCH + Duration::from_secs(1_764_073_989),
    );
    let text = report.to_text();
    assert!(text.starts_with("gpupool Pool Report\nGenerated: 2025-11-25T12:33:09Z\n"));
    for section in [
        "Overall",
        "Memory",
        "Pool Size Breakdown",
        "Latency",
        "Efficiency Analysis",
    ] {
        assert!(
            text.contains(&format!("\n{section}\n")),
            "no {section} in\n{text}"
        );
    }
    assert!(text.contains("  64 KiB     device           501     99.8%"));
    assert!(PoolReport::new(empty(), UNIX_EPOCH).rating.is_none());
}

#[cfg(feature = "json")]
#[test]
fn the_pool_report_serialises_to_json() {
    let stats = healthy();
    let report = PoolReport::new(
        stats.clone(),
        UNIX_EPOCH + Duration::from_secs(1_764_073_989),
    );
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["schema_version"], PoolReport::SCHEMA_VERSION);
    assert_eq!(json["generated_at"], "2025-11-25T12:33:09Z");
    assert_eq!(json["generated_at_unix_s"], 1_764_073_989);
    assert_eq!(json["health"]["status"], "Healthy");
    assert_eq!(json["rating"]["stars"], 5);
    assert_eq!(json["recommendations"].as_array().unwrap().len(), 0);
    assert_eq!(json["class_scores"].as_array().unwrap().len(), 2);
    assert_eq!(json["stats"]["totals"]["hits"], stats.totals.hits);
    let round_trip: PoolStats = serde_json::from_value(json["stats"].clone()).unwrap();
    assert_eq!(round_trip, stats);

    let thrash = PoolReport::new(thrashing(), UNIX_EPOCH);
    let json: serde_json::Value = serde_json::from_str(&thrash.to_json()).unwrap();
    assert_eq!(json["recommendations"][0]["action"], "raise_cap");
    assert_eq!(json["recommendations"][0]["releases_at_cap"], 1400);
    assert!(json["recommendations"][0]["message"]
        .as_str()
        .unwrap()
        .starts_with("Raise the cap of class 4 KiB"));
}

// ---- recommendations: one test per trigger, and the quiet case ----

fn advice_of(stats: &PoolStats) -> Vec<Recommendation> {
    assert_renders_cleanly(stats);
    dashboard::recommendations(stats)
}

#[test]
fn quiet_pool_is_operating_well() {
    let stats = healthy();
    assert!(advice_of(&stats).is_empty());
    assert_eq!(HealthAssessment::of(&stats.totals).status, Health::Healthy);
    assert!(dashboard::render(&stats, Style::PLAIN).contains("Pool is operating well"));
}

#[test]
fn failed_allocations_recommend_a_larger_budget() {
    let (manager, _sim) = sim_manager(defaults().budget_bytes(Some(8 * KIB as u64)));
    let _held = (
        manager.allocate_bytes(4 * KIB).unwrap(),
        manager.allocate_bytes(4 * KIB).unwrap(),
    );
    assert!(manager.allocate_bytes(4 * KIB).is_err());
    let stats = manager.stats();
    let advice = advice_of(&stats);
    assert!(
        matches!(advice[0], Recommendation::FailedRequests { failed: 1, pressure } if pressure == 1.0),
        "{advice:?}"
    );
    let health = HealthAssessment::of(&stats.totals);
    assert_eq!(health.status, Health::NeedsAttention, "{}", health.reason);
}

#[test]
fn pooling_off_recommends_turning_it_on() {
    let (manager, _sim) = sim_manager(defaults().pooling(false));
    for _ in 0..10 {
        drop(manager.allocate_bytes(4 * KIB).unwrap());
    }
    let advice = advice_of(&manager.stats());
    assert_eq!(advice, [Recommendation::EnablePooling { requests: 10 }]);
    assert_eq!(
        advice[0].to_string(),
        "Turn pooling on: all 10 requests went to the backend."
    );
}

#[test]
fn idle_memory_under_pressure_recommends_a_trim() {
    let (manager, _sim) = sim_manager(defaults().budget_bytes(Some(640 * KIB as u64)));
    let held: Vec<_> = (0..32)
        .map(|_| manager.allocate_bytes(16 * KIB).unwrap())
        .collect();
    drop(held);
    for _ in 0..1000 {
        drop(manager.allocate_bytes(16 * KIB).unwrap());
    }
    let stats = manager.stats();
    let advice = advice_of(&stats);
    assert_eq!(
        advice,
        [Recommendation::Trim {
            idle_fraction: 1.0,
            pressure: 0.8,
            cached_bytes: 512 * KIB as u64,
        }]
    );
    assert_eq!(
        advice[0].to_string(),
        "Trim idle blocks (trim(TrimLevel::Normal)): idle fraction 100.0% (512 KiB) under \
         memory pressure 80.0%."
    );
    assert_eq!(HealthAssessment::of(&stats.totals).status, Health::Good);
    manager.trim(gpupool::TrimLevel::Normal);
    assert!(advice_of(&manager.stats()).is_empty());
}

#[test]
fn releases_at_cap_recommend_a_higher_cap_not_a_prewarm() {
    let advice = advice_of(&thrashing());
    assert_eq!(advice.len(), 1, "{advice:?}");
    let Recommendation::RaiseCap {
        class,
        releases_at_cap,
        requests,
        more_classes,
    } = &advice[0]
    else {
        panic!("{advice:?}")
    };
    assert_eq!(class.class_bytes, 4096);
    assert_eq!(
        (*releases_at_cap, *requests, *more_classes),
        (1400, 1600, 0)
    );
}

#[test]
fn cold_misses_recommend_prewarming_the_class() {
    let (manager, _sim) = sim_manager(defaults());
    for _ in 0..2 {
        let held: Vec<_> = (0..20)
            .map(|_| manager.allocate_bytes(8 * KIB).unwrap())
            .collect();
        drop(held);
    }
    let advice = advice_of(&manager.stats());
    assert_eq!(advice.len(), 1, "{advice:?}");
    assert!(matches!(
        &advice[0],
        Recommendation::Prewarm { class, misses: 20, hit_rate, more_classes: 0 }
            if class.class_bytes == 8192 && *hit_rate == 0.5
    ));
    assert_eq!(
        advice[0].to_string(),
        "Prewarm class 8 KiB (prewarm(8192, 20)): 20 misses, hit rate 50.0%."
    );
}

#[test]
fn per_class_advice_names_three_classes_and_counts_the_rest() {
    let (manager, _sim) = sim_manager(defaults());
    for _ in 0..2 {
        let held: Vec<_> = (0..5)
            .flat_map(|shift| (0..20).map(move |_| 1024usize << shift))
            .map(|bytes| manager.allocate_bytes(bytes).unwrap())
            .collect();
        drop(held);
    }
    let advice = advice_of(&manager.stats());
    let prewarms: Vec<_> = advice
        .iter()
        .filter_map(|advice| match advice {
            Recommendation::Prewarm { more_classes, .. } => Some(*more_classes),
            _ => None,
        })
        .collect();
    assert_eq!(prewarms, [0, 0, 2]);
    assert!(advice[2].to_string().ends_with("(and 2 more classes)."));
}

#[test]
fn bypasses_recommend_a_larger_largest_class() {
    let (manager, _sim) = sim_manager(defaults().max_class_bytes(64 * KIB));
    for _ in 0..10 {
        drop(manager.allocate_bytes(MIB).unwrap());
        drop(manager.allocate_bytes(KIB).unwrap());
    }
    let advice = advice_of(&manager.stats());
    assert_eq!(
        advice,
        [Recommendation::RaiseMaxClass {
            bypasses: 10,
            requests: 20,
            largest_class_bytes: Some(1024),
        }]
    );
    assert_eq!(
        advice[0].to_string(),
        "Raise max_class_bytes: 10 of 20 requests (50.0%) bypassed the classes (largest \
         class used: 1 KiB)."
    );
}

#[test]
fn rounding_waste_recommends_finer_classes() {
    let (manager, _sim) = sim_manager(defaults().large_threshold_bytes(None));
    let _held: Vec<_> = (0..3)
        .map(|_| manager.allocate_bytes(2 * MIB + 1).unwrap())
        .collect();
    let advice = advice_of(&manager.stats());
    assert_eq!(advice.len(), 1, "{advice:?}");
    let Recommendation::FinerClasses {
        internal_fragmentation,
        wasted_bytes,
        worst_class,
    } = &advice[0]
    else {
        panic!("{advice:?}")
    };
    assert_eq!(*wasted_bytes, 3 * (2 * MIB as u64 - 1));
    assert!((internal_fragmentation - 0.5).abs() < 1e-6);
    assert_eq!(worst_class.unwrap().class_bytes, 4 * MIB as u64);

    // The same buffers with four steps per doubling waste under a fifth: no advice.
    let (finer, _sim) = sim_manager(defaults().steps_per_doubling(4));
    let _held: Vec<_> = (0..3)
        .map(|_| finer.allocate_bytes(2 * MIB + 1).unwrap())
        .collect();
    assert!(advice_of(&finer.stats()).is_empty());
}

#[test]
fn unused_prewarm_recommends_prewarming_less() {
    let (manager, _sim) = sim_manager(defaults());
    assert_eq!(manager.prewarm(64 * KIB, 4).unwrap(), 4);
    for _ in 0..100 {
        drop(manager.allocate_bytes(KIB).unwrap());
    }
    let advice = advice_of(&manager.stats());
    assert_eq!(advice.len(), 1, "{advice:?}");
    assert_eq!(
        advice[0].to_string(),
        "Prewarm less of class 64 KiB: its 4 prewarmed blocks (256 KiB) served no request."
    );
}

#[test]
fn memory_pressure_caps_the_health_of_a_well_reusing_pool() {
    let sim = SimConfig {
        capacity_bytes: 1 << 20,
        ..SimConfig::default()
    };
    let (manager, _sim) = sim_manager_on(sim, defaults());
    let _held: Vec<_> = (0..31)
        .map(|_| manager.allocate_bytes(32 * KIB).unwrap())
        .collect();
    for _ in 0..1000 {
        drop(manager.allocate_bytes(KIB).unwrap());
    }
    let stats = manager.stats();
    assert!(stats.totals.hit_rate > 0.95);
    assert!(stats.totals.memory_pressure >= 0.95);
    let health = HealthAssessment::of(&stats.totals);
    assert_eq!(health.status, Health::NeedsAttention);
    assert!(
        health.reason.starts_with("memory pressure 97.0%"),
        "{}",
        health.reason
    );
    assert_renders_cleanly(&stats);
}

// ---- telemetry ----

#[cfg(feature = "prometheus")]
mod telemetry {
    use std::collections::HashMap;

    use super::*;

    /// Parses OpenMetrics text, checking its structure; returns samples by name and labels.
    fn parse_exposition(text: &str) -> HashMap<String, f64> {
        assert!(text.ends_with("# EOF\n"), "no EOF marker");
        let mut declared = HashMap::new();
        let mut samples = HashMap::new();
        for line in text.lines() {
            if line == "# EOF" {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(name.starts_with("gpupool_"), "{line}");
                assert!(["counter", "gauge", "info"].contains(&kind), "{line}");
                assert!(declared
                    .insert(name.to_string(), kind.to_string())
                    .is_none());
                continue;
            }
            if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let name = series.split('{').next().unwrap();
            let family = declared
                .keys()
                .find(|family| {
                    name == family.as_str()
                        || name
                            .strip_prefix(family.as_str())
                            .is_some_and(|suffix| ["_total", "_info"].contains(&suffix))
                })
                .unwrap_or_else(|| panic!("sample without a TYPE: {line}"));
            if declared[family] == "counter" {
                assert!(name.ends_with("_total"), "{line}");
            }
            assert!(
                samples.insert(series.to_string(), value).is_none(),
                "duplicate: {line}"
            );
        }
        samples
    }

    fn sum_of(samples: &HashMap<String, f64>, name: &str) -> f64 {
        samples
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(_, value)| value)
            .sum()
    }

    #[test]
    fn telemetry_exposes_the_snapshot_as_gpupool_metrics() {
        let stats = thrashing();
        let text = gpupool::telemetry::snapshot_text(&stats);
        let samples = parse_exposition(&text);
        assert_eq!(
            sum_of(&samples, "gpupool_hits_total"),
            stats.totals.hits as f64
        );
        assert_eq!(
            sum_of(&samples, "gpupool_misses_total"),
            stats.totals.misses as f64
        );
        assert_eq!(
            samples[r#"gpupool_releases_at_cap_total{device="0",class="4096",kind="device"}"#],
            1400.0
        );
        assert_eq!(
            samples[r#"gpupool_cached_bytes{device="0",class="4096",kind="device"}"#],
            8192.0
        );
        assert_eq!(
            samples[r#"gpupool_miss_latency_seconds{device="0",class="4096",kind="device",quantile="0.99"}"#],
            12288e-9
        );
        assert_eq!(
            samples[r#"gpupool_peak_reserved_bytes{device="0"}"#],
            65536.0
        );
        assert_eq!(samples["gpupool_pooling_enabled"], 1.0);
        assert_eq!(samples[r#"gpupool_backend_info{backend="sim"}"#], 1.0);

        let empty = parse_exposition(&gpupool::telemetry::snapshot_text(&empty()));
        assert_eq!(sum_of(&empty, "gpupool_hits_total"), 0.0);
        assert_eq!(empty[r#"gpupool_failed_requests_total{device="0"}"#], 0.0);
    }

    #[test]
    fn the_pool_collector_snapshots_the_manager_at_each_scrape() {
        let (manager, _sim) = sim_manager(defaults());
        let registry =
            gpupool::telemetry::registry(gpupool::telemetry::PoolCollector::new(manager.clone()));
        drop(manager.allocate_bytes(KIB).unwrap());
        let first = parse_exposition(&gpupool::telemetry::encode(&registry));
        drop(manager.allocate_bytes(KIB).unwrap());
        let second = parse_exposition(&gpupool::telemetry::encode(&registry));
        assert_eq!(sum_of(&first, "gpupool_hits_total"), 0.0);
        assert_eq!(sum_of(&second, "gpupool_hits_total"), 1.0);
        assert_eq!(sum_of(&second, "gpupool_requests_total"), 2.0);
    }
}

#[test]
fn several_devices_and_kinds_render_within_the_width() {
    use gpupool::backend::sim::SimBackend;
    use gpupool::{AllocOptions, Backend, MemoryKind, PoolConfig};
    use std::sync::Arc;

    let backends: Vec<Arc<dyn Backend>> = vec![
        Arc::new(SimBackend::default()),
        Arc::new(SimBackend::default()),
    ];
    let config = PoolConfig::builder()
        .maintenance_interval(Duration::ZERO)
        .steps_per_doubling(4)
        .large_threshold_bytes(None)
        .build()
        .unwrap();
    let manager = gpupool::MemoryManager::with_devices(backends, config).unwrap();
    for device in 0..2 {
        for kind in [MemoryKind::Device, MemoryKind::HostVisible] {
            let options = AllocOptions {
                device,
                kind: Some(kind),
                ..AllocOptions::default()
            };
            for bytes in [1500usize, 5 * MIB, 300 * MIB] {
                drop(manager.allocate_with::<u8>(bytes, options).unwrap());
                drop(manager.allocate_with::<u8>(bytes, options).unwrap());
            }
        }
    }
    let stats = manager.stats();
    assert_renders_cleanly(&stats);
    let text = dashboard::render(&stats, Style::PLAIN);
    assert!(text.contains("  1:5 MiB    host"), "{text}");
    assert!(text.contains("  1:bypass"), "{text}");
    assert!(text.contains("(d device, h host-visible"), "{text}");
}
