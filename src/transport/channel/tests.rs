//! The channel's unit tests: queueing, fd attribution, partial writes, timers, raw bad input.

use super::wire::{Header, FLAG_END, FLAG_HAS_FD, FLAG_HELLO, FLAG_PING, HEADER_LEN};
use super::*;
use crate::transport::SharedBytes;
use std::io::{IoSlice, Read, Write};
use std::sync::Arc;

fn encode_header(flags: u32, len: u64) -> [u8; HEADER_LEN] {
    Header::new(flags, len).encode()
}

fn pair() -> (Channel, Channel) {
    Channel::pair(ChannelConfig::new()).unwrap()
}

pub(super) fn pattern(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (i * 7 + k / 3) as u8).collect()
}

/// A pipe whose read end carries a recognisable byte.
pub(super) fn tagged_fd(tag: u8) -> OwnedFd {
    let (r, w) = nix::unistd::pipe().unwrap();
    std::fs::File::from(w).write_all(&[tag]).unwrap();
    r
}

pub(super) fn read_tag(fd: OwnedFd) -> u8 {
    let mut b = [0u8; 1];
    std::fs::File::from(fd).read_exact(&mut b).unwrap();
    b[0]
}

pub(super) fn drain(c: &mut Channel, n: usize) -> Vec<Frame> {
    let mut out = Vec::new();
    while out.len() < n {
        match c.recv_blocking(Some(Duration::from_secs(20))).unwrap() {
            Some(f) => out.push(f),
            None => panic!("timed out after {} of {n} frames", out.len()),
        }
    }
    out
}

#[test]
fn header_round_trip() {
    let h = encode_header(FLAG_HAS_FD, 0x0102_0304_0506);
    assert_eq!(&h[..4], b"FIPC");
    assert_eq!(
        Header::decode(&h).unwrap(),
        Some(Header::new(FLAG_HAS_FD, 0x0102_0304_0506))
    );
    // As far as it is there: a prefix of the magic is not yet an error, anything else is.
    assert_eq!(Header::decode(&h[..9]).unwrap(), None);
    assert!(matches!(
        Header::decode(b"FIPX"),
        Err(Error::BadFrame("bad magic"))
    ));
    assert!(matches!(
        Header::decode(&encode_header(1 << 9, 0)),
        Err(Error::BadFrame("unknown flag bits"))
    ));
}

#[test]
fn queued_frames_keep_order_and_fd_attribution() {
    let (mut a, mut b) = pair();
    // Fill the socket so everything below is queued (and coalesced where allowed).
    let filler = vec![0xAAu8; 1 << 20];
    while a.tx.chunks.is_empty() {
        a.send(&filler).unwrap();
    }
    let mut expect = Vec::new();
    for i in 0..300usize {
        let len = (i * 37) % 3000;
        let p = pattern(i, len);
        if i % 7 == 3 {
            let fd = tagged_fd(i as u8);
            a.send(OutFrame::new(&p).fd(fd.as_fd())).unwrap();
            drop(fd); // the queue holds its own duplicate
            expect.push((p, Some(i as u8)));
        } else if i % 11 == 5 {
            let sh = SharedBytes::from(p.clone());
            let fd = (i % 2 == 0).then(|| tagged_fd(i as u8));
            let tag = fd.as_ref().map(|_| i as u8);
            a.send(
                OutFrame::shared(vec![
                    sh.clone(),
                    SharedBytes::new(Arc::new(Vec::<u8>::new()), 0..0).unwrap(),
                ])
                .owned_fd(fd),
            )
            .unwrap();
            expect.push((p, tag));
        } else {
            let (x, y) = p.split_at(len / 2);
            a.send(OutFrame::parts(&[x, &[], y])).unwrap();
            expect.push((p, None));
        }
    }
    assert!(a.wants_write());
    // Receive the fillers, then the frames in order; `b` flushes nothing, `a` is flushed
    // by a helper thread.
    let t = std::thread::spawn(move || {
        assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
        a
    });
    let mut got = Vec::new();
    while got.len() < expect.len() {
        let f = drain(&mut b, 1).pop().unwrap();
        if f.payload.len() == filler.len() && f.payload[0] == 0xAA {
            assert!(got.is_empty(), "filler after data");
            continue;
        }
        got.push(f);
    }
    let a = t.join().unwrap();
    assert_eq!(a.queued_bytes(), 0);
    for (i, (f, (p, tag))) in got.into_iter().zip(expect).enumerate() {
        assert_eq!(&*f.payload, &p[..], "frame {i}");
        assert_eq!(f.fd.map(read_tag), tag, "fd of frame {i}");
    }
}

#[test]
fn a_full_side_socket_holds_the_queue_and_is_what_to_poll() {
    let (mut a, mut b) = pair();
    // A side socket that holds only a few fds (the smallest send buffer the kernel allows).
    let side = a.side.as_ref().unwrap();
    nix::sys::socket::setsockopt(side, nix::sys::socket::sockopt::SndBuf, &1).unwrap();
    let side = side.as_raw_fd();
    let n = 200usize;
    for i in 0..n {
        let fd = tagged_fd(i as u8);
        a.send(OutFrame::new(&pattern(i, i % 50)).fd(fd.as_fd()))
            .unwrap();
        // Frames without fds queue behind (and coalesce with) those that wait.
        a.send(&pattern(i, 3)).unwrap();
    }
    // The data socket has room; the side socket has not: that is what to wait for.
    assert!(a.wants_write());
    assert!(a.side_full);
    assert_eq!(a.write_fd().as_raw_fd(), side);
    assert!(!a.flush().unwrap());
    let t = std::thread::spawn(move || {
        assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
        assert_eq!(a.write_fd().as_raw_fd(), a.as_raw_fd());
        a
    });
    let got = drain(&mut b, 2 * n);
    let _a = t.join().unwrap();
    for (k, f) in got.into_iter().enumerate() {
        let i = k / 2;
        if k % 2 == 0 {
            assert!(*f.payload == pattern(i, i % 50)[..], "frame {k}");
            assert_eq!(f.fd.map(read_tag), Some(i as u8), "fd of frame {k}");
        } else {
            assert!(
                *f.payload == pattern(i, 3)[..] && f.fd.is_none(),
                "frame {k}"
            );
        }
    }
}

#[test]
fn big_frames_with_fd_and_aligned() {
    let (mut a, mut b) = pair();
    let big = pattern(1, (3 << 20) + 5);
    let small = pattern(2, 100);
    let t = std::thread::spawn(move || {
        for i in 0..4u8 {
            let fd = tagged_fd(i);
            if i % 2 == 0 {
                a.send(OutFrame::new(&big).fd(fd.as_fd())).unwrap();
            } else {
                a.send(OutFrame::new(&small).fd(fd.as_fd())).unwrap();
            }
        }
        a.send(&[]).unwrap();
        assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
        a
    });
    let frames = drain(&mut b, 5);
    let _a = t.join().unwrap();
    for (i, f) in frames.into_iter().enumerate() {
        assert_eq!(f.payload.as_ptr() as usize % 8, 0);
        if i == 4 {
            assert!(f.payload.is_empty() && f.fd.is_none());
            continue;
        }
        let want = if i % 2 == 0 { (3 << 20) + 5 } else { 100 };
        assert_eq!(f.payload.len(), want);
        assert_eq!(
            &f.payload[..50],
            &pattern(if i % 2 == 0 { 1 } else { 2 }, 50)[..]
        );
        assert_eq!(read_tag(f.fd.unwrap()), i as u8);
    }
}

#[test]
fn partial_writes_queue_the_rest() {
    let (mut a, mut b) = pair();
    let big: Vec<u8> = pattern(9, 2 << 20);
    let owner: crate::transport::SharedOwner = Arc::new(big.clone());
    let parts = vec![
        SharedBytes::new(owner.clone(), 0..1000).unwrap(),
        SharedBytes::new(owner.clone(), 1000..(1 << 20)).unwrap(),
        SharedBytes::new(owner.clone(), (1 << 20)..(2 << 20)).unwrap(),
    ];
    let fd = tagged_fd(42);
    a.send(OutFrame::shared(parts).owned_fd(fd)).unwrap();
    // The socket took part of it; the queue holds the rest by reference, not by copy.
    assert!(a.wants_write());
    assert!(a.queued_bytes() < (2 << 20) + HEADER_LEN);
    assert!(Arc::strong_count(&owner) > 1);
    let (x, y) = big.split_at(12345);
    a.send(OutFrame::parts(&[x, y])).unwrap();
    let t = std::thread::spawn(move || {
        assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
        a
    });
    let got = drain(&mut b, 2);
    let a = t.join().unwrap();
    assert_eq!(a.queued_bytes(), 0);
    assert_eq!(Arc::strong_count(&owner), 1);
    for (i, f) in got.into_iter().enumerate() {
        assert!(*f.payload == big[..], "frame {i}");
        assert_eq!(f.fd.map(read_tag), (i == 0).then_some(42));
    }

    // A direct write that the socket takes only partly, with a borrowed payload and fd.
    let (mut a, mut b) = pair();
    let fd = tagged_fd(7);
    a.send(OutFrame::new(&big).fd(fd.as_fd())).unwrap();
    drop(fd);
    assert!(a.wants_write());
    let t = std::thread::spawn(move || {
        assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
    });
    let f = drain(&mut b, 1).pop().unwrap();
    t.join().unwrap();
    assert!(*f.payload == big[..]);
    assert_eq!(f.fd.map(read_tag), Some(7));
}

#[test]
fn high_water_with_an_empty_queue_and_a_full_socket() {
    let limit = 64 << 10;
    let (mut a, mut b) = Channel::pair(ChannelConfig::new().with_high_water(Some(limit))).unwrap();
    // A first frame takes the hello out.
    a.send(b"first").unwrap();
    // Fill the socket behind the channel's back (the peer never parses these bytes).
    let junk = vec![0u8; 4096];
    loop {
        match sys::try_send_vectored(a.as_fd(), &[IoSlice::new(&junk)], None) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(!a.wants_write());
    // Larger than the mark and nothing taken: refused, nothing queued.
    let e = a.send(&vec![1u8; limit + 1]).unwrap_err();
    assert!(matches!(e, Error::HighWater { queued: 0, .. }), "{e:?}");
    assert!(!a.wants_write() && !a.is_hosed());
    // Small ones queue up to the mark.
    a.send(&[2u8; 1000]).unwrap();
    assert_eq!(a.queued_bytes(), 1000 + HEADER_LEN);
    // Pings are never refused and do not count.
    a.cfg.auto_ping = Some(Duration::from_millis(1));
    a.on_timer(Instant::now() + Duration::from_secs(1)).unwrap();
    assert_eq!(a.queued_bytes(), 1000 + 2 * HEADER_LEN);
    assert_eq!(a.tx.counted, 1000 + HEADER_LEN);
    drop(b.try_recv()); // (garbage for `b`: whatever it says, `a` is unaffected)
}

#[test]
fn sizes_around_the_buffer_boundary() {
    let (mut a, mut b) = pair();
    let sizes = [
        65536usize, 65537, 0, 65552, 1, 200_000, 3, 65535, 300_000, 300_001, 16,
    ];
    let t = std::thread::spawn(move || {
        for (i, &n) in sizes.iter().enumerate() {
            let fd = (i % 3 == 1).then(|| tagged_fd(i as u8));
            a.send(OutFrame::new(&pattern(i, n)).fd(fd.as_ref().map(|f| f.as_fd())))
                .unwrap();
            if i % 4 == 0 {
                assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
            }
        }
        assert!(a.flush_blocking(Some(Duration::from_secs(20))).unwrap());
        a
    });
    let got = drain(&mut b, sizes.len());
    let _a = t.join().unwrap();
    for (i, f) in got.into_iter().enumerate() {
        assert!(*f.payload == pattern(i, sizes[i])[..], "frame {i}");
        assert_eq!(
            f.fd.map(read_tag),
            (i % 3 == 1).then_some(i as u8),
            "fd {i}"
        );
    }
}

#[test]
fn refusals_do_not_hose() {
    let (mut a, mut b) = Channel::pair(ChannelConfig::new().with_max_frame(10)).unwrap();
    assert!(matches!(
        a.send(&[0; 11]),
        Err(Error::FrameTooLarge {
            len: 11,
            max: 10,
            received: false
        })
    ));
    a.send(&[1; 10]).unwrap();
    a.end_sending().unwrap();
    assert!(a.is_send_done());
    assert!(matches!(a.send(&[1]), Err(Error::SendingEnded)));
    assert!(matches!(a.end_sending(), Err(Error::SendingEnded)));
    assert!(!a.is_hosed());
    assert_eq!(&*drain(&mut b, 1)[0].payload, &[1; 10]);
    // The peer's end: no error, nothing more to receive, not hosed; sending goes on.
    assert!(b.try_recv().unwrap().is_none());
    assert!(b.is_peer_ended() && !b.is_hosed());
    assert!(
        b.recv_blocking(None).unwrap().is_none(),
        "no wait after the end"
    );
    assert!(
        b.interest().read_fd().is_none(),
        "nothing to watch for reading"
    );
    b.send(&[2]).unwrap();
    assert_eq!(&*a.recv_blocking(None).unwrap().unwrap().payload, &[2]);
    drop(b);
    assert!(matches!(a.recv_blocking(None), Err(Error::PeerGone)));
}

#[test]
fn pings_are_silent_and_timers_work() {
    let cfg = ChannelConfig::new().with_auto_ping(Some(Duration::from_millis(1)));
    let (mut a, mut b) = Channel::pair(cfg).unwrap();
    let later = Instant::now() + Duration::from_secs(1);
    assert!(a.next_deadline().unwrap() < later);
    a.on_timer(later).unwrap();
    a.on_timer(later).unwrap(); // not due again yet
    a.send(b"x").unwrap();
    assert_eq!(&*drain(&mut b, 1)[0].payload, b"x");
    assert!(b.try_recv().unwrap().is_none());

    let cfg = ChannelConfig::new().with_idle_timeout(Some(Duration::from_millis(5)));
    let (mut a, _b) = Channel::pair(cfg).unwrap();
    let later = Instant::now() + Duration::from_secs(1);
    assert!(matches!(a.on_timer(later), Err(Error::IdleTimeout)));
    assert!(matches!(a.on_timer(later), Err(Error::Hosed)));
    assert_eq!(a.next_deadline(), None);
}

#[test]
fn raw_bad_input() {
    /// A channel fed `bytes` (and `fd`, with their first byte) by a raw peer that sent a
    /// hello without a side socket first: every frame it delivers, then its error.
    fn raw_case(bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> (Vec<Frame>, Error) {
        let (raw, theirs) = UnixStream::pair().unwrap();
        let mut c =
            Channel::from_stream(theirs, ChannelConfig::new().with_max_frame(1 << 20)).unwrap();
        sys::send_with_fds(&raw, &encode_header(FLAG_HELLO, 0), &[]).unwrap();
        sys::send_with_fds(&raw, bytes, fd.as_slice()).unwrap();
        drop(raw);
        let mut frames = Vec::new();
        let e = loop {
            match c.try_recv() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => panic!("all bytes are there"),
                Err(e) => break e,
            }
        };
        assert!(matches!(c.try_recv(), Err(Error::Hosed)));
        (frames, e)
    }
    let err = |bytes: &[u8]| raw_case(bytes, None).1;
    let frame = |flags: u32, len: u64, body: &[u8]| {
        let mut v = encode_header(flags, len).to_vec();
        v.extend_from_slice(body);
        v
    };
    assert!(matches!(err(b"GARBAGE!"), Error::BadFrame("bad magic")));
    assert!(matches!(err(&frame(1 << 9, 0, &[])), Error::BadFrame(_)));
    assert!(matches!(
        err(&frame(FLAG_PING | FLAG_END, 0, &[])),
        Error::BadFrame(_)
    ));
    assert!(matches!(
        err(&frame(FLAG_PING, 1, &[0])),
        Error::BadFrame(_)
    ));
    assert!(matches!(
        err(&frame(FLAG_HELLO, 0, &[])),
        Error::BadFrame("a hello after the first frame")
    ));
    assert!(matches!(
        err(&frame(0, 100, &[0; 10])),
        Error::Truncated {
            expected: 116,
            got: 26
        }
    ));
    assert!(matches!(
        err(&frame(0, 1 << 40, &[])),
        Error::FrameTooLarge {
            len: 0x100_0000_0000,
            max: 0x10_0000,
            received: true
        }
    ));
    assert!(matches!(
        err(&b"FIPC\0\0"[..]),
        Error::Truncated {
            expected: 16,
            got: 6
        }
    ));
    // A peer whose hello had no side socket cannot send fds.
    assert!(matches!(
        err(&frame(FLAG_HAS_FD, 1, &[0])),
        Error::MissingFd
    ));
    // An fd on the data socket, after the hello: read with plain `recv`, so the kernel
    // discards it (closes it); the frame arrives without it.
    let (r, w) = nix::unistd::pipe().unwrap();
    let (frames, e) = raw_case(&frame(0, 1, &[7]), Some(r.as_fd()));
    drop(r);
    assert!(matches!(e, Error::PeerGone), "{e:?}");
    assert_eq!(frames.len(), 1);
    assert!(frames[0].fd.is_none() && *frames[0].payload == [7]);
    // No read end is left anywhere: the pipe is broken.
    assert_eq!(nix::unistd::write(&w, b"x"), Err(nix::errno::Errno::EPIPE));
}

#[test]
fn bad_hellos() {
    fn hello_case(bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Error {
        let (raw, theirs) = UnixStream::pair().unwrap();
        let mut c = Channel::from_stream(theirs, ChannelConfig::new()).unwrap();
        sys::send_with_fds(&raw, bytes, fds).unwrap();
        drop(raw);
        let e = match c.try_recv() {
            Ok(_) => panic!("no frame can come"),
            Err(e) => e,
        };
        assert!(matches!(c.try_recv(), Err(Error::Hosed)));
        e
    }
    // Not a hello first.
    assert!(matches!(
        hello_case(&encode_header(0, 0), &[]),
        Error::BadFrame("the first frame is not a hello")
    ));
    assert!(matches!(
        hello_case(&encode_header(FLAG_HELLO | FLAG_PING, 0), &[]),
        Error::BadFrame("the first frame is not a hello")
    ));
    assert!(matches!(
        hello_case(&encode_header(FLAG_HELLO, 1), &[]),
        Error::BadFrame("a hello with a payload")
    ));
    assert!(matches!(
        hello_case(&encode_header(FLAG_HELLO, 0)[..9], &[]),
        Error::Truncated {
            expected: 16,
            got: 9
        }
    ));
    assert!(matches!(hello_case(&[], &[]), Error::PeerGone));
    // The fd of the hello: flagged and absent, unflagged and present, two, not a socket.
    let (s1, s2) = UnixStream::pair().unwrap();
    assert!(matches!(
        hello_case(&encode_header(FLAG_HELLO | FLAG_HAS_FD, 0), &[]),
        Error::MissingFd
    ));
    assert!(matches!(
        hello_case(&encode_header(FLAG_HELLO, 0), &[s1.as_fd()]),
        Error::UnexpectedFd
    ));
    assert!(matches!(
        hello_case(
            &encode_header(FLAG_HELLO | FLAG_HAS_FD, 0),
            &[s1.as_fd(), s2.as_fd()]
        ),
        Error::TooManyFds
    ));
    let (r, _w) = nix::unistd::pipe().unwrap();
    assert!(matches!(
        hello_case(&encode_header(FLAG_HELLO | FLAG_HAS_FD, 0), &[r.as_fd()]),
        Error::BadFrame("the hello's fd is not a stream socket")
    ));
    // Read in pieces: the fd rides with the first byte and is kept until the end.
    let (raw, theirs) = UnixStream::pair().unwrap();
    let mut c = Channel::from_stream(theirs, ChannelConfig::new()).unwrap();
    let (side_tx, side_rx) = UnixStream::pair().unwrap();
    let h = encode_header(FLAG_HELLO | FLAG_HAS_FD, 0);
    sys::send_with_fds(&raw, &h[..3], &[side_rx.as_fd()]).unwrap();
    drop(side_rx);
    assert!(c.try_recv().unwrap().is_none());
    sys::send_with_fds(&raw, &h[3..], &[]).unwrap();
    assert!(c.try_recv().unwrap().is_none());
    let p = tagged_fd(5);
    assert!(sys::try_send_one_fd(side_tx.as_fd(), p.as_fd()).unwrap());
    sys::send_with_fds(&raw, &encode_header(FLAG_HAS_FD, 0), &[]).unwrap();
    let f = c.try_recv().unwrap().unwrap();
    assert_eq!(read_tag(f.fd.unwrap()), 5);
}

/// A frame's `on_unsent` runs exactly when its last byte never leaves: refused, or dropped with
/// the queue (hosed, dropped); never once the frame is written, at once or by a flush, alone or
/// coalesced with others.
#[test]
fn on_unsent_runs_only_for_frames_that_never_wholly_leave() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let ran = Arc::new(AtomicUsize::new(0));
    let counted = |p: &'static [u8]| {
        let r = ran.clone();
        OutFrame::new(p).on_unsent(move || {
            r.fetch_add(1, Ordering::SeqCst);
        })
    };
    static BIG: [u8; 1 << 20] = [3; 1 << 20];

    // Refused: too large.
    let (mut a, mut b) = Channel::pair(ChannelConfig::new().with_max_frame(16)).unwrap();
    assert!(matches!(
        a.send(counted(b"seventeen bytes!!")),
        Err(Error::FrameTooLarge { .. })
    ));
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    // Written at once.
    a.send(counted(b"small")).unwrap();
    assert_eq!(&*b.recv_blocking(None).unwrap().unwrap().payload, b"small");
    assert_eq!(ran.load(Ordering::SeqCst), 1);

    // Queued behind a big frame (small ones coalesced into one chunk), then flushed: none run.
    let (mut a, mut b) = pair();
    while a.queued_bytes() == 0 {
        a.send(&BIG[..]).unwrap();
    }
    for _ in 0..10 {
        a.send(counted(b"tiny")).unwrap();
    }
    a.send(
        OutFrame::shared(vec![SharedBytes::from(vec![9u8; 4096])]).on_unsent({
            let r = ran.clone();
            move || {
                r.fetch_add(1, Ordering::SeqCst);
            }
        }),
    )
    .unwrap();
    let mut got = 0;
    while got < 11 {
        a.flush().unwrap();
        if let Some(f) = b
            .recv_blocking(Some(std::time::Duration::from_millis(10)))
            .unwrap()
        {
            if f.payload.len() < BIG.len() {
                got += 1;
            }
        }
    }
    assert!(a.flush().unwrap(), "all written");
    assert_eq!(ran.load(Ordering::SeqCst), 1, "written frames never run it");

    // Queued, then the channel dropped: each unwritten frame runs it once.
    let (mut a, _b) = pair();
    while a.queued_bytes() == 0 {
        a.send(&BIG[..]).unwrap();
    }
    for _ in 0..5 {
        a.send(counted(b"never")).unwrap();
    }
    drop(a);
    assert_eq!(ran.load(Ordering::SeqCst), 6);

    // Queued, then hosed (the peer gone): run at the hosing.
    let (mut a, b) = pair();
    while a.queued_bytes() == 0 {
        a.send(&BIG[..]).unwrap();
    }
    a.send(counted(b"lost")).unwrap();
    drop(b);
    let err = loop {
        if let Err(e) = a.flush() {
            break e;
        }
    };
    assert!(err.is_hosing(), "{err:?}");
    assert_eq!(ran.load(Ordering::SeqCst), 7);
    assert!(matches!(a.send(counted(b"after")), Err(Error::Hosed)));
    assert_eq!(ran.load(Ordering::SeqCst), 8, "refused when hosed: runs");
}

/// Queued frames with a give-back are never merged into one chunk: a write that ends inside the
/// second frame has wholly written the first, whose `on_unsent` must then never run (it would
/// give back a handle the peer is about to borrow). Found in review.
#[test]
fn a_frame_wholly_written_before_a_partial_one_never_runs_on_unsent() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (mut a, _b) = pair();
    let big = vec![0u8; 1 << 20];
    while a.tx.chunks.is_empty() {
        a.send(&big).unwrap();
    }
    let head_left: usize = a.tx.chunks.iter().map(|c| c.data.rest().len()).sum();
    let ran = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let (f1, f2) = ([1u8; 100], vec![2u8; 30_000]);
    for (payload, r) in [(&f1[..], ran[0].clone()), (&f2[..], ran[1].clone())] {
        a.send(OutFrame::new(payload).on_unsent(move || {
            r.fetch_add(1, Ordering::SeqCst);
        }))
        .unwrap();
    }
    // A write that takes everything up to and including the first frame, and 10 bytes of the
    // second; then the channel goes.
    a.tx.consume(head_left + HEADER_LEN + 100 + 10);
    drop(a);
    assert_eq!(
        ran[0].load(Ordering::SeqCst),
        0,
        "the first frame wholly left"
    );
    assert_eq!(ran[1].load(Ordering::SeqCst), 1, "the second never did");
}
