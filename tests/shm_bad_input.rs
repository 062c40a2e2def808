//! Bad input of every kind: forged, truncated, out-of-bounds, misaligned, stale, replayed,
//! mistyped and foreign lend blobs; fds that are not pools. Each gives its specific error, and
//! the arena is sane afterwards.

mod common;

use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;

use common::{memfd, seal_size};
use flowipc::shm::{Arena, ArenaConfig, Error, LendBlob, ShmHandle};

fn arena() -> Arena {
    Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap()
}

/// The arena still works: nothing leaked beyond `held` live blocks, lists consistent, and a
/// fresh object can be made, lent and borrowed.
fn assert_sane(arena: &Arena, held: u64) {
    assert_eq!(arena.stats().blocks_in_use, held);
    arena.verify().unwrap();
    let h = arena.construct(7u64).unwrap();
    let b: ShmHandle<u64> = arena.borrow(&h.lend()).unwrap();
    assert_eq!(*b, 7);
}

/// A blob with one field rewritten (little-endian at `at`).
fn patched(blob: &LendBlob, at: usize, bytes: &[u8]) -> LendBlob {
    let mut b = *blob.as_bytes();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    LendBlob::from_bytes(&b).unwrap()
}

fn with_offset(blob: &LendBlob, off: u64) -> LendBlob {
    patched(blob, 8, &off.to_le_bytes())
}

#[test]
fn truncated_oversized_and_garbage_blobs() {
    let arena = arena();
    let h = arena.construct(1u64).unwrap();
    let blob = h.lend();
    let bytes = blob.as_bytes();
    assert!(matches!(
        LendBlob::from_bytes(&bytes[..31]),
        Err(Error::BlobLength(31))
    ));
    assert!(matches!(
        LendBlob::from_bytes(&[]),
        Err(Error::BlobLength(0))
    ));
    let mut long = bytes.to_vec();
    long.push(0);
    assert!(matches!(
        LendBlob::from_bytes(&long),
        Err(Error::BlobLength(33))
    ));
    assert!(matches!(
        LendBlob::from_bytes(&[0xA5; 32]),
        Err(Error::BlobMagic)
    ));
    // The genuine blob still works after all that.
    let b: ShmHandle<u64> = arena.borrow(&blob).unwrap();
    drop((h, b));
    assert_sane(&arena, 0);
}

#[test]
fn forged_offsets_out_of_bounds_misaligned_and_not_a_block() {
    let arena = arena();
    let h = arena.construct([5u64; 4]).unwrap();
    let blob = h.lend();
    let off = blob.offset();
    let cap = arena.pool(0).unwrap().capacity();
    for bad in [0, 8, 64, cap, cap + 8, cap + 4096, u64::MAX - 7] {
        let e = arena
            .borrow::<[u64; 4]>(&with_offset(&blob, bad))
            .unwrap_err();
        assert!(
            matches!(e, Error::OutOfBounds { pool: 0, offset } if offset == bad.wrapping_sub(16) || offset == bad),
            "offset {bad:#x}: {e:?}"
        );
    }
    for bad in [off + 8, off + 1, off + 20, cap - 8] {
        let e = arena
            .borrow::<[u64; 4]>(&with_offset(&blob, bad))
            .unwrap_err();
        assert!(matches!(e, Error::Misaligned(_)), "offset {bad:#x}: {e:?}");
    }
    // 16-aligned, in bounds, but inside the block rather than at its start...
    let e = arena
        .borrow::<[u64; 4]>(&with_offset(&blob, off + 16))
        .unwrap_err();
    assert!(matches!(e, Error::NotABlock(_)), "{e:?}");
    // ...or in heap space never handed out.
    let far = cap - (1 << 20);
    let e = arena
        .borrow::<[u64; 4]>(&with_offset(&blob, far))
        .unwrap_err();
    assert!(matches!(e, Error::NotABlock(_)), "{e:?}");
    // None of that consumed the lent reference.
    assert_eq!(h.ref_count(), 2);
    let b: ShmHandle<[u64; 4]> = arena.borrow(&blob).unwrap();
    assert_eq!(*b, [5; 4]);
    drop((h, b));
    assert_sane(&arena, 0);
}

#[test]
fn unknown_pool_and_foreign_arena() {
    let arena = arena();
    let other = self::arena();
    let h = arena.construct(3u32).unwrap();
    let blob = h.lend();
    let e = arena
        .borrow::<u32>(&patched(&blob, 4, &7u32.to_le_bytes()))
        .unwrap_err();
    assert!(matches!(e, Error::UnknownPool(7)), "{e:?}");
    let e = other.borrow::<u32>(&blob).unwrap_err();
    assert!(matches!(e, Error::ForeignBlob), "{e:?}");
    arena.release_blob(&blob).unwrap();
    drop(h);
    assert_sane(&arena, 0);
    assert_sane(&other, 0);
}

#[test]
fn stale_and_replayed_blobs() {
    let arena = arena();
    let h = arena.construct(11u64).unwrap();
    let blob = h.lend();
    let b: ShmHandle<u64> = arena.borrow(&blob).unwrap();
    // Replayed while the object lives: the one lent reference was already adopted.
    assert!(matches!(arena.borrow::<u64>(&blob), Err(Error::Stale)));
    assert!(matches!(arena.release_blob(&blob), Err(Error::Stale)));
    assert_eq!(h.ref_count(), 2, "the replay did not take a reference");
    drop((h, b));
    // After the object is freed...
    assert!(matches!(arena.borrow::<u64>(&blob), Err(Error::Stale)));
    // ...and after the same block is reused for a new object of the same type.
    let h2 = arena.construct(12u64).unwrap();
    assert_eq!(h2.block_ref().offset, blob.offset(), "same block, new life");
    let lent = h2.lend();
    assert!(matches!(arena.borrow::<u64>(&blob), Err(Error::Stale)));
    // A forged generation is stale too.
    let e = arena
        .borrow::<u64>(&patched(&blob, 16, &999u32.to_le_bytes()))
        .unwrap_err();
    assert!(matches!(e, Error::Stale), "{e:?}");
    // A plain block (not a ref-counted object) at a valid start cannot be borrowed.
    let raw = arena.alloc(40).unwrap();
    let e = arena
        .borrow::<u64>(&with_offset(&blob, raw.block_ref().offset))
        .unwrap_err();
    assert!(matches!(e, Error::Stale | Error::NotABlock(_)), "{e:?}");
    drop(raw);
    arena.release_blob(&lent).unwrap();
    drop(h2);
    assert_sane(&arena, 0);
}

#[test]
fn mistyped_blobs() {
    let arena = arena();
    let h = arena.construct(5u64).unwrap();
    let blob = h.lend();
    let e = arena.borrow::<u32>(&blob).unwrap_err();
    assert!(matches!(e, Error::TypeMismatch { .. }), "{e:?}");
    let e = arena.borrow::<[u64; 1000]>(&blob).unwrap_err();
    assert!(matches!(e, Error::TypeMismatch { .. }), "{e:?}");
    // A blob whose type tag was forged to match still meets the tag stored in the block.
    let forged = patched(&blob, 24, &flowipc::shm::type_tag::<i64>().to_le_bytes());
    let e = arena.borrow::<i64>(&forged).unwrap_err();
    assert!(
        matches!(e, Error::TypeMismatch { found, .. } if found == flowipc::shm::type_tag::<u64>()),
        "{e:?}"
    );
    // The right type still gets the reference.
    let b: ShmHandle<u64> = arena.borrow(&blob).unwrap();
    assert_eq!(*b, 5);
    drop((h, b));
    assert_sane(&arena, 0);
}

fn dup(arena: &Arena) -> OwnedFd {
    arena.pool_fd(0).unwrap().try_clone_to_owned().unwrap()
}

#[test]
fn fds_that_are_not_pools() {
    // A socket.
    let (s, _s2) = UnixStream::pair().unwrap();
    let e = Arena::join([OwnedFd::from(s)], ArenaConfig::new()).unwrap_err();
    assert!(matches!(e, Error::NotSealed), "{e:?}");
    // A memfd that is not sealed (a peer could truncate it under us).
    let f = memfd("not-a-pool");
    f.set_len(1 << 20).unwrap();
    let e = Arena::join([OwnedFd::from(f)], ArenaConfig::new()).unwrap_err();
    assert!(matches!(e, Error::NotSealed), "{e:?}");
    // A sealed memfd of zeros.
    let f = memfd("zeros");
    f.set_len(1 << 20).unwrap();
    seal_size(&f);
    let e = Arena::join([OwnedFd::from(f)], ArenaConfig::new()).unwrap_err();
    assert!(matches!(e, Error::NotAPool("bad magic")), "{e:?}");
    // A sealed memfd too small to be a pool.
    let f = memfd("tiny");
    f.set_len(4096).unwrap();
    seal_size(&f);
    let e = Arena::join([OwnedFd::from(f)], ArenaConfig::new()).unwrap_err();
    assert!(matches!(e, Error::NotAPool(_)), "{e:?}");
}

#[test]
fn corrupt_pool_headers() {
    // Each case corrupts one field of a pool's header through the file (as a buggy peer could).
    type Case = (u64, Vec<u8>, fn(&Error) -> bool);
    let cases: [Case; 4] = [
        (0, b"NOTFLOW\0".to_vec(), |e| {
            matches!(e, Error::NotAPool("bad magic"))
        }),
        (8, 99u32.to_le_bytes().to_vec(), |e| {
            matches!(
                e,
                Error::VersionMismatch {
                    found: 99,
                    expected: 4
                }
            )
        }),
        (16, 12345u64.to_le_bytes().to_vec(), |e| {
            matches!(e, Error::NotAPool(_))
        }),
        (24, 4096u64.to_le_bytes().to_vec(), |e| {
            matches!(e, Error::NotAPool(_))
        }),
    ];
    for (at, bytes, expect) in cases {
        let victim = arena();
        let file = std::fs::File::from(dup(&victim));
        file.write_all_at(&bytes, at).unwrap();
        let e = Arena::join([dup(&victim)], ArenaConfig::new()).unwrap_err();
        assert!(expect(&e), "field at {at}: {e:?}");
    }
}

#[test]
fn pools_of_other_arenas_duplicates_and_missing_pool_zero() {
    let a = arena();
    let b = arena();
    let e = a.add_pool(dup(&b)).unwrap_err();
    assert!(matches!(e, Error::WrongArena { .. }), "{e:?}");
    let e = a.add_pool(dup(&a)).unwrap_err();
    assert!(matches!(e, Error::DuplicatePool(0)), "{e:?}");
    let e = Arena::join([dup(&a), dup(&b)], ArenaConfig::new()).unwrap_err();
    assert!(
        matches!(e, Error::WrongArena { .. } | Error::DuplicatePool(0)),
        "{e:?}"
    );
    // Pool 1 alone cannot be joined: pool 0 holds the arena-wide id counter.
    let grown = Arena::create(ArenaConfig::new().pool_size(1 << 20)).unwrap();
    let _x = grown.alloc(900 << 10).unwrap();
    let _y = grown.alloc(900 << 10).unwrap();
    let p1 = grown.pool_fd(1).unwrap().try_clone_to_owned().unwrap();
    let e = Arena::join([p1], ArenaConfig::new()).unwrap_err();
    assert!(matches!(e, Error::UnknownPool(0)), "{e:?}");
    let e = Arena::create(ArenaConfig::new().max_pools(0)).unwrap_err();
    assert!(matches!(e, Error::BadConfig(_)), "{e:?}");
    let e = Arena::create(ArenaConfig::new().pool_size(1)).unwrap_err();
    assert!(matches!(e, Error::BadConfig(_)), "{e:?}");
    let e = Arena::create(ArenaConfig::new().max_bytes(4096)).unwrap_err();
    assert!(matches!(e, Error::BadConfig(_)), "{e:?}");
    assert_sane(&a, 0);
    assert_sane(&b, 0);
}

#[test]
fn a_stale_blob_never_touches_the_next_life_of_its_block() {
    let arena = arena();
    let h = arena.construct([1u64; 2]).unwrap();
    let blob = h.lend();
    let b: ShmHandle<[u64; 2]> = arena.borrow(&blob).unwrap();
    drop((h, b));
    // The same block, reused as plain bytes and as a new object of the same type.
    let mut raw = arena.alloc(32).unwrap();
    assert_eq!(raw.block_ref().offset, blob.offset());
    raw.as_mut_slice().fill(0x11);
    assert!(matches!(arena.release_blob(&blob), Err(Error::Stale)));
    assert!(matches!(arena.borrow::<[u64; 2]>(&blob), Err(Error::Stale)));
    assert!(raw.as_slice().iter().all(|&x| x == 0x11), "bytes untouched");
    drop(raw);
    let again = arena.construct([2u64; 2]).unwrap();
    assert_eq!(again.block_ref().offset, blob.offset());
    let lent = again.lend();
    assert!(matches!(arena.release_blob(&blob), Err(Error::Stale)));
    assert_eq!(again.ref_count(), 2, "the new life's count is untouched");
    arena.release_blob(&lent).unwrap();
    drop(again);
    assert_sane(&arena, 0);
}
