//! The allocator within one process: many threads, size classes and extents, zeroing,
//! exhaustion, growth, trimming, and ref-counted handles.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;

use common::*;
use flowipc::shm::{Arena, ArenaConfig, Error, ShmHandle};

fn arena(pool: u64) -> Arena {
    Arena::create(ArenaConfig::new().pool_size(pool)).unwrap()
}

fn assert_empty(arena: &Arena) {
    let s = arena.stats();
    assert_eq!((s.blocks_in_use, s.bytes_in_use), (0, 0), "{s:?}");
    arena.verify().unwrap();
}

#[test]
fn many_threads_allocate_and_free_random_sizes_with_data_intact() {
    let arena = arena(1 << 30);
    const THREADS: u64 = 8;
    // Blocks travel between threads, so most frees happen on another thread than the alloc.
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| mpsc::channel()).unzip();
    let rxs: Vec<_> = rxs.into_iter().map(std::sync::Mutex::new).collect();
    on_threads(THREADS, |t| {
        let rx = rxs[t as usize].lock().unwrap();
        let txs = txs.clone();
        let mut rng = Rng::new(t + 1);
        let mut live = Vec::new();
        for op in 0..4000u64 {
            let tag = t << 32 | op;
            match rng.below(4) {
                0 | 1 => {
                    let mut b = arena.alloc(rng.size()).unwrap();
                    fill(b.as_mut_slice(), tag);
                    live.push((b, tag));
                }
                2 => {
                    if let Some((b, tag)) = live.pop() {
                        assert!(check(b.as_slice(), tag));
                    }
                }
                _ => {
                    if let Some(item) = live.pop() {
                        let to = rng.below(THREADS) as usize;
                        txs[to].send(item).unwrap();
                    }
                }
            }
            while let Ok((b, tag)) = rx.try_recv() {
                assert!(check(b.as_slice(), tag), "block corrupted in transit");
            }
        }
        for (b, tag) in live {
            assert!(check(b.as_slice(), tag));
        }
    });
    // What is still in flight between threads.
    drop(txs);
    for rx in rxs {
        for (b, tag) in rx.into_inner().unwrap() {
            assert!(check(b.as_slice(), tag));
        }
    }
    assert_empty(&arena);
}

#[test]
fn handles_cloned_lent_and_dropped_on_many_threads_free_exactly_once() {
    let arena = arena(64 << 20);
    on_threads(4, |t| {
        for i in 0..2000u64 {
            let h = arena
                .construct([AtomicU64::new(t), AtomicU64::new(i)])
                .unwrap();
            let clones: Vec<_> = (0..3).map(|_| h.clone()).collect();
            let blob = clones[1].lend();
            std::thread::scope(|s| {
                let borrower = s.spawn(|| {
                    let b: ShmHandle<[AtomicU64; 2]> = arena.borrow(&blob).unwrap();
                    b[1].fetch_add(1, Ordering::Relaxed);
                });
                drop(clones);
                borrower.join().unwrap();
            });
            assert_eq!(h[1].load(Ordering::Relaxed), i + 1);
            assert_eq!(h.ref_count(), 1);
        }
    });
    assert_empty(&arena);
}

#[test]
fn a_256_mib_request_takes_exact_pages_not_512_mib() {
    let arena = arena(1 << 30);
    let b = arena.alloc((256 << 20) + 8).unwrap();
    let s = arena.stats();
    assert_eq!(s.bytes_in_use, (256 << 20) + 4096);
    assert_eq!(s.bytes_reserved, (256 << 20) + 4096);
    assert!(b.capacity() >= (256 << 20) + 8 && b.capacity() < (256 << 20) + 4096);
    drop(b);
    assert_empty(&arena);
}

#[test]
fn freed_extents_are_reused_by_requests_of_about_their_size() {
    let arena = arena(256 << 20);
    let a = arena.alloc(8 << 20).unwrap();
    let reserved = arena.stats().bytes_reserved;
    let first = a.block_ref();
    drop(a);
    // A request that the extent exceeds by at most an eighth reuses it: nothing new is carved.
    let b = arena.alloc(15 << 19).unwrap();
    assert_eq!(b.block_ref().offset, first.offset);
    assert_ne!(b.block_ref().generation, first.generation, "a new life");
    assert_eq!(arena.stats().bytes_reserved, reserved);
    drop(b);
    // A much smaller one does not split it (splitting without coalescing fragments without
    // bound): it gets fresh space, exactly page-rounded, and the extent stays free for its size.
    let c = arena.alloc(2 << 20).unwrap();
    assert_ne!(c.block_ref().offset, first.offset);
    assert_eq!(arena.stats().bytes_reserved, reserved + (2 << 20) + 4096);
    let d = arena.alloc(8 << 20).unwrap();
    assert_eq!(d.block_ref().offset, first.offset);
    drop((c, d));
    assert_empty(&arena);
}

/// Freed space in any pool comes before fresh space in any: after the arena grew by a pool
/// (which then serves first), a freed extent of the first pool is reused rather than carved anew
/// in the second, for extents and for small blocks alike.
#[test]
fn freed_space_in_another_pool_is_reused_before_fresh_space_in_the_current_one() {
    let arena = Arena::create(ArenaConfig::new().pool_size(32 << 20).max_pools(4)).unwrap();
    let (a, small) = (arena.alloc(8 << 20).unwrap(), arena.alloc(3000).unwrap());
    let filler = arena.alloc(20 << 20).unwrap();
    assert_eq!((a.block_ref().pool, filler.block_ref().pool), (0, 0));
    // Pool 0 has no room for another 8 MiB: the arena grows, and pool 1 serves from now on.
    let b = arena.alloc(8 << 20).unwrap();
    assert_eq!(b.block_ref().pool, 1);
    let (a_at, small_at) = (a.block_ref(), small.block_ref());
    drop((a, small));
    let reserved = arena.stats().bytes_reserved;
    // Pool 1 has fresh room for both, but pool 0 has them freed.
    let c = arena.alloc(8 << 20).unwrap();
    assert_eq!((c.block_ref().pool, c.block_ref().offset), (0, a_at.offset));
    let d = arena.alloc(3000).unwrap();
    assert_eq!(
        (d.block_ref().pool, d.block_ref().offset),
        (0, small_at.offset)
    );
    assert_eq!(arena.stats().bytes_reserved, reserved, "nothing carved");
    // With nothing freed anywhere, fresh space is carved where there is room.
    let e = arena.alloc(8 << 20).unwrap();
    assert_eq!(e.block_ref().pool, 1);
    assert!(arena.stats().bytes_reserved > reserved);
    drop((b, c, d, e, filler));
    assert_eq!(arena.stats().pools, 2);
    assert_empty(&arena);
}

#[test]
fn random_large_sizes_do_not_fragment_without_bound() {
    let arena = Arena::create(ArenaConfig::new().pool_size(1 << 30).max_pools(1)).unwrap();
    let mut rng = Rng::new(3);
    let mut live = Vec::new();
    let mut reserved_after = Vec::new();
    for _ in 0..4 {
        for _ in 0..5000 {
            if live.len() < 16 {
                let size = (1 << 20) + rng.below(1 << 20) as usize;
                live.push(arena.alloc(size).unwrap());
            } else {
                live.swap_remove(rng.below(16) as usize);
            }
        }
        reserved_after.push(arena.stats().bytes_reserved);
    }
    // At most 16 blocks of at most 2 MiB are live; the space carved stays within a small
    // multiple of that and stops growing.
    assert!(
        reserved_after[3] <= 4 * 16 * (2 << 20),
        "{reserved_after:?}"
    );
    assert!(
        reserved_after[3] - reserved_after[1] <= 8 << 20,
        "{reserved_after:?}"
    );
    drop(live);
    assert_empty(&arena);
}

#[test]
fn zeroed_allocations_are_zero_even_on_reused_dirty_blocks() {
    let arena = arena(64 << 20);
    for size in [24, 1000, 8192, 100_000, 3 << 20] {
        let mut b = arena.alloc(size).unwrap();
        b.as_mut_slice().fill(0xAB);
        let at = b.block_ref();
        drop(b);
        let z = arena.alloc_zeroed(size).unwrap();
        assert_eq!(z.block_ref().offset, at.offset, "the dirty block is reused");
        assert!(z.as_slice().iter().all(|&x| x == 0), "size {size}");
    }
    assert_empty(&arena);
}

#[test]
fn exhaustion_is_an_error_and_the_arena_stays_usable() {
    let arena = Arena::create(ArenaConfig::new().pool_size(2 << 20).max_pools(1)).unwrap();
    let mut held = Vec::new();
    let err = loop {
        match arena.alloc(100_000) {
            Ok(b) => held.push(b),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, Error::OutOfMemory { requested: 100_000 }),
        "{err:?}"
    );
    assert!(held.len() >= 15, "{} blocks of 100 kB in 2 MiB", held.len());
    // Small classes may still have room, large ones not; nothing is broken.
    assert!(matches!(
        arena.alloc(1 << 20),
        Err(Error::OutOfMemory { .. })
    ));
    held.pop();
    let again = arena.alloc(100_000).unwrap();
    drop((again, held));
    assert_empty(&arena);
    assert!(matches!(
        arena.alloc(usize::MAX),
        Err(Error::TooLarge {
            requested: usize::MAX,
            ..
        })
    ));
}

#[test]
fn the_arena_grows_by_adding_pools_and_a_joiner_adopts_them() {
    let arena = Arena::create(ArenaConfig::new().pool_size(1 << 20).max_pools(4)).unwrap();
    let joiner = Arena::join(
        [arena.pool_fd(0).unwrap().try_clone_to_owned().unwrap()],
        ArenaConfig::new().max_pools(4),
    )
    .unwrap();
    let a = arena.alloc(600 << 10).unwrap();
    let b = arena.alloc(600 << 10).unwrap();
    assert_eq!(arena.pool_ids(), vec![0, 1]);
    assert_eq!(b.block_ref().pool, 1);
    // A request bigger than the pool size gets a pool sized to fit.
    let c = arena.alloc(3 << 20).unwrap();
    assert_eq!(c.block_ref().pool, 2);
    assert!(arena.pool(2).unwrap().capacity() > 3 << 20);
    // The joiner learns of the new pools from their fds (the transport ships them).
    assert_eq!(joiner.pool_ids(), vec![0]);
    for id in [1, 2] {
        let fd = arena.pool_fd(id).unwrap().try_clone_to_owned().unwrap();
        assert_eq!(joiner.add_pool(fd).unwrap(), id);
    }
    assert_eq!(joiner.stats().bytes_in_use, arena.stats().bytes_in_use);
    // Pool ids are drawn arena-wide: a pool the joiner creates gets id 3, not a duplicate.
    let d = joiner.alloc(3 << 20).unwrap();
    assert_eq!(d.block_ref().pool, 3);
    // Four pools is the limit.
    assert!(matches!(
        arena.alloc(3 << 20),
        Err(Error::OutOfMemory { .. })
    ));
    let fd = arena.pool_fd(1).unwrap().try_clone_to_owned().unwrap();
    assert!(matches!(joiner.add_pool(fd), Err(Error::DuplicatePool(1))));
    drop((a, b, c, d));
    assert_empty(&arena);
}

#[test]
fn trimming_gives_freed_extent_pages_back_to_the_kernel() {
    let arena = Arena::create(
        ArenaConfig::new()
            .pool_size(128 << 20)
            .trim_freed_extents(true),
    )
    .unwrap();
    let file = std::fs::File::from(arena.pool_fd(0).unwrap().try_clone_to_owned().unwrap());
    let resident = || file.metadata().unwrap().blocks() * 512;
    let base = resident();
    let mut b = arena.alloc(32 << 20).unwrap();
    b.as_mut_slice().fill(7);
    assert!(resident() >= base + (32 << 20));
    let at = b.block_ref();
    drop(b);
    assert!(resident() < base + (1 << 20), "pages given back");
    // A trimmed extent is known clean: the zeroed allocation is zero without clearing.
    let z = arena.alloc_zeroed(32 << 20).unwrap();
    assert_eq!(z.block_ref().offset, at.offset);
    assert!(resident() < base + (1 << 20), "not touched by a memset");
    // (Reading the holes faults pages in on shmem, so check the contents last.)
    assert!(z.as_slice().iter().step_by(4096).all(|&x| x == 0));
    drop(z);
    assert_empty(&arena);
}

#[test]
fn get_mut_only_while_unique_and_a_lend_counts_as_a_reference() {
    let arena = arena(16 << 20);
    let mut h = arena.construct([1u64, 2, 3]).unwrap();
    h.get_mut().unwrap()[0] = 10;
    let c = h.clone();
    assert!(h.get_mut().is_none());
    drop(c);
    let blob = h.lend();
    assert_eq!(h.ref_count(), 2);
    assert!(h.get_mut().is_none(), "a lent, unborrowed reference counts");
    arena.release_blob(&blob).unwrap();
    assert_eq!(h.ref_count(), 1);
    assert_eq!(*h, [10, 2, 3]);
    drop(h);
    assert_empty(&arena);
}

#[test]
fn a_big_object_is_built_in_place() {
    let arena = arena(64 << 20);
    let mut h = arena.construct_zeroed::<[u8; 32 << 20]>().unwrap();
    assert!(h.iter().step_by(4096).all(|&b| b == 0));
    fill(h.get_mut().unwrap(), 3);
    let blob = h.lend();
    let there: ShmHandle<[u8; 32 << 20]> = arena.borrow(&blob).unwrap();
    assert!(check(&there[..], 3));
    drop((h, there));
    assert_empty(&arena);
}

#[test]
fn a_thread_caches_freed_blocks_and_hands_them_back_when_it_exits() {
    let arena = arena(16 << 20);
    let (to_main, from_thread) = mpsc::channel();
    let (to_thread, from_main) = mpsc::channel::<()>();
    std::thread::scope(|s| {
        let arena = &arena;
        let thread = s.spawn(move || {
            let first = arena.alloc(64).unwrap().block_ref().offset;
            // Freed into this thread's cache, and handed out again from it: the same block.
            for _ in 0..1000 {
                assert_eq!(arena.alloc(64).unwrap().block_ref().offset, first);
            }
            let held: Vec<_> = (0..10).map(|_| arena.alloc(64).unwrap()).collect();
            drop(held);
            to_main.send(()).unwrap();
            // (Bounded, so that a failing check in the main thread cannot hang the test.)
            let _ = from_main.recv_timeout(std::time::Duration::from_secs(30));
        });
        from_thread.recv().unwrap();
        // The thread is alive: its blocks sit in its cache, free in the stats.
        let v = arena.verify().unwrap();
        assert!(v.cached_blocks >= 10, "{v:?}");
        assert_eq!(arena.stats().blocks_in_use, 0);
        to_thread.send(()).unwrap();
        // (An explicit join waits for the thread-local destructors; the scope's does not.)
        thread.join().unwrap();
    });
    // The thread exited: its cache went back to the shared lists.
    let v = arena.verify().unwrap();
    assert_eq!(v.cached_blocks, 0, "{v:?}");
    assert!(v.free_small_blocks >= 10, "{v:?}");
    // And the main thread can hand its own back on demand.
    drop(arena.alloc(64).unwrap());
    assert_eq!(arena.verify().unwrap().cached_blocks, 1);
    arena.flush_thread_cache();
    assert_eq!(arena.verify().unwrap().cached_blocks, 0);
    assert_empty(&arena);
}
