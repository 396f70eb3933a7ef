//! Core pool tests.
