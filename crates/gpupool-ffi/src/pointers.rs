//! The pointer map: from the address C holds to the buffer that owns it.
//!
//! C frees by address, the library by dropping a `PooledBuffer`; the map keeps each live buffer
//! under its device address until `gpupool_free` takes it out and drops it. It is split into
//! [`SHARDS`] shards, each a `Mutex<HashMap>`, picked by a hash of the address, so threads that
//! allocate and free at once rarely meet on one lock; an insert or a removal is one lock and one
//! hash-map operation (tens of nanoseconds), whatever the number of live pointers.
//!
//! Why not a concurrent map crate (dashmap, a crossbeam skip list): a sharded mutex map is all
//! that this access pattern needs (single-key insert and remove, no iteration on the hot path),
//! it is a few lines, and it keeps the shared library free of another dependency.
//!
//! The hash: device addresses are multiples of 256 (large blocks of 2 MiB), so their low bits
//! are all zero; the SplitMix64 finaliser mixes every bit into every bit, the shard comes from
//! its low bits and the hash map gets it rotated by 32, so the hash map's own bucket and tag
//! bits are independent of the shard's.
//!
//! Double frees: a removal that finds nothing looks the address up among the addresses freed
//! recently (a set per shard, forgotten when it passes [`FREED_REMEMBERED`] entries, and an
//! address leaves it when it is handed out again). Found there, it is a double free; otherwise
//! an unknown pointer. Either way nothing else happens: no buffer is touched.
#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Mutex;

use gpupool::PooledBuffer;

use crate::boundary::lock;

/// Shards of the map (a power of two).
pub(crate) const SHARDS: usize = 64;
/// Freed addresses remembered per shard to tell a double free from an unknown pointer.
pub(crate) const FREED_REMEMBERED: usize = 4096;

/// A live allocation handed to C.
#[derive(Debug)]
pub struct Entry {
    /// The buffer; dropping it gives the block back to the pool.
    pub buffer: PooledBuffer<u8>,
    /// The trace recording and id this allocation was recorded under, if any.
    pub trace: Option<TraceTag>,
}

/// Which recording an allocation's `a` line went to, so its `f` line goes to the same file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceTag {
    /// The recording (each `gpupool_record_trace_start` begins a new one).
    pub session: u64,
    /// The allocation's id in that trace.
    pub id: u64,
}

/// What a removal found.
#[derive(Debug)]
pub enum Removal {
    /// The live allocation, now out of the map.
    Live(Entry),
    /// The address was freed before and not handed out since.
    DoubleFree,
    /// The address is not one this map handed out (or was forgotten long ago).
    Unknown,
}

/// SplitMix64's finaliser: every input bit affects every output bit.
fn mix(address: u64) -> u64 {
    let mut value = address;
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

/// Hashes an address key for the shard's hash map (see the module documentation).
#[derive(Default)]
pub struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        mix(self.0).rotate_left(32)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; this keeps any other key correct, if slow.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

type AddressBuild = BuildHasherDefault<AddressHasher>;

#[derive(Default)]
struct Shard {
    live: HashMap<u64, Entry, AddressBuild>,
    freed: HashSet<u64, AddressBuild>,
}

/// Live allocations by address; see the module documentation.
pub struct PointerMap {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for PointerMap {
    fn default() -> Self {
        PointerMap {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl PointerMap {
    fn shard(&self, address: u64) -> &Mutex<Shard> {
        &self.shards[mix(address) as usize & (SHARDS - 1)]
    }

    /// Records a live allocation. Returns the entry back if the address is already live, which
    /// would mean the pool handed out one block twice (a bug the caller reports).
    pub fn insert(&self, address: u64, entry: Entry) -> Result<(), Entry> {
        let mut shard = lock(self.shard(address));
        if shard.live.contains_key(&address) {
            return Err(entry);
        }
        shard.freed.remove(&address);
        shard.live.insert(address, entry);
        Ok(())
    }

    /// Takes the allocation at `address` out of the map.
    pub fn remove(&self, address: u64) -> Removal {
        let mut shard = lock(self.shard(address));
        match shard.live.remove(&address) {
            Some(entry) => {
                if shard.freed.len() >= FREED_REMEMBERED {
                    shard.freed.clear();
                }
                shard.freed.insert(address);
                Removal::Live(entry)
            }
            None if shard.freed.contains(&address) => Removal::DoubleFree,
            None => Removal::Unknown,
        }
    }

    /// Runs `change` on the live allocation at `address`; `None` if there is none.
    pub fn with_entry<T>(&self, address: u64, change: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        lock(self.shard(address)).live.get_mut(&address).map(change)
    }

    /// The number of live allocations (a sum over shards, each locked in turn).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).live.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use gpupool::backend::host::HostBackend;
    use gpupool::MemoryManager;

    use super::*;

    fn entry(manager: &MemoryManager) -> (u64, Entry) {
        let buffer = manager.allocate_bytes(256).unwrap();
        let address = buffer.device_address();
        (
            address,
            Entry {
                buffer,
                trace: None,
            },
        )
    }

    #[test]
    fn removal_tells_double_frees_from_unknown_pointers() {
        let manager = MemoryManager::new(HostBackend::new());
        let map = PointerMap::default();
        let (address, live) = entry(&manager);
        map.insert(address, live).unwrap();
        assert_eq!(map.len(), 1);
        assert!(matches!(map.remove(address), Removal::Live(_)));
        assert!(matches!(map.remove(address), Removal::DoubleFree));
        assert!(matches!(map.remove(address + 256), Removal::Unknown));
        assert_eq!(map.len(), 0);
    }

    #[test]
    fn an_address_handed_out_again_is_live_again() {
        let manager = MemoryManager::new(HostBackend::new());
        let map = PointerMap::default();
        let (address, live) = entry(&manager);
        map.insert(address, live).unwrap();
        let Removal::Live(first) = map.remove(address) else {
            panic!("live")
        };
        drop(first);
        let (again, live) = entry(&manager);
        assert_eq!(again, address, "the cached block comes back");
        map.insert(again, live).unwrap();
        assert!(matches!(map.remove(address), Removal::Live(_)));
    }

    #[test]
    fn inserting_a_live_address_twice_is_refused() {
        let manager = MemoryManager::new(HostBackend::new());
        let map = PointerMap::default();
        let (address, live) = entry(&manager);
        map.insert(address, live).unwrap();
        let (_, other) = entry(&manager);
        assert!(map.insert(address, other).is_err());
    }

    #[test]
    fn aligned_addresses_spread_over_shards() {
        let mut used = HashSet::new();
        for index in 0..1024u64 {
            used.insert(mix(0x7f00_0000_0000 + (index << 21)) as usize & (SHARDS - 1));
        }
        assert_eq!(used.len(), SHARDS);
    }
}
