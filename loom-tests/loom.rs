//! Loom models of the lock-free algorithms of `flowipc::shm::lockfree`.
//!
//! The models run the very functions the arena runs in production, over heap "memory" made of
//! loom atomics instead of a shared mapping. Run them with:
//!
//! ```text
//! RUSTFLAGS="--cfg flowipc_loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=3 \
//!     cargo test --release --test loom
//! ```
//!
//! Without `--cfg flowipc_loom` this file compiles to nothing.
//!
//! How the models catch bugs:
//! * Every block and every ref-counted object has a payload in a `loom::cell::UnsafeCell`,
//!   written with `with_mut` by whoever owns it and read with `with` by holders. Loom reports any
//!   two accesses that are not ordered by happens-before, so a pop that does not synchronize with
//!   the push that published a block, or a free that does not synchronize with the last reader,
//!   is a "causality violation".
//! * Ownership of free-list blocks is also tracked by an `owned` flag that a new owner swaps to
//!   `true` (it must have been `false`: otherwise the block was handed out twice). The flag is
//!   `Relaxed` on purpose: a swap always reads the latest value, and `Relaxed` adds no
//!   synchronization that could hide a missing `Acquire`/`Release` in the algorithm.
//! * After the threads are joined, the final state is checked: every block on the list exactly
//!   once, every object freed exactly once, every ticket accounted for.
#![cfg(flowipc_loom)]

use flowipc::shm::lockfree::{
    pop, push, push_chain, rc_acquire, rc_release, ticket_issue, ticket_take, Words, LINK,
};
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use loom::sync::Arc;
use loom::thread;

/// Bytes per block in the models: a 16-byte header (info word, link word) and nothing else; the
/// payload the owner writes lives beside the memory, in `Heap::payload`.
const BLOCK: u64 = 16;

/// Offset of block `i` (0-based). Offset 0 means "empty list", so block 0 is at 16.
fn block_off(i: usize) -> u64 {
    (i as u64 + 1) * BLOCK
}

/// Heap memory made of loom atomics: word `off / 8` is the word at byte offset `off`.
struct Mem {
    words: Vec<AtomicU64>,
}

impl Mem {
    fn new(blocks: usize) -> Mem {
        let words = (block_off(blocks) / 8) as usize;
        Mem {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Words for Mem {
    fn word(&self, off: u64) -> &AtomicU64 {
        let i = (off / 8) as usize;
        assert!(
            off % 8 == 0 && i < self.words.len(),
            "the algorithm asked for word {off:#x}, outside the model's memory (corrupt list)"
        );
        &self.words[i]
    }
}

/// A free list over `blocks` blocks, with per-block ownership tracking.
struct Heap {
    mem: Mem,
    head: AtomicU64,
    owned: Vec<AtomicBool>,
    payload: Vec<UnsafeCell<u64>>,
}

impl Heap {
    /// A heap whose blocks are all owned by the creating thread (none on the list).
    fn new(blocks: usize) -> Heap {
        Heap {
            mem: Mem::new(blocks),
            head: AtomicU64::new(0),
            owned: (0..blocks).map(|_| AtomicBool::new(true)).collect(),
            payload: (0..blocks).map(|_| UnsafeCell::new(0)).collect(),
        }
    }

    /// A heap whose first `free` blocks are on the list (block 0 on top), the others owned.
    fn with_free(blocks: usize, free: usize) -> Heap {
        let heap = Heap::new(blocks);
        for i in (0..free).rev() {
            heap.release(block_off(i), 0);
        }
        heap
    }

    fn index(&self, off: u64) -> usize {
        assert!(
            off % BLOCK == 0 && off >= BLOCK && off <= block_off(self.owned.len() - 1),
            "pop returned {off:#x}, which is not a block (corrupt list)"
        );
        (off / BLOCK - 1) as usize
    }

    /// Takes ownership of a block `who` just popped, and uses it (writes its payload).
    fn acquire(&self, off: u64, who: u64) {
        let i = self.index(off);
        assert!(
            !self.owned[i].swap(true, Relaxed),
            "block {off:#x} handed out twice (popped while another thread owns it)"
        );
        // A header word of an allocated block is not a link: scribble on it the way a
        // ref-counted object does (the count lives there), so a stale pop reads garbage.
        self.mem.word(off + LINK).store(1, Relaxed);
        self.payload[i].with_mut(|p| {
            // SAFETY: loom checks that this write is ordered after every other access to the
            // cell; a plain u64 has no invalid bit patterns.
            unsafe { *p = who }
        });
    }

    /// Checks the block still holds what its owner wrote, gives up ownership and pushes it.
    fn release(&self, off: u64, who: u64) {
        let i = self.index(off);
        self.payload[i].with(|p| {
            // SAFETY: loom checks that this read is ordered with every write to the cell.
            let v = unsafe { *p };
            assert_eq!(v, who, "block {off:#x} was written by another owner");
        });
        self.owned[i].store(false, Relaxed);
        push(&self.mem, &self.head, off);
    }

    /// Pops a block and takes ownership of it.
    fn pop(&self, who: u64) -> Option<u64> {
        let off = pop(&self.mem, &self.head)?;
        self.acquire(off, who);
        Some(off)
    }

    /// After all threads are joined: the list holds exactly the blocks not marked owned, each
    /// once, and popping them all empties it.
    fn assert_list(&self, expect_free: usize) {
        let mut seen = vec![false; self.owned.len()];
        let mut n = 0;
        while let Some(off) = pop(&self.mem, &self.head) {
            let i = self.index(off);
            assert!(!seen[i], "block {off:#x} is on the free list twice");
            assert!(
                !self.owned[i].load(Relaxed),
                "block {off:#x} is on the free list but owned"
            );
            seen[i] = true;
            n += 1;
        }
        assert_eq!(n, expect_free, "free list lost blocks");
    }
}

/// Free list, ABA: three free blocks; one thread pops two and pushes them back in pop order (so
/// the old head comes back on top with a different successor), the other pops and pushes. A pop
/// that read `head = A, next = B` before the first thread's pop-pop-push would, without the tag,
/// install B while the first thread still owns it.
#[test]
fn free_list_aba() {
    loom::model(|| {
        let heap = Arc::new(Heap::with_free(3, 3));
        let h = heap.clone();
        let t = thread::spawn(move || {
            let x = h
                .pop(2)
                .expect("3 blocks, at most 3 owned: the list is never empty");
            h.release(x, 2);
            let y = h
                .pop(2)
                .expect("3 blocks, at most 3 owned: the list is never empty");
            h.release(y, 2);
        });
        let a = heap
            .pop(1)
            .expect("3 blocks, at most 3 owned: the list is never empty");
        let b = heap
            .pop(1)
            .expect("3 blocks, at most 3 owned: the list is never empty");
        heap.release(a, 1);
        heap.release(b, 1);
        t.join().unwrap();
        heap.assert_list(3);
    });
}

/// Free list, span refill: one thread links three fresh blocks (as `refill` does, with plain
/// relaxed stores of the links) and publishes them with one `push_chain`, while another thread
/// pops and pushes. The popper must see the chain's links and the refiller's writes to the
/// blocks.
#[test]
fn push_chain_vs_pop() {
    loom::model(|| {
        // Block 0 is free; blocks 1..=3 are the refiller's fresh span.
        let heap = Arc::new(Heap::with_free(4, 1));
        let h = heap.clone();
        let t = thread::spawn(move || {
            for i in 1..=3 {
                let off = block_off(i);
                h.payload[i].with_mut(|p| {
                    // SAFETY: loom checks this write against every other access to the cell.
                    unsafe { *p = 7 }
                });
                h.owned[i].store(false, Relaxed);
                if i < 3 {
                    h.mem.word(off + LINK).store(block_off(i + 1), Relaxed);
                }
            }
            push_chain(&h.mem, &h.head, block_off(1), block_off(3));
        });
        let mut mine = Vec::new();
        for _ in 0..2 {
            if let Some(off) = heap.pop(1) {
                mine.push(off);
            }
        }
        for off in mine {
            heap.release(off, 1);
        }
        t.join().unwrap();
        heap.assert_list(4);
    });
}

/// Value written at construction, and the poison the freeing thread writes.
const VALUE: u64 = 42;
const FREED: u64 = 0xdead;

/// A ref-counted object: the count (the block's link word), its lend tickets, and its value.
struct Obj {
    rc: AtomicU64,
    tickets: AtomicU64,
    value: UnsafeCell<u64>,
    frees: AtomicUsize,
}

impl Obj {
    /// A freshly constructed object: one reference, held by the creating thread.
    fn new() -> Obj {
        Obj {
            rc: AtomicU64::new(1),
            tickets: AtomicU64::new(0),
            value: UnsafeCell::new(VALUE),
            frees: AtomicUsize::new(0),
        }
    }

    /// What a holder does with its reference: read the value.
    fn read(&self) {
        self.value.with(|p| {
            // SAFETY: loom checks that this read is ordered with every write to the cell.
            let v = unsafe { *p };
            assert_eq!(v, VALUE, "read an object that was already freed");
        });
    }

    /// Drops one reference; the last one frees the object (writes the poison).
    fn release(&self) {
        if rc_release(&self.rc) {
            self.value.with_mut(|p| {
                // SAFETY: loom checks that this write is ordered after every access to the cell:
                // that is, after every other holder's reads.
                unsafe { *p = FREED }
            });
            let before = self.frees.fetch_add(1, Relaxed);
            assert_eq!(before, 0, "object freed twice");
        }
    }

    /// After all threads are joined: freed exactly once, no reference left.
    fn assert_freed(&self) {
        assert_eq!(self.frees.load(Relaxed), 1, "object never freed (leak)");
        assert_eq!(self.rc.load(Relaxed), 0, "count not zero after the free");
    }
}

/// Reference count: three holders (the creator and two threads it handed clones to); each
/// thread clones its handle, reads, drops the clone, reads, drops its handle. Whoever drops last
/// frees, after everybody's reads, exactly once.
#[test]
fn ref_count() {
    loom::model(|| {
        let obj = Arc::new(Obj::new());
        let threads: Vec<_> = (0..2)
            .map(|_| {
                rc_acquire(&obj.rc); // the clone sent to the thread
                let o = obj.clone();
                thread::spawn(move || {
                    rc_acquire(&o.rc);
                    o.read();
                    o.release();
                    o.read();
                    o.release();
                })
            })
            .collect();
        obj.read();
        obj.release();
        for t in threads {
            t.join().unwrap();
        }
        obj.assert_freed();
    });
}

/// What `Arena::borrow` does with a blob, reduced to the protocol: take a ticket (refused if
/// none); on success the caller owns the lent reference. Returns whether the borrow succeeded.
fn borrow(o: &Obj) -> bool {
    if !ticket_take(&o.tickets) {
        return false;
    }
    o.read();
    o.release();
    true
}

/// Lend tickets, replay: the owner lends once (count 2, one ticket) and drops its handle while
/// the blob is borrowed by one thread that receives it twice (a replayed message) and by another
/// that receives a copy. Exactly one borrow succeeds, and the object is freed exactly once.
#[test]
fn lend_replay() {
    loom::model(|| {
        let obj = Arc::new(Obj::new());
        // lend(): the reference first, then the ticket that lets a borrower adopt it.
        rc_acquire(&obj.rc);
        ticket_issue(&obj.tickets);
        // Sending the blob: the threads start after the lend, as a receiver after the send.
        let o = obj.clone();
        let twice = thread::spawn(move || borrow(&o) as usize + borrow(&o) as usize);
        let o = obj.clone();
        let once = thread::spawn(move || borrow(&o) as usize);
        obj.release();
        let adopted = twice.join().unwrap() + once.join().unwrap();
        assert_eq!(adopted, 1, "a lent reference was adopted {adopted} times");
        assert_eq!(obj.tickets.load(Relaxed), 0, "ticket left after the borrow");
        obj.assert_freed();
    });
}

/// Lend tickets racing a second lend: the owner has lent once; while a borrower takes the first
/// ticket (and tries a replay), the owner lends again and drops its handle. Tickets are counts,
/// so the replay may take the second lend's ticket; what must hold is that no ticket is lost or
/// duplicated: borrows plus tickets left equal lends, and once the remaining blob is released
/// (`Arena::release_blob`) the object is freed exactly once.
#[test]
fn lend_while_borrowing() {
    loom::model(|| {
        let obj = Arc::new(Obj::new());
        rc_acquire(&obj.rc);
        ticket_issue(&obj.tickets);
        let o = obj.clone();
        let borrower = thread::spawn(move || borrow(&o) as usize + borrow(&o) as usize);
        rc_acquire(&obj.rc);
        ticket_issue(&obj.tickets);
        obj.release();
        let adopted = borrower.join().unwrap();
        assert!(adopted >= 1, "the first lend's ticket was not found");
        // Release the blobs nobody borrowed, as `release_blob` does: take a ticket, drop the ref.
        let mut dropped = 0;
        while ticket_take(&obj.tickets) {
            obj.release();
            dropped += 1;
        }
        assert_eq!(
            adopted + dropped,
            2,
            "2 lends, {adopted} borrowed, {dropped} released"
        );
        obj.assert_freed();
    });
}
