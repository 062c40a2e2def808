//! Loom models of the protocols built on the lock-free primitives: segment tables (freeze, adopt,
//! release, dissolve), one-segment handles (republication), adoption of a lend blob, and the
//! validated-block-start cache. They run the functions of `flowipc::shm::protocols` that the
//! arena runs in production, over heap words made of loom atomics.
//!
//! As in the parent file: payloads (segment bytes, a table's or an object's contents) are
//! `loom::cell::UnsafeCell`s, written by their owner and read by holders, so an access that is
//! not ordered by happens-before is reported; bookkeeping (frees counted, adoptions counted) is
//! `Relaxed` read-modify-writes, which add no synchronization that could hide a missing one.

use std::collections::BTreeMap;

use flowipc::shm::layout::{
    class_for, heap_off, info, info_class, info_generation, info_state, span_pages, CLASS_SIZES,
    PAGE, STATE_ALLOC, STATE_FREE,
};
use flowipc::shm::lockfree::{push, rc_release, ticket_issue, Words, LINK};
use flowipc::shm::protocols::{
    adopt_ticket, block_start, dissolve_if_sole, page_entry_off, publish_block, publish_in_place,
    read_entry, release_message, solo_used, table_count, write_entry, write_solo_prefix,
    write_table_header, Refusal, Released, KNOWN_STARTS, PREFIX, SOLO_TAG, TABLE_TAG, TAG_AT,
    T_ENTRIES, T_ENTRY,
};
use loom::cell::UnsafeCell;
use loom::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed},
};
use loom::sync::Arc;
use loom::thread;

use super::model;

/// Sparse word-addressed memory: exactly the words a model names exist (loom atomics are costly,
/// and the block-start model works at real pool offsets, past a 128 KiB header).
struct Sparse {
    words: BTreeMap<u64, AtomicU64>,
}

impl Sparse {
    fn new(offs: impl IntoIterator<Item = u64>) -> Sparse {
        Sparse {
            words: offs.into_iter().map(|o| (o, AtomicU64::new(0))).collect(),
        }
    }
}

impl Words for Sparse {
    fn word(&self, off: u64) -> &AtomicU64 {
        self.words
            .get(&off)
            .unwrap_or_else(|| panic!("the protocol asked for word {off:#x}, not in the model"))
    }
}

/// Writes `v` into a payload cell (loom checks the write against every other access).
fn put(cell: &UnsafeCell<u64>, v: u64) {
    cell.with_mut(|p| {
        // SAFETY: loom checks that this write is ordered after every other access to the cell.
        unsafe { *p = v }
    });
}

/// Reads a payload cell (loom checks the read against every write).
fn get(cell: &UnsafeCell<u64>) -> u64 {
    cell.with(|p| {
        // SAFETY: loom checks that this read is ordered with every write to the cell.
        unsafe { *p }
    })
}

/// The handle block of a message in the models (a table, or a one-segment message's block).
const HANDLE: u64 = 16;
/// Its payload capacity (room for a table of two entries, or a prefix and a word).
const CAP: u64 = T_ENTRIES + 2 * T_ENTRY;
/// Generation of the handle block while allocated (before any republication).
const GEN: u32 = 3;
/// A size class for the handle block (any small class: only the info word's fields matter).
const CLASS: u64 = 1;
/// Pool of the segments, and where segment `i` is (its payload offset; the model keeps its bytes
/// in a cell, not in `Sparse`).
const SEG_POOL: u64 = 0;
fn seg_off(i: usize) -> u64 {
    0x1000 * (i as u64 + 1)
}
/// What the builder wrote into segment `i` before the freeze, and after a thaw.
fn frozen_value(i: usize) -> u64 {
    100 + i as u64
}
const THAWED: u64 = 7;
const FREED: u64 = 0xdead;
/// Used bytes of segment `i`.
fn used(i: usize) -> u64 {
    8 * (i as u64 + 1)
}

/// A frozen message: its handle block in `mem`, its segments' bytes in cells, and what happened
/// to each.
struct Msg {
    mem: Sparse,
    /// Free list the handle block goes to when freed (as `Pool::free_block` pushes it).
    free_list: AtomicU64,
    solo: bool,
    /// The table's own contents, as far as holders read them (its words are atomics in `mem`;
    /// this cell is what loom checks the table's free against).
    table: UnsafeCell<u64>,
    segs: Vec<UnsafeCell<u64>>,
    seg_frees: Vec<AtomicUsize>,
    handle_frees: AtomicUsize,
    /// Set when the builder took the segments back (dissolved the handle).
    taken_back: AtomicBool,
    /// Set (bookkeeping only) when the builder lent the message again after a thaw.
    relent: AtomicBool,
}

impl Msg {
    /// A message of `n` segments (a one-segment handle if `solo`), built (its segments written)
    /// but not yet frozen. The handle block is allocated in generation `GEN`.
    fn built(n: usize, solo: bool) -> Msg {
        let words = (0..(16 + CAP) / 8).map(|k| HANDLE + 8 * k);
        let msg = Msg {
            mem: Sparse::new(words),
            free_list: AtomicU64::new(0),
            solo,
            table: UnsafeCell::new(0),
            segs: (0..n).map(|i| UnsafeCell::new(frozen_value(i))).collect(),
            seg_frees: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            handle_frees: AtomicUsize::new(0),
            taken_back: AtomicBool::new(false),
            relent: AtomicBool::new(false),
        };
        msg.mem
            .word(HANDLE)
            .store(info(STATE_ALLOC, CLASS, 0, GEN), Relaxed);
        msg
    }

    fn p(&self) -> u64 {
        HANDLE + 16
    }

    fn entry(i: usize) -> [u64; 3] {
        [SEG_POOL | (GEN as u64) << 32, seg_off(i), used(i)]
    }

    /// `SegTable::create`: writes the table (the model's cell too) and publishes it.
    fn freeze_table(&self) {
        put(&self.table, TABLE_TAG);
        write_table_header(&self.mem, self.p(), self.segs.len() as u64);
        for i in 0..self.segs.len() {
            write_entry(&self.mem, self.p(), i as u64, Msg::entry(i));
        }
        publish_block(&self.mem, HANDLE, GEN);
    }

    /// `SegTable::create_solo`: writes the prefix and publishes the block in place; returns the
    /// new generation.
    fn freeze_solo(&self, used: u64) -> u32 {
        write_solo_prefix(&self.mem, self.p(), used);
        publish_in_place(&self.mem, HANDLE)
    }

    /// `SegTable::lend`.
    fn lend(&self) {
        ticket_issue(self.mem.word(HANDLE + LINK));
    }

    /// `Arena::borrow_segments` of a blob of `generation`: the live-block check, the adoption,
    /// then the reads. `Err` if refused.
    fn adopt(&self, generation: u32) -> Result<(), Refusal> {
        let i = self.mem.word(HANDLE).load(Acquire);
        if info_state(i) != STATE_ALLOC || info_generation(i) != generation {
            return Err(Refusal::Stale);
        }
        let (tag, min) = if self.solo {
            (SOLO_TAG, PREFIX)
        } else {
            (TABLE_TAG, T_ENTRIES)
        };
        adopt_ticket(&self.mem, HANDLE, i, CAP, generation, Some((tag, min)))
    }

    /// What a reader holding a reference reads: the table (its cell, count and entries) and
    /// every segment, each as the builder froze it.
    fn read_table(&self) {
        assert_eq!(get(&self.table), TABLE_TAG, "a reader read a freed table");
        let n = table_count(&self.mem, self.p());
        assert_eq!(
            n,
            self.segs.len() as u64,
            "a reader read a segment count of {n}"
        );
        for i in 0..self.segs.len() {
            let e = read_entry(&self.mem, self.p(), i as u64);
            assert_eq!(e, Msg::entry(i), "a reader read entry {i} as {e:?}");
            let v = get(&self.segs[i]);
            assert_eq!(v, frozen_value(i), "a reader read segment {i} as {v:#x}");
        }
    }

    /// A holder's drop (`SegTable::drop`): the last one frees what the handle owns.
    fn release(&self) -> Released {
        let released = release_message(&self.mem, HANDLE, CAP, self.solo, |e| {
            let i = (0..self.segs.len())
                .find(|&i| e[1] == seg_off(i))
                .unwrap_or_else(|| panic!("the last release read entry {e:?}"));
            assert_eq!(e, Msg::entry(i), "the last release read entry {i} as {e:?}");
            assert!(
                !self.taken_back.load(Relaxed),
                "segment {i} freed although the builder took it back"
            );
            let before = self.seg_frees[i].fetch_add(1, Relaxed);
            assert_eq!(before, 0, "segment {i} freed twice");
            put(&self.segs[i], FREED);
        });
        match released {
            Released::Held => {}
            Released::LastTable => {
                assert!(!self.solo);
                put(&self.table, FREED);
                self.free_handle();
            }
            Released::LastSolo { used } => {
                assert!(self.solo);
                assert!(used <= CAP - PREFIX, "clearing {used} bytes");
                put(&self.segs[0], FREED);
                self.free_handle();
            }
        }
        released
    }

    /// `Pool::free_block` of the handle block: moves its generation on, marks it free and pushes
    /// it (overwriting the handle word with a free-list link).
    fn free_handle(&self) {
        let before = self.handle_frees.fetch_add(1, Relaxed);
        assert_eq!(before, 0, "message handle freed twice");
        let w = self.mem.word(HANDLE);
        let old = w.load(Relaxed);
        w.store(
            info(STATE_FREE, info_class(old), 0, info_generation(old) + 1),
            Relaxed,
        );
        push(&self.mem, &self.free_list, HANDLE);
    }

    /// After the threads are joined: the handle freed exactly once, and every segment freed
    /// exactly once unless the builder took them back (then never).
    fn assert_freed(&self) {
        assert_eq!(
            self.handle_frees.load(Relaxed),
            1,
            "message handle never freed (leak)"
        );
        let back = self.taken_back.load(Relaxed);
        for (i, f) in self.seg_frees.iter().enumerate() {
            let f = f.load(Relaxed);
            let want = if self.solo || back { 0 } else { 1 };
            assert_eq!(f, want, "segment {i} freed {f} times (taken back: {back})");
        }
    }
}

/// Model S1, a frozen table and its readers: the builder freezes a two-segment message into a
/// table and lends it twice; two readers (who got the blobs after the lends) adopt it, read the
/// table and the segments, and drop their references, while the builder drops its own. Every
/// adoption succeeds and sees the entries and the bytes written before the freeze; the last
/// release, whoever it is, frees each segment and the table exactly once, after every read.
#[test]
fn table_freed_once_after_readers() {
    model(|| {
        let msg = Arc::new(Msg::built(2, false));
        msg.freeze_table();
        msg.lend();
        msg.lend();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let m = msg.clone();
                thread::spawn(move || {
                    m.adopt(GEN).expect("a lent table refused");
                    m.read_table();
                    m.release();
                })
            })
            .collect();
        msg.release();
        for r in readers {
            r.join().unwrap();
        }
        msg.assert_freed();
    });
}

/// Model S2, thawing a frozen table (`OutMsg::builder_mut`) while a reader borrows it: the
/// builder freezes and lends once; the reader (who got the blob) adopts, reads and drops, while
/// the builder wants to write again (it tries, lets the reader run, and tries once more: loom
/// would not otherwise run the reader to its end before the builder's one check). If
/// `dissolve_if_sole` says the builder is the only holder, it frees the table and writes its
/// segments in place; otherwise it copies them (reads) and drops its reference, leaving them to
/// the reader. The lent blob is never refused; the builder
/// writes only after the reader's last read; everything is freed (or taken back) exactly once.
#[test]
fn table_thaw_waits_for_readers() {
    model(|| {
        let msg = Arc::new(Msg::built(2, false));
        msg.freeze_table();
        msg.lend();
        let m = msg.clone();
        let reader = thread::spawn(move || {
            m.adopt(GEN).expect("a lent table refused");
            m.read_table();
            m.release();
        });
        let sole = dissolve_if_sole(&msg.mem, HANDLE, false) || {
            thread::yield_now();
            dissolve_if_sole(&msg.mem, HANDLE, false)
        };
        if sole {
            msg.taken_back.store(true, Relaxed);
            put(&msg.table, FREED);
            msg.free_handle();
            for s in &msg.segs {
                put(s, THAWED);
            }
        } else {
            // Copy-on-write: the copy reads the shared segments, then lets them go.
            for (i, s) in msg.segs.iter().enumerate() {
                assert_eq!(get(s), frozen_value(i));
            }
            msg.release();
        }
        reader.join().unwrap();
        msg.assert_freed();
    });
}

/// Model S3, a one-segment message thawed and sent again: the builder freezes it in place
/// (prefix, `publish_in_place`) and lends it; a reader adopts the blob, reads the prefix and the
/// segment, drops it, and then replays the same blob. The builder waits until it is the sole
/// holder, dissolves the handle, rewrites the segment, republishes it and lends it to a second
/// reader. The replay of the first blob is refused (a new publication is a new generation), the
/// second reader's adoption is not and sees the second contents, every access is ordered, and the
/// block is freed once, by the last release. The first reader replays the blob at once, and
/// again once the second lend is made (the dangerous moment, which loom would otherwise not
/// reach: it does not preempt a thread just to delay its next step).
#[test]
fn solo_republication_refuses_old_blobs() {
    model(|| {
        let msg = Arc::new(Msg::built(1, true));
        let g1 = msg.freeze_solo(used(0));
        msg.lend();
        let m = msg.clone();
        let first = thread::spawn(move || {
            m.adopt(g1).expect("a lent one-segment message refused");
            assert_eq!(solo_used(&m.mem, m.p()), used(0));
            assert_eq!(get(&m.segs[0]), frozen_value(0));
            assert_eq!(m.release(), Released::Held, "the builder still holds it");
            // The same blob again (a replayed message), now and after the second lend.
            assert!(m.adopt(g1).is_err(), "a replayed blob adopted a reference");
            while !m.relent.load(Relaxed) {
                thread::yield_now();
            }
            assert!(m.adopt(g1).is_err(), "a replayed blob adopted a reference");
        });
        while !dissolve_if_sole(&msg.mem, HANDLE, true) {
            thread::yield_now();
        }
        put(&msg.segs[0], THAWED);
        let g2 = msg.freeze_solo(2 * used(0));
        msg.lend();
        msg.relent.store(true, Relaxed);
        let m = msg.clone();
        let second = thread::spawn(move || {
            m.adopt(g2).expect("a lent one-segment message refused");
            assert_eq!(solo_used(&m.mem, m.p()), 2 * used(0));
            assert_eq!(get(&m.segs[0]), THAWED);
            m.release();
        });
        first.join().unwrap();
        second.join().unwrap();
        msg.release();
        msg.assert_freed();
    });
}

/// An object for the adoption models: a published handle block whose payload starts with a type
/// tag, and a value in a cell.
const TAG_RIGHT: u64 = 0x1111;
const TAG_WRONG: u64 = 0x2222;
const VALUE: u64 = 42;

/// `Arena::borrow` (typed) or `release_blob` (untyped) of a blob of generation `GEN` of the
/// message block (reused as an object block: the same header words).
fn adopt_object(msg: &Msg, typed: Option<u64>) -> Result<(), Refusal> {
    let i = msg.mem.word(HANDLE).load(Acquire);
    if info_state(i) != STATE_ALLOC || info_generation(i) != GEN {
        return Err(Refusal::Stale);
    }
    adopt_ticket(&msg.mem, HANDLE, i, CAP, GEN, typed.map(|t| (t, 16)))
}

/// `Arena::construct`: the tag and the value written, then the block published.
fn construct(msg: &Msg) {
    put(&msg.segs[0], VALUE);
    msg.mem.word(HANDLE + 16 + TAG_AT).store(TAG_RIGHT, Relaxed);
    publish_block(&msg.mem, HANDLE, GEN);
}

/// A handle's drop (`handle::release`): the last reference frees the block.
fn drop_object(msg: &Msg) {
    if rc_release(msg.mem.word(HANDLE + LINK)) {
        put(&msg.segs[0], FREED);
        msg.free_handle();
    }
}

/// After the threads: `release_blob` of whatever lent references nobody adopted.
fn release_blobs(msg: &Msg) -> usize {
    let mut n = 0;
    while adopt_object(msg, None).is_ok() {
        drop_object(msg);
        n += 1;
    }
    n
}

/// Model A1, adoption by borrowers of the wrong and the right type: the owner constructs an
/// object, lends it once and drops its handle; a borrower of the wrong type and one of the right
/// type (both with the blob) try to adopt it. The wrong one is refused (`TypeMismatch`, or
/// `Stale` while the other holds the ticket) and hands its ticket back; the right one, if it
/// adopts, reads the value. The one lent reference is adopted or released exactly once, and the
/// object freed exactly once.
#[test]
fn adopt_wrong_type_returns_ticket() {
    model(|| {
        let obj = Arc::new(Msg::built(1, false));
        construct(&obj);
        obj.lend();
        let o = obj.clone();
        let wrong = thread::spawn(move || match adopt_object(&o, Some(TAG_WRONG)) {
            Err(Refusal::TypeMismatch { expected, found }) => {
                assert_eq!((expected, found), (TAG_WRONG, TAG_RIGHT));
            }
            Err(Refusal::Stale) => {}
            Ok(()) => panic!("adopted as the wrong type"),
        });
        let o = obj.clone();
        let right = thread::spawn(move || match adopt_object(&o, Some(TAG_RIGHT)) {
            Ok(()) => {
                assert_eq!(get(&o.segs[0]), VALUE);
                drop_object(&o);
                1
            }
            Err(Refusal::Stale) => 0,
            Err(e) => panic!("the right type refused: {e:?}"),
        });
        drop_object(&obj);
        wrong.join().unwrap();
        let adopted = right.join().unwrap();
        let released = release_blobs(&obj);
        assert_eq!(
            adopted + released,
            1,
            "1 lend: {adopted} adopted, {released} released"
        );
        assert_eq!(obj.handle_frees.load(Relaxed), 1, "object never freed");
    });
}

/// Model A2, the type is checked only once the ticket is taken: a borrower already holds the
/// blob bytes while the owner constructs the object (tag and value), publishes it, lends it and
/// drops its handle. A borrower whose ticket take succeeds must find the right tag and see the
/// value (ordered by the lend alone); it is never refused for its type.
#[test]
fn adopt_checks_type_after_ticket() {
    model(|| {
        let obj = Arc::new(Msg::built(1, false));
        let o = obj.clone();
        let borrower = thread::spawn(move || match adopt_object(&o, Some(TAG_RIGHT)) {
            Ok(()) => {
                assert_eq!(get(&o.segs[0]), VALUE);
                drop_object(&o);
                1
            }
            Err(Refusal::Stale) => 0,
            Err(e) => panic!("the right type refused: {e:?}"),
        });
        construct(&obj);
        obj.lend();
        drop_object(&obj);
        let adopted = borrower.join().unwrap();
        let released = release_blobs(&obj);
        assert_eq!(
            adopted + released,
            1,
            "1 lend: {adopted} adopted, {released} released"
        );
        assert_eq!(obj.handle_frees.load(Relaxed), 1, "object never freed");
    });
}

/// Model V1, the validated-start cache: one thread carves a fresh span (headers, then the page
/// map, `carve_span`); a validator waits until the page-map entry of the span's second block is
/// there and validates the block (`block_start`, which caches it); another waits until the cache
/// holds it and validates it again through the cache. Both must succeed and see the header
/// `carve_span` wrote: the cache hit is ordered after the first validation's page-map read.
#[test]
fn start_cache_hit_sees_header() {
    model(|| {
        let capacity = 1 << 20;
        let heap = heap_off(capacity);
        let c = class_for(16384 - 16).expect("a small class");
        let size = CLASS_SIZES[c] as u64;
        let blocks = 16 * PAGE / size;
        let words = (0..16)
            .map(page_entry_off)
            .chain((0..blocks).flat_map(|i| [heap + i * size, heap + i * size + 8]));
        let mem = Arc::new(Sparse::new(words));
        let known = Arc::new(std::array::from_fn::<_, KNOWN_STARTS, _>(|_| {
            AtomicU64::new(0)
        }));
        let target = heap + size;
        let expect = (info(STATE_FREE, c as u64, 0, 0), size - 16);
        let (m, k) = (mem.clone(), known.clone());
        let first = thread::spawn(move || {
            let page = (target - heap) / PAGE;
            while m.word(page_entry_off(page)).load(Relaxed) == 0 {
                thread::yield_now();
            }
            let got = block_start(&*m, &k, heap, capacity, target);
            assert_eq!(
                got,
                Ok(expect),
                "validation after the page map is published"
            );
        });
        let (m, k) = (mem.clone(), known.clone());
        let cached = thread::spawn(move || {
            let slot = &k[(target >> 4) as usize % KNOWN_STARTS];
            while slot.load(Relaxed) == 0 {
                thread::yield_now();
            }
            let got = block_start(&*m, &k, heap, capacity, target);
            assert_eq!(got, Ok(expect), "validation through the cache");
        });
        let n = flowipc::shm::space::carve_span(
            &*mem,
            heap,
            c,
            span_pages(c),
            CLASS_SIZES[c] as u64,
            false,
            |i| mem.word(page_entry_off(i)),
        );
        assert_eq!(n, blocks);
        first.join().unwrap();
        cached.join().unwrap();
    });
}
