//! Prometheus telemetry: the statistics as `gpupool_` counters and gauges, through the
//! Prometheus project's own Rust client (`prometheus-client`), in the OpenMetrics text format.
//! Built with the `prometheus` feature (off by default).
//!
//! The pool already counts everything exactly (see [`PoolStats`]), so nothing here counts
//! again: a [`prometheus_client::collector::Collector`] turns one consistent snapshot into
//! constant metrics at every scrape. [`PoolCollector`] snapshots a live [`MemoryManager`]
//! (one `stats()` per scrape, which locks every shard briefly — scrape every few seconds, not
//! in a loop); [`SnapshotCollector`] serves the latest snapshot an application publishes.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `gpupool_requests_total`, `_hits_total`, `_misses_total` | counter | device, class, kind |
//! | `gpupool_backend_allocations_total`, `_backend_releases_total` | counter | device, class, kind |
//! | `gpupool_releases_at_cap_total`, `_prewarmed_blocks_total` | counter | device, class, kind |
//! | `gpupool_in_use_blocks`, `gpupool_cached_blocks` | gauge | device, class, kind |
//! | `gpupool_in_use_bytes`, `_cached_bytes`, `_requested_live_bytes` | gauge | device, class, kind |
//! | `gpupool_hit_latency_seconds`, `gpupool_miss_latency_seconds` | gauge | device, class, kind, quantile (0.5, 0.99) |
//! | `gpupool_hit_latency_samples_total`, `gpupool_miss_latency_samples_total` | counter | device, class, kind |
//! | `gpupool_bypass_requests_total`, `_bypass_backend_allocations_total`, `_bypass_backend_releases_total` | counter | device |
//! | `gpupool_bypass_in_use_bytes` | gauge | device |
//! | `gpupool_failed_requests_total`, `gpupool_alloc_retries_total` | counter | device |
//! | `gpupool_reserved_bytes`, `gpupool_peak_reserved_bytes` | gauge | device |
//! | `gpupool_memory_pressure_ratio` | gauge | device |
//! | `gpupool_capacity_bytes`, `gpupool_device_free_bytes`, `gpupool_budget_bytes` | gauge (where known) | device |
//! | `gpupool_pooling_enabled` | gauge (0 or 1) | |
//! | `gpupool_backend_info` | info | backend |
//!
//! `class` is the class's block size in bytes, `kind` the memory kind's name, `device` the
//! device index. Ratios such as the hit rate are left to the query
//! (`sum(rate(gpupool_hits_total[5m])) / sum(rate(gpupool_requests_total[5m]))`), which the
//! counters make exact.
#![forbid(unsafe_code)]

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::front::memory_manager::MemoryManager;
use crate::stats::{ClassStats, LatencySummary, PoolStats};

/// The `prometheus-client` this module is built on: its `Collector`, `Registry` and encoder
/// types are the ones [`registry`], [`encode`] and [`encode_stats`] take, so a program that
/// serves them uses this re-export rather than a version of its own.
pub use prometheus_client;

/// The prefix of every metric name.
pub const PREFIX: &str = "gpupool";

/// The HTTP `Content-Type` of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

fn class_labels(device: usize, class: &ClassStats) -> Labels {
    vec![
        ("device", device.to_string()),
        ("class", class.class_bytes.to_string()),
        ("kind", class.kind.name().to_string()),
    ]
}

fn device_labels(device: usize) -> Labels {
    vec![("device", device.to_string())]
}

/// Writes one metric family, skipping families without a sample.
fn family<V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    metric_type: MetricType,
    samples: Vec<(Labels, V)>,
    encode: impl Fn(V, prometheus_client::encoding::MetricEncoder) -> fmt::Result,
) -> fmt::Result {
    if samples.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, unit.as_ref(), metric_type)?;
    for (labels, value) in samples {
        encode(value, metric.encode_family(&labels)?)?;
    }
    Ok(())
}

fn counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: Vec<(Labels, u64)>,
) -> fmt::Result {
    family(
        encoder,
        name,
        help,
        None,
        MetricType::Counter,
        samples,
        |value, metric| ConstCounter::new(value).encode(metric),
    )
}

fn gauges<V: prometheus_client::encoding::EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    samples: Vec<(Labels, V)>,
) -> fmt::Result {
    family(
        encoder,
        name,
        help,
        unit,
        MetricType::Gauge,
        samples,
        |value, metric| ConstGauge::new(value).encode(metric),
    )
}

/// Encodes one snapshot as metric families (names without the [`PREFIX`], which the registry
/// adds). This is what both collectors do at each scrape; use it to write a collector of your
/// own.
pub fn encode_stats(stats: &PoolStats, mut encoder: DescriptorEncoder) -> fmt::Result {
    let rows: Vec<(usize, &ClassStats)> = stats
        .devices
        .iter()
        .flat_map(|device| {
            device
                .classes
                .iter()
                .map(move |class| (device.device, class))
        })
        .collect();
    let per_class = |value: fn(&ClassStats) -> u64| -> Vec<(Labels, u64)> {
        rows.iter()
            .map(|(device, class)| (class_labels(*device, class), value(class)))
            .collect()
    };
    let encoder = &mut encoder;
    counters(
        encoder,
        "requests",
        "Allocate calls routed to a class.",
        per_class(|c| c.requests),
    )?;
    counters(
        encoder,
        "hits",
        "Requests served from a class cache.",
        per_class(|c| c.hits),
    )?;
    counters(
        encoder,
        "misses",
        "Requests that needed a backend allocation.",
        per_class(|c| c.misses),
    )?;
    counters(
        encoder,
        "backend_allocations",
        "Blocks allocated from the backend (misses and prewarming).",
        per_class(|c| c.backend_allocations),
    )?;
    counters(
        encoder,
        "backend_releases",
        "Blocks given back to the backend.",
        per_class(|c| c.backend_releases),
    )?;
    counters(
        encoder,
        "releases_at_cap",
        "Drops released because the class held its cap of idle blocks.",
        per_class(|c| c.releases_at_cap),
    )?;
    counters(
        encoder,
        "prewarmed_blocks",
        "Blocks allocated by prewarm.",
        per_class(|c| c.prewarmed_blocks),
    )?;
    gauges(
        encoder,
        "in_use_blocks",
        "Blocks owned by live buffers.",
        None,
        per_class(|c| c.in_use_blocks),
    )?;
    gauges(
        encoder,
        "cached_blocks",
        "Idle blocks in the cache.",
        None,
        per_class(|c| c.cached_blocks),
    )?;
    gauges(
        encoder,
        "in_use",
        "Block bytes of live buffers.",
        Some(Unit::Bytes),
        per_class(|c| c.in_use_bytes),
    )?;
    gauges(
        encoder,
        "cached",
        "Block bytes idle in the cache.",
        Some(Unit::Bytes),
        per_class(|c| c.cached_bytes),
    )?;
    gauges(
        encoder,
        "requested_live",
        "Bytes the owners of live buffers asked for.",
        Some(Unit::Bytes),
        per_class(|c| c.requested_live_bytes),
    )?;
    for (name, help, pick) in [
        (
            "hit_latency",
            "Sampled hit latency (one hit in 64 per thread), upper bucket edge.",
            (|c: &ClassStats| c.hit_latency) as fn(&ClassStats) -> LatencySummary,
        ),
        (
            "miss_latency",
            "Miss latency, backend allocation included, upper bucket edge.",
            |c: &ClassStats| c.miss_latency,
        ),
    ] {
        let mut quantiles = Vec::new();
        let mut samples = Vec::new();
        for (device, class) in &rows {
            let summary = pick(class);
            if summary.samples == 0 {
                continue;
            }
            for (quantile, nanos) in [("0.5", summary.p50_ns), ("0.99", summary.p99_ns)] {
                let mut labels = class_labels(*device, class);
                labels.push(("quantile", quantile.to_string()));
                quantiles.push((labels, nanos / 1e9));
            }
            samples.push((class_labels(*device, class), summary.samples));
        }
        gauges(encoder, name, help, Some(Unit::Seconds), quantiles)?;
        counters(
            encoder,
            &format!("{name}_samples"),
            "Requests timed for the latency quantiles.",
            samples,
        )?;
    }

    let per_device = |value: &dyn Fn(&crate::stats::DeviceStats) -> Option<u64>| {
        stats
            .devices
            .iter()
            .filter_map(|device| value(device).map(|v| (device_labels(device.device), v)))
            .collect::<Vec<_>>()
    };
    counters(
        encoder,
        "bypass_requests",
        "Requests outside the pooled range or made with pooling off.",
        per_device(&|d| Some(d.bypass.requests)),
    )?;
    counters(
        encoder,
        "bypass_backend_allocations",
        "Backend allocations made for bypassed requests.",
        per_device(&|d| Some(d.bypass.backend_allocations)),
    )?;
    counters(
        encoder,
        "bypass_backend_releases",
        "Bypass blocks released.",
        per_device(&|d| Some(d.bypass.backend_releases)),
    )?;
    gauges(
        encoder,
        "bypass_in_use",
        "Bytes of live bypass blocks.",
        Some(Unit::Bytes),
        per_device(&|d| Some(d.bypass.in_use_bytes)),
    )?;
    counters(
        encoder,
        "failed_requests",
        "Allocate calls that returned an error.",
        per_device(&|d| Some(d.totals.failed_requests)),
    )?;
    counters(
        encoder,
        "alloc_retries",
        "Allocations retried after releasing idle memory (out of memory or budget).",
        per_device(&|d| Some(d.totals.alloc_retries)),
    )?;
    gauges(
        encoder,
        "reserved",
        "Everything held from the backend: in use + cached.",
        Some(Unit::Bytes),
        per_device(&|d| Some(d.totals.reserved_bytes)),
    )?;
    gauges(
        encoder,
        "peak_reserved",
        "The most bytes ever reserved.",
        Some(Unit::Bytes),
        per_device(&|d| Some(d.totals.peak_reserved_bytes)),
    )?;
    gauges(
        encoder,
        "capacity",
        "Device memory, where the backend can tell.",
        Some(Unit::Bytes),
        per_device(&|d| d.capacity_bytes),
    )?;
    gauges(
        encoder,
        "device_free",
        "Free device memory, where the backend can tell.",
        Some(Unit::Bytes),
        per_device(&|d| d.device_free_bytes),
    )?;
    gauges(
        encoder,
        "budget",
        "The configured limit of reserved bytes.",
        Some(Unit::Bytes),
        per_device(&|d| d.budget_bytes),
    )?;
    gauges(
        encoder,
        "memory_pressure_ratio",
        "Reserved bytes over the budget, else over the device capacity.",
        None,
        stats
            .devices
            .iter()
            .map(|d| (device_labels(d.device), d.totals.memory_pressure))
            .collect(),
    )?;
    gauges(
        encoder,
        "pooling_enabled",
        "1 when pooling is on, 0 when requests go straight to the backend.",
        None,
        vec![(Vec::new(), u64::from(stats.pooling))],
    )?;
    let mut info = encoder.encode_descriptor(
        "backend",
        "The backend serving the pool.",
        None,
        MetricType::Info,
    )?;
    info.encode_info(&vec![("backend", stats.backend.clone())])
}

/// A collector that takes a fresh snapshot of a manager at every scrape.
#[derive(Debug)]
pub struct PoolCollector {
    manager: MemoryManager,
}

impl PoolCollector {
    /// A collector of `manager`'s statistics.
    pub fn new(manager: MemoryManager) -> PoolCollector {
        PoolCollector { manager }
    }
}

impl Collector for PoolCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        encode_stats(&self.manager.stats(), encoder)
    }
}

/// A collector that serves the latest snapshot published to it, for applications that take
/// snapshots anyway, or whose managers come and go. Clones share the snapshot.
#[derive(Clone, Debug, Default)]
pub struct SnapshotCollector {
    latest: Arc<Mutex<Option<PoolStats>>>,
}

impl SnapshotCollector {
    /// A collector with nothing published yet (it encodes no pool metric until then).
    pub fn new() -> SnapshotCollector {
        SnapshotCollector::default()
    }

    /// Replaces the snapshot served.
    pub fn publish(&self, stats: PoolStats) {
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner) = Some(stats);
    }
}

impl Collector for SnapshotCollector {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        match latest.as_ref() {
            Some(stats) => encode_stats(stats, encoder),
            None => Ok(()),
        }
    }
}

/// A registry with the [`PREFIX`] holding `collector`.
pub fn registry(collector: impl Collector) -> Registry {
    let mut registry = Registry::with_prefix(PREFIX);
    registry.register_collector(Box::new(collector));
    registry
}

/// The OpenMetrics text of everything in `registry`, ending with `# EOF`.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail, and the encoders above return only its errors.
    prometheus_client::encoding::text::encode(&mut text, registry)
        .expect("encoding into a String cannot fail");
    text
}

/// The OpenMetrics text of one snapshot.
///
/// ```
/// use gpupool::backend::sim::SimBackend;
/// use gpupool::MemoryManager;
///
/// let manager = MemoryManager::new(SimBackend::default());
/// drop(manager.allocate_bytes(4096).unwrap());
/// drop(manager.allocate_bytes(4096).unwrap());
/// let text = gpupool::telemetry::snapshot_text(&manager.stats());
/// assert!(text.contains(r#"gpupool_hits_total{device="0",class="4096",kind="device"} 1"#));
/// assert!(text.ends_with("# EOF\n"));
/// ```
pub fn snapshot_text(stats: &PoolStats) -> String {
    let collector = SnapshotCollector::new();
    collector.publish(stats.clone());
    encode(&registry(collector))
}
