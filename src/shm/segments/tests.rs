//! Unit tests of messages' segments: sharing, thawing, forged and corrupt tables.

use capnp::message::{Reader, ReaderSegments};

use super::heap::{SPARES, SPARE_COUNT, SPARE_MAX_WORDS};
use super::*;
use crate::shm::layout::BLOCK_HDR;
use crate::shm::lockfree::Words;
use crate::shm::{Arena, ArenaConfig, Error, LendBlob};
use crate::sync::Ordering;

fn arena() -> Arena {
    Arena::create(ArenaConfig::new().pool_size(64 << 20)).unwrap()
}

fn fill(msg: &mut OutMsg, n: u32, byte: u8) {
    let b = msg.builder_mut();
    let mut list = b.initn_root::<capnp::data_list::Builder<'_>>(1);
    list.set(0, &vec![byte; n as usize]);
}

fn read_first(segs: ShmSegments) -> Vec<u8> {
    let r = Reader::new(segs, Default::default());
    let list = r.get_root::<capnp::data_list::Reader<'_>>().unwrap();
    list.get(0).unwrap().to_vec()
}

#[test]
fn shared_in_place_then_freed_by_the_last_holder() {
    let arena = arena();
    let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
    fill(&mut msg, 100_000, 7);
    let blob = msg.share_shm().unwrap();
    assert_eq!(msg.table_refs(), Some(2));
    let segs = arena.borrow_segments(&blob).unwrap();
    let seg0 = segs.get_segment(0).unwrap().as_ptr();
    assert!(msg
        .builder()
        .get_segments_for_output()
        .iter()
        .any(|s| s.as_ptr() == seg0));
    assert_eq!(read_first(segs), vec![7; 100_000]);
    assert_eq!(msg.table_refs(), Some(1));
    let in_use = arena.stats().blocks_in_use;
    drop(msg);
    assert_eq!(arena.stats().blocks_in_use, 0, "had {in_use}");
    // Replaying the blob now fails: stale.
    assert!(matches!(arena.borrow_segments(&blob), Err(Error::Stale)));
}

#[test]
fn a_corrupt_entry_is_an_error_on_receipt_for_the_root_and_on_access_for_others() {
    let arena = arena();
    let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
    fill(&mut msg, 100_000, 7); // the root in segment 0, the data in segment 1
    let blob = msg.share_shm().unwrap();
    let pool = arena.pool(blob.pool()).unwrap();
    let entry = |i: u64| pool.word(blob.offset() + T_ENTRIES + i * T_ENTRY);
    // Segment 1 names a generation it never had: receipt works, reading it fails cleanly.
    let good = entry(1).load(Ordering::Relaxed);
    entry(1).store(good ^ (1 << 40), Ordering::Relaxed);
    let segs = arena.borrow_segments(&blob).unwrap();
    assert!(segs.get_segment(1).is_none());
    let r = Reader::new(segs, Default::default());
    let list = r.get_root::<capnp::data_list::Reader<'_>>().unwrap();
    assert!(list.get(0).is_err());
    drop(r);
    entry(1).store(good, Ordering::Relaxed);
    // Segment 0 corrupt: refused on receipt with the specific error, reference given back.
    let good0 = entry(0).load(Ordering::Relaxed);
    entry(0).store(good0 ^ (1 << 40), Ordering::Relaxed);
    let blob2 = msg.share_shm().unwrap();
    assert!(matches!(arena.borrow_segments(&blob2), Err(Error::Stale)));
    entry(0).store(good0, Ordering::Relaxed);
    assert_eq!(msg.table_refs(), Some(1));
    drop(msg);
    assert_eq!(arena.stats().blocks_in_use, 0);
}

#[test]
fn receiver_outlives_sender() {
    let arena = arena();
    let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
    fill(&mut msg, 5000, 3);
    let blob = msg.share_shm().unwrap();
    drop(msg);
    assert!(arena.stats().blocks_in_use > 0);
    let segs = arena.borrow_segments(&blob).unwrap();
    assert_eq!(read_first(segs), vec![3; 5000]);
    assert_eq!(arena.stats().blocks_in_use, 0);
}

#[test]
fn write_while_shared_copies_and_unshared_reuses() {
    let arena = arena();
    let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
    fill(&mut msg, 1000, 1);
    let blob = msg.share_shm().unwrap();
    let held = arena.borrow_segments(&blob).unwrap();
    let p_before = held.get_segment(0).unwrap().as_ptr();
    // Re-send unchanged: one more reference, same table.
    let blob2 = msg.share_shm().unwrap();
    assert_eq!(msg.table_refs(), Some(3));
    arena.release_blob(&blob2).unwrap();
    // Write while `held` reads: copy-on-write.
    fill(&mut msg, 1000, 2);
    assert_eq!(msg.table_refs(), None);
    assert_ne!(
        msg.builder().get_segments_for_output()[0].as_ptr(),
        p_before
    );
    assert_eq!(read_first(held), vec![1; 1000]);
    // Now nobody else holds the new one: share, release, write in place.
    let blob3 = msg.share_shm().unwrap();
    arena.release_blob(&blob3).unwrap();
    let p = msg.builder().get_segments_for_output()[0].as_ptr();
    fill(&mut msg, 1000, 4);
    assert_eq!(msg.builder().get_segments_for_output()[0].as_ptr(), p);
    drop(msg);
    assert_eq!(arena.stats().blocks_in_use, 0);
    arena.verify().unwrap();
}

#[test]
fn growth_is_capped_and_big_objects_get_exact_segments() {
    let arena = Arena::create(ArenaConfig::new()).unwrap();
    let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
    {
        let b = msg.builder_mut();
        let root = b.initn_root::<capnp::data_list::Builder<'_>>(3);
        let _ = root;
    }
    let big = 200 << 20;
    {
        let b = msg.builder_mut();
        let mut list = b.get_root::<capnp::data_list::Builder<'_>>().unwrap();
        list.set(0, &vec![9u8; big]);
    }
    let reserved = msg.reserved_words() * 8;
    assert!(reserved < big as u64 + (8 << 20), "reserved {reserved}");
    drop(msg);
    assert_eq!(arena.stats().blocks_in_use, 0);
}

#[test]
fn exhausted_arena_falls_back_to_heap_and_refuses_to_share() {
    let arena = Arena::create(ArenaConfig::new().pool_size(1 << 20).max_pools(1)).unwrap();
    let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
    fill(&mut msg, 4 << 20, 5);
    assert!(matches!(
        msg.alloc_failure(),
        Some(Error::OutOfMemory { .. } | Error::TooLarge { .. })
    ));
    assert!(matches!(
        msg.share_shm(),
        Err(Error::OutOfMemory { .. } | Error::TooLarge { .. })
    ));
    // The message is intact and readable.
    let r = msg
        .builder()
        .get_root_as_reader::<capnp::data_list::Reader<'_>>()
        .unwrap();
    assert_eq!(r.get(0).unwrap().len(), 4 << 20);
    drop(msg);
    assert_eq!(arena.stats().blocks_in_use, 0);
}

#[test]
fn heap_mode_freezes_while_parts_are_held() {
    let mut msg = OutMsg::new(None, SegmentSizes::default());
    fill(&mut msg, 100, 1);
    let parts = msg.share_heap().unwrap();
    assert!(msg.is_frozen_by_others());
    let held = parts[0].0.clone();
    drop(parts);
    fill(&mut msg, 100, 2);
    // The held buffer still has the old bytes.
    let old: &[u8] = (*held).as_ref();
    assert!(old.windows(100).any(|w| w == [1u8; 100]));
    assert!(!old.windows(100).any(|w| w == [2u8; 100]));
    drop(held);
    assert!(!msg.is_frozen_by_others());
}

#[test]
fn heap_segments_are_recycled_clean() {
    let words = 1024;
    let fresh = || HeapSeg::zeroed(words);
    let seg = fresh();
    let first = seg.ptr;
    // SAFETY: the test owns the buffer alone; it writes within its `words` words.
    unsafe { std::ptr::write_bytes(seg.ptr.as_ptr().cast::<u8>(), 0xAB, 100) };
    seg.written(100);
    drop(seg);
    let seg = fresh();
    assert_eq!(seg.ptr, first, "the spare came back");
    assert!(seg.as_ref().iter().all(|&b| b == 0));
    // A buffer whose writer never reported (say, a leaked builder) is cleared whole.
    // SAFETY: as above.
    unsafe { std::ptr::write_bytes(seg.ptr.as_ptr().cast::<u8>(), 0xCD, words * 8) };
    drop(seg);
    let seg = fresh();
    assert_eq!(seg.ptr, first);
    assert!(seg.as_ref().iter().all(|&b| b == 0));
    // Only so many are kept; big ones are not.
    let many: Vec<_> = (0..SPARE_COUNT + 2).map(|_| fresh()).collect();
    drop(many);
    assert_eq!(SPARES.with(|s| s.borrow().0.len()), SPARE_COUNT);
    drop(HeapSeg::zeroed(SPARE_MAX_WORDS + 1));
    assert_eq!(SPARES.with(|s| s.borrow().0.len()), SPARE_COUNT);
    drop(seg);
}

fn retagged(blob: &LendBlob, tag: u64) -> LendBlob {
    let mut b = *blob.as_bytes();
    b[24..32].copy_from_slice(&tag.to_le_bytes());
    LendBlob::from_bytes(&b).unwrap()
}

#[test]
fn a_one_segment_message_is_its_own_handle() {
    let arena = arena();
    let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
    fill(&mut msg, 100, 7);
    let blob = msg.share_shm().unwrap();
    assert_eq!(blob.type_tag(), SOLO_TAG);
    assert_eq!(arena.stats().blocks_in_use, 1, "no table block");
    let seg0 = msg.builder().get_segments_for_output()[0].as_ptr();
    assert_eq!(seg0 as usize % 16, 0);
    let segs = arena.borrow_segments(&blob).unwrap();
    assert_eq!(segs.get_segment(0).unwrap().as_ptr(), seg0);
    assert_eq!(segs.len(), 1);
    assert!(segs.get_segment(1).is_none());
    assert_eq!(read_first(segs), vec![7; 100]);
    assert_eq!(msg.table_refs(), Some(1));
    // Thawed in place (nobody else holds it), then published again: the first blob is
    // stale, the new one reads the new bytes.
    fill(&mut msg, 100, 8);
    assert_eq!(msg.table_refs(), None);
    assert_eq!(msg.builder().get_segments_for_output()[0].as_ptr(), seg0);
    let blob2 = msg.share_shm().unwrap();
    assert_ne!(blob2.generation(), blob.generation());
    assert!(matches!(arena.borrow_segments(&blob), Err(Error::Stale)));
    let segs = arena.borrow_segments(&blob2).unwrap();
    drop(msg);
    assert_eq!(arena.stats().blocks_in_use, 1, "the receiver holds it");
    assert_eq!(read_first(segs), vec![8; 100]);
    assert_eq!(arena.stats().blocks_in_use, 0);
    arena.verify().unwrap();
    // Freed clean (the prefix and what capnp wrote were cleared): the next zeroed
    // allocation of the block clears nothing.
    let (pool, g) = arena.grant(8192, 0).unwrap();
    assert_eq!(g.off + BLOCK_HDR + PREFIX, seg0 as u64 - pool.ptr(0) as u64);
    assert!(g.clean());
    pool.free_block(g.off, true).unwrap();
}

#[test]
fn a_dissolved_one_segment_handle_leaves_no_prefix_behind() {
    let arena = arena();
    let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
    fill(&mut msg, 100, 7);
    let blob = msg.share_shm().unwrap();
    arena.release_blob(&blob).unwrap();
    // Grows into a second segment: now sent with a table.
    fill(&mut msg, 20_000, 9);
    let blob = msg.share_shm().unwrap();
    assert_eq!(blob.type_tag(), TABLE_TAG);
    let segs = arena.borrow_segments(&blob).unwrap();
    assert_eq!(segs.len(), 2);
    assert_eq!(read_first(segs), vec![9; 20_000]);
    let seg0 = msg.builder().get_segments_for_output()[0].as_ptr();
    drop(msg);
    assert_eq!(arena.stats().blocks_in_use, 0);
    let (pool, g) = arena.grant(8192, 0).unwrap();
    assert_eq!(g.off + BLOCK_HDR + PREFIX, seg0 as u64 - pool.ptr(0) as u64);
    assert!(g.clean());
    let all_zero = (0..g.capacity / 8)
        .all(|i| pool.word(g.off + BLOCK_HDR + i * 8).load(Ordering::Relaxed) == 0);
    assert!(all_zero, "the block really is clean");
    pool.free_block(g.off, true).unwrap();
}

#[test]
fn forged_one_segment_handles_are_refused_with_the_specific_error() {
    let arena = arena();
    // A blob of an object retagged as a message: not one (its tag says so); the lent
    // reference stays lent, as for any borrow of the wrong type.
    let h = arena.construct([3u64; 8]).unwrap();
    let e = arena
        .borrow_segments(&retagged(&h.lend(), SOLO_TAG))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::TypeMismatch {
                expected: SOLO_TAG,
                found
            } if found == crate::shm::type_tag::<[u64; 8]>()
        ),
        "{e:?}"
    );
    assert_eq!(h.ref_count(), 2);
    // A table retagged as one segment, and a one-segment message retagged as a table.
    let mut big = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
    fill(&mut big, 20_000, 1);
    let big_blob = big.share_shm().unwrap();
    let e = arena
        .borrow_segments(&retagged(&big_blob, SOLO_TAG))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::TypeMismatch {
                expected: SOLO_TAG,
                ..
            }
        ),
        "{e:?}"
    );
    let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
    fill(&mut msg, 100, 7);
    let blob = msg.share_shm().unwrap();
    let e = arena
        .borrow_segments(&retagged(&blob, TABLE_TAG))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::TypeMismatch {
                expected: TABLE_TAG,
                ..
            }
        ),
        "{e:?}"
    );
    // A prefix whose used length overruns the block (a peer scribbled on it): refused, and
    // the reference taken for the check given back.
    let pool = arena.pool(blob.pool()).unwrap();
    let (_, cap) = pool.block_at(blob.offset() - BLOCK_HDR).unwrap();
    let used_at = blob.offset() + 8;
    let good = pool.word(used_at).load(Ordering::Relaxed);
    for bad in [cap - PREFIX + 8, good + 4, u64::MAX] {
        pool.word(used_at).store(bad, Ordering::Relaxed);
        let e = arena
            .borrow_segments(&msg.share_shm().unwrap())
            .unwrap_err();
        assert!(matches!(e, Error::OutOfBounds { .. }), "{e:?}");
    }
    pool.word(used_at).store(good, Ordering::Relaxed);
    assert_eq!(
        msg.table_refs(),
        Some(2),
        "the sender and the first, unborrowed blob"
    );
    assert_eq!(
        read_first(arena.borrow_segments(&blob).unwrap()),
        vec![7; 100]
    );
    assert_eq!(msg.table_refs(), Some(1));
    drop((msg, h));
    arena.release_blob(&big_blob).unwrap();
    drop(big);
    // The lent reference of the object keeps it alive (as with any mistyped borrow).
    assert_eq!(arena.stats().blocks_in_use, 1);
    arena.verify().unwrap();
}

/// The segments of a message, in order (their payload addresses).
fn segment_ptrs(msg: &OutMsg) -> Vec<*const u8> {
    let out = msg.builder().get_segments_for_output();
    out.iter().map(|s| s.as_ptr()).collect()
}

/// A message of many segments of one size (the free lists are stacks): freed last first,
/// whether its builder or a table frees them, so the next message of the same shape gets each
/// segment's own block back (its touched pages are the ones it touches again), and the arena
/// carves nothing more.
#[test]
fn the_next_message_of_the_same_shape_gets_each_segments_block_back() {
    let arena = Arena::create(ArenaConfig::new().pool_size(256 << 20)).unwrap();
    // 32 KiB parts into segments of at most 256 KiB (extents), first segment 8 KiB: a dozen
    // segments of the same size after the first few.
    let sizes = SegmentSizes {
        first_words: 1024,
        max_growth_words: 32 << 10,
    };
    let build = || {
        let mut msg = OutMsg::new(Some(arena.clone()), sizes);
        let b = msg.builder_mut();
        let mut list = b.initn_root::<capnp::data_list::Builder<'_>>(100);
        for i in 0..100 {
            list.set(i, &[i as u8; 32 << 10]);
        }
        msg
    };
    let first = build();
    let ptrs = segment_ptrs(&first);
    assert!(ptrs.len() > 10, "{} segments", ptrs.len());
    // Freed by its builder.
    drop(first);
    let mut again = build();
    assert_eq!(segment_ptrs(&again), ptrs);
    // Freed by its table, whose last reference a receiver drops (the table block is the only
    // new allocation: its class's first span).
    let blob = again.share_shm().unwrap();
    let held = arena.borrow_segments(&blob).unwrap();
    drop(again);
    drop(held);
    assert_eq!(arena.stats().blocks_in_use, 0);
    let reserved = arena.stats().bytes_reserved;
    for _ in 0..2 {
        let mut msg = build();
        assert_eq!(segment_ptrs(&msg), ptrs);
        arena.release_blob(&msg.share_shm().unwrap()).unwrap();
    }
    assert_eq!(arena.stats().bytes_reserved, reserved, "nothing carved");
    assert_eq!(arena.stats().blocks_in_use, 0);
    arena.verify().unwrap();
}

/// Whether the block whose payload is at `offset` comes back, all zero, to a zeroed allocation
/// of its capacity (the free lists are stacks: it is the next one handed out).
fn comes_back_zeroed(arena: &Arena, pool: u32, offset: u64, cap: u64) {
    let b = arena.alloc_zeroed(cap as usize).unwrap();
    assert_eq!((b.block_ref().pool, b.block_ref().offset), (pool, offset));
    let dirty = b.as_slice().iter().position(|&x| x != 0);
    assert_eq!(dirty, None, "a dirty byte in a block handed out as zeroed");
}

/// A fuzzing finding (`shm_tables`): the last holder of a message frees its segments as clean
/// after clearing the used length the message's table (or one-segment prefix) claims, and that
/// claim is shared memory a peer can under-state. The next zeroed allocation of such a block
/// then held the message's bytes, which a capnp builder followed as pointers (a panic, or a
/// write out of bounds). Now the claim only sizes the clearing: the block comes back all zero,
/// for a small block (cleared by stores) and a large one (its untouched pages given back).
#[test]
fn an_understated_used_length_still_frees_zeroed_blocks() {
    let arena = arena();
    // A table of two segments: the root, and 100 KB of data in a large block.
    let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
    fill(&mut msg, 100_000, 0xAB);
    let blob = msg.share_shm().unwrap();
    let pool = arena.pool(blob.pool()).unwrap();
    let word = |i: u64, w: u64| pool.word(blob.offset() + T_ENTRIES + i * T_ENTRY + 8 * w);
    let seg1 = word(1, 1).load(Ordering::Relaxed);
    let (_, cap1) = pool.block_at(seg1 - BLOCK_HDR).unwrap();
    assert!(cap1 > 64 << 10, "a large block: {cap1}");
    word(1, 2).store(8, Ordering::Relaxed); // "one word used"
    drop(msg);
    arena.release_blob(&blob).unwrap();
    assert_eq!(arena.stats().blocks_in_use, 0);
    comes_back_zeroed(&arena, blob.pool(), seg1, cap1);

    // A one-segment message whose prefix says nothing was written.
    let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
    fill(&mut msg, 2_000, 0xCD);
    let blob = msg.share_shm().unwrap();
    assert_eq!(blob.type_tag(), SOLO_TAG);
    let (_, cap) = pool.block_at(blob.offset() - BLOCK_HDR).unwrap();
    pool.word(blob.offset() + 8).store(0, Ordering::Relaxed);
    drop(msg);
    arena.release_blob(&blob).unwrap();
    comes_back_zeroed(&arena, blob.pool(), blob.offset(), cap);

    // And a builder on the reused blocks works as on fresh ones.
    let mut msg = OutMsg::new(Some(arena.clone()), SegmentSizes::default());
    fill(&mut msg, 100_000, 1);
    let segs = arena.borrow_segments(&msg.share_shm().unwrap()).unwrap();
    assert_eq!(read_first(segs), vec![1; 100_000]);
    drop(msg);
    assert_eq!(arena.stats().blocks_in_use, 0);
    arena.verify().unwrap();
}
