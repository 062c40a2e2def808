//! Unit tests of the arena: raw blocks, clean releases, scribbled allocator metadata.

use super::super::lockfree::{Words, LINK};
use super::*;
use crate::sync::Ordering::Relaxed;

fn arena() -> Arena {
    Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap()
}

#[test]
fn release_zeroed_prefix_makes_the_next_zeroed_alloc_free_of_charge() {
    let arena = arena();
    let mut b = arena.alloc_zeroed(8192).unwrap();
    b.as_mut_slice()[..100].fill(9);
    let at = b.block_ref();
    // SAFETY: only the first 100 bytes were written; the block came zeroed.
    unsafe { b.release_zeroed_prefix(100) };
    let (pool, g) = arena.grant(8192, 0).unwrap();
    assert_eq!(g.off + BLOCK_HDR, at.offset);
    assert!(g.clean(), "the block was released clean");
    pool.free_block(g.off, false).unwrap();
    // A plain drop leaves it dirty.
    let b = arena.alloc(8192).unwrap();
    drop(b);
    let (pool, g) = arena.grant(8192, 0).unwrap();
    assert!(!g.clean());
    pool.free_block(g.off, false).unwrap();
    assert_eq!(arena.stats().blocks_in_use, 0);
}

#[test]
fn raw_blocks_round_trip_and_bad_references_are_refused() {
    let arena = arena();
    let mut b = arena.alloc(500).unwrap();
    b.as_mut_slice().fill(3);
    let r = b.into_raw();
    assert_eq!(arena.stats().blocks_in_use, 1);
    // SAFETY: `r` came from `into_raw` and is adopted once.
    let b = unsafe { arena.block_from_raw(r, 500) }.unwrap();
    assert!(b.as_slice().iter().all(|&x| x == 3));
    drop(b);
    let stale = BlockRef { ..r };
    // SAFETY: the block was freed (stale generation), so validation refuses the call and
    // nothing is adopted: no second owner can arise.
    let e = unsafe { arena.block_from_raw(stale, 500) }.unwrap_err();
    assert!(matches!(e, Error::Stale), "{e:?}");
    let b = arena.alloc(500).unwrap();
    let r = b.block_ref();
    // SAFETY: the contract (sole ownership of what is adopted) holds trivially: the length
    // exceeds the block, so validation refuses the call and nothing is adopted.
    let e = unsafe { arena.block_from_raw(r, 1 << 20) }.unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { .. }), "{e:?}");
    // SAFETY: as above: the pool is unknown, so nothing is adopted.
    let e = unsafe { arena.block_from_raw(BlockRef { pool: 9, ..r }, 1) }.unwrap_err();
    assert!(matches!(e, Error::UnknownPool(9)), "{e:?}");
    drop(b);
    assert_eq!(arena.stats().blocks_in_use, 0);
}

#[test]
fn a_scribbled_free_list_is_reported_not_followed() {
    let arena = arena();
    let c = class_for(100).unwrap();
    drop(arena.alloc(100).unwrap()); // carve a span: the class list is non-empty
    arena.flush_thread_cache(); // so that the next allocation goes to the shared list
    let pool = arena.pool(0).unwrap();
    let head = &pool.hdr().classes[c].0.head;
    let good = head.load(Relaxed);
    // A head pointing into the pool header, then one pointing past the end of the pool.
    for bad in [super::super::lockfree::pack(4096, 5), u64::MAX] {
        head.store(bad, Relaxed);
        let e = arena.verify().unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e:?}");
        let e = arena.alloc(100).unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e:?}");
    }
    head.store(good, Relaxed);
    arena.verify().unwrap();
    drop(arena.alloc(100).unwrap());
    // A free-list cycle is caught by verify, which terminates.
    let a = arena.alloc(100).unwrap();
    let off = a.block_ref().offset - BLOCK_HDR;
    drop(a);
    pool.word(off + LINK).store(off, Relaxed);
    let e = arena.verify().unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)), "{e:?}");
}

#[test]
fn scribbled_bump_pointer_and_extent_lengths_are_errors_not_panics() {
    let arena = arena();
    let pool = arena.pool(0).unwrap();
    let bump = &pool.hdr().bump.0;
    let good = bump.load(Relaxed);
    bump.store(4096, Relaxed); // inside the pool header
    let e = arena.alloc(1 << 20).unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)), "{e:?}");
    bump.store(u64::MAX, Relaxed);
    assert!(arena.stats().bytes_reserved <= pool.capacity());
    arena.verify().unwrap(); // walks no further than the heap
    bump.store(good, Relaxed);
    // A large block whose page-map length is scribbled is not freed into a list (leaked).
    let b = arena.alloc(1 << 20).unwrap();
    let off = b.block_ref().offset - BLOCK_HDR;
    let entry = pool.page_entry((off - pool.heap_off()) / PAGE);
    entry.store(pm_large(1 << 40), Relaxed);
    drop(b);
    entry.store(pm_large(1), Relaxed);
    arena.verify().unwrap();
    // block_from_raw with an absurd length is refused without overflow.
    let b = arena.alloc(64).unwrap();
    // SAFETY: the length overflows, so validation refuses the call and nothing is adopted.
    let e = unsafe { arena.block_from_raw(b.block_ref(), usize::MAX) }.unwrap_err();
    assert!(matches!(e, Error::OutOfBounds { .. }), "{e:?}");
}
