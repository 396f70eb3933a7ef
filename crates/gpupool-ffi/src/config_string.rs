//! The configuration string of `gpupool_configure` and `GPUPOOL_CONFIG`.
//!
//! `key=value` pairs separated by commas, with the names of [`PoolConfigBuilder`]'s setters
//! (one key per setter), e.g. `steps_per_doubling=4,budget_bytes=1073741824`. Values:
//!
//! - sizes and counts: an unsigned integer, optionally with a binary suffix
//!   (`KiB`, `MiB`, `GiB`, `TiB`): `budget_bytes=8GiB`;
//! - `Option` settings (`budget_bytes`, `large_threshold_bytes`, `virtual_memory_pages`):
//!   such a number, or `none`;
//! - switches: `true` or `false` (also `1` or `0`);
//! - `maintenance_interval`: seconds (`60`, `0.5`), or with a unit (`500ms`, `60s`); `0` turns
//!   maintenance off.
//!
//! Spaces around keys and values and empty items (a trailing comma) are ignored; a later
//! setting of the same key wins. An unknown key or a bad value is an error naming it, and the
//! whole string is refused: nothing of it applies.
#![forbid(unsafe_code)]

use std::time::Duration;

use gpupool::PoolConfigBuilder;

use crate::errors::FfiError;

/// The keys, in the order of the builder's setters.
pub(crate) const KEYS: [&str; 17] = [
    "min_class_bytes",
    "max_class_bytes",
    "steps_per_doubling",
    "max_idle_per_class",
    "max_idle_bytes_per_class",
    "min_idle_per_class",
    "maintenance_interval",
    "budget_bytes",
    "pooling",
    "zero_on_reuse",
    "shards",
    "large_threshold_bytes",
    "virtual_memory_pages",
    "reclaim_at_peak",
    "release_idle_at_peak",
    "carve_class_blocks",
    "shared_class_pages",
];

/// Applies every setting of `text` to `builder`, or names the first bad one.
pub fn apply(text: &str, builder: PoolConfigBuilder) -> Result<PoolConfigBuilder, FfiError> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .try_fold(builder, |builder, item| {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| FfiError::Config(format!("expected key=value, found {item:?}")))?;
            set(builder, key.trim(), value.trim())
        })
}

fn set(builder: PoolConfigBuilder, key: &str, value: &str) -> Result<PoolConfigBuilder, FfiError> {
    Ok(match key {
        "min_class_bytes" => builder.min_class_bytes(size(key, value)?),
        "max_class_bytes" => builder.max_class_bytes(size(key, value)?),
        "steps_per_doubling" => builder.steps_per_doubling(size(key, value)?),
        "max_idle_per_class" => builder.max_idle_per_class(size(key, value)?),
        "max_idle_bytes_per_class" => builder.max_idle_bytes_per_class(size(key, value)?),
        "min_idle_per_class" => builder.min_idle_per_class(size(key, value)?),
        "maintenance_interval" => builder.maintenance_interval(duration(key, value)?),
        "budget_bytes" => builder.budget_bytes(optional(key, value, bytes)?),
        "pooling" => builder.pooling(switch(key, value)?),
        "zero_on_reuse" => builder.zero_on_reuse(switch(key, value)?),
        "shards" => builder.shards(size(key, value)?),
        "large_threshold_bytes" => builder.large_threshold_bytes(optional(key, value, size)?),
        "virtual_memory_pages" => builder.virtual_memory_pages(optional(key, value, size)?),
        "reclaim_at_peak" => builder.reclaim_at_peak(switch(key, value)?),
        "release_idle_at_peak" => builder.release_idle_at_peak(switch(key, value)?),
        "carve_class_blocks" => builder.carve_class_blocks(switch(key, value)?),
        "shared_class_pages" => builder.shared_class_pages(switch(key, value)?),
        _ => {
            return Err(FfiError::Config(format!(
                "unknown key {key:?} (known keys: {})",
                KEYS.join(", ")
            )))
        }
    })
}

fn bad_value(key: &str, value: &str, expected: &str) -> FfiError {
    FfiError::Config(format!(
        "bad value {value:?} for {key}: expected {expected}"
    ))
}

/// An unsigned number of bytes with an optional binary suffix.
fn bytes(key: &str, value: &str) -> Result<u64, FfiError> {
    const EXPECTED: &str = "an unsigned integer, optionally with KiB, MiB, GiB or TiB";
    let suffixes = [("KiB", 10), ("MiB", 20), ("GiB", 30), ("TiB", 40)];
    let (digits, shift) = suffixes
        .iter()
        .find_map(|(suffix, shift)| value.strip_suffix(suffix).map(|rest| (rest.trim(), *shift)))
        .unwrap_or((value, 0));
    let number: u64 = digits
        .parse()
        .map_err(|_| bad_value(key, value, EXPECTED))?;
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| bad_value(key, value, "a size that fits in 64 bits"))
}

/// A size or count that fits in `usize`.
fn size(key: &str, value: &str) -> Result<usize, FfiError> {
    let number = bytes(key, value)?;
    usize::try_from(number).map_err(|_| bad_value(key, value, "a size that fits in usize"))
}

fn optional<T>(
    key: &str,
    value: &str,
    parse: impl Fn(&str, &str) -> Result<T, FfiError>,
) -> Result<Option<T>, FfiError> {
    if value.eq_ignore_ascii_case("none") {
        Ok(None)
    } else {
        parse(key, value).map(Some)
    }
}

fn switch(key: &str, value: &str) -> Result<bool, FfiError> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad_value(key, value, "true or false")),
    }
}

fn duration(key: &str, value: &str) -> Result<Duration, FfiError> {
    const EXPECTED: &str = "seconds (60, 0.5) or a number with ms or s";
    let (number, scale) = if let Some(millis) = value.strip_suffix("ms") {
        (millis, 1e-3)
    } else if let Some(seconds) = value.strip_suffix('s') {
        (seconds, 1.0)
    } else {
        (value, 1.0)
    };
    let seconds: f64 = number
        .trim()
        .parse()
        .map_err(|_| bad_value(key, value, EXPECTED))?;
    Duration::try_from_secs_f64(seconds * scale).map_err(|_| bad_value(key, value, EXPECTED))
}

#[cfg(test)]
mod tests {
    use gpupool::PoolConfig;

    use super::*;

    fn config(text: &str) -> Result<PoolConfig, FfiError> {
        Ok(apply(text, PoolConfig::builder())?.build()?)
    }

    #[test]
    fn every_key_is_accepted() {
        let text = "min_class_bytes=512, max_class_bytes=64MiB, steps_per_doubling=4, \
                    max_idle_per_class=16, max_idle_bytes_per_class=1MiB, min_idle_per_class=2, \
                    maintenance_interval=500ms, budget_bytes=1GiB, pooling=true, \
                    zero_on_reuse=false, shards=8, large_threshold_bytes=none, \
                    virtual_memory_pages=none, reclaim_at_peak=1, release_idle_at_peak=0, \
                    carve_class_blocks=false, shared_class_pages=true,";
        let config = config(text).unwrap();
        assert_eq!(config.classes().sizes()[0], 512);
        assert_eq!(config.classes().max_bytes(), 64 << 20);
        assert_eq!(config.max_idle_per_class(), 16);
        assert_eq!(config.max_idle_bytes_per_class(), 1 << 20);
        assert_eq!(config.min_idle_per_class(), 2);
        assert_eq!(config.maintenance_interval(), Duration::from_millis(500));
        assert_eq!(config.budget_bytes(), Some(1 << 30));
        assert!(config.pooling() && !config.zero_on_reuse());
        assert_eq!(config.shards(), 8);
        assert_eq!(config.large_threshold_bytes(), None);
        assert_eq!(config.virtual_memory_pages(), None);
        assert!(config.reclaim_at_peak());
        assert!(!config.release_idle_at_peak());
        assert!(!config.carve_class_blocks() && config.shared_class_pages());
        for key in KEYS {
            assert!(text.contains(&format!("{key}=")), "{key} is not tested");
        }
    }

    /// Every setter of the builder has its key: a setter added to `PoolConfigBuilder` without
    /// one here fails this test (the C ABI and Python promise the same keys).
    #[test]
    fn every_builder_setter_has_a_key() {
        let source = include_str!("../../gpupool/src/config.rs");
        let setters: Vec<&str> = source
            .lines()
            .filter_map(|line| line.trim().strip_prefix("pub fn "))
            .filter(|rest| rest.contains("(mut self"))
            .filter_map(|rest| rest.split('(').next())
            .collect();
        assert!(setters.len() >= KEYS.len(), "found setters {setters:?}");
        for setter in &setters {
            assert!(KEYS.contains(setter), "builder setter {setter} has no key");
        }
    }

    #[test]
    fn the_brief_example_and_empty_strings_parse() {
        let example = config(
            "steps_per_doubling=4,budget_bytes=1073741824,max_idle_per_class=32,\
             reclaim_at_peak=true,virtual_memory_pages=0",
        )
        .unwrap();
        assert_eq!(example.budget_bytes(), Some(1 << 30));
        assert_eq!(example.virtual_memory_pages(), Some(0));
        assert!(config(" , ").is_ok());
        assert_eq!(
            config("maintenance_interval=60")
                .unwrap()
                .maintenance_interval(),
            Duration::from_secs(60)
        );
        assert_eq!(
            config("maintenance_interval=0")
                .unwrap()
                .maintenance_interval(),
            Duration::ZERO
        );
        assert_eq!(config("budget_bytes=none").unwrap().budget_bytes(), None);
    }

    #[test]
    fn bad_strings_name_what_is_wrong() {
        let cases = [
            ("colour=blue", "unknown key \"colour\""),
            ("steps_per_doubling", "expected key=value"),
            (
                "steps_per_doubling=four",
                "bad value \"four\" for steps_per_doubling",
            ),
            ("budget_bytes=-1", "bad value \"-1\" for budget_bytes"),
            ("budget_bytes=99999999999TiB", "fits in 64 bits"),
            ("pooling=yes", "expected true or false"),
            (
                "maintenance_interval=-1",
                "bad value \"-1\" for maintenance_interval",
            ),
            ("maintenance_interval=soon", "for maintenance_interval"),
            ("steps_per_doubling=0", "invalid configuration"),
            ("budget_bytes=0", "a budget of 0 bytes"),
        ];
        for (text, expected) in cases {
            let error = config(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }
}
