//! The pool's health status: the seed's rule on reuse, extended with memory.
//!
//! 1. **Reuse** (the seed's rule, on docs/design.md's metrics): *Healthy* when the hit rate is at
//!    least 0.9 and the allocation reduction at least 85 %; *Good* at 0.7 and 70 %; *Fair* at
//!    0.5 and 50 %; else *Needs Attention*.
//! 2. **Memory** caps that level, because a pool that reuses well while the device runs out is
//!    not healthy: memory pressure ≥ 95 % caps it at *Needs Attention*, ≥ 85 % at *Fair*; a
//!    pressure ≥ 70 % with a memory efficiency below 50 % (more than half of what the pool
//!    holds serves no request) caps it at *Good*. Without pressure, idle blocks cost nothing
//!    and do not lower the status.
//! 3. **Failures**: any failed allocation caps it at *Fair*.
//!
//! A pool that has served no request is *Idle*: there is nothing to judge yet.
#![forbid(unsafe_code)]

use std::fmt;

use serde::Serialize;

use super::format::percent;
use crate::stats::Totals;

/// Memory pressure at which the status is capped at Needs Attention.
pub const CRITICAL_PRESSURE: f64 = 0.95;
/// Memory pressure at which the status is capped at Fair.
pub const HIGH_PRESSURE: f64 = 0.85;
/// Memory pressure from which a low memory efficiency caps the status at Good.
pub const ELEVATED_PRESSURE: f64 = 0.70;
/// The memory efficiency under which an elevated pressure caps the status at Good.
pub const LOW_MEMORY_EFFICIENCY: f64 = 0.50;

/// The health of a pool, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum Health {
    /// Reuses well, memory in hand.
    Healthy,
    /// Reuses most requests.
    Good,
    /// Reuses half of the requests, or memory is tight.
    Fair,
    /// Reuses little, or the device is nearly full.
    NeedsAttention,
    /// No request served yet.
    Idle,
}

impl Health {
    /// The label the dashboard and the summary print.
    pub fn label(self) -> &'static str {
        match self {
            Health::Healthy => "Healthy",
            Health::Good => "Good",
            Health::Fair => "Fair",
            Health::NeedsAttention => "Needs Attention",
            Health::Idle => "Idle",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A health status and the rule that set it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HealthAssessment {
    /// The status.
    pub status: Health,
    /// Why, in words: the figures that decided it.
    pub reason: String,
}

impl HealthAssessment {
    /// Judges the totals of a snapshot.
    pub fn of(totals: &Totals) -> HealthAssessment {
        if totals.requests == 0 {
            return HealthAssessment {
                status: Health::Idle,
                reason: "no request served yet".into(),
            };
        }
        let hit = totals.hit_rate;
        let reduction = totals.allocation_reduction;
        let reuse = if hit >= 0.9 && reduction >= 0.85 {
            Health::Healthy
        } else if hit >= 0.7 && reduction >= 0.7 {
            Health::Good
        } else if hit >= 0.5 && reduction >= 0.5 {
            Health::Fair
        } else {
            Health::NeedsAttention
        };
        let mut status = reuse;
        let mut reason = format!(
            "hit rate {}, allocation reduction {}",
            percent(hit),
            percent(reduction)
        );
        let pressure = totals.memory_pressure;
        let memory_cap = if pressure >= CRITICAL_PRESSURE {
            Some((
                Health::NeedsAttention,
                format!("memory pressure {}", percent(pressure)),
            ))
        } else if pressure >= HIGH_PRESSURE {
            Some((
                Health::Fair,
                format!("memory pressure {}", percent(pressure)),
            ))
        } else if pressure >= ELEVATED_PRESSURE && totals.memory_efficiency < LOW_MEMORY_EFFICIENCY
        {
            Some((
                Health::Good,
                format!(
                    "memory efficiency {} under pressure {}",
                    percent(totals.memory_efficiency),
                    percent(pressure)
                ),
            ))
        } else {
            None
        };
        let failure_cap = (totals.failed_requests > 0).then(|| {
            (
                Health::Fair,
                format!("{} failed allocation(s)", totals.failed_requests),
            )
        });
        for (cap, why) in [memory_cap, failure_cap].into_iter().flatten() {
            if cap > status {
                status = cap;
                reason = format!("{why} (reuse alone: {}; {reason})", reuse.label());
            }
        }
        HealthAssessment { status, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(hit_rate: f64, reduction: f64, pressure: f64, efficiency: f64) -> Totals {
        Totals {
            requests: 100,
            hit_rate,
            allocation_reduction: reduction,
            memory_pressure: pressure,
            memory_efficiency: efficiency,
            ..Totals::default()
        }
    }

    #[test]
    fn reuse_levels_are_the_seeds() {
        let cases = [
            (0.95, 0.90, Health::Healthy),
            (0.95, 0.80, Health::Good),
            (0.75, 0.75, Health::Good),
            (0.60, 0.55, Health::Fair),
            (0.40, 0.90, Health::NeedsAttention),
        ];
        for (hit, reduction, expected) in cases {
            let totals = totals(hit, reduction, 0.1, 1.0);
            assert_eq!(HealthAssessment::of(&totals).status, expected);
        }
    }

    #[test]
    fn memory_and_failures_cap_the_status() {
        let cases = [
            (0.96, 1.0, Health::NeedsAttention),
            (0.90, 1.0, Health::Fair),
            (0.75, 0.3, Health::Good),
            (0.75, 0.8, Health::Healthy),
            (0.50, 0.0, Health::Healthy),
        ];
        for (pressure, efficiency, expected) in cases {
            let assessed = HealthAssessment::of(&totals(0.99, 0.99, pressure, efficiency));
            assert_eq!(assessed.status, expected, "{pressure} {efficiency}");
        }
        let mut failing = totals(0.99, 0.99, 0.1, 1.0);
        failing.failed_requests = 2;
        let assessed = HealthAssessment::of(&failing);
        assert_eq!(assessed.status, Health::Fair);
        assert!(assessed.reason.starts_with("2 failed allocation(s)"));
        assert_eq!(
            HealthAssessment::of(&Totals::default()).status,
            Health::Idle
        );
    }
}
