//! The shared side: the ref-counted handle a frozen message becomes (a table of segments, or a
//! one-segment block that is its own handle), its adoption and release by any process, and the
//! reader segments over it.

use std::fmt;
use std::ptr::NonNull;
use std::sync::OnceLock;

use capnp::message::ReaderSegments;

use super::super::arena::{Arena, BlockRef};
use super::super::error::{Error, Result};
use super::super::handle::LendBlob;
use super::super::layout::*;
use super::super::lockfree::{refs, ticket_issue, Words, LINK};
use super::super::pool::Pool;
use super::super::protocols::{
    self, publish_block, publish_in_place, release_message, solo_used, table_count, write_entry,
    write_solo_prefix, write_table_header, Released,
};
use super::*;
use crate::sync::Ordering;

/// The ref-counted handle of a frozen message. Dropping the last reference (in any process)
/// frees every segment (and the table).
///
/// Two kinds, told apart by the type tag of their blobs:
/// * a **table** ([`TABLE_TAG`]): a block of its own listing the segments;
/// * a **one-segment message** ([`SOLO_TAG`]): the segment block itself is the handle (its
///   header holds the count, as for any handle), and its first [`PREFIX`] bytes, which capnp
///   never got, hold the tag and the used bytes. A small message thus costs one block: no table
///   to allocate, write, validate and free.
pub struct SegTable {
    pub(super) arena: Arena,
    pub(super) pool: u32,
    /// Block offset (header), not payload.
    pub(super) off: u64,
    pub(super) generation: u32,
    /// Payload capacity of the block (fixed while a reference is held).
    pub(super) cap: u64,
    /// A one-segment message (the block is the segment).
    pub(super) solo: bool,
    /// This value holds one of the block's references, given back on drop. Cleared only by
    /// [`dissolve_if_sole`](SegTable::dissolve_if_sole), which ends the handle itself: the
    /// value then drops like any other (its `Arena` clone with it), never `forget`ten.
    pub(super) holds_ref: bool,
}

impl fmt::Debug for SegTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegTable")
            .field("pool", &self.pool)
            .field("offset", &(self.off + BLOCK_HDR))
            .field("solo", &self.solo)
            .field("refs", &self.ref_count())
            .finish()
    }
}

impl SegTable {
    /// A reference the caller holds (made, or adopted from a blob) to the handle block at `off`.
    fn held(arena: &Arena, pool: u32, off: u64, generation: u32, cap: u64, solo: bool) -> SegTable {
        SegTable {
            arena: arena.clone(),
            pool,
            off,
            generation,
            cap,
            solo,
            holds_ref: true,
        }
    }

    pub(super) fn pool(&self) -> &Pool {
        // Pools are never removed from an arena, and this one was known when the table was made.
        self.arena
            .pool(self.pool)
            .expect("a table's pool is part of its arena")
    }

    pub(super) fn payload(&self) -> u64 {
        self.off + BLOCK_HDR
    }

    /// Writes a table for `n` entries (segment, used bytes) and returns its first reference. If
    /// an entry is an error, the table is freed and the error returned.
    pub(super) fn create(
        arena: &Arena,
        n: usize,
        entries: &mut dyn Iterator<Item = Result<(BlockRef, u64)>>,
    ) -> Result<SegTable> {
        let size = T_ENTRIES as usize + n * T_ENTRY as usize;
        let (pool, g) = arena.grant(size, 0)?;
        let p = g.off + BLOCK_HDR;
        write_table_header(pool, p, n as u64);
        for i in 0..n {
            let entry = entries
                .next()
                .unwrap_or(Err(Error::Corrupt("fewer segments than counted")));
            let (r, used) = match entry {
                Ok(e) => e,
                Err(e) => {
                    let _ = pool.free_block(g.off, false);
                    return Err(e);
                }
            };
            let w0 = r.pool as u64 | (r.generation as u64) << 32;
            write_entry(pool, p, i as u64, [w0, r.offset, used]);
        }
        // Borrowable from here on; the entries written above are ordered before any borrow.
        publish_block(pool, g.off, g.generation());
        Ok(SegTable::held(
            arena,
            pool.id(),
            g.off,
            g.generation(),
            g.capacity,
            false,
        ))
    }

    /// Makes the one segment of a message its handle: writes the prefix (tag, `used`) into the
    /// `PREFIX` bytes kept back before the segment's `words` and publishes the block in place.
    /// Updates `r` to the block's new generation (see [`publish_in_place`]).
    pub(super) fn create_solo(
        arena: &Arena,
        r: &mut BlockRef,
        words: u32,
        used: u64,
    ) -> Result<SegTable> {
        let pool = arena.pool(r.pool).ok_or(Error::UnknownPool(r.pool))?;
        let off = r.offset - BLOCK_HDR;
        let cap = words as u64 * 8 + PREFIX;
        write_solo_prefix(pool, r.offset, used);
        let generation = publish_in_place(pool, off);
        r.generation = generation;
        Ok(SegTable::held(arena, r.pool, off, generation, cap, true))
    }

    /// Adds a reference for a receiver and packs it in a blob.
    pub fn lend(&self) -> LendBlob {
        ticket_issue(self.pool().word(self.off + LINK));
        LendBlob::new(
            self.arena.id() as u32,
            self.pool,
            self.payload(),
            self.generation,
            if self.solo { SOLO_TAG } else { TABLE_TAG },
        )
    }

    /// References (holders in every process plus lent blobs not yet borrowed). A snapshot.
    pub fn ref_count(&self) -> u64 {
        refs(self.pool().word(self.off + LINK).load(Ordering::Relaxed))
    }

    /// If this is the only reference anywhere, gives the segments back to the builder: a table
    /// block is freed, a one-segment handle made a private block again (its prefix cleared), and
    /// the handle ends (`Ok`). Otherwise hands `self` back unchanged (`Err`).
    pub(super) fn dissolve_if_sole(mut self) -> std::result::Result<(), SegTable> {
        // Acquire pairs with the Release of every other holder's drop: their reads of the
        // segments happen before the builder writes them again. A one-segment handle is made
        // private there; a table's block is ours to free.
        let pool = self.pool();
        if !protocols::dissolve_if_sole(pool, self.off, self.solo) {
            return Err(self);
        }
        if !self.solo {
            let _ = pool.free_block(self.off, false);
        }
        // The reference is gone with the handle; `self` (and its arena clone) drops normally.
        self.holds_ref = false;
        Ok(())
    }
}

/// A table entry's words (see [`protocols::write_entry`]) as the segment and its used bytes.
pub(super) fn entry_ref([w0, offset, used]: [u64; 3]) -> (BlockRef, u64) {
    let r = BlockRef {
        pool: w0 as u32,
        offset,
        generation: (w0 >> 32) as u32,
    };
    (r, used)
}

/// Entry `i` of the table at payload `p`.
pub(super) fn read_entry(pool: &Pool, p: u64, i: u64) -> (BlockRef, u64) {
    entry_ref(protocols::read_entry(pool, p, i))
}

/// Checks a segment's used length against the `capacity` its bytes may span: a whole number
/// of words, within it, and short enough for capnp (which counts words in a u32).
pub(super) fn check_used(pool: u32, offset: u64, used: u64, capacity: u64) -> Result<()> {
    if used > capacity || used % 8 != 0 || used / 8 > u32::MAX as u64 {
        return Err(Error::OutOfBounds {
            pool,
            offset: offset.saturating_add(used),
        });
    }
    Ok(())
}

/// A table entry's block reference without its [`ENTRY_PREFIXED`] flag, and the bytes the
/// segment starts into its block.
pub(super) fn unprefixed(r: BlockRef) -> (BlockRef, u64) {
    let skip = if r.offset & ENTRY_PREFIXED != 0 {
        PREFIX
    } else {
        0
    };
    let r = BlockRef {
        offset: r.offset & !ENTRY_PREFIXED,
        ..r
    };
    (r, skip)
}

/// Validates one segment as a table entry names it: a live block (see [`Arena::live_block`])
/// whose capacity holds `used` (a whole number of words) after the segment's prefix, if any.
/// Returns the segment's pointer.
pub(super) fn segment(arena: &Arena, r: BlockRef, used: u64) -> Result<NonNull<u8>> {
    let (r, skip) = unprefixed(r);
    let (pool, _, _, capacity) = arena.live_block(r)?;
    check_used(r.pool, r.offset, used, capacity.saturating_sub(skip))?;
    NonNull::new(pool.ptr(r.offset + skip)).ok_or(Error::Corrupt("null mapping"))
}

impl Drop for SegTable {
    fn drop(&mut self) {
        if !self.holds_ref {
            return;
        }
        let pool = self.pool();
        let p = self.payload();
        // Last reference to a table: free every segment (zeroing its used prefix) as the walk
        // hands it over, then the table. A corrupt entry is skipped (leaked) rather than freed
        // into a list it could damage.
        let released = release_message(pool, self.off, self.cap, self.solo, |entry| {
            let (r, used) = entry_ref(entry);
            let (r, skip) = unprefixed(r);
            // An entry naming the table itself (corrupt) must not free it mid-walk.
            if r.pool == self.pool && r.offset == p {
                return;
            }
            let len = used.saturating_add(skip) as usize;
            // SAFETY: this was the last reference to the table, which owns its segments (the
            // builder gave them up when the table was made: `published`), so no one else
            // holds or adopts segment `r`. A (corrupt) entry naming a block twice cannot make
            // two owners: freeing the first bumps the block's generation, so the second
            // `block_from_raw` is refused as stale; the self-reference is skipped above.
            // `block_from_raw` validates `r` and `len`.
            if let Ok(block) = unsafe { self.arena.block_from_raw(r, len) } {
                // `used` is the table's word, shared memory: it sizes the clearing, and the
                // whole block is zero afterwards whatever it says.
                block.release_claimed_prefix(len);
            }
        });
        match released {
            Released::Held => {}
            Released::LastSolo { used } => {
                // Last reference to a one-segment message (the block is the handle itself):
                // clear it and free it as clean. `used` is the prefix's word, which a peer can
                // write: it sizes the clearing, and the whole payload is zero afterwards
                // whatever it says (`Pool::free_cleared`).
                // The block's own capacity (its header's), which may exceed what the message
                // was given: a writer could have written there too.
                let cap = pool.block_at(self.off).map_or(self.cap, |(_, cap)| cap);
                pool.free_cleared(self.off, cap, PREFIX + used);
            }
            Released::LastTable => {
                let _ = pool.free_block(self.off, false);
            }
        }
    }
}

impl Arena {
    /// Adopts the reference a message blob carries (validated like any lend blob, plus its
    /// kind's tag) and validates segment 0 (each later one when it is first read).
    pub(crate) fn borrow_segments(&self, blob: &LendBlob) -> Result<ShmSegments> {
        // On error `table` drops its reference again (as the last one, it frees the message).
        let table = self.adopt_message(blob)?;
        if table.solo {
            read_solo(table)
        } else {
            read_table(table)
        }
    }

    /// The reference a message blob carries, as a table (of one segment or many) that gives it
    /// back on drop. The tag is checked where every handle has it (a mismatch leaves the
    /// reference lent, as for any borrow of the wrong type).
    pub(super) fn adopt_message(&self, blob: &LendBlob) -> Result<SegTable> {
        let (solo, min) = match blob.type_tag() {
            SOLO_TAG => (true, PREFIX),
            TABLE_TAG => (false, T_ENTRIES),
            // Neither kind of message handle (the table's tag is the one named).
            found => {
                return Err(Error::TypeMismatch {
                    expected: TABLE_TAG,
                    found,
                })
            }
        };
        // The typed adoption checks the block's own tag and capacity against the blob's kind.
        let (pool, off, cap) = self.adopt(blob, Some((blob.type_tag(), min)))?;
        Ok(SegTable::held(
            self,
            pool.id(),
            off,
            blob.generation(),
            cap,
            solo,
        ))
    }

    /// Gives back one adopted reference to the handle block at `off` (see
    /// [`Arena::release_blob`]). The block's own tag, not the blob's claim, decides how: the
    /// last reference to a message frees its segments with it (and a one-segment message's
    /// block as clean), that to any other object frees its block.
    pub(in crate::shm) fn give_back(&self, pool: &Pool, off: u64, cap: u64, generation: u32) {
        // The adopted reference keeps the block alive and its tag fixed; a tag is only trusted
        // with the capacity its kind reads.
        let solo = match pool.word(off + BLOCK_HDR).load(Ordering::Relaxed) {
            SOLO_TAG if cap >= PREFIX => true,
            TABLE_TAG if cap >= T_ENTRIES => false,
            _ => return super::super::handle::release(pool, off),
        };
        drop(SegTable::held(self, pool.id(), off, generation, cap, solo));
    }
}

/// A one-segment message's segment: its used length (peer-written: checked) from the prefix.
pub(super) fn read_solo(table: SegTable) -> Result<ShmSegments> {
    let pool = table.pool();
    let p = table.off + BLOCK_HDR;
    // The ticket's reference keeps the block alive: its prefix is ours to read.
    let used = solo_used(pool, table.payload());
    check_used(pool.id(), p + PREFIX, used, table.cap - PREFIX)?;
    let ptr = NonNull::new(pool.ptr(p + PREFIX)).ok_or(Error::Corrupt("null mapping"))?;
    Ok(ShmSegments {
        table,
        first: (ptr, used as usize),
        rest: Vec::new(),
    })
}

/// A table's segments: the entries copied out (one sequential read), segment 0 validated now.
pub(super) fn read_table(table: SegTable) -> Result<ShmSegments> {
    let pool = table.pool();
    let p = table.payload();
    let n = table_count(pool, p);
    if n == 0 || n as usize > MAX_SEGMENTS || T_ENTRIES + n * T_ENTRY > table.cap {
        return Err(Error::Corrupt(
            "segment table empty or longer than its block",
        ));
    }
    let (r0, used0) = read_entry(pool, p, 0);
    let ptr = segment(&table.arena, r0, used0)?;
    let rest = (1..n)
        .map(|i| {
            let (at, used) = read_entry(pool, p, i);
            SegSlot {
                at,
                used,
                resolved: OnceLock::new(),
            }
        })
        .collect();
    Ok(ShmSegments {
        table,
        first: (ptr, used0 as usize),
        rest,
    })
}

/// A received message's segments, read in place. Holds a table reference: the segments stay
/// allocated and unchanged (frozen) until this is dropped.
///
/// Segment 0 (where the root is) is validated on receipt; every other segment when the reader
/// first reaches it, so receiving costs the same whatever the message's size (validating the ~70
/// segments of a 1 GiB message up front touches ~70 scattered pages: a few µs of TLB misses). A
/// segment that fails validation reads as missing, which capnp reports as an error.
pub struct ShmSegments {
    pub(super) table: SegTable,
    /// Segment 0, validated: address and length (capnp asks for it on every pointer it follows
    /// there, so it is one load away).
    pub(super) first: (NonNull<u8>, usize),
    /// Segments 1.. (none for a one-segment message: no allocation).
    pub(super) rest: Vec<SegSlot>,
}

/// One table entry as received, and where it resolved to (address and length), once checked.
pub(super) struct SegSlot {
    pub(super) at: BlockRef,
    pub(super) used: u64,
    pub(super) resolved: OnceLock<Option<(NonNull<u8>, usize)>>,
}

impl ShmSegments {
    /// Validates segment `i` >= 1 (once) and returns its address and length.
    pub(super) fn resolve(&self, i: usize) -> Option<(NonNull<u8>, usize)> {
        let slot = self.rest.get(i.checked_sub(1)?)?;
        *slot.resolved.get_or_init(|| {
            segment(&self.table.arena, slot.at, slot.used)
                .ok()
                .map(|ptr| (ptr, slot.used as usize))
        })
    }

    /// Words of all segments, as the table states them (what a copy would move).
    pub fn total_words(&self) -> usize {
        self.rest.iter().fold(self.first.1 / 8, |a, s| {
            a.saturating_add((s.used / 8) as usize)
        })
    }
}

// SAFETY: the pointers are into arena mappings kept alive by `table.arena`; the bytes are frozen
// (no process writes them while a table reference exists), so reading them from any thread is
// fine; the table reference itself is released with atomics.
unsafe impl Send for ShmSegments {}
// SAFETY: `&ShmSegments` gives only shared reads of frozen bytes (as argued for Send), and the
// one piece of interior mutability, each slot's `OnceLock`, is itself thread-safe.
unsafe impl Sync for ShmSegments {}

impl fmt::Debug for ShmSegments {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShmSegments")
            .field("table", &self.table)
            .field("segments", &(self.rest.len() + 1))
            .finish()
    }
}

impl ShmSegments {
    /// The table, e.g. for its reference count.
    pub fn table(&self) -> &SegTable {
        &self.table
    }
}

impl ReaderSegments for ShmSegments {
    #[inline]
    fn get_segment(&self, idx: u32) -> Option<&[u8]> {
        let (addr, len) = if idx == 0 {
            self.first
        } else {
            self.resolve(idx as usize)?
        };
        // SAFETY: segment 0 was validated on receipt (`borrow_solo`: the handle block itself,
        // `len` within its capacity after the prefix; `borrow_table`: `segment`), later ones by
        // `segment` in `resolve`: [addr, addr+len) is inside a live block of a mapped pool
        // (allocated, of the generation recorded); the table reference we hold keeps the block
        // allocated and the mapping lives as long as `self.table.arena`; the freeze protocol
        // (module docs) guarantees no process writes it until the reference is gone, which
        // cannot happen while `&self` is borrowed. The pointer is the mapping's own (derived from
        // the pool's base pointer, never from an integer), so it carries the mapping's
        // provenance.
        Some(unsafe { std::slice::from_raw_parts(addr.as_ptr().cast_const(), len) })
    }

    fn len(&self) -> usize {
        self.rest.len() + 1
    }
}
