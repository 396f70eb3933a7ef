//! Which pool a request goes to and its block comes back to.
#![forbid(unsafe_code)]

/// Which pool serves a request, and takes its block back: a [`Target`], packed in one `u32`.
///
/// Packed because it travels in every allocation and buffer on the hit path: an enum of a tag
/// and a payload is written as two 4-byte stores and copied as one 8-byte load, which the CPU
/// cannot forward from the stores (measured: 6 ns more per allocate + drop pair on the EPYC
/// VM, a quarter of the hit path). Code never compares the raw value: it builds routes with
/// [`Route::class`], [`Route::large`] and [`Route::BYPASS`] and matches on [`Route::target`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Route(u32);

/// A route, unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Target {
    /// The class cache at this index of the device's caches.
    Class(u32),
    /// The large arena of this kind slot.
    Large(u32),
    /// The virtual-memory arena.
    Virtual,
    /// Straight to the backend and back.
    Bypass,
}

impl Route {
    /// Codes from here up are large-arena kind slots, then the bypass.
    const FIRST_LARGE: u32 = u32::MAX - 64;
    /// Straight to the backend and back.
    pub const BYPASS: Route = Route(u32::MAX);
    /// The virtual-memory arena.
    pub const VIRTUAL: Route = Route(u32::MAX - 1);

    /// The class cache at `index` (far below the large codes: classes × kinds is small).
    #[inline(always)]
    pub fn class(index: u32) -> Route {
        debug_assert!(index < Route::FIRST_LARGE);
        Route(index)
    }

    /// The large arena of kind slot `slot`.
    pub fn large(slot: u32) -> Route {
        debug_assert!(slot < u32::MAX - 1 - Route::FIRST_LARGE);
        Route(Route::FIRST_LARGE + slot)
    }

    /// The pool this route leads to.
    #[inline(always)]
    pub fn target(self) -> Target {
        if self.0 < Route::FIRST_LARGE {
            Target::Class(self.0)
        } else if self == Route::BYPASS {
            Target::Bypass
        } else if self == Route::VIRTUAL {
            Target::Virtual
        } else {
            Target::Large(self.0 - Route::FIRST_LARGE)
        }
    }
}
