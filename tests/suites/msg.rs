// The msg suite, included by tests/msg.rs (over sockets) and tests/msg_shm_queue.rs (over
// shared-memory queues): `common::kind()` tells which.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use common::msgs::{chan_over, Chan, T};
use flowipc::msg::{Backing, Error, MsgChannel, MsgOut};
use flowipc::schemas::test_msgs_capnp::cool_msg;
use flowipc::shm::{self, Arena, ArenaConfig};
use common::channel_config;
use flowipc::transport::{Channel, OutFrame};

const CHUNK: usize = 256 << 20;

fn pattern(chunk: usize, page: usize) -> u8 {
    (chunk * 7 + page * 13) as u8
}

/// Builds a blob message of `chunks` chunks of `len` bytes; every 4 KiB page is filled with
/// [`pattern`].
fn build_blob(msg: &mut MsgOut<cool_msg::Owned>, chunks: usize, len: usize, tag: u64) {
    let mut blob = msg.init_root().init_blob();
    blob.set_tag(tag);
    let mut list = blob.init_chunks(chunks as u32);
    for c in 0..chunks {
        let data = list.reborrow().get(c as u32).init_data(len as u32);
        for (p, page) in data.chunks_mut(4096).enumerate() {
            page.fill(pattern(c, p));
        }
    }
}

/// Checks every byte of a blob message; returns (chunks, bytes, tag).
fn check_blob(root: cool_msg::Reader<'_>) -> (usize, usize, u64) {
    let Ok(cool_msg::Blob(Ok(blob))) = root.which() else {
        panic!("not a blob");
    };
    let chunks = blob.get_chunks().unwrap();
    let mut bytes = 0;
    let mut expect = vec![0u8; 4096];
    for (c, chunk) in chunks.iter().enumerate() {
        let data = chunk.get_data().unwrap();
        for (p, page) in data.chunks(4096).enumerate() {
            expect[..page.len()].fill(pattern(c, p));
            assert!(page == &expect[..page.len()], "chunk {c} page {p} differs");
        }
        bytes += data.len();
    }
    (chunks.len() as usize, bytes, blob.get_tag())
}

fn say(chan: &mut Chan, text: &str, num: i64) {
    let mut m = chan.create_msg();
    let mut h = m.init_root().init_hello_there();
    h.set_greeting(text);
    h.set_num(num);
    chan.send(&mut m, None).unwrap();
    chan.flush_blocking(T).unwrap();
}

fn hear(chan: &mut Chan) -> (String, i64) {
    let m = chan
        .recv_blocking(T)
        .unwrap()
        .expect("a message within 60 s");
    let Ok(cool_msg::HelloThere(Ok(h))) = m.which() else {
        panic!("expected helloThere");
    };
    (h.get_greeting().unwrap().to_string().unwrap(), h.get_num())
}

#[test]
fn one_gib_message_is_read_in_place_by_another_process() {
    let arena = Arena::create(ArenaConfig::new()).unwrap();
    let peer = common::spawn_plain("one_gib");
    let mut chan = chan_over(peer.sock.try_clone().unwrap(), Backing::Shm(arena.clone()));
    let mut msg = chan.create_msg();
    build_blob(&mut msg, 4, CHUNK, 99);
    chan.send(&mut msg, None).unwrap();
    chan.flush_blocking(T).unwrap();
    // Sending added only the segment table (one small block).
    let before = arena.stats();
    assert!(before.bytes_in_use >= 1 << 30);
    assert!(before.bytes_in_use < (1 << 30) + (8 << 20));
    // The child reports what it read and how its memory grew, after dropping its MsgIn.
    let (report, anon_growth_kib) = hear(&mut chan);
    assert_eq!(report, "4 chunks, 1073741824 bytes, tag 99, zero-copy");
    assert!(
        anon_growth_kib < 64 << 10,
        "the child's private memory grew by {anon_growth_kib} KiB: it copied"
    );
    // No copy in the arena either, and the child's reference is gone.
    assert_eq!(arena.stats().blocks_in_use, before.blocks_in_use);
    assert_eq!(msg.shared_refs(), Some(1));
    drop(msg);
    assert_eq!(
        arena.stats().blocks_in_use,
        0,
        "freed when both sides dropped"
    );
    common::wait_ok(peer);
}

fn child_one_gib() {
    let mut chan = chan_over(common::child_socket(), Backing::Heap);
    let anon0 = common::balance::status_kib("RssAnon:");
    let shm0 = common::balance::status_kib("RssShmem:");
    let msg = chan.recv_blocking(T).unwrap().unwrap();
    assert!(msg.is_zero_copy());
    assert!(msg.size_in_words() * 8 >= 1 << 30);
    let (chunks, bytes, tag) = check_blob(msg.root().unwrap());
    let shm_growth = common::balance::status_kib("RssShmem:") - shm0;
    assert!(
        shm_growth >= 1 << 20,
        "read 1 GiB in place: RssShmem grew {shm_growth} KiB"
    );
    let anon = common::balance::status_kib("RssAnon:").saturating_sub(anon0);
    assert_eq!(msg.shared_refs(), Some(2));
    drop(msg);
    say(
        &mut chan,
        &format!("{chunks} chunks, {bytes} bytes, tag {tag}, zero-copy"),
        anon as i64,
    );
}

#[test]
fn an_fd_rides_with_a_message() {
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let peer = common::spawn_plain("fd");
    let mut chan = chan_over(peer.sock.try_clone().unwrap(), Backing::Shm(arena));
    let (r, w) = std::io::pipe().unwrap();
    let mut w = w;
    w.write_all(b"through the pipe").unwrap();
    drop(w);
    let mut msg = chan.create_msg();
    msg.init_root()
        .init_hello_there()
        .set_greeting("fd attached");
    chan.send(&mut msg, Some(r.as_fd())).unwrap();
    drop(r);
    assert_eq!(hear(&mut chan).0, "fd attached: through the pipe");
    common::wait_ok(peer);
}

fn child_fd() {
    let mut chan = chan_over(common::child_socket(), Backing::Heap);
    let mut msg = chan.recv_blocking(T).unwrap().unwrap();
    let fd = msg.take_fd().expect("an fd with the message");
    let mut text = String::new();
    std::fs::File::from(fd).read_to_string(&mut text).unwrap();
    let Ok(cool_msg::HelloThere(Ok(h))) = msg.which() else {
        panic!()
    };
    let greeting = h.get_greeting().unwrap().to_string().unwrap();
    say(&mut chan, &format!("{greeting}: {text}"), 0);
}

#[test]
fn a_held_message_is_frozen_and_changes_copy() {
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let peer = common::spawn_plain("cow");
    let mut chan = chan_over(peer.sock.try_clone().unwrap(), Backing::Shm(arena.clone()));
    let mut msg = chan.create_msg();
    build_blob(&mut msg, 1, 100_000, 1);
    chan.send(&mut msg, None).unwrap();
    assert_eq!(hear(&mut chan).0, "holding");
    assert!(msg.is_shared());
    assert_eq!(msg.shared_refs(), Some(2));
    // Writing while the child holds it copies; the child still sees tag 1.
    msg.get_root().unwrap().init_blob().set_tag(2);
    assert!(!msg.is_shared());
    chan.send(&mut msg, None).unwrap();
    // Re-sending unchanged adds a reference, no copy.
    chan.send(&mut msg, None).unwrap();
    assert_eq!(hear(&mut chan).0, "tags 1 2 2");
    assert_eq!(msg.shared_refs(), Some(1));
    drop(msg);
    assert_eq!(arena.stats().blocks_in_use, 0);
    common::wait_ok(peer);
}

fn child_cow() {
    let mut chan = chan_over(common::child_socket(), Backing::Heap);
    let first = chan.recv_blocking(T).unwrap().unwrap();
    say(&mut chan, "holding", 0);
    let second = chan.recv_blocking(T).unwrap().unwrap();
    let third = chan.recv_blocking(T).unwrap().unwrap();
    assert_eq!(check_blob(first.root().unwrap()), (1, 100_000, 1));
    let tag = |m: &flowipc::msg::MsgIn<cool_msg::Owned>| match m.which() {
        Ok(cool_msg::Blob(Ok(b))) => b.get_tag(),
        _ => panic!(),
    };
    let tags = format!("tags {} {} {}", tag(&first), tag(&second), tag(&third));
    assert_eq!(
        second.shared_refs(),
        Some(3),
        "two handles to one table, plus the sender"
    );
    drop((first, second, third));
    say(&mut chan, &tags, 0);
}

#[test]
fn new_pools_reach_the_peer_before_handles_into_them() {
    let arena = Arena::create(ArenaConfig::new().pool_size(1 << 20).max_pools(64)).unwrap();
    let peer = common::spawn_plain("growth");
    let mut chan = chan_over(peer.sock.try_clone().unwrap(), Backing::Shm(arena.clone()));
    let mut kept = Vec::new();
    for i in 0..12 {
        let mut msg = chan.create_msg();
        build_blob(&mut msg, 1, 700 << 10, i);
        chan.send(&mut msg, None).unwrap();
        kept.push(msg);
    }
    assert!(arena.pool_ids().len() >= 6, "{:?}", arena.pool_ids());
    assert_eq!(hear(&mut chan).0, "12 messages read");
    drop(kept);
    assert_eq!(arena.stats().blocks_in_use, 0);
    common::wait_ok(peer);
}

fn child_growth() {
    let mut chan = chan_over(common::child_socket(), Backing::Heap);
    for i in 0..12 {
        let m = chan.recv_blocking(T).unwrap().unwrap();
        assert!(m.is_zero_copy());
        assert_eq!(check_blob(m.root().unwrap()), (1, 700 << 10, i));
    }
    say(&mut chan, "12 messages read", 0);
}

#[test]
fn heap_mode_copies_through_the_socket() {
    let peer = common::spawn_plain("heap");
    let mut chan = chan_over(peer.sock.try_clone().unwrap(), Backing::Heap);
    let mut msg = chan.create_msg();
    build_blob(&mut msg, 3, 20 << 20, 5);
    chan.send(&mut msg, None).unwrap();
    // Queued parts keep the message frozen until written.
    chan.flush_blocking(T).unwrap();
    assert!(!msg.is_shared());
    assert_eq!(hear(&mut chan).0, "3 chunks, 62914560 bytes, tag 5, copied");
    common::wait_ok(peer);
}

fn child_heap() {
    let mut chan = chan_over(common::child_socket(), Backing::Heap);
    let m = chan.recv_blocking(T).unwrap().unwrap();
    assert!(!m.is_zero_copy());
    let (c, b, t) = check_blob(m.root().unwrap());
    say(
        &mut chan,
        &format!("{c} chunks, {b} bytes, tag {t}, copied"),
        0,
    );
}

#[test]
#[ignore]
fn child_entry() {
    match common::child_role().as_deref() {
        Some("one_gib") => child_one_gib(),
        Some("fd") => child_fd(),
        Some("cow") => child_cow(),
        Some("growth") => child_growth(),
        Some("heap") => child_heap(),
        Some(other) => panic!("unknown role {other}"),
        None => {}
    }
}

// ---- In one process: allocation failure and bad input from the peer. ----

/// A sender in `arena` and a heap receiver. The sender sends every message in place, however
/// small (the handle path is what the tests that use it look at).
fn pair(arena: &Arena) -> (Chan, Chan) {
    let (a, b) = Channel::pair(channel_config()).unwrap();
    (
        MsgChannel::new(a, Backing::Shm(arena.clone())).with_inline_max(0),
        MsgChannel::new(b, Backing::Heap),
    )
}

#[test]
fn a_message_the_arena_cannot_hold_fails_to_send_and_nothing_breaks() {
    let arena = Arena::create(ArenaConfig::new().pool_size(1 << 20).max_pools(1)).unwrap();
    let (mut tx, mut rx) = pair(&arena);
    let mut big = tx.create_msg();
    build_blob(&mut big, 1, 4 << 20, 7);
    let err = tx.send(&mut big, None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shm {
                source: shm::Error::OutOfMemory { .. } | shm::Error::TooLarge { .. },
                from_peer: false
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_hosing());
    // Nothing was sent, the message is intact, the channel works.
    assert!(rx.try_recv().unwrap().is_none());
    assert_eq!(check_blob(big.root().unwrap()), (1, 4 << 20, 7));
    let mut small = tx.create_msg();
    build_blob(&mut small, 1, 1000, 8);
    tx.send(&mut small, None).unwrap();
    let got = rx.recv_blocking(T).unwrap().unwrap();
    assert_eq!(check_blob(got.root().unwrap()), (1, 1000, 8));
    drop((got, small, big));
    assert_eq!(arena.stats().blocks_in_use, 0);
}

/// Sender and receiver with the test in the middle: frames from `tx` arrive at `from_tx`; the
/// test forwards (or forges) them into `to_rx`, which `rx` reads.
struct Mitm {
    tx: Chan,
    from_tx: Channel,
    to_rx: Channel,
    rx: Chan,
}

impl Mitm {
    fn new(arena: &Arena) -> Mitm {
        let (a, from_tx) = Channel::pair(channel_config()).unwrap();
        let (to_rx, d) = Channel::pair(channel_config()).unwrap();
        Mitm {
            // (Every message in place: the handles are what is relayed or forged.)
            tx: MsgChannel::new(a, Backing::Shm(arena.clone())).with_inline_max(0),
            from_tx,
            to_rx,
            rx: MsgChannel::new(d, Backing::Heap),
        }
    }

    /// Moves every frame `tx` has sent so far; message handles are forwarded only if `deliver`,
    /// and returned either way.
    fn relay(&mut self, deliver: bool) -> Vec<Vec<u8>> {
        let mut handles = Vec::new();
        while let Some(f) = self
            .from_tx
            .recv_blocking(Some(Duration::from_millis(200)))
            .unwrap()
        {
            let (bytes, fd) = f.into_parts();
            let is_handle = bytes[0] == 2;
            if is_handle {
                handles.push(bytes[24..].to_vec());
            }
            if deliver || !is_handle {
                self.to_rx
                    .send(OutFrame::new(&bytes).fd(fd.as_ref().map(|f| f.as_fd())))
                    .unwrap();
            }
        }
        handles
    }
}

/// Delivers one real message (so the receiver has joined the arena), intercepts the handle of a
/// second one and gives its reference back (so the message is freed), then lets `forge` write
/// into the receiver's socket with that handle in hand. Returns the receiver's first and second
/// errors and the arena's blocks in use once everything is dropped.
fn after_forged(forge: impl FnOnce(&mut Channel, &[u8; 32])) -> (Error, Error, u64) {
    let arena = Arena::create(ArenaConfig::new().pool_size(4 << 20)).unwrap();
    let mut m = Mitm::new(&arena);
    let mut msg = m.tx.create_msg();
    build_blob(&mut msg, 1, 1000, 1);
    m.tx.send(&mut msg, None).unwrap();
    m.relay(true);
    let real = m.rx.recv_blocking(T).unwrap().unwrap();
    assert_eq!(check_blob(real.root().unwrap()), (1, 1000, 1));
    let mut probe = m.tx.create_msg();
    build_blob(&mut probe, 1, 10, 2);
    m.tx.send(&mut probe, None).unwrap();
    let handles = m.relay(false);
    assert_eq!(handles.len(), 1);
    let blob: [u8; 32] = handles[0].as_slice().try_into().unwrap();
    arena
        .release_blob(&shm::LendBlob::from_bytes(&blob).unwrap())
        .unwrap();
    drop(probe);
    forge(&mut m.to_rx, &blob);
    let first = m.rx.recv_blocking(T).unwrap_err();
    let second = m.rx.try_recv().unwrap_err();
    drop((real, msg, m));
    (first, second, arena.stats().blocks_in_use)
}

fn shm_frame(blob: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 24];
    f[0] = 2;
    f[8] = 99;
    f.extend_from_slice(blob);
    f
}

fn assert_once(first: &Error, second: &Error) {
    assert!(first.is_hosing(), "{first:?}");
    assert!(matches!(second, Error::Hosed), "{second:?}");
}

#[test]
fn forged_handle_out_of_bounds() {
    let (first, second, left) = after_forged(|c, blob| {
        let mut b = *blob;
        b[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        c.send(&shm_frame(&b)).unwrap();
    });
    assert!(
        matches!(
            first,
            Error::Shm {
                source: shm::Error::OutOfBounds { .. },
                from_peer: true
            }
        ),
        "{first:?}"
    );
    assert_once(&first, &second);
    assert_eq!(left, 0);
}

#[test]
fn forged_handle_to_a_freed_message() {
    let (first, second, left) = after_forged(|c, blob| {
        // The handle's reference was given back: its ticket is spent.
        c.send(&shm_frame(blob)).unwrap();
    });
    assert!(
        matches!(
            first,
            Error::Shm {
                source: shm::Error::Stale,
                from_peer: true
            }
        ),
        "{first:?}"
    );
    assert_once(&first, &second);
    assert_eq!(left, 0);
}

#[test]
fn forged_handle_with_an_unknown_pool() {
    let (first, second, left) = after_forged(|c, blob| {
        let mut b = *blob;
        b[4..8].copy_from_slice(&7u32.to_le_bytes());
        c.send(&shm_frame(&b)).unwrap();
    });
    assert!(
        matches!(
            first,
            Error::Shm {
                source: shm::Error::UnknownPool(7),
                from_peer: true
            }
        ),
        "{first:?}"
    );
    assert_once(&first, &second);
    assert_eq!(left, 0);
}

#[test]
fn handle_of_an_arena_never_announced() {
    let (first, second, left) = after_forged(|c, blob| {
        let mut b = *blob;
        b[20..24].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        c.send(&shm_frame(&b)).unwrap();
    });
    assert!(
        matches!(
            first,
            Error::Shm {
                source: shm::Error::ForeignBlob,
                from_peer: true
            }
        ),
        "{first:?}"
    );
    assert_once(&first, &second);
    assert_eq!(left, 0);
}

#[test]
fn garbage_message_frames() {
    let cases: [(&[u8], &str); 6] = [
        (b"short", "frame shorter than the message header"),
        (&[9; 24], "reserved header bytes are not zero"),
        (
            &[
                9, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
            "unknown message kind",
        ),
        (
            &[
                1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
            "pool announcement without its fd",
        ),
        (
            &[
                2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
            "message id 0, or a control frame with an id",
        ),
        (
            &[
                3, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                255, 255, 0, 0,
            ],
            "segment sizes exceed the frame",
        ),
    ];
    // Unexpected-response notices: kind 4, id 0, the answered id, then a UTF-8 description of
    // at most 512 bytes.
    let notice = |answers: u8, text: &[u8]| {
        let mut f = vec![4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        f.extend_from_slice(&[answers, 0, 0, 0, 0, 0, 0, 0]);
        f.extend_from_slice(text);
        f
    };
    let mut cases: Vec<(Vec<u8>, &str)> = cases.iter().map(|(b, w)| (b.to_vec(), *w)).collect();
    cases.push((notice(0, b""), "malformed unexpected-response notice"));
    cases.push((notice(3, &[b'x'; 513]), "malformed unexpected-response notice"));
    cases.push((
        notice(3, &[0xff, 0xfe]),
        "unexpected-response notice text is not UTF-8",
    ));
    for (bytes, what) in cases {
        let (mut a, b) = Channel::pair(channel_config()).unwrap();
        let mut rx = MsgChannel::<cool_msg::Owned>::new(b, Backing::Heap);
        // A well-formed notice (no message for a plain channel: skipped), then the bad frame.
        a.send(&notice(3, "sumResponse 1 answers message 3".as_bytes()))
            .unwrap();
        a.send(&bytes).unwrap();
        let first = rx.recv_blocking(T).unwrap_err();
        assert!(
            matches!(first, Error::BadMessage(w) if w == what),
            "{what}: {first:?}"
        );
        assert_once(&first, &rx.try_recv().unwrap_err());
        // A second bad frame after the hosing is not even looked at.
        assert!(matches!(rx.recv_blocking(T), Err(Error::Hosed)));
    }
}

#[test]
fn a_bad_blob_magic_is_its_own_error() {
    let (first, second, left) = after_forged(|c, _| {
        c.send(&shm_frame(&[0x55; 32])).unwrap();
    });
    assert!(
        matches!(
            first,
            Error::Shm {
                source: shm::Error::BlobMagic,
                from_peer: true
            }
        ),
        "{first:?}"
    );
    assert_once(&first, &second);
    assert_eq!(left, 0);
}

#[test]
fn the_sender_sees_the_socket_end_not_a_panic() {
    let arena = Arena::create(ArenaConfig::new().pool_size(4 << 20)).unwrap();
    let (mut tx, rx) = pair(&arena);
    drop(rx);
    let mut msg = tx.create_msg();
    build_blob(&mut msg, 1, 1000, 1);
    let err = tx.send(&mut msg, None).unwrap_err();
    assert!(err.is_hosing(), "{err:?}");
    assert!(matches!(tx.send(&mut msg, None), Err(Error::Hosed)));
    // The handle that never left was given back.
    drop(msg);
    assert_eq!(arena.stats().blocks_in_use, 0);
    let _ = std::io::stdout().flush();
}

fn hello(msg: &mut MsgOut<cool_msg::Owned>, num: i64) {
    let mut h = msg.init_root().init_hello_there();
    h.set_greeting("hi");
    h.set_num(num);
}

#[test]
fn a_receiver_dropped_unread_gives_the_references_back() {
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let (mut tx, rx) = pair(&arena);
    let mut msg = tx.create_msg();
    hello(&mut msg, 1);
    // (Few enough to be all in the peer's hands at once with every kind: a POSIX queue holds 8
    // messages.)
    for _ in 0..5 {
        tx.send(&mut msg, None).unwrap();
    }
    assert_eq!(tx.queued_bytes(), 0);
    assert_eq!(msg.shared_refs(), Some(6));
    drop(rx);
    assert_eq!(
        msg.shared_refs(),
        Some(1),
        "the receiver's drop took in and dropped them"
    );
    assert!(!msg.is_shared());
    drop((msg, tx));
    assert_eq!(arena.stats().blocks_in_use, 0);
}

#[test]
fn handles_that_never_left_the_send_queue_are_given_back() {
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let (a, b) = Channel::pair(channel_config()).unwrap();
    let mut tx = Chan::new(a, Backing::Shm(arena.clone())).with_inline_max(0);
    let mut msg = tx.create_msg();
    hello(&mut msg, 1);
    // The peer does not read: the socket fills and later frames wait in the send queue.
    let n = 20_000;
    for _ in 0..n {
        tx.send(&mut msg, None).unwrap();
    }
    assert!(tx.queued_bytes() > 0, "the socket never filled");
    assert_eq!(msg.shared_refs(), Some(n + 1));
    drop(tx);
    // The queued ones are back; those in the socket are the reader's to take (or not).
    let in_socket = msg.shared_refs().unwrap() - 1;
    assert!(in_socket > 0 && in_socket < n, "{in_socket}");
    let mut rx = Chan::new(b, Backing::Heap);
    for _ in 0..in_socket {
        drop(rx.recv_blocking(T).unwrap().unwrap());
    }
    assert!(matches!(
        rx.recv_blocking(T),
        Err(Error::Transport(flowipc::transport::Error::PeerGone))
    ));
    assert_eq!(msg.shared_refs(), Some(1));
    drop(msg);
    assert_eq!(arena.stats().blocks_in_use, 0);
}

#[test]
fn a_pool_learned_late_is_still_announced_before_use() {
    // Three processes' views of one arena (one process here): a3 and a2 grow it in turn, so a1
    // learns pool 2 before pool 1.
    let cfg = || ArenaConfig::new().pool_size(1 << 20).max_pools(8);
    let a1 = Arena::create(cfg()).unwrap();
    let fd = || a1.pool_fd(0).unwrap().try_clone_to_owned().unwrap();
    let a2 = Arena::join([fd()], cfg()).unwrap();
    let a3 = Arena::join([fd()], cfg()).unwrap();
    let fill = |a: &Arena, until: u32, keep: &mut Vec<_>| loop {
        let b = a.alloc(64 << 10).unwrap();
        let p = b.block_ref().pool;
        keep.push(b.into_raw());
        if p == until {
            break;
        }
    };
    let mut keep = Vec::new();
    fill(&a3, 1, &mut keep);
    fill(&a2, 2, &mut keep);
    let pair = |x: &Arena, y: &Arena| {
        let (s, r) = Channel::pair(channel_config()).unwrap();
        (
            Chan::new(s, Backing::Shm(x.clone())).with_inline_max(0),
            Chan::new(r, Backing::Shm(y.clone())).with_inline_max(0),
        )
    };
    let (mut p2_to_p1, mut p1_from_p2) = pair(&a2, &a1);
    let (mut p1_to_p2, mut p2_from_p1) = pair(&a1, &a2);
    let (mut p3_to_p1, mut p1_from_p3) = pair(&a3, &a1);
    let send = |tx: &mut Chan, rx: &mut Chan, arena: &Arena, n: i64| {
        let mut m = MsgOut::new_in(arena);
        hello(&mut m, n);
        tx.send(&mut m, None).unwrap();
        let got = rx.recv_blocking(T).unwrap().unwrap();
        assert!(
            matches!(got.which(), Ok(cool_msg::HelloThere(Ok(h))) if h.get_num() == n)
        );
    };
    send(&mut p2_to_p1, &mut p1_from_p2, &a2, 1); // a1 learns pool 2
    send(&mut p1_to_p2, &mut p2_from_p1, &a1, 2); // a1 announces 0 and 2
    send(&mut p3_to_p1, &mut p1_from_p3, &a3, 3); // a1 learns pool 1
    let mut keep1 = Vec::new();
    fill(&a1, 1, &mut keep1); // a1 allocates in pool 1 now
    send(&mut p1_to_p2, &mut p2_from_p1, &a1, 4); // pool 1 must be announced first
}

#[test]
fn set_root_copies_a_received_message_to_forward_it() {
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let (mut tx, mut rx) = pair(&arena);
    let mut msg = tx.create_msg();
    build_blob(&mut msg, 2, 50_000, 3);
    tx.send(&mut msg, None).unwrap();
    let got = rx.recv_blocking(T).unwrap().unwrap();
    let mut fwd = MsgOut::<cool_msg::Owned>::new_heap();
    fwd.set_root(got.root().unwrap()).unwrap();
    assert_eq!(check_blob(fwd.root().unwrap()), (2, 100_000, 3));
}

#[test]
fn channels_of_a_session_carry_its_token_and_refuse_others() {
    let arena = Arena::create(ArenaConfig::new().pool_size(4 << 20)).unwrap();
    const TOKEN: u128 = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;
    // Same token both ways: messages (and pool announcements) flow, in place and copied.
    for backing in [Backing::Shm(arena.clone()), Backing::Heap] {
        let (a, b) = Channel::pair(channel_config()).unwrap();
        let mut tx = Chan::new(a, backing).with_session_token(TOKEN);
        let mut rx = Chan::new(b, Backing::Heap).with_session_token(TOKEN);
        assert_eq!(rx.session_token(), Some(TOKEN));
        for n in 0..3 {
            let mut msg = tx.create_msg();
            hello(&mut msg, n);
            tx.send(&mut msg, None).unwrap();
            let got = rx.recv_blocking(T).unwrap().unwrap();
            match got.which().unwrap() {
                cool_msg::HelloThere(Ok(h)) => assert_eq!(h.get_num(), n),
                _ => panic!("not helloThere"),
            }
        }
    }
    // Another token, a token where none is expected, none where one is: WrongSession, once.
    let cases = [
        (Some(TOKEN), Some(TOKEN + 1)),
        (Some(TOKEN), None),
        (None, Some(TOKEN)),
    ];
    for (sent, expected) in cases {
        let (a, b) = Channel::pair(channel_config()).unwrap();
        let mut tx = Chan::new(a, Backing::Heap);
        if let Some(t) = sent {
            tx = tx.with_session_token(t);
        }
        let mut rx = Chan::new(b, Backing::Heap);
        if let Some(t) = expected {
            rx = rx.with_session_token(t);
        }
        let mut msg = tx.create_msg();
        hello(&mut msg, 1);
        tx.send(&mut msg, None).unwrap();
        tx.send(&mut msg, None).unwrap();
        let first = rx.recv_blocking(T).unwrap_err();
        assert!(
            matches!(first, Error::WrongSession),
            "{sent:?}->{expected:?}: {first:?}"
        );
        assert_once(&first, &rx.try_recv().unwrap_err());
    }
    // A token flag without the token's bytes.
    let (mut a, b) = Channel::pair(channel_config()).unwrap();
    let mut rx = Chan::new(b, Backing::Heap).with_session_token(TOKEN);
    let mut frame = [0u8; 30];
    frame[0] = 3;
    frame[1] = 1;
    frame[8] = 1;
    a.send(&frame).unwrap();
    let first = rx.recv_blocking(T).unwrap_err();
    assert!(
        matches!(
            first,
            Error::BadMessage("frame shorter than its session token")
        ),
        "{first:?}"
    );
    assert_eq!(arena.stats().blocks_in_use, 0);
}

/// A message built in small segments: `chunks` chunks of `len` bytes over segments starting at
/// one word (so it has several).
fn many_segments(arena: Option<Arena>, chunks: u32, len: u32) -> MsgOut<cool_msg::Owned> {
    let sizes = flowipc::msg::SegmentSizes {
        first_words: 1,
        ..Default::default()
    };
    let mut msg = MsgOut::<cool_msg::Owned>::with_sizes(arena, sizes);
    let mut list = msg.init_root().init_blob().init_chunks(chunks);
    for i in 0..chunks {
        list.reborrow().get(i).init_data(len).fill(i as u8);
    }
    msg
}

#[test]
fn heap_messages_of_one_to_many_segments_cross_intact() {
    let (a, b) = Channel::pair(channel_config()).unwrap();
    let mut tx = Chan::new(a, Backing::Heap);
    let mut rx = Chan::new(b, Backing::Heap);
    let mut seen = std::collections::BTreeSet::new();
    // A ping in one segment, and in two (a one-word first segment holds only the root pointer).
    for first_words in [1024, 1] {
        let sizes = flowipc::msg::SegmentSizes {
            first_words,
            ..Default::default()
        };
        let mut ping = MsgOut::<cool_msg::Owned>::with_sizes(None, sizes);
        ping.init_root().set_ping(());
        let segs = ping.segment_count();
        seen.insert(segs);
        tx.send(&mut ping, None).unwrap();
        let got = rx.recv_blocking(T).unwrap().unwrap();
        assert_eq!(got.segment_count(), segs);
        assert!(matches!(
            got.which().unwrap(),
            cool_msg::Ping(())
        ));
    }
    for (chunks, len) in [
        (1u32, 8u32),
        (1, 64),
        (2, 64),
        (3, 8),
        (3, 64),
        (4, 200),
        (8, 200),
        (12, 200),
    ] {
        let mut msg = many_segments(None, chunks, len);
        let segs = msg.segment_count();
        seen.insert(segs);
        tx.send(&mut msg, None).unwrap();
        let got = rx.recv_blocking(T).unwrap().unwrap();
        assert_eq!(got.segment_count(), segs);
        let cool_msg::Blob(Ok(b)) = got.which().unwrap() else {
            panic!("not a blob");
        };
        let list = b.get_chunks().unwrap();
        assert_eq!(list.len(), chunks);
        for (i, c) in list.iter().enumerate() {
            assert_eq!(c.get_data().unwrap(), &vec![i as u8; len as usize][..]);
        }
    }
    // Every small-message segment count (the inline path takes up to six) was crossed.
    assert!((1..=7).all(|n| seen.contains(&n)), "{seen:?}");
}

#[test]
fn a_many_segment_message_that_never_left_is_freed_whole() {
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let (a, b) = Channel::pair(channel_config()).unwrap();
    let mut tx = Chan::new(a, Backing::Shm(arena.clone())).with_inline_max(0);
    // The peer does not read: the socket fills and later frames wait in the send queue.
    let mut msg = many_segments(Some(arena.clone()), 6, 64);
    assert!(msg.segment_count() > 1);
    for _ in 0..20_000 {
        tx.send(&mut msg, None).unwrap();
    }
    assert!(tx.queued_bytes() > 0, "the socket never filled");
    // The sender lets go of the message, and the receiver takes in (and drops) what reached the
    // socket: the last references are those of the frames still in the send queue...
    drop(msg);
    let mut rx = Chan::new(b, Backing::Heap);
    while let Ok(Some(m)) = rx.try_recv() {
        drop(m);
    }
    assert!(arena.stats().blocks_in_use > 0);
    // ...which the channel gives back when it goes: the message is freed whole.
    drop(tx);
    assert_eq!(arena.stats().blocks_in_use, 0, "segments leaked");
    drop(rx);
}

/// Small arena-backed messages go inline (copied into the frame: no freeze, no arena block held
/// while they wait, not zero-copy there); larger ones in place; a limit of 0 sends every one in
/// place, and a message the arena could not hold still goes inline if it is small.
#[test]
fn small_arena_messages_go_inline_larger_ones_in_place() {
    let arena = Arena::create(ArenaConfig::new().pool_size(16 << 20)).unwrap();
    let (a, b) = Channel::pair(channel_config()).unwrap();
    let mut tx = Chan::new(a, Backing::Shm(arena.clone()));
    let mut rx = Chan::new(b, Backing::Heap);
    assert_eq!(tx.inline_max(), flowipc::msg::DEFAULT_INLINE_MAX);
    // Small: a POSIX queue holds 8 messages, so no more wait unread.
    for i in 0..6 {
        let mut m = tx.create_msg();
        hello(&mut m, i);
        tx.send(&mut m, None).unwrap();
        assert!(!m.is_shared() && m.shared_refs().is_none(), "not frozen");
    }
    assert_eq!(arena.stats().blocks_in_use, 0, "nothing held while they wait");
    for i in 0..6 {
        let got = rx.recv_blocking(T).unwrap().unwrap();
        assert!(!got.is_zero_copy());
        assert!(matches!(got.root().unwrap().which(), Ok(cool_msg::HelloThere(Ok(h))) if h.get_num() == i));
    }
    // Past the limit: in place.
    let mut big = tx.create_msg();
    build_blob(&mut big, 1, flowipc::msg::DEFAULT_INLINE_MAX, 3);
    tx.send(&mut big, None).unwrap();
    let got = rx.recv_blocking(T).unwrap().unwrap();
    assert!(got.is_zero_copy());
    assert_eq!(check_blob(got.root().unwrap()), (1, flowipc::msg::DEFAULT_INLINE_MAX, 3));
    assert_eq!(big.shared_refs(), Some(2));
    drop((got, big));
    // A limit of 0: every message in place.
    let mut tx = tx.with_inline_max(0);
    let mut m = tx.create_msg();
    hello(&mut m, 7);
    tx.send(&mut m, None).unwrap();
    let got = rx.recv_blocking(T).unwrap().unwrap();
    assert!(got.is_zero_copy());
    drop((got, m));
    assert_eq!(arena.stats().blocks_in_use, 0);
    // A small message built while its arena was full still goes, inline.
    let full = Arena::create(ArenaConfig::new().pool_size(1 << 20).max_pools(1)).unwrap();
    let mut hog = Vec::new();
    while let Ok(b) = full.alloc(4096) {
        hog.push(b);
    }
    let mut m = MsgOut::<cool_msg::Owned>::new_in(&full);
    hello(&mut m, 8);
    assert!(m.alloc_failure().is_some());
    let mut tx = tx.with_inline_max(flowipc::msg::DEFAULT_INLINE_MAX);
    tx.send(&mut m, None).unwrap();
    let got = rx.recv_blocking(T).unwrap().unwrap();
    assert!(matches!(got.root().unwrap().which(), Ok(cool_msg::HelloThere(Ok(h))) if h.get_num() == 8));
    drop((got, m, hog));
}
