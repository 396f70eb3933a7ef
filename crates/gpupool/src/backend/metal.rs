//! The `metal` backend (being written).
