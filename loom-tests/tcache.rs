//! Loom models of the thread-cache slot protocol, `flowipc::shm::slot` (used by `tcache`): slot
//! claims, hand-back and the reclaim of a dead process's slot.
//!
//! The models run the crate's own `claim`, `take_over`, `release`, `reclaim_dead`, `drain`,
//! `cache_push` / `cache_pop` and `bump` over heap memory made of loom atomics: one size class,
//! one slot (so that every claimant contends for it), and a few blocks.
//!
//! # The kernel lock
//! In production each slot is guarded by an OFD lock on one byte of the pool's memfd, which loom
//! cannot see. [`ModelLocks`] models it as one "holder" word per slot (0: free, else the id of the
//! open file description holding it), and these are the assumptions made of the kernel lock, no
//! more:
//! * at most one open file description holds a slot's lock at a time (taking it is a CAS from 0);
//! * taking the lock is an `Acquire` and dropping it a `Release`: everything the previous holder
//!   did happens-before whatever the next holder does (in the kernel, both go through the
//!   spinlock of the file's lock list);
//! * a failed attempt orders nothing (`Relaxed`);
//! * a description that already holds the lock takes it again (OFD locks do not conflict with
//!   their own description), and unlocking a lock the description does not hold does nothing;
//! * when a process dies, the kernel drops its locks after everything the process did, with
//!   `Release` ([`ModelLocks::die`]); the dead process's slot keeps its owner word and its lists.
//!
//! Each model thread is one process with its own token and its own description (threads of one
//! process share a description and are kept apart by `Pool::slot_mutex`, a `std` mutex, which
//! the models do not cover).
//!
//! # What the models check
//! * A slot is owned by one claimant at a time: an owner marks its hold with a `Relaxed` swap that
//!   must find the slot unheld, writes the slot's `UnsafeCell` (loom reports two owners whose
//!   accesses are not ordered), and checks that the owner word names it for as long as it holds
//!   the slot (`release_all_slots` and the same-process skip rely on it).
//! * No block is in two places: each block's payload is an `UnsafeCell` written by whoever
//!   allocates it and checked by whoever frees it; its ownership flag is swapped to `true` on
//!   allocation (it must have been `false`); at the end every block is on the shared list exactly
//!   once.
//! * Nothing is lost on hand-back or reclaim: after the threads are joined, every block is on the
//!   shared list, the slot is free and empty, and the base counters hold exactly the blocks in
//!   use.
//!
//! Bookkeeping (the hold marks, ownership flags) is `Relaxed` read-modify-writes, which read the
//! latest value without adding synchronization that could hide a missing one in the protocol.

use flowipc::shm::lockfree::{pop, push, Words};
use flowipc::shm::slot::{
    bump, cache_pop, cache_push, claim, reclaim_dead, release, usage, Counters, Slot, SlotClass,
    SlotLocks, SlotPool,
};
use loom::cell::UnsafeCell;
use loom::sync::atomic::{
    AtomicBool, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use loom::sync::Arc;
use loom::thread;

use super::model;

/// Size classes, and slots, of the model pool.
const C: usize = 1;
const SLOTS: u32 = 1;
/// Bytes per block of the class (the usage counters count them).
const CLASS: u64 = 16;
/// Most blocks a private list holds (what a reclaimer walks).
const CAP: u16 = 4;
/// Info words of the model's blocks (production info words carry more; the protocol only asks
/// whether a block looks like a free block of its class).
const FREE: u64 = 1;
const ALLOC: u64 = 2;

/// A process: its token (the owner word it writes) and its open file description of the pool.
#[derive(Clone, Copy)]
struct Proc {
    token: u64,
    ofd: u64,
}

const A: Proc = Proc { token: 11, ofd: 1 };
const B: Proc = Proc { token: 22, ofd: 2 };
const DEAD: Proc = Proc { token: 33, ofd: 3 };

/// Offset of block `i` (0-based); offset 0 means "empty list".
fn block_off(i: usize) -> u64 {
    (i as u64 + 1) * 16
}

/// A pool: block headers (info word, link word), one slot, one shared list, base counters, the
/// modelled slot locks, and the models' bookkeeping.
struct World {
    words: Vec<AtomicU64>,
    slots: Vec<Slot<C>>,
    shared: AtomicU64,
    base: Counters,
    /// Per slot: the open file description holding its lock, 0 if none.
    holders: Vec<AtomicU64>,
    /// Per slot: the token of the thread using it (bookkeeping), and its owner's scratch data.
    held: Vec<AtomicU64>,
    slot_data: Vec<UnsafeCell<u64>>,
    /// Per block: allocated (bookkeeping), and its payload.
    owned: Vec<AtomicBool>,
    payload: Vec<UnsafeCell<u64>>,
}

impl Words for World {
    fn word(&self, off: u64) -> &AtomicU64 {
        let i = (off / 8) as usize;
        assert!(
            off % 8 == 0 && i < self.words.len(),
            "the protocol asked for word {off:#x}, outside the model's memory (corrupt list)"
        );
        &self.words[i]
    }
}

impl SlotPool<C> for World {
    fn cache_slot(&self, i: u32) -> &Slot<C> {
        &self.slots[i as usize]
    }
    fn shared_list(&self, _: usize) -> &AtomicU64 {
        &self.shared
    }
    fn base_counters(&self) -> &Counters {
        &self.base
    }
    fn class_bytes(&self, _: usize) -> u64 {
        CLASS
    }
    fn list_cap(&self, _: usize) -> u16 {
        CAP
    }
    fn valid_cached(&self, off: u64, _: usize) -> bool {
        off % 16 == 0
            && off >= block_off(0)
            && off <= block_off(self.owned.len() - 1)
            && self.word(off).load(Relaxed) == FREE
    }
}

fn counters() -> Counters {
    Counters {
        bytes: AtomicU64::new(0),
        blocks: AtomicU64::new(0),
    }
}

/// The slot locks as seen by one open file description (see the module docs).
struct ModelLocks<'a> {
    holders: &'a [AtomicU64],
    ofd: u64,
}

impl SlotLocks for ModelLocks<'_> {
    fn try_lock(&self, i: u32) -> bool {
        match self.holders[i as usize].compare_exchange(0, self.ofd, Acquire, Relaxed) {
            Ok(_) => true,
            Err(holder) => holder == self.ofd,
        }
    }

    fn unlock(&self, i: u32) {
        let _ = self.holders[i as usize].compare_exchange(self.ofd, 0, Release, Relaxed);
    }
}

impl ModelLocks<'_> {
    /// The process dies: the kernel drops every lock of its description, after everything it did.
    fn die(&self) {
        for i in 0..self.holders.len() as u32 {
            self.unlock(i);
        }
    }
}

/// What one process knows of its slot: which, and its private list length (thread-local in
/// production).
struct Held {
    slot: u32,
    counts: [u16; C],
}

impl World {
    /// `blocks` blocks, all allocated (and counted in the base counters), none listed.
    fn new(blocks: usize) -> World {
        let w = World {
            words: (0..block_off(blocks) / 8)
                .map(|_| AtomicU64::new(0))
                .collect(),
            slots: (0..SLOTS)
                .map(|_| Slot {
                    owner: AtomicU64::new(0),
                    large: counters(),
                    classes: std::array::from_fn(|_| SlotClass {
                        head: AtomicU64::new(0),
                        in_use: AtomicU64::new(0),
                    }),
                })
                .collect(),
            shared: AtomicU64::new(0),
            base: counters(),
            holders: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            held: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            slot_data: (0..SLOTS).map(|_| UnsafeCell::new(0)).collect(),
            owned: (0..blocks).map(|_| AtomicBool::new(true)).collect(),
            payload: (0..blocks).map(|_| UnsafeCell::new(0)).collect(),
        };
        for i in 0..blocks {
            w.word(block_off(i)).store(ALLOC, Relaxed);
        }
        w.base.bytes.store(blocks as u64 * CLASS, Relaxed);
        w.base.blocks.store(blocks as u64, Relaxed);
        w
    }

    fn locks(&self, p: Proc) -> ModelLocks<'_> {
        ModelLocks {
            holders: &self.holders,
            ofd: p.ofd,
        }
    }

    fn index(&self, off: u64) -> usize {
        assert!(
            off % 16 == 0 && off >= block_off(0) && off <= block_off(self.owned.len() - 1),
            "{off:#x} is not a block (corrupt list)"
        );
        (off / 16 - 1) as usize
    }

    /// `Pool::claim_slot` (one attempt), then the claimant starts using the slot.
    fn try_claim(&self, p: Proc) -> Option<Held> {
        let slot = claim(self, &self.locks(p), p.token, SLOTS)?;
        let before = self.held[slot as usize].swap(p.token, Relaxed);
        assert_eq!(
            before, 0,
            "slot {slot} claimed by {} while {before} holds it",
            p.token
        );
        self.use_slot(p, slot);
        Some(Held {
            slot,
            counts: [0; C],
        })
    }

    /// Claims a slot, waiting for one to be free (or for its owner to die).
    fn claim_wait(&self, p: Proc) -> Held {
        loop {
            if let Some(h) = self.try_claim(p) {
                return h;
            }
            thread::yield_now();
        }
    }

    /// What only the slot's owner may do: write the slot, and find its token as the owner.
    fn use_slot(&self, p: Proc, slot: u32) {
        self.slot_data[slot as usize].with_mut(|d| {
            // SAFETY: loom checks that this write is ordered with every other access to the cell.
            unsafe { *d = p.token }
        });
        let owner = self.slots[slot as usize].owner.load(Relaxed);
        assert_eq!(
            owner, p.token,
            "the owner word of slot {slot} is {owner} while {} holds it",
            p.token
        );
    }

    /// `Entry::drop` / `Arena::flush_thread_cache`: hands the slot back.
    fn hand_back(&self, p: Proc, h: Held) {
        self.use_slot(p, h.slot);
        let before = self.held[h.slot as usize].swap(0, Relaxed);
        assert_eq!(
            before, p.token,
            "slot {} was taken from {}",
            h.slot, p.token
        );
        release(self, &self.locks(p), h.slot, Some(&h.counts));
    }

    /// `Pool::alloc_small`: from the private list if it holds a block, else the shared list.
    fn alloc(&self, p: Proc, h: Option<&mut Held>) -> Option<u64> {
        let off = match h {
            Some(h) => {
                let slot = &self.slots[h.slot as usize];
                bump(&slot.classes[0].in_use, 1);
                if h.counts[0] > 0 {
                    h.counts[0] -= 1;
                    Some(cache_pop(self, &slot.classes[0].head))
                } else {
                    pop(self, &self.shared)
                }
            }
            None => {
                self.base.bytes.fetch_add(CLASS, Relaxed);
                self.base.blocks.fetch_add(1, Relaxed);
                pop(self, &self.shared)
            }
        };
        let Some(off) = off else {
            panic!("{} found no free block although one is free", p.token);
        };
        assert!(
            self.valid_cached(off, 0),
            "{off:#x} handed out but not free"
        );
        let i = self.index(off);
        assert!(
            !self.owned[i].swap(true, Relaxed),
            "block {off:#x} handed out twice"
        );
        self.word(off).store(ALLOC, Relaxed);
        self.payload[i].with_mut(|v| {
            // SAFETY: loom checks that this write is ordered after every other access to the cell.
            unsafe { *v = p.token }
        });
        Some(off)
    }

    /// `Pool::free_block`: onto the private list (the slot's owner), or the shared list.
    fn free(&self, p: Proc, off: u64, h: Option<&mut Held>) {
        let i = self.index(off);
        self.payload[i].with(|v| {
            // SAFETY: loom checks that this read is ordered with every write to the cell.
            let v = unsafe { *v };
            assert_eq!(v, p.token, "block {off:#x} was overwritten by {v}");
        });
        assert!(
            self.owned[i].swap(false, Relaxed),
            "block {off:#x} freed twice"
        );
        self.word(off).store(FREE, Relaxed);
        match h {
            Some(h) => {
                let slot = &self.slots[h.slot as usize];
                bump(&slot.classes[0].in_use, -1);
                assert!(h.counts[0] < CAP);
                cache_push(self, &slot.classes[0].head, off);
                h.counts[0] += 1;
            }
            None => {
                self.base.bytes.fetch_sub(CLASS, Relaxed);
                self.base.blocks.fetch_sub(1, Relaxed);
                push(self, &self.shared, off);
            }
        }
    }

    /// The payload of block `i` becomes `p`'s: what its allocation would have written.
    fn give(&self, i: usize, p: Proc) {
        self.payload[i].with_mut(|v| {
            // SAFETY: before the threads start; loom checks it anyway.
            unsafe { *v = p.token }
        });
    }

    /// After the threads are joined: every slot free, unlocked and empty; the shared list holds
    /// every block not in use exactly once; the base counters count exactly the blocks in use.
    fn assert_settled(&self, in_use: usize) {
        for (i, slot) in self.slots.iter().enumerate() {
            assert_eq!(slot.owner.load(Relaxed), 0, "slot {i} still owned");
            assert_eq!(self.holders[i].load(Relaxed), 0, "slot {i} still locked");
            assert_eq!(
                slot.classes[0].head.load(Relaxed),
                0,
                "slot {i} still lists blocks"
            );
            assert_eq!(usage(self, slot), (0, 0), "slot {i} still counts blocks");
        }
        let mut seen = vec![false; self.owned.len()];
        let mut n = 0;
        while let Some(off) = pop(self, &self.shared) {
            let i = self.index(off);
            assert!(!seen[i], "block {off:#x} is on the shared list twice");
            assert!(
                !self.owned[i].load(Relaxed),
                "block {off:#x} is listed but in use"
            );
            seen[i] = true;
            n += 1;
        }
        assert_eq!(n + in_use, self.owned.len(), "blocks lost");
        assert_eq!(
            (
                self.base.bytes.load(Relaxed),
                self.base.blocks.load(Relaxed)
            ),
            (in_use as u64 * CLASS, in_use as u64),
            "base counters"
        );
    }
}

/// Model T1, claims exclude each other: two live processes each wait for the one slot, free a
/// block of their own into its private list and hand it back; the second also allocates (from
/// the shared list, where it may find the first one's block) before its free. Each must own the
/// slot alone, see its owner word name it, and see the other's hand-back: at the end both blocks
/// are on the shared list once and nothing is counted in use. A claim that ignores the lock (even
/// with the owner CAS) takes the live first owner's slot over and drains it under it.
#[test]
fn claims_exclude() {
    model(|| {
        let w = Arc::new(World::new(3));
        w.give(0, A);
        w.give(1, B);
        // Block 2 is free on the shared list.
        w.give(2, B);
        w.free(B, block_off(2), None);
        let w2 = w.clone();
        let t = thread::spawn(move || {
            let mut h = w2.claim_wait(A);
            w2.free(A, block_off(0), Some(&mut h));
            w2.hand_back(A, h);
        });
        let mut h = w.claim_wait(B);
        let off = w.alloc(B, Some(&mut h)).unwrap();
        w.free(B, off, Some(&mut h));
        w.free(B, block_off(1), Some(&mut h));
        w.hand_back(B, h);
        t.join().unwrap();
        w.assert_settled(0);
    });
}

/// Model T2, a dead process's cache is reclaimed: process DEAD claims the slot, frees two blocks
/// it wrote into its private list and dies (the kernel drops its lock; the slot keeps its owner
/// word, lists and counters). Process A waits in `reclaim_dead` until it reclaims the slot, then
/// allocates both blocks from the shared list and writes them: DEAD's writes must happen-before
/// A's through the lock alone (loom reports the payload writes otherwise), nothing may be lost
/// (A finds both blocks), and DEAD's counters must reach the base.
#[test]
fn dead_owner_reclaimed() {
    model(|| {
        let w = Arc::new(World::new(2));
        let w2 = w.clone();
        let dead = thread::spawn(move || {
            let mut h = w2.claim_wait(DEAD);
            for i in 0..2 {
                w2.give(i, DEAD);
                w2.free(DEAD, block_off(i), Some(&mut h));
            }
            // Killed: no hand-back, no bookkeeping; only the kernel drops the lock.
            w2.locks(DEAD).die();
        });
        while reclaim_dead(&*w, &w.locks(A), A.token, SLOTS) == 0 {
            thread::yield_now();
        }
        let a = w.alloc(A, None);
        let b = w.alloc(A, None);
        assert_ne!(a, b);
        dead.join().unwrap();
        w.held[0].store(0, Relaxed); // DEAD's bookkeeping, cleared by nobody in production
        w.assert_settled(2);
    });
}

/// Model T3, a claim races a reclaim of a dead process's slot: DEAD died holding the slot with
/// two blocks on its private list. Process A claims (which reclaims the dead slot, or waits for
/// B's reclaim to free it), allocates a block from the shared list, frees it into its own list
/// and hands the slot back; process B runs `reclaim_dead` meanwhile. Exactly one of them drains
/// DEAD's list (no block twice, none lost), and B's reclaim never touches A's live slot.
#[test]
fn claim_races_reclaim() {
    model(|| {
        let w = Arc::new(World::new(2));
        // DEAD claimed the slot, cached two blocks (counted -2 there, +2 in the base) and died.
        let mut h = w.claim_wait(DEAD);
        for i in 0..2 {
            w.give(i, DEAD);
            w.free(DEAD, block_off(i), Some(&mut h));
        }
        w.locks(DEAD).die();
        w.held[0].store(0, Relaxed);
        let w2 = w.clone();
        let b = thread::spawn(move || reclaim_dead(&*w2, &w2.locks(B), B.token, SLOTS));
        let mut h = w.claim_wait(A);
        let off = w.alloc(A, Some(&mut h)).unwrap();
        w.free(A, off, Some(&mut h));
        w.hand_back(A, h);
        b.join().unwrap();
        w.assert_settled(0);
    });
}
