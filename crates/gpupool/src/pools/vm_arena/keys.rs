//! The key every free range is listed under: whose space it is (a stream's, or fresh: no
//! queued work touches it) and what it serves (space of a *small page*, which holds class
//! blocks only, or the rest of the range, which holds blocks above the class range).
//!
//! One `u64`, so the free set stays one ordered set searched by `(key, bytes)`: a stream's key
//! is its id; the small-page twin sets [`SMALL_TAG`]; the two fresh keys are the top values.
//! Stream ids at or above [`STREAM_LIMIT`] cannot be told apart from these, so the router
//! serves them from segments instead (no real CUDA stream handle or sim id is that large).
#![forbid(unsafe_code)]

use crate::kind::StreamId;

/// Space no queued work can touch, outside small pages: any stream may take it.
pub(super) const FRESH: u64 = u64::MAX;
/// Fresh space inside small pages.
pub(super) const FRESH_SMALL: u64 = u64::MAX - 1;
/// Set on the key of a stream's space inside small pages.
const SMALL_TAG: u64 = 1 << 62;
/// Streams the arena serves have ids below this.
pub(crate) const STREAM_LIMIT: u64 = 1 << 61;

/// Whether the arena can key this stream's space (see the module documentation).
#[inline(always)]
pub(crate) fn serves(stream: StreamId) -> bool {
    stream.0 < STREAM_LIMIT
}

/// The key of `stream`'s space, inside small pages or not.
pub(super) fn own(stream: StreamId, small: bool) -> u64 {
    if small {
        stream.0 | SMALL_TAG
    } else {
        stream.0
    }
}

/// The fresh key, inside small pages or not.
pub(super) fn fresh(small: bool) -> u64 {
    if small {
        FRESH_SMALL
    } else {
        FRESH
    }
}

pub(super) fn is_fresh(key: u64) -> bool {
    key >= FRESH_SMALL
}

pub(super) fn is_small(key: u64) -> bool {
    key == FRESH_SMALL || (!is_fresh(key) && key & SMALL_TAG != 0)
}

/// The stream whose space this is; `None` for fresh space.
pub(super) fn stream_of(key: u64) -> Option<StreamId> {
    (!is_fresh(key)).then_some(StreamId(key & !SMALL_TAG))
}

/// The same owner's key outside small pages (a small page that became wholly free).
pub(super) fn outside_small(key: u64) -> u64 {
    match stream_of(key) {
        Some(stream) => own(stream, false),
        None => FRESH,
    }
}

/// The same owner's key inside small pages (a page turned into a small page).
pub(super) fn inside_small(key: u64) -> u64 {
    match stream_of(key) {
        Some(stream) => own(stream, true),
        None => FRESH_SMALL,
    }
}

/// The fresh key of the same kind of space (a retired range).
pub(super) fn fresh_like(key: u64) -> u64 {
    fresh(is_small(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let stream = StreamId(STREAM_LIMIT - 1);
        for small in [false, true] {
            let key = own(stream, small);
            assert_eq!(is_small(key), small);
            assert_eq!(stream_of(key), Some(stream));
            assert!(!is_fresh(key));
            assert_eq!(is_small(fresh(small)), small);
            assert!(is_fresh(fresh(small)));
            assert_eq!(stream_of(fresh(small)), None);
        }
        assert_eq!(inside_small(own(stream, false)), own(stream, true));
        assert_eq!(outside_small(own(stream, true)), own(stream, false));
        assert_eq!(inside_small(FRESH), FRESH_SMALL);
        assert_eq!(outside_small(FRESH_SMALL), FRESH);
        assert_eq!(fresh_like(own(StreamId(3), true)), FRESH_SMALL);
        assert!(!serves(StreamId(STREAM_LIMIT)) && serves(StreamId(0)));
    }
}
