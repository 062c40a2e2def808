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
//!   waiting to be adopted by a borrower, so that a replayed blob cannot adopt a reference twice.
//!
//! Crash safety: every step that changes shared state is one atomic instruction, and no step
//! waits for another process. A process killed between two steps leaves at worst a block that
//! nobody will free (a leak), never a list that is cut or a lock that is held.

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

/// Bits of a tagged head that hold the block offset in 16-byte units (so offsets < 1 TiB).
pub const OFF_BITS: u32 = 36;
const OFF_MASK: u64 = (1 << OFF_BITS) - 1;

/// Packs a block offset (a multiple of 16, below 2^40; 0 means "empty") and an ABA tag.
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

/// Reference counts above this are treated as a leak of handles gone wild: we abort rather than
/// let the count wrap and free a block that is still in use (the same policy as `Arc`).
pub const RC_MAX: u64 = 1 << 62;

/// Adds one reference (clone or lend). The caller already holds one, so nothing needs ordering:
/// the new reference can only be released after it is handed over by synchronizing means.
#[inline]
pub fn rc_acquire(rc: &AtomicU64) {
    let old = rc.fetch_add(1, Ordering::Relaxed);
    if old > RC_MAX {
        std::process::abort();
    }
}

/// Drops one reference; returns `true` if it was the last one, in which case the caller frees the
/// object and every write any holder made to it happens-before that free.
#[inline]
pub fn rc_release(rc: &AtomicU64) -> bool {
    // Release: our writes to the object happen-before the decrement that the last holder sees.
    if rc.fetch_sub(1, Ordering::Release) != 1 {
        return false;
    }
    // Acquire: synchronize with every other holder's Release decrement before freeing.
    fence(Ordering::Acquire);
    true
}

/// Records one more lent reference waiting to be borrowed. Release: the object's contents as the
/// lender sees them are visible to the borrower whose [`ticket_take`] observes this ticket.
#[inline]
pub fn ticket_issue(tickets: &AtomicU64) {
    tickets.fetch_add(1, Ordering::Release);
}

/// Takes one outstanding lent reference, if any. A replayed blob finds no ticket and is refused,
/// so a reference is never adopted twice.
#[inline]
pub fn ticket_take(tickets: &AtomicU64) -> bool {
    let mut cur = tickets.load(Ordering::Acquire);
    loop {
        if cur == 0 {
            return false;
        }
        match tickets.compare_exchange_weak(cur, cur - 1, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
    }
}

/// Gives a ticket back (a borrow that took one and then failed a later check).
#[inline]
pub fn ticket_return(tickets: &AtomicU64) {
    tickets.fetch_add(1, Ordering::Relaxed);
}
