//! The `cuda` backend (being written).
