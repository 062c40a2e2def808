//! Unit tests of the ring and queue kinds (`ShmQueue`, `PosixMq`): their hellos, bad ring
//! positions, waits that must sleep rather than spin, and what review found. The suites under
//! `tests/suites/` run everything else over every kind.

use super::tests::{drain, pattern, read_tag, tagged_fd};
use super::wire::{Header, FLAG_HELLO, HEADER_LEN};
use super::*;
use crate::sys::PollFd;

fn encode_header(flags: u32, len: u64) -> [u8; HEADER_LEN] {
    Header::new(flags, len).encode()
}

fn ring_pair(cap: u64) -> (Channel, Channel) {
    Channel::pair(
        ChannelConfig::new()
            .with_kind(ChannelKind::ShmQueue)
            .with_ring_capacity(cap),
    )
    .unwrap()
}

#[test]
fn ring_carries_small_big_and_fd_frames_in_order_then_end() {
    let (mut a, mut b) = ring_pair(4096);
    let big = pattern(3, 100_000); // larger than the ring: it flows through in pieces
    let sent = big.clone();
    let sender = std::thread::spawn(move || {
        a.send(b"hello").unwrap();
        a.send(&sent).unwrap();
        a.send(OutFrame::new(b"with fd").fd(tagged_fd(9).as_fd()))
            .unwrap();
        for i in 0..200 {
            a.send(&pattern(i, i * 13)).unwrap();
        }
        a.end_sending().unwrap();
        // The queue drains as the reader makes room.
        assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
        assert!(a.is_send_done());
        a
    });
    let mut got = drain(&mut b, 203);
    assert_eq!(&*got[0].payload, b"hello");
    assert_eq!(&*got[1].payload, &big[..]);
    assert_eq!(&*got[2].payload, b"with fd");
    assert_eq!(read_tag(got[2].fd.take().unwrap()), 9);
    for (i, f) in got[3..].iter().enumerate() {
        assert_eq!(&*f.payload, &pattern(i, i * 13)[..]);
    }
    assert!(b
        .recv_blocking(Some(Duration::from_secs(5)))
        .unwrap()
        .is_none());
    assert!(b.is_peer_ended() && !b.is_hosed());
    drop(sender.join().unwrap());
}

#[test]
fn ring_kind_mismatch_is_reported() {
    let (s1, s2) = UnixStream::pair().unwrap();
    let mut a =
        Channel::from_stream(s1, ChannelConfig::new().with_kind(ChannelKind::ShmQueue)).unwrap();
    let mut b = Channel::from_stream(s2, ChannelConfig::new()).unwrap();
    a.send(b"x").unwrap();
    b.send(b"y").unwrap();
    assert!(matches!(
        b.recv_blocking(Some(Duration::from_secs(5))),
        Err(Error::KindMismatch {
            ours: ChannelKind::SocketStream,
            theirs: ChannelKind::ShmQueue
        })
    ));
    assert!(matches!(
        a.recv_blocking(Some(Duration::from_secs(5))),
        Err(Error::KindMismatch {
            ours: ChannelKind::ShmQueue,
            theirs: ChannelKind::SocketStream
        })
    ));
}

/// A ring channel fed a hand-made hello (flags, fds) on a socket the test keeps; the channel's
/// first receive's error.
fn ring_hello_case(flags: u32, fds: &[BorrowedFd<'_>]) -> Error {
    let (raw, theirs) = UnixStream::pair().unwrap();
    let cfg = ChannelConfig::new().with_kind(ChannelKind::ShmQueue);
    let mut c = Channel::from_stream(theirs, cfg).unwrap();
    sys::send_with_fds(&raw, &encode_header(flags, 0), fds).unwrap();
    let e = c.try_recv().expect_err("a bad hello");
    assert!(matches!(c.try_recv(), Err(Error::Hosed)));
    assert!(matches!(c.send(b"x"), Err(Error::Hosed)));
    e
}

#[test]
fn bad_ring_hellos_get_their_specific_error() {
    use super::wire::FLAG_RING;
    let hello = FLAG_HELLO | FLAG_RING;
    assert!(matches!(ring_hello_case(hello, &[]), Error::MissingFd));
    // A socket peer's hello (no ring) to a ring channel, and the other way round.
    assert!(matches!(
        ring_hello_case(FLAG_HELLO, &[]),
        Error::KindMismatch {
            ours: ChannelKind::ShmQueue,
            theirs: ChannelKind::SocketStream
        }
    ));
    // Not a ring: a pipe, an unsealed memfd, a sealed one of the wrong size or magic.
    let (r, _w) = nix::unistd::pipe().unwrap();
    assert!(matches!(
        ring_hello_case(hello, &[r.as_fd()]),
        Error::BadQueue("the file's size is not sealed")
    ));
    let unsealed = sys::memfd_sealable("t").unwrap();
    unsealed.set_len(4096 + 4096).unwrap();
    assert!(matches!(
        ring_hello_case(hello, &[unsealed.as_fd()]),
        Error::BadQueue("the file's size is not sealed")
    ));
    let odd = sys::memfd_sealable("t").unwrap();
    odd.set_len(4096 + 5000).unwrap();
    sys::seal_size(&odd).unwrap();
    assert!(matches!(
        ring_hello_case(hello, &[odd.as_fd()]),
        Error::BadQueue("the file's size is not a ring's")
    ));
    let blank = sys::memfd_sealable("t").unwrap();
    blank.set_len(4096 + 8192).unwrap();
    sys::seal_size(&blank).unwrap();
    assert!(matches!(
        ring_hello_case(hello, &[blank.as_fd()]),
        Error::BadQueue("bad magic")
    ));
    // Two fds where a ring alone is announced.
    let ring = crate::shm::ring_map::RingMap::create(4096).unwrap();
    assert!(matches!(
        ring_hello_case(hello, &[ring.fd(), r.as_fd()]),
        Error::TooManyFds
    ));
    // A ring that was already read from.
    ring.control()
        .head
        .store(8, std::sync::atomic::Ordering::Relaxed);
    assert!(matches!(
        ring_hello_case(hello, &[ring.fd()]),
        Error::BadQueue("a new ring that was read from")
    ));
    // A socket channel that meets a ring's hello.
    let (raw, theirs) = UnixStream::pair().unwrap();
    let mut c = Channel::from_stream(theirs, ChannelConfig::new()).unwrap();
    let ring = crate::shm::ring_map::RingMap::create(4096).unwrap();
    sys::send_with_fds(&raw, &encode_header(hello, 0), &[ring.fd()]).unwrap();
    assert!(matches!(
        c.try_recv(),
        Err(Error::KindMismatch {
            ours: ChannelKind::SocketStream,
            theirs: ChannelKind::ShmQueue
        })
    ));
}

#[test]
fn ring_positions_out_of_range_are_bad_ring_once() {
    use super::wire::FLAG_RING;
    use crate::shm::ring::RingBytes;
    use crate::shm::ring_map::RingMap;
    use std::sync::atomic::Ordering::Relaxed;
    let cfg = ChannelConfig::new().with_kind(ChannelKind::ShmQueue);
    // The peer's tail more than a ring ahead of what we read; then behind it.
    for tail in [4096 + 1, u64::MAX] {
        let (raw, theirs) = UnixStream::pair().unwrap();
        let mut c = Channel::from_stream(theirs, cfg.clone()).unwrap();
        let ring = RingMap::create(4096).unwrap();
        assert_eq!(ring.cap(), 4096);
        ring.control().tail.store(tail, Relaxed);
        sys::send_with_fds(
            &raw,
            &encode_header(FLAG_HELLO | FLAG_RING, 0),
            &[ring.fd()],
        )
        .unwrap();
        assert!(matches!(
            c.try_recv(),
            Err(Error::BadQueue("a position outside the ring"))
        ));
        assert!(matches!(c.try_recv(), Err(Error::Hosed)));
        drop(raw);
    }
    // The consumer's head (of our ring) scribbled: our next send finds it out of range.
    let (mut a, mut b) = ring_pair(4096);
    a.send(b"one").unwrap();
    assert_eq!(
        &*b.recv_blocking(Some(Duration::from_secs(5)))
            .unwrap()
            .unwrap()
            .payload,
        b"one"
    );
    a.link
        .as_ref()
        .unwrap()
        .ring()
        .out_control_for_tests()
        .head
        .store(1 << 40, Relaxed);
    assert!(matches!(
        a.send(b"two"),
        Err(Error::BadQueue("a position outside the ring"))
    ));
    assert!(matches!(a.send(b"three"), Err(Error::Hosed)));
}

#[test]
fn a_flush_waiting_for_room_for_a_whole_frame_sees_the_reader_go() {
    // Two 1.5 KB frames fill most of a 4 KiB ring; the third waits (a small frame goes in
    // whole): room for 1 KB is not room for it. The reader goes without reading.
    let (mut a, mut b) = ring_pair(4096);
    for i in 0..3 {
        a.send(&pattern(i, 1500)).unwrap();
    }
    assert_eq!(a.queued_bytes(), 1516);
    // (Receiving until there is nothing reads the socket dry: no news is due from it now.)
    b.send(b"x").unwrap();
    assert_eq!(&*a.try_recv().unwrap().unwrap().payload, b"x");
    assert!(a.try_recv().unwrap().is_none());
    drop(b);
    // Not a busy loop on the 1 KB of room until the time limit: the wait for room is a wait
    // for 1516 bytes, which looks at the socket between sleeps and finds the reader gone.
    assert!(matches!(
        a.flush_blocking(Some(Duration::from_secs(20))),
        Err(Error::Reset)
    ));
    assert!(matches!(a.flush(), Err(Error::Hosed)));
}

/// CPU time this thread has used.
fn thread_cpu() -> Duration {
    use nix::sys::resource::{getrusage, UsageWho};
    let u = getrusage(UsageWho::RUSAGE_THREAD).unwrap();
    let tv =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    tv(u.user_time()) + tv(u.system_time())
}

/// Runs `f` and asserts that it slept rather than spun: under a quarter of its wall time on
/// this thread's CPU. (Load from elsewhere can only lower the share: no false failure.)
fn sleeps_rather_than_spins(what: &str, f: impl FnOnce()) {
    let (cpu0, t0) = (thread_cpu(), Instant::now());
    f();
    let (cpu, wall) = (thread_cpu() - cpu0, t0.elapsed());
    assert!(
        cpu < wall / 4,
        "{what}: a busy loop, {cpu:?} of CPU in {wall:?}"
    );
}

#[test]
fn a_ring_receiver_waiting_for_the_peers_hello_sleeps() {
    // (Found in review: the socket's news flag, set until the first read of the ring, made
    // every wait return at once until the peer's hello came.)
    let (_a, mut b) = ring_pair(4096);
    sleeps_rather_than_spins("recv_blocking before the hello", || {
        assert!(b
            .recv_blocking(Some(Duration::from_millis(300)))
            .unwrap()
            .is_none());
    });
}

#[test]
fn a_ring_flush_waiting_for_the_side_socket_sleeps() {
    // (Found in review: the wait polled the socket for reading while only sending, and the
    // peer's unread hello made every poll return at once.)
    let (mut a, mut b) = ring_pair(1 << 20);
    b.send(b"b's hello goes first").unwrap();
    let f = tagged_fd(1);
    while !a.wants_write() {
        a.send(OutFrame::new(b"f").fd(f.as_fd())).unwrap();
    }
    assert!(a.side_full);
    sleeps_rather_than_spins("flush_blocking for the side socket", || {
        assert!(!a.flush_blocking(Some(Duration::from_millis(300))).unwrap());
    });
    drop(b);
}

#[test]
fn a_queue_peer_clearing_o_nonblock_cannot_make_us_wait() {
    // (Found in review: O_NONBLOCK belongs to the open queue, which the peer shares.)
    let cfg = ChannelConfig::new().with_kind(ChannelKind::PosixMq);
    let (mut a, mut b) = Channel::pair(cfg).unwrap();
    a.send(b"one").unwrap();
    let got = b
        .recv_blocking(Some(Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    assert_eq!(&*got.payload, b"one");
    // The queue b reads is a's: a (the peer, for b) makes it blocking.
    a.link
        .as_ref()
        .unwrap()
        .mq()
        .out_queue()
        .clear_nonblock()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        tx.send(b.try_recv().map(|f| f.is_none()).unwrap()).unwrap();
        b
    });
    assert!(rx
        .recv_timeout(Duration::from_secs(10))
        .expect("try_recv waited"));
    // Sends never wait either: fill a's queue (8 messages) and more.
    for i in 0..20 {
        a.send(&pattern(i, 100)).unwrap();
    }
    assert!(a.queued_bytes() > 0);
    drop(reader.join().unwrap());
}

#[test]
fn a_send_only_poll_loop_on_a_ring_drains_the_socket() {
    // (Found in review: a loop that only sends never read the peer's hello or its wake-up
    // bytes, so the socket stayed readable and every poll returned at once.)
    use crate::poll::Pollable;
    let (mut a, mut b) = ring_pair(4096);
    b.send(b"hello from b").unwrap(); // b's hello is on a's socket; a never receives
    a.send(b"x").unwrap();
    a.on_ready().unwrap();
    let i = a.interest();
    let mut fds: Vec<PollFd<'_>> = i.fds().map(|(fd, r, w)| PollFd::new(fd, r, w)).collect();
    // Nothing is ready: no wake-up owed, the hello read.
    assert_eq!(sys::poll(&mut fds, Some(Duration::ZERO)).unwrap(), 0);
    drop(b);
}
