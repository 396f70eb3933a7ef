//! The benchmark's comparison pool: deliberately naive, as many first pools are.
//!
//! One mutex over one `Vec` of idle blocks per power-of-two class, no cap, no statistics, no
//! stream or fence handling. It runs over the same backend as gpupool, so every difference in
//! the figures comes from the pool design, not from the memory.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};

use gpupool::backend::BackendError;
use gpupool::{Backend, Block, MemoryKind};

/// One mutex, one `Vec` per power-of-two class.
pub struct NaivePool {
    backend: Arc<dyn Backend>,
    kind: MemoryKind,
    classes: Mutex<Vec<Vec<Block>>>,
}

impl NaivePool {
    /// A naive pool over `backend`, serving its default kind.
    pub fn new(backend: Arc<dyn Backend>) -> NaivePool {
        let kind = backend.kinds()[0];
        NaivePool {
            backend,
            kind,
            classes: Mutex::new((0..64).map(|_| Vec::new()).collect()),
        }
    }

    fn class(bytes: usize) -> usize {
        bytes.max(256).next_power_of_two().trailing_zeros() as usize
    }

    /// A block of at least `bytes` bytes, or the backend's refusal (a naive pool has no retry).
    pub fn allocate(&self, bytes: usize) -> Result<Block, BackendError> {
        let class = Self::class(bytes);
        if let Some(block) = self.classes.lock().unwrap()[class].pop() {
            return Ok(block);
        }
        self.backend.allocate(1 << class, self.kind)
    }

    /// Caches the block for reuse.
    pub fn free(&self, block: Block) {
        let class = Self::class(block.bytes());
        self.classes.lock().unwrap()[class].push(block);
    }
}

impl Drop for NaivePool {
    fn drop(&mut self) {
        for class in self.classes.get_mut().unwrap().drain(..) {
            for block in class {
                self.backend.release(block);
            }
        }
    }
}
