//! Metal-like backend tests on Linux (being written).
