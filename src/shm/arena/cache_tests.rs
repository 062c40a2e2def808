//! Unit tests of the arena and the thread caches: arenas dropped under live threads, forks.

use super::*;

#[test]
fn an_arena_dropped_while_its_threads_live_hands_their_caches_back() {
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let joiner = Arena::join(
        [arena.pool_fd(0).unwrap().try_clone_to_owned().unwrap()],
        ArenaConfig::new(),
    )
    .unwrap();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (done, parked) = std::sync::mpsc::channel::<()>();
    let worker = {
        let joiner = joiner.clone();
        std::thread::spawn(move || {
            drop(joiner.alloc(64).unwrap()); // now cached in this thread's slot
            drop(joiner);
            done.send(()).unwrap();
            let _ = wait.recv(); // outlives the arena instance
        })
    };
    parked.recv().unwrap();
    assert_eq!(arena.verify().unwrap().cached_blocks, 1);
    drop(joiner); // the last handle of that instance: it releases the parked thread's slot
    assert_eq!(arena.verify().unwrap().cached_blocks, 0);
    let in_use = arena.pool(0).unwrap().hdr().slots.iter();
    assert_eq!(
        in_use
            .filter(|s| s.0.owner.load(crate::sync::Ordering::Relaxed) != 0)
            .count(),
        0
    );
    go.send(()).unwrap();
    worker.join().unwrap();
}

#[test]
fn a_forked_child_that_lets_go_of_the_arena_leaves_the_parents_cache_alone() {
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let blocks: Vec<_> = (0..10).map(|_| arena.alloc(64).unwrap()).collect();
    drop(blocks);
    assert_eq!(arena.verify().unwrap().cached_blocks, 10);
    // In the child, what its thread exiting and its last arena handle going would do (without
    // the heap frees, which are not safe after fork in a multi-threaded test process).
    let ok = crate::sys::fork_and_wait(|| {
        arena.flush_thread_cache();
        for pool in arena.pools() {
            pool.release_all_slots();
        }
    });
    assert!(ok, "child failed");
    assert_eq!(
        arena.verify().unwrap().cached_blocks,
        10,
        "parent's cache intact"
    );
    let again: Vec<_> = (0..10).map(|_| arena.alloc(64).unwrap()).collect();
    assert!(again.iter().all(|b| b.capacity() >= 64));
    drop(again);
    arena.verify().unwrap();
    assert_eq!(arena.stats().blocks_in_use, 0);
}
