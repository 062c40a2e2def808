//! The allocator under contention, looking for lost updates: several threads in two processes
//! allocate and free in one arena as fast as they can. Every owner stamps its block (first and
//! last word) with a value no other owner ever writes and checks the stamp before freeing it,
//! so a block handed out twice (two owners at once) is seen; at the end the arena's accounting
//! must balance and its free lists verify (no block listed twice, none stranded).
//!
//! Each round uses a new arena: a young arena's requests are served from fresh space (the bump
//! pointer) and fresh spans, and its threads claim their cache slots, which is where racing
//! owners meet.

mod common;

use std::collections::VecDeque;

use common::*;
use flowipc::shm::{Arena, ArenaConfig, Block, Error};

const ROUNDS: u64 = 12;
const OPS: u64 = 20_000;
/// Blocks an owner holds at once (oldest freed first, so each is held a while).
const WINDOW: usize = 24;
/// Most large blocks an owner takes in its first phase (the pool fills before).
const GRAB: u64 = 4096;

#[test]
#[ignore = "child-process entry point, spawned by the other tests of this file"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    assert_eq!(role, "hammer");
    let (mut sock, arena) = child_connect();
    let seed = recv_u64(&mut sock);
    on_threads(2, |t| hammer(&arena, seed | t, OPS));
    send_u64(&mut sock, 1);
}

/// A size: mostly small (every class), some up to 64 KiB, some large extents up to 1 MiB.
fn size(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0..=5 => 1 + rng.below(4096) as usize,
        6..=8 => 4096 + rng.below(60 << 10) as usize,
        _ => (64 << 10) + rng.below(960 << 10) as usize,
    }
}

fn stamp(b: &mut Block<'_>, v: u64) {
    let s = b.as_mut_slice();
    let n = s.len();
    s[..8].copy_from_slice(&v.to_le_bytes());
    s[n - 8..].copy_from_slice(&(!v).to_le_bytes());
}

fn stamped(b: &Block<'_>, v: u64) -> bool {
    let s = b.as_slice();
    let n = s.len();
    s[..8] == v.to_le_bytes() && s[n - 8..] == (!v).to_le_bytes()
}

/// As owner `owner` (unique across threads and processes): first takes large blocks of fresh
/// space until the pool is full (every one a move of the bump pointer, raced by the other
/// owners), then frees them; then `ops` random allocations and frees.
fn hammer(arena: &Arena, owner: u64, ops: u64) {
    let mut rng = Rng::new(owner);
    let mut grabbed = Vec::new();
    for i in 0..GRAB {
        let v = owner << 32 | 1 << 31 | i;
        match arena.alloc((64 << 10) + 16 + rng.below(64 << 10) as usize) {
            Ok(mut b) => {
                stamp(&mut b, v);
                grabbed.push((b, v));
            }
            Err(Error::OutOfMemory { .. }) => break,
            Err(e) => panic!("owner {owner:#x}: {e}"),
        }
    }
    for (b, v) in grabbed {
        assert!(
            stamped(&b, v),
            "owner {owner:#x}: fresh block {:?} was written by another owner: handed out twice",
            b.block_ref()
        );
    }
    let mut live: VecDeque<(Block<'_>, u64)> = VecDeque::with_capacity(WINDOW);
    let check_and_free = |(b, v): (Block<'_>, u64)| {
        assert!(
            stamped(&b, v),
            "owner {owner:#x}: block {:?} was written by another owner: handed out twice",
            b.block_ref()
        );
        drop(b);
    };
    for op in 0..ops {
        if live.len() >= WINDOW || (op % 3 == 2 && !live.is_empty()) {
            let i = rng.below(live.len().min(4) as u64) as usize;
            check_and_free(live.remove(i).unwrap());
            continue;
        }
        let v = owner << 32 | op;
        match arena.alloc(16 + size(&mut rng)) {
            Ok(mut b) => {
                stamp(&mut b, v);
                live.push_back((b, v));
            }
            Err(Error::OutOfMemory { .. }) => {
                if let Some(oldest) = live.pop_front() {
                    check_and_free(oldest);
                }
            }
            Err(e) => panic!("owner {owner:#x}: {e}"),
        }
    }
    for item in live {
        check_and_free(item);
    }
}

#[test]
fn racing_owners_in_two_processes_never_share_a_block_and_the_books_balance() {
    for round in 0..ROUNDS {
        let arena = Arena::create(ArenaConfig::new().pool_size(256 << 20).max_pools(1)).unwrap();
        let mut peer = spawn("hammer", &arena);
        send_u64(&mut peer.sock, (round << 8 | 0x80) << 16);
        on_threads(2, |t| hammer(&arena, (round << 8 | t) << 16, OPS));
        assert_eq!(recv_u64(&mut peer.sock), 1);
        wait_ok(peer);
        let s = arena.stats();
        assert_eq!(
            (s.blocks_in_use, s.bytes_in_use),
            (0, 0),
            "round {round}: {s:?}"
        );
        // Our threads have exited (their caches went back); the child's went back as it exited.
        arena.reclaim_dead_caches();
        let v = arena.verify().unwrap();
        assert_eq!(v.cached_blocks, 0, "round {round}: {v:?}");
    }
}

#[test]
fn racing_threads_never_share_a_block_and_the_books_balance() {
    for round in 0..ROUNDS {
        let arena = Arena::create(ArenaConfig::new().pool_size(256 << 20).max_pools(1)).unwrap();
        on_threads(4, |t| hammer(&arena, (round << 8 | t) << 16 | 0xff, OPS));
        let s = arena.stats();
        assert_eq!(
            (s.blocks_in_use, s.bytes_in_use),
            (0, 0),
            "round {round}: {s:?}"
        );
        let v = arena.verify().unwrap();
        assert_eq!(v.cached_blocks, 0, "round {round}: {v:?}");
    }
}
