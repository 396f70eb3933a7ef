//! Size classes: which block size serves a request.
//!
//! The seed used powers of two from 256 B to 256 MiB (21 classes). Powers of two waste up to
//! half of every block (the traces show 2.9× the live bytes), so a finer geometric option
//! splits each doubling into `steps_per_doubling` equal steps (the jemalloc/tcmalloc rule):
//! with 4 steps the worst-case rounding waste falls from 50 % to 20 %. Every class size is a
//! multiple of the block alignment, so every block is aligned for any element type the pool
//! accepts.
#![forbid(unsafe_code)]

use crate::error::PoolError;

/// Every block starts on a multiple of this many bytes.
pub const BLOCK_ALIGN: usize = 256;

/// The ordered list of class sizes between a minimum and a maximum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeClasses {
    class_bytes: Vec<usize>,
    /// For each `p`, the index of the smallest class above `2^p`: a request in
    /// `(2^p, 2^(p+1)]` starts its search there and finds its class within
    /// `steps_per_doubling + 1` comparisons, with no binary search on the hit path.
    doubling_start: [u16; 64],
}

impl SizeClasses {
    /// Classes from `min_bytes` to `max_bytes` (both powers of two, `min_bytes` at least
    /// [`BLOCK_ALIGN`]) with `steps_per_doubling` geometric steps in each doubling.
    pub fn new(
        min_bytes: usize,
        max_bytes: usize,
        steps_per_doubling: usize,
    ) -> Result<Self, PoolError> {
        if !min_bytes.is_power_of_two() || min_bytes < BLOCK_ALIGN {
            return Err(PoolError::InvalidConfig(format!(
                "smallest class {min_bytes} must be a power of two of at least {BLOCK_ALIGN} bytes"
            )));
        }
        if !max_bytes.is_power_of_two() || max_bytes < min_bytes {
            return Err(PoolError::InvalidConfig(format!(
                "largest class {max_bytes} must be a power of two no smaller than the smallest ({min_bytes})"
            )));
        }
        if !(1..=64).contains(&steps_per_doubling) {
            return Err(PoolError::InvalidConfig(format!(
                "steps per doubling must be between 1 and 64, not {steps_per_doubling}"
            )));
        }
        let mut class_bytes = Vec::new();
        let mut base = min_bytes;
        while base < max_bytes {
            for step in 0..steps_per_doubling {
                let size = base + base / steps_per_doubling * step;
                let size = size.next_multiple_of(BLOCK_ALIGN);
                if class_bytes.last() != Some(&size) {
                    class_bytes.push(size);
                }
            }
            base *= 2;
        }
        class_bytes.push(max_bytes);
        let mut doubling_start = [0u16; 64];
        for (power, start) in doubling_start.iter_mut().enumerate() {
            let above = 1usize.checked_shl(power as u32).unwrap_or(usize::MAX);
            *start = class_bytes.partition_point(|&size| size <= above) as u16;
        }
        Ok(SizeClasses {
            class_bytes,
            doubling_start,
        })
    }

    /// The index of the smallest class that holds `bytes`, or `None` above the largest class.
    #[inline(always)]
    pub fn class_for(&self, bytes: usize) -> Option<usize> {
        if bytes <= self.class_bytes[0] {
            return Some(0);
        }
        // bytes >= 2: it lies in (2^power, 2^(power+1)].
        let power = (usize::BITS - 1 - (bytes - 1).leading_zeros()) as usize;
        let mut index = self.doubling_start[power] as usize;
        while index < self.class_bytes.len() && self.class_bytes[index] < bytes {
            index += 1;
        }
        (index < self.class_bytes.len()).then_some(index)
    }

    /// The block size of class `index`.
    #[inline]
    pub fn class_bytes(&self, index: usize) -> usize {
        self.class_bytes[index]
    }

    /// How many classes there are.
    pub fn len(&self) -> usize {
        self.class_bytes.len()
    }

    /// Always false: there is at least one class.
    pub fn is_empty(&self) -> bool {
        self.class_bytes.is_empty()
    }

    /// The largest pooled request.
    pub fn max_bytes(&self) -> usize {
        *self.class_bytes.last().expect("at least one class")
    }

    /// All class sizes in increasing order.
    pub fn sizes(&self) -> &[usize] {
        &self.class_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn seed() -> SizeClasses {
        SizeClasses::new(256, 256 * MIB, 1).unwrap()
    }

    #[test]
    fn seed_geometry_has_21_power_of_two_classes() {
        let classes = seed();
        assert_eq!(classes.len(), 21);
        for (index, &size) in classes.sizes().iter().enumerate() {
            assert_eq!(size, 256 << index);
        }
    }

    #[test]
    fn boundaries_map_to_the_smallest_sufficient_class() {
        let classes = seed();
        let cases = [
            (1, Some(256)),
            (255, Some(256)),
            (256, Some(256)),
            (257, Some(512)),
            (4096, Some(4096)),
            (4097, Some(8192)),
            (256 * MIB, Some(256 * MIB)),
            (256 * MIB + 1, None),
        ];
        for (request, expected) in cases {
            let got = classes
                .class_for(request)
                .map(|index| classes.class_bytes(index));
            assert_eq!(got, expected, "request {request}");
        }
    }

    #[test]
    fn every_size_maps_to_a_class_at_least_as_large_and_the_smallest_such() {
        for steps in [1, 2, 4, 8] {
            let classes = SizeClasses::new(256, 64 * MIB, steps).unwrap();
            let mut request = 1usize;
            while request <= 64 * MIB {
                for probe in [request - 1, request, request + 1, request + request / 3] {
                    if probe == 0 || probe > classes.max_bytes() {
                        continue;
                    }
                    let index = classes.class_for(probe).unwrap();
                    assert!(classes.class_bytes(index) >= probe);
                    if index > 0 {
                        assert!(classes.class_bytes(index - 1) < probe);
                    }
                }
                request *= 2;
            }
        }
    }

    #[test]
    fn finer_steps_bound_the_rounding_waste() {
        let classes = SizeClasses::new(256, 256 * MIB, 4).unwrap();
        assert!(classes.sizes().windows(2).all(|pair| pair[0] < pair[1]));
        assert!(classes.sizes().iter().all(|size| size % BLOCK_ALIGN == 0));
        for request in (1024..=16 * MIB).step_by(4099) {
            let block = classes.class_bytes(classes.class_for(request).unwrap());
            assert!(
                (block - request) as f64 / block as f64 <= 0.2,
                "{request} -> {block}"
            );
        }
    }

    #[test]
    fn invalid_geometries_are_errors() {
        assert!(SizeClasses::new(100, 1024, 1).is_err());
        assert!(SizeClasses::new(128, 1024, 1).is_err());
        assert!(SizeClasses::new(1024, 512, 1).is_err());
        assert!(SizeClasses::new(256, 1000, 1).is_err());
        assert!(SizeClasses::new(256, 1024, 0).is_err());
        assert!(SizeClasses::new(256, 1024, 65).is_err());
    }
}
