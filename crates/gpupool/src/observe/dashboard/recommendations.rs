//! What to change, derived from a snapshot: each recommendation fires only when its condition
//! holds, and names the class and the action with the figures behind it.
//!
//! | recommendation | fires when |
//! |---|---|
//! | [`Recommendation::FailedRequests`] | any allocation failed |
//! | [`Recommendation::EnablePooling`] | pooling is off and requests were served |
//! | [`Recommendation::Trim`] | pressure ≥ [`TRIM_PRESSURE`] and idle fraction ≥ [`TRIM_IDLE_FRACTION`] |
//! | [`Recommendation::RaiseCap`] | a class released ≥ [`MIN_EVENTS`] blocks at its cap, ≥ [`CAP_RELEASE_SHARE`] of its requests |
//! | [`Recommendation::Prewarm`] | a class with ≥ [`MIN_CLASS_REQUESTS`] requests has a hit rate under [`PREWARM_HIT_RATE`], ≥ [`MIN_EVENTS`] misses, and the cap rule does not fire for it |
//! | [`Recommendation::RaiseMaxClass`] | pooling is on and ≥ [`MIN_EVENTS`] requests, ≥ [`BYPASS_SHARE`] of all, bypassed the classes |
//! | [`Recommendation::FinerClasses`] | internal fragmentation ≥ [`FRAGMENTATION_LIMIT`] and the waste is ≥ [`MIN_WASTE_BYTES`] |
//! | [`Recommendation::UnusedPrewarm`] | a class holds prewarmed blocks and never served a request |
//!
//! A class that releases at its cap misses because of the cap, so it is told to raise the cap
//! and never also to prewarm (a prewarmed block would be released at the cap all the same). Per-class advice lists the [`MAX_CLASSES_PER_ADVICE`] classes
//! where it matters most (most misses, most releases) and counts the rest. With nothing to
//! change the list is empty, and the dashboard says the pool is operating well.
#![forbid(unsafe_code)]

use std::fmt;

use serde::Serialize;

use super::format::{bytes, class_label, percent, thousands};
use crate::backend::MemoryKind;
use crate::stats::{ClassStats, PoolStats};

/// Fewest events (misses, releases, bypasses) worth a recommendation.
pub const MIN_EVENTS: u64 = 8;
/// Fewest requests a class needs before its hit rate is judged.
pub const MIN_CLASS_REQUESTS: u64 = 32;
/// Hit rate under which a class without cap releases is told to prewarm.
pub const PREWARM_HIT_RATE: f64 = 0.9;
/// Share of a class's requests released at the cap from which the cap is too low.
pub const CAP_RELEASE_SHARE: f64 = 0.05;
/// Memory pressure from which idle blocks are worth trimming.
pub const TRIM_PRESSURE: f64 = 0.7;
/// Idle fraction from which a trim is worth it under pressure.
pub const TRIM_IDLE_FRACTION: f64 = 0.25;
/// Share of requests bypassing the classes from which the largest class is too small.
pub const BYPASS_SHARE: f64 = 0.1;
/// Internal fragmentation from which finer size classes are worth it.
pub const FRAGMENTATION_LIMIT: f64 = 0.25;
/// Rounding waste (bytes) under which fragmentation is not worth acting on.
pub const MIN_WASTE_BYTES: u64 = 1 << 20;
/// Classes named by one per-class recommendation; the rest are counted.
pub const MAX_CLASSES_PER_ADVICE: usize = 3;

/// One class named by a recommendation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ClassRef {
    /// The device index.
    pub device: usize,
    /// The class's block size.
    pub class_bytes: u64,
    /// The memory kind.
    pub kind: MemoryKind,
}

impl ClassRef {
    fn of(device: usize, class: &ClassStats) -> ClassRef {
        ClassRef {
            device,
            class_bytes: class.class_bytes,
            kind: class.kind,
        }
    }
}

impl fmt::Display for ClassRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", class_label(self.class_bytes))?;
        if self.kind != MemoryKind::Device {
            write!(f, " {}", self.kind.name())?;
        }
        if self.device != 0 {
            write!(f, " on device {}", self.device)?;
        }
        Ok(())
    }
}

/// A change worth making, with the figures that call for it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Recommendation {
    /// Allocations failed: the budget or the device is too small for the working set.
    FailedRequests {
        /// Failed allocate calls.
        failed: u64,
        /// Memory pressure when the snapshot was taken.
        pressure: f64,
    },
    /// Pooling is off, so every request is a backend allocation.
    EnablePooling {
        /// Requests served straight from the backend.
        requests: u64,
    },
    /// Much of the reserved memory is idle while the device is nearly full.
    Trim {
        /// cached / reserved.
        idle_fraction: f64,
        /// reserved / budget or capacity.
        pressure: f64,
        /// Idle bytes a trim could give back.
        cached_bytes: u64,
    },
    /// A class released blocks at its cap and then missed for them.
    RaiseCap {
        /// The class.
        class: ClassRef,
        /// Drops released because the class held its cap of idle blocks.
        releases_at_cap: u64,
        /// The class's requests.
        requests: u64,
        /// Further classes with the same condition, not named.
        more_classes: usize,
    },
    /// A class misses often without ever reaching its cap: its working set grows cold.
    Prewarm {
        /// The class.
        class: ClassRef,
        /// Its misses.
        misses: u64,
        /// Its hit rate.
        hit_rate: f64,
        /// Further classes with the same condition, not named.
        more_classes: usize,
    },
    /// Many requests were larger than the largest class and bypassed the pool.
    RaiseMaxClass {
        /// Bypassed requests.
        bypasses: u64,
        /// All requests.
        requests: u64,
        /// The largest class that served a request, if any.
        largest_class_bytes: Option<u64>,
    },
    /// Rounding to the class size wastes much of the in-use memory.
    FinerClasses {
        /// 1 − requested live / in use.
        internal_fragmentation: f64,
        /// in use − requested live.
        wasted_bytes: u64,
        /// The class that wastes the most.
        worst_class: Option<ClassRef>,
    },
    /// A class holds prewarmed blocks that no request has used.
    UnusedPrewarm {
        /// The class.
        class: ClassRef,
        /// Its idle blocks.
        cached_blocks: u64,
        /// Their bytes.
        cached_bytes: u64,
    },
}

fn more(count: usize) -> String {
    match count {
        0 => String::new(),
        1 => " (and 1 more class)".to_string(),
        _ => format!(" (and {count} more classes)"),
    }
}

impl fmt::Display for Recommendation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Recommendation::FailedRequests { failed, pressure } => write!(
                f,
                "Raise the budget or free buffers sooner: {} allocation(s) failed \
                 (memory pressure {}).",
                thousands(*failed),
                percent(*pressure)
            ),
            Recommendation::EnablePooling { requests } => write!(
                f,
                "Turn pooling on: all {} requests went to the backend.",
                thousands(*requests)
            ),
            Recommendation::Trim {
                idle_fraction,
                pressure,
                cached_bytes,
            } => write!(
                f,
                "Trim idle blocks (trim(TrimLevel::Normal)): idle fraction {} ({}) under \
                 memory pressure {}.",
                percent(*idle_fraction),
                bytes(*cached_bytes),
                percent(*pressure)
            ),
            Recommendation::RaiseCap {
                class,
                releases_at_cap,
                requests,
                more_classes,
            } => write!(
                f,
                "Raise the cap of class {class} (max_idle_per_class): {} releases at cap \
                 in {} requests{}.",
                thousands(*releases_at_cap),
                thousands(*requests),
                more(*more_classes)
            ),
            Recommendation::Prewarm {
                class,
                misses,
                hit_rate,
                more_classes,
            } => write!(
                f,
                "Prewarm class {class} (prewarm({}, {})): {} misses, hit rate {}{}.",
                class.class_bytes,
                misses,
                thousands(*misses),
                percent(*hit_rate),
                more(*more_classes)
            ),
            Recommendation::RaiseMaxClass {
                bypasses,
                requests,
                largest_class_bytes,
            } => {
                write!(
                    f,
                    "Raise max_class_bytes: {} of {} requests ({}) bypassed the classes",
                    thousands(*bypasses),
                    thousands(*requests),
                    percent(*bypasses as f64 / (*requests).max(1) as f64)
                )?;
                match largest_class_bytes {
                    Some(largest) => write!(f, " (largest class used: {}).", class_label(*largest)),
                    None => write!(f, "."),
                }
            }
            Recommendation::FinerClasses {
                internal_fragmentation,
                wasted_bytes,
                worst_class,
            } => {
                write!(
                    f,
                    "Use finer size classes (steps_per_doubling): {} of in-use bytes ({}) \
                     is rounding waste",
                    percent(*internal_fragmentation),
                    bytes(*wasted_bytes)
                )?;
                match worst_class {
                    Some(class) => write!(f, ", most in class {class}."),
                    None => write!(f, "."),
                }
            }
            Recommendation::UnusedPrewarm {
                class,
                cached_blocks,
                cached_bytes,
            } => write!(
                f,
                "Prewarm less of class {class}: its {} prewarmed blocks ({}) served no request.",
                thousands(*cached_blocks),
                bytes(*cached_bytes)
            ),
        }
    }
}

/// Every class of every device, with its device index.
pub(super) fn classes(stats: &PoolStats) -> impl Iterator<Item = (usize, &ClassStats)> {
    stats.devices.iter().flat_map(|device| {
        device
            .classes
            .iter()
            .map(move |class| (device.device, class))
    })
}

/// The classes matching `condition`, the one with the largest `weight` first.
fn worst(
    stats: &PoolStats,
    condition: impl Fn(&ClassStats) -> bool,
    weight: impl Fn(&ClassStats) -> u64,
) -> Vec<(usize, &ClassStats)> {
    let mut matching: Vec<_> = classes(stats)
        .filter(|(_, class)| condition(class))
        .collect();
    matching.sort_by_key(|(_, class)| std::cmp::Reverse(weight(class)));
    matching
}

fn cap_bound(class: &ClassStats) -> bool {
    class.releases_at_cap >= MIN_EVENTS
        && class.releases_at_cap as f64 >= CAP_RELEASE_SHARE * class.requests as f64
}

/// The recommendations for `stats`, most urgent first; empty when nothing needs changing.
pub fn recommendations(stats: &PoolStats) -> Vec<Recommendation> {
    let totals = &stats.totals;
    let mut advice = Vec::new();
    if totals.failed_requests > 0 {
        advice.push(Recommendation::FailedRequests {
            failed: totals.failed_requests,
            pressure: totals.memory_pressure,
        });
    }
    if !stats.pooling && totals.requests > 0 {
        advice.push(Recommendation::EnablePooling {
            requests: totals.requests,
        });
    }
    if totals.memory_pressure >= TRIM_PRESSURE && totals.idle_fraction >= TRIM_IDLE_FRACTION {
        advice.push(Recommendation::Trim {
            idle_fraction: totals.idle_fraction,
            pressure: totals.memory_pressure,
            cached_bytes: totals.cached_bytes,
        });
    }

    let capped = worst(stats, cap_bound, |class| class.releases_at_cap);
    let capped_count = capped.len();
    for (device, class) in capped.into_iter().take(MAX_CLASSES_PER_ADVICE) {
        advice.push(Recommendation::RaiseCap {
            class: ClassRef::of(device, class),
            releases_at_cap: class.releases_at_cap,
            requests: class.requests,
            more_classes: 0,
        });
    }
    name_the_rest(&mut advice, capped_count);

    let cold = worst(
        stats,
        |class| {
            class.requests >= MIN_CLASS_REQUESTS
                && class.hit_rate < PREWARM_HIT_RATE
                && class.misses >= MIN_EVENTS
                && !cap_bound(class)
        },
        |class| class.misses,
    );
    let cold_count = cold.len();
    for (device, class) in cold.into_iter().take(MAX_CLASSES_PER_ADVICE) {
        advice.push(Recommendation::Prewarm {
            class: ClassRef::of(device, class),
            misses: class.misses,
            hit_rate: class.hit_rate,
            more_classes: 0,
        });
    }
    name_the_rest(&mut advice, cold_count);

    if stats.pooling
        && totals.bypasses >= MIN_EVENTS
        && totals.bypasses as f64 >= BYPASS_SHARE * totals.requests as f64
    {
        advice.push(Recommendation::RaiseMaxClass {
            bypasses: totals.bypasses,
            requests: totals.requests,
            largest_class_bytes: classes(stats)
                .filter(|(_, class)| class.requests > 0)
                .map(|(_, class)| class.class_bytes)
                .max(),
        });
    }

    let wasted_bytes = totals
        .in_use_bytes
        .saturating_sub(totals.requested_live_bytes);
    if totals.internal_fragmentation >= FRAGMENTATION_LIMIT && wasted_bytes >= MIN_WASTE_BYTES {
        let worst_class = classes(stats)
            .map(|(device, class)| {
                let waste = class
                    .in_use_bytes
                    .saturating_sub(class.requested_live_bytes);
                (waste, ClassRef::of(device, class))
            })
            .filter(|(waste, _)| *waste > 0)
            .max_by_key(|(waste, _)| *waste)
            .map(|(_, class)| class);
        advice.push(Recommendation::FinerClasses {
            internal_fragmentation: totals.internal_fragmentation,
            wasted_bytes,
            worst_class,
        });
    }

    for (device, class) in classes(stats) {
        if class.prewarmed_blocks > 0 && class.requests == 0 && class.cached_blocks > 0 {
            advice.push(Recommendation::UnusedPrewarm {
                class: ClassRef::of(device, class),
                cached_blocks: class.cached_blocks,
                cached_bytes: class.cached_bytes,
            });
        }
    }
    advice
}

/// Records on the last per-class recommendation how many matching classes it leaves unnamed.
fn name_the_rest(advice: &mut [Recommendation], matching: usize) {
    let unnamed = matching.saturating_sub(MAX_CLASSES_PER_ADVICE);
    if unnamed == 0 {
        return;
    }
    if let Some(
        Recommendation::RaiseCap { more_classes, .. }
        | Recommendation::Prewarm { more_classes, .. },
    ) = advice.last_mut()
    {
        *more_classes = unnamed;
    }
}
