//! Sharing an arena over a Unix socket (`Arena::send_to`, `Arena::join_from`,
//! `Arena::add_pools_from`): across a real process boundary, with more pools than one message
//! carries and pools created after the share; and bad input of every kind, each with its specific
//! error, no fd leaked, and both arenas usable afterwards.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::*;
use flowipc::shm::{Arena, ArenaConfig, Error, ReceiveError, ShmHandle};

/// Bytes of a block that fills most of a 1 MiB pool: each one the arena makes grows it by a pool.
const POOL_FILLER: usize = 768 << 10;
type Filler = [u64; POOL_FILLER / 8];

fn small_pools() -> ArenaConfig {
    ArenaConfig::new().pool_size(1 << 20).max_pools(32)
}

/// Grows `arena` until it has `pools` pools, each new one holding a filler whose first word is
/// its pool id. Returns the fillers (dropping them frees them).
fn grow_to(arena: &Arena, pools: u32) -> Vec<ShmHandle<Filler>> {
    let mut held = Vec::new();
    while arena.pool_ids().len() < pools as usize {
        let mut h = arena.construct_zeroed::<Filler>().unwrap();
        h.get_mut().unwrap()[0] = u64::from(h.block_ref().pool);
        held.push(h);
    }
    held
}

/// The arena works: lists consistent, and a fresh object can be made, lent and borrowed.
fn assert_usable(arena: &Arena) {
    arena.verify().unwrap();
    let h = arena.construct(7u64).unwrap();
    let b: ShmHandle<u64> = arena.borrow(&h.lend()).unwrap();
    assert_eq!(*b, 7);
}

/// A share message as `Arena::send_to` documents it: magic, version, fds attached, pools in all.
fn message(version: u16, fds: u16, total: u32) -> Vec<u8> {
    let mut m = b"FIPCPOOL".to_vec();
    m.extend_from_slice(&version.to_le_bytes());
    m.extend_from_slice(&fds.to_le_bytes());
    m.extend_from_slice(&total.to_le_bytes());
    m
}

/// Entry point of every child process of this file (run by `common::spawn`, never directly).
#[test]
#[ignore = "child-process entry point, spawned by the other tests of this file"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    let (mut sock, arena) = child_connect();
    match role.as_str() {
        "join_and_grow" => child_join_and_grow(&mut sock, &arena),
        other => panic!("unknown role {other}"),
    }
}

fn child_join_and_grow(sock: &mut UnixStream, arena: &Arena) {
    // 1. Joined (by `child_connect`) with every pool, from a share of two messages; the
    //    parent's fillers read in place.
    let n = recv_u64(sock) as u32;
    assert_eq!(arena.pool_ids(), (0..n).collect::<Vec<_>>());
    for _ in 0..recv_u64(sock) {
        let h: ShmHandle<Filler> = arena.borrow(&recv_blob(sock)).unwrap();
        assert_eq!(h[0], u64::from(h.block_ref().pool), "the parent's bytes");
    }
    // 2. The parent grew the arena: its blob names a pool unknown here until the new share.
    let blob = recv_blob(sock);
    let Err(e) = arena.borrow::<Filler>(&blob) else {
        panic!("a blob of a pool not shared yet was borrowed");
    };
    assert!(matches!(e, Error::UnknownPool(id) if id >= n), "{e:?}");
    assert_eq!(arena.add_pools_from(sock).unwrap(), vec![n, n + 1]);
    let h: ShmHandle<Filler> = arena.borrow(&blob).unwrap();
    assert_eq!(h[0], u64::from(h.block_ref().pool));
    drop(h);
    // 3. An object made here, in the shared arena, for the parent.
    let mine = arena.construct([5u64; 4]).unwrap();
    send_blob(sock, &mine.lend());
    drop(mine);
    assert_eq!(recv_u64(sock), 99, "parent done");
}

#[test]
fn a_child_joins_over_the_socket_and_learns_pools_made_later() {
    let arena = Arena::create(small_pools()).unwrap();
    // 10 pools: more than one share message carries (8).
    let fillers = grow_to(&arena, 10);
    let mut peer = spawn("join_and_grow", &arena);
    send_u64(&mut peer.sock, 10);
    send_u64(&mut peer.sock, fillers.len() as u64);
    for h in &fillers {
        send_blob(&mut peer.sock, &h.lend());
    }
    // Grow by two pools after the share, lend from one of them, then share again.
    let later = grow_to(&arena, 12);
    let new = later.iter().find(|h| h.block_ref().pool >= 10).unwrap();
    send_blob(&mut peer.sock, &new.lend());
    arena.send_to(&peer.sock).unwrap();
    // The child's object, freed here by the last drop.
    let theirs: ShmHandle<[u64; 4]> = arena.borrow(&recv_blob(&mut peer.sock)).unwrap();
    assert_eq!(*theirs, [5; 4]);
    send_u64(&mut peer.sock, 99);
    wait_ok(peer);
    drop((theirs, fillers, later));
    assert_eq!(arena.stats().blocks_in_use, 0);
    assert_usable(&arena);
}

#[test]
fn a_share_is_read_exactly_and_resending_it_adds_nothing() {
    let arena = Arena::create(small_pools()).unwrap();
    let (mine, theirs) = UnixStream::pair().unwrap();
    // The application's own bytes around the share are untouched.
    (&mine).write_all(b"before").unwrap();
    arena.send_to(&mine).unwrap();
    (&mine).write_all(b"after").unwrap();
    let mut b = [0u8; 6];
    (&theirs).read_exact(&mut b).unwrap();
    assert_eq!(&b, b"before");
    let joined = Arena::join_from(&theirs, ArenaConfig::new()).unwrap();
    let mut a = [0u8; 5];
    (&theirs).read_exact(&mut a).unwrap();
    assert_eq!(&a, b"after");
    assert_eq!(joined.id(), arena.id());
    // The same pools again: nothing new.
    arena.send_to(&mine).unwrap();
    assert_eq!(joined.add_pools_from(&theirs).unwrap(), Vec::<u32>::new());
    assert_eq!(joined.pool_ids(), vec![0]);
    assert_usable(&joined);
}

#[test]
fn join_from_refuses_bad_shares_with_their_specific_error() {
    let arena = Arena::create(small_pools()).unwrap();
    let _fillers = grow_to(&arena, 2);
    let pool = |id| arena.pool_fd(id).unwrap();
    // Each case: what the peer writes (bytes and the fds attached), and the error expected.
    let join = |bytes: &[u8], fds: &[BorrowedFd<'_>]| {
        let (mine, theirs) = UnixStream::pair().unwrap();
        if !bytes.is_empty() {
            send_with_fds(&mine, bytes, fds);
        }
        drop(mine);
        Arena::join_from(&theirs, ArenaConfig::new()).unwrap_err()
    };

    // Nothing at all: the peer closed.
    let e = join(b"", &[]);
    assert!(matches!(e, ReceiveError::EndOfStream), "{e:?}");
    // Not a share.
    let e = join(b"sixteen bytes...", &[]);
    assert!(matches!(e, ReceiveError::BadMessage("bad magic")), "{e:?}");
    let e = join(&message(2, 1, 1), &[pool(0)]);
    assert!(matches!(e, ReceiveError::BadMessage(_)), "version: {e:?}");
    for (fds, total) in [(0, 1), (9, 9), (1, 0), (1, 1025)] {
        let e = join(&message(1, fds, total), &[]);
        assert!(
            matches!(e, ReceiveError::BadMessage(_)),
            "{fds}/{total}: {e:?}"
        );
    }
    // The header without its fd (bytes written without SCM_RIGHTS).
    let e = join(&message(1, 1, 1), &[]);
    assert!(
        matches!(
            e,
            ReceiveError::FdCount {
                expected: 1,
                received: 0
            }
        ),
        "{e:?}"
    );
    // A share cut short: two pools announced, one message, then the peer closed.
    let e = join(&message(1, 1, 2), &[pool(0)]);
    assert!(matches!(e, ReceiveError::EndOfStream), "{e:?}");
    // Fds that are not pools: a socket, a pipe, an unsealed memfd, a sealed memfd of zeros.
    let (s, _s2) = UnixStream::pair().unwrap();
    let (r, _w) = nix::unistd::pipe().unwrap();
    let unsealed = memfd("unsealed");
    unsealed.set_len(1 << 20).unwrap();
    let zeros = memfd("zeros");
    zeros.set_len(1 << 20).unwrap();
    seal_size(&zeros);
    for fd in [s.as_fd(), r.as_fd(), unsealed.as_fd()] {
        let e = join(&message(1, 1, 1), &[fd]);
        assert!(matches!(e, ReceiveError::Arena(Error::NotSealed)), "{e:?}");
    }
    let e = join(&message(1, 1, 1), &[zeros.as_fd()]);
    assert!(
        matches!(e, ReceiveError::Arena(Error::NotAPool("bad magic"))),
        "{e:?}"
    );
    // Real pools, but not pool 0; pool 0 twice; pools of two arenas.
    let e = join(&message(1, 1, 1), &[pool(1)]);
    assert!(
        matches!(e, ReceiveError::Arena(Error::UnknownPool(0))),
        "{e:?}"
    );
    let e = join(&message(1, 2, 2), &[pool(0), pool(0)]);
    assert!(
        matches!(e, ReceiveError::Arena(Error::DuplicatePool(0))),
        "{e:?}"
    );
    let other = Arena::create(small_pools()).unwrap();
    let e = join(&message(1, 2, 2), &[pool(0), other.pool_fd(0).unwrap()]);
    assert!(
        matches!(e, ReceiveError::Arena(Error::WrongArena { .. })),
        "{e:?}"
    );
    // A pool id beyond the joiner's max_pools.
    let (mine, theirs) = UnixStream::pair().unwrap();
    arena.send_to(&mine).unwrap();
    let e = Arena::join_from(&theirs, ArenaConfig::new().max_pools(1)).unwrap_err();
    assert!(
        matches!(e, ReceiveError::Arena(Error::BadConfig(_))),
        "{e:?}"
    );

    assert_usable(&arena);
    assert_usable(&other);
    assert_eq!(arena.pool_ids(), vec![0, 1]);
}

#[test]
fn fds_beyond_what_a_message_announces_are_refused_and_closed() {
    let arena = Arena::create(small_pools()).unwrap();
    // Two fds where the header announces one; then twelve, more than a message may carry (the
    // kernel cuts them off). Every one is closed: none leaks into the receiving process.
    for n in [2, 12] {
        let pairs: Vec<(UnixStream, UnixStream)> =
            (0..n).map(|_| UnixStream::pair().unwrap()).collect();
        let victims: Vec<BorrowedFd<'_>> = pairs.iter().map(|(_, v)| v.as_fd()).collect();
        let (mine, theirs) = UnixStream::pair().unwrap();
        send_with_fds(&mine, &message(1, 1, 1), &victims);
        drop(victims);
        let mut probes: Vec<UnixStream> = pairs.into_iter().map(|(p, _v)| p).collect();
        let e = Arena::join_from(&theirs, ArenaConfig::new()).unwrap_err();
        match n {
            2 => assert!(
                matches!(
                    e,
                    ReceiveError::FdCount {
                        expected: 1,
                        received: 2
                    }
                ),
                "{e:?}"
            ),
            _ => assert!(matches!(e, ReceiveError::BadMessage(_)), "{e:?}"),
        }
        assert!(
            probes.iter_mut().all(closed_everywhere),
            "{n} fds: one leaked"
        );
    }
    assert_usable(&arena);
}

#[test]
fn a_bad_config_reads_nothing_and_a_silent_peer_times_out() {
    let arena = Arena::create(small_pools()).unwrap();
    let (mine, theirs) = UnixStream::pair().unwrap();
    // Nothing sent yet, and a read timeout: WouldBlock, not a hang.
    theirs
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let e = Arena::join_from(&theirs, ArenaConfig::new()).unwrap_err();
    assert!(
        matches!(&e, ReceiveError::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock),
        "{e:?}"
    );
    // A bad configuration fails before reading: the share is still there for a good one.
    arena.send_to(&mine).unwrap();
    let e = Arena::join_from(&theirs, ArenaConfig::new().max_pools(0)).unwrap_err();
    assert!(
        matches!(e, ReceiveError::Arena(Error::BadConfig(_))),
        "{e:?}"
    );
    let joined = Arena::join_from(&theirs, ArenaConfig::new()).unwrap();
    assert_eq!(joined.id(), arena.id());
    assert_usable(&joined);
    // The errors read as sentences and keep their cause.
    assert!(e.to_string().contains("refused"), "{e}");
    let cause = std::error::Error::source(&e).unwrap().to_string();
    assert!(cause.contains("max_pools"), "{cause}");
}

#[test]
fn add_pools_from_refuses_bad_shares_and_leaves_the_arena_as_it_was() {
    let arena = Arena::create(small_pools()).unwrap();
    let (mine, theirs) = UnixStream::pair().unwrap();
    arena.send_to(&mine).unwrap();
    let joined = Arena::join_from(&theirs, ArenaConfig::new()).unwrap();
    let fillers = grow_to(&arena, 3);
    let pool = |id| arena.pool_fd(id).unwrap();
    // Each case on a fresh socket (a failed share leaves its stream out of step).
    let add = |bytes: &[u8], fds: &[BorrowedFd<'_>]| {
        let (mine, theirs) = UnixStream::pair().unwrap();
        send_with_fds(&mine, bytes, fds);
        drop(mine);
        joined.add_pools_from(&theirs).unwrap_err()
    };
    let unchanged = |what: &str| {
        assert_eq!(joined.pool_ids(), vec![0], "{what}: nothing added");
        assert_usable(&joined);
    };

    // The share of another arena.
    let other = Arena::create(small_pools()).unwrap();
    let (m, t) = UnixStream::pair().unwrap();
    other.send_to(&m).unwrap();
    let e = joined.add_pools_from(&t).unwrap_err();
    assert!(
        matches!(e, ReceiveError::Arena(Error::WrongArena { .. })),
        "{e:?}"
    );
    unchanged("another arena");
    // New pools with a non-pool among them: none is added.
    let (r, _w) = nix::unistd::pipe().unwrap();
    let e = add(&message(1, 3, 3), &[pool(1), pool(2), r.as_fd()]);
    assert!(matches!(e, ReceiveError::Arena(Error::NotSealed)), "{e:?}");
    unchanged("a pipe among the pools");
    // A new pool twice.
    let e = add(&message(1, 2, 2), &[pool(1), pool(1)]);
    assert!(
        matches!(e, ReceiveError::Arena(Error::DuplicatePool(1))),
        "{e:?}"
    );
    unchanged("pool 1 twice");
    // A header without its fds; a share cut short.
    let e = add(&message(1, 2, 2), &[]);
    assert!(
        matches!(
            e,
            ReceiveError::FdCount {
                expected: 2,
                received: 0
            }
        ),
        "{e:?}"
    );
    let e = add(&message(1, 1, 3), &[pool(1)]);
    assert!(matches!(e, ReceiveError::EndOfStream), "{e:?}");
    unchanged("short shares");
    // A pool beyond this instance's max_pools (another joiner, of one pool at most).
    let (m, t) = UnixStream::pair().unwrap();
    arena.send_to(&m).unwrap();
    let e = Arena::join_from(&t, ArenaConfig::new().max_pools(1)).unwrap_err();
    assert!(
        matches!(e, ReceiveError::Arena(Error::BadConfig(_))),
        "{e:?}"
    );
    let small = {
        let (m, t) = UnixStream::pair().unwrap();
        let a = Arena::create(small_pools()).unwrap();
        a.send_to(&m).unwrap();
        let j = Arena::join_from(&t, ArenaConfig::new().max_pools(1)).unwrap();
        let _fillers = grow_to(&a, 2);
        a.send_to(&m).unwrap();
        let e = j.add_pools_from(&t).unwrap_err();
        assert!(
            matches!(e, ReceiveError::Arena(Error::BadConfig(_))),
            "{e:?}"
        );
        assert_eq!(j.pool_ids(), vec![0]);
        j
    };
    assert_usable(&small);

    // After all that, the real share: the two new pools, and their objects readable here.
    arena.send_to(&mine).unwrap();
    assert_eq!(joined.add_pools_from(&theirs).unwrap(), vec![1, 2]);
    for h in &fillers {
        let there: ShmHandle<Filler> = joined.borrow(&h.lend()).unwrap();
        assert_eq!(there[0], u64::from(h.block_ref().pool));
    }
    assert_usable(&joined);
    assert_usable(&arena);
}

/// The creator's byte limit is the arena's: a joiner that asks for none obeys it, the pools
/// both grow by count against the same limit, and a growth that would pass it fails with
/// `LimitReached` while what still fits goes on working, in both instances.
#[test]
fn the_creators_byte_limit_binds_every_instance() {
    let limit = 3 << 20;
    let arena = Arena::create(small_pools().max_bytes(limit)).unwrap();
    let (mine, theirs) = UnixStream::pair().unwrap();
    arena.send_to(&mine).unwrap();
    let joined = Arena::join_from(&theirs, ArenaConfig::new().pool_size(1 << 20)).unwrap();
    // Each grows the arena by a pool (1 MiB each, the joiner's is sized to fit its filler).
    let a = grow_to(&arena, 2);
    let b = joined.construct_zeroed::<Filler>().unwrap();
    assert_ne!(b.block_ref().pool, 0);
    arena.send_to(&mine).unwrap();
    joined.add_pools_from(&theirs).unwrap();
    let bytes = |x: &Arena| -> u64 {
        x.pool_ids()
            .iter()
            .map(|&id| x.pool(id).unwrap().capacity())
            .sum()
    };
    // Another pool passes the limit, whichever instance asks.
    for x in [&arena, &joined] {
        let e = x.construct_zeroed::<Filler>().unwrap_err();
        assert!(
            matches!(e, Error::LimitReached { limit: l, .. } if l == limit),
            "{e:?}"
        );
        assert!(bytes(x) <= limit, "{} bytes of pools", bytes(x));
        assert_usable(x);
    }
    drop((a, b));
}
