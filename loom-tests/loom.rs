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
//! Without `--cfg flowipc_loom` this file compiles to nothing. Without `LOOM_MAX_PREEMPTIONS`
//! the models use a bound of [`PREEMPTIONS`]: unbounded exploration of the free-list models takes
//! hours.
//!
//! That they still catch the bugs they were shown to catch is checked by
//! `cargo run -p xtask -- mutants` (run by CI): it applies each listed mutation (an ordering
//! weakened, the ABA tag frozen, a fence dropped) to a scratch copy and requires the models to
//! fail.
//!
//! How the models catch bugs:
//! * Every block and every ref-counted object has a payload in a `loom::cell::UnsafeCell`,
//!   written with `with_mut` by whoever owns it and read with `with` by holders. Loom reports any
//!   two accesses that are not ordered by happens-before, so a pop that does not synchronize with
//!   the push that published a block, or a free that does not synchronize with the last reader,
//!   is a "causality violation".
//! * Ownership of free-list blocks is also tracked by an `owned` flag that a new owner swaps to
//!   `true` (it must have been `false`: otherwise the block was handed out twice). Such
//!   bookkeeping is `Relaxed` on purpose: a read-modify-write always reads the latest value, and
//!   `Relaxed` adds no synchronization that could hide a missing `Acquire`/`Release` in the
//!   algorithm under test.
//! * After the threads are joined, the final state is checked: every block on the list exactly
//!   once, every object freed exactly once, every lent reference borrowed or released once.
#![cfg(flowipc_loom)]

use flowipc::shm::lockfree::{
    handle_word, is_sole, pop, push, push_chain, rc_acquire, rc_release, refs, ticket_issue,
    ticket_return, ticket_take, tickets, Words, LINK,
};
use loom::cell::UnsafeCell;
use loom::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize,
    Ordering::{Relaxed, Release},
};
use loom::sync::Arc;
use loom::thread;

mod alloc;
mod ledger;
mod pools;
mod ring;
mod segments;
mod tcache;

/// Preemption bound when `LOOM_MAX_PREEMPTIONS` is not set.
const PREEMPTIONS: usize = 3;

/// Explores every interleaving of `f` (up to the preemption bound).
fn model<F: Fn() + Sync + Send + 'static>(f: F) {
    if std::env::var_os("LOOM_MAX_PREEMPTIONS").is_some() {
        loom::model(f);
    } else {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(PREEMPTIONS);
        builder.check(f);
    }
}

/// Bytes per block in the models: a 16-byte header (info word, link word) and nothing else; the
/// payload the owner writes lives beside the memory, in a `loom::cell::UnsafeCell`.
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
    /// Memory for `blocks` blocks (and the unused 16 bytes at offset 0).
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

/// Whether a pop may find the list empty.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Expect {
    Block,
    Any,
}

/// A free list over a few blocks, with per-block ownership tracking.
struct Heap {
    mem: Mem,
    head: AtomicU64,
    owned: Vec<AtomicBool>,
    payload: Vec<UnsafeCell<u64>>,
}

impl Heap {
    /// `blocks` blocks, the first `free` of them on the list (block 0 on top), the others owned
    /// by the creating thread.
    fn new(blocks: usize, free: usize) -> Heap {
        let heap = Heap {
            mem: Mem::new(blocks),
            head: AtomicU64::new(0),
            owned: (0..blocks).map(|_| AtomicBool::new(true)).collect(),
            payload: (0..blocks).map(|_| UnsafeCell::new(0)).collect(),
        };
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

    /// Pops a block, takes ownership of it and uses it.
    fn pop(&self, who: u64) -> Option<u64> {
        let off = pop(&self.mem, &self.head)?;
        let i = self.index(off);
        assert!(
            !self.owned[i].swap(true, Relaxed),
            "block {off:#x} handed out twice (popped while another thread owns it)"
        );
        // The link word of an allocated block is not a link: a ref-counted object keeps its
        // handle word there. Scribble one, so that a pop that lost a race reads garbage as `next`
        // exactly as it can in production.
        self.mem.word(off + LINK).store(handle_word(7), Relaxed);
        self.payload[i].with_mut(|p| {
            // SAFETY: loom checks that this write is ordered after every other access to the
            // cell; a u64 has no invalid bit patterns.
            unsafe { *p = who }
        });
        Some(off)
    }

    /// Checks the block still holds what its owner wrote, gives up ownership and pushes it.
    fn release(&self, off: u64, who: u64) {
        let i = self.index(off);
        self.payload[i].with(|p| {
            // SAFETY: loom checks that this read is ordered with every write to the cell.
            let v = unsafe { *p };
            assert_eq!(v, who, "block {off:#x} was overwritten by another owner");
        });
        self.owned[i].store(false, Relaxed);
        push(&self.mem, &self.head, off);
    }

    /// Pops twice, then pushes the blocks back in pop order, so that the first block comes back
    /// on top with a different successor. Either pop may find the list empty, unless `first` says
    /// that the first one cannot.
    fn pop_pop_push_push(&self, who: u64, first: Expect) {
        let a = self.pop(who);
        if first == Expect::Block {
            assert!(a.is_some(), "the list is empty although a block is free");
        }
        let b = self.pop(who);
        for off in [a, b].into_iter().flatten() {
            self.release(off, who);
        }
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
        assert_eq!(n, expect_free, "the free list lost blocks");
    }
}

/// Model 1, free list with ABA: three free blocks `A -> B -> C`; two threads each, twice, pop
/// two blocks and push them back in pop order. A pop that read `head = A, next = B` and stalls
/// while the other thread pops A and B and pushes A back would, without the tag, install B as
/// the head while its owner still holds it, and hand it out a second time. (Each thread holds at
/// most two blocks, so its first pop always finds one.)
#[test]
fn free_list_aba() {
    model(|| {
        let heap = Arc::new(Heap::new(3, 3));
        let h = heap.clone();
        let t = thread::spawn(move || {
            h.pop_pop_push_push(2, Expect::Block);
            h.pop_pop_push_push(2, Expect::Block);
        });
        heap.pop_pop_push_push(1, Expect::Block);
        heap.pop_pop_push_push(1, Expect::Block);
        t.join().unwrap();
        heap.assert_list(3);
    });
}

/// Model 2, span refill racing pops: one thread links three fresh blocks (with relaxed stores
/// of the links, as `refill` does) and publishes them with one `push_chain`, while two others
/// each pop twice and push back. A popper must see the chain's links and the refiller's writes
/// to the blocks.
#[test]
fn push_chain_vs_pop() {
    model(|| {
        // Block 0 is free; blocks 1..=3 are the refiller's fresh span.
        let heap = Arc::new(Heap::new(4, 1));
        let h = heap.clone();
        let t = thread::spawn(move || {
            for i in 1..=3 {
                let off = block_off(i);
                h.payload[i].with_mut(|p| {
                    // SAFETY: loom checks this write against every other access to the cell.
                    unsafe { *p = 0 }
                });
                h.owned[i].store(false, Relaxed);
                if i < 3 {
                    h.mem.word(off + LINK).store(block_off(i + 1), Relaxed);
                }
            }
            push_chain(&h.mem, &h.head, block_off(1), block_off(3));
        });
        let h = heap.clone();
        let popper = thread::spawn(move || h.pop_pop_push_push(2, Expect::Any));
        heap.pop_pop_push_push(1, Expect::Any);
        t.join().unwrap();
        popper.join().unwrap();
        heap.assert_list(4);
    });
}

/// The object's block, and the generation of the life the models lend.
const OBJ: u64 = BLOCK;
const GEN: u32 = 1;
/// The object's value in that life, in its next life, and the poison its freer writes.
const VALUE: u64 = 42;
const NEXT_LIFE: u64 = 43;
const FREED: u64 = 0xdead;

/// A ref-counted object in one block: the info word at `OBJ` keeps the generation, the link word
/// at `OBJ + LINK` the handle word (count, tickets, liveness, generation) while the object lives
/// and the free-list link once it is freed, as in production.
struct Obj {
    mem: Mem,
    free_list: AtomicU64,
    value: UnsafeCell<u64>,
    /// Times the object was freed.
    frees: AtomicUsize,
    /// References lent (tickets issued) and adopted by borrowers, in generation `GEN`.
    lent: AtomicUsize,
    adopted: AtomicUsize,
    /// Whether the freer reuses the block at once for a new object, which it lends.
    reuse: bool,
}

impl Obj {
    /// A constructed object: one reference, held by the creating thread.
    fn new(reuse: bool) -> Obj {
        let obj = Obj::unpublished(reuse);
        obj.value.with_mut(|p| {
            // SAFETY: the object is not shared yet; loom checks it anyway.
            unsafe { *p = VALUE }
        });
        obj.word().store(handle_word(GEN), Relaxed);
        obj
    }

    /// An allocated block of generation `GEN`, not yet constructed: nobody can borrow it.
    fn unpublished(reuse: bool) -> Obj {
        let obj = Obj {
            mem: Mem::new(1),
            free_list: AtomicU64::new(0),
            value: UnsafeCell::new(0),
            frees: AtomicUsize::new(0),
            lent: AtomicUsize::new(0),
            adopted: AtomicUsize::new(0),
            reuse,
        };
        obj.mem.word(OBJ).store(GEN as u64, Relaxed);
        obj
    }

    /// The handle word.
    fn word(&self) -> &AtomicU64 {
        self.mem.word(OBJ + LINK)
    }

    /// What a holder does with its reference: read the value.
    fn read(&self) {
        self.value.with(|p| {
            // SAFETY: loom checks that this read is ordered with every write to the cell.
            let v = unsafe { *p };
            assert_eq!(v, VALUE, "a holder of generation {GEN} read {v:#x}");
        });
    }

    /// `ShmHandle::lend`: one more reference, with a ticket for a borrower to take it.
    fn lend(&self) {
        self.lent.fetch_add(1, Relaxed);
        ticket_issue(self.word());
    }

    /// `Arena::borrow` of a blob of generation `GEN`, then using and dropping the handle.
    /// Returns whether the borrow succeeded.
    fn borrow(&self) -> bool {
        if !ticket_take(self.word(), GEN) {
            return false;
        }
        let adopted = self.adopted.fetch_add(1, Relaxed) + 1;
        // A read-modify-write reads the latest value, so this bookkeeping does not depend on the
        // synchronization of the algorithm under test.
        let lent = self.lent.fetch_add(0, Relaxed);
        assert!(
            adopted <= lent,
            "{adopted} borrows of {lent} lent references"
        );
        self.read();
        self.release();
        true
    }

    /// `Arena::release_blob`, after the threads are joined: gives back the references of the
    /// blobs nobody borrowed. Returns how many there were.
    fn release_blobs(&self) -> usize {
        let mut n = 0;
        while ticket_take(self.word(), GEN) {
            self.release();
            n += 1;
        }
        n
    }

    /// Drops one reference; the last one frees the object.
    fn release(&self) {
        if rc_release(self.word()) {
            self.free();
        }
    }

    /// `Pool::free_block`: poison the value, move the generation on, push the block (which
    /// overwrites the handle word with a free-list link).
    fn free(&self) {
        self.value.with_mut(|p| {
            // SAFETY: loom checks that this write is ordered after every access to the cell:
            // that is, after every other holder's reads.
            unsafe { *p = FREED }
        });
        let before = self.frees.fetch_add(1, Relaxed);
        assert_eq!(before, 0, "object freed twice");
        let info = self.mem.word(OBJ);
        info.store(info.load(Relaxed) + 1, Relaxed);
        push(&self.mem, &self.free_list, OBJ);
        if self.reuse {
            self.next_life();
        }
    }

    /// Allocates the freed block again for a new object, publishes and lends it: a stale blob of
    /// the old life must not take this ticket.
    fn next_life(&self) {
        let off = pop(&self.mem, &self.free_list);
        assert_eq!(off, Some(OBJ), "the freed block is not on the free list");
        let generation = self.mem.word(OBJ).load(Relaxed) as u32;
        self.value.with_mut(|p| {
            // SAFETY: loom checks this write against every other access to the cell.
            unsafe { *p = NEXT_LIFE }
        });
        self.word().store(handle_word(generation), Release);
        ticket_issue(self.word());
    }

    /// After all threads are joined: each of the `lends` was borrowed (`adopted` of them) or
    /// its blob released now, and then the object is freed ([`assert_freed`](Self::assert_freed)).
    fn assert_lends_settled(&self, lends: usize, adopted: usize) {
        let released = self.release_blobs();
        assert_eq!(
            adopted + released,
            lends,
            "{lends} lends: {adopted} borrowed, {released} released"
        );
        self.assert_freed();
    }

    /// After all threads are joined: freed exactly once, and the handle word is what the model
    /// leaves there.
    fn assert_freed(&self) {
        assert_eq!(self.frees.load(Relaxed), 1, "object never freed (leak)");
        let w = self.word().load(Relaxed);
        if self.reuse {
            // The next life: published with one reference, then lent (one more, one ticket).
            let expect = handle_word(GEN + 1) + (1 << 32) + 1;
            assert_eq!(w, expect, "the next life's handle word is {w:#x}");
            assert_eq!((refs(w), tickets(w)), (2, 1));
        } else {
            assert_eq!(
                w, 0,
                "the free block's link is {w:#x}, not the end of the list"
            );
        }
    }
}

/// Model 3, reference count: three holders (the creator and two threads it handed clones to);
/// each thread clones its handle, reads, drops the clone, reads, drops its handle. Whoever drops
/// last frees, after everybody's reads, exactly once.
#[test]
fn ref_count() {
    model(|| {
        let obj = Arc::new(Obj::new(false));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                rc_acquire(obj.word()); // the clone sent to the thread
                let o = obj.clone();
                thread::spawn(move || {
                    rc_acquire(o.word());
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

/// Model 4, lend tickets and replay: the owner lends once and drops its handle while one thread
/// borrows the blob twice (a replayed message) and another borrows a copy of it. Exactly one
/// borrow succeeds; the object is freed exactly once; and whoever frees it reuses the block at
/// once for a new object that it lends, whose ticket the late replays must not take.
#[test]
fn lend_replay() {
    model(|| {
        let obj = Arc::new(Obj::new(true));
        obj.lend();
        // Sending the blob: the borrowers start after the lend, as a receiver after the send.
        let o = obj.clone();
        let twice = thread::spawn(move || o.borrow() as usize + o.borrow() as usize);
        let o = obj.clone();
        let once = thread::spawn(move || o.borrow() as usize);
        obj.release();
        let adopted = twice.join().unwrap() + once.join().unwrap();
        assert_eq!(adopted, 1, "one lent reference, borrowed {adopted} times");
        obj.assert_freed();
    });
}

/// Model 4b, lend tickets racing a second lend and a failed borrow: the owner has lent once;
/// while a borrower takes a ticket (and tries a replay), the owner lends again and drops its
/// handle, and a borrower of the wrong type takes a ticket and gives it back. Tickets are per
/// object, so the replay may take the second lend's ticket; what must hold is that no ticket is
/// lost or duplicated: borrows plus blobs released afterwards equal lends, and the object is
/// freed exactly once.
#[test]
fn lend_while_borrowing() {
    model(|| {
        let obj = Arc::new(Obj::new(false));
        obj.lend();
        let o = obj.clone();
        let borrower = thread::spawn(move || o.borrow() as usize + o.borrow() as usize);
        let o = obj.clone();
        let wrong_type = thread::spawn(move || {
            if ticket_take(o.word(), GEN) {
                ticket_return(o.word());
            }
        });
        obj.lend();
        obj.release();
        let adopted = borrower.join().unwrap();
        wrong_type.join().unwrap();
        obj.assert_lends_settled(2, adopted);
    });
}

/// Model 4c, a lend publishes the object: the lender constructs the object and lends it while a
/// borrower already holds the blob bytes (nothing else orders the two threads). A borrower that
/// takes the ticket must see the constructed value through the ticket alone.
#[test]
fn lend_publishes() {
    model(|| {
        let obj = Arc::new(Obj::unpublished(false));
        let o = obj.clone();
        let borrower = thread::spawn(move || o.borrow());
        // Arena::construct: write the value, publish the handle word; then lend and drop.
        obj.value.with_mut(|p| {
            // SAFETY: loom checks this write against the borrower's read.
            unsafe { *p = VALUE }
        });
        obj.word().store(handle_word(GEN), Release);
        obj.lend();
        obj.release();
        let adopted = borrower.join().unwrap() as usize;
        obj.assert_lends_settled(1, adopted);
    });
}

/// Model 4d, a lend publishes what the lender wrote after the object was published: the object
/// is constructed and published (with a first value) before the borrower exists, then its sole
/// holder writes it again (as `ShmHandle::get_mut` allows), lends it and drops its handle. A
/// borrower that takes the ticket must see the second write, which only the lend's `Release`
/// orders before its read: with `ticket_issue` `Relaxed`, the borrower's ticket CAS still reads
/// from the publication's release sequence, which does not cover the later write, and loom
/// reports the read as a causality violation.
#[test]
fn lend_publishes_later_writes() {
    model(|| {
        let obj = Arc::new(Obj::unpublished(false));
        obj.value.with_mut(|p| {
            // SAFETY: the object is not shared yet; loom checks it anyway.
            unsafe { *p = FREED }
        });
        obj.word().store(handle_word(GEN), Release);
        let o = obj.clone();
        let borrower = thread::spawn(move || o.borrow());
        // The sole holder writes after publication, then lends and drops its handle.
        obj.value.with_mut(|p| {
            // SAFETY: loom checks this write against the borrower's read.
            unsafe { *p = VALUE }
        });
        obj.lend();
        obj.release();
        let adopted = borrower.join().unwrap() as usize;
        obj.assert_lends_settled(1, adopted);
    });
}

/// Model 5, the sole holder writes again (`ShmHandle::get_mut`, and a sent message thawed by
/// `OutMsg::builder_mut`): the owner lends the object; a borrower borrows it, reads it and drops
/// its handle, while the owner waits until it is the sole holder and then writes the object.
/// Every read the borrower made must happen before that write (loom reports the write
/// otherwise): `is_sole` must synchronize with the borrower's release.
#[test]
fn sole_holder_writes_after_readers() {
    model(|| {
        let obj = Arc::new(Obj::new(false));
        obj.lend();
        let o = obj.clone();
        let borrower = thread::spawn(move || assert!(o.borrow(), "the lent reference"));
        while !is_sole(obj.word()) {
            thread::yield_now();
        }
        obj.value.with_mut(|p| {
            // SAFETY: loom checks this write against the borrower's read.
            unsafe { *p = VALUE }
        });
        borrower.join().unwrap();
        obj.release();
        obj.assert_freed();
    });
}
