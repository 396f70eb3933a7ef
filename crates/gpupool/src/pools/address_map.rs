//! Maps keyed by block addresses, with a hasher made for them.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes block addresses (multiples of 512) with one multiplication: SipHash's protection
/// against chosen keys is not needed for addresses the pool made itself, and its cost shows on
/// every large request. (Five lines, so no crate for it.)
#[derive(Default)]
pub(crate) struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 =
                (self.0.rotate_left(5) ^ u64::from(byte)).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = (value >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub(crate) type AddressMap<V> = HashMap<u64, V, BuildHasherDefault<AddressHasher>>;
