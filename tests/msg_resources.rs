//! Messages give back everything they hold: a message sent, read by another process and written
//! again; a message handle given back with `release_blob` instead of being read. Each test runs
//! in a process of its own and counts fds, pool mappings and arena blocks over many rounds
//! (`common::balance`).

mod common;

use common::balance::{balanced, isolated};
use common::msgs::{chan_over, chunks, chunks_of, Chan, T};
use flowipc::msg::{Backing, MsgOut};
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::shm::{Arena, ArenaConfig, LendBlob};
use flowipc::transport::{Channel, ChannelConfig};

fn hello(m: &mut MsgOut<cool_msg::Owned>, num: i64) {
    let mut h = m.init_root().init_hello_there();
    h.set_greeting("hi");
    h.set_num(num);
}

fn num_of(m: &flowipc::msg::MsgIn<cool_msg::Owned>) -> i64 {
    match m.which() {
        Ok(cool_msg::HelloThere(Ok(h))) => h.get_num(),
        Ok(cool_msg::Blob(Ok(_))) => {
            let (tag, data) = chunks_of(m.root().unwrap());
            for (c, d) in data.iter().enumerate() {
                let want = (tag as u8).wrapping_add(c as u8);
                assert!(d.iter().all(|&x| x == want));
            }
            data.len() as i64
        }
        _ => panic!("unexpected message"),
    }
}

#[test]
#[ignore = "child-process entry point, spawned by the other tests of this file"]
fn child_entry() {
    match common::child_role().as_deref() {
        Some("read_and_drop") => child_read_and_drop(),
        Some("release") => child_release(),
        Some(other) => panic!("unknown role {other}"),
        None => {}
    }
}

/// Reads two messages zero-copy, drops them, and says what they held.
fn child_read_and_drop() {
    let mut chan = chan_over(common::child_socket(), Backing::Heap);
    let a = chan.recv_blocking(T).unwrap().unwrap();
    let b = chan.recv_blocking(T).unwrap().unwrap();
    assert!(a.is_zero_copy() && b.is_zero_copy());
    let said = num_of(&a) * 100 + num_of(&b);
    drop((a, b));
    let mut m = chan.create_msg();
    hello(&mut m, said);
    chan.send(&mut m, None).unwrap();
    chan.flush_blocking(T).unwrap();
}

/// Gives back the reference of a message handle it never reads; reports the arena's blocks.
fn child_release() {
    let (mut sock, arena) = common::child_connect();
    let blob = common::recv_blob(&mut sock);
    arena.release_blob(&blob).unwrap();
    common::send_u64(&mut sock, 1);
}

/// One round: a one-segment and a three-chunk message sent to another process, read and
/// dropped there, then written again here (they thaw in place: nobody else holds them).
fn send_read_rewrite() {
    let arena = Arena::create(ArenaConfig::new().pool_size(8 << 20)).unwrap();
    let peer = common::spawn_plain("read_and_drop");
    // (Every message in place, the small one too: the handle path is under test.)
    let mut chan =
        chan_over(peer.sock.try_clone().unwrap(), Backing::Shm(arena.clone())).with_inline_max(0);
    let mut small = chan.create_msg();
    hello(&mut small, 7);
    let mut big = chan.create_msg();
    chunks(&mut big, 3, 40);
    chan.send(&mut small, None).unwrap();
    chan.send(&mut big, None).unwrap();
    let answer = chan.recv_blocking(T).unwrap().unwrap();
    assert_eq!(num_of(&answer), 703);
    drop(answer);
    assert_eq!(
        small.shared_refs(),
        Some(1),
        "the reader's reference is gone"
    );
    assert_eq!(big.shared_refs(), Some(1));
    hello(&mut small, 8);
    chunks(&mut big, 2, 50);
    assert!(!small.is_shared() && !big.is_shared(), "thawed");
    drop((small, big));
    assert_eq!(arena.stats().blocks_in_use, 0, "every segment freed");
    drop(chan);
    common::wait_ok(peer);
}

#[test]
fn a_sent_message_written_again_leaks_nothing_across_processes() {
    isolated(
        "a_sent_message_written_again_leaks_nothing_across_processes",
        || balanced(10, &[], |_| send_read_rewrite()),
    );
}

/// Sends `msg` over a channel whose other end nobody reads and returns the handle's blob (the
/// message's frame never reaches a reader: its reference is the caller's to give back).
fn intercept(arena: &Arena, msg: &mut MsgOut<cool_msg::Owned>) -> LendBlob {
    let (a, mut from_tx) = Channel::pair(ChannelConfig::new()).unwrap();
    let mut tx = Chan::new(a, Backing::Shm(arena.clone())).with_inline_max(0);
    tx.send(msg, None).unwrap();
    tx.flush_blocking(T).unwrap();
    // Pool announcements first (the first message of an arena), then the handle's frame:
    // kind 2, then its 32-byte blob after the 24-byte header.
    let blob = loop {
        let f = from_tx
            .recv_blocking(T)
            .unwrap()
            .expect("the handle's frame");
        let (bytes, _) = f.into_parts();
        if bytes[0] == 2 {
            break LendBlob::from_bytes(bytes[24..].try_into().unwrap()).unwrap();
        }
    };
    // The channel's drop must not give the reference back: it was written whole.
    drop((tx, from_tx));
    blob
}

/// One round: handles of a one-segment and a multi-segment message given back unread by
/// another process, once while the sender still holds the message and once as the last
/// reference (which then frees every segment and the table from that process).
fn release_unread(i: usize) {
    let arena = Arena::create(ArenaConfig::new().pool_size(8 << 20)).unwrap();
    for (n, last_here) in [(0, false), (3, false), (0, true), (3, true)] {
        let mut msg = Some(MsgOut::<cool_msg::Owned>::new_in(&arena));
        let m = msg.as_mut().unwrap();
        if n == 0 {
            hello(m, i as i64);
        } else {
            chunks(m, n, i as u8);
        }
        let blob = intercept(&arena, m);
        assert_eq!(m.shared_refs(), Some(2), "the sender's and the blob's");
        if !last_here {
            msg = None;
        }
        let mut peer = common::spawn("release", &arena);
        common::send_blob(&mut peer.sock, &blob);
        assert_eq!(common::recv_u64(&mut peer.sock), 1);
        common::wait_ok(peer);
        if let Some(m) = msg.take() {
            assert_eq!(m.shared_refs(), Some(1));
        }
        assert_eq!(
            arena.stats().blocks_in_use,
            0,
            "{n} chunks, last reference given back {}",
            if last_here { "here" } else { "by the peer" }
        );
    }
    arena.verify().unwrap();
}

#[test]
fn a_released_message_handle_frees_every_segment_across_processes() {
    isolated(
        "a_released_message_handle_frees_every_segment_across_processes",
        || balanced(3, &[], release_unread),
    );
}
