//! Cap'n Proto segments in the arena: the allocator a message builder uses, the ref-counted
//! segment table a sent message becomes, and the reader segments over it in another process.
//!
//! This is the only capnp-aware part of `shm`. It lives here (rather than in the message layer)
//! because capnp's `Allocator` is an `unsafe` trait and reading segments in place means making
//! slices from raw pointers into shared memory: `unsafe` code is kept to `shm` and `sys`.
//!
//! # The protocol that keeps readers sound
//! * A message under construction is an [`OutMsg`]: a capnp builder whose segments are arena
//!   blocks (or, in heap mode, private heap buffers). Only its owner writes them.
//! * To send it in place, [`OutMsg::share_shm`] *freezes* it: it writes a segment table (pool,
//!   offset, generation and used bytes of each segment) into a ref-counted arena block that from
//!   then on owns the segments, and lends one reference per receiver. A one-segment message (the
//!   common small one) needs no table: its segment block itself becomes the ref-counted handle,
//!   with its tag and used length in a 16-byte prefix kept back at the start of the block (capnp
//!   never gets those bytes, and they share a cache line with the message's first words), so it
//!   costs one block, validated once on receipt. Heap mode instead
//!   hands out `Arc`s of the segment buffers ([`OutMsg::share_heap`]).
//! * Writing again ([`OutMsg::builder_mut`]) first *thaws*: if the table (or a heap buffer) is
//!   still referenced by anyone else, the message is copied into fresh segments and the shared
//!   ones are left to their readers (copy-on-write); if not, the table is dissolved (a
//!   one-segment handle becomes a private block again, and its next publication a new
//!   generation, so blobs of the old one are stale) and the builder owns its segments again. So a
//!   receiver never sees a byte change under it.
//! * The last reference to a table, dropped in any process, zeroes each segment's used prefix
//!   and frees it, then frees the table.
//!
//! # Steady state
//! A message's segments are freed **last first**, by a table as by a builder that still owns
//! them (capnp hands them back first to last; the builder frees them once the last is back).
//! The free lists are stacks, so the next message of the same shape gets each segment's own
//! block back: the pages it touches are those the segment touched last time, and a build costs
//! no page fault from the second on. (Freed first to last, a partly used last segment went to
//! a segment that fills it, and its untouched tail faulted in: about 2,000 faults in the second
//! build of a 64 MiB or 256 MiB message.) Zeroing is paid by the drop of the last reference
//! (see `alloc`): about a `memset` of what was written.
//!
//! # Where each part lives
//! * `seg_alloc`: the allocator side ([`SegAlloc`], the segment list shared with its message);
//! * `heap`: heap segments ([`HeapSeg`]) and their per-thread recycling;
//! * `table`: the shared side ([`SegTable`]: a table or a one-segment handle; adoption and
//!   release by any process; [`ShmSegments`], what a reader reads in place);
//! * `out`: the writer side ([`OutMsg`]: build, freeze to share, thaw to write again);
//! * `adopt`: a message built elsewhere ([`Adopted`]: a capnp `Builder` of any allocator) and
//!   its flat copy into an arena.

mod adopt;
mod heap;
mod out;
mod seg_alloc;
mod table;
#[cfg(test)]
mod tests;

pub use self::adopt::Adopted;
pub use self::heap::HeapSeg;
pub use self::out::OutMsg;
pub use self::seg_alloc::SegAlloc;
pub use self::table::{SegTable, ShmSegments};

// The handle layouts are part of the protocols modelled under loom.
pub use super::protocols::MAX_SEGMENTS;
use super::protocols::{ENTRY_PREFIXED, PREFIX, SOLO_TAG, TABLE_TAG, T_ENTRIES, T_ENTRY};

/// How a message's segments are sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentSizes {
    /// Words of the first segment (capnp suggests 1024 = 8 KiB).
    pub first_words: u32,
    /// Cap on the heuristic growth of later segments, in words. A single object larger than
    /// this still gets a segment of its own, sized exactly (page-rounded), so the cap bounds the
    /// over-reservation of a big message (a 1 GiB message reserves at most this much extra)
    /// without limiting object sizes.
    pub max_growth_words: u32,
}

impl Default for SegmentSizes {
    fn default() -> Self {
        SegmentSizes {
            first_words: 1024,
            max_growth_words: 2 << 20, // 16 MiB
        }
    }
}
