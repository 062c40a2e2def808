//! The protocols the arena builds on the primitives of [`lockfree`](super::lockfree), written
//! over [`Words`] so that the same code runs on a shared mapping in production and on heap memory
//! under loom (`--cfg flowipc_loom`, models in `loom-tests/segments.rs`).
//!
//! Only the steps that touch shared words and decide who owns what live here; the callers keep
//! what needs the rest of the crate (pools, errors, capnp):
//!
//! * **Publication** ([`publish_block`], [`publish_in_place`], [`unpublish_block`]): an
//!   initialized block becomes borrowable (or private again).
//! * **Adoption** ([`adopt_ticket`]): a borrower takes the reference a lend blob carries, and only
//!   then reads the block's type tag (handing the ticket back on a mismatch).
//! * **Segment tables** ([`write_entry`], [`read_entry`], [`write_solo_prefix`],
//!   [`solo_used`], [`release_message`], [`dissolve_if_sole`]): the handle a frozen message
//!   becomes, its entries, and who frees or takes back its segments.
//! * **Settling a dead holder's references** ([`settle_refs`]): the survivor of a session takes
//!   back the lends the dead peer's ledger (see `shm::ledger`) says were never adopted, and the
//!   references it says the peer held, for the caller to give back.
//! * **Validated block starts** ([`block_start`]; spans are carved by `space::carve_span`): a span's block headers and
//!   page-map entries are published together, and a validation remembers a small-class block
//!   start in a process-local cache whose hits must see what the first validation saw.

use super::layout::*;
use super::lockfree::{
    handle_word, is_live_of, is_sole, rc_release, refs, ticket_return, ticket_take, tickets, Words,
    LINK,
};
use crate::sync::{AtomicU64, Ordering};

// --- message handles: layout --------------------------------------------------------------------

/// Type tag of a segment table block (recorded like an object's, checked by borrowers).
pub const TABLE_TAG: u64 = 0x5345_4754_4142_4c31; // "SEGTABL1"
/// Payload offsets in a table block: tag, segment count, then 3 words per segment.
pub const T_TAG: u64 = 0;
/// Payload offset of a table's segment count.
pub const T_COUNT: u64 = 8;
/// Payload offset of a table's first entry.
pub const T_ENTRIES: u64 = 16;
/// Bytes per table entry: pool and generation, payload offset (and flags), used bytes.
pub const T_ENTRY: u64 = 24;
/// Type tag of a one-segment message whose segment block is its own handle ("SEGSOLO1").
pub const SOLO_TAG: u64 = 0x5345_4753_4f4c_4f31;
/// Bytes at the start of a message's first arena segment kept back from capnp for the prefix of
/// a one-segment handle: its tag (where every handle has its tag), then the used bytes of the
/// segment, which follows.
pub const PREFIX: u64 = 16;
/// Flag in a table entry's offset (payload offsets are 16-aligned, so the bit is free): the
/// segment starts [`PREFIX`] bytes into its block (a message's first segment).
pub const ENTRY_PREFIXED: u64 = 1;
/// Most segments a table may list (a 1 GiB message of small objects has about 70).
pub const MAX_SEGMENTS: usize = 1 << 16;

/// Offset within an object's payload of its type tag (written before the object is published).
pub const TAG_AT: u64 = 0;

// --- publication --------------------------------------------------------------------------------

/// Makes a freshly allocated, initialized block of generation `generation` at `off` borrowable,
/// with one reference (the caller's).
///
/// Only now may a borrow accept the block. The flag is a fast pre-check for borrowers; the
/// handle word is what counts: a borrower's ticket CAS (Acquire) reads-from the lender's
/// `ticket_issue` (Release), which follows this Release store in the lender's thread, so the
/// borrower sees everything written into the block before this call.
#[inline]
pub fn publish_block<W: Words + ?Sized>(mem: &W, off: u64, generation: u32) {
    let info_w = mem.word(off);
    let info = info_w.load(Ordering::Relaxed);
    info_w.store(info | FLAG_HANDLE, Ordering::Relaxed);
    mem.word(off + LINK)
        .store(handle_word(generation), Ordering::Release);
}

/// Makes an allocated block that its owner has filled (and that was never borrowable in its
/// present generation, or was made private again by [`unpublish_block`]) borrowable, with one
/// reference (the caller's), and returns the generation it now has.
///
/// The generation moves on (a block is republished after each thaw of the message it holds):
/// a blob of an earlier publication is stale, as it would be for a block freed and reallocated.
/// The owner alone holds the block, so plain stores suffice before the Release store that a
/// borrower's ticket CAS synchronizes with (as in [`publish_block`]).
#[inline]
pub fn publish_in_place<W: Words + ?Sized>(mem: &W, off: u64) -> u32 {
    let info_w = mem.word(off);
    let old = info_w.load(Ordering::Relaxed);
    let generation = info_generation(old).wrapping_add(1);
    info_w.store(
        info(
            info_state(old),
            info_class(old),
            (old & 0xFFFF_0000) | FLAG_HANDLE,
            generation,
        ),
        Ordering::Relaxed,
    );
    mem.word(off + LINK)
        .store(handle_word(generation), Ordering::Release);
    generation
}

/// Makes a block published with [`publish_in_place`] private again. The caller holds the only
/// reference and no ticket is outstanding (checked with an Acquire load of the handle word, so
/// every other holder's reads happened before): no one can borrow it any more (the handle word
/// no longer says LIVE), and the caller may write the block again.
#[inline]
pub fn unpublish_block<W: Words + ?Sized>(mem: &W, off: u64) {
    let info_w = mem.word(off);
    info_w.store(
        info_w.load(Ordering::Relaxed) & !FLAG_HANDLE,
        Ordering::Relaxed,
    );
    mem.word(off + LINK).store(0, Ordering::Relaxed);
}

// --- adoption -----------------------------------------------------------------------------------

/// Why [`adopt_ticket`] refused a blob (it then changed nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a published handle, not this life of the block, or no lent reference left.
    Stale,
    /// The block's type tag (or its capacity for that type) is not what the borrower expects.
    TypeMismatch {
        /// The tag the borrower expects.
        expected: u64,
        /// The tag the block holds.
        found: u64,
    },
}

/// Adopts the reference a lend blob of `generation` carries for the block at `off`, whose info
/// word (already checked to be allocated in that generation) is `info` and payload capacity
/// `capacity`; with `typed = Some((tag, need))`, the block must hold `tag` and at least `need`
/// payload bytes. On `Ok` the caller owns one reference.
///
/// Everything before the ticket CAS reads header words only (atomics, positions that are block
/// starts forever), so a stale blob racing a free and reuse of its block touches nothing of the
/// block's new life. The CAS itself checks liveness, generation and an outstanding ticket in one
/// step; only then, owning a reference (and ordered after the lend), is the payload's tag read.
/// A mismatch gives the ticket back: the lent reference stays for the right borrower.
#[inline]
pub fn adopt_ticket<W: Words + ?Sized>(
    mem: &W,
    off: u64,
    info: u64,
    capacity: u64,
    generation: u32,
    typed: Option<(u64, u64)>,
) -> Result<(), Refusal> {
    if info & FLAG_HANDLE == 0 {
        return Err(Refusal::Stale);
    }
    let link = mem.word(off + LINK);
    if !ticket_take(link, generation) {
        return Err(Refusal::Stale);
    }
    // From here the block is ours to read: the ticket's reference keeps it alive.
    if let Some((tag, need)) = typed {
        let found = mem.word(off + BLOCK_HDR + TAG_AT).load(Ordering::Relaxed);
        if capacity < need || found != tag {
            ticket_return(link);
            return Err(Refusal::TypeMismatch {
                expected: tag,
                found,
            });
        }
    }
    Ok(())
}

// --- segment tables -----------------------------------------------------------------------------

/// Writes a table's tag and segment count at payload `p` (the table is not published yet).
#[inline]
pub fn write_table_header<W: Words + ?Sized>(mem: &W, p: u64, n: u64) {
    mem.word(p + T_TAG).store(TABLE_TAG, Ordering::Relaxed);
    mem.word(p + T_COUNT).store(n, Ordering::Relaxed);
}

/// Writes entry `i` of the (unpublished) table at payload `p`: the segment's pool and
/// generation in word 0 (`pool | generation << 32`), its payload offset (with
/// [`ENTRY_PREFIXED`]) and its used bytes.
#[inline]
pub fn write_entry<W: Words + ?Sized>(mem: &W, p: u64, i: u64, entry: [u64; 3]) {
    let e = p + T_ENTRIES + i * T_ENTRY;
    for (k, w) in entry.into_iter().enumerate() {
        mem.word(e + 8 * k as u64).store(w, Ordering::Relaxed);
    }
}

/// The table's segment count (peer-written: the caller checks it).
#[inline]
pub fn table_count<W: Words + ?Sized>(mem: &W, p: u64) -> u64 {
    mem.word(p + T_COUNT).load(Ordering::Relaxed)
}

/// Entry `i` of the table at payload `p`, as [`write_entry`] wrote it. The caller holds a
/// reference (taken after the table was published), so the entries are frozen and ordered
/// before this read.
#[inline]
pub fn read_entry<W: Words + ?Sized>(mem: &W, p: u64, i: u64) -> [u64; 3] {
    let e = p + T_ENTRIES + i * T_ENTRY;
    [0, 1, 2].map(|k| mem.word(e + 8 * k).load(Ordering::Relaxed))
}

/// Writes a one-segment handle's prefix (tag, used bytes) at payload `p` (not published yet).
#[inline]
pub fn write_solo_prefix<W: Words + ?Sized>(mem: &W, p: u64, used: u64) {
    mem.word(p).store(SOLO_TAG, Ordering::Relaxed);
    mem.word(p + 8).store(used, Ordering::Relaxed);
}

/// A one-segment handle's used bytes (peer-written: the caller checks them), at payload `p`.
#[inline]
pub fn solo_used<W: Words + ?Sized>(mem: &W, p: u64) -> u64 {
    mem.word(p + 8).load(Ordering::Relaxed)
}

/// What [`release_message`] left the caller to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// Other references remain: nothing.
    Held,
    /// It was the last reference to a one-segment message: clear the prefix and the `used`
    /// bytes after it (clamped to the block), then free the block as clean.
    LastSolo {
        /// Used bytes of the segment (after the prefix), clamped to the capacity.
        used: u64,
    },
    /// It was the last reference to a table: every entry was handed to the caller's callback
    /// (to free the segment); now free the table block.
    LastTable,
}

/// Gives back one reference to the message handle at `off` (payload capacity `cap`). The last
/// reference, in any process, hands each segment entry of a table to `segment`, last entry first
/// (a corrupt count hands none: the segments leak rather than be freed wrongly) and says what is
/// left to free.
///
/// Everything any holder did with the message happens-before the callbacks ([`rc_release`]).
pub fn release_message<W: Words + ?Sized>(
    mem: &W,
    off: u64,
    cap: u64,
    solo: bool,
    mut segment: impl FnMut([u64; 3]),
) -> Released {
    if !rc_release(mem.word(off + LINK)) {
        return Released::Held;
    }
    let p = off + BLOCK_HDR;
    if solo {
        let used = solo_used(mem, p).min(cap.saturating_sub(PREFIX));
        return Released::LastSolo { used };
    }
    let n = table_count(mem, p);
    if n <= MAX_SEGMENTS as u64 && T_ENTRIES + n * T_ENTRY <= cap {
        // Last first, as a builder frees the segments it owns (see `SegAlloc`): the next message
        // of the same shape gets each segment's block back for the same segment.
        for i in (0..n).rev() {
            segment(read_entry(mem, p, i));
        }
    }
    Released::LastTable
}

/// If the caller's reference to the message handle at `off` is the only one anywhere (no other
/// holder, no lent reference waiting), ends the handle and returns `true`: a one-segment handle
/// is made a private block again (unpublished, its prefix cleared); a table's block is left for
/// the caller to free. Otherwise changes nothing.
///
/// `is_sole` Acquires: every other holder's reads of the segments happen before the builder
/// writes them again. No one can take a reference after it: that needs a lent ticket, and the
/// caller (the only one who could lend) is busy here.
#[inline]
pub fn dissolve_if_sole<W: Words + ?Sized>(mem: &W, off: u64, solo: bool) -> bool {
    if !is_sole(mem.word(off + LINK)) {
        return false;
    }
    if solo {
        unpublish_block(mem, off);
        // No longer a handle: no tag (freeing clears the prefix anyway).
        let p = off + BLOCK_HDR;
        mem.word(p).store(0, Ordering::Relaxed);
        mem.word(p + 8).store(0, Ordering::Relaxed);
    }
    true
}

// --- settling a dead holder's references --------------------------------------------------------

/// The references to give back for a holder that died (a session's peer): up to `lent` lend
/// tickets of the live object of `generation` at `off` that are still outstanding (lends that
/// no one adopted), each taken with [`ticket_take`] exactly as a borrower would take it (so a
/// borrower racing the settlement gets either the reference or a refusal, never the same one),
/// plus the `held` references the holder's ledger lists (clamped to the references held by
/// handles anywhere, a peer's ledger being peer-written). Returns how many references the caller
/// now owns: it gives each back as the last holder's drop would (the last one frees the block).
///
/// The dead holder's references keep the object alive, so nothing here can touch a block of
/// another life: tickets are taken by the generation-checked CAS, and `held` counts only while
/// the word is still the object's.
pub fn settle_refs<W: Words + ?Sized>(
    mem: &W,
    off: u64,
    generation: u32,
    lent: u64,
    held: u64,
) -> u64 {
    let link = mem.word(off + LINK);
    let mut taken = 0;
    while taken < lent && ticket_take(link, generation) {
        taken += 1;
    }
    let w = link.load(Ordering::Relaxed);
    if !is_live_of(w, generation) {
        return taken;
    }
    // Handles' references (the tickets we took are ours now, and counted in `refs`).
    let by_handles = refs(w).saturating_sub(tickets(w)).saturating_sub(taken);
    taken + held.min(by_handles)
}

// --- validated block starts ---------------------------------------------------------------------

/// Entries of a pool's process-local cache of validated block starts ([`block_start`]).
pub const KNOWN_STARTS: usize = 16;

/// Offset in a pool of the page-map entry of heap page `page`.
#[inline]
pub const fn page_entry_off(page: u64) -> u64 {
    HEADER_BYTES + page * 8
}

/// Why `block_start` refused an offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotStart {
    /// Outside the heap of the pool.
    OutOfBounds,
    /// Not 16-aligned.
    Misaligned,
    /// No block starts there (or its header disagrees with the page map).
    NotABlock,
}

/// Validates that `off` is the start of a block of a pool whose heap starts at `heap_off` and
/// which is `capacity` bytes long, and returns its info word's value and its payload capacity.
/// Reads only the page map and block headers (atomics), never user bytes, and does only
/// overflow-free arithmetic on them, whatever they hold.
///
/// A small-class block start, once validated, is remembered in `known` (process-local,
/// direct-mapped: `(offset / 16) | (class + 1) << 32`, 0 when empty): it stays one, of the same
/// class, for the pool's life (spans are never freed, see `lockfree`), so the next validation of
/// it (the same blocks come back, message after message) reads its header alone, not the page
/// map too.
#[inline]
pub fn block_start<W: Words + ?Sized>(
    mem: &W,
    known: &[AtomicU64; KNOWN_STARTS],
    heap_off: u64,
    capacity: u64,
    off: u64,
) -> Result<(u64, u64), NotStart> {
    if off < heap_off || off >= capacity - BLOCK_HDR {
        return Err(NotStart::OutOfBounds);
    }
    if off % 16 != 0 {
        return Err(NotStart::Misaligned);
    }
    let slot = &known[(off >> 4) as usize % KNOWN_STARTS];
    // Acquire pairs with the Release store below: a thread that finds the entry another thread
    // filled is ordered after the header reads that vouched for it.
    let cached = slot.load(Ordering::Acquire);
    if cached as u32 as u64 == off >> 4 && cached >> 32 != 0 {
        let c = ((cached >> 32) - 1) as usize % NUM_CLASSES;
        // Acquire, as below: this process saw the header that made `off` a block start (when it
        // validated it), and later header values are read from the word itself.
        let info = mem.word(off).load(Ordering::Acquire);
        if info_class(info) != c as u64 {
            return Err(NotStart::NotABlock);
        }
        return Ok((info, CLASS_SIZES[c] as u64 - BLOCK_HDR));
    }
    let heap_pages = (capacity - heap_off) / PAGE;
    let rel = off - heap_off;
    let page = rel / PAGE;
    // Acquire pairs with the Release stores of `space::carve_span` (and of a large allocation): the
    // block headers those wrote before publishing the entry are visible.
    let e = mem.word(page_entry_off(page)).load(Ordering::Acquire);
    let (class, payload) = match pm_kind(e) {
        PM_SMALL => {
            let (c, idx) = (pm_class(e) as usize, pm_value(e));
            if c >= NUM_CLASSES || idx > page {
                return Err(NotStart::NotABlock);
            }
            let at = rel - (page - idx) * PAGE;
            if !is_block_start(c, at) {
                return Err(NotStart::NotABlock);
            }
            (c as u64, CLASS_SIZES[c] as u64 - BLOCK_HDR)
        }
        PM_LARGE => {
            let pages = pm_value(e);
            if rel % PAGE != 0 || pages == 0 || pages > heap_pages - page {
                return Err(NotStart::NotABlock);
            }
            (CLASS_LARGE, pages * PAGE - BLOCK_HDR)
        }
        _ => return Err(NotStart::NotABlock),
    };
    let info = mem.word(off).load(Ordering::Acquire);
    if info_class(info) != class {
        return Err(NotStart::NotABlock);
    }
    if class != CLASS_LARGE {
        // `off >> 4` fits 32 bits: pools are at most 2^36 bytes.
        slot.store((off >> 4) | (class + 1) << 32, Ordering::Release);
    }
    Ok((info, payload))
}
