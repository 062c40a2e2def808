//! The lock-free algorithms of the arena, written over [`Words`] so that the same code runs on a
//! shared mapping in production and on heap memory under loom (`--cfg flowipc_loom`).
//!
//! Three algorithms live here, and nothing else does:
//!
//! * **Tagged Treiber stack** ([`push`], [`push_chain`], [`pop`]): the free lists of every size
//!   class and of large extents. The head is one 64-bit word: the block offset (in 16-byte units)
//!   in the low [`OFF_BITS`] bits and an ABA tag in the rest. Every successful CAS on a head bumps
//!   the tag, so a pop that read `head = X, next = Y` cannot succeed after `X` was popped, reused
//!   and pushed again in the meantime. The `next` link lives in the block *header* (word
//!   [`LINK`]), which is only ever accessed atomically, so a stale pop that reads the link of a
//!   block someone else now owns reads an atomic word, not user data: no data race.
//! * **Reference count** ([`rc_acquire`], [`rc_release`]): `Arc`'s protocol on a counter in
//!   shared memory. The last release, in any thread of any process, observes every write made by
//!   the other holders before it frees the block.
//! * **Lend tickets** ([`ticket_issue`], [`ticket_take`]): how many lent references are still
//!   waiting to be adopted by a borrower, kept in the same word as the count, the liveness bit
//!   and the generation (see [`handle_word`]), so that a stale or replayed blob is refused
//!   atomically and never adopts a reference that was not lent.
//!
//! The invariant all of this rests on: **a header word stays a header word.** Once a position is
//! a block start it stays one for the life of the pool (spans are never returned to the page
//! allocator and extents are never coalesced), so a thread holding a stale offset only ever
//! touches atomic header words, never a payload someone writes non-atomically. Coalescing, if it
//! is ever added, must keep this.
//!
//! ABA: tags are [`64 - OFF_BITS`](OFF_BITS) = 32 bits. A pop that stalls between reading the
//! head and its CAS could be fooled only if exactly a multiple of 2^32 operations hit the same
//! list meanwhile (over a minute of nothing else at full speed) *and* the list came back to the
//! same head; even then the allocator's check of the block's state reports the double hand-out
//! as corruption.
//!
//! Crash safety: every step that changes shared state is one atomic instruction, and no step
//! waits for another process. A process killed between two steps leaves at worst a block that
//! nobody will free (a leak), never a list that is cut or a lock that is held. The references a
//! session's client held when it died are given back by the server from the client's ledger
//! (see `shm::ledger`).

use crate::sync::{fence, AtomicU64, Ordering};

/// Word-addressed shared memory: the atomic 64-bit word at byte offset `off`.
///
/// Implementors guarantee that every offset the algorithms of this module are handed (block
/// offsets and `off + LINK`) maps to a live `AtomicU64` for as long as `self` is borrowed.
pub trait Words {
    /// The atomic word at byte offset `off` (a multiple of 8).
    fn word(&self, off: u64) -> &AtomicU64;
}

/// Byte offset, within a block header, of the link word: the next block while the block is on a
/// free list; the reference count while it is an allocated ref-counted object.
pub const LINK: u64 = 8;

/// Bits of a tagged head that hold the block offset in 16-byte units (so offsets < 64 GiB).
pub const OFF_BITS: u32 = 32;
const OFF_MASK: u64 = (1 << OFF_BITS) - 1;

/// Packs a block offset (a multiple of 16, below 2^36; 0 means "empty") and an ABA tag.
///
/// Other values are truncated rather than refused: a pop that lost a race may read garbage as
/// `next` (the link word of a block someone else now owns), and packs it only for a CAS that is
/// bound to fail.
#[inline]
pub fn pack(off: u64, tag: u64) -> u64 {
    (tag << OFF_BITS) | ((off >> 4) & OFF_MASK)
}

/// The block offset of a tagged head (0 when the list is empty).
#[inline]
pub fn head_off(head: u64) -> u64 {
    (head & OFF_MASK) << 4
}

/// The ABA tag of a tagged head.
#[inline]
pub fn head_tag(head: u64) -> u64 {
    head >> OFF_BITS
}

#[inline]
fn next_tag(head: u64) -> u64 {
    head_tag(head).wrapping_add(1)
}

/// Pushes the block at `off` onto the list whose tagged head is `head`.
///
/// The caller owns the block; after this call it does not. Everything the caller wrote before the
/// push (header and payload) happens-before whatever the popping thread does with the block.
#[inline]
pub fn push<W: Words + ?Sized>(mem: &W, head: &AtomicU64, off: u64) {
    push_chain(mem, head, off, off);
}

/// Pushes a chain of blocks, already linked `first -> ... -> last` through their link words, with
/// a single CAS. The caller owns every block of the chain.
#[inline]
pub fn push_chain<W: Words + ?Sized>(mem: &W, head: &AtomicU64, first: u64, last: u64) {
    debug_assert!(first != 0 && first % 16 == 0 && (first >> 4) <= OFF_MASK);
    let link = mem.word(last + LINK);
    let mut cur = head.load(Ordering::Relaxed);
    loop {
        // The link is ours until the CAS publishes it; the Release CAS below orders this store
        // (and all earlier writes to the chain) before any pop that Acquires the new head.
        link.store(head_off(cur), Ordering::Relaxed);
        match head.compare_exchange_weak(
            cur,
            pack(first, next_tag(cur)),
            Ordering::Release,
            Ordering::Relaxed,
        ) {
            Ok(_) => return,
            Err(now) => cur = now,
        }
    }
}

/// Pops a block off the list whose tagged head is `head`; the caller then owns it.
#[inline]
pub fn pop<W: Words + ?Sized>(mem: &W, head: &AtomicU64) -> Option<u64> {
    let mut cur = head.load(Ordering::Acquire);
    loop {
        let off = head_off(cur);
        if off == 0 {
            return None;
        }
        // Acquire on the head load synchronizes with the Release CAS that installed `off`, so
        // the link we read is the one its pusher wrote. If `off` has since been popped by someone
        // else, this reads whatever they keep in the word (an atomic word in a header, so no data
        // race), and the CAS below fails because the tag moved on.
        let next = mem.word(off + LINK).load(Ordering::Relaxed);
        match head.compare_exchange_weak(
            cur,
            pack(next, next_tag(cur)),
            Ordering::Acquire,
            Ordering::Acquire,
        ) {
            Ok(_) => return Some(off),
            Err(now) => cur = now,
        }
    }
}

/// The link word of a live ref-counted object ("handle word"):
///
/// ```text
/// bit 63      62..48          47..32    31..0
/// LIVE        generation      tickets   references
///             (low 15 bits)
/// ```
///
/// Liveness, generation, outstanding lend tickets and the reference count share one word so that
/// a borrower checks "this is still the object the blob was made for" and takes its ticket in a
/// single CAS: a blob replayed after the object died can never touch a word of the block's next
/// life (the link word of a free block is a free-list offset, which never has bit 63 set).
/// Tickets are counted in the references too (a lent, not yet borrowed reference keeps the
/// object alive), so the last release always finds no ticket left.
pub const LIVE: u64 = 1 << 63;
const GEN_SHIFT: u32 = 48;
const GEN_MASK: u64 = 0x7FFF;
const TICKET_ONE: u64 = 1 << 32;
const TICKET_MASK: u64 = 0xFFFF << 32;
const RC_MASK: u64 = 0xFFFF_FFFF;
/// Most references (or outstanding tickets) before we abort rather than overflow into the next
/// field, like `Arc` does on overflow.
pub const RC_MAX: u64 = RC_MASK / 2;
const TICKETS_MAX: u64 = 0xFFFF / 2;

/// The handle word of a new object of generation `generation`: live, one reference, no ticket.
#[inline]
pub fn handle_word(generation: u32) -> u64 {
    LIVE | ((generation as u64 & GEN_MASK) << GEN_SHIFT) | 1
}

/// Whether a handle word is that of the live object of `generation` (as a blob of that
/// generation names it).
#[inline]
pub fn is_live_of(word: u64, generation: u32) -> bool {
    word & (LIVE | (GEN_MASK << GEN_SHIFT)) == LIVE | ((generation as u64 & GEN_MASK) << GEN_SHIFT)
}

/// References held (handles plus unborrowed lends) in a handle word.
#[inline]
pub fn refs(word: u64) -> u64 {
    word & RC_MASK
}

/// Outstanding lend tickets in a handle word.
#[inline]
pub fn tickets(word: u64) -> u64 {
    (word & TICKET_MASK) >> 32
}

/// Adds one reference (a clone). The caller already holds one, so nothing needs ordering: the
/// new reference can only be released after it is handed over by synchronizing means.
#[inline]
pub fn rc_acquire(word: &AtomicU64) {
    let old = word.fetch_add(1, Ordering::Relaxed);
    if refs(old) >= RC_MAX {
        std::process::abort();
    }
}

/// Drops one reference; returns `true` if it was the last one, in which case the caller frees the
/// object and every write any holder made to it happens-before that free.
#[inline]
pub fn rc_release(word: &AtomicU64) -> bool {
    // Release: our writes to the object happen-before the decrement that the last holder sees.
    if refs(word.fetch_sub(1, Ordering::Release)) != 1 {
        return false;
    }
    // Acquire: synchronize with every other holder's Release decrement before freeing.
    fence(Ordering::Acquire);
    true
}

/// Lends: adds one reference and one ticket for it, in one step. Release: the object's contents
/// as the lender sees them are visible to the borrower whose [`ticket_take`] observes this.
#[inline]
pub fn ticket_issue(word: &AtomicU64) {
    let old = word.fetch_add(TICKET_ONE | 1, Ordering::Release);
    if refs(old) >= RC_MAX || tickets(old) >= TICKETS_MAX {
        std::process::abort();
    }
}

/// Whether the caller's reference is the only one anywhere: no other holder in any process and
/// no lent reference waiting to be borrowed. Then no one else can reach the object, and the
/// caller may write it (or hand its memory back). Acquire: every other holder's reads happened
/// before its `Release` decrement, which this load synchronizes with, so they all happen before
/// whatever the caller writes next.
#[inline]
pub fn is_sole(word: &AtomicU64) -> bool {
    let w = word.load(Ordering::Acquire);
    refs(w) == 1 && tickets(w) == 0
}

/// Borrows: if the word is still the live object of `generation` and a ticket is outstanding,
/// takes the ticket (its reference becomes the caller's). Otherwise (the object died, the block
/// was reused, or every lent reference was already borrowed: a replay) changes nothing.
///
/// Tickets are per object, not per blob: with two lends outstanding, the same blob bytes can be
/// borrowed twice (the blobs are identical), and the third attempt is refused.
#[inline]
pub fn ticket_take(word: &AtomicU64, generation: u32) -> bool {
    let mut cur = word.load(Ordering::Acquire);
    loop {
        if !is_live_of(cur, generation) || tickets(cur) == 0 {
            return false;
        }
        match word.compare_exchange_weak(
            cur,
            cur - TICKET_ONE,
            Ordering::Acquire,
            Ordering::Acquire,
        ) {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
    }
}

/// Gives a taken ticket back (a borrow that took one and then failed a later check). The caller
/// holds the ticket's reference, so the object is alive.
#[inline]
pub fn ticket_return(word: &AtomicU64) {
    word.fetch_add(TICKET_ONE, Ordering::Relaxed);
}
