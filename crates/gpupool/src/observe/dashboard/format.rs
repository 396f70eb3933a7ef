//! Number formatting shared by every render: binary byte units, class labels, percentages,
//! thousands separators, latencies, and the display width of a line.
//!
//! Everything here is total: no input (zero, `u64::MAX`, NaN, infinity) panics or prints
//! "NaN", so an empty or odd snapshot always renders.
#![forbid(unsafe_code)]

const UNITS: [(&str, u64); 4] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
];

/// Bytes in the largest binary unit that keeps the number at least 1, with three or four
/// significant digits: `0 B`, `999 B`, `4.00 KiB`, `12.3 MiB`, `154 MiB`, `7.69 GiB`.
pub(crate) fn bytes(value: u64) -> String {
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
    format!("{value} B")
}

/// The exact size of a class in the largest unit that shows it with at most two decimals:
/// `256 B`, `1.25 KiB`, `320 KiB`, `1.5 MiB`, `256 MiB`.
pub(crate) fn class_label(class_bytes: u64) -> String {
    for (name, unit) in UNITS {
        if class_bytes >= unit && (u128::from(class_bytes) * 100) % u128::from(unit) == 0 {
            let hundredths = u128::from(class_bytes) * 100 / u128::from(unit);
            let whole = hundredths / 100;
            let fraction = hundredths % 100;
            return match (fraction, fraction % 10) {
                (0, _) => format!("{whole} {name}"),
                (_, 0) => format!("{whole}.{} {name}", fraction / 10),
                _ => format!("{whole}.{fraction:02} {name}"),
            };
        }
    }
    format!("{class_bytes} B")
}

/// A ratio as a percentage with one decimal (`0.999` → `99.9%`); NaN and infinities print as
/// `0.0%`, which no snapshot produces but a hand-built one might.
pub(crate) fn percent(ratio: f64) -> String {
    format!("{:.1}%", finite(ratio) * 100.0)
}

/// `value` if it is finite, else 0.
pub(crate) fn finite(value: f64) -> f64 {
    if value.is_finite() {
        value
    } else {
        0.0
    }
}

/// An integer with thousands separators: `1,234,567`.
pub(crate) fn thousands(value: u64) -> String {
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

/// A latency in the unit that suits it: `41 ns`, `3.2 µs`, `1.5 ms`, `2.00 s`; `-` when
/// nothing was sampled.
pub(crate) fn nanos(value: f64, samples: u64) -> String {
    let value = finite(value);
    if samples == 0 {
        "-".to_string()
    } else if value < 1e3 {
        format!("{value:.0} ns")
    } else if value < 1e6 {
        format!("{:.1} µs", value / 1e3)
    } else if value < 1e9 {
        format!("{:.1} ms", value / 1e6)
    } else {
        format!("{:.2} s", value / 1e9)
    }
}

/// How many terminal columns `line` takes: characters, not counting ANSI colour sequences.
pub(crate) fn display_width(line: &str) -> usize {
    let mut width = 0;
    let mut chars = line.chars();
    while let Some(character) = chars.next() {
        if character == '\u{1b}' {
            // Skip `ESC [ ... final byte`.
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

/// Greedy word wrap of `text` to `width` columns; lines after the first start with `indent`.
pub(crate) fn wrap(text: &str, width: usize, indent: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let prefix = if lines.is_empty() { 0 } else { indent.len() };
        let needed = display_width(&line) + usize::from(!line.is_empty()) + display_width(word);
        if !line.is_empty() && prefix + needed > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    lines.push(line);
    lines
        .into_iter()
        .enumerate()
        .map(|(index, line)| {
            if index == 0 {
                line
            } else {
                format!("{indent}{line}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_pick_a_unit_and_three_significant_digits() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(4096), "4.00 KiB");
        assert_eq!(bytes(12_900_000), "12.3 MiB");
        assert_eq!(bytes(154_389_504), "147 MiB");
        assert_eq!(bytes(8_257_000_000), "7.69 GiB");
        assert!(!bytes(u64::MAX).contains("NaN"));
    }

    #[test]
    fn class_labels_are_exact() {
        assert_eq!(class_label(256), "256 B");
        assert_eq!(class_label(1280), "1.25 KiB");
        assert_eq!(class_label(1536), "1.5 KiB");
        assert_eq!(class_label(320 << 10), "320 KiB");
        assert_eq!(class_label(256 << 20), "256 MiB");
        assert_eq!(class_label(1000), "1000 B");
    }

    #[test]
    fn odd_inputs_never_print_nan() {
        assert_eq!(percent(f64::NAN), "0.0%");
        assert_eq!(percent(f64::INFINITY), "0.0%");
        assert_eq!(nanos(f64::NAN, 3), "0 ns");
        assert_eq!(nanos(5.0, 0), "-");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(0), "0");
    }

    #[test]
    fn width_ignores_colour_and_wrap_respects_it() {
        assert_eq!(display_width("\u{1b}[1;32mok\u{1b}[0m"), 2);
        let text = "one two three four five six seven eight nine ten";
        for line in wrap(text, 12, "  ") {
            assert!(display_width(&line) <= 12, "{line}");
        }
        assert_eq!(wrap("", 10, "  "), vec![String::new()]);
    }
}
