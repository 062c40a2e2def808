//! [`Block`], the owned allocation an arena hands out, and [`BlockRef`], where a block lives
//! in every process.

use std::fmt;

use super::super::alloc::Grant;
use super::super::layout::BLOCK_HDR;
use super::super::pool::Pool;

/// Where a block lives: pool id and payload offset in that pool, plus the generation of this
/// life of the block. The same in every process, whatever address each maps the pool at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockRef {
    /// Pool id.
    pub pool: u32,
    /// Byte offset of the payload within the pool.
    pub offset: u64,
    /// Generation of the block (changes every time the block is freed).
    pub generation: u32,
}

/// A block of an arena, owned by this process: freed when dropped (unless handed on with
/// [`Block::into_raw`]). Dereferences to its bytes.
pub struct Block<'a> {
    pub(super) pool: &'a Pool,
    pub(super) grant: Grant,
    pub(super) len: usize,
}

impl fmt::Debug for Block<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Block")
            .field("at", &self.block_ref())
            .field("len", &self.len)
            .finish()
    }
}

impl<'a> Block<'a> {
    /// Requested length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the requested length is 0.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Usable bytes of the block (at least [`len`](Block::len): the size class or page-rounded
    /// extent, less the header).
    pub fn capacity(&self) -> usize {
        self.grant.capacity as usize
    }

    /// Where the block lives, valid in every process of the arena.
    pub fn block_ref(&self) -> BlockRef {
        BlockRef {
            pool: self.pool.id(),
            offset: self.grant.off + BLOCK_HDR,
            generation: self.grant.generation(),
        }
    }

    /// Pointer to the first byte (16-byte aligned), valid while the block lives.
    pub fn as_ptr(&self) -> *const u8 {
        self.pool.ptr(self.grant.off + BLOCK_HDR)
    }

    /// Mutable pointer to the first byte (16-byte aligned), valid while the block lives.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.pool.ptr(self.grant.off + BLOCK_HDR)
    }

    /// The block's `len` bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the payload [off+16, off+16+len) lies inside the mapping (len <= capacity,
        // checked at allocation or in block_from_raw) which lives as long as 'a. The block is
        // owned by this `Block` alone (popped off a free list, or adopted once through the
        // unsafe `block_from_raw`), so no one writes it while we hand out `&`. Bytes are plain
        // u8: any value is valid.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The block's `len` bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.len) }
    }

    /// Gives up ownership without freeing: the block stays allocated until some process adopts
    /// it with [`Arena::block_from_raw`](super::Arena::block_from_raw) and drops it (or until the arena's pools go away).
    pub fn into_raw(self) -> BlockRef {
        let r = self.block_ref();
        std::mem::forget(self);
        r
    }

    /// Frees the block, promising that only its first `written` bytes may be non-zero: those are
    /// cleared now, and the block is then known clean, so the next zeroed allocation of it costs
    /// nothing. This is how a capnp segment (which reports the words it used) is recycled cheaply.
    ///
    /// # Safety
    /// Every byte of the block's capacity at or after `written` must be zero. A false promise
    /// hands a later [`Arena::alloc_zeroed`](super::Arena::alloc_zeroed) dirty memory.
    pub unsafe fn release_zeroed_prefix(self, written: usize) {
        let written = (written as u64).min(self.grant.capacity);
        self.pool.zero(self.grant.off + BLOCK_HDR, written);
        let (pool, off) = (self.pool, self.grant.off);
        std::mem::forget(self);
        // An error means a peer scribbled on the header: the block is leaked, not freed.
        let _ = pool.free_block(off, true);
    }
}

impl Block<'_> {
    /// Frees the block as clean, after making its whole payload zero, when only its first
    /// `claimed` bytes should be non-zero by a word a peer could have falsified (a message's
    /// segment table): the claim makes the clearing cheap, not correct (see
    /// `Pool::free_cleared`). Unlike [`release_zeroed_prefix`](Self::release_zeroed_prefix),
    /// it promises nothing.
    pub(crate) fn release_claimed_prefix(self, claimed: usize) {
        let (pool, off, cap) = (self.pool, self.grant.off, self.grant.capacity);
        std::mem::forget(self);
        pool.free_cleared(off, cap, claimed as u64);
    }
}

impl Drop for Block<'_> {
    #[inline]
    fn drop(&mut self) {
        // An error means a peer scribbled on the header: the block is leaked, not freed into a
        // list it could corrupt. A drop has no one to report it to.
        let _ = self.pool.free_block(self.grant.off, false);
    }
}
