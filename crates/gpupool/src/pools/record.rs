//! The record of a block as it moves between the pools and its owners, and an idle block:
//! a record with what still holds it back from reuse.
#![forbid(unsafe_code)]

use crate::backend::Block;
use crate::pools::pending::Pending;

/// A block and the pool it belongs to. Boxed once, when the block comes from the backend, so
/// cache and buffer pass one pointer back and forth and the hit path never reads the record.
///
/// The pools only move records; what `owner` is, is the router's business (it is the router
/// itself, `Arc<PoolManager>`): being generic over it keeps this layer free of any import from
/// the layer above, at no cost on the hit path.
pub(crate) struct BlockRecord<O> {
    pub block: Block,
    /// Keeps the pool alive for as long as the block is owned or cached. The reference moves
    /// with the record between cache and buffer, so the hit path never touches a reference
    /// count. (Cached records form a cycle with the pool; the last manager handle breaks it by
    /// turning pooling off, which empties every cache.)
    pub owner: Option<O>,
    /// A class block carved out of the virtual-memory arena's pages: it goes back to the
    /// arena, not to the backend, when its class lets it go.
    pub carved: bool,
}

impl<O> BlockRecord<O> {
    /// A fresh record for a block just allocated.
    pub fn boxed(block: Block, owner: Option<O>) -> Box<BlockRecord<O>> {
        Box::new(BlockRecord {
            block,
            owner,
            carved: false,
        })
    }
}

/// A cached block: its record, what still holds it back, and when it went idle. The
/// reuse checks read these fields from the cache's own vector, not through the record.
pub(crate) struct IdleBlock<O> {
    pub record: Box<BlockRecord<O>>,
    pub pending: Pending,
    /// The maintenance epoch in which the block was last dropped.
    pub epoch: u64,
}

impl<O> IdleBlock<O> {
    pub fn new(record: Box<BlockRecord<O>>, pending: Pending, epoch: u64) -> IdleBlock<O> {
        IdleBlock {
            record,
            pending,
            epoch,
        }
    }

    /// The block, for release.
    pub fn into_block(self) -> Block {
        self.record.block
    }
}

impl<O> std::ops::Deref for IdleBlock<O> {
    type Target = BlockRecord<O>;
    fn deref(&self) -> &BlockRecord<O> {
        &self.record
    }
}

impl<O> std::ops::DerefMut for IdleBlock<O> {
    fn deref_mut(&mut self) -> &mut BlockRecord<O> {
        &mut self.record
    }
}
