//! The number formatting of the command's own output (the library keeps its dashboard
//! formatting private): IEC byte units (KiB, MiB, GiB: powers of 1,024), thousands separators
//! for counts, rates as `M/s` or `k/s`, and a median with its range over several samples.
//! Every function is total: zero, `u64::MAX`, NaN and infinities print something readable.
#![forbid(unsafe_code)]

use serde::Serialize;

/// IEC units, largest first.
const UNITS: [(&str, u64); 4] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
];

/// An integer with thousands separators: `1,234,567`.
pub fn thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// Bytes in the largest IEC unit that keeps the number at least 1, with three significant
/// digits: `0 B`, `1,023 B`, `4.00 KiB`, `341 KiB`, `12.3 MiB`, `7.69 GiB`.
pub fn bytes(value: u64) -> String {
    for (name, unit) in UNITS {
        if value >= unit {
            let scaled = value as f64 / unit as f64;
            return if scaled < 10.0 {
                format!("{scaled:.2} {name}")
            } else if scaled < 100.0 {
                format!("{scaled:.1} {name}")
            } else {
                format!("{scaled:.0} {name}")
            };
        }
    }
    format!("{} B", thousands(value))
}

/// Bytes as [`bytes`] does, with the exact count beside them once a unit is used:
/// `24 B`, `1.00 KiB (1,024 bytes)`, `286 MiB (300,000,000 bytes)`.
pub fn bytes_exact(value: u64) -> String {
    if value < 1 << 10 {
        return bytes(value);
    }
    format!("{} ({} bytes)", bytes(value), thousands(value))
}

/// A count with its noun, plural unless it is one: `1 run`, `5 runs`, `1,000 frees`.
pub fn count(value: u64, noun: &str) -> String {
    let plural = if value == 1 { "" } else { "s" };
    format!("{} {noun}{plural}", thousands(value))
}

/// A duration given in nanoseconds, in the unit that suits it: `41.0 ns`, `3.36 µs`,
/// `1.50 ms`, `2.00 s`.
pub fn nanos(value: f64) -> String {
    let value = finite(value);
    if value < 1e3 {
        format!("{value:.1} ns")
    } else if value < 1e6 {
        format!("{:.2} µs", value / 1e3)
    } else if value < 1e9 {
        format!("{:.2} ms", value / 1e6)
    } else {
        format!("{:.2} s", value / 1e9)
    }
}

/// A buffer size, exact, in the largest IEC unit that divides it: `256 B`, `4 KiB`, `1 MiB`;
/// other sizes in bytes with separators (`1,500 B`).
pub fn size(value: u64) -> String {
    for (name, unit) in UNITS {
        if value >= unit && value.is_multiple_of(unit) {
            return format!("{} {name}", thousands(value / unit));
        }
    }
    format!("{} B", thousands(value))
}

/// Events per second as `M/s`, `k/s` or `/s`, three significant digits: `45.0 M/s`,
/// `350 k/s`, `12.5 k/s`, `950 /s`.
pub fn rate(per_second: f64) -> String {
    let value = finite(per_second);
    if value >= 1e6 {
        format!("{} M/s", significant(value / 1e6))
    } else if value >= 1e3 {
        format!("{} k/s", significant(value / 1e3))
    } else {
        format!("{value:.0} /s")
    }
}

/// Three significant digits for a value of at least 1: `4.56`, `45.6`, `456`, `4,560`.
fn significant(value: f64) -> String {
    if value < 10.0 {
        format!("{value:.2}")
    } else if value < 100.0 {
        format!("{value:.1}")
    } else {
        thousands(value.round() as u64)
    }
}

/// `value` if it is finite, else 0.
fn finite(value: f64) -> f64 {
    if value.is_finite() {
        value
    } else {
        0.0
    }
}

/// The median, fastest and slowest of several samples of one figure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Spread {
    /// The median (for an even count, the mean of the two middle samples).
    pub median: f64,
    /// The smallest sample.
    pub min: f64,
    /// The largest sample.
    pub max: f64,
}

impl Spread {
    /// The spread of `samples`; all zeros for none. NaN samples sort last.
    pub fn of(samples: &[f64]) -> Spread {
        if samples.is_empty() {
            return Spread::default();
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let middle = sorted.len() / 2;
        let median = if sorted.len() % 2 == 1 {
            sorted[middle]
        } else {
            (sorted[middle - 1] + sorted[middle]) / 2.0
        };
        Spread {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
        }
    }

    /// `median [min–max]`, each figure written by `show`: `21.9 [21.3–38.8]`.
    pub fn show(&self, show: impl Fn(f64) -> String) -> String {
        format!(
            "{} [{}–{}]",
            show(self.median),
            show(self.min),
            show(self.max)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_separated_by_commas() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(42_431), "42,431");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(u64::MAX), "18,446,744,073,709,551,615");
    }

    #[test]
    fn bytes_use_iec_units_and_three_significant_digits() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1,023 B");
        assert_eq!(bytes(1024), "1.00 KiB");
        assert_eq!(bytes(4096), "4.00 KiB");
        assert_eq!(bytes(349_440), "341 KiB");
        assert_eq!(bytes(12_900_000), "12.3 MiB");
        assert_eq!(bytes(8_257_000_000), "7.69 GiB");
        assert!(bytes(u64::MAX).ends_with(" TiB"));
        // Never the decimal units the seed mixed in.
        for value in [1000, 1024, 1 << 20, 1 << 30] {
            let text = bytes(value);
            assert!(!text.contains("KB") && !text.contains("MB"), "{text}");
        }
    }

    #[test]
    fn exact_bytes_follow_the_unit_only_when_there_is_one() {
        assert_eq!(bytes_exact(24), "24 B");
        assert_eq!(bytes_exact(1024), "1.00 KiB (1,024 bytes)");
        assert_eq!(bytes_exact(300_000_000), "286 MiB (300,000,000 bytes)");
    }

    #[test]
    fn counts_agree_with_their_noun() {
        assert_eq!(count(1, "run"), "1 run");
        assert_eq!(count(0, "run"), "0 runs");
        assert_eq!(count(1000, "free"), "1,000 frees");
    }

    #[test]
    fn durations_pick_their_unit() {
        assert_eq!(nanos(41.0), "41.0 ns");
        assert_eq!(nanos(33_634.0), "33.63 µs");
        assert_eq!(nanos(1_500_000.0), "1.50 ms");
        assert_eq!(nanos(2e9), "2.00 s");
        assert_eq!(nanos(f64::NAN), "0.0 ns");
    }

    #[test]
    fn sizes_are_exact() {
        assert_eq!(size(256), "256 B");
        assert_eq!(size(1024), "1 KiB");
        assert_eq!(size(4096), "4 KiB");
        assert_eq!(size(262_144), "256 KiB");
        assert_eq!(size(1 << 20), "1 MiB");
        assert_eq!(size(16 << 20), "16 MiB");
        assert_eq!(size(1500), "1,500 B");
        assert_eq!(size(3 << 40), "3 TiB");
        assert_eq!(size(0), "0 B");
    }

    #[test]
    fn rates_are_per_second_in_m_or_k() {
        assert_eq!(rate(45_021_034.0), "45.0 M/s");
        assert_eq!(rate(4_502_103.4), "4.50 M/s");
        assert_eq!(rate(123_456_789_012.0), "123,457 M/s");
        assert_eq!(rate(350_000.0), "350 k/s");
        assert_eq!(rate(12_500.0), "12.5 k/s");
        assert_eq!(rate(950.0), "950 /s");
        assert_eq!(rate(0.0), "0 /s");
        assert_eq!(rate(f64::NAN), "0 /s");
        assert_eq!(rate(f64::INFINITY), "0 /s");
    }

    #[test]
    fn a_spread_is_the_median_and_the_extremes() {
        let spread = Spread::of(&[5.0, 1.0, 3.0, 9.0, 4.0]);
        assert_eq!(
            spread,
            Spread {
                median: 4.0,
                min: 1.0,
                max: 9.0
            }
        );
        assert_eq!(Spread::of(&[2.0, 1.0, 4.0, 3.0]).median, 2.5);
        assert_eq!(Spread::of(&[7.0]).min, 7.0);
        assert_eq!(Spread::of(&[]), Spread::default());
        assert_eq!(spread.show(|value| format!("{value:.1}")), "4.0 [1.0–9.0]");
    }
}
