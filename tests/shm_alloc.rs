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
    std::thread::scope(|s| {
        for (t, rx) in rxs.into_iter().enumerate() {
            let arena = &arena;
            let txs = txs.clone();
            s.spawn(move || {
                let mut rng = Rng::new(t as u64 + 1);
                let mut live = Vec::new();
                for op in 0..4000u64 {
                    let tag = (t as u64) << 32 | op;
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
                drop(txs);
                // Drain what others still send us.
                for (b, tag) in rx {
                    assert!(check(b.as_slice(), tag));
                }
            });
        }
        drop(txs);
    });
    assert_empty(&arena);
}

#[test]
fn handles_cloned_lent_and_dropped_on_many_threads_free_exactly_once() {
    let arena = arena(64 << 20);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let arena = &arena;
            s.spawn(move || {
                for i in 0..2000u64 {
                    let h = arena
                        .construct([AtomicU64::new(t), AtomicU64::new(i)])
                        .unwrap();
                    let clones: Vec<_> = (0..3).map(|_| h.clone()).collect();
                    let blob = clones[1].lend();
                    std::thread::scope(|s2| {
                        s2.spawn(|| {
                            let b: ShmHandle<[AtomicU64; 2]> = arena.borrow(&blob).unwrap();
                            b[1].fetch_add(1, Ordering::Relaxed);
                        });
                        drop(clones);
                    });
                    assert_eq!(h[1].load(Ordering::Relaxed), i + 1);
                    assert_eq!(h.ref_count(), 1);
                }
            });
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
fn freed_extents_are_reused_and_split() {
    let arena = arena(256 << 20);
    let a = arena.alloc(8 << 20).unwrap();
    let reserved = arena.stats().bytes_reserved;
    let first = a.block_ref();
    drop(a);
    // A smaller request is carved out of the freed extent: nothing new is reserved.
    let b = arena.alloc(2 << 20).unwrap();
    assert_eq!(b.block_ref().offset, first.offset);
    assert_ne!(b.block_ref().generation, first.generation, "a new life");
    // And so is one that fits the tail that the split left.
    let c = arena.alloc((6 << 20) - 8192).unwrap();
    assert_eq!(arena.stats().bytes_reserved, reserved);
    drop((b, c));
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
        s.spawn(move || {
            let first = arena.alloc(64).unwrap().block_ref().offset;
            // Freed into this thread's cache, and handed out again from it: the same block.
            for _ in 0..1000 {
                assert_eq!(arena.alloc(64).unwrap().block_ref().offset, first);
            }
            let held: Vec<_> = (0..10).map(|_| arena.alloc(64).unwrap()).collect();
            drop(held);
            to_main.send(()).unwrap();
            from_main.recv().unwrap();
        });
        from_thread.recv().unwrap();
        // The thread is alive: its blocks sit in its cache, free in the stats.
        let v = arena.verify().unwrap();
        assert!(v.cached_blocks >= 10, "{v:?}");
        assert_eq!(arena.stats().blocks_in_use, 0);
        to_thread.send(()).unwrap();
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
