// The transport suite, included by tests/transport.rs (over sockets) and tests/transport_shm_queue.rs (over
// shared-memory queues): `common::kind()` tells which.

use std::io::{Read, Seek, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use common::*;
use flowipc::transport::{
    AsyncChannel, Channel, ChannelConfig, Error, Frame, OutFrame, SharedBytes,
};

// The wire format as the transport module's docs define it is written out in `common::raw` (so
// that a change of the format in the code shows up as failing tests).
use common::raw::{raw_frame, RawPeer, FLAG_HAS_FD, FLAG_HELLO, HEADER_LEN};

// The auto traits of the public types (a regression is an API break).
static_assertions::assert_impl_all!(Channel: Send, Sync, std::fmt::Debug);
static_assertions::assert_impl_all!(AsyncChannel: Send, Sync, std::fmt::Debug);
static_assertions::assert_impl_all!(Frame: Send, Sync, std::fmt::Debug);
static_assertions::assert_impl_all!(SharedBytes: Send, Sync, Clone, std::fmt::Debug);
static_assertions::assert_impl_all!(flowipc::transport::AlignedBuf: Send, Sync, Clone, Eq);
static_assertions::assert_impl_all!(ChannelConfig: Send, Sync, Clone, Eq, Default);
static_assertions::assert_impl_all!(Error: Send, Sync, std::error::Error);

/// Bound on any single wait in these tests (a hang fails instead of blocking forever).
const WAIT: Option<Duration> = Some(Duration::from_secs(60));

/// Entry point of every child process of this file (run by `common::spawn_plain`, never
/// directly).
#[test]
#[ignore = "child-process entry point, spawned by the other tests of this file"]
fn child_entry() {
    let Some(role) = child_role() else { return };
    match role.as_str() {
        "fd_echo" | "echo" => child_echo(),
        "flood" => child_flood(),
        "duplex" => child_duplex(),
        "stream" => child_stream(),
        "raw_garbage" => child_raw(b"this is not a frame at all".to_vec()),
        "raw_truncated" => child_raw(raw_frame(0, 100, &[7; 10])),
        "end_async" => child_end_async(),
        "pinger" => child_keepalive(Some(Duration::from_millis(50))),
        "silent" => child_keepalive(None),
        "async_echo" => child_async_echo(),
        "hello_then_sleep" => child_hello_then_sleep(),
        "slow_echo" => child_slow_echo(),
        other => panic!("unknown role {other}"),
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

fn child_channel(cfg: ChannelConfig) -> Channel {
    Channel::from_stream(child_socket(), cfg).unwrap()
}

/// Takes the socket out of `peer` (so dropping the channel really closes it) as a channel.
fn parent_channel(peer: &mut Peer, cfg: ChannelConfig) -> Channel {
    let dummy = UnixStream::pair().unwrap().0;
    let sock = std::mem::replace(&mut peer.sock, dummy);
    Channel::from_stream(sock, cfg).unwrap()
}

fn recv(c: &mut Channel) -> Frame {
    c.recv_blocking(WAIT)
        .unwrap()
        .expect("no frame within the bound")
}

/// The error the channel reports next (frames before it are skipped), checking that it is
/// reported once: the next call says `Hosed`.
/// Receives the peer's graceful end (within the bound): `Ok(None)`, no error, not hosed,
/// and every later receive answers `Ok(None)` at once.
fn assert_peer_ended(c: &mut Channel) {
    match c.recv_blocking(WAIT) {
        Ok(Some(f)) => panic!("an extra frame of {} bytes", f.payload.len()),
        Ok(None) => {}
        Err(e) => panic!("{e}"),
    }
    assert!(c.is_peer_ended(), "no end within the bound");
    assert!(!c.is_hosed());
    assert!(c.try_recv().unwrap().is_none());
    assert!(c.recv_blocking(None).unwrap().is_none());
}

fn next_error(c: &mut Channel) -> Error {
    let e = loop {
        match c.recv_blocking(WAIT) {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("no error within the bound"),
            Err(e) => break e,
        }
    };
    assert!(e.is_hosing(), "{e:?}");
    assert!(c.is_hosed());
    assert!(matches!(c.try_recv(), Err(Error::Hosed)));
    assert!(matches!(c.recv_blocking(WAIT), Err(Error::Hosed)));
    assert!(matches!(c.send(b"x"), Err(Error::Hosed)));
    assert!(matches!(c.flush(), Err(Error::Hosed)));
    e
}

/// Length of flood frame `i`: 0..=2048 bytes.
fn flood_len(i: u64) -> usize {
    (i.wrapping_mul(7919) % 2049) as usize
}

fn flood_payload(i: u64) -> Vec<u8> {
    let mut v = vec![0u8; flood_len(i)];
    fill(&mut v, i);
    v
}

fn check_flood(f: &Frame, i: u64) {
    assert_eq!(f.payload.len(), flood_len(i), "length of frame {i}");
    assert!(check(&f.payload, i), "content of frame {i}");
    assert!(f.fd.is_none());
}

fn memfd_with(text: &str) -> std::fs::File {
    let mut f = memfd("transport-test");
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn read_all(fd: OwnedFd) -> String {
    let mut f = std::fs::File::from(fd);
    f.rewind().unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    s
}

// ---------------------------------------------------------------------------------------------
// 1. fd passing

/// Echoes every frame; a frame with an fd is answered with the payload, `|`, and the fd's
/// contents, and a new memfd holding the contents reversed. Ends at the peer's end or death.
fn child_echo() {
    let mut c = child_channel(channel_config());
    loop {
        match c.recv_blocking(None) {
            Ok(Some(f)) => {
                let (payload, fd) = f.into_parts();
                match fd {
                    Some(fd) => {
                        let text = read_all(fd);
                        let back = memfd_with(&text.chars().rev().collect::<String>());
                        c.send(
                            OutFrame::parts(&[&payload[..], b"|", text.as_bytes()])
                                .fd(back.as_fd()),
                        )
                        .unwrap();
                    }
                    None => c.send(&payload).unwrap(),
                }
            }
            // The parent's end (no timeout: the only `None`), or the parent gone.
            Ok(None) => {
                assert!(c.is_peer_ended());
                break;
            }
            Err(Error::PeerGone | Error::Reset) => break,
            Err(e) => panic!("echo child: {e}"),
        }
    }
}

#[test]
fn fds_travel_with_their_frames_across_processes() {
    within(120, "fd passing", || {
        let mut peer = spawn_plain("fd_echo");
        let mut c = parent_channel(&mut peer, channel_config());
        let n = 60u64;
        for i in 0..n {
            let payload = format!("frame {i}");
            if i % 3 == 1 {
                let file = memfd_with(&format!("contents of {i}"));
                c.send(OutFrame::new(payload.as_bytes()).fd(file.as_fd()))
                    .unwrap();
                // Our copy may go at once: the kernel (or the queue's duplicate) holds it.
            } else {
                c.send(payload.as_bytes()).unwrap();
            }
        }
        for i in 0..n {
            let f = recv(&mut c);
            let payload = format!("frame {i}");
            if i % 3 == 1 {
                let text = format!("contents of {i}");
                assert_eq!(&*f.payload, format!("{payload}|{text}").as_bytes());
                let back = read_all(f.fd.expect("the echo carries an fd"));
                assert_eq!(back, text.chars().rev().collect::<String>());
            } else {
                assert_eq!(&*f.payload, payload.as_bytes());
                assert!(f.fd.is_none(), "frame {i} has no fd");
            }
        }
        c.end_sending().unwrap();
        assert!(c.flush_blocking(WAIT).unwrap());
        // The child saw the end and exited: its side closed without an END of its own.
        assert!(matches!(next_error(&mut c), Error::PeerGone));
        wait_ok(peer);
    });
}

// ---------------------------------------------------------------------------------------------
// 2. floods

const FLOOD: u64 = 100_000;

/// Sends FLOOD frames to a parent that is not reading (it waits for our word on a second
/// channel, whose fd came in the first frame), reports its queue, then flushes and ends.
fn child_flood() {
    let mut c = child_channel(channel_config());
    let first = recv(&mut c);
    assert_eq!(&*first.payload, b"control");
    let control = UnixStream::from(first.fd.expect("control socket"));
    let mut control = Channel::from_stream(control, channel_config()).unwrap();
    let mut max_queued = 0;
    for i in 0..FLOOD {
        c.send(&flood_payload(i)).unwrap();
        max_queued = max_queued.max(c.queued_bytes());
    }
    control.send(&(max_queued as u64).to_le_bytes()).unwrap();
    assert!(control.flush_blocking(WAIT).unwrap());
    c.end_sending().unwrap();
    assert!(c.flush_blocking(Some(Duration::from_secs(120))).unwrap());
    assert!(c.is_send_done());
}

#[test]
fn a_flood_to_a_reader_that_is_away_is_queued_then_delivered_in_order() {
    within(300, "flood", || {
        let mut peer = spawn_plain("flood");
        let mut c = parent_channel(&mut peer, channel_config());
        let (mut control, theirs) = Channel::pair(channel_config()).unwrap();
        c.send(OutFrame::new(b"control").fd(theirs.as_fd()))
            .unwrap();
        drop(theirs);
        // Not reading `c` until the child says every send returned.
        let word = recv(&mut control);
        let max_queued = u64::from_le_bytes(word.payload[..8].try_into().unwrap());
        // About 100 MB went into a socket that holds a few hundred KB: it was queued.
        assert!(max_queued > 16 << 20, "max queued {max_queued}");
        for i in 0..FLOOD {
            check_flood(&recv(&mut c), i);
        }
        assert_peer_ended(&mut c);
        wait_ok(peer);
    });
}

const DUPLEX: u64 = 30_000;

/// Both sides queue DUPLEX frames, then receive the other's while their own queue drains.
fn duplex_side(c: &mut Channel) {
    for i in 0..DUPLEX {
        c.send(&flood_payload(i)).unwrap();
    }
    for i in 0..DUPLEX {
        check_flood(&recv(c), i);
    }
    assert!(c.flush_blocking(WAIT).unwrap());
}

fn child_duplex() {
    let mut c = child_channel(channel_config());
    duplex_side(&mut c);
    // Wait for the parent to finish too (it ends its sending and closes).
    match c.recv_blocking(WAIT) {
        Ok(None) => assert!(c.is_peer_ended()),
        Err(Error::PeerGone) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn two_peers_flooding_each_other_do_not_deadlock() {
    within(300, "duplex flood", || {
        let mut peer = spawn_plain("duplex");
        let mut c = parent_channel(&mut peer, channel_config());
        duplex_side(&mut c);
        assert_eq!(c.queued_bytes(), 0);
        c.end_sending().unwrap();
        drop(c);
        wait_ok(peer);
    });
}

// ---------------------------------------------------------------------------------------------
// 3. SIGKILL

/// Streams numbered frames forever (until killed).
fn child_stream() {
    let mut c = child_channel(channel_config());
    for i in 0.. {
        let mut p = vec![0u8; 512];
        fill(&mut p, i);
        if c.send(&p).is_err() {
            break;
        }
        if c.wants_write() && c.flush_blocking(WAIT).is_err() {
            break;
        }
    }
}

#[test]
fn a_peer_killed_mid_stream_is_reported_once_and_others_go_on() {
    within(120, "sigkill", || {
        let mut a = spawn_plain("stream");
        let mut b = spawn_plain("echo");
        let mut ca = parent_channel(&mut a, channel_config());
        let mut cb = parent_channel(&mut b, channel_config());
        for i in 0..500 {
            let f = recv(&mut ca);
            assert!(check(&f.payload, i), "frame {i} from the streamer");
        }
        a.child.kill().unwrap();
        a.child.wait().unwrap();
        // Frames still in flight may arrive first; then the error, once. Killed between
        // frames it is PeerGone (or Reset, if our side still had data for it); killed while
        // its queue held half a frame, Truncated.
        let e = next_error(&mut ca);
        assert!(
            matches!(e, Error::PeerGone | Error::Reset | Error::Truncated { .. }),
            "{e:?}"
        );
        // The other child is unaffected.
        for i in 0..50u64 {
            let p = i.to_le_bytes();
            cb.send(&p).unwrap();
            assert_eq!(&*recv(&mut cb).payload, &p);
        }
        cb.end_sending().unwrap();
        assert!(cb.flush_blocking(WAIT).unwrap());
        assert!(matches!(next_error(&mut cb), Error::PeerGone));
        wait_ok(b);
    });
}

/// Sends one frame (so the parent has its hello), then sleeps, reading nothing, until killed.
fn child_hello_then_sleep() {
    let mut c = child_channel(channel_config());
    c.send(b"here").unwrap();
    assert!(c.flush_blocking(WAIT).unwrap());
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_peer_killed_while_we_wait_is_reported_once_whatever_the_wait() {
    use flowipc::transport::WaitPolicy;
    within(120, "killed while waiting", || {
        let policies = [
            WaitPolicy::BLOCK,
            WaitPolicy::default(),
            WaitPolicy::BusyPoll,
        ];
        for policy in policies {
            // Waiting to receive (spinning, then on the futex; or busy-polling).
            let mut p = spawn_plain("hello_then_sleep");
            let mut c = parent_channel(&mut p, channel_config().with_wait_policy(policy));
            assert_eq!(&*recv(&mut c).payload, b"here");
            let waiter = std::thread::spawn(move || {
                let e = next_error(&mut c);
                (e, c)
            });
            std::thread::sleep(Duration::from_millis(100)); // well into the wait
            p.child.kill().unwrap();
            p.child.wait().unwrap();
            let (e, c) = waiter.join().unwrap();
            assert!(matches!(e, Error::PeerGone | Error::Reset), "{policy:?}: {e:?}");
            drop(c);

            // Waiting for room: the peer reads nothing, the socket or ring fills, the rest is
            // queued, and a blocking flush waits for room that never comes.
            let mut p = spawn_plain("hello_then_sleep");
            let mut c = parent_channel(&mut p, channel_config().with_wait_policy(policy));
            assert_eq!(&*recv(&mut c).payload, b"here");
            let chunk = vec![7u8; 64 << 10];
            while c.queued_bytes() == 0 {
                c.send(&chunk).unwrap();
            }
            let waiter = std::thread::spawn(move || {
                let r = c.flush_blocking(WAIT);
                (r, c)
            });
            std::thread::sleep(Duration::from_millis(100));
            p.child.kill().unwrap();
            p.child.wait().unwrap();
            let (r, mut c) = waiter.join().unwrap();
            assert!(matches!(r, Err(Error::Reset)), "{policy:?}: {r:?}");
            assert!(matches!(c.flush(), Err(Error::Hosed)));
            assert!(matches!(c.try_recv(), Err(Error::Hosed)));
        }
        // (Rings are memfds, named nowhere: nothing can be left in /dev/shm.)
        assert!(dev_shm_leftovers().is_empty());
    });
}

/// Echoes every frame, pausing now and then so that the parent's queue fills and its poll
/// loop must sleep (for data, and for room).
fn child_slow_echo() {
    let mut c = child_channel(channel_config());
    // Away at first: the parent's burst fills whatever carries it and the rest waits in its
    // queue (reading at once, this side could keep up with a socket).
    std::thread::sleep(Duration::from_millis(300));
    let mut n = 0u64;
    loop {
        match c.recv_blocking(None) {
            Ok(Some(f)) => {
                n += 1;
                if n % 16 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
                c.send(&f.payload).unwrap();
            }
            Ok(None) => {
                assert!(c.is_peer_ended());
                break;
            }
            Err(Error::PeerGone | Error::Reset) => break,
            Err(e) => panic!("slow echo child: {e}"),
        }
    }
    assert!(c.flush_blocking(WAIT).unwrap_or(false) || c.is_hosed());
}

/// One turn of a user's own poll loop (nix's `poll`) over the channel's interest.
fn poll_turn(c: &mut Channel) {
    use flowipc::poll::Pollable;
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let interest = c.interest();
    let mut fds: Vec<PollFd> = interest
        .fds()
        .map(|(fd, read, write)| {
            let mut events = PollFlags::empty();
            events.set(PollFlags::POLLIN, read);
            events.set(PollFlags::POLLOUT, write);
            PollFd::new(fd, events)
        })
        .collect();
    let timeout = interest.deadline().map_or(PollTimeout::from(5_000u16), |d| {
        let ms = d.saturating_duration_since(Instant::now()).as_millis();
        PollTimeout::from(ms.min(5_000) as u16)
    });
    nix::poll::poll(&mut fds, timeout).unwrap();
    c.on_ready().unwrap();
}

#[test]
fn a_poll_loop_of_our_own_drives_the_channel_both_ways() {
    within(120, "own poll loop", || {
        let mut p = spawn_plain("slow_echo");
        let mut c = parent_channel(&mut p, channel_config());
        // 3 MiB in 48 KiB frames, sent without waiting: more than any kind's buffer, so the
        // rest waits in our queue and goes as the echo makes room; every frame comes back.
        const N: u64 = 64;
        for i in 0..N {
            let mut v = vec![0u8; 48 << 10];
            fill(&mut v, i);
            c.send(&v).unwrap();
        }
        assert!(c.queued_bytes() > 0, "nothing was left to wait for room");
        let mut got = 0;
        let start = Instant::now();
        while got < N {
            assert!(start.elapsed() < Duration::from_secs(60), "stuck at {got}");
            poll_turn(&mut c);
            while let Some(f) = c.try_recv().unwrap() {
                assert!(check(&f.payload, got), "frame {got}");
                got += 1;
            }
        }
        assert_eq!(c.queued_bytes(), 0);
        c.end_sending().unwrap();
        while !c.is_send_done() {
            poll_turn(&mut c);
        }
        let e = loop {
            poll_turn(&mut c);
            match c.try_recv() {
                Ok(Some(f)) => panic!("an extra frame of {} bytes", f.payload.len()),
                Ok(None) => {}
                Err(e) => break e,
            }
        };
        assert!(matches!(e, Error::PeerGone), "{e:?}");
        wait_ok(p);
    });
}

// ---------------------------------------------------------------------------------------------
// 4. bad input

/// Connects and writes a hello (no fd side socket) and then `bytes` raw, then exits.
fn child_raw(bytes: Vec<u8>) {
    RawPeer::hello(child_socket(), None).write(&bytes);
}

#[test]
fn bad_input_from_another_process() {
    within(120, "bad input across processes", || {
        let mut p = spawn_plain("raw_garbage");
        let mut c = parent_channel(&mut p, channel_config());
        assert!(matches!(next_error(&mut c), Error::BadFrame("bad magic")));
        wait_ok(p);

        let mut p = spawn_plain("raw_truncated");
        let mut c = parent_channel(&mut p, channel_config());
        let e = next_error(&mut c);
        assert!(
            matches!(
                e,
                Error::Truncated {
                    expected: 116,
                    got: 26
                }
            ),
            "{e:?}"
        );
        wait_ok(p);
    });
}

/// A channel fed raw bytes by a plain socket, after a hello that hands it a side socket; `fds`
/// (if any) were sent on the side socket first, in one message. Returns the channel and the
/// sending end of the side socket (the data socket is closed).
fn fed_side(
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
    cfg: ChannelConfig,
) -> (Channel, UnixStream) {
    let (raw, theirs) = UnixStream::pair().unwrap();
    let (side, side_theirs) = UnixStream::pair().unwrap();
    let c = Channel::from_stream(theirs, cfg).unwrap();
    let mut peer = RawPeer::hello(raw, Some(side_theirs.as_fd()));
    if !fds.is_empty() {
        assert_eq!(send_with_fds(&side, &[0], fds), 1);
    }
    peer.write(bytes);
    (c, side)
}

/// Like [`fed_side`], with the side socket closed too.
fn fed(bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>], cfg: ChannelConfig) -> Channel {
    fed_side(bytes, fds, cfg).0
}

#[test]
fn bad_input_gets_its_specific_error_once() {
    within(120, "bad input", || {
        // Truncated, then the writer closes.
        let (raw, theirs) = UnixStream::pair().unwrap();
        let mut c = Channel::from_stream(theirs, channel_config()).unwrap();
        let mut raw = RawPeer::hello(raw, None);
        raw.write(&raw_frame(0, 100, &[1; 10]));
        assert!(c.try_recv().unwrap().is_none());
        drop(raw);
        let e = next_error(&mut c);
        assert!(
            matches!(
                e,
                Error::Truncated {
                    expected: 116,
                    got: 26
                }
            ),
            "{e:?}"
        );

        // Oversized: refused from the header alone, whatever the allocator could do.
        let mut c = fed(&raw_frame(0, u64::MAX - 20, &[]), &[], channel_config());
        assert!(matches!(
            next_error(&mut c),
            Error::FrameTooLarge {
                len: 0xFFFF_FFFF_FFFF_FFEB,
                received: true,
                ..
            }
        ));
        let mut c = fed(
            &raw_frame(0, 4097, &[]),
            &[],
            channel_config().with_max_frame(4096),
        );
        assert!(matches!(
            next_error(&mut c),
            Error::FrameTooLarge {
                len: 4097,
                max: 4096,
                received: true
            }
        ));

        // Garbage, and headers with flags that are not allowed.
        let mut c = fed(&[0xEE; 40], &[], channel_config());
        assert!(matches!(next_error(&mut c), Error::BadFrame("bad magic")));
        let mut c = fed(&raw_frame(1 << 9, 0, &[]), &[], channel_config());
        assert!(matches!(
            next_error(&mut c),
            Error::BadFrame("unknown flag bits")
        ));

        // A good frame, then one flagged with an fd that did not come: nothing waits on the
        // side socket (the fd goes there before its frame), so this is the error at once.
        let mut bytes = raw_frame(0, 3, b"abc");
        bytes.extend(raw_frame(FLAG_HAS_FD, 2, b"de"));
        let (mut c, _side) = fed_side(&bytes, &[], channel_config());
        assert_eq!(&*recv(&mut c).payload, b"abc");
        assert!(matches!(next_error(&mut c), Error::MissingFd));
        // The same when the side socket was closed before the fd came.
        let mut c = fed(&bytes, &[], channel_config());
        assert_eq!(&*recv(&mut c).payload, b"abc");
        assert!(matches!(next_error(&mut c), Error::MissingFd));
        // A side message without an fd.
        let (mut c, side) = fed_side(&raw_frame(FLAG_HAS_FD, 1, b"x"), &[], channel_config());
        (&side).write_all(&[0]).unwrap();
        assert!(matches!(next_error(&mut c), Error::MissingFd));

        // An fd on the data socket (where none belongs after the hello), with a frame not
        // flagged for one: the data socket is read with plain `recv`, so the kernel closes the
        // fd (by the time the channel has read all there is: a ring's doorbell bytes are read
        // when the ring is empty); the frame arrives without it and nothing else breaks.
        let (mut probe, victim) = UnixStream::pair().unwrap();
        let (raw, theirs) = UnixStream::pair().unwrap();
        let mut c = Channel::from_stream(theirs, channel_config()).unwrap();
        let mut raw = RawPeer::hello(raw, None);
        raw.write_with_fds(&raw_frame(0, 1, b"x"), &[victim.as_fd()]);
        drop(victim);
        let f = recv(&mut c);
        assert!(&*f.payload == b"x" && f.fd.is_none());
        assert!(c.try_recv().unwrap().is_none());
        assert!(closed_everywhere(&mut probe), "the stray fd leaked");
        // With a frame flagged for one: the fd is not where it must be, MissingFd.
        let (mut probe, victim) = UnixStream::pair().unwrap();
        raw.write_with_fds(&raw_frame(FLAG_HAS_FD, 1, b"y"), &[victim.as_fd()]);
        drop(victim);
        assert!(matches!(next_error(&mut c), Error::MissingFd));
        drop(c);
        assert!(closed_everywhere(&mut probe), "the stray fd leaked");
        drop(raw);
        // In the middle of a payload: discarded too, the frame is whole.
        let (mut probe, victim) = UnixStream::pair().unwrap();
        let (raw, theirs) = UnixStream::pair().unwrap();
        let mut c = Channel::from_stream(theirs, channel_config()).unwrap();
        let mut raw = RawPeer::hello(raw, None);
        let mut head = raw_frame(0, 10, b"12345");
        head.truncate(HEADER_LEN + 5);
        raw.write(&head);
        assert!(c.try_recv().unwrap().is_none());
        raw.write_with_fds(b"67890", &[victim.as_fd()]);
        drop(victim);
        assert_eq!(&*recv(&mut c).payload, b"1234567890");
        drop(raw);
        assert!(matches!(next_error(&mut c), Error::PeerGone));
        assert!(closed_everywhere(&mut probe));

        // Two fds in one side message: an error, and both are closed.
        let (mut p1, v1) = UnixStream::pair().unwrap();
        let (mut p2, v2) = UnixStream::pair().unwrap();
        let mut c = fed(
            &raw_frame(FLAG_HAS_FD, 1, b"x"),
            &[v1.as_fd(), v2.as_fd()],
            channel_config(),
        );
        drop((v1, v2));
        assert!(matches!(next_error(&mut c), Error::TooManyFds));
        assert!(closed_everywhere(&mut p1) && closed_everywhere(&mut p2));

        // More fds than the kernel will hand over (cut off): same, nothing leaks.
        let pairs: Vec<_> = (0..12).map(|_| UnixStream::pair().unwrap()).collect();
        let victims: Vec<_> = pairs.iter().map(|(_, v)| v.as_fd()).collect();
        let mut c = fed(
            &raw_frame(FLAG_HAS_FD, 1, b"x"),
            &victims,
            channel_config(),
        );
        drop(victims);
        let mut probes: Vec<UnixStream> = pairs.into_iter().map(|(p, _v)| p).collect();
        assert!(matches!(next_error(&mut c), Error::TooManyFds));
        assert!(probes.iter_mut().all(closed_everywhere));

        // A hello whose fd is not a socket; a second hello.
        let (r, _w) = nix::unistd::pipe().unwrap();
        let (raw, theirs) = UnixStream::pair().unwrap();
        let mut c = Channel::from_stream(theirs, channel_config()).unwrap();
        let hello = raw_frame(FLAG_HELLO | FLAG_HAS_FD, 0, &[]);
        send_with_fds(&raw, &hello, &[r.as_fd()]);
        assert!(matches!(
            next_error(&mut c),
            Error::BadFrame("the hello's fd is not a stream socket")
        ));
        let mut c = fed(&raw_frame(FLAG_HELLO, 0, &[]), &[], channel_config());
        assert!(matches!(
            next_error(&mut c),
            Error::BadFrame("a hello after the first frame")
        ));
        // No hello at all.
        let (mut raw, theirs) = UnixStream::pair().unwrap();
        let mut c = Channel::from_stream(theirs, channel_config()).unwrap();
        raw.write_all(&raw_frame(0, 1, b"x")).unwrap();
        assert!(matches!(
            next_error(&mut c),
            Error::BadFrame("the first frame is not a hello")
        ));
    });
}

// ---------------------------------------------------------------------------------------------
// 5. high-water

#[test]
fn high_water_refuses_without_hosing_and_recovers() {
    within(120, "high water", || {
        let limit = 1 << 20;
        let (mut a, mut b) =
            Channel::pair(channel_config().with_high_water(Some(limit))).unwrap();
        let frame = |i: u64| {
            let mut v = vec![0u8; 8 << 10];
            fill(&mut v, i);
            v
        };
        let mut sent = 0u64;
        let refused = loop {
            match a.send(&frame(sent)) {
                Ok(()) => sent += 1,
                Err(Error::HighWater { queued, limit: l }) => {
                    assert_eq!(l, limit);
                    assert!(queued <= limit && queued + (8 << 10) + HEADER_LEN > limit);
                    break frame(sent);
                }
                Err(e) => panic!("{e:?}"),
            }
            assert!(sent < 100_000, "never reached the high-water mark");
        };
        assert!(!a.is_hosed());
        assert!(a.queued_bytes() <= limit);
        // Refused again while nothing drained; still not hosed.
        assert!(matches!(a.send(&refused), Err(Error::HighWater { .. })));
        // The peer drains; we flush as it does.
        for i in 0..sent {
            let f = b.recv_blocking(Some(Duration::from_millis(1))).unwrap();
            let f = match f {
                Some(f) => f,
                None => {
                    a.flush().unwrap();
                    recv(&mut b)
                }
            };
            assert!(check(&f.payload, i), "frame {i}");
        }
        assert!(a.flush().unwrap());
        a.send(b"after").unwrap();
        assert_eq!(&*recv(&mut b).payload, b"after");
        // The refused frame never arrived.
        assert!(b.try_recv().unwrap().is_none());
    });
}

// ---------------------------------------------------------------------------------------------
// 6. graceful end

const END_FRAMES: u64 = 2_000;

/// Sends END_FRAMES frames and ends, through the async-I/O face; checks that the end-sending
/// handler ran exactly once (the exit code tells the parent).
fn child_end_async() {
    let (err_tx, err_rx) = mpsc::channel();
    let c = AsyncChannel::start(
        child_channel(channel_config()),
        |_f| panic!("the parent sends nothing"),
        move |e| err_tx.send(e).unwrap(),
    )
    .unwrap();
    for i in 0..END_FRAMES {
        c.send(&flood_payload(i)).unwrap();
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    let k = calls.clone();
    c.async_end_sending(move |r| {
        k.fetch_add(1, Ordering::SeqCst);
        done_tx.send(r).unwrap();
    });
    // Refused as sent after the end; or, if the parent already saw the end and closed (the END
    // frame went out with `async_end_sending`, so it may have), refused as hosed.
    match c.send(b"late") {
        Err(Error::SendingEnded) => {}
        Err(Error::Hosed) => assert!(c.is_hosed()),
        other => panic!("a send after the end: {other:?}"),
    }
    done_rx.recv_timeout(WAIT.unwrap()).unwrap().unwrap();
    // The parent closes once it has seen the end.
    let e = err_rx.recv_timeout(WAIT.unwrap()).unwrap();
    assert!(matches!(e, Error::PeerGone | Error::Reset), "{e:?}");
    drop(c); // joins the library thread: no handler can run after this
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn end_sending_delivers_everything_then_the_end_which_is_no_error() {
    within(120, "end sending", || {
        let mut peer = spawn_plain("end_async");
        let mut c = parent_channel(&mut peer, channel_config());
        for i in 0..END_FRAMES {
            check_flood(&recv(&mut c), i);
        }
        assert_peer_ended(&mut c);
        drop(c);
        wait_ok(peer);
    });
}

// ---------------------------------------------------------------------------------------------
// 7. keep-alive

/// Receives (which also runs the timers: pings with `ping`) until the parent goes.
fn child_keepalive(ping: Option<Duration>) {
    let mut c = child_channel(channel_config().with_auto_ping(ping));
    loop {
        match c.recv_blocking(None) {
            Ok(Some(_)) => {}
            Ok(None) => {
                assert!(c.is_peer_ended());
                break;
            }
            Err(Error::PeerGone | Error::Reset) => break,
            Err(e) => panic!("keep-alive child: {e}"),
        }
    }
}

#[test]
fn pings_keep_an_idle_channel_alive_and_silence_times_out() {
    within(120, "keep-alive", || {
        // The idle timeout is 20 ping periods (a loaded machine may delay a ping; the test
        // asserts no timing, only that pings arrive at all within it), and we watch for 2.5 of
        // them: without pings it would fire.
        let idle = Duration::from_secs(1);
        let mut peer = spawn_plain("pinger");
        let mut c = parent_channel(
            &mut peer,
            channel_config().with_idle_timeout(Some(idle)),
        );
        let until = Instant::now() + idle * 5 / 2;
        loop {
            let now = Instant::now();
            if now >= until {
                break;
            }
            // Pings are consumed silently: no frame, and no error.
            assert!(c.recv_blocking(Some(until - now)).unwrap().is_none());
        }
        assert!(!c.is_hosed());
        c.end_sending().unwrap();
        assert!(c.flush_blocking(WAIT).unwrap());
        drop(c);
        wait_ok(peer);

        let mut peer = spawn_plain("silent");
        let mut c = parent_channel(
            &mut peer,
            channel_config().with_idle_timeout(Some(Duration::from_millis(300))),
        );
        assert!(matches!(next_error(&mut c), Error::IdleTimeout));
        assert_eq!(c.next_deadline(), None);
        assert!(matches!(c.on_timer(Instant::now()), Err(Error::Hosed)));
        drop(c);
        wait_ok(peer);
    });
}

// ---------------------------------------------------------------------------------------------
// 8. async-I/O face

/// Echoes every frame (fd included) from within the frame handler, until the parent goes.
fn child_async_echo() {
    // Weak: a strong reference in the handler would be a cycle through the library thread.
    let me: Arc<OnceLock<Weak<AsyncChannel>>> = Arc::new(OnceLock::new());
    let me2 = me.clone();
    let (err_tx, err_rx) = mpsc::channel();
    let c = AsyncChannel::start(
        child_channel(channel_config()),
        move |f| {
            let Some(c) = me2.get().and_then(Weak::upgrade) else {
                return; // shutting down
            };
            let (payload, fd) = f.into_parts();
            c.send(OutFrame::shared(vec![SharedBytes::from(payload.to_vec())]).owned_fd(fd))
                .unwrap();
        },
        move |e| err_tx.send(e).unwrap(),
    )
    .unwrap();
    let c = Arc::new(c);
    me.set(Arc::downgrade(&c)).unwrap();
    // Ready: the parent waits for this before sending.
    c.send(b"ready").unwrap();
    let e = err_rx.recv().unwrap();
    assert!(
        matches!(e, Error::PeerGone | Error::Reset),
        "{e:?}"
    );
}

#[test]
fn async_channels_echo_across_processes_and_report_death_once() {
    within(120, "async echo", || {
        let mut peer = spawn_plain("async_echo");
        let chan = parent_channel(&mut peer, channel_config());
        let (tx, rx) = mpsc::channel::<Frame>();
        let errors = Arc::new(Mutex::new(Vec::new()));
        let errs = errors.clone();
        let c = Arc::new(
            AsyncChannel::start(
                chan,
                move |f| tx.send(f).unwrap(),
                move |e| errs.lock().unwrap().push(e),
            )
            .unwrap(),
        );
        let t = WAIT.unwrap();
        assert_eq!(&*rx.recv_timeout(t).unwrap().payload, b"ready");

        // Four threads send concurrently; each thread's frames come back in its order.
        let per = 1000u32;
        on_threads(4, |th| {
            for i in 0..per {
                let mut p = (th as u32).to_le_bytes().to_vec();
                p.extend_from_slice(&i.to_le_bytes());
                p.resize(8 + (i as usize % 300), th as u8);
                if i % 100 == 7 {
                    let file = memfd_with(&format!("{th}/{i}"));
                    c.send(OutFrame::new(&p).fd(file.as_fd())).unwrap();
                } else {
                    c.send(OutFrame::parts(&[&p[..4], &p[4..]])).unwrap();
                }
            }
        });
        let mut next = [0u32; 4];
        for _ in 0..4 * per {
            let f = rx.recv_timeout(t).expect("echo");
            let th = u32::from_le_bytes(f.payload[..4].try_into().unwrap()) as usize;
            let i = u32::from_le_bytes(f.payload[4..8].try_into().unwrap());
            assert_eq!(i, next[th], "thread {th} order");
            next[th] += 1;
            assert_eq!(f.payload.len(), 8 + (i as usize % 300));
            assert!(f.payload[8..].iter().all(|&b| b == th as u8));
            match f.fd {
                Some(fd) => {
                    assert_eq!(i % 100, 7);
                    assert_eq!(read_all(fd), format!("{th}/{i}"));
                }
                None => assert_ne!(i % 100, 7),
            }
        }
        assert_eq!(next, [per; 4]);
        assert!(errors.lock().unwrap().is_empty());

        // The peer dies: on_error, once.
        peer.child.kill().unwrap();
        peer.child.wait().unwrap();
        let deadline = Instant::now() + t;
        while errors.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "on_error never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches!(c.send(b"x"), Err(Error::Hosed)));
        let (done_tx, done_rx) = mpsc::channel();
        c.async_end_sending(move |r| done_tx.send(r).unwrap());
        assert!(matches!(
            done_rx.recv_timeout(t).unwrap(),
            Err(Error::Hosed)
        ));
        drop(Arc::try_unwrap(c).expect("only the test holds it")); // joins the thread
        let errors = errors.lock().unwrap();
        assert_eq!(errors.len(), 1);
        assert!(
            matches!(errors[0], Error::PeerGone | Error::Reset),
            "{:?}",
            errors[0]
        );
    });
}

/// A channel over a socket bound at a file-system path (in a directory of this test's own,
/// removed afterwards even if the test fails).
#[test]
fn channels_connect_to_a_path() {
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Dir(std::env::temp_dir().join(format!(
        "flowipc-transport-path-{}-{:?}",
        std::process::id(),
        Instant::now()
    )));
    std::fs::create_dir_all(&dir.0).unwrap();
    let path = dir.0.join("sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let mut client = Channel::connect(&path, channel_config()).unwrap();
    let (stream, _) = listener.accept().unwrap();
    let mut server = Channel::from_stream(stream, channel_config()).unwrap();
    client.send(b"over a path").unwrap();
    assert_eq!(
        &*server.recv_blocking(WAIT).unwrap().unwrap().payload,
        b"over a path"
    );
    server.send(b"and back").unwrap();
    assert_eq!(
        &*client.recv_blocking(WAIT).unwrap().unwrap().payload,
        b"and back"
    );
    // Connecting where no one listens is an error value, not a panic.
    drop(listener);
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        Channel::connect(&path, channel_config()),
        Err(Error::Io(_))
    ));
}

#[test]
fn a_channel_without_fds_refuses_them_both_ways() {
    let cfg = channel_config().with_fds(false);
    let (mut a, mut b) = Channel::pair(cfg.clone()).unwrap();
    let file = memfd_with("x");
    // Sending one is refused, nothing goes out, the channel is fine.
    assert!(matches!(
        a.send(OutFrame::new(b"with fd").fd(file.as_fd())),
        Err(Error::FdsDisabled)
    ));
    a.send(b"plain").unwrap();
    assert_eq!(&recv(&mut b).payload[..], b"plain");
    // One from a peer that does send fds: UnexpectedFd, once (next_error checks the once).
    let (s1, s2) = UnixStream::pair().unwrap();
    let mut tx = Channel::from_stream(s1, channel_config()).unwrap();
    let mut rx = Channel::from_stream(s2, cfg).unwrap();
    tx.send(OutFrame::new(b"fd").fd(file.as_fd())).unwrap();
    assert!(matches!(next_error(&mut rx), Error::UnexpectedFd));
}
