//! The statistics dashboard: a [`PoolStats`] as text for a terminal, in the seed's sections.
//!
//! Sections, in order: header; Overall Statistics; Performance Metrics (docs/design.md's ratios and
//! the sampled latency per class); Pool Size Breakdown (one row per class: size, kind,
//! requests, hit rate, live and cached blocks, cached bytes, efficiency score); Efficiency
//! Analysis (star rating, health, recommendations); Memory Distribution (the ten classes with
//! the most cached bytes, as 50-character bars); footer. Every line fits [`WIDTH`] columns,
//! every figure comes from the snapshot, and an empty snapshot renders without NaN.
#![forbid(unsafe_code)]

use std::fmt::Write;

use super::format::{bytes, class_label, display_width, finite, nanos, percent, thousands, wrap};
use super::health::{Health, HealthAssessment};
use super::recommendations::{classes, recommendations};
use super::score::{class_efficiency, StarRating};
use super::style::{Paint, Style};
use crate::backend::MemoryKind;
use crate::latency::HIT_SAMPLE_PERIOD;
use crate::stats::{ratio, ClassStats, PoolStats};

/// The widest line a render produces, in columns.
pub const WIDTH: usize = 80;
/// Width of the rules between sections.
const RULE: usize = 78;
/// Length of a Memory Distribution bar.
pub const BAR_WIDTH: usize = 50;
/// Classes shown in Memory Distribution.
pub const DISTRIBUTION_ROWS: usize = 10;

/// A short name of a memory kind for the tables.
pub(crate) fn kind_short(kind: MemoryKind) -> &'static str {
    match kind {
        MemoryKind::Device => "device",
        MemoryKind::HostVisible => "host",
        MemoryKind::HostVisibleWriteCombined => "host-wc",
        MemoryKind::Managed => "managed",
    }
}

/// One letter per memory kind, for the distribution bars when kinds are mixed.
fn kind_tag(kind: MemoryKind) -> char {
    match kind {
        MemoryKind::Device => 'd',
        MemoryKind::HostVisible => 'h',
        MemoryKind::HostVisibleWriteCombined => 'w',
        MemoryKind::Managed => 'm',
    }
}

/// The request-weighted mean of the class efficiency scores; 0 without requests.
pub fn mean_efficiency(stats: &PoolStats) -> f64 {
    let (weighted, requests) = stats
        .devices
        .iter()
        .flat_map(|device| device.classes.iter())
        .fold((0.0, 0u64), |(sum, count), class| {
            (
                sum + class_efficiency(class) * class.requests as f64,
                count + class.requests,
            )
        });
    if requests == 0 {
        0.0
    } else {
        weighted / requests as f64
    }
}

pub(crate) struct Page {
    pub(crate) out: String,
    pub(crate) style: Style,
}

impl Page {
    pub(crate) fn line(&mut self, text: &str) {
        self.out.push_str(text);
        self.out.push('\n');
    }

    pub(crate) fn blank(&mut self) {
        self.out.push('\n');
    }

    pub(crate) fn section(&mut self, title: &str) {
        self.blank();
        let heading = self.style.paint(Paint::Heading, title);
        self.line(&heading);
        self.line(&"─".repeat(RULE));
    }

    /// Two label/value pairs on one line.
    fn pairs(&mut self, left: (&str, String), right: Option<(&str, String)>) {
        let mut text = format!("  {:<22}{:>10}", left.0, left.1);
        if let Some((label, value)) = right {
            let _ = write!(text, "    {label:<22}{value:>10}");
        }
        self.line(&text);
    }

    /// `text` wrapped after `first` (the bullet or label), continuation lines aligned under it.
    pub(crate) fn wrapped(&mut self, first: &str, text: &str) {
        let indent = " ".repeat(display_width(first));
        let body_width = WIDTH - 1 - display_width(first);
        for (index, line) in wrap(text, body_width, "").into_iter().enumerate() {
            let lead = if index == 0 { first } else { &indent };
            self.line(&format!("{lead}{line}"));
        }
    }
}

/// Truncates `text` to `width` columns, ending with `…` when cut.
fn fit(text: &str, width: usize) -> String {
    if display_width(text) <= width {
        return text.to_string();
    }
    let kept: String = text.chars().take(width.saturating_sub(1)).collect();
    format!("{kept}…")
}

/// Whether rows need the device index to be told apart.
fn several_devices(stats: &PoolStats) -> bool {
    stats.devices.len() > 1
}

fn row_label(stats: &PoolStats, device: usize, class: &ClassStats) -> String {
    if several_devices(stats) {
        format!("{}:{}", device, class_label(class.class_bytes))
    } else {
        class_label(class.class_bytes)
    }
}

fn header(page: &mut Page, stats: &PoolStats) {
    page.line(&"═".repeat(RULE));
    let title = format!("{:^width$}", "gpupool Memory Pool Dashboard", width = RULE);
    let title = page.style.paint(Paint::Heading, title.trim_end());
    page.line(&title);
    page.line(&"═".repeat(RULE));
    page.line(&format!(
        "  Backend: {}   Pooling: {}   Devices: {}",
        stats.backend,
        if stats.pooling { "on" } else { "off" },
        stats.devices.len()
    ));
    for device in &stats.devices {
        let capacity = device.capacity_bytes.map_or_else(
            || "capacity unknown".to_string(),
            |c| format!("capacity {}", bytes(c)),
        );
        let budget = device.budget_bytes.map_or_else(
            || "no budget".to_string(),
            |b| format!("budget {}", bytes(b)),
        );
        let tail = format!(", {capacity}, {budget}");
        let lead = format!("  Device {}: ", device.device);
        let room = (WIDTH - 1).saturating_sub(display_width(&lead) + display_width(&tail));
        page.line(&format!("{lead}{}{tail}", fit(&device.device_name, room)));
    }
}

fn overall(page: &mut Page, stats: &PoolStats) {
    let totals = &stats.totals;
    page.section("Overall Statistics");
    page.pairs(
        ("Requests", thousands(totals.requests)),
        Some(("Backend allocations", thousands(totals.backend_allocations))),
    );
    page.pairs(
        ("Hits", thousands(totals.hits)),
        Some(("Backend releases", thousands(totals.backend_releases))),
    );
    page.pairs(
        ("Misses", thousands(totals.misses)),
        Some(("Blocks held", thousands(totals.blocks_held))),
    );
    page.pairs(
        ("Bypasses", thousands(totals.bypasses)),
        Some(("Failed requests", thousands(totals.failed_requests))),
    );
    page.pairs(
        ("In use", bytes(totals.in_use_bytes)),
        Some(("Requested live", bytes(totals.requested_live_bytes))),
    );
    page.pairs(
        ("Cached", bytes(totals.cached_bytes)),
        Some(("Reserved", bytes(totals.reserved_bytes))),
    );
    page.pairs(("Peak reserved", bytes(totals.peak_reserved_bytes)), None);
}

fn performance(page: &mut Page, stats: &PoolStats) {
    let totals = &stats.totals;
    page.section("Performance Metrics");
    page.pairs(
        ("Hit rate", percent(totals.hit_rate)),
        Some(("Allocation reduction", percent(totals.allocation_reduction))),
    );
    page.pairs(
        (
            "Internal fragmentation",
            percent(totals.internal_fragmentation),
        ),
        Some(("Idle fraction", percent(totals.idle_fraction))),
    );
    page.pairs(
        ("Memory efficiency", percent(totals.memory_efficiency)),
        Some(("Memory pressure", percent(totals.memory_pressure))),
    );
    page.blank();
    latency(page, stats);
}

/// The sampled hit and miss latency of every class that has samples.
pub(crate) fn latency(page: &mut Page, stats: &PoolStats) {
    let sampled: Vec<_> = classes(stats)
        .filter(|(_, class)| class.hit_latency.samples + class.miss_latency.samples > 0)
        .collect();
    if sampled.is_empty() {
        page.line("  Latency: no request timed yet.");
        return;
    }
    page.line(&format!(
        "  Latency (hits sampled 1 in {HIT_SAMPLE_PERIOD}; a miss includes its backend allocation)"
    ));
    page.line(&format!(
        "  {:<9}  {:<7}  {:>9}  {:>9}  {:>9}  {:>9}",
        "Class", "Kind", "Hit p50", "Hit p99", "Miss p50", "Miss p99"
    ));
    for (device, class) in sampled {
        let hit = &class.hit_latency;
        let miss = &class.miss_latency;
        page.line(&format!(
            "  {:<9}  {:<7}  {:>9}  {:>9}  {:>9}  {:>9}",
            row_label(stats, device, class),
            kind_short(class.kind),
            nanos(hit.p50_ns, hit.samples),
            nanos(hit.p99_ns, hit.samples),
            nanos(miss.p50_ns, miss.samples),
            nanos(miss.p99_ns, miss.samples),
        ));
    }
}

pub(crate) fn breakdown(page: &mut Page, stats: &PoolStats) {
    page.section("Pool Size Breakdown");
    let bypass_requests: u64 = stats.devices.iter().map(|d| d.bypass.requests).sum();
    let large_requests: u64 = stats.devices.iter().map(|d| d.large.requests).sum();
    if classes(stats).next().is_none() && bypass_requests == 0 && large_requests == 0 {
        page.line("  No size class has seen a request yet.");
        return;
    }
    let row = |class: &str, kind: &str, requests: &str, hit: &str, cols: [&str; 4]| {
        format!(
            "  {class:<9}  {kind:<7}  {requests:>11}  {hit:>8}  {:>6}  {:>6}  {:>9}  {:>5}",
            cols[0], cols[1], cols[2], cols[3]
        )
    };
    page.line(&row(
        "Class",
        "Kind",
        "Requests",
        "Hit rate",
        ["Live", "Cached", "Bytes", "Score"],
    ));
    for (device, class) in classes(stats) {
        page.line(&row(
            &row_label(stats, device, class),
            kind_short(class.kind),
            &thousands(class.requests),
            &percent(class.hit_rate),
            [
                &thousands(class.in_use_blocks),
                &thousands(class.cached_blocks),
                &bytes(class.cached_bytes),
                &format!("{:.1}", class_efficiency(class)),
            ],
        ));
    }
    for device in &stats.devices {
        let large = &device.large;
        if large.requests == 0 && large.segments == 0 {
            continue;
        }
        // The large arena: live blocks, free bytes inside its segments.
        let label = if several_devices(stats) {
            format!("{}:large", device.device)
        } else {
            "large".to_string()
        };
        page.line(&row(
            &label,
            "-",
            &thousands(large.requests),
            &percent(ratio(large.hits, large.hits + large.misses)),
            [
                &thousands(large.in_use_blocks),
                "-",
                &bytes(large.free_bytes),
                "-",
            ],
        ));
    }
    for device in &stats.devices {
        if device.bypass.requests == 0 && device.bypass.in_use_blocks == 0 {
            continue;
        }
        let label = if several_devices(stats) {
            format!("{}:bypass", device.device)
        } else {
            "bypass".to_string()
        };
        page.line(&row(
            &label,
            "-",
            &thousands(device.bypass.requests),
            "-",
            [&thousands(device.bypass.in_use_blocks), "-", "-", "-"],
        ));
    }
    page.line("  Live, Cached: blocks in use, idle. Bytes: cached. Score: efficiency, 0-100.");
    if large_requests > 0 {
        page.line("  large: blocks split out of segments (requests above the class threshold).");
    }
}

pub(crate) fn analysis(page: &mut Page, stats: &PoolStats) {
    let totals = &stats.totals;
    page.section("Efficiency Analysis");
    let health = HealthAssessment::of(totals);
    if totals.requests == 0 {
        page.line("  Rating:  ☆☆☆☆☆ n/a (no requests yet)");
    } else {
        let rating = StarRating::from_reduction(totals.allocation_reduction);
        let stars = page.style.paint(Paint::Yellow, &rating.glyphs());
        page.line(&format!(
            "  Rating:  {stars} {} (allocation reduction {})",
            rating.label,
            percent(totals.allocation_reduction)
        ));
    }
    let paint = match health.status {
        Health::Healthy => Paint::Green,
        Health::Good | Health::Fair | Health::Idle => Paint::Yellow,
        Health::NeedsAttention => Paint::Red,
    };
    let status = page.style.paint(paint, health.status.label());
    page.wrapped("  Health:  ", &format!("{status}: {}", health.reason));
    if totals.requests > 0 {
        page.line(&format!(
            "  Score:   {:.1} of 100 (class efficiency, weighted by requests)",
            finite(mean_efficiency(stats))
        ));
    }
    page.line("  Recommendations:");
    let advice = recommendations(stats);
    if advice.is_empty() {
        let quiet = if totals.requests == 0 {
            "Nothing to recommend until requests are served."
        } else {
            "Pool is operating well: no change recommended."
        };
        page.wrapped("    • ", quiet);
    }
    for recommendation in advice {
        page.wrapped("    • ", &recommendation.to_string());
    }
}

fn distribution(page: &mut Page, stats: &PoolStats) {
    page.section(&format!(
        "Memory Distribution (cached bytes, top {DISTRIBUTION_ROWS} classes)"
    ));
    let mut rows: Vec<_> = classes(stats)
        .filter(|(_, class)| class.cached_bytes > 0)
        .collect();
    let total: u64 = rows.iter().map(|(_, class)| class.cached_bytes).sum();
    if total == 0 {
        page.line("  No idle block is cached.");
        return;
    }
    rows.sort_by_key(|(_, class)| std::cmp::Reverse(class.cached_bytes));
    let mixed_kinds = classes(stats)
        .map(|(_, class)| class.kind)
        .collect::<std::collections::HashSet<_>>()
        .len()
        > 1;
    let label = |device: usize, class: &ClassStats| {
        let mut label = row_label(stats, device, class);
        if mixed_kinds {
            label.push(' ');
            label.push(kind_tag(class.kind));
        }
        label
    };
    let shown: Vec<_> = rows.iter().take(DISTRIBUTION_ROWS).collect();
    let label_width = shown
        .iter()
        .map(|(device, class)| display_width(&label(*device, class)))
        .max()
        .unwrap_or(0)
        .max(5);
    for (device, class) in shown {
        let share = class.cached_bytes as f64 / total as f64;
        let filled = ((share * BAR_WIDTH as f64).round() as usize).min(BAR_WIDTH);
        let bar = "█".repeat(filled) + &"░".repeat(BAR_WIDTH - filled);
        let bar = page.style.paint(Paint::Green, &bar);
        page.line(&format!(
            "  {:<label_width$} {bar} {:>6} {:>8}",
            label(*device, class),
            percent(share),
            bytes(class.cached_bytes),
        ));
    }
    if rows.len() > DISTRIBUTION_ROWS {
        page.line(&format!(
            "  ... and {} more classes",
            rows.len() - DISTRIBUTION_ROWS
        ));
    }
    if mixed_kinds {
        page.line("  (d device, h host-visible, w host write-combined, m managed)");
    }
    page.line(&format!("  Total cached: {}", bytes(total)));
}

fn footer(page: &mut Page) {
    page.blank();
    page.line(&"═".repeat(RULE));
    page.line(&format!(
        "  gpupool {} · metrics as defined in docs/design.md",
        env!("CARGO_PKG_VERSION")
    ));
}

/// The full dashboard of `stats`.
///
/// ```
/// use gpupool::backend::sim::SimBackend;
/// use gpupool::dashboard::{self, Style};
/// use gpupool::MemoryManager;
///
/// let manager = MemoryManager::new(SimBackend::default());
/// for _ in 0..100 {
///     drop(manager.allocate_bytes(4096).unwrap());
/// }
/// let text = dashboard::render(&manager.stats(), Style::PLAIN);
/// assert!(text.contains("Pool is operating well"));
/// // Plain text has no colour sequences: every character is one column.
/// assert!(text.lines().all(|line| line.chars().count() <= dashboard::WIDTH));
/// ```
pub fn render(stats: &PoolStats, style: Style) -> String {
    let mut page = Page {
        out: String::new(),
        style,
    };
    header(&mut page, stats);
    overall(&mut page, stats);
    performance(&mut page, stats);
    breakdown(&mut page, stats);
    analysis(&mut page, stats);
    distribution(&mut page, stats);
    footer(&mut page);
    page.out
}
