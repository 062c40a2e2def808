//! Loom models of the allocator inside one pool (`flowipc::shm::space`, what `shm/alloc.rs` runs
//! between threads and processes): fresh space from the bump pointer, span refills, extent frees
//! and their reuse (as extents, or recycled as a span).
//!
//! The models run the crate's own functions over a [`Space`] made of loom atomics: a heap of two
//! or three pages. Where a model stands in for a `Pool` method (`alloc_small`, `alloc_large`,
//! `free_block`), it makes the same calls, in the same order, minus the thread caches and the
//! statistics. Block starts are every [`Heap::gran`] bytes (a page for extents, the size of the
//! model's one size class for spans), each with its two header words, its payload (a
//! `loom::cell::UnsafeCell`, so that loom reports two owners' accesses that are not ordered) and
//! an `owned` flag that a new owner swaps to `true` (finding it `true` means the block was handed
//! out twice). The bookkeeping is `Relaxed` read-modify-writes, which read the latest value and
//! add no synchronization that could hide a missing one in the code under test.
//!
//! After the threads are joined, [`Heap::assert_accounted`] walks the heap up to the bump pointer
//! by the page map: every block is either owned or on its free list exactly once, nothing else is
//! on a list, and nothing past the bump pointer was touched.

use std::collections::BTreeSet;

use flowipc::shm::layout::{
    bucket_of, info_class, info_generation, info_state, pm_kind, pm_large, pm_small, pm_value,
    CLASS_LARGE, PAGE, PM_LARGE, PM_SMALL, STATE_ALLOC, STATE_FREE,
};
use flowipc::shm::lockfree::{pop, push, Words};
use flowipc::shm::space::{self, Fail, Res, Space};
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use loom::sync::Arc;
use loom::thread;

use super::model;

/// Offset of the heap (the pool header and page map would be below it).
const HEAP: u64 = PAGE;
/// The model's one size class (its index, for the class head and the info words), with blocks
/// of half a page: a span of one page holds two blocks, one returned and one pushed.
const C: usize = 0;
const SIZE: u64 = PAGE / 2;
const SPAN_PAGES: u64 = 1;
/// Free-extent lists the models provide: those an extent request of one or two pages scans.
const BUCKETS: usize = 20;
/// "No life yet" in [`Heap::last_gen`].
const NO_LIFE: u64 = u64::MAX;

/// A pool of `pages` heap pages with block starts every `gran` bytes.
struct Heap {
    gran: u64,
    pages: u64,
    /// Two header words (info, link) per block start.
    words: Vec<AtomicU64>,
    page_map: Vec<AtomicU64>,
    bump: AtomicU64,
    class_head: AtomicU64,
    buckets: Vec<AtomicU64>,
    /// Per block start: the owner's payload, whether someone owns it, and the generation of the
    /// last life handed out there.
    payload: Vec<UnsafeCell<u64>>,
    owned: Vec<AtomicBool>,
    last_gen: Vec<AtomicU64>,
}

impl Words for Heap {
    fn word(&self, off: u64) -> &AtomicU64 {
        let rel = off.wrapping_sub(HEAP);
        assert!(
            off >= HEAP
                && rel < self.pages * PAGE
                && (rel % self.gran == 0 || rel % self.gran == 8),
            "the allocator asked for word {off:#x}, which is not a block header word"
        );
        &self.words[(rel / self.gran * 2 + rel % self.gran / 8) as usize]
    }
}

impl Space for Heap {
    fn heap_start(&self) -> u64 {
        HEAP
    }

    fn heap_end(&self) -> u64 {
        HEAP + self.pages * PAGE
    }

    fn bump(&self) -> &AtomicU64 {
        &self.bump
    }

    fn class_head(&self, c: usize) -> &AtomicU64 {
        assert_eq!(c, C, "the models have one size class");
        &self.class_head
    }

    fn bucket(&self, b: usize) -> &AtomicU64 {
        &self.buckets[b]
    }

    fn page_entry(&self, page: u64) -> &AtomicU64 {
        &self.page_map[page as usize]
    }
}

impl Heap {
    fn new(pages: u64, gran: u64) -> Heap {
        let starts = (pages * PAGE / gran) as usize;
        Heap {
            gran,
            pages,
            words: (0..2 * starts).map(|_| AtomicU64::new(0)).collect(),
            page_map: (0..pages).map(|_| AtomicU64::new(0)).collect(),
            bump: AtomicU64::new(HEAP),
            class_head: AtomicU64::new(0),
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            payload: (0..starts).map(|_| UnsafeCell::new(0)).collect(),
            owned: (0..starts).map(|_| AtomicBool::new(false)).collect(),
            last_gen: (0..starts).map(|_| AtomicU64::new(NO_LIFE)).collect(),
        }
    }

    /// The block starts covered by `len` bytes at `off`.
    fn starts(&self, off: u64, len: u64) -> std::ops::Range<usize> {
        assert!(off >= HEAP && (off - HEAP) % self.gran == 0 && len > 0);
        let first = ((off - HEAP) / self.gran) as usize;
        first..first + (len / self.gran).max(1) as usize
    }

    /// A new owner's part of `alloc_block`: takes ownership of `len` bytes at `off` (handed out
    /// with generation `generation`, `clean` if its payload is known to be zero) and writes them.
    fn own(&self, off: u64, len: u64, generation: u32, clean: bool, who: u64) {
        let prev = self.last_gen[self.starts(off, len).start].swap(generation as u64, Relaxed);
        assert!(
            prev == NO_LIFE || generation as u64 > prev,
            "block {off:#x} handed out in generation {generation} after generation {prev}: a \
             stale blob of the earlier life would match it"
        );
        for i in self.starts(off, len) {
            assert!(
                !self.owned[i].swap(true, Relaxed),
                "bytes at {:#x} handed out twice",
                HEAP + i as u64 * self.gran
            );
            self.payload[i].with_mut(|p| {
                // SAFETY: loom checks that this access is ordered after every other access to
                // the cell (by earlier owners); a u64 has no invalid bit patterns.
                unsafe {
                    if clean {
                        assert_eq!(*p, 0, "block {off:#x} handed out as clean is not zero");
                    }
                    *p = who;
                }
            });
        }
    }

    /// The owner gives up `len` bytes at `off` (before it publishes them), after checking they
    /// still hold what it wrote.
    fn disown(&self, off: u64, len: u64, who: u64) {
        for i in self.starts(off, len) {
            self.payload[i].with(|p| {
                // SAFETY: loom checks that this read is ordered with every write to the cell.
                let v = unsafe { *p };
                assert_eq!(v, who, "block {off:#x} was overwritten by another owner");
            });
            self.owned[i].store(false, Relaxed);
        }
    }

    /// `Pool::alloc_large` of a `pages`-page extent as the arena asks for it: freed space first
    /// (`carve` false), then fresh space. Returns its offset and length in pages.
    fn alloc_large(&self, pages: u64, who: u64) -> Res<(u64, u64)> {
        let (off, got) = match space::alloc_extent(self, pages, false) {
            Err(Fail::Full) => space::alloc_extent(self, pages, true)?,
            other => other?,
        };
        let g = space::take(self, off, CLASS_LARGE, got * PAGE, 0);
        self.own(off, got * PAGE, g.generation(), g.clean(), who);
        Ok((off, got))
    }

    /// `Pool::free_block` of the extent at `off`, which the caller owns; `trim` says whether it
    /// zeroes the payload (as `trim_extent` does) before the extent is listed.
    fn free_large(&self, off: u64, pages: u64, who: u64, trim: bool) -> Res<()> {
        self.disown(off, pages * PAGE, who);
        self.free_extent(off, trim)
    }

    /// The part of `Pool::free_block` for an extent, without the ownership bookkeeping.
    fn free_extent(&self, off: u64, trim: bool) -> Res<()> {
        assert!(space::is_heap_block(self, off));
        let old = self.word(off).load(Relaxed);
        let new = space::freed_info(old, false)?;
        assert_eq!(info_class(old), CLASS_LARGE);
        let freed = space::free_extent(self, off, old, new, |pages| {
            if trim {
                for i in self.starts(off, pages * PAGE) {
                    self.payload[i].with_mut(|p| {
                        // SAFETY: loom checks this write against every other access to the
                        // cell: the extent is still the freer's, until it is pushed.
                        unsafe { *p = 0 }
                    });
                }
            }
            trim
        })?;
        assert!(freed > 0);
        Ok(())
    }

    /// `Pool::alloc_small` of the model's class (past the thread cache): returns the block.
    fn alloc_small(&self, who: u64) -> Res<u64> {
        let off = space::pop_or_refill(self, C, SPAN_PAGES, SIZE, true)?;
        if !space::is_free_block(self, off, C) {
            return Err(Fail::Corrupt(
                "free list holds something not a free block of its class",
            ));
        }
        let g = space::take(self, off, C as u64, SIZE, 0);
        self.own(off, SIZE, g.generation(), g.clean(), who);
        Ok(off)
    }

    /// `Pool::free_block` of a small block the caller owns (past the thread cache).
    fn free_small(&self, off: u64, who: u64) {
        assert!(space::is_heap_block(self, off));
        let info_w = self.word(off);
        let old = info_w.load(Relaxed);
        let new = space::freed_info(old, false).expect("freeing an allocated block");
        self.disown(off, SIZE, who);
        info_w.store(new, Relaxed);
        push(self, self.class_head(C), off);
    }

    /// After the threads are joined: the heap up to the bump pointer is made of the blocks the
    /// page map describes, each owned or on its free list exactly once (and popping the lists
    /// empties them); nothing past the bump pointer was touched. Returns the blocks owned.
    fn assert_accounted(&self) -> BTreeSet<u64> {
        let mut listed = BTreeSet::new();
        let lists = std::iter::once((&self.class_head, None))
            .chain(self.buckets.iter().enumerate().map(|(b, h)| (h, Some(b))));
        for (head, bucket) in lists {
            while let Some(off) = pop(self, head) {
                assert!(listed.insert(off), "block {off:#x} is on a free list twice");
                if let Some(b) = bucket {
                    let pages = space::extent_len(self, off).expect("a listed extent");
                    assert_eq!(bucket_of(pages), b, "extent {off:#x} on the wrong list");
                }
            }
        }
        let bump = self.bump.load(Relaxed);
        assert!(bump >= HEAP && bump <= self.heap_end() && bump % PAGE == 0);
        let top = (bump - HEAP) / PAGE;
        let mut owned = BTreeSet::new();
        let mut page = 0;
        while page < top {
            let e = self.page_map[page as usize].load(Relaxed);
            let off = HEAP + page * PAGE;
            let (class, blocks, size, pages) = match pm_kind(e) {
                PM_LARGE => (CLASS_LARGE, 1, pm_value(e) * PAGE, pm_value(e)),
                PM_SMALL => {
                    for i in 0..SPAN_PAGES {
                        let e = self.page_map[(page + i) as usize].load(Relaxed);
                        assert_eq!(e, pm_small(C as u64, i), "page {}: no span", page + i);
                    }
                    (C as u64, SPAN_PAGES * PAGE / SIZE, SIZE, SPAN_PAGES)
                }
                _ => panic!("page {page} was handed out by the bump pointer but holds nothing"),
            };
            assert!(pages > 0 && page + pages <= top, "page {page}: {e:#x}");
            for b in 0..blocks {
                let at = off + b * size;
                let i = self.word(at).load(Relaxed);
                assert_eq!(info_class(i), class, "block {at:#x} has the wrong class");
                let on_list = listed.remove(&at);
                let starts = self.starts(at, size);
                let is_owned = self.owned[starts.start].load(Relaxed);
                for s in starts.clone() {
                    assert_eq!(self.owned[s].load(Relaxed), is_owned);
                }
                if on_list {
                    assert!(!is_owned, "block {at:#x} is listed and owned");
                    assert_eq!(
                        info_state(i),
                        STATE_FREE,
                        "listed block {at:#x} is not free"
                    );
                } else {
                    assert!(is_owned, "block {at:#x} is lost: neither listed nor owned");
                    assert_eq!(info_state(i), STATE_ALLOC, "owned block {at:#x}");
                    owned.insert(at);
                }
                let last = self.last_gen[starts.start].load(Relaxed);
                if last != NO_LIFE {
                    assert_eq!(
                        last + on_list as u64,
                        info_generation(i) as u64,
                        "block {at:#x}: a free moves the generation on, an allocation keeps it"
                    );
                }
            }
            page += pages;
        }
        assert!(listed.is_empty(), "not blocks, but listed: {listed:x?}");
        for page in top..self.pages {
            assert_eq!(self.page_map[page as usize].load(Relaxed), 0);
        }
        let first_fresh = ((bump - HEAP) / self.gran) as usize;
        for (i, o) in self.owned.iter().enumerate().skip(first_fresh) {
            assert!(
                !o.load(Relaxed),
                "block start {i} past the bump pointer is owned"
            );
            let w = &self.words[2 * i];
            assert_eq!(w.load(Relaxed), 0, "header past the bump pointer written");
        }
        owned
    }
}

/// Model A, fresh space: two threads take extents from a three-page heap by the bump pointer
/// (one page twice, and two pages), more than fits. Every extent handed out is disjoint from the
/// others (`own`, and loom on the payloads), a request fails as full only when what is left is
/// too short, and the bump pointer ends at exactly the pages handed out.
#[test]
fn bump_hands_out_disjoint_space() {
    model(|| {
        let heap = Arc::new(Heap::new(3, PAGE));
        let h = heap.clone();
        let t = thread::spawn(move || {
            let r = h.alloc_large(2, 2);
            vec![(2, r.map(|(_, got)| got))]
        });
        let mut results = vec![];
        for _ in 0..2 {
            let r = heap.alloc_large(1, 1);
            results.push((1, r.map(|(_, got)| got)));
        }
        results.extend(t.join().unwrap());
        let owned = heap.assert_accounted();
        let bump = heap.bump.load(Relaxed);
        let mut handed = 0;
        for (want, r) in results {
            match r {
                Ok(got) => {
                    assert_eq!(got, want, "fresh space is handed out exactly");
                    handed += got;
                }
                Err(f) => {
                    assert_eq!(f, Fail::Full);
                    assert!(
                        heap.heap_end() - bump < want * PAGE,
                        "a request of {want} pages failed with {} bytes left",
                        heap.heap_end() - bump
                    );
                }
            }
        }
        assert_eq!(owned.len(), 2, "extents handed out: {owned:x?}");
        assert_eq!(
            bump,
            HEAP + handed * PAGE,
            "the bump pointer counts what it handed out"
        );
        for off in owned {
            let e = heap.page_map[((off - HEAP) / PAGE) as usize].load(Relaxed);
            assert!(e == pm_large(1) || e == pm_large(2), "page map: {e:#x}");
        }
    });
}

/// Model B, span refills racing pops: two threads allocate and free small blocks of one class
/// from an empty two-page heap (one takes two blocks and frees them, the other takes and frees
/// one block twice), so that both may refill at once, and one pops blocks of a chain the other
/// just pushed. Nobody gets a block twice, every block a thread gets is a free block of the class
/// (the headers the refiller wrote are visible), the payloads are ordered, and at the end every
/// block of every span is back on the list.
#[test]
fn refill_races_refill_and_pops() {
    model(|| {
        let heap = Arc::new(Heap::new(2, SIZE));
        let h = heap.clone();
        let t = thread::spawn(move || {
            for _ in 0..2 {
                let a = h.alloc_small(2).unwrap();
                h.free_small(a, 2);
            }
        });
        let a = heap.alloc_small(1).unwrap();
        let b = heap.alloc_small(1).unwrap();
        heap.free_small(a, 1);
        heap.free_small(b, 1);
        t.join().unwrap();
        assert!(heap.assert_accounted().is_empty());
    });
}

/// Model C, an extent freed (and trimmed: its payload zeroed) while another thread waits for it:
/// on a two-page heap, one thread frees the extent it owns with trimming; the other takes the
/// fresh page, then retries until it gets the freed extent. The extent comes back clean (its
/// payload reads zero), its next life has a new generation, the trim's writes happen before the
/// new owner's accesses, and the freer's writes before the trim's.
#[test]
fn trimmed_extent_freed_while_reused() {
    model(|| {
        let heap = Arc::new(Heap::new(2, PAGE));
        let (x, _) = heap.alloc_large(1, 1).unwrap();
        let h = heap.clone();
        let t = thread::spawn(move || h.free_large(x, 1, 1, true).unwrap());
        let mut got = BTreeSet::new();
        loop {
            match heap.alloc_large(1, 2) {
                Ok((off, _)) => {
                    got.insert(off);
                    if off == x {
                        break;
                    }
                }
                Err(Fail::Full) => thread::yield_now(),
                Err(f) => panic!("{f:?}"),
            }
        }
        t.join().unwrap();
        assert_eq!(heap.assert_accounted(), got);
        let i = heap.word(x).load(Relaxed);
        assert_eq!(info_generation(i), 1, "the extent's second life");
    });
}

/// Model D, an extent recycled as a span: one thread frees a one-page extent (without trimming),
/// while the other allocates small blocks (one-page spans) until it gets one in the extent's
/// page. Block 0 of the span continues the extent's generations (a stale blob of the extent must
/// not match it), the freer's payload writes happen before the new owner's, and everything is
/// accounted for.
#[test]
fn extent_recycled_as_span() {
    model(|| {
        let heap = Arc::new(Heap::new(2, SIZE));
        let (x, _) = heap.alloc_large(1, 1).unwrap();
        let h = heap.clone();
        let t = thread::spawn(move || h.free_large(x, 1, 1, false).unwrap());
        let mut got = vec![];
        loop {
            match heap.alloc_small(2) {
                Ok(off) => {
                    got.push(off);
                    if off == x {
                        break;
                    }
                }
                Err(Fail::Full) => thread::yield_now(),
                Err(f) => panic!("{f:?}"),
            }
        }
        t.join().unwrap();
        let owned = heap.assert_accounted();
        assert_eq!(owned, got.iter().copied().collect());
        assert_eq!(info_generation(heap.word(x).load(Relaxed)), 1);
    });
}

/// Model E, racing double frees of an extent (a bug of an unsafe caller, but it must not list one
/// extent twice: two later owners of one block): two threads free the same extent at once.
/// Exactly one free succeeds, and the extent is listed once.
#[test]
fn racing_double_frees_of_an_extent() {
    model(|| {
        let heap = Arc::new(Heap::new(1, PAGE));
        let (x, _) = heap.alloc_large(1, 1).unwrap();
        heap.disown(x, PAGE, 1);
        let h = heap.clone();
        let t = thread::spawn(move || h.free_extent(x, false).is_ok());
        let mine = heap.free_extent(x, false).is_ok();
        let theirs = t.join().unwrap();
        assert!(
            mine != theirs,
            "{} frees of one extent succeeded",
            mine as u8 + theirs as u8
        );
        assert!(heap.assert_accounted().is_empty());
    });
}
