//! The per-class efficiency score and the star rating.
//!
//! **Efficiency score** (one scale, 0–100, for every class):
//!
//! ```text
//! score = 100 × reuse × fill
//! reuse = clamp(1 − backend allocations / requests, 0, 1)   (the class's allocation reduction)
//! fill  = requested live bytes / in-use bytes                 (1 − internal fragmentation),
//!         or 1 when the class has no live buffer
//! ```
//!
//! A class scores 100 when every request after the first few was served without the driver
//! and its live blocks hold exactly what was asked for; it loses points for each backend
//! allocation (prewarmed blocks included, so a prewarm nobody uses lowers it) and for rounding
//! waste. Rounding waste is only known for live buffers (a snapshot keeps no history of
//! requested sizes), so with none live the score is the reuse alone. Idle memory is judged
//! separately, by the idle fraction and pressure (see [`super::health`]), because whether a
//! cached block is waste depends on the device, not the class. The seed mixed a 0–1 and a
//! 0–100 scale here, which made two of its recommendations fire always; this is the only score.
//!
//! **Star rating** (the seed's thresholds, on docs/design.md's allocation reduction, not the hit
//! rate): ≥ 90 % five stars "Excellent", ≥ 80 % four "Very Good", ≥ 70 % three "Good",
//! ≥ 50 % two "Fair", else one "Poor".
#![forbid(unsafe_code)]

use serde::Serialize;

use crate::stats::ClassStats;

/// The efficiency score of one class, 0–100 (see the module docs for the formula).
pub fn class_efficiency(class: &ClassStats) -> f64 {
    if class.requests == 0 {
        return 0.0;
    }
    let reuse = (1.0 - class.backend_allocations as f64 / class.requests as f64).clamp(0.0, 1.0);
    let fill = if class.in_use_bytes == 0 {
        1.0
    } else {
        (class.requested_live_bytes as f64 / class.in_use_bytes as f64).clamp(0.0, 1.0)
    };
    100.0 * reuse * fill
}

/// The seed's star rating of an allocation reduction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct StarRating {
    /// One to five.
    pub stars: u8,
    /// "Excellent", "Very Good", "Good", "Fair" or "Poor".
    pub label: &'static str,
}

impl StarRating {
    /// The rating of `allocation_reduction` (a ratio, 0–1).
    pub fn from_reduction(allocation_reduction: f64) -> StarRating {
        let percent = allocation_reduction * 100.0;
        let (stars, label) = if percent >= 90.0 {
            (5, "Excellent")
        } else if percent >= 80.0 {
            (4, "Very Good")
        } else if percent >= 70.0 {
            (3, "Good")
        } else if percent >= 50.0 {
            (2, "Fair")
        } else {
            (1, "Poor")
        };
        StarRating { stars, label }
    }

    /// Five characters: filled stars then hollow ones, `★★★☆☆`.
    pub fn glyphs(&self) -> String {
        let filled = usize::from(self.stars.min(5));
        "★".repeat(filled) + &"☆".repeat(5 - filled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rating_thresholds_are_the_seeds() {
        let cases = [
            (0.95, 5, "Excellent"),
            (0.90, 5, "Excellent"),
            (0.85, 4, "Very Good"),
            (0.70, 3, "Good"),
            (0.50, 2, "Fair"),
            (0.49, 1, "Poor"),
            (f64::NAN, 1, "Poor"),
        ];
        for (reduction, stars, label) in cases {
            let rating = StarRating::from_reduction(reduction);
            assert_eq!((rating.stars, rating.label), (stars, label), "{reduction}");
        }
        assert_eq!(StarRating::from_reduction(0.72).glyphs(), "★★★☆☆");
    }
}
