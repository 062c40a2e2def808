//! The arena across real process boundaries: shared writes at the same offsets, blocks freed by
//! the other process, concurrent allocation from two processes, and SIGKILLed peers.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use flowipc::shm::{Arena, ArenaConfig, ShmHandle};

type Cells = [AtomicU64; 8];

/// Entry point of every child process of this file (run by `common::spawn`, never directly).
#[test]
#[ignore = "child-process entry point, spawned by the other tests of this file"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    let (mut sock, arena) = child_connect();
    match role.as_str() {
        "share" => child_share(&mut sock, &arena),
        "alloc_concurrently" => child_alloc_concurrently(&mut sock, &arena),
        "churn" => child_churn(&mut sock, &arena),
        "rss" => child_rss(&mut sock, &arena),
        "borrow_and_drop" => child_borrow_and_drop(&mut sock, &arena),
        other => panic!("unknown role {other}"),
    }
}

fn child_share(sock: &mut std::os::unix::net::UnixStream, arena: &Arena) {
    // 1. Adopt the parent's object: same offset here, parent's writes visible.
    let blob = recv_blob(sock);
    let cells: ShmHandle<Cells> = arena.borrow(&blob).unwrap();
    assert_eq!(cells.block_ref().offset, recv_u64(sock));
    for (i, c) in cells.iter().enumerate() {
        assert_eq!(c.load(Ordering::Acquire), 1000 + i as u64);
    }
    // Write back for the parent to see.
    for (i, c) in cells.iter().enumerate() {
        c.store(2000 + i as u64, Ordering::Release);
    }
    send_u64(sock, 1);
    // 2. Objects the parent allocated and dropped: freed here when we drop them.
    let n = recv_u64(sock);
    for i in 0..n {
        let h: ShmHandle<[u64; 32]> = arena.borrow(&recv_blob(sock)).unwrap();
        assert!(h.iter().all(|&v| v == i * 7));
    }
    send_u64(sock, 2);
    // 3. Objects allocated here, lent, and dropped: the parent frees them.
    let n = recv_u64(sock);
    for i in 0..n {
        let h = arena.construct([i * 11; 32]).unwrap();
        send_blob(sock, &h.lend());
    }
    // 4. A big object allocated here and filled, read by the parent in place.
    let mut big = arena.construct_zeroed::<[u8; 8 << 20]>().unwrap();
    fill(big.get_mut().unwrap(), 99);
    send_blob(sock, &big.lend());
    drop(big);
    drop(cells);
    assert_eq!(recv_u64(sock), 3, "parent done");
}

#[test]
fn two_processes_share_objects_at_the_same_offsets_and_free_each_others() {
    let arena = Arena::create(ArenaConfig::new().pool_size(64 << 20)).unwrap();
    let mut peer = spawn("share", &arena);

    let cells: ShmHandle<Cells> = arena
        .construct(std::array::from_fn(|i| AtomicU64::new(1000 + i as u64)))
        .unwrap();
    send_blob(&mut peer.sock, &cells.lend());
    send_u64(&mut peer.sock, cells.block_ref().offset);
    assert_eq!(recv_u64(&mut peer.sock), 1);
    for (i, c) in cells.iter().enumerate() {
        assert_eq!(c.load(Ordering::Acquire), 2000 + i as u64, "child's write");
    }
    assert_eq!(cells.ref_count(), 2);

    let before = arena.stats();
    let n = 50u64;
    send_u64(&mut peer.sock, n);
    for i in 0..n {
        let h = arena.construct([i * 7; 32]).unwrap();
        send_blob(&mut peer.sock, &h.lend());
        // Our reference goes; the lent one keeps the object alive until the child drops it.
    }
    assert_eq!(recv_u64(&mut peer.sock), 2);
    let after = arena.stats();
    assert_eq!(
        (after.blocks_in_use, after.bytes_in_use),
        (before.blocks_in_use, before.bytes_in_use),
        "the child freed what we allocated"
    );

    send_u64(&mut peer.sock, n);
    let mut theirs = Vec::new();
    for i in 0..n {
        let h: ShmHandle<[u64; 32]> = arena.borrow(&recv_blob(&mut peer.sock)).unwrap();
        assert!(h.iter().all(|&v| v == i * 11));
        theirs.push(h);
    }
    let big: ShmHandle<[u8; 8 << 20]> = arena.borrow(&recv_blob(&mut peer.sock)).unwrap();
    assert!(check(&big[..], 99), "the child's 8 MiB, read in place");
    send_u64(&mut peer.sock, 3);
    wait_ok(peer);

    // The child is gone; everything it allocated is ours now and freed by our drops.
    assert_eq!(cells.ref_count(), 1);
    drop((theirs, big, cells));
    let s = arena.stats();
    assert_eq!((s.blocks_in_use, s.bytes_in_use), (0, 0), "{s:?}");
    assert_nothing_stranded(&arena);
    assert!(dev_shm_leftovers().is_empty());
}

fn churn(arena: &Arena, seed: u64, ops: u64) {
    let mut rng = Rng::new(seed);
    let mut live = Vec::new();
    for op in 0..ops {
        if live.len() < 32 && rng.below(3) != 0 {
            let size = rng.size();
            let mut b = arena.alloc(size).unwrap();
            fill(b.as_mut_slice(), seed ^ op);
            live.push((b, seed ^ op));
        } else if !live.is_empty() {
            let (b, tag) = live.swap_remove(rng.below(live.len() as u64) as usize);
            assert!(check(b.as_slice(), tag), "block corrupted");
        }
    }
    for (b, tag) in live {
        assert!(check(b.as_slice(), tag), "block corrupted");
    }
}

fn child_alloc_concurrently(sock: &mut std::os::unix::net::UnixStream, arena: &Arena) {
    let seed = recv_u64(sock);
    on_threads(2, |t| churn(arena, seed + t, 3000));
    send_u64(sock, 1);
}

#[test]
fn two_processes_allocate_concurrently_in_one_arena() {
    let arena = Arena::create(ArenaConfig::new().pool_size(256 << 20)).unwrap();
    let mut peer = spawn("alloc_concurrently", &arena);
    send_u64(&mut peer.sock, 1 << 32);
    on_threads(2, |t| churn(&arena, 77 + t, 3000));
    assert_eq!(recv_u64(&mut peer.sock), 1);
    wait_ok(peer);
    let s = arena.stats();
    assert_eq!((s.blocks_in_use, s.bytes_in_use), (0, 0), "{s:?}");
    assert_nothing_stranded(&arena);
}

/// After every other process of the arena is gone: no block is stranded in a thread cache
/// (ours is flushed; a dead process's is reclaimed if its thread-local destructors did not run).
fn assert_nothing_stranded(arena: &Arena) {
    arena.flush_thread_cache();
    arena.reclaim_dead_caches();
    let v = arena.verify().unwrap();
    assert_eq!(v.cached_blocks, 0, "{v:?}");
}

/// Allocates, frees, clones, drops, lends and borrows as fast as it can until killed.
fn child_churn(sock: &mut std::os::unix::net::UnixStream, arena: &Arena) {
    let seed = recv_u64(sock);
    let mut rng = Rng::new(seed);
    let mut handles: Vec<ShmHandle<[u64; 4]>> = Vec::new();
    let mut blocks = Vec::new();
    // A small allocation and free first: this thread has claimed its cache before the parent
    // (which counts on reclaiming it) is told to go on, however slow the start (ASan, a loaded
    // machine).
    drop(arena.alloc(64).unwrap());
    send_u64(sock, 1);
    loop {
        match rng.below(6) {
            0 => blocks.push(arena.alloc(rng.size()).unwrap()),
            1 => drop(blocks.pop()),
            2 => handles.push(arena.construct([seed; 4]).unwrap()),
            3 => {
                if let Some(h) = handles.last() {
                    let c = h.clone();
                    let there: ShmHandle<[u64; 4]> = arena.borrow(&c.lend()).unwrap();
                    drop(c);
                    handles.push(there);
                }
            }
            4 => drop(handles.pop()),
            _ => {
                if blocks.len() > 64 {
                    blocks.clear();
                }
                if handles.len() > 64 {
                    handles.clear();
                }
            }
        }
    }
}

#[test]
fn sigkilled_peer_never_hangs_or_corrupts_the_allocator() {
    let arena = Arena::create(ArenaConfig::new().pool_size(512 << 20)).unwrap();
    let mut rng = Rng::new(5);
    let held: ShmHandle<[u64; 4]> = arena.construct([42; 4]).unwrap();
    for round in 0..12u64 {
        let mut peer = spawn("churn", &arena);
        send_u64(&mut peer.sock, round);
        assert_eq!(recv_u64(&mut peer.sock), 1, "child started");
        // Allocate alongside the child, then kill it at a random instant.
        let kill_after = Duration::from_millis(5 + rng.below(40));
        let arena2 = arena.clone();
        let (started, has_cache) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            // A small allocation first: this thread claims its cache before the kill. (A claim
            // made after it may take the dead child's cache over, as claims do, and leave
            // nothing for the reclaim below to find: with large allocations first, slowed by
            // the faults of fresh pages, that happened.)
            drop(arena2.alloc(64).unwrap());
            started.send(()).unwrap();
            churn(&arena2, 1000 + round, 400)
        });
        has_cache.recv().unwrap();
        std::thread::sleep(kill_after);
        peer.child.kill().unwrap(); // SIGKILL
        let status = peer.child.wait().unwrap();
        assert!(!status.success());
        worker.join().unwrap();
        // The dead child's thread caches (one per pool it used) are reclaimed: its locks died
        // with it.
        assert!(arena.reclaim_dead_caches() >= 1, "round {round}");
        // The survivor keeps allocating, without hanging, right after the kill.
        let arena2 = arena.clone();
        within(60, "allocating after a SIGKILL", move || {
            churn(&arena2, 2000 + round, 500)
        });
        arena.verify().unwrap();
    }
    // Our own object survived every round untouched.
    assert_eq!(*held, [42; 4]);
    assert_eq!(held.ref_count(), 1);
    let v = arena.verify().unwrap();
    // Whatever the children held is leaked (acceptable), the rest is consistent and reusable.
    let arena2 = arena.clone();
    within(60, "final churn", move || churn(&arena2, 9, 2000));
    eprintln!("after 12 SIGKILLs: {v:?}, {:?}", arena.stats());
    assert!(dev_shm_leftovers().is_empty());
}

fn rss_shmem_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssShmem:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn child_rss(sock: &mut std::os::unix::net::UnixStream, arena: &Arena) {
    let before = rss_shmem_kib();
    let big: ShmHandle<[u8; 64 << 20]> = arena.borrow(&recv_blob(sock)).unwrap();
    assert!(check(&big[..], 5));
    // Reading every page maps the parent's pages into this process: resident shared memory
    // grows by the size of the object, and the pool's memory use (in the parent) does not.
    send_u64(sock, rss_shmem_kib() - before);
}

#[test]
fn a_64_mib_object_is_read_in_place_by_the_other_process() {
    let arena = Arena::create(ArenaConfig::new().pool_size(128 << 20)).unwrap();
    let mut big = arena.construct_zeroed::<[u8; 64 << 20]>().unwrap();
    fill(big.get_mut().unwrap(), 5);
    let pool_file = std::fs::File::from(arena.pool_fd(0).unwrap().try_clone_to_owned().unwrap());
    use std::os::unix::fs::MetadataExt;
    let blocks_before = pool_file.metadata().unwrap().blocks();
    let mut peer = spawn("rss", &arena);
    send_blob(&mut peer.sock, &big.lend());
    let child_rss_growth_kib = recv_u64(&mut peer.sock);
    wait_ok(peer);
    let blocks_after = pool_file.metadata().unwrap().blocks();
    // The child mapped the same 64 MiB: its RssShmem grew by about that much...
    assert!(
        child_rss_growth_kib >= 60 << 10,
        "child RssShmem grew by {child_rss_growth_kib} KiB"
    );
    // ...while the memory behind the pool did not grow at all: no copy was made.
    assert_eq!(blocks_before, blocks_after);
    drop(big);
    assert_eq!(arena.stats().blocks_in_use, 0);
}

fn child_borrow_and_drop(sock: &mut std::os::unix::net::UnixStream, arena: &Arena) {
    let h: ShmHandle<[u64; 32]> = arena.borrow(&recv_blob(sock)).unwrap();
    let sum: u64 = h.iter().sum();
    drop(h);
    send_u64(sock, sum);
}

/// One round: an arena of two pools, objects in both, one lent to another process that joins
/// the arena, reads it and drops it; then everything dropped here.
fn arena_round(i: usize) {
    let arena = Arena::create(ArenaConfig::new().pool_size(1 << 20).max_pools(2)).unwrap();
    let filler = arena.alloc(700 << 10).unwrap();
    let spill = arena.alloc(700 << 10).unwrap();
    assert_eq!(
        arena.stats().pools,
        2,
        "the second block took a second pool"
    );
    let h = arena.construct([i as u64; 32]).unwrap();
    let mut peer = spawn("borrow_and_drop", &arena);
    send_blob(&mut peer.sock, &h.lend());
    assert_eq!(recv_u64(&mut peer.sock), 32 * i as u64);
    wait_ok(peer);
    assert_eq!(h.ref_count(), 1);
    drop((filler, spill, h));
    assert_eq!(arena.stats().blocks_in_use, 0);
}

#[test]
fn arenas_joined_by_another_process_give_back_every_fd_and_mapping() {
    balance::isolated(
        "arenas_joined_by_another_process_give_back_every_fd_and_mapping",
        || balance::balanced(8, &[], arena_round),
    );
}
