//! The protocol of the thread-cache slots (see `tcache`), written over [`Words`] and two small
//! traits ([`SlotPool`], [`SlotLocks`]) so that the same code runs on a shared mapping with kernel
//! locks in production and on heap memory with a modelled lock under loom (`--cfg flowipc_loom`,
//! `loom-tests/tcache.rs`).
//!
//! A slot is owned by the one thread that holds its lock, from its claim ([`take_over`], in
//! [`claim`]) to its hand-back ([`release`]), or, if its process dies first, until the kernel
//! drops the lock and a reclaimer ([`claim`], [`reclaim_dead`]) takes it over and [`drain`]s it.
//! The owner alone touches the slot's private lists ([`cache_push`], [`cache_pop`]) and counters
//! ([`bump`]), with plain loads and stores.
//!
//! The atomics and what they synchronize:
//! * `owner`: written only with the slot's lock held (a claim's CAS, a release's store of 0). It
//!   names the owning *process*; the lock, not this word, tells a live owner from a dead one.
//!   The lock alone orders one owner's accesses to the slot before the next owner's: the
//!   `Acquire`/`AcqRel`/`Release` on `owner` are not needed for that (and the claim's CAS is a
//!   second guard, see [`take_over`]). Threads of one process share a lock (an OFD lock never
//!   conflicts with its own description): among them, the owner token (a slot of our own process
//!   is skipped) and the caller's mutex (`Pool::slot_mutex`) keep claims apart.
//! * A slot's private list heads, the link words of the blocks on them and its counters: plain
//!   `Relaxed` loads and stores by the owner, ordered before the next owner (or reclaimer) by
//!   the lock; a reclaimer's [`drain`] publishes the blocks to the shared lists with
//!   [`push_chain`]'s `Release` CAS, which a later `pop` acquires.
//! * The base counters: `Relaxed` read-modify-writes (statistics; nothing is ordered by them).

use super::lockfree::{push_chain, Words, LINK};
use crate::sync::{AtomicU64, Ordering};

/// Usage counters: bytes and blocks in use (wrapping: counts added through one slot may be
/// subtracted through another, so a single slot's values can be "negative").
#[derive(Debug)]
#[repr(C)]
pub struct Counters {
    /// Bytes in use.
    pub bytes: AtomicU64,
    /// Blocks in use.
    pub blocks: AtomicU64,
}

/// A thread-cache slot with `C` size classes: claimed by one thread of one process at a time,
/// which alone writes it (plain atomic loads and stores, no read-modify-write on the hot path).
#[derive(Debug)]
#[repr(C)]
pub struct Slot<const C: usize> {
    /// Process token of the owner, 0 when free. Liveness comes from the slot's lock, not this.
    pub owner: AtomicU64,
    /// Large extents in use, as counted by the owning thread.
    pub large: Counters,
    /// Per class, the private list and the count, side by side: an allocation or a free
    /// touches one cache line of the slot.
    pub classes: [SlotClass; C],
}

/// A slot's state for one size class.
#[derive(Debug)]
#[repr(C)]
pub struct SlotClass {
    /// Private free list: plain block offsets chained through link words.
    pub head: AtomicU64,
    /// Small blocks of the class in use, as counted by the owning thread (wrapping: a block
    /// allocated through one slot may be freed through another). One counter per operation.
    pub in_use: AtomicU64,
}

/// A pool as the slot protocol sees it: words, slots, the shared lists and the base counters.
pub trait SlotPool<const C: usize>: Words {
    /// Slot `i` (below the pool's slot count).
    fn cache_slot(&self, i: u32) -> &Slot<C>;
    /// The tagged head of class `c`'s shared free list.
    fn shared_list(&self, c: usize) -> &AtomicU64;
    /// Usage counted outside the slots, and folded in from released slots.
    fn base_counters(&self) -> &Counters;
    /// Bytes of a block of class `c` (for the usage counters).
    fn class_bytes(&self, c: usize) -> u64;
    /// Most blocks of class `c` a private list holds.
    fn list_cap(&self, c: usize) -> u16;
    /// Whether `off` looks like a free block of class `c` (a cache entry worth trusting).
    fn valid_cached(&self, off: u64, c: usize) -> bool;
}

/// The slots' locks, one per slot, as seen by one lock owner. In production: an OFD lock on byte
/// `i` of the pool's file, through this process's own open file description of it, which the
/// kernel drops when the description is closed (and so when the process dies).
///
/// What the protocol assumes of them (and the loom models give their model lock): a lock is held
/// by at most one owner at a time; taking it is at least an `Acquire` and dropping it at least a
/// `Release` (the kernel's own locking of the lock list provides both), so everything one holder
/// did happens-before what the next holder does; the lock of a process that dies is dropped,
/// after everything the process did; a failed attempt orders nothing; and an owner that already
/// holds a lock takes it again (an OFD lock does not conflict with its own description).
pub trait SlotLocks {
    /// Tries to take slot `i`'s lock; `false` if another owner holds it.
    fn try_lock(&self, i: u32) -> bool;
    /// Drops slot `i`'s lock (nothing if this owner does not hold it).
    fn unlock(&self, i: u32);
}

/// Takes slot `i` over if nobody alive holds it: a free slot (if `free_too`) or one whose owner
/// process is gone. Returns the previous owner token (0: it was free). On success the slot is
/// `token`'s and its lock held through `locks`. The caller keeps threads sharing `locks` apart
/// (they do not exclude each other through it): slots owned by `token` are skipped.
#[inline]
pub fn take_over<const C: usize, P, L>(
    pool: &P,
    locks: &L,
    i: u32,
    token: u64,
    free_too: bool,
) -> Option<u64>
where
    P: SlotPool<C> + ?Sized,
    L: SlotLocks + ?Sized,
{
    let slot = pool.cache_slot(i);
    let owner = slot.owner.load(Ordering::Acquire);
    if owner == token || (owner == 0 && !free_too) {
        return None;
    }
    // The lock is free for a free slot and for one whose owner died; a live owner holds it.
    // (Another process may be claiming this slot right now: then it holds the lock.)
    if !locks.try_lock(i) {
        return None;
    }
    // Every write of `owner` is made holding slot `i`'s lock (claims here, releases in
    // `release`), so holding it already excludes every other claimant: the CAS is a second
    // guard, against an owner word changed outside the protocol (a peer scribbling), not a step
    // the protocol needs. (Replacing it by a store passes the loom models and every test, the
    // allocator stress included; ignoring the lock fails them even with the CAS: a CAS cannot
    // tell a live owner from a dead one.)
    if slot
        .owner
        .compare_exchange(owner, token, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        locks.unlock(i);
        return None;
    }
    Some(owner)
}

/// Claims a free slot among the first `slots`, or reclaims one whose owner process is gone
/// (draining it first). `None` if every slot is taken.
#[inline]
pub fn claim<const C: usize, P, L>(pool: &P, locks: &L, token: u64, slots: u32) -> Option<u32>
where
    P: SlotPool<C> + ?Sized,
    L: SlotLocks + ?Sized,
{
    for i in 0..slots {
        if let Some(previous) = take_over(pool, locks, i, token, true) {
            if previous != 0 {
                drain(pool, pool.cache_slot(i), None);
            }
            return Some(i);
        }
    }
    None
}

/// Hands slot `i` back (the caller owns it): its private lists to the shared lists, its counters
/// to the base, then frees the slot and drops its lock, in that order: the owner word is cleared
/// while the lock still keeps everyone else out.
#[inline]
pub fn release<const C: usize, P, L>(pool: &P, locks: &L, i: u32, counts: Option<&[u16; C]>)
where
    P: SlotPool<C> + ?Sized,
    L: SlotLocks + ?Sized,
{
    let slot = pool.cache_slot(i);
    drain(pool, slot, counts);
    slot.owner.store(0, Ordering::Release);
    locks.unlock(i);
}

/// Reclaims every slot among the first `slots` whose owner process is gone. Returns how many.
#[inline]
pub fn reclaim_dead<const C: usize, P, L>(pool: &P, locks: &L, token: u64, slots: u32) -> usize
where
    P: SlotPool<C> + ?Sized,
    L: SlotLocks + ?Sized,
{
    let mut n = 0;
    for i in 0..slots {
        if take_over(pool, locks, i, token, false).is_some() {
            release(pool, locks, i, None);
            n += 1;
        }
    }
    n
}

/// Moves a slot's private lists onto the shared lists and its counters into the base. The
/// caller has exclusive use of the slot. `counts` are the list lengths when the caller is the
/// owner; a reclaimer does not know them and walks at most [`SlotPool::list_cap`] blocks per
/// list, validating each (a dead owner may have been killed mid-push: a chain that does not check
/// out is cut, leaking its rest rather than listing anything twice).
///
/// Crash safety: a list is detached (its head zeroed) *before* it is pushed onto a shared list,
/// and counters are added to the base *before* the slot's are zeroed, so a process killed in
/// between leaks a chain or over-counts, and never lists a block twice.
pub fn drain<const C: usize, P>(pool: &P, slot: &Slot<C>, counts: Option<&[u16; C]>)
where
    P: SlotPool<C> + ?Sized,
{
    for c in 0..C {
        let head = slot.classes[c].head.load(Ordering::Relaxed);
        if head == 0 {
            continue;
        }
        let bound = counts.map_or(pool.list_cap(c), |k| k[c]).max(1) as u64;
        // Detach first: a crash from here on leaks the chain instead of listing it twice.
        slot.classes[c].head.store(0, Ordering::Relaxed);
        if !pool.valid_cached(head, c) {
            continue;
        }
        let mut tail = head;
        for _ in 1..bound {
            let next = pool.word(tail + LINK).load(Ordering::Relaxed);
            if next == 0 || !pool.valid_cached(next, c) {
                break;
            }
            tail = next;
        }
        pool.word(tail + LINK).store(0, Ordering::Relaxed);
        push_chain(pool, pool.shared_list(c), head, tail);
    }
    let (bytes, blocks) = usage(pool, slot);
    add(pool.base_counters(), bytes, blocks);
    for k in &slot.classes {
        k.in_use.store(0, Ordering::Relaxed);
    }
    slot.large.bytes.store(0, Ordering::Relaxed);
    slot.large.blocks.store(0, Ordering::Relaxed);
}

/// Bytes and blocks a slot's counters say are in use (wrapping).
#[inline]
pub fn usage<const C: usize, P>(pool: &P, slot: &Slot<C>) -> (u64, u64)
where
    P: SlotPool<C> + ?Sized,
{
    let mut bytes = slot.large.bytes.load(Ordering::Relaxed);
    let mut blocks = slot.large.blocks.load(Ordering::Relaxed);
    for (c, k) in slot.classes.iter().enumerate() {
        let n = k.in_use.load(Ordering::Relaxed);
        bytes = bytes.wrapping_add(n.wrapping_mul(pool.class_bytes(c)));
        blocks = blocks.wrapping_add(n);
    }
    (bytes, blocks)
}

/// Adds (wrapping) to shared counters that any thread may update.
#[inline]
pub fn add(counters: &Counters, bytes: u64, blocks: u64) {
    counters.bytes.fetch_add(bytes, Ordering::Relaxed);
    counters.blocks.fetch_add(blocks, Ordering::Relaxed);
}

/// Adds to a counter only this thread writes: load and store, no read-modify-write.
#[inline]
pub fn bump(counter: &AtomicU64, delta: i64) {
    let n = counter.load(Ordering::Relaxed);
    counter.store(n.wrapping_add(delta as u64), Ordering::Relaxed);
}

/// Pushes the free block at `off` onto the private list `head` (the caller owns the slot).
#[inline]
pub fn cache_push<W: Words + ?Sized>(mem: &W, head: &AtomicU64, off: u64) {
    mem.word(off + LINK)
        .store(head.load(Ordering::Relaxed), Ordering::Relaxed);
    head.store(off, Ordering::Relaxed);
}

/// Pops the first block off the private list `head`, which the caller (the slot's owner) knows
/// is not empty.
#[inline]
pub fn cache_pop<W: Words + ?Sized>(mem: &W, head: &AtomicU64) -> u64 {
    let off = head.load(Ordering::Relaxed);
    head.store(
        mem.word(off.wrapping_add(LINK)).load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
    off
}
